"""Packed variable-length batches: :func:`varlen_attention`, :func:`plan_varlen`, :class:`VarlenBlockPlan`.

Layout (FlashAttention's varlen convention): the sequences of a batch are concatenated along the
token axis. q is ``(total_q, Hq, D)``, k and v ``(total_k, Hkv, D)``; ``cu_seqlens_q`` and
``cu_seqlens_k`` are int32 ``(batch + 1,)`` cumulative lengths starting at 0, so sequence ``i``
owns query rows ``cu_seqlens_q[i]:cu_seqlens_q[i + 1]`` and key rows
``cu_seqlens_k[i]:cu_seqlens_k[i + 1]``. Its ``len_q[i]`` queries are the *last* ``len_q[i]`` of its
``len_k[i]`` key positions (``len_q == len_k``: a fresh prompt; ``len_q < len_k``: a chunk of a
prompt whose earlier keys are cached), so chunked prefill mixes with fresh prompts in one batch.

Each sequence gets exactly the plan :func:`stem.plan` gives it alone (its own block grid, budgets,
value-bonus standardisation and causal diagonal); a sequence too short to be sparse gets a dense
plan inside the same launch. The plan holds one padded row block per sequence: rows past a
sequence's own query blocks have count 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import InitVar, dataclass
from functools import lru_cache

import torch

from .budget import base_budget, is_dense_budget
from .config import StemConfig
from .plan import BlockPlan, _cdiv, _digest, _version, block_geometry
from .validation import check_tensors, on_device, pack_result, requires_grad, validate_scalars

__all__ = ["VarlenBlockPlan", "plan_varlen", "varlen_attention", "varlen_plan_shape"]

# ---- geometry ------------------------------------------------------------------------------------
def _seq_geometry(q_len: int, kv_len: int, bs: int) -> tuple[int, int, int, int]:
    """(q_offset, q_block_offset, nQ, nK) of one sequence (nQ = 0 for a sequence without queries)."""
    off = kv_len - q_len
    if q_len == 0:
        return off, off // bs, 0, _cdiv(kv_len, bs)
    qbo, nq, nk = block_geometry(q_len, kv_len, off, bs)
    return off, qbo, nq, nk


@lru_cache(maxsize=256)
def _width_bound(n_kv_blocks: int, config: StemConfig) -> int:
    """The widest row any sequence of at most ``n_kv_blocks`` key blocks can get."""
    if n_kv_blocks == 0:
        return 1
    if config.dense:
        return n_kv_blocks
    widest = max(min(base_budget(n, config.k_rate, config.k_bias), n) for n in range(1, n_kv_blocks + 1))
    return max(1, min(n_kv_blocks, widest + config.sink_blocks + config.window_blocks))


def varlen_plan_shape(batch: int, heads: int, max_seqlen_q: int, max_seqlen_k: int, config: StemConfig,
                      auto_dense: bool = False) -> tuple[int, int, int, int]:
    """(B, Hq, nQ, W) of the plan of a packed batch, from shapes and the longest lengths alone
    (so compiled code knows it without reading the lengths): nQ rows per sequence and a row width
    W that fit every sequence of at most those lengths. With ``auto_dense`` (``backend="auto"`` on
    CUDA, where a sequence may take the dense shortcut of ``StemConfig.auto_dense_above``) a row may
    hold every causal block, so W is the longest sequence's block count."""
    bs = config.block_size
    if max_seqlen_q == 0:
        return batch, heads, 0, 1
    nk = _cdiv(max_seqlen_k, bs)
    nq = min(_cdiv(max_seqlen_q, bs) + (max_seqlen_q % bs != 0 or max_seqlen_q < max_seqlen_k), nk)
    if auto_dense and (config.auto_dense_above is None or config.auto_dense_above <= 1.0):
        return batch, heads, nq, nk
    return batch, heads, nq, _width_bound(nk, config)


