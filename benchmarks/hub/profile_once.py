"""Run the Hub kernel a few times on one shape, for a profiler to catch one launch.

    ncu -k regex:block_sparse_attn_sm90 --launch-skip 2 --launch-count 1 --section SpeedOfLight \\
        --section WarpStateStats --section SchedulerStats python -m benchmarks.hub.profile_once --length 32768

B=1 bf16 random data (stem.bench.random_qkv), the default StemConfig plan, planned once; then
``--calls`` launches of the Hub kernel on that plan (kernels.get_kernel, LOCAL_KERNELS as in
bench_hub.py). ``--precision fp8`` / ``fp8_pv``: ``stem.attention(..., precision=..., backend="hub")``
on the same plan instead (its quantisation launches are separate kernels; the regex above skips them).
"""

from __future__ import annotations

import argparse
import os

import torch

import stem
from stem.bench import random_qkv

from .bench_hub import KERNEL_DIR, REPO_ID


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.hub.profile_once", description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--shape", default="32:8:128", help="Hq:Hkv:D")
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--precision", default="native", choices=["native", "fp8", "fp8_pv"])
    args = ap.parse_args(argv)
    hq, hkv, d = (int(x) for x in args.shape.split(":"))
    import kernels

    os.environ["LOCAL_KERNELS"] = f"{REPO_ID}={KERNEL_DIR}"
    hub = kernels.get_kernel(REPO_ID, version=1)
    q, k, v = random_qkv(1, hq, hkv, args.length, d, dtype=torch.bfloat16, device="cuda", seed=args.length)
    plan = stem.plan(q, k, v)
    if args.precision == "native":
        def call():
            return hub.block_sparse_attn_fwd(q, k, v, plan.kv_counts, plan.kv_indices, plan.block_size,
                                             plan.q_offset, d ** -0.5, False)
    else:
        def call():
            return stem.attention(q, k, v, plan=plan, precision=args.precision, backend="hub")

    for _ in range(args.calls):
        call()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
