"""FP8 (e4m3) forward block-sparse attention over a stem BlockPlan, for sm89+ GPUs.

Two launches, no host synchronisation:

1. ``quantize_kv``: one program per (key tile of ``BLOCK_N`` tokens, batch x kv head). K is
   smoothed first (the per-channel mean of K over the sequence is subtracted: every score of a
   query row moves by the same ``q . mean``, so the softmax is unchanged; the log-sum-exp is
   corrected in the attention kernel), then scaled by one factor per tile (``amax / 448``) and
   cast to e4m3. V is scaled per (tile, channel) and written transposed, (B, Hkv, D, Lk_pad),
   so that both matrix products read their B operand contiguous along the reduction axis (what
   the sm90 FP8 tensor-core instructions need). Both copies are padded with zeros to a whole
   number of plan blocks, so the attention kernel reads them without bounds checks.
2. ``_stem_sparse_attn_fp8_fwd``: the schedule of ``block_sparse_attn`` (one program per query
   tile, reversed query-block order, the plan's blocks ascending, causal mask on the diagonal).
   The query tile is quantised in the kernel, one scale per row. Scores are
   ``dot(q8, k8^T) * (sq_row * sk_tile)`` in fp32; the probabilities are cast to e4m3 after a
   multiplication by 256 (exact; it keeps small probabilities out of the subnormal range) and
   ``dot(p8, v8)`` is rescaled per channel by ``sv / 256``. Accumulation and the online softmax
   stay in fp32; the output is written in the input dtype.

Under Triton's CPU interpreter (TRITON_INTERPRET=1) float32 -> e4m3 casts are wrong when rounding
carries into the next binade (e.g. 31.9 -> 16, triton 3.6), so there (``EXACT_CAST``) values are
rounded to e4m3 with integer arithmetic first and the cast only changes the storage type.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

from . import interpreter_compat

__all__ = ["E4M3_MAX", "P_SCALE", "fp8_tiles", "quantize_kv", "quantize_rows", "block_sparse_attention_fp8"]

E4M3_MAX = 448.0  # largest finite torch.float8_e4m3fn
P_SCALE = 256.0  # probabilities are cast as p * P_SCALE (a power of two: exact, max 256 < 448)
_LOG2E = 1.4426950408889634


@triton.jit
def _to_e4m3(x, EXACT_CAST: tl.constexpr):
    """Cast float32 ``x`` (|x| <= 448) to e4m3, round to nearest even."""
    if EXACT_CAST:
        ax = tl.abs(x)
        bits = ax.to(tl.int32, bitcast=True)
        # keep 3 mantissa bits, ties to even (normal e4m3 range, |x| >= 2^-6)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576
        normal = bits.to(tl.float32, bitcast=True)
        sub = (ax + 24576.0) - 24576.0  # subnormal range: a multiple of 2^-9 (fp32 ulp of 1.5 * 2^14)
        r = tl.where(ax < 0.015625, sub, normal)
        x = tl.where(x < 0, -r, r)
    return x.to(tl.float8e4nv)


@triton.jit
def _quantize_kv_kernel(K, V, KMEAN, VMAX, K8, VT8, KS, VS,
                        stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                        HKV, Lk, LKP, NT,
                        BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, EXACT_CAST: tl.constexpr,
                        V_PER_CHANNEL: tl.constexpr, PERMUTE32: tl.constexpr):
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = (offs_n < Lk)[:, None]
    bh64 = bh.to(tl.int64)
    k = tl.load(K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + offs_n[:, None] * stride_kn
                + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    mean = tl.load(KMEAN + bh64 * HEAD_DIM + offs_d)
    k = tl.where(ok, k - mean[None, :], 0.0)
    amax = tl.max(tl.max(tl.abs(k), 1), 0)
    sk = tl.where(amax > 0, amax / 448.0, 1.0)
    k8 = _to_e4m3(k * (1.0 / sk), EXACT_CAST)
    tl.store(K8 + bh64 * LKP * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :], k8)
    tl.store(KS + bh64 * NT + t, sk)

    v = tl.load(V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vn
                + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    if V_PER_CHANNEL:  # one scale per channel over the whole sequence
        vmax = tl.load(VMAX + bh64 * HEAD_DIM + offs_d)
    else:  # per tile and channel
        vmax = tl.max(tl.abs(v), 0)
    sv = tl.where(vmax > 0, vmax / 448.0, 1.0)
    v8 = _to_e4m3(v * (1.0 / sv)[None, :], EXACT_CAST)
    col = offs_n
    if PERMUTE32:  # key 8 j + 2 c + e of a 32-key group goes to column 16 (j // 2) + 4 c + 2 (j % 2) + e
        o = offs_n % 32
        j = o // 8
        col = offs_n - o + (j // 2) * 16 + ((o % 8) // 2) * 4 + (j % 2) * 2 + o % 2
    tl.store(VT8 + bh64 * HEAD_DIM * LKP + offs_d[None, :] * LKP + col[:, None], v8)  # transposed
    if not V_PER_CHANNEL:
        tl.store(VS + (bh64 * NT + t) * HEAD_DIM + offs_d, sv * (1.0 / 256.0))  # P_SCALE folded in


def quantize_kv(k: torch.Tensor, v: torch.Tensor, block_n: int, pad_to: int, smooth_k: bool = True, *,
                v_per_channel: bool = False, permute32: bool = False):
    """e4m3 copies of k, v (B, Hkv, Lk, D; unit stride on D) with their scales.

    Returns ``(k8, vt8, k_scale, v_scale, k_mean)``: k8 (B, Hkv, Lp, D) float8_e4m3fn, vt8
    (B, Hkv, D, Lp) float8_e4m3fn (V transposed), Lp = Lk rounded up to ``pad_to`` (a multiple of
    ``block_n``; the padding is zeros); k_scale float32 (B, Hkv, Lp // block_n), one per key tile;
    v_scale float32 (B, Hkv, Lp // block_n, D), one per key tile and channel, divided by
    ``P_SCALE``; k_mean float32 (B, Hkv, D), the mean subtracted from K (zeros without
    ``smooth_k``). Dequantised: ``k ~ k8 * k_scale + k_mean``, ``v ~ vt8^T * v_scale * P_SCALE``.

    ``v_per_channel``: one V scale per channel over the whole sequence instead, v_scale (B, Hkv, D)
    (still divided by ``P_SCALE``), so that a kernel applies it once, to its output. ``permute32``:
    within every 32 keys, vt8 holds key ``8 j + 2 c + e`` (j < 4, c < 4, e < 2) in column
    ``16 (j // 2) + 4 c + 2 (j % 2) + e``: the key order of the Hub kernel's FP8 probability
    fragments (hub_kernels/stem-attention/csrc/block_sparse_attn_sm90.cuh).
    """
    interpreter_compat()
    B, H, Lk, D = k.shape
    Lp = -(-Lk // pad_to) * pad_to
    nt = Lp // block_n
    dev = k.device
    k8 = torch.empty(B, H, Lp, D, dtype=torch.float8_e4m3fn, device=dev)
    vt8 = torch.empty(B, H, D, Lp, dtype=torch.float8_e4m3fn, device=dev)
    ks = torch.empty(B, H, nt, dtype=torch.float32, device=dev)
    if smooth_k and Lk:
        kmean = k.mean(dim=2, dtype=torch.float32).contiguous()
    else:
        kmean = torch.zeros(B, H, D, dtype=torch.float32, device=dev)
    if v_per_channel:
        vmax = (v.abs().amax(dim=2).float() if Lk else torch.zeros(B, H, D, device=dev)).contiguous()
        # the kernel's own formula, so that the scale it divides by is the one returned
        vs = (torch.where(vmax > 0, vmax / E4M3_MAX, torch.ones_like(vmax)) / P_SCALE).contiguous()
    else:
        vmax = kmean  # unused
        vs = torch.empty(B, H, nt, D, dtype=torch.float32, device=dev)
    if B * H * nt:
        _quantize_kv_kernel[(nt, B * H)](
            k, v, kmean, vmax, k8, vt8, ks, vs,
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            H, Lk, Lp, nt, BLOCK_N=block_n, HEAD_DIM=D, EXACT_CAST=bool(knobs.runtime.interpret),
            V_PER_CHANNEL=v_per_channel, PERMUTE32=permute32, num_warps=8,
        )
    return k8, vt8, ks, vs, kmean


@triton.jit
def _quantize_rows_kernel(X, X8, XS, stride_b, stride_h, stride_l, H, L,
                          BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, EXACT_CAST: tl.constexpr):
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = t * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = rows < L
    x = tl.load(X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h + rows[:, None].to(tl.int64) * stride_l
                + offs_d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    xmax = tl.max(tl.abs(x), 1)
    sx = tl.where(xmax > 0, xmax / 448.0, 1.0)
    x8 = _to_e4m3(x * (1.0 / sx)[:, None], EXACT_CAST)
    base = bh.to(tl.int64) * L
    tl.store(X8 + (base + rows[:, None]) * HEAD_DIM + offs_d[None, :], x8, mask=ok[:, None])
    tl.store(XS + base + rows, sx, mask=ok)


def quantize_rows(x: torch.Tensor):
    """e4m3 copy of x (B, H, L, D; unit stride on D) with one scale per row: returns (x8 (B, H, L, D)
    float8_e4m3fn, contiguous; scale float32 (B, H, L)), ``x ~ x8 * scale`` (row max maps to 448)."""
    interpreter_compat()
    B, H, L, D = x.shape
    x8 = torch.empty(B, H, L, D, dtype=torch.float8_e4m3fn, device=x.device)
    xs = torch.empty(B, H, L, dtype=torch.float32, device=x.device)
    block = 64
    if B * H * L:
        _quantize_rows_kernel[(triton.cdiv(L, block), B * H)](
            x, x8, xs, x.stride(0), x.stride(1), x.stride(2), H, L, BLOCK=block, HEAD_DIM=D,
            EXACT_CAST=bool(knobs.runtime.interpret), num_warps=4,
        )
    return x8, xs


@triton.jit
def _fp8_tile(acc, l_i, m_i, sv_acc, q8, rq, k8_base, vt8_base, KD, VD, kv_row0, KS_base, VS_base, ks, qpos, LKP,
              offs_n, offs_d, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
              EXACT_CAST: tl.constexpr, USE_TMA: tl.constexpr):
    """Key tile [ks, ks + BLOCK_N) folded into (acc, l_i, m_i, sv_acc); m_i in log2 units of scaled
    scores. acc is kept in units of the latest tile's V scales ``sv_acc`` (per channel: the true
    accumulator is acc * sv_acc), so that the tensor-core product accumulates into it in place.
    With USE_TMA the e4m3 tiles are read through tensor descriptors (no per-element pointers in
    registers): K8 as (B*Hkv*Lp, D) rows kv_row0 + ks, VT8 as (B*Hkv*D, Lp)."""
    kpos = ks + offs_n
    if USE_TMA:
        kT = tl.trans(KD.load([kv_row0 + ks, 0]))
    else:
        kT = tl.load(k8_base + kpos[None, :] * HEAD_DIM + offs_d[:, None])  # (D, BLOCK_N), D contiguous
    qk = tl.dot(q8, kT)
    tile = ks // BLOCK_N
    r = rq * tl.load(KS_base + tile)  # per row: q scale * k scale * softmax scale * log2(e), > 0
    if MASKED:
        qk = tl.where(kpos[None, :] <= qpos[:, None], qk, float("-inf"))
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * r)
    p = tl.math.exp2(qk * r[:, None] - m_ij[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    if USE_TMA:
        vT = VD.load([(kv_row0 // LKP) * HEAD_DIM, ks])
    else:
        vT = tl.load(vt8_base + offs_d[:, None] * LKP + kpos[None, :])  # (D, BLOCK_N), keys contiguous
    sv = tl.load(VS_base + tile * HEAD_DIM + offs_d)
    acc = acc * (alpha[:, None] * (sv_acc / sv)[None, :])
    acc = tl.dot(_to_e4m3(p * 256.0, EXACT_CAST), tl.trans(vT), acc)
    return acc, l_i, m_ij, sv


@triton.jit
def _stem_sparse_attn_fp8_fwd(
    Q, K8, VT8, KD, VD, KS, VS, KMEAN, O, LSE, COUNTS, INDICES,
    qk_scale,
    stride_qb, stride_qh, stride_qm,
    stride_ob, stride_oh, stride_om,
    stride_cb, stride_ch, stride_ci,
    stride_ib, stride_ih, stride_ii,
    B, HQ, HKV, NQ, NT, Lq, LKP, q_offset, q_block_offset, GROUP,
    BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    SUB_M: tl.constexpr, SUB_N: tl.constexpr, W_P2: tl.constexpr, RETURN_LSE: tl.constexpr,
    EXACT_CAST: tl.constexpr, USE_TMA: tl.constexpr,
):
    pid = tl.program_id(0)
    item = pid // SUB_M
    sm = pid % SUB_M
    per_block = B * HQ
    i = NQ - 1 - item // per_block  # late query blocks first
    bh = item % per_block
    h = bh % HQ
    b = bh // HQ
    hk = h // GROUP
    b64 = b.to(tl.int64)
    kvh = (b * HKV + hk).to(tl.int64)

    ia = q_block_offset + i
    qs = ia * BS + sm * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qpos = qs + offs_m
    rows = qpos - q_offset
    row_ok = (rows >= 0) & (rows < Lq)

    q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh
    q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    q = q.to(tl.float32)
    qmax = tl.max(tl.abs(q), 1)
    sq = tl.where(qmax > 0, qmax / 448.0, 1.0)  # one scale per query row
    q8 = _to_e4m3(q * (1.0 / sq)[:, None], EXACT_CAST)
    rq = sq * qk_scale
    if RETURN_LSE:  # the scores are computed against K minus its mean: q . mean (log2 units) goes back into the lse
        shift = tl.sum(q * tl.load(KMEAN + kvh * HEAD_DIM + offs_d)[None, :], 1) * qk_scale

    kv_row0 = (b * HKV + hk) * LKP  # first row of this kv head in the (B*Hkv*Lp, D) view of K8
    k8_base = K8 + kvh * LKP * HEAD_DIM
    vt8_base = VT8 + kvh * HEAD_DIM * LKP
    KS_base = KS + kvh * NT
    VS_base = VS + kvh * NT * HEAD_DIM

    n = tl.load(COUNTS + b64 * stride_cb + h * stride_ch + i * stride_ci)
    idx_base = INDICES + b64 * stride_ib + h.to(tl.int64) * stride_ih + i.to(tl.int64) * stride_ii
    offs_w = tl.arange(0, W_P2)
    sel = tl.load(idx_base + offs_w, mask=offs_w < n, other=0x7FFFFFFF)
    n_full = tl.sum((sel < ia).to(tl.int32), 0)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    sv_acc = tl.full([HEAD_DIM], 1.0, dtype=tl.float32)
    for t in range(0, n_full * SUB_N):
        ks = tl.load(idx_base + t // SUB_N) * BS + (t % SUB_N) * BLOCK_N
        acc, l_i, m_i, sv_acc = _fp8_tile(acc, l_i, m_i, sv_acc, q8, rq, k8_base, vt8_base, KD, VD, kv_row0,
                                          KS_base, VS_base, ks, qpos, LKP, offs_n, offs_d, BLOCK_N, HEAD_DIM,
                                          False, EXACT_CAST, USE_TMA)
    for t in range(n_full * SUB_N, n * SUB_N):
        ks = tl.load(idx_base + t // SUB_N) * BS + (t % SUB_N) * BLOCK_N
        acc, l_i, m_i, sv_acc = _fp8_tile(acc, l_i, m_i, sv_acc, q8, rq, k8_base, vt8_base, KD, VD, kv_row0,
                                          KS_base, VS_base, ks, qpos, LKP, offs_n, offs_d, BLOCK_N, HEAD_DIM,
                                          True, EXACT_CAST, USE_TMA)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc * sv_acc[None, :] / l_safe[:, None]
    o_base = O + b64 * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + rows[:, None] * stride_om + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])
    if RETURN_LSE:
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe) + shift) * 0.6931471805599453)
        tl.store(LSE + (b64 * HQ + h) * Lq + rows, lse, mask=row_ok)


def fp8_tiles(block_size: int, head_dim: int, *, block_m: int | None = None, block_n: int | None = None,
              num_warps: int | None = None, num_stages: int | None = None) -> tuple[int, int, int, int]:
    """(block_m, block_n, num_warps, num_stages) of the FP8 kernel: 64x128 tiles, 4 warps (one
    warpgroup), 3 stages, the fastest of four timed on an H200 at D 128 (128x128 with 8 warps
    spills and ran 2.2x slower: benchmarks/NOTES.md); 64x64, 8 warps, 2 stages for D 256 (the
    fewest ptxas spills among those compiled for sm90: python -m benchmarks.triton.fp8_compile;
    not timed). Tiles never exceed the plan block; key tiles are at least 32 wide (the
    reduction of one FP8 tensor-core product). Explicit arguments override (query tiles under 64
    rows get no FP8 tensor-core instruction on sm90: the interpreter tests use them to stay small)."""
    big = head_dim > 128
    bm = min(block_m or 64, block_size)
    bn = min(block_n or (64 if big else 128), block_size)
    if block_size % bm or block_size % bn or bn < 32:
        raise ValueError(f"tiles ({bm}, {bn}) must divide the plan block size {block_size} (key tiles >= 32)")
    return bm, bn, num_warps or (8 if big else 4), num_stages or (2 if big else 3)


def block_sparse_attention_fp8(q, k, v, kv_counts, kv_indices, *, block_size: int, q_offset: int, scale: float,
                               return_lse: bool = False, out=None, lse_out=None, smooth_k: bool = True,
                               use_tma: bool | None = None, **tiles):
    """FP8 launch. q (B, Hq, Lq, D) and k/v (B, Hkv, Lk, D) float16/bfloat16 with unit stride on D;
    kv_counts int32 (B, Hq, nQ), kv_indices int32 (B, Hq, nQ, W); ``scale`` > 0. Returns (out like
    q, lse float32 (B, Hq, Lq) or None). Inputs are assumed valid (the executor checks them).
    ``use_tma``: read the e4m3 K/V tiles through TMA tensor descriptors (default: on sm90+, off
    elsewhere; per-element pointers would cost the registers of a whole tile per thread).
    ``tiles``: block_m, block_n, num_warps, num_stages (see ``fp8_tiles``)."""
    interpreter_compat()
    if not scale > 0:
        raise ValueError(f"the FP8 kernel needs a softmax scale > 0, got {scale}")
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    nQ, W = kv_indices.shape[2], kv_indices.shape[3]
    bs = block_size
    bm, bn, warps, stages = fp8_tiles(bs, D, **tiles)
    k8, vt8, ks, vs, kmean = quantize_kv(k, v, bn, bs, smooth_k)
    if use_tma is None:
        use_tma = q.device.type == "cuda" and torch.cuda.get_device_capability(q.device)[0] >= 9
    Lp = k8.shape[2]
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        kd = TensorDescriptor.from_tensor(k8.view(B * Hkv * Lp, D), [bn, D])
        vd = TensorDescriptor.from_tensor(vt8.view(B * Hkv * D, Lp), [D, bn])
    else:
        kd, vd = k8, vt8
    out = torch.empty_like(q) if out is None else out
    lse = (torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device) if lse_out is None else lse_out) \
        if return_lse else out
    grid = (nQ * B * Hq * (bs // bm),)
    if grid[0]:
        _stem_sparse_attn_fp8_fwd[grid](
            q, k8, vt8, kd, vd, ks, vs, kmean, out, lse, kv_counts, kv_indices,
            float(scale) * _LOG2E,
            q.stride(0), q.stride(1), q.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            kv_counts.stride(0), kv_counts.stride(1), kv_counts.stride(2),
            kv_indices.stride(0), kv_indices.stride(1), kv_indices.stride(2),
            B, Hq, Hkv, nQ, ks.shape[2], Lq, Lp, q_offset, q_offset // bs, Hq // Hkv,
            BS=bs, BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=D, SUB_M=bs // bm, SUB_N=bs // bn,
            W_P2=max(16, triton.next_power_of_2(W)), RETURN_LSE=return_lse,
            EXACT_CAST=bool(knobs.runtime.interpret), USE_TMA=bool(use_tma), num_warps=warps, num_stages=stages,
        )
    return out, (lse if return_lse else None)
