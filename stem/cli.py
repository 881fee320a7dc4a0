"""The ``stem`` command: ``stem info``, ``stem demo``, ``stem bench``.

``stem bench`` is the attention-level benchmark a user runs on their own GPU (stem/bench.py);
the repository's other benchmarks (model prefill TTFT, retrieval quality, several GPUs) live in
``benchmarks/`` of a source checkout.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def _info(args) -> int:
    import torch

    import stem
    from stem.dispatch import executor_status

    print(f"stem {stem.__version__}  torch {torch.__version__}")
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
        p = torch.cuda.get_device_properties(0)
        print(f"CUDA: {p.name} (sm_{p.major}{p.minor}), torch CUDA {torch.version.cuda}")
    else:
        print("CUDA: not available (torch.cuda.is_available() is False)")
    for dev in devices:
        print(f"\nexecutors on {dev} (auto prefers higher priority; dense plans go to sdpa):")
        for row in executor_status(dev):
            mark = "yes" if row.usable else "no "
            text = row.description if row.usable else row.reason
            print(f"  [{mark}] {row.name:<10} prio {row.priority:>4}  {text}")
    from stem.planner import poolings

    kernels = [f"{name} ({', '.join(devs)})" for name, (_, devs) in poolings().items()]
    print("\nplanner pooling kernels:", ", ".join([*kernels, "torch (any device)"]))
    from stem.api import auto_dense_reason

    cfg = stem.StemConfig()
    n_dense = stem.budget._DENSE_BELOW
    print(f"\nauto decisions (default config, block_size={cfg.block_size}):")
    print(f"  plans are dense (-> sdpa) below {n_dense} blocks (up to {(n_dense - 1) * cfg.block_size} tokens)")
    n = n_dense
    while auto_dense_reason("cuda", n * cfg.block_size, n * cfg.block_size, cfg) is not None:
        n += 1
    print(f"  on CUDA, prefill shorter than {n * cfg.block_size} tokens runs dense SDPA without planning: the budgets "
          f"keep >= {cfg.auto_dense_above} of the causal blocks there (StemConfig.auto_dense_above)")
    return 0


def _demo(args) -> int:
    import torch
    import torch.nn.functional as F

    import stem
    from stem.bench import time_ms
    from stem.workloads import synthetic_qkv

    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    cfg = stem.StemConfig(block_size=args.block_size)
    q, k, v, info = synthetic_qkv(args.length, q_heads=args.heads, kv_heads=args.kv_heads,
                                  head_dim=args.head_dim, seed=args.seed, dtype=dtype, device=dev)
    print(f"workload: synthetic L={args.length} B=1 Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim} "
          f"{str(dtype).replace('torch.', '')} on {dev}; needles at {info['needles']}")
    print(f"config: {cfg}")

    def dense_fn():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def stem_fn():
        return stem.attention(q, k, v, config=cfg, return_plan=True)

    def plan_fn():
        return stem.plan(q, k, v, cfg)

    dense, (out, plan) = dense_fn(), stem_fn()  # the results; these runs are also the warm-up
    t_dense, t_stem, t_plan = (time_ms(fn, reps=3, warmup=0, device=dev) for fn in (dense_fn, stem_fn, plan_fn))
    err = float((out.double() - dense.double()).norm() / dense.double().norm())
    masked = plan.to_dense_mask()
    hits = sum(bool(masked[0, :, :, n // cfg.block_size].any()) for n in info["needles"])
    print(f"plan: {plan}")
    print(f"executor: {stem.last_dispatch()}")
    print(f"density            {plan.density:.3f} of causal blocks")
    print(f"needle blocks kept {hits}/{len(info['needles'])} (by at least one later query block)")
    print(f"rel. error vs dense {err:.2e}  (||stem - dense|| / ||dense||)")
    print(f"time: dense SDPA {t_dense:.1f} ms | stem {t_stem:.1f} ms (planner {t_plan:.1f} ms) "
          f"| speedup {t_dense / t_stem:.2f}x")
    if dev == "cpu":
        print("note: on CPU stem runs the unfused reference executor (an exact oracle, not a fast path); "
              "the speed claims are for CUDA: see `stem bench`.")
    if args.plot:
        try:
            path = plan.plot(args.plot)
            print(f"plan plot written to {path}")
        except ImportError as e:
            print(f"(no plot: {e})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"density": plan.density, "rel_error": err, "dense_ms": t_dense, "stem_ms": t_stem,
                       "planner_ms": t_plan, "device": dev, "executor": stem.last_dispatch()}, f, indent=1)
    return 0


def _bench(args) -> int:
    from stem.bench import main as bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stem", description="Stem sparse attention for long-context prefill")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("info", help="executors on this machine and why each is or isn't usable")
    s.set_defaults(fn=_info)
    s = sub.add_parser("demo", help="run Stem on the built-in synthetic long-context workload")
    s.add_argument("--length", type=int, default=8192)
    s.add_argument("--heads", type=int, default=8)
    s.add_argument("--kv-heads", type=int, default=2)
    s.add_argument("--head-dim", type=int, default=64)
    s.add_argument("--block-size", type=int, default=64,
                   help="64 at the default 8K length gives 128 blocks, the regime of 16K tokens at 128")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default=None)
    s.add_argument("--plot", default="stem_demo_plan.png", help="PNG path for the plan heatmap ('' to skip)")
    s.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    s.set_defaults(fn=_demo)
    from stem.bench import add_arguments as bench_args

    s = sub.add_parser("bench", help="GPU: planner, executors and end-to-end Stem vs dense SDPA and FlexAttention",
                       description="Attention-level benchmark on this machine's GPU; writes JSON + PNG into --out.")
    bench_args(s)
    s.set_defaults(fn=_bench)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "fn", None) is None:
        return 2
    return args.fn(args) or 0


if __name__ == "__main__":
    sys.exit(main())