# ---- input checks -----------------------------------------------------------------------------------
def _check_packed(q, k, v) -> None:
    check_tensors(q, k, v, 3, "in the packed varlen layout (total_tokens, heads, head_dim)",
                  "for (B, H, L, D) batches use stem.attention")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (total_k, Hkv, D), got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    Hq, D = q.shape[1], q.shape[2]
    Hkv, Dk = k.shape[1], k.shape[2]
    if Dk != D or D == 0:
        raise ValueError(f"head dim mismatch: q has D={D}, k/v have D={Dk}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv}) for GQA; "
                         f"check num_attention_heads / num_key_value_heads")


def _check_cu(cu_q, cu_k, device) -> None:
    for name, t in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be an int32 torch.Tensor of shape (batch + 1,), got {type(t).__name__}")
        if t.dtype != torch.int32 or t.dim() != 1 or t.numel() < 1:
            raise ValueError(f"{name} must be an int32 tensor of shape (batch + 1,), got {t.dtype} "
                             f"{tuple(t.shape)}; build it with torch.tensor([0, len0, len0 + len1, ...], "
                             f"dtype=torch.int32)")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but q is on {device}; move it with .to(q.device)")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"cu_seqlens_q has {cu_q.numel() - 1} sequences but cu_seqlens_k has {cu_k.numel() - 1}")


def _read_lengths(cu_q, cu_k, total_q: int | None, total_k: int | None) -> tuple[tuple[int, int], ...]:
    """Per-sequence (len_q, len_k) from the cumulative lengths, checked (against the tensors' token
    counts where given). One device-to-host copy of 2 * (batch + 1) ints: the per-sequence block
    grid and budgets are host arithmetic."""
    both = torch.stack([cu_q, cu_k]).tolist()  # the varlen path's one host sync (see above)
    cq, ck = both
    for name, cu, total in (("cu_seqlens_q", cq, total_q), ("cu_seqlens_k", ck, total_k)):
        if cu[0] != 0:
            raise ValueError(f"{name}[0] must be 0, got {cu[0]}")
        for i in range(len(cu) - 1):
            if cu[i + 1] < cu[i]:
                raise ValueError(f"{name} must be non-decreasing, but {name}[{i + 1}] = {cu[i + 1]} < "
                                 f"{name}[{i}] = {cu[i]}")
        if total is not None and cu[-1] != total:
            which = "q" if name.endswith("q") else "k"
            raise ValueError(f"{name}[-1] = {cu[-1]} but {which} has {total} tokens; the last entry must be the "
                             f"total length")
    lens = tuple((cq[i + 1] - cq[i], ck[i + 1] - ck[i]) for i in range(len(cq) - 1))
    for i, (lq, lk) in enumerate(lens):
        if lq > lk:
            raise ValueError(f"sequence {i} has {lq} queries but only {lk} keys: its queries must be the last "
                             f"len_q of its len_k key positions (len_q <= len_k)")
    return lens


def _max_lengths(lens, max_seqlen_q, max_seqlen_k) -> tuple[int, int]:
    mq = max((lq for lq, _ in lens), default=0)
    mk = max((lk for _, lk in lens), default=0)
    for name, given, real in (("max_seqlen_q", max_seqlen_q, mq), ("max_seqlen_k", max_seqlen_k, mk)):
        if given is None:
            continue
        if isinstance(given, bool) or not isinstance(given, int):
            raise TypeError(f"{name} must be an int or None, got {type(given).__name__}")
        if given < real:
            raise ValueError(f"{name}={given} is smaller than the longest sequence ({real}); pass the true maximum "
                             f"or leave it out")
    return (mq if max_seqlen_q is None else max_seqlen_q), (mk if max_seqlen_k is None else max_seqlen_k)


