"""Block-selection methods compared end to end, as plans for one attention layer.

Every method returns a :class:`stem.BlockPlan` for the post-RoPE q (1, Hq, L, D), k, v (1, Hkv, L, D)
of one layer (prefill). Layers below ``first_sparse`` run dense for every method (the authors keep
the first two layers dense). Methods:

- ``dense``: every causal block.
- ``stem`` / ``stem_a<alpha>``: ``stem.plan`` with the study's config (alpha 0.7) or another alpha.
- ``stem_novb``: Stem without the value bonus (``value_weight=0``).
- ``sampled_mass`` / ``qmean_lse``: Stem's budgets, sinks and window, ranked by
  ``StemConfig(ranking="sampled_mass")`` / ``StemConfig(ranking="qmean_lse")`` (``stem.ranking``);
  ``sampled_mass_a<alpha>``: the same ranking with another alpha (larger budgets).
- ``uniform_topk``: Stem's logits and forced blocks, the same number of blocks in every query
  block, the per-head total equal to Stem's (``recall.uniform_counts``).
- ``sinks_window``: only the blocks Stem always keeps (its own, much lower, density).
- ``xattention``: the selection rule of XAttention (Xu et al., 2025), written from the paper's
  description: stride-S antidiagonal scores, softmax over the causal strided keys of each
  strided query row, summed per block pair and averaged over the block's strided rows (an
  estimate of the block's attention mass); per query block, the fewest highest blocks whose
  estimates sum to at least a threshold tau, plus the diagonal block. tau is set per layer by
  bisection so that the layer's density equals Stem's (alpha 0.7) on the same layer: the
  comparison is at equal density, which the paper's fixed tau would not give.
- ``oracle``: Stem's counts, sinks and window; the other blocks by true dense block mass.
- ``qmean_lse_vnorm`` (experiment, not in the library): ``qmean_lse`` with ``log ||v_t||`` added to
  each key's score inside the log-sum-exp, i.e. the log of ``sum_t p_t ||v_t||``, the mean query's
  attention mass weighted by the value norm (an upper bound on the block's share of the output).
- ``s1_mass`` / ``s4_mass`` / ``s8_mass`` / ``s16_mass``: ``sampled_mass`` with 1, 4, 8 or 16
  sampled query rows per block (``StemConfig(sampled_rows=n)``); ``s4_mass`` is ``sampled_mass``;
  ``s8_mass_a1.0``: 8 rows with alpha 1.0.
- ``s8_cand<f>`` (experiment, not in the library: a two-level ranking that would score fewer
  keys): per row, the ``f`` x budget blocks with the highest Stem logits (and the sinks and
  window) are candidates; the 8 sampled rows' exact softmax, normalised over the candidate keys
  only, ranks them; Stem's budgets pick from them. ``s8_cand_all`` (every causal block a
  candidate) is the control: ``s8_mass`` through the same code.
"""

from __future__ import annotations

import dataclasses
import math

import torch

import stem
from stem.planner import block_logits, dense_plan

from .recall import _query_block_mass, block_mass, fill_mask, forced_and_causal, uniform_counts

__all__ = ["METHODS", "method_plan", "xattention_block_scores", "threshold_mask"]

METHODS = ("dense", "stem", "stem_a1.0", "stem_a0.85", "stem_a0.5", "stem_novb", "sampled_mass", "sampled_mass_a1.0",
           "qmean_lse",
           "uniform_topk",
           "sinks_window", "xattention", "oracle", "qmean_lse_vnorm", "s1_mass", "s4_mass", "s8_mass", "s16_mass",
           "s8_mass_a1.0", "s8_cand_all", "s8_cand2", "s8_cand1.5")


def _mask_plan(mask: torch.Tensor, L: int, cfg: stem.StemConfig) -> stem.BlockPlan:
    return stem.BlockPlan.from_dense_mask(mask[None], block_size=cfg.block_size, q_len=L, kv_len=L, config=cfg)


