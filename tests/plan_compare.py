"""Test helpers for plans. Compare a float32 plan with the float64 planner's: equal sets, except where the row's top-k
boundary is a near tie in the float64 logits (the only freedom the method allows: the spec lets
ties break either way, and float32 rounding moves logits by about 1e-6 of their size)."""

from __future__ import annotations

import torch

from stem.budget import block_budgets
from stem.planner import block_logits


def plan_mismatches(counts, indices, q, k, v, cfg, q_offset=None, rel_tol=2e-5):
    """(rows, rows that differ from the float64 planner's plan, list of rows that break the rule)
    for the plan ``(counts, indices)`` made from q, k, v (any device and dtype).

    The rule, per row, with the float64 logits ``x`` of its causal blocks, ``thr`` its keep-th
    largest (keep = min(budget, causal blocks)) and ``tol = rel_tol * max |x|``: the row is
    strictly ascending, causal and zero-padded; it holds every sink and window block and every
    block with ``x > thr + tol``; its other blocks all have ``x >= thr - tol``; and it is the
    sinks and window plus exactly ``keep`` top blocks, i.e. ``|(row - forced) | above| <= keep <=
    |{j in row: x_j >= thr - tol}|``. With tol = 0 that is the method exactly (ties either way).
    """
    import stem

    q64, k64, v64 = (t.detach().double().cpu() for t in (q, k, v))
    Lq, Lk = q.shape[2], k.shape[2]
    off = Lk - Lq if q_offset is None else q_offset
    ref = stem.plan(q64, k64, v64, cfg, q_offset=off)
    logits = block_logits(q64, k64, v64, cfg, off, impl="torch")  # (B, Hq, nQ, nK), -inf non-causal
    bs = cfg.block_size
    qbo, n_total = off // bs, -(-Lk // bs)
    budgets = block_budgets(n_total, cfg.alpha, cfg.k_rate, cfg.k_bias)
    counts, indices = counts.cpu(), indices.cpu()
    rc, ri = ref.kv_counts, ref.kv_indices
    B, H, nQ = rc.shape
    assert counts.shape == rc.shape, (counts.shape, rc.shape)
    assert indices.shape == ri.shape, (indices.shape, ri.shape)
    differ, bad = 0, []
    for b in range(B):
        for h in range(H):
            for i in range(nQ):
                c = int(counts[b, h, i])
                got_row = indices[b, h, i, :c].tolist()
                diag = qbo + i
                if got_row != sorted(set(got_row)) or not got_row or got_row[0] < 0 or got_row[-1] > diag:
                    bad.append((b, h, i, "not strictly ascending and causal", got_row))
                    continue
                if any(x != 0 for x in indices[b, h, i, c:].tolist()):
                    bad.append((b, h, i, "padding not zero"))
                    continue
                got = set(got_row)
                differ += got != set(ri[b, h, i, : int(rc[b, h, i])].tolist())
                x = logits[b, h, i, : diag + 1]
                keep = min(budgets[diag], diag + 1)
                thr = float(torch.topk(x, keep).values[-1])
                tol = rel_tol * float(x.abs().max())
                forced = set(range(min(cfg.sink_blocks, diag + 1)))
                forced |= set(range(max(0, diag - cfg.window_blocks + 1), diag + 1))
                above = {j for j in range(diag + 1) if float(x[j]) > thr + tol}
                reach = {j for j in got if float(x[j]) >= thr - tol}
                low = [j for j in got - forced if float(x[j]) < thr - tol]
                if not forced <= got or not above <= got or low or not (
                        len((got - forced) | above) <= keep <= len(reach)):
                    bad.append((b, h, i, f"keep {keep}", sorted(forced - got), sorted(above - got), low,
                                len((got - forced) | above), len(reach)))
    return B * H * nQ, differ, bad


def random_plan(B, Hq, Lq, Lk, bs, off, gen, dense=False):
    """A CPU BlockPlan for Lq queries at absolute ``off`` against Lk keys in ``bs``-token blocks:
    each causal block kept with probability 1/2 and every row's diagonal block kept (``dense``:
    every causal block). ``gen``: a CPU torch.Generator."""
    from stem.plan import BlockPlan
    from stem.planner import dense_plan

    if dense:
        return dense_plan(B, Hq, Lq, Lk, bs, "cpu", q_offset=off)
    qbo = off // bs
    nQ = (off + Lq - 1) // bs - qbo + 1
    nK = -(-Lk // bs)
    mask = torch.rand(B, Hq, nQ, nK, generator=gen) < 0.5
    mask[..., torch.arange(nQ), torch.arange(nQ) + qbo] = True  # every row sees its diagonal
    return BlockPlan.from_dense_mask(mask, block_size=bs, q_len=Lq, kv_len=Lk, q_offset=off)
