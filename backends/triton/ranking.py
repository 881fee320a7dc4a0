"""Fused Triton kernels of the opt-in block rankings (``stem.ranking``): ``qmean_lse`` and
``sampled_mass`` (the latter: rows = query heads x query blocks x 4 sampled rows, one pass over
the causal key blocks that keeps each row's log2 mass per key block in a scratch slab and, at the
end, divides by the row's softmax normaliser and averages over the block's sampled rows).

``qmean_lse``:
One program per (batch, KV head, tile of ``BLOCK_Q`` query blocks): the block query means of the G
query heads that read this KV head, for the tile's query blocks, form the rows of one matrix
(``BLOCK_G * BLOCK_Q`` rows), so each key block is loaded once for all of them. The program walks
the causal key blocks; per key block it computes the scaled scores of every row against the
block's keys with one ``tl.dot`` and reduces them to a log-sum-exp (base 2 inside, natural log
out). Nothing of size (rows, Lk) is written: the output is the (B, Hq, nQ, nK) score matrix.

``register()`` adds it to ``stem.ranking`` for CUDA tensors; this module imports triton only
when a kernel runs.
"""

from __future__ import annotations

import importlib.util
import math

import torch

from stem.ranking import qmean_lse_from_means, register_ranking_kernel

__all__ = ["register", "qmean_lse_triton", "sampled_mass_triton", "scratch_layout"]

SCRATCH_BYTES = 512 << 20  # the most the one-pass sampled_mass kernel keeps in flight (270 MB at 128K, Hkv 8)

