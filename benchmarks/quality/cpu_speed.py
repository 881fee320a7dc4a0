"""CPU time of the ``cpu_gather`` executor against dense SDPA at the plans' densities.

    python -m benchmarks.quality.cpu_speed --cache out/quality_cache --out benchmarks/results

Single-threaded, CPU seconds (``time.process_time``, minimum of ``--reps``), so that a shared
machine's load moves the numbers less than wall time would. Cases: the q, k, v of layers of
SmolLM2-135M-Instruct on the 8K document (9 query / 3 KV heads, D 64; the heads of a KV group
pick similar blocks), and random q, k, v at 16K and 32K (heads pick unrelated blocks). Stem's
plan at alpha 0.7; dense is ``F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import stem

__all__ = ["cpu_seconds", "measure", "main"]


def cpu_seconds(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


@torch.no_grad()
def measure(q, k, v, cfg: stem.StemConfig, reps: int, reference: bool = False) -> dict:
    plan = stem.plan(q, k, v, cfg)
    dense = cpu_seconds(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), reps)
    gather = cpu_seconds(lambda: stem.attention(q, k, v, plan=plan, backend="cpu_gather"), reps)
    plan_s = cpu_seconds(lambda: stem.plan(q, k, v, cfg), reps)
    out = {"L": q.shape[2], "block_size": cfg.block_size, "alpha": cfg.alpha, "density": plan.density,
           "dense_sdpa_s": dense, "cpu_gather_s": gather, "planner_s": plan_s, "gather_over_dense": gather / dense}
    if reference:
        out["reference_s"] = cpu_seconds(lambda: stem.attention(q, k, v, plan=plan, backend="reference"), 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.cpu_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default="out/quality_cache")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--layers", default="3,8,20")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    from .capture import build_document, capture_qkv
    from .fetch import load_model

    model, tok, _ = load_model(args.cache)
    ids, _ = build_document(tok, 8192)
    qkv, _ = capture_qkv(model, ids)
    del model
    for li in [int(x) for x in args.layers.split(",")]:
        q, k, v = qkv[li]
        for bs in (32, 64):
            r = measure(q, k, v, stem.StemConfig(block_size=bs), args.reps, reference=(bs == 32 and li == 8))
            rows.append({"case": f"SmolLM2 layer {li}", **r})
            print(rows[-1], flush=True)
    g = torch.Generator().manual_seed(0)
    for L in (16384, 32768):
        q = torch.randn(1, 9, L, 64, generator=g)
        k, v = torch.randn(1, 3, L, 64, generator=g), torch.randn(1, 3, L, 64, generator=g)
        for bs in (64, 128):
            rows.append({"case": "random", **measure(q, k, v, stem.StemConfig(block_size=bs), max(1, args.reps - 1))})
            print(rows[-1], flush=True)
    res = {"rows": rows, "threads": 1, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
           "command": " ".join(["python -m benchmarks.quality.cpu_speed", *(sys.argv[1:] if argv is None else argv)])}
    path = Path(args.out) / "quality_cpu_executor_speed.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