# ---- the plan ------------------------------------------------------------------------------------
@dataclass
class VarlenBlockPlan:
    """The block plan of a packed variable-length batch: one padded-CSR row block per sequence.

    Row ``i`` of sequence ``b`` is its query block ``i``: absolute block ``q_block_offset_b + i``
    of the sequence, where ``q_offset_b = len_k[b] - len_q[b]`` (its queries are the last
    ``len_q[b]`` of its ``len_k[b]`` positions) and ``q_block_offset_b = q_offset_b // block_size``.
    Key block ``j`` of sequence ``b`` is its key rows ``[j * block_size, (j + 1) * block_size)``.

    Attributes:
        kv_counts: int32 (B, Hq, nQ): selected key blocks per row; 0 for rows past a sequence's own
            ``nQ_b`` query blocks.
        kv_indices: int32 (B, Hq, nQ, W): selected key blocks (the sequence's own numbering),
            ascending in the first ``kv_counts`` slots; later slots are padding.
        block_size: tokens per block.
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) cumulative lengths, on the plan's device.
        max_seqlen_q, max_seqlen_k: upper bounds of the lengths (they fix nQ and W, see
            :func:`varlen_plan_shape`).
        config: the StemConfig that made the plan (None for hand-made plans).
        dense: True when every row keeps every causal block.

    Checked on construction (shapes, dtypes) and, with :meth:`check` (one host synchronisation),
    the contents; the planner's own plans are trusted. :meth:`sequence` gives sequence ``b``'s
    plan as an ordinary :class:`BlockPlan`.
    """

    kv_counts: torch.Tensor
    kv_indices: torch.Tensor
    block_size: int
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    config: StemConfig | None = None
    dense: bool = False
    _trusted: InitVar[bool] = False

    def __post_init__(self, _trusted: bool = False) -> None:
        for name in ("block_size", "max_seqlen_q", "max_seqlen_k"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int):
                raise TypeError(f"VarlenBlockPlan.{name} must be an int, got {type(val).__name__} ({val!r})")
        if self.block_size < 1:
            raise ValueError(f"VarlenBlockPlan.block_size must be >= 1, got {self.block_size}")
        if not isinstance(self.dense, bool):
            raise TypeError(f"VarlenBlockPlan.dense must be a bool, got {self.dense!r}")
        if self.config is not None and not isinstance(self.config, StemConfig):
            raise TypeError(f"VarlenBlockPlan.config must be a stem.StemConfig or None, got "
                            f"{type(self.config).__name__}")
        c, i = self.kv_counts, self.kv_indices
        if not isinstance(c, torch.Tensor) or not isinstance(i, torch.Tensor):
            raise TypeError("VarlenBlockPlan.kv_counts and kv_indices must be torch tensors")
        if c.dtype != torch.int32 or i.dtype != torch.int32:
            raise TypeError("VarlenBlockPlan.kv_counts and kv_indices must be int32 tensors")
        if c.dim() != 3 or i.dim() != 4 or tuple(i.shape[:3]) != tuple(c.shape) or i.shape[3] < 1:
            raise ValueError(f"VarlenBlockPlan expects kv_counts (B, Hq, nQ) and kv_indices (B, Hq, nQ, W >= 1), got "
                             f"{tuple(c.shape)} and {tuple(i.shape)}")
        _check_cu(self.cu_seqlens_q, self.cu_seqlens_k, c.device)
        if i.device != c.device:
            raise ValueError(f"VarlenBlockPlan.kv_counts is on {c.device} but kv_indices on {i.device}")
        if self.cu_seqlens_q.numel() - 1 != c.shape[0]:
            raise ValueError(f"VarlenBlockPlan has {c.shape[0]} sequences in kv_counts but cu_seqlens_q describes "
                             f"{self.cu_seqlens_q.numel() - 1}")
        self._lens: tuple[tuple[int, int], ...] | None = None
        self._checked: tuple | None = self._versions() if _trusted else None
        if not _trusted:
            self.check()

    # ---- geometry -----------------------------------------------------------------------------
    @property
    def seqlens(self) -> tuple[tuple[int, int], ...]:
        """Per sequence (len_q, len_k), read from the cumulative lengths once (a host sync)."""
        if self._lens is None:
            self._lens = _read_lengths(self.cu_seqlens_q, self.cu_seqlens_k, None, None)
        return self._lens

    @property
    def batch_size(self) -> int:
        return self.kv_counts.shape[0]

    @property
    def num_heads(self) -> int:
        return self.kv_counts.shape[1]

    @property
    def num_q_blocks(self) -> int:
        """Rows per sequence (the longest sequence's query blocks, or more)."""
        return self.kv_counts.shape[2]

    @property
    def device(self) -> torch.device:
        return self.kv_counts.device

    def geometry(self, b: int) -> tuple[int, int, int, int]:
        """(q_offset, q_block_offset, nQ, nK) of sequence ``b``."""
        lq, lk = self.seqlens[b]
        return _seq_geometry(lq, lk, self.block_size)

    @property
    def density(self) -> float:
        """Selected blocks / causal blocks over every sequence, head and query block (syncs)."""
        causal = 0
        for b in range(self.batch_size):
            _, qbo, nq, _ = self.geometry(b)
            causal += sum(qbo + i + 1 for i in range(nq))
        causal *= self.num_heads
        return float(self.kv_counts.sum().double()) / causal if causal else 1.0

    # ---- checks -------------------------------------------------------------------------------
    def _versions(self) -> tuple:
        c, i = self.kv_counts, self.kv_indices
        return (c.data_ptr(), _version(c), i.data_ptr(), _version(i))

    def check(self) -> None:
        """Raise ValueError naming the first malformed entry (lengths, counts past a sequence's
        rows, indices out of the sequence's range, not causal, not ascending); else mark checked."""
        lens = self.seqlens
        mq = max((a for a, _ in lens), default=0)
        mk = max((b for _, b in lens), default=0)
        if mq > self.max_seqlen_q or mk > self.max_seqlen_k:
            raise ValueError(f"malformed VarlenBlockPlan: the longest sequence has len_q={mq}, len_k={mk} but the plan "
                             f"says max_seqlen_q={self.max_seqlen_q}, max_seqlen_k={self.max_seqlen_k}")
        geo = [_seq_geometry(lq, lk, self.block_size) for lq, lk in lens]
        nq_need = max((g[2] for g in geo), default=0)
        if self.num_q_blocks < nq_need:
            raise ValueError(f"malformed VarlenBlockPlan: it has {self.num_q_blocks} rows per sequence but sequence "
                             f"lengths need {nq_need}")
        B, nQ = self.batch_size, self.num_q_blocks
        if B * nQ == 0:
            self._checked = self._versions()
            return
        dev = self.device
        qbo = torch.tensor([g[1] for g in geo], device=dev).view(B, 1, 1)
        nqs = torch.tensor([g[2] for g in geo], device=dev).view(B, 1, 1)
        nks = torch.tensor([g[3] for g in geo], device=dev).view(B, 1, 1, 1)
        rows = torch.arange(nQ, device=dev).view(1, 1, nQ)
        counts, idx = self.kv_counts, self.kv_indices
        W = idx.shape[-1]
        valid = torch.arange(W, device=dev) < counts.unsqueeze(-1)
        diag = (rows + qbo).unsqueeze(-1)
        bad = [
            (counts < 0) | (counts > W),
            (rows >= nqs) & (counts != 0),
            valid & (idx < 0),
            valid & (idx >= nks),
            valid & (idx < nks) & (idx > diag),
            torch.nn.functional.pad(valid[..., 1:] & (idx[..., 1:] <= idx[..., :-1]), (1, 0)),
        ]
        flags = torch.stack([x.any() for x in bad]).tolist()  # the check's host sync
        if any(flags):
            kind = flags.index(True)
            where = tuple(int(x) for x in bad[kind].nonzero()[0].tolist())
            b = where[0]
            at = ", ".join(map(str, where))
            if kind == 0:
                what = f"kv_counts[{at}] is outside [0, W={W}]"
            elif kind == 1:
                what = f"kv_counts[{at}] is not 0 although sequence {b} has only {geo[b][2]} query blocks"
            elif kind == 2:
                what = f"kv_indices[{at}] is negative"
            elif kind == 3:
                what = f"kv_indices[{at}] = {int(idx[where])} is out of range: sequence {b} has {geo[b][3]} key blocks"
            elif kind == 4:
                what = (f"kv_indices[{at}] = {int(idx[where])} is not causal: that row is absolute block "
                        f"{geo[b][1] + where[2]} of sequence {b}")
            else:
                what = (f"kv_indices[{', '.join(map(str, where[:3]))}] is not strictly ascending in its first "
                        f"{int(counts[where[:3]])} slots")
            raise ValueError(f"malformed VarlenBlockPlan: {what}; build plans with stem.plan_varlen or fix the "
                             f"tensors")
        self._checked = self._versions()

    def ensure_checked(self) -> None:
        """:meth:`check` unless already checked (or made by the planner) and unmodified since."""
        if self._checked != self._versions():
            self.check()

    # ---- conversions ----------------------------------------------------------------------------
    def sequence(self, b: int) -> BlockPlan:
        """Sequence ``b``'s plan as an ordinary :class:`BlockPlan` (batch 1), a view of this one."""
        if not 0 <= b < self.batch_size:
            raise IndexError(f"sequence {b} out of range: the plan has {self.batch_size} sequences")
        lq, lk = self.seqlens[b]
        if lq == 0:
            raise ValueError(f"sequence {b} has no queries, so it has no plan")
        off, _, nq, _ = _seq_geometry(lq, lk, self.block_size)
        return BlockPlan(self.kv_counts[b : b + 1, :, :nq], self.kv_indices[b : b + 1, :, :nq], self.block_size, lq,
                         lk, self.config, self.dense, off, _trusted=self._checked == self._versions())

    def to(self, device: torch.device | str) -> VarlenBlockPlan:
        """The same plan with its tensors on ``device``."""
        plan = VarlenBlockPlan(self.kv_counts.to(device), self.kv_indices.to(device), self.block_size,
                               self.cu_seqlens_q.to(device), self.cu_seqlens_k.to(device), self.max_seqlen_q,
                               self.max_seqlen_k, self.config, self.dense,
                               _trusted=self._checked == self._versions())
        plan._lens = self._lens
        return plan

    def plot(self, path: str, *, seq: int = 0, heads: list[int] | None = None, max_heads: int = 8) -> str:
        """PNG heatmap of sequence ``seq``'s plan (see :meth:`BlockPlan.plot`); returns ``path``."""
        return self.sequence(seq).plot(path, heads=heads, max_heads=max_heads)

    # ---- persistence ------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write the plan to a safetensors file (with a sha256 that :meth:`load` checks)."""
        from safetensors.torch import save_file

        meta = {
            "format": "stem.VarlenBlockPlan/1",
            "block_size": str(self.block_size),
            "max_seqlen_q": str(self.max_seqlen_q),
            "max_seqlen_k": str(self.max_seqlen_k),
            "dense": json.dumps(self.dense),
            "config": self.config.to_json() if self.config is not None else "null",
        }
        tensors = {name: getattr(self, name).contiguous().cpu()
                   for name in ("kv_counts", "kv_indices", "cu_seqlens_q", "cu_seqlens_k")}
        meta["sha256"] = _digest(meta, tensors)
        save_file(tensors, path, metadata=meta)

    @classmethod
    def load(cls, path: str, device: torch.device | str = "cpu") -> VarlenBlockPlan:
        """Read a plan written by :meth:`save` (contents checked); every error names the file."""
        from safetensors import safe_open

        names = ("kv_counts", "kv_indices", "cu_seqlens_q", "cu_seqlens_k")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "stem.VarlenBlockPlan/1":
                    hint = " (use stem.BlockPlan.load)" if meta.get("format") == "stem.BlockPlan/1" else ""
                    raise ValueError(f"not a stem VarlenBlockPlan file (format={meta.get('format')!r}){hint}")
                missing = set(names) - set(f.keys())
                if missing:
                    raise ValueError(f"missing tensors {sorted(missing)}")
                tensors = {n: f.get_tensor(n) for n in names}
            if meta.get("sha256") != _digest({k: v for k, v in meta.items() if k != "sha256"}, tensors):
                raise ValueError("its contents do not match the sha256 that VarlenBlockPlan.save wrote (the file was "
                                 "edited or corrupted); re-plan and save again")
            cfg = meta.get("config", "null")
            return cls(*(tensors[n].to(device) for n in names[:2]), int(meta["block_size"]),
                       *(tensors[n].to(device) for n in names[2:]), int(meta["max_seqlen_q"]),
                       int(meta["max_seqlen_k"]), None if cfg == "null" else StemConfig.from_json(cfg),
                       json.loads(meta.get("dense", "false")))
        except FileNotFoundError:
            raise FileNotFoundError(f"VarlenBlockPlan.load: no such file: {path}") from None
        except Exception as e:
            raise ValueError(f"VarlenBlockPlan.load({path!r}): {type(e).__name__}: {e}") from e

    def __repr__(self) -> str:
        B, H, nQ, W = self.kv_indices.shape
        return (f"VarlenBlockPlan(sequences={B}, heads={H}, max_seqlen_q={self.max_seqlen_q}, "
                f"max_seqlen_k={self.max_seqlen_k}, block_size={self.block_size}, rows={nQ}, width={W}, "
                f"dense={self.dense}, device={self.device})")


