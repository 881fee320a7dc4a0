#!/usr/bin/env python3
"""A small run of the compiled kernel for `compute-sanitizer --tool memcheck` (odd lengths, a
chunk with q_offset, both plan block sizes, every head dim, both kernels: "auto" runs the sm90
kernel where it applies, "sm80" the sm80 kernel). Exits non-zero on a wrong result.

    compute-sanitizer --tool memcheck python benchmarks/hub/sanitize_case.py   (from the repository root)
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
REPO_ID = "stem-attention/stem-attention"


def main() -> int:
    import kernels
    from stem_backends.reference import reference_attention

    from stem.plan import BlockPlan

    os.environ["LOCAL_KERNELS"] = f"{REPO_ID}={ROOT / 'hub_kernels' / 'stem-attention'}"
    mod = kernels.get_kernel(REPO_ID, version=1)
    paths = set()
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
            ref, _ = reference_attention(q, k, v, plan, 1 / math.sqrt(D), True)
            for kernel in ("auto", "sm80"):
                out, lse = mod.block_sparse_attn_fwd(q, k, v, plan.kv_counts, plan.kv_indices, bs, off,
                                                     1 / math.sqrt(D), True, kernel=kernel)
                paths.add(mod.ops.last_kernel_path())
                worst = max(worst, float((out.float() - ref.float()).abs().max()))
    torch.cuda.synchronize()
    print(f"sanitize_case: kernels run {sorted(paths)}, max abs error vs reference {worst:.3e}")
    both = torch.cuda.get_device_capability() != (9, 0) or paths == {80, 90}
    return 0 if worst < 6e-2 and both else 1


if __name__ == "__main__":
    sys.exit(main())
