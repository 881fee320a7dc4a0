"""BlockPlan: which key blocks each (batch, query head, query block) attends to."""

from __future__ import annotations

import hashlib
import json
import operator
from dataclasses import InitVar, dataclass

import torch

from .config import StemConfig

__all__ = ["BlockPlan", "block_geometry"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_geometry(q_len: int, kv_len: int, q_offset: int, block_size: int) -> tuple[int, int, int]:
    """(q_block_offset, nQ, nK) for queries at absolute positions [q_offset, q_offset + q_len) of a
    kv_len-token sequence: plan query block i is absolute block q_block_offset + i."""
    qbo = q_offset // block_size
    return qbo, (q_offset + q_len - 1) // block_size - qbo + 1, _cdiv(kv_len, block_size)


@dataclass
class BlockPlan:
    """A block-sparse causal attention plan in padded-CSR form.

    Query block ``i`` of the plan covers the *absolute* token positions
    ``[(q_block_offset + i) * block_size, (q_block_offset + i + 1) * block_size)`` intersected
    with the query positions ``[q_offset, q_offset + q_len)``. By default ``q_offset = kv_len -
    q_len``: the queries are the last ``q_len`` of ``kv_len`` positions (``q_len == kv_len`` is
    ordinary prefill, ``q_len < kv_len`` chunked prefill); context parallelism places a chunk
    anywhere. Key block ``j`` covers ``[j * block_size, (j + 1) * block_size) ∩ [0, kv_len)``;
    keys after a query are masked causally.

    Attributes:
        kv_counts: int32 (B, Hq, nQ): number of selected key blocks of each query block.
        kv_indices: int32 (B, Hq, nQ, W): selected key block indices, ascending in the first
            ``kv_counts`` entries; entries past the count are padding (0) and must be ignored.
            ``W`` is the largest count the config allows (at most nK).
        block_size: tokens per block.
        q_len, kv_len: Lq and Lk in tokens.
        q_offset: absolute position of query row 0 (default ``kv_len - q_len``).
        config: the StemConfig that made the plan (None for hand-made plans).
        dense: True when the plan is known to keep every causal block (a dense layer or a
            budget that covers everything); executors may then take a dense path.

    A query block whose count is 0 attends to nothing: its output rows are 0 and their
    log-sum-exp is -inf (every executor agrees). The planner never makes such a row.

    Checked on construction: shapes, dtypes and geometry always; the contents (``0 <= count <=
    W``, indices in ``[0, nK)``, causal for the plan's ``q_offset``, strictly ascending) with
    :meth:`check`, one host-device synchronisation, skipped for the planner's own plans.
    ``stem.attention`` checks again only if the index tensors were modified in place since.
    """

    kv_counts: torch.Tensor
    kv_indices: torch.Tensor
    block_size: int
    q_len: int
    kv_len: int
    config: StemConfig | None = None
    dense: bool = False
    q_offset: int | None = None
    _trusted: InitVar[bool] = False  # the planner's own plans: contents valid by construction

    def __post_init__(self, _trusted: bool = False) -> None:
        for name in ("block_size", "q_len", "kv_len") + (("q_offset",) if self.q_offset is not None else ()):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int):
                try:
                    val = operator.index(val)  # numpy / torch integer scalars
                except TypeError:
                    raise TypeError(f"BlockPlan.{name} must be an int, got {type(val).__name__} ({val!r})") from None
                setattr(self, name, int(val))
        if self.q_offset is None:
            self.q_offset = self.kv_len - self.q_len
        if not isinstance(self.kv_counts, torch.Tensor) or not isinstance(self.kv_indices, torch.Tensor):
            raise TypeError("BlockPlan.kv_counts and kv_indices must be torch tensors")
        if self.block_size < 1:
            raise ValueError(f"BlockPlan.block_size must be >= 1, got {self.block_size}")
        if not isinstance(self.dense, bool):
            raise TypeError(f"BlockPlan.dense must be a bool, got {self.dense!r}")
        if self.config is not None and not isinstance(self.config, StemConfig):
            raise TypeError(f"BlockPlan.config must be a stem.StemConfig or None, got {type(self.config).__name__}")
        if self.kv_counts.dtype != torch.int32 or self.kv_indices.dtype != torch.int32:
            raise TypeError("BlockPlan.kv_counts and kv_indices must be int32 tensors")
        if self.kv_counts.dim() != 3 or self.kv_indices.dim() != 4:
            raise ValueError(
                f"BlockPlan expects kv_counts (B, Hq, nQ) and kv_indices (B, Hq, nQ, W), got "
                f"{tuple(self.kv_counts.shape)} and {tuple(self.kv_indices.shape)}"
            )
        if tuple(self.kv_indices.shape[:3]) != tuple(self.kv_counts.shape) or self.kv_indices.shape[3] < 1:
            raise ValueError(
                f"BlockPlan.kv_indices must be (B, Hq, nQ, W >= 1) with (B, Hq, nQ) = kv_counts' shape "
                f"{tuple(self.kv_counts.shape)}, got {tuple(self.kv_indices.shape)}"
            )
        if self.kv_counts.device != self.kv_indices.device:
            raise ValueError(f"BlockPlan.kv_counts is on {self.kv_counts.device} but kv_indices on "
                             f"{self.kv_indices.device}; move both with .to(device)")
        if not (0 < self.q_len and 0 <= self.q_offset and self.q_offset + self.q_len <= self.kv_len):
            raise ValueError(
                f"BlockPlan needs 0 < q_len and q_offset + q_len <= kv_len, got q_len={self.q_len}, "
                f"q_offset={self.q_offset}, kv_len={self.kv_len}"
            )
        if self.kv_counts.shape[2] != self.num_q_blocks:
            raise ValueError(
                f"BlockPlan has {self.kv_counts.shape[2]} query blocks but q_len={self.q_len}, "
                f"kv_len={self.kv_len}, block_size={self.block_size} need {self.num_q_blocks}"
            )
        self._checked: tuple | None = None
        if _trusted:
            self._checked = self._versions()
        else:
            self.check()

    # ---- content checks -------------------------------------------------------------------
    def _versions(self) -> tuple:
        c, i = self.kv_counts, self.kv_indices
        return (c.data_ptr(), _version(c), i.data_ptr(), _version(i))

    def check(self) -> None:
        """Raise ValueError naming the first malformed entry, else mark the contents checked.

        Checks ``0 <= kv_counts <= W`` and, in the first ``kv_counts`` slots of each row, indices
        in ``[0, nK)``, causal (at most the row's diagonal block, absolute block
        ``q_block_offset + i``) and strictly ascending. One host-device synchronisation.
        """
        problem = self._problem()
        if problem is not None:
            raise ValueError(f"malformed BlockPlan: {problem}; build plans with stem.plan or "
                             f"BlockPlan.from_dense_mask, or fix the tensors")
        self._checked = self._versions()

    def ensure_checked(self) -> None:
        """:meth:`check`, unless the contents were checked (or made by the planner) and the index
        tensors have not been modified in place since (no synchronisation in that case)."""
        if self._checked != self._versions():
            self.check()

    def _problem(self) -> str | None:
        counts, idx = self.kv_counts, self.kv_indices
        if counts.numel() == 0:
            return None
        dev, W, nK = counts.device, idx.shape[-1], self.num_kv_blocks
        valid = torch.arange(W, device=dev) < counts.unsqueeze(-1)
        diag = (torch.arange(self.num_q_blocks, device=dev) + self.q_block_offset).view(1, 1, -1, 1)
        bad = [
            (counts < 0) | (counts > W),
            valid & (idx < 0),
            valid & (idx >= nK),
            valid & (idx < nK) & (idx > diag),
            torch.nn.functional.pad(valid[..., 1:] & (idx[..., 1:] <= idx[..., :-1]), (1, 0)),
        ]
        flags = torch.stack([b.any() for b in bad]).tolist()  # the check's one host sync
        if not any(flags):
            return None
        kind = flags.index(True)
        where = tuple(int(x) for x in bad[kind].nonzero()[0].tolist())  # error path only
        if kind == 0:
            at = ", ".join(map(str, where))
            return f"kv_counts[{at}] = {int(counts[where])} is outside [0, W={W}] (W = kv_indices.shape[-1])"
        val = int(idx[where])
        at = f"kv_indices[{', '.join(map(str, where))}] = {val}"
        if kind == 1:
            return f"{at} is negative"
        if kind == 2:
            return (f"{at} is out of range: the plan has {nK} key blocks (kv_len={self.kv_len}, "
                    f"block_size={self.block_size})")
        if kind == 3:
            d = where[2] + self.q_block_offset
            return (f"{at} is not causal: query block {where[2]} is absolute block {d} (q_offset={self.q_offset}), "
                    f"so its key blocks must be <= {d}")
        row = idx[where[:3]][: int(counts[where[:3]])].tolist()
        at = ", ".join(map(str, where[:3]))
        return f"kv_indices[{at}] is not strictly ascending in its first {len(row)} slots: {row[:12]}"

    # ---- geometry -------------------------------------------------------------------------
    @property
    def q_block_offset(self) -> int:
        """Absolute block index of plan query block 0."""
        return self.q_offset // self.block_size

    @property
    def num_q_blocks(self) -> int:
        return block_geometry(self.q_len, self.kv_len, self.q_offset, self.block_size)[1]

    @property
    def num_kv_blocks(self) -> int:
        return _cdiv(self.kv_len, self.block_size)

    @property
    def batch_size(self) -> int:
        return self.kv_counts.shape[0]

    @property
    def num_heads(self) -> int:
        return self.kv_counts.shape[1]

    @property
    def device(self) -> torch.device:
        return self.kv_counts.device

    def causal_blocks_per_row(self) -> torch.Tensor:
        """int64 (nQ,): number of causal key blocks of each query block."""
        return torch.arange(self.num_q_blocks, device=self.device) + self.q_block_offset + 1

    @property
    def density(self) -> float:
        """Selected blocks / causal blocks, over all (b, h, query block). Syncs with the device."""
        causal = self.causal_blocks_per_row().sum() * self.batch_size * self.num_heads
        return float(self.kv_counts.sum().double() / causal.double())

    # ---- conversions ----------------------------------------------------------------------
    def to_dense_mask(self) -> torch.Tensor:
        """bool (B, Hq, nQ, nK): True where query block i attends to key block j."""
        B, H, nQ, W = self.kv_indices.shape
        mask = torch.zeros(B, H, nQ, self.num_kv_blocks + 1, dtype=torch.bool, device=self.device)
        valid = torch.arange(W, device=self.device) < self.kv_counts.unsqueeze(-1)
        idx = torch.where(valid, self.kv_indices.long(), self.num_kv_blocks)
        mask.scatter_(-1, idx, True)
        return mask[..., : self.num_kv_blocks]

    def to_flex_block_mask(self):
        """The same plan as a FlexAttention ``torch.nn.attention.flex_attention.BlockMask``.

        A selected key block strictly before its query block's diagonal is a *full* block (no
        ``mask_mod``); a selected diagonal block is a *partial* block masked causally (query
        position >= key position); unselected and non-causal blocks are absent. The mask covers
        (B, Hq, q_len, kv_len) tokens with ``BLOCK_SIZE = block_size``: ``kv_num_blocks`` and
        ``full_kv_num_blocks`` are int32 (B, Hq, nQ), ``kv_indices`` and ``full_kv_indices`` int32
        (B, Hq, nQ, nK), on the plan's device. ``flex_attention(q, k, v, block_mask=...,
        enable_gqa=True)`` then computes what ``stem.attention(q, k, v, plan=plan)`` does.

        FlexAttention's query blocks start at query row 0, so the plan's query blocks line up with
        them only when ``q_offset`` is a multiple of ``block_size`` (always so for ordinary prefill);
        other offsets raise ValueError.
        """
        from torch.nn.attention.flex_attention import BlockMask

        bs, q_offset = self.block_size, self.q_offset
        if q_offset % bs:
            raise ValueError(
                f"to_flex_block_mask needs q_offset ({q_offset}) to be a multiple of block_size ({bs}): "
                f"FlexAttention's query blocks start at query row 0"
            )
        B, H, nQ, W = self.kv_indices.shape
        nK, dev = self.num_kv_blocks, self.device
        idx = self.kv_indices.long()
        valid = torch.arange(W, device=dev) < self.kv_counts.unsqueeze(-1)
        diag = (torch.arange(nQ, device=dev) + self.q_block_offset)[:, None]  # (nQ, 1): absolute diagonal block
        # full blocks: selected and strictly causal, ascending, padded with 0 to nK columns
        full = torch.sort(torch.where(valid & (idx < diag), idx, nK), dim=-1).values[..., :nK]
        full_counts = (full < nK).sum(-1, dtype=torch.int32)
        full_idx = torch.zeros(B, H, nQ, nK, dtype=torch.int32, device=dev)
        full_idx[..., : full.shape[-1]] = torch.where(full < nK, full, 0).to(torch.int32)
        # partial blocks: the diagonal block where the plan selects it
        part_counts = (valid & (idx == diag)).any(-1).to(torch.int32)
        part_idx = torch.zeros(B, H, nQ, nK, dtype=torch.int32, device=dev)
        part_idx[..., 0] = diag[:, 0].to(torch.int32)

        def causal(b, h, q_idx, kv_idx):
            return q_idx + q_offset >= kv_idx

        return BlockMask.from_kv_blocks(
            part_counts, part_idx, full_counts, full_idx, BLOCK_SIZE=bs, mask_mod=causal,
            seq_lengths=(self.q_len, self.kv_len),
        )

    @classmethod
    def from_dense_mask(
        cls,
        mask: torch.Tensor,
        *,
        block_size: int,
        q_len: int,
        kv_len: int,
        config: StemConfig | None = None,
        dense: bool = False,
        q_offset: int | None = None,
    ) -> BlockPlan:
        """Build a plan from a bool (B, Hq, nQ, nK) block mask; non-causal blocks are dropped."""
        if mask.dtype != torch.bool or mask.dim() != 4:
            raise ValueError(f"mask must be a bool (B, Hq, nQ, nK) tensor, got {mask.dtype} {tuple(mask.shape)}")
        nK = _cdiv(kv_len, block_size)
        q_offset = kv_len - q_len if q_offset is None else q_offset
        qbo = q_offset // block_size
        if mask.shape[3] != nK:
            raise ValueError(f"mask has {mask.shape[3]} key blocks, kv_len={kv_len} needs {nK}")
        rows = torch.arange(mask.shape[2], device=mask.device) + qbo
        causal = torch.arange(nK, device=mask.device)[None, :] <= rows[:, None]
        mask = mask & causal
        counts = mask.sum(-1, dtype=torch.int32)
        order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)
        width = max(1, int(counts.max())) if counts.numel() else 1
        indices = torch.where(
            torch.arange(width, device=mask.device) < counts.unsqueeze(-1), order[..., :width], 0
        ).to(torch.int32)
        return cls(counts, indices.contiguous(), block_size, q_len, kv_len, config, dense, q_offset, _trusted=True)

    def to(self, device: torch.device | str) -> BlockPlan:
        """The same plan with its tensors on ``device`` (checked if this one is)."""
        return BlockPlan(
            self.kv_counts.to(device), self.kv_indices.to(device), self.block_size,
            self.q_len, self.kv_len, self.config, self.dense, self.q_offset,
            _trusted=self._checked == self._versions(),
        )

    # ---- persistence ----------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write the plan to a safetensors file (geometry, config and a sha256 of the whole in the
        metadata, so that :meth:`load` notices an edited or corrupted file)."""
        from safetensors.torch import save_file

        meta = {
            "format": "stem.BlockPlan/1",
            "block_size": str(self.block_size),
            "q_len": str(self.q_len),
            "kv_len": str(self.kv_len),
            "q_offset": str(self.q_offset),
            "dense": json.dumps(self.dense),
            "config": self.config.to_json() if self.config is not None else "null",
        }
        tensors = {"kv_counts": self.kv_counts.contiguous().cpu(), "kv_indices": self.kv_indices.contiguous().cpu()}
        meta["sha256"] = _digest(meta, tensors)
        save_file(tensors, path, metadata=meta)

    @classmethod
    def load(cls, path: str, device: torch.device | str = "cpu") -> BlockPlan:
        """Read a plan written by :meth:`save`; every error names the file."""
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "stem.BlockPlan/1":
                    raise ValueError(f"not a stem BlockPlan file (format={meta.get('format')!r})")
                missing = {"kv_counts", "kv_indices"} - set(f.keys())
                if missing:
                    raise ValueError(f"missing tensors {sorted(missing)}")
                tensors = {name: f.get_tensor(name) for name in ("kv_counts", "kv_indices")}
            unsummed = {key: val for key, val in meta.items() if key != "sha256"}
            if "sha256" in meta and meta["sha256"] != _digest(unsummed, tensors):
                raise ValueError("its contents do not match the sha256 that BlockPlan.save wrote (the file was "
                                 "edited or corrupted); re-plan and save again")
            cfg_json = meta.get("config", "null")
            config = None if cfg_json == "null" else StemConfig.from_json(cfg_json)
            return cls(
                tensors["kv_counts"].to(device), tensors["kv_indices"].to(device), int(meta["block_size"]),
                int(meta["q_len"]), int(meta["kv_len"]), config, json.loads(meta.get("dense", "false")),
                int(meta["q_offset"]),
            )
        except FileNotFoundError:
            raise FileNotFoundError(f"BlockPlan.load: no such file: {path}") from None
        except Exception as e:  # safetensors' own errors, bad metadata, malformed contents
            raise ValueError(f"BlockPlan.load({path!r}): {type(e).__name__}: {e}") from e

    # ---- display --------------------------------------------------------------------------
    def plot(self, path: str, *, batch: int = 0, heads: list[int] | None = None, max_heads: int = 8) -> str:
        """Write a PNG heatmap of the block mask (one panel per head) and return ``path``.

        Three colours: blocks the plan keeps, causal blocks it skips, and non-causal blocks (after
        the query block, never computed); a legend under the panels says which is which. The
        y axis shows absolute query blocks. Needs matplotlib; does not touch pyplot's state.
        """
        try:
            from matplotlib.colors import BoundaryNorm, ListedColormap
            from matplotlib.figure import Figure
            from matplotlib.patches import Patch
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("BlockPlan.plot needs matplotlib: pip install 'stem-attention[plot]'") from e
        mask = self.to_dense_mask()[batch].cpu()
        nQ, nK, qbo = self.num_q_blocks, self.num_kv_blocks, self.q_block_offset
        causal = torch.arange(nK)[None, :] <= (torch.arange(nQ) + qbo)[:, None]  # (nQ, nK)
        heads = list(range(min(self.num_heads, max_heads))) if heads is None else heads
        names = ("kept", "skipped (causal, not selected)", "not causal")
        colours = ("#ffffff", "#f2c894", "#1b3a6b")  # code 0 (not causal), 1 (skipped), 2 (kept)
        cmap = ListedColormap(colours)
        norm = BoundaryNorm([-0.5, 0.5, 1.5, 2.5], cmap.N)
        cols = min(4, len(heads))
        rows = -(-len(heads) // cols)
        # fixed margins in inches (no tight_layout: it costs more than drawing the panels)
        left, right, top, bottom, wgap, hgap, panel = 0.75, 0.2, 0.8, 1.05, 0.35, 0.5, 2.6
        width = left + right + cols * panel + (cols - 1) * wgap
        if width < 6.5:  # room for the title and the legend: centre narrow grids
            left, right, width = left + (6.5 - width) / 2, right + (6.5 - width) / 2, 6.5
        height = top + bottom + rows * panel + (rows - 1) * hgap
        fig = Figure(figsize=(width, height))
        fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height,
                            bottom=bottom / height, wspace=wgap / panel, hspace=hgap / panel)
        axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
        n_causal = float(causal.sum())
        for i, ax in enumerate(axes.flat):
            if i >= len(heads):
                ax.set_visible(False)
                continue
            h = heads[i]
            code = causal.to(torch.int64) + (mask[h] & causal).to(torch.int64)  # 0, 1 or 2
            ax.imshow(code.numpy(), cmap=cmap, norm=norm, interpolation="nearest", aspect="auto",
                      extent=(-0.5, nK - 0.5, qbo + nQ - 0.5, qbo - 0.5))
            ax.set_title(f"head {h}: density {float(mask[h].sum()) / n_causal:.2f}", fontsize=9)
            if i // cols == rows - 1 or i + cols >= len(heads):
                ax.set_xlabel("key block")
                ax.xaxis.set_tick_params(labelbottom=True)
            if i % cols == 0:
                ax.set_ylabel("query block")
            for side in ax.spines.values():
                side.set_color("#888888")
        fig.suptitle(f"Stem plan: Lq={self.q_len} Lk={self.kv_len} block={self.block_size}, "
                     f"density {self.density:.2f}", y=1 - 0.25 / height)
        handles = [Patch(facecolor=c, edgecolor="#888888", label=n) for c, n in zip(colours[::-1], names)]
        fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False, fontsize=9,
                   bbox_to_anchor=(0.5, 0.1 / height))
        fig.savefig(path, dpi=110)
        return path

    def __repr__(self) -> str:
        B, H, nQ, W = self.kv_indices.shape
        cfg = "None" if self.config is None else (
            f"alpha={self.config.alpha}, stride={self.config.stride}, dense={self.config.dense}"
        )
        return (
            f"BlockPlan(batch={B}, heads={H}, q_len={self.q_len}, kv_len={self.kv_len}, q_offset={self.q_offset}, "
            f"block_size={self.block_size}, q_blocks={nQ}, kv_blocks={self.num_kv_blocks}, "
            f"width={W}, dense={self.dense}, device={self.device}, config=({cfg}))"
        )


def _digest(meta: dict, tensors: dict) -> str:
    """sha256 over the metadata (sorted) and the tensors' dtypes, shapes and bytes."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _version(t: torch.Tensor) -> int:
    """The tensor's in-place modification counter (-1 for inference tensors, which keep none: an
    in-place edit of those inside ``torch.inference_mode`` is not noticed)."""
    try:
        return t._version
    except RuntimeError:
        return -1