# ---- planning -----------------------------------------------------------------------------------------
def _seq_view(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Packed rows [a, b) of x (T, H, D) as a (1, H, b - a, D) view (no copy)."""
    return x[a:b].transpose(0, 1).unsqueeze(0)


def _dense_seq(lq: int, lk: int, config: StemConfig, device_type: str, auto_dense: bool, head_dim: int = 128,
               gqa: int = 4, heads: int = 32) -> bool:
    """Whether a sequence gets a dense plan: a dense config or budget, or (auto_dense) the auto
    shortcut of stem.attention on CUDA."""
    from .api import auto_dense_reason

    n = _cdiv(lk, config.block_size)
    if config.dense or is_dense_budget(n, config.k_rate, config.k_bias):
        return True
    return auto_dense and auto_dense_reason(device_type, lq, lk, config, head_dim=head_dim, gqa=gqa,
                                                heads=heads) is not None


def plan_varlen_rows(q, k, v, cu_q, lens, max_q: int, max_k: int, config: StemConfig, *, pooling: str = "auto",
                     auto_dense: bool = False, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(kv_counts, kv_indices, all_dense) of the packed batch, shaped by :func:`varlen_plan_shape`.

    ``impl``: "loop" plans each sequence with :func:`stem.plan`'s code (exactly its plan), "batched"
    plans all sequences together (one pooling pass, one GEMM, one selection), "auto" batches on
    CUDA and loops elsewhere (on CPU the loop is the exact path and costs nothing extra)."""
    from .planner import dense_plan, plan_validated

    B, Hq = len(lens), q.shape[1]
    dev, bs = q.device, config.block_size
    auto_dense = auto_dense and dev.type == "cuda"  # the shortcut is a CUDA speed rule (see auto_dense_reason)
    _, _, nQ, W = varlen_plan_shape(B, Hq, max_q, max_k, config, auto_dense)
    dense = [_dense_seq(lq, lk, config, dev.type, auto_dense, q.shape[2], q.shape[1] // k.shape[1], Hq)
             for lq, lk in lens]
    all_dense = all(dense)
    if impl == "auto":
        # an opt-in ranking (StemConfig.ranking) plans sequence by sequence: its scores need each
        # sequence's own q and k rows, which the batched planner's pooled statistics do not hold
        impl = "batched" if dev.type == "cuda" and not all_dense and config.ranking == "stem" else "loop"
    if impl == "batched" and config.ranking != "stem":
        raise ValueError(f"the batched varlen planner computes Stem's own ranking only, not "
                         f"StemConfig.ranking={config.ranking!r}; use impl='loop'")
    if impl == "batched":
        from .planner import plan_varlen_batched

        counts, indices = plan_varlen_batched(q, k, v, cu_q, lens, dense, nQ, W, config, pooling)
        return counts, indices, all_dense
    if impl != "loop":
        raise ValueError(f"impl must be 'auto', 'loop' or 'batched', got {impl!r}")
    counts = torch.zeros(B, Hq, nQ, dtype=torch.int32, device=dev)
    indices = torch.zeros(B, Hq, nQ, W, dtype=torch.int32, device=dev)
    cq = [0]
    for lq, _ in lens:
        cq.append(cq[-1] + lq)
    ck = [0]
    for _, lk in lens:
        ck.append(ck[-1] + lk)
    for b, (lq, lk) in enumerate(lens):
        if lq == 0:
            continue
        if dense[b]:
            p = dense_plan(1, Hq, lq, lk, bs, dev, config)
        else:
            p = plan_validated(_seq_view(q, cq[b], cq[b + 1]), _seq_view(k, ck[b], ck[b + 1]),
                               _seq_view(v, ck[b], ck[b + 1]), config, pooling=pooling)
        nq, w = p.kv_indices.shape[2], p.kv_indices.shape[3]
        counts[b, :, :nq] = p.kv_counts[0]
        indices[b, :, :nq, :w] = p.kv_indices[0]
    return counts, indices, all_dense


def plan_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    config: StemConfig | None = None,
    pooling: str = "auto",
) -> VarlenBlockPlan:
    """Plan a packed variable-length batch: each sequence gets exactly :func:`stem.plan`'s plan.

    Args:
        q: (total_q, Hq, D); k, v: (total_k, Hkv, D), the packed sequences (module docstring).
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) cumulative lengths on q's device.
        max_seqlen_q, max_seqlen_k: the longest lengths (read from the cumulative lengths if left
            out); larger values are allowed and only widen the plan.
        config: StemConfig (default: the paper's); pooling: as in :func:`stem.plan`.

    Returns:
        VarlenBlockPlan on q's device.
    """
    config = StemConfig() if config is None else config
    if not isinstance(config, StemConfig):
        raise TypeError(f"config must be a stem.StemConfig, got {type(config).__name__}")
    _check_packed(q, k, v)
    _check_cu(cu_seqlens_q, cu_seqlens_k, q.device)
    lens = _read_lengths(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0])
    mq, mk = _max_lengths(lens, max_seqlen_q, max_seqlen_k)
    with torch.no_grad(), on_device(q):
        counts, indices, all_dense = plan_varlen_rows(q, k, v, cu_seqlens_q, lens, mq, mk, config, pooling=pooling)
    plan = VarlenBlockPlan(counts, indices, config.block_size, cu_seqlens_q, cu_seqlens_k, mq, mk, config, all_dense,
                           _trusted=True)
    plan._lens = lens
    return plan