def xattention_block_scores(q: torch.Tensor, k: torch.Tensor, block_size: int, stride: int) -> torch.Tensor:
    """(Hq, nQ, nK) float32: per query block, the estimated attention mass of each key block from
    stride-``stride`` antidiagonal scores (rows of each query block sum to 1 over causal blocks).
    q (Hq, L, D), k (Hkv, L, D); L a multiple of ``block_size``."""
    Hq, L, D = q.shape
    G = Hq // k.shape[0]
    S = stride
    M = L // S
    qr = q.float().reshape(Hq, M, S, D).flip(2).reshape(Hq, M, S * D)  # rows reversed within a group
    kr = k.float().reshape(-1, M, S * D).repeat_interleave(G, 0)
    s = torch.matmul(qr, kr.transpose(-1, -2)) / (math.sqrt(D) * S)
    s.masked_fill_(torch.ones(M, M, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    p = torch.softmax(s, dim=-1)
    c = block_size // S
    n = L // block_size
    return p.view(Hq, n, c, n, c).sum((2, 4)) / c


def threshold_mask(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """bool (H, nQ, nK): per row, the fewest largest-score blocks whose scores sum to >= tau
    (at least one), plus the diagonal block. ``scores`` rows sum to 1 over causal blocks."""
    H, nQ, nK = scores.shape
    srt, order = torch.sort(scores, dim=-1, descending=True)
    before = torch.cumsum(srt, -1) - srt  # mass of the higher blocks
    take = before < tau
    take[..., 0] = True
    mask = torch.zeros_like(take).scatter_(-1, order, take)
    causal = torch.arange(nK, device=scores.device)[None, :] <= torch.arange(nQ, device=scores.device)[:, None]
    return (mask & causal) | torch.eye(nQ, nK, dtype=torch.bool, device=scores.device)


def qmean_lse_vnorm_scores(q, k, v, block_size: int) -> torch.Tensor:
    """(1, Hq, nQ, nK) float32 ``logsumexp_t (scale * qbar . k_t + log ||v_t||)`` per causal block
    pair (prefill, L a multiple of ``block_size``), -inf above the diagonal."""
    from stem.ranking import block_query_means

    _, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G, n = Hq // Hkv, L // block_size
    qbar = block_query_means(q, 0, block_size).view(1, Hkv, G, n, D)
    s = torch.matmul(qbar, k.float()[:, :, None].transpose(-1, -2)) * D ** -0.5  # (1, Hkv, G, n, L)
    s += torch.log(torch.linalg.vector_norm(v.float(), dim=-1) + 1e-6)[:, :, None, None, :]
    out = torch.logsumexp(s.view(1, Hkv, G, n, n, block_size), -1).view(1, Hq, n, n)
    return out.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))


def _calibrated_threshold_mask(scores: torch.Tensor, target_blocks: int, iters: int = 30) -> torch.Tensor:
    lo, hi = 0.0, 1.0
    best = threshold_mask(scores, hi)
    for _ in range(iters):  # the smallest tau whose mask holds >= target blocks
        mid = (lo + hi) / 2
        m = threshold_mask(scores, mid)
        if int(m.sum()) >= target_blocks:
            hi, best = mid, m
        else:
            lo = mid
    return best


@torch.no_grad()
def method_plan(name: str, q, k, v, cfg: stem.StemConfig, *, chunk: int = 256) -> stem.BlockPlan:
    """The plan of method ``name`` (see the module docstring) for one layer, B = 1, prefill."""
    L = q.shape[2]
    Hq = q.shape[1]
    if name == "dense":
        return dense_plan(1, Hq, L, L, cfg.block_size, q.device, cfg)
    if name == "stem":
        return stem.plan(q, k, v, cfg)
    if name.startswith("stem_a"):
        return stem.plan(q, k, v, cfg.replace(alpha=float(name[len("stem_a"):])))
    if name == "stem_novb":
        return stem.plan(q, k, v, dataclasses.replace(cfg, value_weight=0.0))
    if name in ("sampled_mass", "qmean_lse"):
        return stem.plan(q, k, v, cfg.replace(ranking=name))
    if name.startswith("sampled_mass_a"):
        return stem.plan(q, k, v, cfg.replace(ranking="sampled_mass", alpha=float(name[len("sampled_mass_a"):])))
    if name in ("s1_mass", "s4_mass", "s8_mass", "s16_mass", "s8_mass_a1.0"):
        n, _, alpha = name[1:].partition("_mass")
        extra = {"alpha": float(alpha[2:])} if alpha else {}
        return stem.plan(q, k, v, cfg.replace(ranking="sampled_mass", sampled_rows=int(n), **extra))
    if name == "qmean_lse_vnorm":
        from stem.planner import select_blocks

        counts, idx = select_blocks(qmean_lse_vnorm_scores(q, k, v, cfg.block_size), cfg, 0, L // cfg.block_size)
        return stem.BlockPlan(counts, idx, cfg.block_size, L, L, cfg, dense=False, q_offset=0)
    base = stem.plan(q, k, v, cfg)
    if base.dense:
        return base
    stem_mask = base.to_dense_mask()[0]
    nQ, nK = stem_mask.shape[-2:]
    forced, causal = forced_and_causal(nQ, nK, cfg, device=q.device)
    counts = stem_mask.sum(-1)
    if name == "sinks_window":
        return _mask_plan(forced.expand(Hq, nQ, nK).clone(), L, cfg)
    if name == "uniform_topk":
        logits = block_logits(q, k, v, cfg)[0]
        return _mask_plan(fill_mask(logits, uniform_counts(counts.sum(-1), forced, causal), forced, causal), L, cfg)
    if name == "oracle":
        mass = block_mass(q[0], k[0], cfg.block_size, chunk=chunk)
        return _mask_plan(fill_mask(_query_block_mass(mass, cfg.block_size), counts, forced, causal), L, cfg)
    if name.startswith("s8_cand"):
        f = name[len("s8_cand"):]
        cand = causal.expand(Hq, nQ, nK) if f == "_all" else fill_mask(
            block_logits(q, k, v, cfg)[0], (counts.float() * float(f)).ceil().long(), forced, causal)
        scores = candidate_sampled_mass(q[0], k[0], cfg.block_size, 8, cand)
        return _mask_plan(fill_mask(scores, counts, forced, causal), L, cfg)
    if name == "xattention":
        if L % cfg.block_size:
            raise ValueError(f"xattention here needs a length that is a multiple of the block size, got {L}")
        scores = xattention_block_scores(q[0], k[0], cfg.block_size, cfg.stride)
        return _mask_plan(_calibrated_threshold_mask(scores, int(stem_mask.sum())), L, cfg)
    raise ValueError(f"unknown method {name!r}; known: {METHODS}")


def candidate_sampled_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, n: int,
                           cand: torch.Tensor) -> torch.Tensor:
    """(Hq, nQ, nK) float32: for each query block, the mean over its ``n`` sampled rows
    (``stem.ranking.sampled_rows``) of each candidate key block's softmax mass, the softmax taken
    over the keys of the candidate blocks ``cand`` (bool (Hq, nQ, nK)) only; -inf elsewhere.
    q (Hq, L, D), k (Hkv, L, D), prefill."""
    from stem.ranking import sampled_rows

    Hq, L, D = q.shape
    G = Hq // k.shape[0]
    nQ, nK = cand.shape[-2:]
    bs = block_size
    rows = sampled_rows(L, 0, bs, n)  # (nQ, n)
    keys = torch.arange(nK * bs)
    out = torch.full((Hq, nQ, nK), float("-inf"))
    for h in range(Hq):
        kh = torch.nn.functional.pad(k[h // G].float(), (0, 0, 0, nK * bs - L))
        for i0 in range(0, nQ, 16):
            i1 = min(nQ, i0 + 16)
            r = rows[i0:i1].reshape(-1)
            s = (q[h, r].float() @ kh.T) * D ** -0.5  # (rows, keys)
            ok = cand[h, i0:i1].repeat_interleave(bs, -1).repeat_interleave(n, 0) & (keys[None, :] <= r[:, None])
            p = torch.softmax(s.masked_fill(~ok, float("-inf")), -1)
            mass = p.view(i1 - i0, n, nK, bs).sum(-1).mean(1)
            out[h, i0:i1] = mass.masked_fill(~cand[h, i0:i1], float("-inf"))
    return out
