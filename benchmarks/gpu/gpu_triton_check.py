"""The Triton backend on one GPU: its GPU tests, a tile sweep, and a timing table.

Run from the repository root (with stem installed, or from the checkout):

    PYTHONUNBUFFERED=1 python -m benchmarks.gpu.gpu_triton_check [--skip-tests] [--no-flex] [--lengths 16384,...]

Shapes: B=1, Hq=32, Hkv=8, D=128, bf16, default StemConfig, random data (``stem.bench.random_qkv``).
Timings are ``stem.bench.time_ms`` medians (CUDA events, warm L2: inputs stay cached between
runs, as in ``stem bench``). FlexAttention runs the identical plan through
``BlockPlan.to_flex_block_mask``. Writes gpu_triton_check.json into $OUT (or benchmarks/results/
when $OUT is unset) and prints a table last.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

import stem
from stem.bench import random_qkv, time_ms
from stem.dispatch import first_party

first_party()  # stem_backends: the installed package, or backends/ of this checkout
from stem_backends.triton.executor import run_block_sparse_attention  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
REPS = {"short": 20, "long": 10}  # timed runs per measurement at L <= 32K and above (set by --reps)


def bench(fn, L):
    return time_ms(fn, reps=REPS["short"] if L <= 32768 else REPS["long"], warmup=3)


def run_tests(out_dir):
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_gpu_triton.py"],
        cwd=ROOT, capture_output=True, text=True,
    )
    log = proc.stdout + proc.stderr
    with open(os.path.join(out_dir, "gpu_tests.log"), "w") as f:
        f.write(log)
    tail = log.strip().splitlines()[-1] if log.strip() else ""
    print(f"[tests] rc={proc.returncode} {tail} ({time.time() - t0:.0f}s)", flush=True)
    if proc.returncode:
        print(log[-3000:], flush=True)
    return {"rc": proc.returncode, "summary": tail, "seconds": time.time() - t0}


def make_inputs(L, seed):
    return random_qkv(1, 32, 8, L, 128, dtype=torch.bfloat16, device="cuda", seed=seed)


def flex_runner(q, k, v, plan, scale):
    """FlexAttention (compiled) on the identical plan: full blocks without mask_mod, the diagonal with it."""
    from torch.nn.attention.flex_attention import flex_attention

    bm = plan.to_flex_block_mask()
    fa = torch.compile(flex_attention, dynamic=False)
    return lambda: fa(q, k, v, block_mask=bm, scale=scale, enable_gqa=True)


def sweep(L, configs, results):
    q, k, v = make_inputs(L, 1)
    plan = stem.plan(q, k, v)
    scale = 1 / math.sqrt(128)
    rows = []
    for cfg in configs:
        bm, bn, nw, ns, tma = cfg
        try:
            fn = functools.partial(run_block_sparse_attention, q, k, v, plan, scale, False, block_m=bm,
                                   block_n=bn, num_warps=nw, num_stages=ns, use_tma=tma)
            fn()
            ms = bench(fn, L)
        except Exception as e:  # e.g. out of shared memory
            ms = None
            print(f"[sweep] {cfg} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        rows.append({"block_m": bm, "block_n": bn, "num_warps": nw, "num_stages": ns, "use_tma": tma, "ms": ms})
        print(f"[sweep L={L}] {cfg}: {ms}", flush=True)
    results["sweep"] = {"L": L, "rows": rows}
    ok = [r for r in rows if r["ms"] is not None]
    best = min(ok, key=lambda r: r["ms"])
    return {key: best[key] for key in ("block_m", "block_n", "num_warps", "num_stages", "use_tma")}


def measure_length(L, tiles, with_flex):
    """One row of the table: planner, executor (both schedules), cuDNN dense, FlexAttention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = make_inputs(L, L)
    scale = 1 / math.sqrt(128)
    cfg = stem.StemConfig()
    row = {"L": L}
    row["planner_torch_ms"] = bench(lambda: stem.plan(q, k, v, cfg, pooling="torch"), L)
    row["planner_triton_ms"] = bench(lambda: stem.plan(q, k, v, cfg, pooling="triton"), L)
    row["logits_torch_ms"] = bench(lambda: stem.planner.block_logits(q, k, v, cfg, impl="torch"), L)
    row["logits_triton_ms"] = bench(lambda: stem.planner.block_logits(q, k, v, cfg, impl="triton"), L)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    plan = stem.plan(q, k, v, cfg, pooling="triton")
    torch.cuda.synchronize()
    row["planner_triton_peak_extra_MB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    row["density"] = plan.density

    def exec_fn(sched, **kw):
        return lambda: run_block_sparse_attention(q, k, v, plan, scale, False, schedule=sched, **kw)

    for sched in ("sorted", "reversed"):
        exec_fn(sched, **tiles)()
        row[f"exec_{sched}_ms"] = bench(exec_fn(sched, **tiles), L)
    row["exec_default_tiles_ms"] = bench(exec_fn("sorted"), L)
    kr, vr = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        try:
            row["cudnn_dense_ms"] = bench(lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True), L)
        except RuntimeError as e:
            row["cudnn_dense_ms"] = None
            print(f"[cudnn] {e}"[:300], flush=True)
    kr = vr = None  # free the repeated K/V before FlexAttention
    if with_flex:
        try:
            ff = flex_runner(q, k, v, plan, scale)
            o_flex = ff()
            o_tri, _ = run_block_sparse_attention(q, k, v, plan, scale, False, **tiles)
            row["flex_vs_triton_rel"] = ((o_flex.float() - o_tri.float()).norm() / o_flex.float().norm()).item()
            row["flex_ms"] = bench(ff, L)
        except Exception as e:
            row["flex_ms"] = None
            print(f"[flex] {type(e).__name__}: {str(e)[:300]}", flush=True)
    best = min(row["exec_sorted_ms"], row["exec_reversed_ms"])
    nsel = plan.kv_counts.sum().item()
    flops = 4 * nsel * plan.block_size * plan.block_size * 128  # counts diagonal blocks whole: an upper bound
    row["exec_tflops"] = flops / (best * 1e-3) / 1e12
    return row


