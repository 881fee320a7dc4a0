"""SM clock and board power while the Hub kernel and dense cuDNN run back to back for a few seconds.

    python -m benchmarks.hub.clock_probe --lengths 32768 131072 --seconds 3 --json out.json
        [--methods hub hub_fp8 hub_fp8_pv cudnn]

Why: the TFLOP/s of a long kernel at boost clock falls when the board reaches its power limit, for
any kernel. This tool runs each method in a loop for ``--seconds`` while ``nvidia-smi`` samples
the SM clock and power every 50 ms, and reports per (method, length) the median clock, median
power and the TFLOP/s (causal pairs: the plan's selected pairs for the Hub kernel, the causal
triangle for cuDNN). B=1 Hq32 Hkv8 D128 bf16, default StemConfig plan; the kernel is loaded as in
bench_hub.py. ``hub_fp8``: ``stem.attention(..., precision="fp8", backend="hub")`` on the same plan
(its quantisation launches included); ``hub_fp8_pv`` likewise with ``precision="fp8_pv"``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

import stem
from stem.bench import random_qkv

from .bench_hub import KERNEL_DIR, REPO_ID, selected_pairs


def _loop(fn, seconds: float) -> tuple[float, float, float, int]:
    """(start, end) wall times and the mean ms per call of fn run for about `seconds`."""
    fn()
    torch.cuda.synchronize()
    t0 = time.time()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    n = 0
    while time.time() - t0 < seconds:
        for _ in range(4):
            fn()
        n += 4
        torch.cuda.synchronize()
    b.record()
    torch.cuda.synchronize()
    return t0, time.time(), a.elapsed_time(b) / n, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.hub.clock_probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--methods", nargs="+", default=["hub", "cudnn"], choices=["hub", "hub_fp8", "hub_fp8_pv", "cudnn"])
    args = ap.parse_args(argv)
    import kernels

    os.environ["LOCAL_KERNELS"] = f"{REPO_ID}={KERNEL_DIR}"
    hub = kernels.get_kernel(REPO_ID, version=1)
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                            "-lms", "50"], stdout=subprocess.PIPE, text=True)
    samples: list[tuple[float, float, float]] = []  # (arrival time, SM clock MHz, power W)

    def read() -> None:
        for line in smi.stdout:
            try:
                clock, power = (float(x) for x in line.split(","))
            except ValueError:
                continue
            samples.append((time.time(), clock, power))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    phases = []
    for L in args.lengths:
        q, k, v = random_qkv(1, 32, 8, L, 128, dtype=torch.bfloat16, device="cuda", seed=L)
        plan = stem.plan(q, k, v)
        sparse_flop, dense_flop = 4.0 * 128 * selected_pairs(plan), 4.0 * 128 * 32 * L * (L + 1) / 2

        def run_hub(q=q, k=k, v=v, plan=plan):
            return hub.block_sparse_attn_fwd(q, k, v, plan.kv_counts, plan.kv_indices, plan.block_size, plan.q_offset,
                                             128 ** -0.5, False)

        def run_cudnn(q=q, k=k, v=v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        def run_hub_precision(precision, q=q, k=k, v=v, plan=plan):
            return lambda: stem.attention(q, k, v, plan=plan, precision=precision, backend="hub")

        methods = {"hub": (run_hub, sparse_flop), "hub_fp8": (run_hub_precision("fp8"), sparse_flop),
                   "hub_fp8_pv": (run_hub_precision("fp8_pv"), sparse_flop), "cudnn": (run_cudnn, dense_flop)}
        methods = {m: methods[m] for m in args.methods}
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, (fn, flop) in methods.items():
            ctx = sdpa_kernel([SDPBackend.CUDNN_ATTENTION]) if name == "cudnn" else torch.autograd.no_grad()
            with ctx:
                t0, t1, ms, n = _loop(fn, args.seconds)
            phases.append({"method": name, "L": L, "t0": t0, "t1": t1, "ms": ms, "calls": n,
                           "tflops": flop / (ms * 1e-3) / 1e12})
            time.sleep(1.0)  # let the clock recover between phases
    smi.terminate()
    reader.join(timeout=5)
    for ph in phases:  # the samples of the phase's second half (the clock has settled)
        mid = (ph["t0"] + ph["t1"]) / 2
        inside = [s for s in samples if mid <= s[0] <= ph["t1"]]
        ph["sm_clock_mhz"] = sorted(s[1] for s in inside)[len(inside) // 2] if inside else None
        ph["power_w"] = sorted(s[2] for s in inside)[len(inside) // 2] if inside else None
        ph["samples"] = len(inside)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "phases": phases,
           "command": "python -m benchmarks.hub.clock_probe " + " ".join(sys.argv[1:] if argv is None else argv)}
    for ph in phases:
        print(f"{ph['method']:>6} {ph['L']:>7} {ph['ms']:8.2f} ms {ph['tflops']:6.1f} TF/s "
              f"clock {ph['sm_clock_mhz']} MHz power {ph['power_w']} W ({ph['samples']} samples)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
