"""Opt-in block rankings beyond the paper: ``StemConfig(ranking="qmean_lse")``.

Token Position-Decay budgets, the sinks and the local window are kept exactly as in Stem; only the
score that orders the key blocks inside each query block's budget changes.

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
dense attention mass where Stem's ranking keeps 0.95, at the same budgets (benchmarks/NOTES.md).

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

__all__ = ["block_query_means", "qmean_lse_scores", "ranking_scores", "register_ranking_kernel", "plan_ranked"]

RankFn = Callable[..., torch.Tensor]  # fn(qbar, k, q_block_offset, block_size, scale) -> scores
_KERNELS: dict[str, tuple[RankFn, tuple[str, ...]]] = {}


def register_ranking_kernel(name: str, fn: RankFn, device_types: tuple[str, ...] = ("cuda",)) -> None:
    """Register an accelerated ``qmean_lse`` kernel: ``fn(qbar, k, q_block_offset, block_size,
    scale)`` must return what :func:`qmean_lse_from_means` returns, up to float32 rounding."""
    _KERNELS[name] = (fn, tuple(device_types))


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
    qbar = block_query_means(q, q_offset, block_size)
    if impl == "torch":
        return qmean_lse_from_means(qbar, k, qbo, block_size, scale)
    from .planner import poolings

    poolings()  # loads the first-party kernels (they register their ranking kernels too)
    if impl == "auto":
        for fn, devs in _KERNELS.values():
            if q.device.type in devs:
                return fn(qbar, k, qbo, block_size, scale)
        return qmean_lse_from_means(qbar, k, qbo, block_size, scale)
    if impl not in _KERNELS:
        raise ValueError(f"unknown ranking kernel {impl!r}; available: {['auto', 'torch', *_KERNELS]}")
    return _KERNELS[impl][0](qbar, k, qbo, block_size, scale)


def ranking_scores(q, k, v, config: StemConfig, q_offset: int, impl: str = "auto") -> torch.Tensor:
    """Block scores (B, Hq, nQ, nK) of ``config.ranking`` (not "stem": the planner's own logits)."""
    if config.ranking == "qmean_lse":
        return qmean_lse_scores(q, k, config.block_size, q_offset, impl=impl)
    raise ValueError(f"no ranking scores for StemConfig.ranking={config.ranking!r} here "
                     "(\"stem\" is the planner's own metric: call stem.plan)")


def plan_ranked(q, k, v, config: StemConfig, q_offset: int, n_total: int, impl: str = "auto") -> BlockPlan:
    """A plan with Stem's budgets, sinks and window and ``config.ranking``'s scores (the planner
    calls this when ``config.ranking != "stem"``)."""
    from .planner import select_blocks

    scores = ranking_scores(q, k, v, config, q_offset, impl)
    counts, indices = select_blocks(scores, config, q_offset // config.block_size, n_total)
    return BlockPlan(counts, indices, config.block_size, q.shape[2], k.shape[2], config, dense=False,
                     q_offset=q_offset, _trusted=True)
