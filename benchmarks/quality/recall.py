"""Attention recall of block plans against dense attention.

For a query row r (query block a = r // block_size) and a plan that keeps key blocks S_a, the
recall is the dense causal softmax mass of row r that falls on keys in S_a:

    recall_r = sum_{j in S_a} sum_{t in block j, t <= r} softmax(scale * q_r . k_t)_t

It is 1 for a plan that keeps every causal block. Methods, all at equal budgets per (layer, head):

- ``stem``: ``stem.plan`` with the given config.
- ``stem_novb``: the same with ``value_weight=0`` (same budgets; counts can differ by a few blocks
  where top-k picks overlap the sinks/window differently; the density is reported).
- ``uniform_topk``: Stem's own block logits (value bonus included), the same sinks and window, and
  the same number of blocks in every query block (no position decay; rows with fewer causal blocks
  keep all of them), the count chosen so that the total equals Stem's total exactly (the remainder
  goes, one block each, to the last rows that can take one).
- ``oracle``: Stem's sinks and window plus the causal blocks with the largest true dense block mass
  (summed over the rows of the query block), up to Stem's count of every row: the best any plan
  with Stem's counts and forced blocks can do for the mean recall of each query block.

Diagnostic scores (:data:`DIAGNOSTICS`; Stem's counts, sinks and window, only the ranking changes;
they need the full q.k matrix, so they say which kind of block score would work, not how to plan):

- ``block_mean_qk``: the exact mean of scale * q.k over all token pairs of the block pair (what
  Stem's stride-S antidiagonal estimate approximates, without the value bonus).
- ``block_max_qk``: the largest causal scale * q.k over the token pairs of the block pair.

Comparison plans are built with ``stem.BlockPlan.from_dense_mask``. The dense softmax is float32,
computed in chunks of query rows so that memory stays O(chunk x L) per head.
"""

from __future__ import annotations

import dataclasses

import torch

import stem
from stem.planner import block_logits

__all__ = ["METHODS", "DIAGNOSTICS", "block_mass", "block_mean_qk", "forced_and_causal", "fill_mask", "uniform_counts",
           "row_recall", "method_masks", "layer_recall", "summarise"]

METHODS = ("stem", "stem_novb", "uniform_topk", "oracle")
DIAGNOSTICS = ("block_mean_qk", "block_max_qk")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@torch.no_grad()
def block_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, *, chunk: int = 256,
               scale: float | None = None, return_max: bool = False):
    """Dense causal softmax mass of each query row on each key block, float32 (Hq, L, nK); with
    ``return_max``, also the largest causal scaled score of each row in each key block (-inf where
    the block holds no causal key).

    q: (Hq, L, D), k: (Hkv, L, D) of one sequence (prefill: query row r sits at position r); query
    head h reads key head h // (Hq // Hkv). Rows are processed ``chunk`` at a time."""
    Hq, L, D = q.shape
    Hkv = k.shape[0]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    nK = _cdiv(L, block_size)
    out = torch.zeros(Hq, L, nK, dtype=torch.float32, device=q.device)
    smax = torch.full((Hq, L, nK), float("-inf"), device=q.device) if return_max else None
    qf, kf = q.float().reshape(Hkv, G, L, D), k.float()
    for r0 in range(0, L, chunk):
        r1 = min(L, r0 + chunk)
        kend = _cdiv(r1, block_size) * block_size  # keys past r1 - 1 are masked anyway
        kk = kf[:, : min(kend, L)]
        s = torch.matmul(qf[:, :, r0:r1], kk.transpose(-1, -2).unsqueeze(1)) * scale  # (Hkv, G, c, kend)
        rows = torch.arange(r0, r1, device=q.device)[:, None]
        s.masked_fill_(torch.arange(kk.shape[1], device=q.device)[None, :] > rows, float("-inf"))
        p = torch.softmax(s, dim=-1)
        if kk.shape[1] < kend:
            p = torch.nn.functional.pad(p, (0, kend - kk.shape[1]))
            s = torch.nn.functional.pad(s, (0, kend - kk.shape[1]), value=float("-inf"))
        nb = kend // block_size
        out[:, r0:r1, :nb] = p.reshape(Hkv, G, r1 - r0, nb, block_size).sum(-1).reshape(Hq, r1 - r0, nb)
        if return_max:
            smax[:, r0:r1, :nb] = s.reshape(Hkv, G, r1 - r0, nb, block_size).amax(-1).reshape(Hq, r1 - r0, nb)
    return (out, smax) if return_max else out


