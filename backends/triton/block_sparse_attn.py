"""Forward block-sparse flash attention over a stem BlockPlan (one Triton kernel + its launcher).

One program computes one query tile of ``BLOCK_M`` rows of one (batch, query head, plan query
block). It walks only the key blocks the plan selected for that query block
(``kv_indices[b, h, i, :kv_counts[b, h, i]]``, ascending), in key tiles of ``BLOCK_N`` tokens
(a plan block of ``bs`` tokens is ``bs // BLOCK_N`` key tiles and ``bs // BLOCK_M`` query tiles),
with the usual online softmax in float32 (exp2 on log2(e)-prescaled scores).

Two loops: the selected blocks strictly before the query tile's own (absolute) block need no
mask at all and are read without bounds checks (they are whole blocks inside the sequence); the
remaining ones (the diagonal block, and anything a hand-made plan put after it) get the token
causal mask and bounds-checked loads.

Queries: row ``r`` is at absolute position ``q_offset + r``; plan query block ``i`` is absolute
block ``q_block_offset + i``; rows of a tile outside ``[0, Lq)`` are computed on zeros and never
stored. GQA: query head ``h`` reads kv head ``h // group``; K/V are never copied.

Scheduling: the work items (query block, batch, head) are either visited in the order of a
device-computed permutation (``order``; heaviest first: sorted by ``kv_counts`` descending, heads
of one query block adjacent so that they share K/V in L2), or, without ``order``, in reversed
query-block order. No host synchronisation anywhere: the launch is CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

from . import interpreter_compat

__all__ = ["block_sparse_attention", "block_sparse_attention_varlen", "pick_tiles", "work_order"]

_LOG2E = 1.4426950408889634


@triton.jit
def _load_kT(k_base, kd, kv_row0, ks, Lk, stride_kn, offs_n, offs_d, MASKED: tl.constexpr, USE_TMA: tl.constexpr,
             UPCAST: tl.constexpr):
    """The (HEAD_DIM, BLOCK_N) transposed key tile at key position ks (float32 with UPCAST: the
    interpreter's bf16 tl.dot is wrong, so bf16 values are multiplied in fp32 there). With USE_TMA
    masked tiles too are read through the descriptor (no per-element pointers: fewer registers);
    their columns past Lk are other rows of the (B*Hkv*Lk, D) view, which the causal mask drops."""
    kpos = ks + offs_n
    if USE_TMA:
        kT = tl.trans(kd.load([kv_row0 + ks, 0]))
    elif MASKED:
        kT = tl.load(k_base + kpos[None, :] * stride_kn + offs_d[:, None], mask=kpos[None, :] < Lk, other=0.0)
    else:
        kT = tl.load(k_base + kpos[None, :] * stride_kn + offs_d[:, None])
    if UPCAST:
        kT = kT.to(tl.float32)
    return kT


@triton.jit
def _load_v(v_base, vd, kv_row0, ks, Lk, stride_vn, offs_n, offs_d, MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """The (BLOCK_N, HEAD_DIM) value tile at key position ks."""
    kpos = ks + offs_n
    if USE_TMA:
        v = vd.load([kv_row0 + ks, 0])
        if MASKED:  # rows past Lk belong to the next head (or are zero-filled): weight 0, but 0 * inf is NaN
            v = tl.where(kpos[:, None] < Lk, v, 0.0)
    elif MASKED:
        v = tl.load(v_base + kpos[:, None] * stride_vn + offs_d[None, :], mask=kpos[:, None] < Lk, other=0.0)
    else:
        v = tl.load(v_base + kpos[:, None] * stride_vn + offs_d[None, :])
    return v


@triton.jit
def _softmax_pv(acc, l_i, m_i, qk, v, ks, qpos, qk_scale, offs_n, MASKED: tl.constexpr, DOT_PREC: tl.constexpr,
                UPCAST: tl.constexpr, FOLD: tl.constexpr):
    """Fold raw scores qk = q @ k^T of the key tile at ks and its values v into (acc, l_i, m_i).
    m_i is in log2 units of the scaled scores. FOLD (scale > 0): the scale is applied inside the
    exp2 argument (one FMA per score) instead of a separate multiply."""
    if MASKED:
        qk = tl.where((ks + offs_n)[None, :] <= qpos[:, None], qk, float("-inf"))
    if FOLD:
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
    else:
        qk = qk * qk_scale
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_ij[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if UPCAST:
        acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc, input_precision=DOT_PREC)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_ij


@triton.jit
def _attn_tile(acc, l_i, m_i, q, k_base, v_base, kd, vd, kv_row0, ks, qpos, Lk, stride_kn, stride_vn, qk_scale,
               offs_n, offs_d, MASKED: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
               USE_TMA: tl.constexpr, FOLD: tl.constexpr):
    """One key tile [ks, ks + BLOCK_N) folded into the running (acc, l_i, m_i). Unmasked tiles
    lie wholly inside the sequence; with USE_TMA they are read through tensor descriptors over
    K/V viewed as (B*Hkv*Lk, D) (row kv_row0 + ks)."""
    kT = _load_kT(k_base, kd, kv_row0, ks, Lk, stride_kn, offs_n, offs_d, MASKED, USE_TMA, UPCAST)
    qk = tl.dot(q, kT, input_precision=DOT_PREC)
    v = _load_v(v_base, vd, kv_row0, ks, Lk, stride_vn, offs_n, offs_d, MASKED, USE_TMA)
    return _softmax_pv(acc, l_i, m_i, qk, v, ks, qpos, qk_scale, offs_n, MASKED, DOT_PREC, UPCAST, FOLD)


@triton.jit
def _stem_sparse_attn_fwd(
    Q, K, V, O, LSE, COUNTS, INDICES, ORDER, KD, VD, CU_Q, CU_K,
    qk_scale,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_cb, stride_ch, stride_ci,
    stride_ib, stride_ih, stride_ii,
    stride_lb, stride_lh,
    B, HQ, NQ, Lq, Lk, q_offset, q_block_offset, GROUP,
    BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    SUB_M: tl.constexpr, SUB_N: tl.constexpr, W_P2: tl.constexpr,
    USE_ORDER: tl.constexpr, RETURN_LSE: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    USE_TMA: tl.constexpr, VARLEN: tl.constexpr, FOLD: tl.constexpr, WS: tl.constexpr,
    LOOP_STAGES: tl.constexpr, PIPE_QK: tl.constexpr,
):
    pid = tl.program_id(0)
    item = pid // SUB_M
    sm = pid % SUB_M
    per_block = B * HQ  # the (batch, head) items of one query block run next to each other (L2)
    if USE_ORDER:
        i = tl.load(ORDER + item // per_block)  # query blocks heaviest first
    else:
        i = NQ - 1 - item // per_block  # late query blocks first
    bh = item % per_block
    h = bh % HQ
    b = bh // HQ
    hk = h // GROUP
    b64 = b.to(tl.int64)

    if VARLEN:  # packed batch: b is a sequence; its rows start at cu_seqlens[b] (strides over b are 0)
        q_start = tl.load(CU_Q + b)
        seq_lq = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        seq_lk = tl.load(CU_K + b + 1) - k_start
        seq_off = seq_lk - seq_lq  # the sequence's queries are its last seq_lq positions
        seq_qbo = seq_off // BS
    else:
        q_start = tl.zeros([], dtype=tl.int32)
        k_start = tl.zeros([], dtype=tl.int32)
        seq_lq = Lq
        seq_lk = Lk
        seq_off = q_offset
        seq_qbo = q_block_offset
    ia = seq_qbo + i  # absolute query block
    qs = ia * BS + sm * BLOCK_M  # absolute position of the tile's first row
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qpos = qs + offs_m
    rows = qpos - seq_off
    row_ok = (rows >= 0) & (rows < seq_lq)

    q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + q_start.to(tl.int64) * stride_qm
    q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kn
    v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vn
    kv_row0 = (b * (HQ // GROUP) + hk) * Lk  # first row of this kv head in the (B*Hkv*Lk, D) view

    n = tl.load(COUNTS + b64 * stride_cb + h * stride_ch + i * stride_ci)
    idx_base = INDICES + b64 * stride_ib + h.to(tl.int64) * stride_ih + i.to(tl.int64) * stride_ii
    offs_w = tl.arange(0, W_P2)
    sel = tl.load(idx_base + offs_w, mask=offs_w < n, other=0x7FFFFFFF)
    n_full = tl.sum((sel < ia).to(tl.int32), 0)  # blocks strictly before the diagonal: no mask

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: fully masked rows stay NaN-free
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    n_unmasked = n_full * SUB_N
    if PIPE_QK:  # the scores of tile t + 1 are issued before the softmax of tile t (overlap MMA and exp)
        if n_unmasked > 0:
            ks = tl.load(idx_base) * BS
            kT = _load_kT(k_base, KD, kv_row0, ks, seq_lk, stride_kn, offs_n, offs_d, False, USE_TMA, UPCAST)
            qk = tl.dot(q, kT, input_precision=DOT_PREC)
            for t in range(1, n_unmasked):
                ks_next = tl.load(idx_base + t // SUB_N) * BS + (t % SUB_N) * BLOCK_N
                kT = _load_kT(k_base, KD, kv_row0, ks_next, seq_lk, stride_kn, offs_n, offs_d, False, USE_TMA, UPCAST)
                qk_next = tl.dot(q, kT, input_precision=DOT_PREC)
                v = _load_v(v_base, VD, kv_row0, ks, seq_lk, stride_vn, offs_n, offs_d, False, USE_TMA)
                acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, qk, v, ks, qpos, qk_scale, offs_n, False, DOT_PREC,
                                            UPCAST, FOLD)
                qk = qk_next
                ks = ks_next
            v = _load_v(v_base, VD, kv_row0, ks, seq_lk, stride_vn, offs_n, offs_d, False, USE_TMA)
            acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, qk, v, ks, qpos, qk_scale, offs_n, False, DOT_PREC,
                                        UPCAST, FOLD)
    else:
        for t in tl.range(0, n_unmasked, num_stages=LOOP_STAGES, warp_specialize=WS):
            blk = tl.load(idx_base + t // SUB_N)
            ks = blk * BS + (t % SUB_N) * BLOCK_N
            acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_base, v_base, KD, VD, kv_row0, ks, qpos, seq_lk,
                                       stride_kn, stride_vn, qk_scale, offs_n, offs_d, False, DOT_PREC, UPCAST,
                                       USE_TMA, FOLD)
    for t in range(n_full * SUB_N, n * SUB_N):
        blk = tl.load(idx_base + t // SUB_N)
        ks = blk * BS + (t % SUB_N) * BLOCK_N
        acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_base, v_base, KD, VD, kv_row0, ks, qpos, seq_lk,
                                   stride_kn, stride_vn, qk_scale, offs_n, offs_d, True, DOT_PREC, UPCAST, USE_TMA,
                                   FOLD)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_base = O + b64 * stride_ob + h.to(tl.int64) * stride_oh + q_start.to(tl.int64) * stride_om
    tl.store(o_base + rows[:, None] * stride_om + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])
    if RETURN_LSE:
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        tl.store(LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start + rows, lse, mask=row_ok)


# Tiles per head dim for 16-bit inputs (16 and 32 use the 64 row): (BLOCK_M, BLOCK_N, num_warps,
# num_stages). Chosen on one NVIDIA H200 with the default Stem plan
# (python -m benchmarks.triton.bench_triton --sweep --extra; numbers in benchmarks/NOTES.md).
# Shared memory decides: a program that leaves room for a second one on the same SM lets one
# program's softmax overlap the other's matrix products.
_TILES_16BIT = {
    64: (128, 128, 4, 3),  # 128K Hq14 Hkv2: 15.4 ms; (128, 128, 8, 2) 21.7 ms
    128: (128, 128, 8, 3),  # 128K Hq32 Hkv8: 67.0 ms; 2 stages 68.5-68.9; BLOCK_N 64, 3 stages 74.2
    256: (128, 64, 8, 2),  # 32K Hq8 Hkv4: 2.81 ms; (64, 64, 4, 2) 3.88; (64, 64, 8, 2) 6.19
}
# TMA tensor descriptors for the unmasked K/V tiles: within noise of plain loads (128K: 67.0 vs
# 67.0 ms with 3 stages, 68.9 vs 68.7 with 2); kept on for Hopper+.
DEFAULT_TMA = True


def _tma_capable(device: torch.device) -> bool:
    if device.type != "cuda":
        return False  # CPU (interpreter): the TMA path only when asked for explicitly
    return torch.cuda.get_device_capability(device)[0] >= 9


def pick_tiles(block_size: int, head_dim: int, dtype: torch.dtype, block_m: int | None = None,
               block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a plan block size, head dim and dtype (H200-tuned
    defaults, a fixed table: no autotuning, no host sync; explicit arguments override them).
    Tiles never exceed the plan block."""
    if dtype == torch.float32:
        dm, dn, dw, ds = (64 if head_dim > 128 else 128), 64, 8, 2
    else:
        dm, dn, dw, ds = _TILES_16BIT[max(head_dim, 64)]  # head dims are powers of two in [16, 256]
    bm, bn = min(block_m or dm, block_size), min(block_n or dn, block_size)
    nw, ns = num_warps or dw, num_stages or ds
    if block_size % bm or block_size % bn:
        raise ValueError(f"tiles ({bm}, {bn}) must divide the plan block size {block_size}")
    return bm, bn, nw, ns


def work_order(kv_counts: torch.Tensor) -> torch.Tensor:
    """int32 permutation of the query blocks, heaviest first (total selected blocks over batch and
    heads, descending; stable). The kernel runs all (batch, head) items of a query block together,
    so GQA heads and neighbouring heads share K/V blocks in L2. Device op, no host sync."""
    weight = kv_counts.sum(dim=(0, 1), dtype=torch.int64)
    return torch.argsort(weight, descending=True, stable=True).to(torch.int32)


def block_sparse_attention(q, k, v, kv_counts, kv_indices, *, block_size: int, q_offset: int, scale: float,
                           return_lse: bool = False, schedule: str = "reversed", order: torch.Tensor | None = None,
                           block_m: int | None = None, block_n: int | None = None,
                           num_warps: int | None = None, num_stages: int | None = None,
                           out: torch.Tensor | None = None, lse_out: torch.Tensor | None = None,
                           use_tma: bool | None = None, **loop):
    """Launch the kernel. q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D) with unit stride on D; kv_counts
    int32 (B, Hq, nQ), kv_indices int32 (B, Hq, nQ, W). Returns (out like q, lse float32 or None).

    ``schedule``: "sorted" (heaviest work first, from ``work_order``; ``order`` may pass a
    precomputed one) or "reversed" (late query blocks first, no sort). Inputs are assumed valid
    (the executor checks them). ``out``/``lse_out``: optional preallocated outputs (contiguous).
    ``use_tma``: read the unmasked K/V tiles through TMA tensor descriptors (Hopper+; K/V must be
    contiguous); None picks the default (``DEFAULT_TMA`` on sm90+, off elsewhere).
    """
    interpreter_compat()
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    nQ, W = kv_indices.shape[2], kv_indices.shape[3]
    bs = block_size
    bm, bn, nw, ns = pick_tiles(bs, D, q.dtype, block_m, block_n, num_warps, num_stages)
    out = torch.empty_like(q) if out is None else out
    if return_lse:
        lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device) if lse_out is None else lse_out
    else:
        lse = out  # unused pointer
    if schedule == "sorted":
        order = work_order(kv_counts) if order is None else order
    elif schedule == "reversed":
        order = kv_counts  # unused placeholder pointer
    else:
        raise ValueError(f"schedule must be 'sorted' or 'reversed', got {schedule!r}")
    if use_tma is None:
        use_tma = DEFAULT_TMA and _tma_capable(q.device)
    if use_tma and k.is_contiguous() and v.is_contiguous() and (D * k.element_size()) % 16 == 0:
        from triton.tools.tensor_descriptor import TensorDescriptor

        kd = TensorDescriptor.from_tensor(k.view(B * Hkv * Lk, D), [bn, D])
        vd = TensorDescriptor.from_tensor(v.view(B * Hkv * Lk, D), [bn, D])
    else:
        use_tma, kd, vd = False, k, v
    grid = (nQ * B * Hq * (bs // bm),)
    _launch(q, k, v, out, lse, kv_counts, kv_indices, order, kd, vd, None, None, scale, grid,
            (Hq * Lq, Lq), B, Hq, nQ, Lq, Lk, q_offset, bs, bm, bn, nw, ns, W, schedule, return_lse, use_tma, loop)
    return out, (lse if return_lse else None)


# Code-generation options of the kernel (keyword arguments of the launchers): warp_specialize and
# loop_stages go to the unmasked loop's tl.range, pipeline_qk issues the next tile's scores before
# this tile's softmax, fold_scale applies the softmax scale inside the exp2 argument (scale > 0),
# maxnreg caps registers per thread (room for more programs per SM).
_CODEGEN_DEFAULTS = {"warp_specialize": False, "loop_stages": None, "pipeline_qk": False, "fold_scale": True,
                     "maxnreg": None}


def _codegen_options(loop: dict) -> dict:
    """The code-generation options (see _CODEGEN_DEFAULTS) with the defaults filled in."""
    bad = set(loop) - set(_CODEGEN_DEFAULTS)
    if bad:
        raise TypeError(f"unknown kernel options {sorted(bad)}; known: {sorted(_CODEGEN_DEFAULTS)}")
    return {**_CODEGEN_DEFAULTS, **loop}


def _launch(q, k, v, out, lse, kv_counts, kv_indices, order, kd, vd, cu_q, cu_k, scale, grid, lse_strides,
            B, Hq, nQ, Lq, Lk, q_offset, bs, bm, bn, nw, ns, W, schedule, return_lse, use_tma, loop):
    """The kernel launch shared by the batched (B, H, L, D) and the packed varlen layouts."""
    varlen = cu_q is not None
    opt = _codegen_options(loop)
    extra = {} if opt["maxnreg"] is None or knobs.runtime.interpret else {"maxnreg": opt["maxnreg"]}
    D, Hkv = q.shape[-1], k.shape[1]
    _stem_sparse_attn_fwd[grid](
        q, k, v, out, lse, kv_counts, kv_indices, order, kd, vd,
        cu_q if varlen else kv_counts, cu_k if varlen else kv_counts,
        float(scale) * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        kv_counts.stride(0), kv_counts.stride(1), kv_counts.stride(2),
        kv_indices.stride(0), kv_indices.stride(1), kv_indices.stride(2),
        *lse_strides,
        B, Hq, nQ, Lq, Lk, q_offset, q_offset // bs, Hq // Hkv,
        BS=bs, BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=D, SUB_M=bs // bm, SUB_N=bs // bn,
        W_P2=max(16, triton.next_power_of_2(W)), USE_ORDER=schedule == "sorted", RETURN_LSE=return_lse,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=bool(knobs.runtime.interpret) and q.dtype == torch.bfloat16, USE_TMA=use_tma, VARLEN=varlen,
        FOLD=bool(opt["fold_scale"]) and scale > 0, WS=bool(opt["warp_specialize"]),
        LOOP_STAGES=opt["loop_stages"] or ns, PIPE_QK=bool(opt["pipeline_qk"]),
        num_warps=nw, num_stages=ns, **extra,
    )


def block_sparse_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, kv_counts, kv_indices, *, block_size: int,
                                  scale: float, return_lse: bool = False, out=None, lse_out=None,
                                  block_m: int | None = None, block_n: int | None = None,
                                  num_warps: int | None = None, num_stages: int | None = None, **loop):
    """Launch the kernel on a packed batch: q (total_q, Hq, D), k/v (total_k, Hkv, D) (unit stride
    on D), int32 cumulative lengths (B + 1,), kv_counts (B, Hq, nQ), kv_indices (B, Hq, nQ, W).
    One launch for every sequence; each program reads its sequence's offsets and lengths from the
    cumulative lengths (no padding, no host sync). Returns (out like q, lse float32 (Hq, total_q)
    or None). K/V are read with plain loads (their rows are Hkv * D apart, not a TMA tile)."""
    interpreter_compat()
    Tq, Hq, D = q.shape
    B, _, nQ, W = kv_indices.shape
    bs = block_size
    bm, bn, nw, ns = pick_tiles(bs, D, q.dtype, block_m, block_n, num_warps, num_stages)
    out = torch.empty_like(q) if out is None else out
    lse = (torch.empty(Hq, Tq, dtype=torch.float32, device=q.device) if lse_out is None else lse_out) \
        if return_lse else out
    q4, k4, v4, o4 = (t.unsqueeze(0).transpose(1, 2) for t in (q, k, v, out))  # (1, H, T, D) views
    q4, k4, v4, o4 = (t.expand(B, -1, -1, -1) if B else t for t in (q4, k4, v4, o4))  # stride 0 over sequences
    grid = (nQ * B * Hq * (bs // bm),)
    if grid[0]:
        _launch(q4, k4, v4, o4, lse, kv_counts, kv_indices, kv_counts, k4, v4, cu_seqlens_q, cu_seqlens_k, scale,
                grid, (0, Tq), B, Hq, nQ, 0, 0, 0, bs, bm, bn, nw, ns, W, "reversed", return_lse, False, loop)
    return out, (lse if return_lse else None)