# ---- attention ------------------------------------------------------------------------------------------
def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    config: StemConfig | None = None,
    plan: VarlenBlockPlan | None = None,
    backend: str = "auto",
    scale: float | None = None,
    return_lse: bool = False,
    return_plan: bool = False,
):
    """Stem sparse causal attention over a packed variable-length batch.

    Args:
        q: (total_q, Hq, D) packed queries; k, v: (total_k, Hkv, D) packed keys/values;
            float16, bfloat16, float32 (float64 on CPU); Hq % Hkv == 0.
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) cumulative lengths on q's device; sequence
            i's queries are the last ``len_q[i]`` of its ``len_k[i]`` keys (module docstring).
        max_seqlen_q, max_seqlen_k: the longest lengths; read from the cumulative lengths when left
            out (``torch.compile`` needs them given).
        config, plan, backend, scale, return_lse, return_plan: as in :func:`stem.attention`
            (``plan`` a :class:`VarlenBlockPlan`). With ``backend="auto"`` on CUDA, a sequence
            whose budgets keep most of its blocks gets a dense plan (``StemConfig.auto_dense_above``)
            inside the same launch.

    Returns:
        out (total_q, Hq, D) in q's dtype; with ``return_lse`` also lse float32 (Hq, total_q)
        (FlashAttention's varlen layout; float64 for float64 inputs); with ``return_plan`` the
        VarlenBlockPlan last.

    Reads the cumulative lengths on the host once per call (the per-sequence block grid and
    budgets are host arithmetic). Forward only, like :func:`stem.attention`.
    """
    _check_packed(q, k, v)
    _check_cu(cu_seqlens_q, cu_seqlens_k, q.device)
    if torch.compiler.is_compiling():
        return _varlen_traced(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, config, plan, backend,
                              scale, return_lse, return_plan)
    lens = _read_lengths(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0])
    mq, mk = _max_lengths(lens, max_seqlen_q, max_seqlen_k)
    return _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, lens, mq, mk, config, plan, backend, scale,
                             return_lse, return_plan)