def table(lengths, tiles, with_flex, results, t0, flex_deadline):
    rows = []
    for L in lengths:
        torch.cuda.empty_cache()
        row = measure_length(L, tiles, with_flex and time.time() - t0 < flex_deadline)
        rows.append(row)
        print("[table] " + json.dumps(row), flush=True)
    results["table"] = rows
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--lengths", default="16384,32768,65536,131072")
    ap.add_argument("--sweep-L", type=int, default=131072)
    ap.add_argument("--flex-deadline", type=float, default=420.0, help="skip FlexAttention after this many seconds")
    ap.add_argument("--reps", type=int, default=20,
                    help="timed runs per measurement up to 32K tokens (half of them above; median)")
    args = ap.parse_args()
    REPS.update(short=args.reps, long=max(3, args.reps // 2))
    out_dir = os.environ.get("OUT") or str(ROOT / "benchmarks" / "results")
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    results = {
        "card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "stem": stem.__version__, "command": " ".join(["python -m benchmarks.gpu.gpu_triton_check", *sys.argv[1:]]),
        "shape": "B=1 Hq=32 Hkv=8 D=128 bf16, default StemConfig",
        "timing": "stem.bench.time_ms: CUDA events, median, warm L2",
    }
    print(f"card: {results['card']}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    if not args.skip_tests:
        results["tests"] = run_tests(out_dir)
    tiles = {}
    if not args.no_sweep:
        configs = [(128, 128, 8, 3, False), (128, 128, 8, 3, True), (128, 128, 8, 4, True), (128, 64, 8, 3, True),
                   (128, 128, 8, 2, True), (128, 64, 8, 4, True)]
        tiles = sweep(args.sweep_L, configs, results)
        print(f"[sweep] best tiles {tiles}", flush=True)
    results["tiles"] = tiles
    lengths = [int(x) for x in args.lengths.split(",") if x]
    rows = table(lengths, tiles, not args.no_flex, results, t0, args.flex_deadline)
    results["seconds"] = time.time() - t0
    with open(os.path.join(out_dir, "gpu_triton_check.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\ncard: {results['card']}   tiles: {tiles}   tests: {results.get('tests', {}).get('summary')}")
    hdr = ("L", "dens", "plan_tri", "plan_torch", "logit_tri", "exec_sort", "exec_rev", "exec_dflt", "flex",
           "cudnn", "dens*cudnn")
    print(" ".join(f"{h:>10}" for h in hdr))
    for r in rows:
        vals = [r["L"], r["density"], r["planner_triton_ms"], r["planner_torch_ms"], r["logits_triton_ms"],
                r["exec_sorted_ms"], r["exec_reversed_ms"], r["exec_default_tiles_ms"], r.get("flex_ms"),
                r.get("cudnn_dense_ms"),
                r["density"] * r["cudnn_dense_ms"] if r.get("cudnn_dense_ms") else None]
        print(" ".join(f"{v:>10.3f}" if isinstance(v, float) else f"{str(v):>10}" for v in vals))
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
