"""Triton kernel of the ``qmean_lse`` block ranking (see ``stem_backends.triton.ranking``): one
program per (tile of query blocks, KV head, batch entry), rows = the G query heads x the tile's
block query means; per causal key block one ``tl.dot`` and a row-wise log-sum-exp."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["qmean_lse_kernel"]


@triton.jit
def qmean_lse_kernel(
    QB, K, OUT, TILES, ENDS, qbo, nQ, Lk, scale_log2,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kl, s_ob, s_oh, s_oq,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr, BS: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):
    tile = tl.load(TILES + tl.program_id(0))  # tiles in order of decreasing work
    end = tl.load(ENDS + tl.program_id(0))  # key blocks 0 .. end-1 are causal for some row
    hk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = tl.arange(0, BLOCK_G * BLOCK_Q)
    g = rows // BLOCK_Q
    qi = tile * BLOCK_Q + rows % BLOCK_Q
    row_ok = (g < G) & (qi < nQ)
    h = hk * G + g
    dd = tl.arange(0, BLOCK_D)
    qbar = tl.load(QB + b * s_qb + h[:, None] * s_qh + qi[:, None] * s_qn + dd[None, :],
                   mask=row_ok[:, None] & (dd[None, :] < D), other=0.0)
    qbar = qbar.to(K.dtype.element_ty)  # the dot runs in k's dtype, float32 accumulation
    if UPCAST:  # interpreter only: its bf16 tl.dot is wrong, so multiply the bf16 values in fp32
        qbar = qbar.to(tl.float32)
    a = qbo + qi  # absolute query block of each row
    t = tl.arange(0, BS)
    out_rows = OUT + b * s_ob + h * s_oh + qi * s_oq
    k_base = K + b * s_kb + hk * s_kh
    for j in range(0, end):
        kpos = j * BS + t
        kt = tl.load(k_base + kpos[None, :] * s_kl + dd[:, None],
                     mask=(kpos[None, :] < Lk) & (dd[:, None] < D), other=0.0)  # (BLOCK_D, BS)
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(qbar, kt) * scale_log2  # (rows, BS), float32, base-2 logits
        s = tl.where(kpos[None, :] < Lk, s, float("-inf"))
        m = tl.max(s, 1)
        lse = (m + tl.log2(tl.sum(tl.exp2(s - m[:, None]), 1))) * 0.6931471805599453  # natural log
        tl.store(out_rows + j, lse, mask=row_ok & (j <= a))