def _varlen_traced(q, k, v, cu_q, cu_k, max_q, max_k, config, plan, backend, scale, return_lse, return_plan):
    """What torch.compile traces: two custom ops (stem.ops); the lengths are read inside them."""
    from .api import compile_unsupported
    from .ops import config_fields, config_json, decide_varlen

    if plan is not None or return_plan:
        raise compile_unsupported("plan= / return_plan=True")
    if max_q is None or max_k is None:
        raise ValueError("inside torch.compile, stem.varlen_attention needs max_seqlen_q and max_seqlen_k (they fix "
                         "the plan's shape without reading the lengths)")
    scale = validate_scalars(scale, return_lse, return_plan, backend)
    config = StemConfig() if config is None else config
    fields = config_fields(config)
    name, _ = decide_varlen(backend, q.device, q.dtype, q.shape[-1], fields, return_lse)
    if requires_grad(q, k, v):
        raise RuntimeError("stem.varlen_attention is forward-only inside torch.compile: run it under torch.no_grad()")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    counts, indices = torch.ops.stem.plan_varlen(q, k, v, cu_q, cu_k, max_q, max_k, config_json(fields),
                                                 backend == "auto")
    out, lse = torch.ops.stem.execute_varlen(q, k, v, cu_q, cu_k, counts, indices, config.block_size, max_q, max_k,
                                             name, scale, return_lse)
    return (out, lse) if return_lse else out