def qmean_lse_triton(qbar: torch.Tensor, k: torch.Tensor, q_block_offset: int, block_size: int,
                     scale: float, block_q: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """Scores (B, Hq, nQ, nK) float32, -inf where non-causal: ``stem.ranking.qmean_lse_from_means``
    in one kernel. ``qbar`` (B, Hq, nQ, D) float32 block query means, ``k`` (B, Hkv, Lk, D). The
    dot products run in k's dtype (the means are rounded to it) with float32 accumulation; float64
    input keeps the torch path."""
    if k.dtype == torch.float64 or qbar.dtype == torch.float64:
        return qmean_lse_from_means(qbar, k, q_block_offset, block_size, scale)
    from triton import knobs

    from . import interpreter_compat
    from .ranking_kernel import qmean_lse_kernel

    interpreter_compat()
    B, Hq, nQ, D = qbar.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    nK = -(-Lk // block_size)
    qbar = qbar.float().contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    out = torch.full((B, Hq, nQ, nK), float("-inf"), dtype=torch.float32, device=k.device)
    block_g = max(1, 1 << (G - 1).bit_length())
    if block_q is None:  # about 64 rows per program (at least 16 for tl.dot)
        block_q = max(1, 64 // block_g)
    block_q = max(block_q, -(-16 // block_g))
    block_d = max(16, 1 << (D - 1).bit_length())
    if num_warps is None:
        num_warps = 8 if block_size * block_g * block_q >= 128 * 64 else 4
    n_tiles = -(-nQ // block_q)
    tiles = torch.arange(n_tiles - 1, -1, -1, dtype=torch.int32)  # the latest (longest) tiles first
    ends = torch.clamp(q_block_offset + (tiles + 1) * block_q, max=nK).to(torch.int32)
    grid = (n_tiles, Hkv, B)
    qmean_lse_kernel[grid](
        qbar, k, out, tiles.to(k.device), ends.to(k.device), q_block_offset, nQ, Lk, scale * math.log2(math.e),
        qbar.stride(0), qbar.stride(1), qbar.stride(2), k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        G=G, BLOCK_G=block_g, BLOCK_Q=block_q, BS=block_size, D=D, BLOCK_D=block_d,
        UPCAST=bool(knobs.runtime.interpret) and k.dtype == torch.bfloat16, num_warps=num_warps,
    )
    return out


def scratch_layout(ends: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, int]:
    """The one-pass ``sampled_mass`` scratch of one (batch entry, kv head): program ``p`` (which
    walks key blocks ``0 .. ends[p]-1`` with ``n_rows`` rows) owns float32 elements
    ``[offsets[p], offsets[p] + ends[p] * n_rows)``; returns (offsets int64 (P,), elements per head).
    ``ends``: int64 (P,), on the CPU."""
    sizes = ends * n_rows
    return torch.cumsum(sizes, 0) - sizes, int(sizes.sum())


def sampled_mass_triton(q: torch.Tensor, k: torch.Tensor, q_offset: int, block_size: int, scale: float,
                        n: int = 4, block_q: int | None = None, num_warps: int | None = None,
                        num_stages: int | None = None, one_pass: bool = True,
                        scratch_bytes: int = SCRATCH_BYTES) -> torch.Tensor:
    """Scores (B, Hq, nQ, nK) float32, -inf where non-causal: ``stem.ranking.sampled_mass_scores`` in
    one kernel. Dots in q's dtype with float32 accumulation; float64 input keeps the torch path.

    ``one_pass`` (default): one pass over the causal keys that keeps each sampled row's log2 mass
    per key block in a float32 scratch buffer and normalises it at the end (at most
    ``scratch_bytes``: (batch entry, kv head) pairs are launched in chunks that fit); otherwise two
    passes (the normaliser first, then the masses), with no scratch and twice the dot products."""
    from stem.ranking import sampled_mass_scores, sampled_rows

    if q.dtype == torch.float64:
        return sampled_mass_scores(q, k, block_size, q_offset, scale, n)
    from triton import knobs

    from . import interpreter_compat
    from .ranking_kernel import sampled_mass_kernel

    interpreter_compat()
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    rows = sampled_rows(Lq, q_offset, block_size, n).to(device=q.device, dtype=torch.int32).contiguous()
    nQ, nK = rows.shape[0], -(-Lk // block_size)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    out = torch.full((B, Hq, nQ, nK), float("-inf"), dtype=torch.float32, device=q.device)
    block_g = max(1, 1 << (G - 1).bit_length())
    if block_q is None:  # about 64 rows per program (at least 16 for tl.dot)
        block_q = max(1, 64 // (block_g * n))
    block_q = max(block_q, -(-16 // (block_g * n)))
    n_rows = block_g * block_q * n
    n_tiles = -(-nQ // block_q)
    tiles = torch.arange(n_tiles - 1, -1, -1, dtype=torch.int64)  # the latest (longest) tiles first
    ends = torch.clamp(q_offset // block_size + (tiles + 1) * block_q, max=nK)
    toff, per_head = scratch_layout(ends, n_rows) if one_pass else (torch.zeros_like(ends), 0)
    chunk = B * Hkv if not one_pass else max(1, min(B * Hkv, scratch_bytes // (4 * per_head)))
    lse = torch.empty(max(1, chunk * per_head), dtype=torch.float32, device=q.device)
    if num_warps is None:  # 4: 15.2 ms against 8 warps' 20.8 at 128K, Hq 32 / Hkv 8 / D 128 on an H200
        num_warps = 4
    extra = {} if num_stages is None else {"num_stages": num_stages}
    tiles_d, ends_d, toff_d = (x.to(device=q.device, dtype=dt) for x, dt in
                               ((tiles, torch.int32), (ends, torch.int32), (toff, torch.int64)))
    for bhk0 in range(0, B * Hkv, chunk):
        sampled_mass_kernel[(n_tiles, min(chunk, B * Hkv - bhk0))](
            q, k, rows, out, lse, tiles_d, ends_d, toff_d, q_offset, q_offset // block_size, nQ, Lk,
            scale * math.log2(math.e), bhk0, Hkv, per_head,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            G=G, BLOCK_G=block_g, BLOCK_Q=block_q, N=n, BS=block_size, D=D,
            BLOCK_D=max(16, 1 << (D - 1).bit_length()),
            UPCAST=bool(knobs.runtime.interpret) and q.dtype == torch.bfloat16, ONE_PASS=one_pass, JB=32,
            num_warps=num_warps, **extra,
        )
    return out


def register() -> None:
    """Register ``qmean_lse_triton`` for CUDA tensors when triton is installed (the pooling
    kernel's registration already warns when it is not)."""
    if importlib.util.find_spec("triton") is not None:
        register_ranking_kernel("triton", qmean_lse_triton, ("cuda",))
        register_ranking_kernel("triton", sampled_mass_triton, ("cuda",), ranking="sampled_mass")
