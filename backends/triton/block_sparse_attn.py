"""Forward block-sparse flash attention over a stem BlockPlan (one Triton kernel + its launcher).

One program computes one query tile of ``BLOCK_M`` rows of one (batch, query head, plan query
block). It walks only the key blocks the plan selected for that query block
(``kv_indices[b, h, i, :kv_counts[b, h, i]]``, ascending), in key tiles of ``BLOCK_N`` tokens
(a plan block of ``bs`` tokens is ``bs // BLOCK_N`` key tiles and ``bs // BLOCK_M`` query tiles),
with the usual online softmax in float32 (exp2 on log2(e)-prescaled scores).

Two loops: the selected blocks strictly before the query tile's own (absolute) block need no
mask at all and are read without bounds checks (they are whole blocks inside the sequence); the
remaining ones (the diagonal block, and anything a hand-made plan put after it) get the token
causal mask and bounds-checked loads (or, with ``TMA_MASKED``, descriptor loads whose rows past
the sequence the causal mask drops).

Queries: row ``r`` is at absolute position ``q_offset + r``; plan query block ``i`` is absolute
block ``q_block_offset + i``; rows of a tile outside ``[0, Lq)`` are computed on zeros and never
stored. GQA: query head ``h`` reads kv head ``h // group``; K/V are never copied.

Scheduling: the work items (query block, batch, head) are either visited in the order of a
device-computed permutation (``order``; heaviest first: sorted by ``kv_counts`` descending, heads
of one query block adjacent so that they share K/V in L2), or, without ``order``, in reversed
query-block order. No host synchronisation anywhere: the launch is CUDA-graph capturable.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton import knobs

from . import interpreter_compat

__all__ = ["Tiles", "block_sparse_attention", "block_sparse_attention_varlen", "pick_tiles", "work_order"]

_LOG2E = 1.4426950408889634


@triton.jit
def _load_kT(k_base, kd, kv_row0, ks, Lk, stride_kn, offs_n, offs_d, MASKED: tl.constexpr, USE_TMA: tl.constexpr,
             UPCAST: tl.constexpr):
    """The (HEAD_DIM, BLOCK_N) transposed key tile at key position ks (float32 with UPCAST: the
    interpreter's bf16 tl.dot is wrong, so bf16 values are multiplied in fp32 there). A masked tile
    read through the descriptor (TMA_MASKED) has columns past Lk that are other rows of the
    (B*Hkv*Lk, D) view (or zero fill): the causal mask drops them."""
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
def _attn_tile(acc, l_i, m_i, q, k_base, v_base, kd, vd, kv_row0, ks, qpos, Lk, stride_kn, stride_vn, qk_scale,
               offs_n, offs_d, MASKED: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
               USE_TMA: tl.constexpr, FOLD: tl.constexpr):
    """One key tile [ks, ks + BLOCK_N) folded into the running (acc, l_i, m_i); m_i is in log2 units
    of the scaled scores. Unmasked tiles lie wholly inside the sequence; with USE_TMA the tile is
    read through tensor descriptors over K/V viewed as (B*Hkv*Lk, D) (row kv_row0 + ks). FOLD
    (scale > 0): the scale is applied inside the exp2 argument (one FMA per score) instead of a
    separate multiply."""
    kT = _load_kT(k_base, kd, kv_row0, ks, Lk, stride_kn, offs_n, offs_d, MASKED, USE_TMA, UPCAST)
    qk = tl.dot(q, kT, input_precision=DOT_PREC)
    v = _load_v(v_base, vd, kv_row0, ks, Lk, stride_vn, offs_n, offs_d, MASKED, USE_TMA)
    if not FOLD:
        qk = qk * qk_scale
    if MASKED:
        qk = tl.where((ks + offs_n)[None, :] <= qpos[:, None], qk, float("-inf"))
    if FOLD:  # qk_scale > 0: max and -inf commute with the scaling
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
    else:
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
    USE_TMA: tl.constexpr, TMA_MASKED: tl.constexpr, VARLEN: tl.constexpr, FOLD: tl.constexpr,
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

    for t in range(0, n_full * SUB_N):
        blk = tl.load(idx_base + t // SUB_N)
        ks = blk * BS + (t % SUB_N) * BLOCK_N
        acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_base, v_base, KD, VD, kv_row0, ks, qpos, seq_lk,
                                   stride_kn, stride_vn, qk_scale, offs_n, offs_d, False, DOT_PREC, UPCAST, USE_TMA,
                                   FOLD)
    for t in range(n_full * SUB_N, n * SUB_N):
        blk = tl.load(idx_base + t // SUB_N)
        ks = blk * BS + (t % SUB_N) * BLOCK_N
        acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_base, v_base, KD, VD, kv_row0, ks, qpos, seq_lk,
                                   stride_kn, stride_vn, qk_scale, offs_n, offs_d, True, DOT_PREC, UPCAST, TMA_MASKED,
                                   FOLD)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_base = O + b64 * stride_ob + h.to(tl.int64) * stride_oh + q_start.to(tl.int64) * stride_om
    tl.store(o_base + rows[:, None] * stride_om + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])
    if RETURN_LSE:
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        tl.store(LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start + rows, lse, mask=row_ok)


class Tiles(NamedTuple):
    """One kernel configuration: tile shape, warps, software-pipelining depth, and two code-generation
    choices: ``maxnreg`` caps the registers per thread (None: the compiler's choice) and
    ``tma_masked`` reads the masked (diagonal) tiles through the TMA descriptors too (TMA path only)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    maxnreg: int | None = None
    tma_masked: bool = False


# 16-bit inputs on the TMA path (sm90+), per head dim (16 and 32 use the 64 row). Chosen on one
# NVIDIA H200 with the default Stem plan (python -m benchmarks.triton.bench_triton --sweep --extra;
# all numbers in benchmarks/NOTES.md). D 128: the register cap of 128 lets two 8-warp programs
# share an SM (96 KiB of shared memory each), so one program's softmax overlaps the other's
# matrix products; it costs some spilling, and is a loss with 128-wide key tiles.
_TMA_TILES_16BIT = {
    64: Tiles(128, 128, 4, 3),  # 128K Hq14 Hkv2: 15.4 ms; (128, 128, 8, 2) 21.7 ms; Flex 16.7
    128: Tiles(128, 64, 8, 2, maxnreg=128, tma_masked=True),  # 32K 6.55 ms; (128, 128, 8, 3) 7.22; Flex 7.52
    256: Tiles(128, 64, 8, 2),  # 32K Hq8 Hkv4: 2.81 ms; (64, 64, 8, 2) 6.19 ms; Flex 5.37
}
# TMA tensor descriptors for the unmasked K/V tiles: within noise of plain loads with the same tiles
# (128K, (128, 128, 8, 3): 67.0 vs 67.0 ms), but they hold no per-element pointers in registers,
# which the register-capped D 128 entry needs. On for Hopper+.
DEFAULT_TMA = True


def _tma_capable(device: torch.device) -> bool:
    if device.type != "cuda":
        return False  # CPU (interpreter): the TMA path only when asked for explicitly
    return torch.cuda.get_device_capability(device)[0] >= 9


def pick_tiles(block_size: int, head_dim: int, dtype: torch.dtype, tma: bool = False, *,
               block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
               num_stages: int | None = None, maxnreg: int | None = None,
               tma_masked: bool | None = None) -> Tiles:
    """The ``Tiles`` for a plan block size, head dim, dtype and load path (``tma``: K/V read through
    tensor descriptors). A fixed table (no autotuning, no host sync): ``_TMA_TILES_16BIT`` for
    16-bit inputs on the TMA path; elsewhere (float32, pre-Hopper, plain loads) the earlier
    defaults, 128×128 tiles (64-wide for float32 or D > 128), 8 warps, 2 stages. Explicit
    arguments override the entry; once any of the four tile arguments is given, the register cap
    and ``tma_masked`` are off unless also given (they were tuned with the entry's tiles).
    ``maxnreg=0`` means no cap. Tiles never exceed the plan block."""
    if tma and dtype != torch.float32:
        base = _TMA_TILES_16BIT[max(head_dim, 64)]  # head dims are powers of two in [16, 256]
    else:
        big = dtype == torch.float32 or head_dim > 128
        base = Tiles(64 if head_dim > 128 else 128, 64 if big else 128, 8, 2)
    if any(x is not None for x in (block_m, block_n, num_warps, num_stages)):
        base = base._replace(maxnreg=None, tma_masked=False)
    t = Tiles(min(block_m or base.block_m, block_size), min(block_n or base.block_n, block_size),
              num_warps or base.num_warps, num_stages or base.num_stages,
              base.maxnreg if maxnreg is None else (maxnreg or None),
              bool(base.tma_masked if tma_masked is None else tma_masked) and tma)
    if block_size % t.block_m or block_size % t.block_n:
        raise ValueError(f"tiles ({t.block_m}, {t.block_n}) must divide the plan block size {block_size}")
    return t


def work_order(kv_counts: torch.Tensor) -> torch.Tensor:
    """int32 permutation of the query blocks, heaviest first (total selected blocks over batch and
    heads, descending; stable). The kernel runs all (batch, head) items of a query block together,
    so GQA heads and neighbouring heads share K/V blocks in L2. Device op, no host sync."""
    weight = kv_counts.sum(dim=(0, 1), dtype=torch.int64)
    return torch.argsort(weight, descending=True, stable=True).to(torch.int32)


def block_sparse_attention(q, k, v, kv_counts, kv_indices, *, block_size: int, q_offset: int, scale: float,
                           return_lse: bool = False, schedule: str = "reversed", order: torch.Tensor | None = None,
                           out: torch.Tensor | None = None, lse_out: torch.Tensor | None = None,
                           use_tma: bool | None = None, **tiles):
    """Launch the kernel. q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D) with unit stride on D; kv_counts
    int32 (B, Hq, nQ), kv_indices int32 (B, Hq, nQ, W). Returns (out like q, lse float32 or None).

    ``schedule``: "sorted" (heaviest work first, from ``work_order``; ``order`` may pass a
    precomputed one) or "reversed" (late query blocks first, no sort). Inputs are assumed valid
    (the executor checks them). ``out``/``lse_out``: optional preallocated outputs (contiguous).
    ``use_tma``: read K/V tiles through TMA tensor descriptors (Hopper+; K/V must be contiguous);
    None picks the default (``DEFAULT_TMA`` on sm90+, off elsewhere). ``tiles``: overrides of
    ``pick_tiles`` (block_m, block_n, num_warps, num_stages, maxnreg, tma_masked).
    """
    interpreter_compat()
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    nQ, W = kv_indices.shape[2], kv_indices.shape[3]
    bs = block_size
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
    use_tma = bool(use_tma) and k.is_contiguous() and v.is_contiguous() and (D * k.element_size()) % 16 == 0
    t = pick_tiles(bs, D, q.dtype, use_tma, **tiles)
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        kd = TensorDescriptor.from_tensor(k.view(B * Hkv * Lk, D), [t.block_n, D])
        vd = TensorDescriptor.from_tensor(v.view(B * Hkv * Lk, D), [t.block_n, D])
    else:
        kd, vd = k, v
    grid = (nQ * B * Hq * (bs // t.block_m),)
    _launch(q, k, v, out, lse, kv_counts, kv_indices, order, kd, vd, None, None, scale, grid,
            (Hq * Lq, Lq), B, Hq, nQ, Lq, Lk, q_offset, bs, t, W, schedule, return_lse, use_tma)
    return out, (lse if return_lse else None)


def _launch(q, k, v, out, lse, kv_counts, kv_indices, order, kd, vd, cu_q, cu_k, scale, grid, lse_strides,
            B, Hq, nQ, Lq, Lk, q_offset, bs, t, W, schedule, return_lse, use_tma):
    """The kernel launch shared by the batched (B, H, L, D) and the packed varlen layouts."""
    varlen = cu_q is not None
    D, Hkv = q.shape[-1], k.shape[1]
    cap = {} if t.maxnreg is None or knobs.runtime.interpret else {"maxnreg": t.maxnreg}
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
        BS=bs, BLOCK_M=t.block_m, BLOCK_N=t.block_n, HEAD_DIM=D, SUB_M=bs // t.block_m, SUB_N=bs // t.block_n,
        W_P2=max(16, triton.next_power_of_2(W)), USE_ORDER=schedule == "sorted", RETURN_LSE=return_lse,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=bool(knobs.runtime.interpret) and q.dtype == torch.bfloat16, USE_TMA=use_tma,
        TMA_MASKED=use_tma and t.tma_masked, VARLEN=varlen, FOLD=scale > 0,
        num_warps=t.num_warps, num_stages=t.num_stages, **cap,
    )


def block_sparse_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, kv_counts, kv_indices, *, block_size: int,
                                  scale: float, return_lse: bool = False, out=None, lse_out=None,
                                  **tiles):
    """Launch the kernel on a packed batch: q (total_q, Hq, D), k/v (total_k, Hkv, D) (unit stride
    on D), int32 cumulative lengths (B + 1,), kv_counts (B, Hq, nQ), kv_indices (B, Hq, nQ, W).
    One launch for every sequence; each program reads its sequence's offsets and lengths from the
    cumulative lengths (no padding, no host sync). Returns (out like q, lse float32 (Hq, total_q)
    or None). K/V are read with plain loads (their rows are Hkv * D apart, not a TMA tile).
    ``tiles``: overrides of ``pick_tiles``."""
    interpreter_compat()
    Tq, Hq, D = q.shape
    B, _, nQ, W = kv_indices.shape
    bs = block_size
    t = pick_tiles(bs, D, q.dtype, False, **tiles)
    out = torch.empty_like(q) if out is None else out
    lse = (torch.empty(Hq, Tq, dtype=torch.float32, device=q.device) if lse_out is None else lse_out) \
        if return_lse else out
    q4, k4, v4, o4 = (t.unsqueeze(0).transpose(1, 2) for t in (q, k, v, out))  # (1, H, T, D) views
    q4, k4, v4, o4 = (t.expand(B, -1, -1, -1) if B else t for t in (q4, k4, v4, o4))  # stride 0 over sequences
    grid = (nQ * B * Hq * (bs // t.block_m),)
    if grid[0]:
        _launch(q4, k4, v4, o4, lse, kv_counts, kv_indices, kv_counts, k4, v4, cu_seqlens_q, cu_seqlens_k, scale,
                grid, (0, Tq), B, Hq, nQ, 0, 0, 0, bs, t, W, "reversed", return_lse, False)
    return out, (lse if return_lse else None)
