"""The exact reference executor: softmax attention over the selected blocks, tiled per query block.

Memory stays O(B * Hq * block * Lk) per step, never O(Lq * Lk). float32 accumulation (float64 for
float64 inputs). Runs on any device; it is the CPU default and the oracle for the fast executors.
"""

from __future__ import annotations

import torch

from stem.dispatch import Executor

__all__ = ["ReferenceExecutor", "reference_attention"]


def reference_attention(q, k, v, plan, scale: float, return_lse: bool = False):
    """out (B, Hq, Lq, D) in q.dtype and, if asked, lse float32/float64 (B, Hq, Lq)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    bs = plan.block_size
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    off = plan.q_offset
    qbo = plan.q_block_offset
    mask_blocks = plan.to_dense_mask()  # (B, Hq, nQ, nK)
    out = torch.empty(B, Hq, Lq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Lq, dtype=acc, device=q.device) if return_lse else None
    kf, vf = k.to(acc), v.to(acc)
    for i in range(plan.num_q_blocks):
        a0 = (qbo + i) * bs  # absolute start of this block
        r0, r1 = max(a0, off) - off, min(a0 + bs, off + Lq) - off  # its query rows
        kv_end = min(a0 + bs, off + Lq)  # causal: keys up to the block's last query
        qi = q[:, :, r0:r1].to(acc).view(B, Hkv, G, r1 - r0, D)
        s = torch.einsum("bhgqd,bhkd->bhgqk", qi, kf[:, :, :kv_end]) * scale
        s = s.view(B, Hq, r1 - r0, kv_end)
        tok_block = torch.arange(kv_end, device=q.device) // bs
        allowed = mask_blocks[:, :, i, :][..., tok_block]  # (B, Hq, kv_end)
        qpos = torch.arange(r0, r1, device=q.device) + off
        causal = torch.arange(kv_end, device=q.device)[None, :] <= qpos[:, None]
        s = s.masked_fill(~(allowed[:, :, None, :] & causal), float("-inf"))
        m = s.amax(-1, keepdim=True)
        p = torch.exp(s - m)
        l = p.sum(-1, keepdim=True)
        o = torch.einsum("bhgqk,bhkd->bhgqd", (p / l).view(B, Hkv, G, r1 - r0, kv_end), vf[:, :, :kv_end])
        out[:, :, r0:r1] = o.reshape(B, Hq, r1 - r0, D).to(q.dtype)
        if lse is not None:
            lse[:, :, r0:r1] = (m + torch.log(l)).squeeze(-1)
    return out, lse


class ReferenceExecutor(Executor):
    name = "reference"
    priority = 0
    device_types = ("cpu", "cuda")
    description = "exact tiled softmax over the selected blocks (torch ops; the oracle)"

    def forward(self, q, k, v, plan, scale, return_lse):
        return reference_attention(q, k, v, plan, scale, return_lse)
