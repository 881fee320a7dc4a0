"""The whole Stem planner on the GPU in a few Triton launches, no host synchronisation.

Stages (``stem.planner`` explains the factorised scoring):

1. pooling (``block_pool._pool_blocks``): per block the (S, D) float32 sums of q (rows reversed in
   each stride group) and of k, and per key stride group the largest value norm; one pass over q,
   k, v;
2. ``_bonus_kernel``: the value bonus per key block, standardised over each (batch, kv head)'s
   valid groups (one program per kv head);
3. ``_logits_kernel``: block logits ``scale * <q_sum, k_sum> + bonus`` for every causal tile, a
   float32 GEMM on tensor cores with 3xTF32 (float32-class accuracy; fully non-causal tiles are
   skipped);
4. ``_select_kernel``: per query block, the top ``min(budget, causal blocks)`` logits (the
   threshold found by bisection on the logits' order-preserving integer keys, ties at the
   threshold to the lower block index), plus sinks and window, written as the plan's ascending
   CSR row and its count, padding zeroed.

Scratch is bounded: the q sums and logits are made for a chunk of (batch, kv head) pairs at a
time, as many as fit ``SCRATCH_BYTES`` beside the key sums (B 1, Hq 32, Hkv 8, D 128: one chunk up
to 64K tokens, 112 MB there; four chunks at 128K, 97 MB). The per-row budgets are a host
computation from shapes, copied to the device once per geometry and cached (so CUDA-graph capture
after a warm-up call does no copy).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from stem.budget import block_budgets
from stem.plan import block_geometry

from . import interpreter_compat
from .block_pool import _launch_pool

__all__ = ["plan_triton", "select_triton", "SCRATCH_BYTES"]

SCRATCH_BYTES = 120 * 2**20  # key sums, value maxima, bonus + one chunk's q sums and logits (not the plan)


@triton.jit
def _bonus_kernel(VMAX, BONUS, n_valid, n_groups, n_blocks, weight,
                  GPB: tl.constexpr, CHUNK: tl.constexpr, NB: tl.constexpr):
    """Program p (a flattened (batch, kv head)): BONUS[p, j] = mean over the GPB groups of key
    block j of ``weight * relu((log(u + 1e-6) - mean) / (std + 1e-6))``, mean and Bessel std over
    the first ``n_valid`` groups; groups past them count 0."""
    p = tl.program_id(0).to(tl.int64)
    base = VMAX + p * n_groups
    offs = tl.arange(0, CHUNK)
    tot = tl.zeros([CHUNK], dtype=tl.float32)
    for s in range(0, n_valid, CHUNK):
        m = s + offs < n_valid
        u = tl.load(base + s + offs, mask=m, other=1.0)
        tot += tl.where(m, tl.log(u + 1e-6), 0.0)
    mean = tl.sum(tot, 0) / n_valid
    sq = tl.zeros([CHUNK], dtype=tl.float32)
    for s in range(0, n_valid, CHUNK):
        m = s + offs < n_valid
        u = tl.load(base + s + offs, mask=m, other=1.0)
        d = tl.where(m, tl.log(u + 1e-6) - mean, 0.0)
        sq += d * d
    var = tl.sum(sq, 0) / tl.maximum(n_valid - 1, 1)
    std = tl.where(n_valid > 1, tl.sqrt(var), 0.0)
    inv = 1.0 / (std + 1e-6)
    ob = tl.arange(0, NB)
    og = tl.arange(0, GPB)
    for j0 in range(0, n_blocks, NB):
        blk = j0 + ob
        g = blk[:, None] * GPB + og[None, :]
        m = (g < n_valid) & (blk[:, None] < n_blocks)
        u = tl.load(base + g, mask=m, other=1.0)
        z = tl.where(m, weight * tl.maximum((tl.log(u + 1e-6) - mean) * inv, 0.0), 0.0)
        tl.store(BONUS + p * n_blocks + blk, tl.sum(z, 1) / GPB, mask=blk < n_blocks)


@triton.jit
def _logits_kernel(QS, KS, BONUS, OUT, p0, G, nQ, nK, qbo, K, scale,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    """Program (row tile, column tile, pair c of the chunk): OUT[c*G + g, i, j] = scale *
    <QS[c*G + g, i], KS[p0 + c, j]> + BONUS[p0 + c, j] for rows r = i*G + g of the tile (the G
    heads of a query block side by side) and key blocks j; tiles wholly after the diagonal return
    at once (selection never reads them)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    c = tl.program_id(2).to(tl.int64)
    r = pid_m * BM + tl.arange(0, BM)
    n0 = pid_n * BN
    i_last = tl.minimum((pid_m * BM + BM - 1) // G, nQ - 1)
    if n0 > qbo + i_last:
        return
    i = r // G
    g = r % G
    row_ok = r < G * nQ
    cols = n0 + tl.arange(0, BN)
    col_ok = cols < nK
    kk = tl.arange(0, BK)
    a_ptr = QS + ((c * G + g) * nQ + i).to(tl.int64)[:, None] * K + kk[None, :]
    b_ptr = KS + ((p0 + c) * nK + cols).to(tl.int64)[None, :] * K + kk[:, None]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptr + k0, mask=row_ok[:, None], other=0.0)
        b = tl.load(b_ptr + k0, mask=col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    bonus = tl.load(BONUS + (p0 + c) * nK + cols, mask=col_ok, other=0.0)
    out = acc * scale + bonus[None, :]
    o_ptr = OUT + ((c * G + g) * nQ + i).to(tl.int64)[:, None] * nK + cols[None, :]
    tl.store(o_ptr, out, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _select_kernel(LOGITS, KEEP, COUNTS, INDICES, n_rows, nQ, nK, qbo, W, out_row0,
                   SINKS: tl.constexpr, WINDOW: tl.constexpr, R: tl.constexpr, NKP: tl.constexpr,
                   WP: tl.constexpr):
    """Program: R rows (flattened (head of the chunk, query block i)) of LOGITS (rows, nQ*... nK).
    KEEP[i] = min(budget_i, causal blocks of i). Row's plan: the KEEP[i] largest causal logits
    (ties at the threshold to the lower block index), the first SINKS blocks and the WINDOW blocks
    ending at the diagonal, ascending; written to row ``out_row0 + row`` of COUNTS / INDICES."""
    rows = tl.program_id(0) * R + tl.arange(0, R)
    row_ok = rows < n_rows
    i = rows % nQ
    diag = qbo + i  # absolute block of the row: causal keys are 0..diag
    keep = tl.load(KEEP + i, mask=row_ok, other=0)
    cols = tl.arange(0, NKP)
    causal = (cols[None, :] <= diag[:, None]) & (cols[None, :] < nK) & row_ok[:, None]
    x = tl.load(LOGITS + rows.to(tl.int64)[:, None] * nK + cols[None, :], mask=causal, other=0.0)
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # float order as signed integers
    key = tl.where(causal, key, -2147483648)
    # bisection for T = the keep-th largest key: count(key >= lo) >= keep > count(key >= hi + 1)
    lo = tl.full([R], -2147483648, tl.int64)
    hi = tl.full([R], 2147483647, tl.int64)
    for _ in range(32):
        mid = (lo + hi + 1) >> 1  # in [lo, hi]: fits int32
        cnt = tl.sum(((key >= mid.to(tl.int32)[:, None]) & causal).to(tl.int32), 1)
        ok = cnt >= keep
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    t = lo.to(tl.int32)[:, None]
    above = (key > t) & causal
    tie = (key == t) & causal
    need = keep - tl.sum(above.to(tl.int32), 1)
    tie_rank = tl.cumsum(tie.to(tl.int32), 1)
    sel = above | (tie & (tie_rank <= need[:, None]))
    forced = (cols[None, :] < SINKS) | (cols[None, :] > diag[:, None] - WINDOW)
    sel = (sel | forced) & causal
    cnt = tl.sum(sel.to(tl.int32), 1)
    pos = tl.cumsum(sel.to(tl.int32), 1) - 1
    out_rows = (out_row0 + rows).to(tl.int64)
    tl.store(COUNTS + out_rows, cnt, mask=row_ok)
    row_base = INDICES + out_rows * W
    tl.store(row_base[:, None] + pos, cols[None, :] + tl.zeros([R, NKP], tl.int32), mask=sel)
    slots = tl.arange(0, WP)
    pad = (slots[None, :] >= cnt[:, None]) & (slots[None, :] < W) & row_ok[:, None]
    tl.store(row_base[:, None] + slots[None, :], tl.zeros([R, WP], tl.int32), mask=pad)


_KEEP_CACHE: dict = {}


def _keep_counts(config, n_total: int, qbo: int, nQ: int, nK: int, device) -> tuple[torch.Tensor, int]:
    """(int32 (nQ,) ``min(budget_i, causal blocks of i)`` on ``device``, the plan width W), cached
    per geometry (one host-to-device copy per new shape)."""
    key = (n_total, float(config.alpha), float(config.k_rate), int(config.k_bias), config.sink_blocks,
           config.window_blocks, qbo, nQ, nK, str(device))
    hit = _KEEP_CACHE.get(key)
    if hit is None:
        budgets = block_budgets(n_total, config.alpha, config.k_rate, config.k_bias)[qbo: qbo + nQ]
        keep = [min(b, qbo + i + 1) for i, b in enumerate(budgets)]
        kmax = min(max(budgets), nK)
        width = min(nK, kmax + config.sink_blocks + config.window_blocks)
        if len(_KEEP_CACHE) > 512:
            _KEEP_CACHE.clear()
        hit = _KEEP_CACHE[key] = (torch.tensor(keep, dtype=torch.int32).to(device), width)
    return hit


def _chunk_pairs(pairs: int, G: int, nQ: int, nK: int, SD: int, gpb: int, scratch: int) -> int:
    """(batch, kv head) pairs planned per chunk so that the key sums, value maxima and bonus plus
    one chunk's q sums and logits stay within ``scratch`` bytes (at least one pair)."""
    fixed = pairs * nK * (SD + gpb + 1) * 4
    per_pair = G * nQ * (SD + nK) * 4
    return max(1, min(pairs, (scratch - fixed) // per_pair))


def select_triton(scores: torch.Tensor, config, q_block_offset: int, n_total: int):
    """``stem.planner.select_blocks`` in one launch: scores (B, Hq, nQ, nK) float32 CUDA (non-causal
    entries are ignored), query block i at absolute block ``q_block_offset + i`` of a sequence of
    ``n_total`` blocks. Returns int32 ``(kv_counts (B, Hq, nQ), kv_indices (B, Hq, nQ, W))``; ties at
    a row's budget boundary go to the lower block index. No host synchronisation."""
    interpreter_compat()
    B, Hq, nQ, nK = scores.shape
    scores = scores.contiguous()
    keep, W = _keep_counts(config, n_total, q_block_offset, nQ, nK, scores.device)
    counts = torch.empty(B, Hq, nQ, dtype=torch.int32, device=scores.device)
    indices = torch.empty(B, Hq, nQ, W, dtype=torch.int32, device=scores.device)
    _launch_select(scores, keep, counts, indices, B * Hq * nQ, nQ, nK, q_block_offset, W, 0, config)
    return counts, indices


def _launch_select(logits, keep, counts, indices, n_rows, nQ, nK, qbo, W, out_row0, config) -> None:
    """``_select_kernel`` over ``n_rows`` rows of ``logits`` into rows ``out_row0 ..`` of the plan."""
    NKP = triton.next_power_of_2(nK)
    R = max(1, min(8, 4096 // NKP))
    _select_kernel[(triton.cdiv(n_rows, R),)](
        logits, keep, counts, indices, n_rows, nQ, nK, qbo, W, out_row0,
        SINKS=config.sink_blocks, WINDOW=config.window_blocks, R=R, NKP=NKP,
        WP=triton.next_power_of_2(W), num_warps=4 if NKP * R <= 4096 else 8)


def plan_triton(q, k, v, config, q_offset: int, n_total: int, *, scratch_bytes: int | None = None,
                precision: str = "tf32x3", stages: dict | None = None):
    """int32 ``(kv_counts (B, Hq, nQ), kv_indices (B, Hq, nQ, W))`` of Stem's plan for q
    (B, Hq, Lq, D) at absolute position ``q_offset`` against k, v (B, Hkv, Lk, D), with budgets for
    a sequence of ``n_total`` blocks. float16 / bfloat16 / float32 CUDA tensors; no host
    synchronisation. ``stages``: a dict that receives the intermediate tensors (tests, profiling).
    """
    interpreter_compat()
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    bs, S = config.block_size, config.stride
    qbo, nQ, nK = block_geometry(Lq, Lk, q_offset, bs)
    dev = q.device
    keep, W = _keep_counts(config, n_total, qbo, nQ, nK, dev)
    SD = S * D
    pairs = B * Hkv
    # 2-3: key statistics and the value bonus for every kv head
    k_sum, vmax = _launch_pool(k, 0, nK, bs, S, False, v=v)
    bonus = torch.empty(pairs, nK, dtype=torch.float32, device=dev)
    gpb = bs // S
    _bonus_kernel[(pairs,)](vmax, bonus, -(-Lk // S), nK * gpb, nK, float(config.value_weight),
                            GPB=gpb, CHUNK=4096, NB=max(1, 4096 // gpb), num_warps=8)
    counts = torch.empty(B, Hq, nQ, dtype=torch.int32, device=dev)
    indices = torch.empty(B, Hq, nQ, W, dtype=torch.int32, device=dev)
    scale = 1.0 / (math.sqrt(D) * S * config.norm) / (bs // S) ** 2
    chunk = _chunk_pairs(pairs, G, nQ, nK, SD, gpb, SCRATCH_BYTES if scratch_bytes is None else scratch_bytes)
    front = q_offset - qbo * bs
    if B > 1 and q.stride(0) != Hq * q.stride(1):  # (batch, head) do not flatten into a view
        chunk = min(chunk, Hkv)  # then no chunk crosses a batch (chunks start at multiples of it)
        chunk = max(c for c in range(1, chunk + 1) if Hkv % c == 0)
    qf = q.unsqueeze(0).flatten(1, 2) if B > 1 and q.stride(0) == Hq * q.stride(1) else None
    BM, BN, BK = 64, 64, 32
    for p0 in range(0, pairs, chunk):
        pc = min(chunk, pairs - p0)
        # 1: q sums of the chunk's query heads (flattened heads p0*G .. (p0+pc)*G)
        h0 = p0 * G
        qc = qf[:, h0: h0 + pc * G] if qf is not None else q[h0 // Hq, None, h0 % Hq: h0 % Hq + pc * G]
        q_sum, _ = _launch_pool(qc, front, nQ, bs, S, True)
        logits = torch.empty(pc * G, nQ, nK, dtype=torch.float32, device=dev)
        grid = (triton.cdiv(G * nQ, BM), triton.cdiv(nK, BN), pc)
        _logits_kernel[grid](q_sum, k_sum, bonus, logits, p0, G, nQ, nK, qbo, SD, scale,
                             BM=BM, BN=BN, BK=BK, PRECISION=precision, num_warps=4, num_stages=3)
        _launch_select(logits, keep, counts, indices, pc * G * nQ, nQ, nK, qbo, W, p0 * G * nQ, config)
        if stages is not None:
            stages.setdefault("q_sum", []).append(q_sum)
            stages.setdefault("logits", []).append(logits)
        q_sum = logits = None  # freed before the next chunk allocates its own (the scratch bound)
    if stages is not None:
        stages.update(k_sum=k_sum, v_max=vmax, bonus=bonus, keep=keep, chunk_pairs=chunk)
    return counts, indices
