"""The exact reference executor: softmax attention over the selected blocks, tiled per query block.

Memory stays O(B * Hq * block * W * block) <= O(B * Hq * block * Lk) per step, never O(Lq * Lk).
float32 accumulation (float64 for float64 inputs). Runs on any device; it is the CPU default and
the oracle for the fast executors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stem.dispatch import Executor

__all__ = ["ReferenceExecutor", "reference_attention", "run_varlen_per_sequence"]


def reference_attention(q, k, v, plan, scale: float, return_lse: bool = False):
    """out (B, Hq, Lq, D) in q.dtype and, if asked, lse float32/float64 (B, Hq, Lq).

    For each query block, gathers only its selected key blocks (so the work scales with the
    plan's density) and runs a plain masked softmax over them. A query block with no selected
    block (``kv_counts == 0``) gets output 0 and log-sum-exp -inf.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    bs = plan.block_size
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    off, qbo = plan.q_offset, plan.q_block_offset
    nK = plan.num_kv_blocks
    dev = q.device
    pad = nK * bs - Lk
    kb = F.pad(k, (0, 0, 0, pad)).view(B, Hkv, nK, bs, D)
    vb = F.pad(v, (0, 0, 0, pad)).view(B, Hkv, nK, bs, D)
    bi = torch.arange(B, device=dev)[:, None, None]
    hi = (torch.arange(Hq, device=dev) // G)[None, :, None]
    slots = torch.arange(plan.kv_indices.shape[-1], device=dev)
    out = torch.empty(B, Hq, Lq, D, dtype=q.dtype, device=dev)
    lse = torch.empty(B, Hq, Lq, dtype=acc, device=dev) if return_lse else None
    for i in range(plan.num_q_blocks):
        a0 = (qbo + i) * bs  # absolute start of this block
        r0, r1 = max(a0, off) - off, min(a0 + bs, off + Lq) - off  # its query rows
        w = min(slots.numel(), qbo + i + 1)  # a row never holds more than its causal blocks
        valid = slots[:w] < plan.kv_counts[:, :, i, None]  # (B, Hq, w)
        idx = torch.where(valid, plan.kv_indices[:, :, i, :w].long(), 0)  # padding may hold anything
        kg = kb[bi, hi, idx].to(acc).flatten(2, 3)  # (B, Hq, w*bs, D): only the selected blocks
        vg = vb[bi, hi, idx].to(acc).flatten(2, 3)
        s = torch.matmul(q[:, :, r0:r1].to(acc), kg.transpose(-1, -2)).mul_(scale)  # (B, Hq, rows, w*bs)
        kpos = (idx[..., None] * bs + torch.arange(bs, device=dev)).flatten(2)  # (B, Hq, w*bs)
        kvalid = (valid[..., None].expand(-1, -1, -1, bs).flatten(2)) & (kpos < Lk)
        qpos = torch.arange(r0, r1, device=dev) + off
        allowed = kvalid[:, :, None, :] & (kpos[:, :, None, :] <= qpos[None, None, :, None])
        s.masked_fill_(~allowed, float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(m == float("-inf"), 0.0, m)  # a row with no kept block: no key at all
        p = s.sub_(m).exp_()
        l = p.sum(-1, keepdim=True)
        o = torch.matmul(p, vg).div_(torch.where(l == 0, 1.0, l))  # such a row's output is 0 ...
        out[:, :, r0:r1] = o.to(q.dtype)
        if lse is not None:  # ... and its log-sum-exp -inf, as in the CUDA executors
            lse[:, :, r0:r1] = (m + torch.log(l)).squeeze(-1)
    return out, lse


def run_varlen_per_sequence(forward, q, k, v, plan, scale: float, return_lse: bool):
    """Run a VarlenBlockPlan one sequence at a time through ``forward(q, k, v, plan, scale,
    return_lse)`` of (1, H, L, D) views (no copies of the inputs): out (total_q, Hq, D), lse
    (Hq, total_q) or None. Sequences without queries are skipped."""
    Hq = q.shape[1]
    out = q.new_empty(q.shape)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.empty(Hq, q.shape[0], dtype=acc, device=q.device) if return_lse else None
    a_q = a_k = 0
    for b, (lq, lk) in enumerate(plan.seqlens):
        if lq:
            qs = q[a_q : a_q + lq].transpose(0, 1)[None]
            ks, vs = (t[a_k : a_k + lk].transpose(0, 1)[None] for t in (k, v))
            o, l_ = forward(qs, ks, vs, plan.sequence(b), scale, return_lse)
            out[a_q : a_q + lq] = o[0].transpose(0, 1)
            if lse is not None:
                lse[:, a_q : a_q + lq] = l_[0]
        a_q, a_k = a_q + lq, a_k + lk
    return out, lse


class ReferenceExecutor(Executor):
    name = "reference"
    priority = 0
    device_types = ("cpu", "cuda")
    description = "exact tiled softmax over the selected blocks (torch ops; the oracle)"
    varlen = True

    def forward(self, q, k, v, plan, scale, return_lse):
        return reference_attention(q, k, v, plan, scale, return_lse)

    def forward_varlen(self, q, k, v, plan, scale, return_lse):
        return run_varlen_per_sequence(reference_attention, q, k, v, plan, scale, return_lse)
