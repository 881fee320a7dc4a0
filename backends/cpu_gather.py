"""Block-gathered CPU executor: the selected key blocks of a group of query blocks are gathered into
contiguous tensors and run through torch's fused CPU attention kernel.

Per group of ``T`` consecutive query blocks (about 256 query rows per call), for every (batch,
query head, query block) the selected key and value blocks are copied side by side (one
``index_select`` each, padded to the widest row of the group), and the group is folded into the
batch dimension of ``aten._scaled_dot_product_flash_attention_for_cpu`` with an additive mask that
removes padding slots, keys past the end and keys after each query. The work is the plan's
selected blocks plus that padding, so at density rho the time approaches rho x dense SDPA (see
benchmarks/NOTES.md for measurements). Output and log-sum-exp match the reference executor up
to floating-point summation order; a query row that sees no key (only in hand-made plans with
an empty or non-diagonal row) gets output 0 and log-sum-exp -inf, as in every executor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stem.dispatch import Executor

__all__ = ["CPUGatherExecutor", "gather_attention"]

_ROWS_PER_CALL = 256  # query rows per fused call: amortises the per-call overhead at small blocks
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _fused(q, k, v, mask, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                      scale=scale)


def _off_diagonal(qg, sel, base, kb, vb, Lk: int, scale: float):
    """Attention of the rows ``qg`` (N, g, bs, D) over the blocks ``sel`` (N, g, nK) bool of each of
    their g heads (all before the diagonal): the union of the g sets is gathered once per item
    from ``kb``/``vb`` (blocks ``base[n] + j``) and a per-head bias drops what a head did not
    select and keys past ``Lk``. Returns out (N, g, bs, D) and lse (N, g, bs), -inf for a head
    that selected nothing."""
    N, g, bs, D = qg.shape
    union = sel.any(1)  # (N, nK)
    n_union = int(union.sum(-1).max())
    order = torch.sort(union.to(torch.int8), dim=-1, descending=True, stable=True).indices
    uidx = order[:, :n_union]  # union members first, ascending
    flat = (base[:, None] + uidx).reshape(-1)
    kg = kb.index_select(0, flat).view(N, 1, n_union * bs, D)
    vg = vb.index_select(0, flat).view(N, 1, n_union * bs, D)
    mine = sel.gather(-1, uidx[:, None].expand(-1, g, -1)) & union.gather(-1, uidx)[:, None]  # (N, g, U)
    kpos = uidx[..., None] * bs + torch.arange(bs, device=qg.device)  # (N, U, bs)
    keep = mine[..., None] & (kpos < Lk)[:, None]  # (N, g, U, bs)
    bias = torch.zeros(N, g, 1, n_union * bs, dtype=qg.dtype, device=qg.device)
    bias.masked_fill_(~keep.view(N, g, 1, n_union * bs), float("-inf"))
    o, l = _fused(qg, kg, vg, bias, scale)
    return o, l.masked_fill_(~mine.any(-1)[..., None], float("-inf"))


def gather_attention(q, k, v, plan, scale: float, return_lse: bool = False, rows_per_call: int = _ROWS_PER_CALL):
    """out (B, Hq, Lq, D) in q.dtype and, if asked, lse (B, Hq, Lq), float32 (float64 for float64
    inputs), natural log. CPU tensors; see the module docstring."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    bs = plan.block_size
    off, qbo = plan.q_offset, plan.q_block_offset
    nQ, nK = plan.num_q_blocks, plan.num_kv_blocks
    dev, dt = q.device, q.dtype
    acc = torch.float64 if dt == torch.float64 else torch.float32
    neg_inf = float("-inf")
    kp = F.pad(k, (0, 0, 0, nK * bs - Lk))  # (B, Hkv, nK * bs, D)
    vp = F.pad(v, (0, 0, 0, nK * bs - Lk))
    kb, vb = kp.reshape(B * Hkv * nK, bs, D), vp.reshape(B * Hkv * nK, bs, D)
    front = off - qbo * bs
    # Query rows padded to whole blocks, as (B, Hkv, nQ, G, bs, D): the G query heads of a KV head
    # side by side, so that one gathered copy of a KV block can serve all of them.
    qp = F.pad(q, (0, 0, front, nQ * bs - front - Lq)).view(B, Hkv, G, nQ, bs, D).transpose(2, 3)
    base_kv = (torch.arange(B, device=dev)[:, None] * Hkv + torch.arange(Hkv, device=dev)[None, :]) * nK
    counts = plan.kv_counts.long().view(B, Hkv, G, nQ).transpose(2, 3)  # (B, Hkv, nQ, G)
    indices = plan.kv_indices.long().view(B, Hkv, G, nQ, -1).transpose(2, 3)  # (B, Hkv, nQ, G, W)
    out = torch.empty(B, Hkv, nQ, G, bs, D, dtype=dt, device=dev)
    lse = torch.empty(B, Hkv, nQ, G, bs, dtype=acc, device=dev)
    T = max(1, rows_per_call // (bs * G))
    copy_cost = 32 / bs  # gathering a block costs about this many (bs x bs) score tiles (measured on CPU)
    ar = torch.arange(bs, device=dev)
    tri = torch.zeros(bs, bs, dtype=dt, device=dev).masked_fill_(ar[None, :] > ar[:, None], neg_inf)
    cols = torch.arange(nK + 1, device=dev)
    for i0 in range(0, nQ, T):
        i1 = min(nQ, i0 + T)
        t = i1 - i0
        N = B * Hkv * t
        diag = qbo + i0 + torch.arange(t, device=dev)  # (t,) absolute query blocks
        cnt = counts[:, :, i0:i1]  # (B, Hkv, t, G)
        idx = indices[:, :, i0:i1]
        idx = torch.where(torch.arange(idx.shape[-1], device=dev) < cnt[..., None], idx, nK)
        # sel[..., j]: the head keeps block j (column nK collects the padding slots)
        sel = torch.zeros(B, Hkv, t, G, nK + 1, dtype=torch.bool, device=dev).scatter_(-1, idx, True)
        has_diag = sel.gather(-1, diag.view(1, 1, t, 1, 1).expand(B, Hkv, t, G, 1)).view(N, G, 1)
        sel = sel & (cols < diag.view(1, 1, t, 1, 1))  # blocks before the diagonal only
        sel = sel[..., :nK]
        qg = qp[:, :, i0:i1].reshape(N, G, bs, D)
        parts = []
        n_each = int(sel.sum(-1).max())
        if n_each:
            # One gathered copy per KV head (union of its G heads' blocks) or one per query head,
            # whichever costs less: the union is close to one head's set when heads agree.
            n_union = int(sel.any(3).sum(-1).max())
            base = base_kv[:, :, None].expand(B, Hkv, t).reshape(N)
            if G > 1 and n_union * (G + copy_cost) > n_each * G * (1 + copy_cost):
                o1, l1 = _off_diagonal(qg.reshape(N * G, 1, bs, D), sel.reshape(N * G, 1, nK),
                                       base.repeat_interleave(G), kb, vb, Lk, scale)
            else:
                o1, l1 = _off_diagonal(qg, sel.view(N, G, nK), base, kb, vb, Lk, scale)
            parts.append((o1.view(N, G, bs, D), l1.to(acc).view(N, G, bs)))
        # The diagonal block, with the token-level causal mask (and keys past the end).
        k0, k1 = (qbo + i0) * bs, (qbo + i1) * bs
        kd = kp[:, :, k0:k1].reshape(N, 1, bs, D)
        vd = vp[:, :, k0:k1].reshape(N, 1, bs, D)
        dmask = tri.expand(t, bs, bs)
        if k1 > Lk:
            dmask = dmask.masked_fill((diag[:, None] * bs + ar >= Lk)[:, None, :], neg_inf)
        dmask = dmask[None, :, None].expand(B * Hkv, t, 1, bs, bs).reshape(N, 1, bs, bs)
        o2, l2 = _fused(qg, kd, vd, dmask, scale)
        parts.append((o2, l2.to(acc).masked_fill_(~has_diag, neg_inf)))
        # Merge the partial softmaxes by their log-sum-exp; rows that see no key get 0 and -inf.
        m = parts[0][1] if len(parts) == 1 else torch.maximum(parts[0][1], parts[1][1])
        m = torch.where(m == neg_inf, 0.0, m)
        tot = torch.zeros_like(m)
        o = torch.zeros(N, G, bs, D, dtype=acc, device=dev)
        for op, lp in parts:
            e = torch.exp(lp - m)
            tot += e
            o += op.to(acc) * e[..., None]
        o /= torch.where(tot == 0, 1.0, tot)[..., None]
        out[:, :, i0:i1] = o.view(B, Hkv, t, G, bs, D).to(dt)
        lse[:, :, i0:i1] = (m + torch.log(tot)).view(B, Hkv, t, G, bs)
    out = out.transpose(2, 3).reshape(B, Hq, nQ * bs, D)[:, :, front:front + Lq]
    return out, (lse.transpose(2, 3).reshape(B, Hq, nQ * bs)[:, :, front:front + Lq] if return_lse else None)


class CPUGatherExecutor(Executor):
    name = "cpu_gather"
    priority = 10  # above the reference executor on CPU; CUDA executors are not affected (CPU only)
    device_types = ("cpu",)
    description = "gathers each query block's selected key blocks and runs torch's fused CPU attention kernel"
    returns_lse = True

    def supports(self, key):
        if key.dtype not in _DTYPES:
            return f"dtype {key.dtype} is not supported (use float32, float64, bfloat16 or float16)"
        return None

    def forward(self, q, k, v, plan, scale, return_lse):
        return gather_attention(q.contiguous(), k, v, plan, scale, return_lse)
