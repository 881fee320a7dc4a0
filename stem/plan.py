"""BlockPlan: which key blocks each (batch, query head, query block) attends to."""

from __future__ import annotations

import json
from dataclasses import dataclass

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
    """

    kv_counts: torch.Tensor
    kv_indices: torch.Tensor
    block_size: int
    q_len: int
    kv_len: int
    config: StemConfig | None = None
    dense: bool = False
    q_offset: int | None = None

    def __post_init__(self) -> None:
        if self.q_offset is None:
            self.q_offset = self.kv_len - self.q_len
        if self.kv_counts.dtype != torch.int32 or self.kv_indices.dtype != torch.int32:
            raise TypeError("BlockPlan.kv_counts and kv_indices must be int32 tensors")
        if self.kv_counts.dim() != 3 or self.kv_indices.dim() != 4:
            raise ValueError(
                f"BlockPlan expects kv_counts (B, Hq, nQ) and kv_indices (B, Hq, nQ, W), got "
                f"{tuple(self.kv_counts.shape)} and {tuple(self.kv_indices.shape)}"
            )
        if tuple(self.kv_indices.shape[:3]) != tuple(self.kv_counts.shape):
            raise ValueError("BlockPlan.kv_indices leading dims must equal kv_counts' shape")
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
        return cls(counts, indices.contiguous(), block_size, q_len, kv_len, config, dense, q_offset)

    def to(self, device: torch.device | str) -> BlockPlan:
        return BlockPlan(
            self.kv_counts.to(device), self.kv_indices.to(device), self.block_size,
            self.q_len, self.kv_len, self.config, self.dense, self.q_offset,
        )

    # ---- persistence ----------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write the plan to a safetensors file (geometry and config in the metadata)."""
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
        save_file(tensors, path, metadata=meta)

    @classmethod
    def load(cls, path: str, device: torch.device | str = "cpu") -> BlockPlan:
        """Read a plan written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "stem.BlockPlan/1":
                raise ValueError(f"{path} is not a stem BlockPlan file (format={meta.get('format')!r})")
            counts, indices = f.get_tensor("kv_counts"), f.get_tensor("kv_indices")
        cfg_json = meta.get("config", "null")
        config = None if cfg_json == "null" else StemConfig.from_json(cfg_json)
        return cls(
            counts.to(device), indices.to(device), int(meta["block_size"]), int(meta["q_len"]),
            int(meta["kv_len"]), config, json.loads(meta.get("dense", "false")), int(meta["q_offset"]),
        )

    # ---- display --------------------------------------------------------------------------
    def plot(self, path: str, *, batch: int = 0, heads: list[int] | None = None, max_heads: int = 8) -> str:
        """Write a PNG heatmap of the block mask (one panel per head). Needs matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("BlockPlan.plot needs matplotlib: pip install 'stem-attention[plot]'") from e
        mask = self.to_dense_mask()[batch].cpu()
        heads = list(range(min(self.num_heads, max_heads))) if heads is None else heads
        cols = min(4, len(heads))
        rows = -(-len(heads) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, h in zip(axes.flat, heads):
            ax.imshow(mask[h].numpy(), cmap="Greys", interpolation="nearest", aspect="auto")
            d = float(mask[h].sum()) / float(self.causal_blocks_per_row().sum())
            ax.set_title(f"head {h}: density {d:.2f}", fontsize=9)
            ax.set_xlabel("key block")
            ax.set_ylabel("query block")
            ax.axis("on")
        fig.suptitle(f"Stem plan: Lq={self.q_len} Lk={self.kv_len} block={self.block_size}")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
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
