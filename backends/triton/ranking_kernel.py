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


@triton.jit
def _sampled_scores(qs, k_base, j, t, dd, pos, Lk, s_kl, scale_log2, BS: tl.constexpr, D: tl.constexpr,
                    UPCAST: tl.constexpr):
    """log2-domain scores of the sampled rows against key block j, -inf where not causal or past Lk."""
    kpos = j * BS + t
    kt = tl.load(k_base + kpos[None, :] * s_kl + dd[:, None], mask=(kpos[None, :] < Lk) & (dd[:, None] < D),
                 other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
    s = tl.dot(qs, kt) * scale_log2
    return tl.where((kpos[None, :] <= pos[:, None]) & (kpos[None, :] < Lk), s, float("-inf"))


@triton.jit
def _fold_block(s, c, m_i, l_i):
    """Online softmax over one key block of scores ``s * c`` (log2 units): the new running max,
    the new running sum, and the block's own sum under the new max."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * c)
    bsum = tl.sum(tl.exp2(s * c - m_new[:, None]), 1)
    return m_new, l_i * tl.exp2(m_i - m_new) + bsum, bsum


@triton.jit
def sampled_mass_kernel(
    Q, K, ROWS, OUT, LSE, TILES, ENDS, TOFF, q_offset, qbo, nQ, Lk, scale_log2, bhk0, Hkv, lse_per_head,
    s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_ob, s_oh, s_oq,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr, N: tl.constexpr, BS: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, ONE_PASS: tl.constexpr, JB: tl.constexpr,
):
    # rows of the program: (query head g, query block qi, sampled row m), m fastest
    R: tl.constexpr = BLOCK_G * BLOCK_Q * N
    tile = tl.load(TILES + tl.program_id(0))
    end = tl.load(ENDS + tl.program_id(0))
    bhk = bhk0 + tl.program_id(1)  # (batch entry, kv head) of this launch's chunk
    hk = bhk % Hkv
    b = (bhk // Hkv).to(tl.int64)
    r = tl.arange(0, R)
    g = r // (BLOCK_Q * N)
    qi = tile * BLOCK_Q + (r // N) % BLOCK_Q
    ok = (g < G) & (qi < nQ)
    h = hk * G + g
    qrow = tl.load(ROWS + qi * N + r % N, mask=ok, other=0)
    pos = qrow + q_offset  # absolute position of the sampled row
    dd = tl.arange(0, BLOCK_D)
    qs = tl.load(Q + b * s_qb + h[:, None] * s_qh + qrow[:, None] * s_ql + dd[None, :],
                 mask=ok[:, None] & (dd[None, :] < D), other=0.0)
    if UPCAST:
        qs = qs.to(tl.float32)
    t = tl.arange(0, BS)
    k_base = K + b * s_kb + hk * s_kh
    # ONE_PASS scratch of this program: (end, R) float32, the log2 mass of each key block per row
    lse_base = LSE + tl.program_id(1).to(tl.int64) * lse_per_head + tl.load(TOFF + tl.program_id(0))
    m_i = tl.full([R], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([R], dtype=tl.float32)
    # key blocks before the tile's first query block are whole and causal for every row: no masks
    # (one FMA per score inside exp2, the scale applied to the row max instead of every score)
    full = tl.minimum(qbo + tile * BLOCK_Q, end)
    for j in range(0, full):
        kpos = j * BS + t
        if BLOCK_D == D:
            kt = tl.load(k_base + kpos[None, :] * s_kl + dd[:, None])
        else:
            kt = tl.load(k_base + kpos[None, :] * s_kl + dd[:, None], mask=dd[:, None] < D, other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        m_i, l_i, bsum = _fold_block(tl.dot(qs, kt), scale_log2, m_i, l_i)
        if ONE_PASS:  # log2 of block j's unnormalised mass
            tl.store(lse_base + j * R + r, m_i + tl.log2(bsum))
    for j in range(full, end):  # the tile's own query blocks: token causal mask and the Lk bound
        s = _sampled_scores(qs, k_base, j, t, dd, pos, Lk, s_kl, scale_log2, BS, D, UPCAST)  # already scaled
        m_i, l_i, bsum = _fold_block(s, 1.0, m_i, l_i)
        if ONE_PASS:  # -inf where no key of block j is causal for the row
            tl.store(lse_base + j * R + r, m_i + tl.log2(bsum))
    # per (head, query block): its output row offset, absolute block and validity (its N rows agree)
    off = tl.max(tl.reshape(b * s_ob + h * s_oh + qi * s_oq, (BLOCK_G * BLOCK_Q, N)), 1)
    a_q = tl.max(tl.reshape(qbo + qi, (BLOCK_G * BLOCK_Q, N)), 1)
    ok_q = tl.max(tl.reshape(ok.to(tl.int32), (BLOCK_G * BLOCK_Q, N)), 1) > 0
    if ONE_PASS:  # mass = exp2(block log2 mass - row log2 normaliser), mean over the N rows
        lse_row = m_i + tl.log2(l_i)
        jj = tl.arange(0, JB)
        for j0 in range(0, end, JB):
            jb = j0 + jj
            x = tl.load(lse_base + jb[:, None] * R + r[None, :], mask=jb[:, None] < end, other=float("-inf"))
            mass = tl.exp2(x - lse_row[None, :])
            mean = tl.sum(tl.reshape(mass, (JB, BLOCK_G * BLOCK_Q, N)), 2) / N
            tl.store(OUT + off[None, :] + jb[:, None], mean, mask=ok_q[None, :] & (jb[:, None] <= a_q[None, :]))
    else:
        for j in range(0, end):  # second pass: mass per key block, mean over the N sampled rows
            s = _sampled_scores(qs, k_base, j, t, dd, pos, Lk, s_kl, scale_log2, BS, D, UPCAST)
            mass = tl.sum(tl.exp2(s - m_i[:, None]), 1) / l_i
            mean = tl.sum(tl.reshape(mass, (BLOCK_G * BLOCK_Q, N)), 1) / N
            tl.store(OUT + off + j, mean, mask=ok_q & (j <= a_q))
