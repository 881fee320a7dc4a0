"""The planner's pooling step in one Triton kernel: the arrays of ``stem.planner.PooledStats``.

The planner needs, per block of ``bs`` tokens, the sum over its ``bs/S``
stride groups of the group's ``S`` rows, as an (S, D) float32 matrix: for queries reversed
within the group (flip on the S axis), for keys as is; and, per key group of ``S`` tokens, the
largest value norm ``max_j ||v_j||_2``. The kernel below reads each row of q, k and v exactly
once and writes only those sums (``nQ*S*D`` and ``nK*S*D`` floats per head) and the group maxima
(``Lk/S`` floats per kv head). The planner then forms the block logits with one small float32
GEMM (nQ x S*D x nK per kv head) and torch ops for the global value-bonus standardisation.
No (L/S)^2 scratch, no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stem.plan import block_geometry

from . import interpreter_compat

__all__ = ["pooled_block_sums", "pooled_block_sums_varlen"]


@triton.jit
def _pool_blocks(
    X, SUM, V, VMAX, SEQ,
    stride_xb, stride_xh, stride_xl,
    stride_vb, stride_vh, stride_vl,
    H, L, front, n_groups_total,
    D, BS: tl.constexpr, S: tl.constexpr, BLOCK_D: tl.constexpr,
    FLIP: tl.constexpr, WITH_V: tl.constexpr, VARLEN: tl.constexpr,
):
    """Program (block j, batch*head): SUM[b, h, j] = sum over the block's stride groups of their
    S rows (S, D) (S axis flipped if FLIP); with WITH_V also VMAX[b, h, group] = max row norm of V.
    Row r of X sits at padded position front + r; positions outside [front, front + L) are zero.
    The bs/S group loads are unrolled (independent 2-D (S, D) tiles in flight)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_s = tl.arange(0, S)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    x_base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    if VARLEN:  # packed: SEQ[b] = (first row, rows, front) of sequence b; strides over b are 0
        start = tl.load(SEQ + 3 * b).to(tl.int64)
        seq_len = tl.load(SEQ + 3 * b + 1)
        seq_front = tl.load(SEQ + 3 * b + 2)
        x_base += start * stride_xl
        v_base += start * stride_vl
    else:
        seq_len = L
        seq_front = front
    acc = tl.zeros([S, BLOCK_D], dtype=tl.float32)
    GPB: tl.constexpr = BS // S
    for g in tl.static_range(GPB):
        r = blk * BS + g * S + offs_s - seq_front  # (S,) rows of X
        ok = ((r >= 0) & (r < seq_len))[:, None] & d_ok[None, :]
        x = tl.load(x_base + r[:, None] * stride_xl + offs_d[None, :], mask=ok, other=0.0)
        acc += x.to(tl.float32)
        if WITH_V:
            vv = tl.load(v_base + r[:, None] * stride_vl + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
            u = tl.max(tl.sqrt(tl.sum(vv * vv, 1)), 0)
            tl.store(VMAX + bh.to(tl.int64) * n_groups_total + blk * GPB + g, u)
    if FLIP:
        s_out = S - 1 - offs_s
    else:
        s_out = offs_s
    out = SUM + (bh.to(tl.int64) * tl.num_programs(0) + blk) * (S * D)
    tl.store(out + s_out[:, None] * D + offs_d[None, :], acc, mask=d_ok[None, :])


def _launch_pool(x, front, n_blocks, bs, stride, flip, v=None):
    B, H, L, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    if v is not None and v.stride(-1) != 1:
        v = v.contiguous()
    block_d = triton.next_power_of_2(D)
    gpb = bs // stride
    sums = torch.empty(B, H, n_blocks, stride, D, dtype=torch.float32, device=x.device)
    n_groups = n_blocks * gpb
    vmax = torch.empty(B, H, n_groups, dtype=torch.float32, device=x.device) if v is not None else sums
    vv = v if v is not None else x
    _pool_blocks[(n_blocks, B * H)](
        x, sums, vv, vmax, sums,
        x.stride(0), x.stride(1), x.stride(2),
        vv.stride(0), vv.stride(1), vv.stride(2),
        H, L, front, n_groups,
        D, BS=bs, S=stride, BLOCK_D=block_d, FLIP=flip, WITH_V=v is not None, VARLEN=False,
        num_warps=4,
    )
    return sums, (vmax if v is not None else None)


def _launch_pool_varlen(x, seq, n_seqs, n_blocks, bs, stride, flip, v=None):
    """Padded per-sequence block sums of a packed x (T, H, D); ``seq`` int32 (B, 3) holds each
    sequence's (first row, rows, front). Blocks past a sequence's end come out 0."""
    T, H, D = x.shape
    gpb = bs // stride
    sums = torch.empty(n_seqs, H, n_blocks, stride, D, dtype=torch.float32, device=x.device)
    n_groups = n_blocks * gpb
    vmax = torch.empty(n_seqs, H, n_groups, dtype=torch.float32, device=x.device) if v is not None else sums
    vv = v if v is not None else x
    if n_blocks * n_seqs * H == 0:
        return sums.zero_(), (vmax.zero_() if v is not None else None)
    _pool_blocks[(n_blocks, n_seqs * H)](
        x, sums, vv, vmax, seq,
        0, x.stride(1), x.stride(0),
        0, vv.stride(1), vv.stride(0),
        H, 0, 0, n_groups,
        D, BS=bs, S=stride, BLOCK_D=triton.next_power_of_2(D), FLIP=flip, WITH_V=v is not None, VARLEN=True,
        num_warps=4,
    )
    return sums, (vmax if v is not None else None)


def pooled_block_sums_varlen(q, k, v, seqs, nQ: int, nK: int, block_size: int, stride: int):
    """Padded (q_sum (B,Hq,nQ,S,D) flipped on S, k_sum (B,Hkv,nK,S,D), vmax (B,Hkv,nK*bs/S)),
    float32, for sequences ``seqs`` = [(q_start, len_q, k_start, len_k)] of a packed batch: two
    launches in all."""
    interpreter_compat()
    bs = block_size
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    rows_q, rows_k = [], []
    for a_q, lq, a_k, lk in seqs:
        off = lk - lq
        rows_q.append((a_q, lq, off - (off // bs) * bs))
        rows_k.append((a_k, lk if lq else 0, 0))  # a sequence without queries needs no statistics
    seq = torch.tensor(rows_q + rows_k, dtype=torch.int32).to(q.device, non_blocking=True)
    B = len(seqs)
    q_sum, _ = _launch_pool_varlen(q, seq[:B], B, nQ, bs, stride, True)
    k_sum, vmax = _launch_pool_varlen(k, seq[B:], B, nK, bs, stride, False, v=v)
    return q_sum, k_sum, vmax


def pooled_block_sums(q, k, v, block_size: int, stride: int, q_offset: int):
    """(q_sum (B,Hq,nQ,S,D) flipped on S, k_sum (B,Hkv,nK,S,D), vmax (B,Hkv,nK*bs/S)), float32."""
    interpreter_compat()
    Lq, Lk = q.shape[2], k.shape[2]
    bs = block_size
    qbo, nQ, nK = block_geometry(Lq, Lk, q_offset, bs)
    q_sum, _ = _launch_pool(q, q_offset - qbo * bs, nQ, bs, stride, True)
    k_sum, vmax = _launch_pool(k, 0, nK, bs, stride, False, v=v)
    return q_sum, k_sum, vmax