def forced_and_causal(nQ: int, nK: int, cfg: stem.StemConfig, q_block_offset: int = 0, device=None):
    """bool (nQ, nK) masks: the sinks and window Stem always keeps, and the causal blocks."""
    rows = torch.arange(nQ, device=device)[:, None] + q_block_offset
    cols = torch.arange(nK, device=device)[None, :]
    causal = cols <= rows
    forced = ((cols < cfg.sink_blocks) | (cols > rows - cfg.window_blocks)) & causal
    return forced, causal


def fill_mask(scores: torch.Tensor, counts: torch.Tensor, forced: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    """bool (H, nQ, nK): the forced blocks, then the causal non-forced blocks with the largest
    ``scores`` (H, nQ, nK) until each row holds ``counts`` (H, nQ) blocks (or all its causal ones)."""
    free = causal & ~forced
    s = scores.float().masked_fill(~free, float("-inf"))
    order = torch.argsort(s, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order))
    extra = (counts.long() - forced.sum(-1)).clamp(min=0)
    extra = torch.minimum(extra, free.sum(-1).expand_as(extra))
    return forced | (free & (rank < extra[..., None]))


def uniform_counts(totals: torch.Tensor, forced: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    """int64 (H, nQ): for each head, the same count c in every row (capped at the row's causal
    blocks, at least its forced blocks), c the largest with a total <= ``totals[h]``; the remaining
    blocks go one each to the last rows whose count grows at c + 1, so the total is exact."""
    n_forced, n_causal = forced.sum(-1), causal.sum(-1)

    def per_row(c: int) -> torch.Tensor:
        return torch.clamp(torch.minimum(torch.full_like(n_causal, c), n_causal), min=n_forced)

    out = []
    for total in totals.tolist():
        lo, hi = 0, int(n_causal.max())
        if int(per_row(hi).sum()) < total:
            raise ValueError(f"total {total} exceeds the causal blocks {int(per_row(hi).sum())}")
        while lo < hi:  # largest c with total(c) <= total
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if int(per_row(mid).sum()) <= total else (lo, mid - 1)
        row, nxt = per_row(lo), per_row(lo + 1)
        rem = int(total - row.sum())
        grow = torch.nonzero(nxt > row).flatten()
        if rem:
            row = row.clone()
            row[grow[-rem:]] += 1
        out.append(row)
    return torch.stack(out)


def row_recall(mass: torch.Tensor, mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """float32 (H, L): per query row, the mass (H, L, nK) on the blocks kept by ``mask`` (H, nQ, nK)."""
    L = mass.shape[1]
    rows_mask = mask[:, torch.arange(L, device=mask.device) // block_size]  # (H, L, nK)
    return (mass * rows_mask).sum(-1)


def _query_block_mass(mass: torch.Tensor, block_size: int) -> torch.Tensor:
    H, L, nK = mass.shape
    nQ = _cdiv(L, block_size)
    padded = torch.nn.functional.pad(mass, (0, 0, 0, nQ * block_size - L))
    return padded.reshape(H, nQ, block_size, nK).sum(2)


def _query_block_max(smax: torch.Tensor, block_size: int) -> torch.Tensor:
    H, L, nK = smax.shape
    nQ = _cdiv(L, block_size)
    padded = torch.nn.functional.pad(smax, (0, 0, 0, nQ * block_size - L), value=float("-inf"))
    return padded.reshape(H, nQ, block_size, nK).amax(2)


def block_mean_qk(q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
    """float32 (Hq, nQ, nK): the mean of scale * q.k over all token pairs of each block pair (the
    product of the block means of q and k; padding rows of a partial block do not count)."""
    Hq, L, D = q.shape
    n = _cdiv(L, block_size)

    def means(x):
        pad = torch.nn.functional.pad(x.float(), (0, 0, 0, n * block_size - L)).reshape(x.shape[0], n, block_size, D)
        sizes = torch.clamp(L - torch.arange(n, device=x.device) * block_size, max=block_size)
        return pad.sum(2) / sizes[:, None]

    qm, km = means(q), means(k).repeat_interleave(Hq // k.shape[0], dim=0)
    return qm @ km.transpose(-1, -2) * D ** -0.5


def _plan_mask(mask: torch.Tensor, L: int, cfg: stem.StemConfig) -> torch.Tensor:
    plan = stem.BlockPlan.from_dense_mask(mask[None], block_size=cfg.block_size, q_len=L, kv_len=L, config=cfg)
    return plan.to_dense_mask()[0]


@torch.no_grad()
def method_masks(q, k, v, cfg: stem.StemConfig, mass: torch.Tensor,
                 smax: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The kept-block mask (Hq, nQ, nK) of every method in :data:`METHODS` (and of
    :data:`DIAGNOSTICS` when ``smax`` is given), and diagnostics.

    q (Hq, L, D), k, v (Hkv, L, D); ``mass`` and ``smax`` from :func:`block_mass` with
    ``cfg.block_size``."""
    L = q.shape[1]
    qb, kb, vb = q[None], k[None], v[None]
    stem_mask = stem.plan(qb, kb, vb, cfg).to_dense_mask()[0]
    novb_mask = stem.plan(qb, kb, vb, dataclasses.replace(cfg, value_weight=0.0)).to_dense_mask()[0]
    nQ, nK = stem_mask.shape[-2:]
    forced, causal = forced_and_causal(nQ, nK, cfg, device=q.device)
    counts = stem_mask.sum(-1)
    logits = block_logits(qb, kb, vb, cfg)[0]
    uni = fill_mask(logits, uniform_counts(counts.sum(-1), forced, causal), forced, causal)
    orc = fill_mask(_query_block_mass(mass, cfg.block_size), counts, forced, causal)
    # Stem's plan rebuilt from its own logits and counts: equal up to ties (a check of fill_mask).
    refill = fill_mask(logits, counts, forced, causal)
    diag = {"stem_refill_agreement": float((refill == stem_mask).float().mean())}
    masks = {"stem": stem_mask, "stem_novb": novb_mask, "uniform_topk": _plan_mask(uni, L, cfg),
             "oracle": _plan_mask(orc, L, cfg)}
    if smax is not None:
        for name, scores in (("block_mean_qk", block_mean_qk(q, k, cfg.block_size)),
                             ("block_max_qk", _query_block_max(smax, cfg.block_size))):
            masks[name] = _plan_mask(fill_mask(scores, counts, forced, causal), L, cfg)
    return masks, diag


def summarise(recall: torch.Tensor, mask: torch.Tensor, causal: torch.Tensor, sparse_rows: torch.Tensor) -> dict:
    """Numbers of one method on one layer: recall (H, L) per row, mask (H, nQ, nK)."""
    return {
        "mean": float(recall.mean()),
        "p5": float(torch.quantile(recall.flatten().double(), 0.05)),
        "mean_sparse_rows": float(recall[:, sparse_rows].mean()) if bool(sparse_rows.any()) else 1.0,
        "p5_sparse_rows": (float(torch.quantile(recall[:, sparse_rows].flatten().double(), 0.05))
                           if bool(sparse_rows.any()) else 1.0),
        "mean_per_head": [float(x) for x in recall.mean(-1)],
        "p5_per_head": [float(x) for x in torch.quantile(recall.double(), 0.05, dim=-1)],
        "blocks": int(mask.sum()),
        "density": float(mask.sum() / (causal.sum() * mask.shape[0])),
    }


@torch.no_grad()
def layer_recall(q, k, v, cfg: stem.StemConfig, *, chunk: int = 256) -> dict:
    """Per method and diagnostic score, :func:`summarise` of one layer (q (Hq, L, D), k, v (Hkv, L, D), prefill)."""
    L = q.shape[1]
    mass, smax = block_mass(q, k, cfg.block_size, chunk=chunk, return_max=True)
    masks, diag = method_masks(q, k, v, cfg, mass, smax)
    nQ, nK = next(iter(masks.values())).shape[-2:]
    _, causal = forced_and_causal(nQ, nK, cfg)
    budgets = torch.tensor(stem.block_budgets(nK, cfg.alpha, cfg.k_rate, cfg.k_bias))
    sparse_block = budgets[:nQ] < torch.arange(nQ) + 1
    sparse_rows = sparse_block[torch.arange(L) // cfg.block_size]
    out = {m: summarise(row_recall(mass, masks[m], cfg.block_size), masks[m], causal, sparse_rows)
           for m in METHODS + DIAGNOSTICS}
    out["diagnostics"] = {**diag, "sparse_rows": int(sparse_rows.sum()), "rows": L}
    return out
