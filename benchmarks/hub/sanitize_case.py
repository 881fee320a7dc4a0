#!/usr/bin/env python3
"""A small run of the compiled kernel for `compute-sanitizer --tool memcheck` (odd lengths, a
chunk with q_offset, both plan block sizes, every head dim). Exits non-zero on a wrong result."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    import kernels
    from stem_backends.reference import reference_attention

    from stem.plan import BlockPlan

    mod = kernels.get_local_kernel(ROOT / "hub_kernels" / "stem-attention")
    assert mod.VARIANT == "cuda", mod.VARIANT
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for D in (64, 128, 256):
        for bs, (Lq, Lk, off) in ((64, (77, 201, 124)), (128, (150, 333, 100)), (128, (99, 99, 0))):
            B, Hq, Hkv = 1, 4, 2
            q = torch.randn(B, Hq, Lq, D, generator=g).to(torch.bfloat16).cuda()
            k = torch.randn(B, Hkv, Lk, D, generator=g).to(torch.bfloat16).cuda()
            v = torch.randn(B, Hkv, Lk, D, generator=g).to(torch.bfloat16).cuda()
            qbo, nK = off // bs, -(-Lk // bs)
            nQ = (off + Lq - 1) // bs - qbo + 1
            mask = torch.rand(B, Hq, nQ, nK, generator=g) < 0.6
            mask[..., torch.arange(nQ), torch.arange(nQ) + qbo] = True
            plan = BlockPlan.from_dense_mask(mask.cuda(), block_size=bs, q_len=Lq, kv_len=Lk, q_offset=off)
            out, lse = mod.block_sparse_attn_fwd(q, k, v, plan.kv_counts, plan.kv_indices, bs, off,
                                                 1 / math.sqrt(D), True)
            ref, _ = reference_attention(q, k, v, plan, 1 / math.sqrt(D), True)
            worst = max(worst, float((out.float() - ref.float()).abs().max()))
    torch.cuda.synchronize()
    print(f"sanitize_case: max abs error vs reference {worst:.3e}")
    return 0 if worst < 6e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
