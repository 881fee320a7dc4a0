"""One device call for the Triton backend: GPU tests, a tile sweep, and a timing table.

    PYTHONUNBUFFERED=1 python benchmarks/gpu_triton_check.py [--skip-tests] [--no-flex] [--lengths 16384,...]

Shapes: B=1, Hq=32, Hkv=8, D=128, bf16, default StemConfig, random data. Timings are medians of
triton.testing.do_bench (CUDA events). Writes $OUT/gpu_triton_check.json (or
benchmarks/results/ when $OUT is unset) and prints a table last.
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

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


import triton  # noqa: E402
from stem_backends.triton.executor import run_block_sparse_attention  # noqa: E402
from stem_backends.triton.planner import triton_block_logits  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import stem  # noqa: E402


def bench(fn, L):
    rep = 200 if L <= 32768 else 600
    return do_bench(fn, warmup=50, rep=rep, return_mode="median")


def run_tests(out_dir):
    t0 = time.time()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "backends"),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_gpu_triton.py"],
        cwd=ROOT, capture_output=True, text=True, env=env,
    )
    log = proc.stdout + proc.stderr
    with open(os.path.join(out_dir, "gpu_tests.log"), "w") as f:
        f.write(log)
    tail = log.strip().splitlines()[-1] if log.strip() else ""
    print(f"[tests] rc={proc.returncode} {tail} ({time.time() - t0:.0f}s)", flush=True)
    if proc.returncode:
        print(log[-3000:], flush=True)
    return {"rc": proc.returncode, "summary": tail, "seconds": time.time() - t0}


def make_inputs(L, gen_seed):
    torch.manual_seed(gen_seed)
    B, Hq, Hkv, D = 1, 32, 8, 128
    q = torch.randn(B, Hq, L, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16)
    return q, k, v


def flex_runner(q, k, v, plan, scale):
    """FlexAttention on the identical plan: full blocks without mask_mod, the diagonal with it."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    bs, nK = plan.block_size, plan.num_kv_blocks
    counts, idx = plan.kv_counts, plan.kv_indices
    W = idx.shape[-1]
    full_idx = F.pad(idx, (0, nK - W)) if W < nK else idx
    nQ = counts.shape[-1]
    diag = (torch.arange(nQ, device=q.device, dtype=torch.int32) + plan.q_block_offset).view(1, 1, nQ, 1)
    part_idx = F.pad(diag.expand(*counts.shape, 1), (0, nK - 1)).contiguous()
    part_cnt = torch.ones_like(counts)

    def causal(b, h, qi, ki):
        return qi >= ki

    bm = BlockMask.from_kv_blocks(part_cnt, part_idx, counts - 1, full_idx.contiguous(), BLOCK_SIZE=bs,
                                  mask_mod=causal, seq_lengths=(q.shape[2], k.shape[2]))
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
    row["planner_torch_ms"] = bench(lambda: stem.plan(q, k, v, cfg, logits_impl="torch"), L)
    row["planner_triton_ms"] = bench(lambda: stem.plan(q, k, v, cfg, logits_impl="triton"), L)
    row["logits_torch_ms"] = bench(lambda: stem.planner.block_logits(q, k, v, cfg, impl="torch"), L)
    row["logits_triton_ms"] = bench(lambda: triton_block_logits(q, k, v, cfg, 0), L)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    plan = stem.plan(q, k, v, cfg, logits_impl="triton")
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
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--lengths", default="16384,32768,65536,131072")
    ap.add_argument("--sweep-L", type=int, default=131072)
    ap.add_argument("--flex-deadline", type=float, default=420.0, help="skip FlexAttention after this many seconds")
    args = ap.parse_args()
    out_dir = os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    results = {
        "card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "shape": "B=1 Hq=32 Hkv=8 D=128 bf16, default StemConfig",
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