def _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, lens, mq, mk, config, plan, backend, scale, return_lse,
                      return_plan):
    """:func:`varlen_attention` once the lengths are known on the host (the transformers integration
    knows them from the padding mask and skips the read)."""
    from .dispatch import DispatchKey, resolve

    scale = validate_scalars(scale, return_lse, return_plan, backend)
    if config is not None and not isinstance(config, StemConfig):
        raise TypeError(f"config must be a stem.StemConfig, got {type(config).__name__}")
    if plan is not None:
        if not isinstance(plan, VarlenBlockPlan):
            raise TypeError(f"plan must be a stem.VarlenBlockPlan, got {type(plan).__name__}")
        if config is not None and config != plan.config:
            raise ValueError(f"config= and plan= disagree: the plan was made with {plan.config}, config= is {config}; "
                             "a plan runs as it was made, so pass only plan=")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    with on_device(q):
        if plan is None:
            config = StemConfig() if config is None else config
            with torch.no_grad():
                counts, indices, all_dense = plan_varlen_rows(q, k, v, cu_seqlens_q, lens, mq, mk, config,
                                                              auto_dense=backend == "auto")
            plan = VarlenBlockPlan(counts, indices, config.block_size, cu_seqlens_q, cu_seqlens_k, mq, mk, config,
                                   all_dense, _trusted=True)
            plan._lens = lens
        else:
            if plan.seqlens != lens:
                raise ValueError(f"plan is for sequence lengths (len_q, len_k) {list(plan.seqlens)[:8]} but the call "
                                 f"has {list(lens)[:8]}; re-plan")
            if plan.num_heads != q.shape[1] or plan.device != q.device:
                raise ValueError(f"plan is for {plan.num_heads} heads on {plan.device} but q has {q.shape[1]} heads on "
                                 f"{q.device}; re-plan or use plan.to(q.device)")
            plan.ensure_checked()
        ex, why = resolve(backend, DispatchKey.of(q, plan, return_lse, varlen=True))
        if not ex.differentiable and requires_grad(q, k, v):
            raise RuntimeError(f"stem.varlen_attention is forward-only: the {ex.name!r} executor has no backward and "
                               "q/k/v require grad; run it under torch.no_grad()")
        from . import api

        api._last = why
        out, lse = ex.forward_varlen(q, k, v, plan, scale, return_lse)
    return pack_result(out, lse, plan, return_lse, return_plan)
