"""Opt-in block rankings beyond the paper: ``StemConfig(ranking="sampled_mass")`` and
``StemConfig(ranking="qmean_lse")``.

Token Position-Decay budgets, the sinks and the local window are kept exactly as in Stem; only the
score that orders the key blocks inside each query block's budget changes.

``sampled_mass``
----------------
For query block ``a``, take ``n = StemConfig.sampled_rows`` of its query rows (default
``SAMPLED_ROWS = 4``): the last row of each n-th of the block (clamped into the rows the block
holds, so a partial block may repeat a row). For
each sampled row at absolute position ``p``, its exact causal softmax over all keys ``t <= p``
(scale ``1/sqrt(D)``); the score of key block ``j <= a`` is the mean over the sampled rows of the
softmax mass that falls on block ``j``. Non-causal blocks get ``-inf``. It is the oracle ranking
(true block mass, summed over the rows of the query block) estimated from n rows instead of all.

Measured with 4 rows on SmolLM2-135M at 8K tokens, block 32, density 0.35 (benchmarks/NOTES.md):
next-token KL to the dense model 0.012 nats against Stem's 0.019 and the oracle's 0.004 (about halfway),
top-1 agreement 0.951 against 0.935, perplexity x1.010 against x1.023. Cost: exact ``q . k`` of n
rows per query block against every causal key, ``n / block_size`` of dense ``Q K^T`` (1/32 at
block 128 with 4 rows), plus one exponential per (sampled row, key). Torch path on any device; a
fused Triton kernel on CUDA (``stem_backends.triton.ranking``, one pass over the keys): with 4
rows the whole ``stem.plan`` takes 1.3 ms at 32K and 6.5 ms at 128K on an H200 (Hq 32 / Hkv 8 /
D 128, block 128; benchmarks/NOTES.md), with float32 scratch of about ``4 * n * G * nQ * nK / 2``
bytes per (batch entry, kv head) (G = Hq / Hkv) beside the (B, Hq, nQ, nK) float32 scores: 34 MB
per kv head at 128K with 4 rows, at most 512 MB in flight
(``stem_backends.triton.ranking.SCRATCH_BYTES``).

``qmean_lse``
-------------
For query block ``a`` let ``qbar_a`` be the mean of its query rows (only rows that exist: a
partial first or last block averages the rows it holds). For key block ``j`` (causal: ``j <= a``)

    score[a, j] = logsumexp_{t in block j, t < Lk} ( scale * qbar_a . k_t )

with ``scale = 1/sqrt(D)``. Non-causal blocks get ``-inf``. The keys of the diagonal block are not
masked token by token (the diagonal block is always kept anyway).

Why: Stem's logit is the *mean* of the query-key scores over a block pair, and the mean does not
see a block whose softmax mass sits on a few keys (a delimiter, a name, a number). The
log-sum-exp over the individual keys of the block does: it is the log of the softmax mass that
the block would receive from the mean query. On SmolLM2-135M at 8K tokens it keeps 0.98 of the
dense attention mass where Stem's ranking keeps 0.95, at the same budgets; but the whole model's
next-token KL to dense is *worse* than with Stem's ranking (0.032 against 0.019 nats), because
the blocks it misses in a few layers carry much of those layers' output (benchmarks/NOTES.md).
Prefer ``sampled_mass`` for quality; ``qmean_lse`` is kept for studies and has a Triton kernel.

Cost: the mean-query scores against every key, ``nQ * Lk * D`` multiply-adds per query head
(1/block_size of dense ``Q K^T``, half of that with the causal cut), plus one exponential per
(query block, key). The torch path below works on any device in chunks of query blocks; the
fused Triton kernel (``stem_backends.triton.ranking``) is used on CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .config import StemConfig
from .plan import BlockPlan, block_geometry

__all__ = ["SAMPLED_ROWS", "block_query_means", "sampled_rows", "sampled_mass_scores", "qmean_lse_scores",
           "ranking_scores", "register_ranking_kernel", "plan_ranked"]

SAMPLED_ROWS = 4

RankFn = Callable[..., torch.Tensor]
_KERNELS: dict[str, tuple[RankFn, tuple[str, ...]]] = {}  # qmean_lse kernels
_SAMPLED_KERNELS: dict[str, tuple[RankFn, tuple[str, ...]]] = {}  # sampled_mass kernels


def register_ranking_kernel(name: str, fn: RankFn, device_types: tuple[str, ...] = ("cuda",),
                            ranking: str = "qmean_lse") -> None:
    """Register an accelerated kernel of a ranking. ``qmean_lse``: ``fn(qbar, k, q_block_offset,
    block_size, scale)`` returns what :func:`qmean_lse_from_means` returns; ``sampled_mass``:
    ``fn(q, k, q_offset, block_size, scale, n=rows)`` returns what :func:`sampled_mass_scores`
    returns (both up to float32 rounding)."""
    if ranking not in ("qmean_lse", "sampled_mass"):
        raise ValueError(f"no kernels for ranking {ranking!r}; use 'qmean_lse' or 'sampled_mass'")
    (_KERNELS if ranking == "qmean_lse" else _SAMPLED_KERNELS)[name] = (fn, tuple(device_types))


def _kernel(table: dict, impl: str, device_type: str):
    """The registered kernel for ``impl`` ("auto": the first for the device, else None = torch)."""
    if impl == "torch":
        return None
    from .planner import poolings

    poolings()  # loads the first-party kernels (they register their ranking kernels too)
    if impl == "auto":
        return next((fn for fn, devs in table.values() if device_type in devs), None)
    if impl not in table:
        raise ValueError(f"unknown ranking kernel {impl!r}; available: {['auto', 'torch', *table]}")
    return table[impl][0]


def block_query_means(q: torch.Tensor, q_offset: int, block_size: int) -> torch.Tensor:
    """(B, Hq, nQ, D) float32 (float64 for float64 input): the mean of the query rows of each query
    block (absolute blocks ``q_offset // block_size ...``; partial blocks average their own rows)."""
    B, Hq, Lq, D = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qbo, nQ, _ = block_geometry(Lq, Lq + q_offset, q_offset, block_size)
    front = q_offset - qbo * block_size
    x = F.pad(q, (0, 0, front, nQ * block_size - front - Lq))
    sums = x.view(B, Hq, nQ, block_size, D).sum(3, dtype=acc)
    rows = torch.arange(nQ, device=q.device) * block_size - front  # first row of each block (may be < 0)
    n = (torch.clamp(rows + block_size, max=Lq) - torch.clamp(rows, min=0)).to(acc)
    return sums / n[:, None]


def qmean_lse_from_means(qbar: torch.Tensor, k: torch.Tensor, q_block_offset: int, block_size: int,
                         scale: float, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """Scores (B, Hq, nQ, nK), float32 (float64 for float64 input), -inf where non-causal, from the
    block query means ``qbar`` (B, Hq, nQ, D) and keys ``k`` (B, Hkv, Lk, D); torch ops, in chunks
    of query blocks so that the (chunk, Lk) score slab stays below ``chunk_elems`` per head."""
    B, Hq, nQ, D = qbar.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    bs = block_size
    nK = -(-Lk // bs)
    kf = F.pad(k.to(qbar.dtype), (0, 0, 0, nK * bs - Lk))  # (B, Hkv, nK*bs, D)
    valid = torch.arange(nK * bs, device=k.device) < Lk
    out = torch.full((B, Hq, nQ, nK), float("-inf"), dtype=qbar.dtype, device=qbar.device)
    step = max(1, chunk_elems // max(1, G * nK * bs))
    qg = qbar.view(B, Hkv, G, nQ, D)
    for i0 in range(0, nQ, step):
        i1 = min(nQ, i0 + step)
        last = min(nK, q_block_offset + i1)  # key blocks past the chunk's last query block are non-causal
        s = torch.matmul(qg[:, :, :, i0:i1], kf[:, :, None, : last * bs].transpose(-1, -2)).mul_(scale)
        s.masked_fill_(~valid[: last * bs], float("-inf"))
        lse = torch.logsumexp(s.view(B, Hkv, G, i1 - i0, last, bs), dim=-1).view(B, Hq, i1 - i0, last)
        rows = torch.arange(i0, i1, device=k.device) + q_block_offset
        lse.masked_fill_(torch.arange(last, device=k.device)[None, :] > rows[:, None], float("-inf"))
        out[:, :, i0:i1, :last] = lse
    return out


def qmean_lse_scores(q: torch.Tensor, k: torch.Tensor, block_size: int, q_offset: int | None = None,
                     scale: float | None = None, impl: str = "auto") -> torch.Tensor:
    """The ``qmean_lse`` scores (B, Hq, nQ, nK) (see the module docstring). ``impl``: "torch", a
    registered kernel name, or "auto" (a kernel registered for the device, else torch)."""
    q_offset = k.shape[2] - q.shape[2] if q_offset is None else q_offset
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qbo = q_offset // block_size
    fn = _kernel(_KERNELS, impl, q.device.type)
    qbar = block_query_means(q, q_offset, block_size)
    if fn is None:
        return qmean_lse_from_means(qbar, k, qbo, block_size, scale)
    return fn(qbar, k, qbo, block_size, scale)


def sampled_rows(q_len: int, q_offset: int, block_size: int, n: int = SAMPLED_ROWS) -> torch.Tensor:
    """int64 (nQ, n): the query rows (indices into q) sampled in each query block: the last row of
    each of n equal parts of the block, clamped into the rows the block holds."""
    qbo, nQ, _ = block_geometry(q_len, q_len + q_offset, q_offset, block_size)
    a = torch.arange(nQ)[:, None] + qbo
    pos = a * block_size + (block_size // n) * (torch.arange(n)[None, :] + 1) - 1
    lo = torch.clamp(a * block_size, min=q_offset)
    hi = torch.clamp((a + 1) * block_size, max=q_offset + q_len) - 1
    return torch.minimum(torch.maximum(pos, lo), hi) - q_offset


def sampled_mass_scores(q: torch.Tensor, k: torch.Tensor, block_size: int, q_offset: int | None = None,
                        scale: float | None = None, n: int = SAMPLED_ROWS, chunk_elems: int = 1 << 22) -> torch.Tensor:
    """The ``sampled_mass`` scores (B, Hq, nQ, nK), float32 (float64 for float64 input), -inf where
    non-causal (see the module docstring). Torch ops, in chunks of query blocks."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    bs = block_size
    q_offset = Lk - Lq if q_offset is None else q_offset
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qbo = q_offset // bs
    rows = sampled_rows(Lq, q_offset, bs, n).to(q.device)  # (nQ, n)
    nQ, nK = rows.shape[0], -(-Lk // bs)
    kf = F.pad(k.to(acc), (0, 0, 0, nK * bs - Lk))
    out = torch.full((B, Hq, nQ, nK), float("-inf"), dtype=acc, device=q.device)
    step = max(1, chunk_elems // max(1, G * n * nK * bs))
    for i0 in range(0, nQ, step):
        i1 = min(nQ, i0 + step)
        last = min(nK, qbo + i1)  # key blocks after the chunk's last query block are non-causal
        r = rows[i0:i1].reshape(-1)
        qs = q[:, :, r].to(acc).view(B, Hkv, G, -1, D)
        s = torch.matmul(qs, kf[:, :, None, : last * bs].transpose(-1, -2)).mul_(scale)  # (B, Hkv, G, rows, keys)
        pos = r + q_offset
        s.masked_fill_(torch.arange(last * bs, device=q.device)[None, :] > pos[:, None], float("-inf"))
        p = torch.softmax(s, dim=-1)
        mass = p.view(B, Hq, i1 - i0, n, last, bs).sum(-1).mean(3)  # (B, Hq, chunk, last)
        blocks = torch.arange(i0, i1, device=q.device) + qbo
        mass.masked_fill_(torch.arange(last, device=q.device)[None, :] > blocks[:, None], float("-inf"))
        out[:, :, i0:i1, :last] = mass
    return out


def ranking_scores(q, k, v, config: StemConfig, q_offset: int, impl: str = "auto") -> torch.Tensor:
    """Block scores (B, Hq, nQ, nK) of ``config.ranking`` (not "stem": the planner's own logits)."""
    if config.ranking == "sampled_mass":
        fn = _kernel(_SAMPLED_KERNELS, impl, q.device.type)
        n = config.sampled_rows
        if fn is None:
            return sampled_mass_scores(q, k, config.block_size, q_offset, n=n)
        return fn(q, k, q_offset, config.block_size, 1.0 / math.sqrt(q.shape[-1]), n=n)
    if config.ranking == "qmean_lse":
        return qmean_lse_scores(q, k, config.block_size, q_offset, impl=impl)
    raise ValueError(f"no ranking scores for StemConfig.ranking={config.ranking!r} here "
                     "(\"stem\" is the planner's own metric: call stem.plan)")


def plan_ranked(q, k, v, config: StemConfig, q_offset: int, n_total: int, impl: str = "auto") -> BlockPlan:
    """A plan with Stem's budgets, sinks and window and ``config.ranking``'s scores (the planner
    calls this when ``config.ranking != "stem"``)."""
    from .planner import select_blocks_on_device

    scores = ranking_scores(q, k, v, config, q_offset, impl)
    counts, indices = select_blocks_on_device(scores, config, q_offset // config.block_size, n_total, impl)
    return BlockPlan(counts, indices, config.block_size, q.shape[2], k.shape[2], config, dense=False,
                     q_offset=q_offset, _trusted=True)
