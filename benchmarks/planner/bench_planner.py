"""Planner time per stage, before (pooling kernel + torch logits GEMM + torch.topk selection) and
after (the Triton planner: pooling, bonus, logits and selection kernels), and end to end
``stem.attention`` (auto) against cuDNN SDPA in the same run.

    python -m benchmarks.planner.bench_planner --out benchmarks/results

Cases (B, Hq, Hkv, L, D), bf16, default StemConfig: 16K / 32K / 64K / 128K at 1-32-8-128, 32K at
B 4, and 128K at Hq 14, Hkv 2, D 64. Per case: ``stem.plan`` wall time (CUDA events around the
whole call, median; includes the host's launch overhead, as each run starts on an idle GPU), the
host time per call (perf_counter, no sync, 20 calls queued), device time per kernel
(torch.profiler, summed per kernel name), the planner's peak extra memory, and e2e times: cuDNN
SDPA called directly, ``stem.attention`` with ``backend="auto"``, the sparse path forced
(``auto_dense_above=2``) and the plan's executor alone. Writes ``bench_planner_<card>.json`` and
``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

CASES = [(1, 32, 8, 16384, 128), (1, 32, 8, 32768, 128), (1, 32, 8, 65536, 128), (1, 32, 8, 131072, 128),
         (4, 32, 8, 32768, 128), (1, 14, 2, 131072, 64)]


def _kernel_times(fn, reps: int = 5) -> dict:
    """Device milliseconds per call, summed per kernel name, over ``reps`` profiled calls."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            name = ev.name if len(ev.name) < 60 else ev.name[:57] + "..."
            out[name] = out.get(name, 0.0) + ev.device_time / 1e3 / reps
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _host_ms(fn, n: int = 20) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e3 / n


def bench_case(B, Hq, Hkv, L, D, reps) -> dict:
    import torch
    import torch.nn.functional as F
    from stem_backends.triton.planner import pool_triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import stem
    from stem.bench import random_qkv, time_ms
    from stem.planner import logits_from_stats, plan_from_stats, select_blocks

    cfg = stem.StemConfig()
    q, k, v = random_qkv(B, Hq, Hkv, L, D, seed=L, v_scale=(0.2, 3.0))
    n = -(-L // cfg.block_size)
    row = {"B": B, "Hq": Hq, "Hkv": Hkv, "L": L, "D": D}

    # before: the pooling kernel, then torch ops for logits and selection
    old = {}
    old["pooling_ms"] = time_ms(lambda: pool_triton(q, k, v, cfg, 0), reps)
    st = pool_triton(q, k, v, cfg, 0)
    old["logits_ms"] = time_ms(lambda: logits_from_stats(st, cfg), reps)
    lg = logits_from_stats(st, cfg)
    old["select_ms"] = time_ms(lambda: select_blocks(lg, cfg, 0, n), reps)
    lg = st = None  # free the scratch before the memory measurements

    def old_plan():
        return plan_from_stats(pool_triton(q, k, v, cfg, 0), cfg, L, 0, n)

    old["total_ms"] = time_ms(old_plan, reps)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ref = old_plan()
    torch.cuda.synchronize()
    old["peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    old["kernels_ms"] = _kernel_times(old_plan)
    row["before"] = old

    new = {}
    new["total_ms"] = time_ms(lambda: stem.plan(q, k, v, cfg, pooling="triton"), reps)
    new["host_ms"] = _host_ms(lambda: stem.plan(q, k, v, cfg, pooling="triton"))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    plan = stem.plan(q, k, v, cfg, pooling="triton")
    torch.cuda.synchronize()
    out_mb = (plan.kv_counts.numel() + plan.kv_indices.numel()) * 4 / 2**20
    new["peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    new["plan_mb"] = out_mb
    new["scratch_mb"] = new["peak_extra_mb"] - out_mb
    new["kernels_ms"] = _kernel_times(lambda: stem.plan(q, k, v, cfg, pooling="triton"))
    new["device_ms"] = sum(new["kernels_ms"].values())
    row["after"] = new
    a, b = plan.to_dense_mask(), ref.to_dense_mask()
    row["rows_differing_from_before"] = float((a != b).any(-1).float().mean())
    row["density"] = plan.density

    # end to end
    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hq != Hkv)

    e2e = {"cudnn_ms": time_ms(cudnn, reps)}
    e2e["auto_ms"] = time_ms(lambda: stem.attention(q, k, v), reps)
    e2e["auto_dispatch"] = stem.last_dispatch()
    sparse_cfg = cfg.replace(auto_dense_above=2.0)
    e2e["sparse_ms"] = time_ms(lambda: stem.attention(q, k, v, config=sparse_cfg), reps)
    e2e["sparse_dispatch"] = stem.last_dispatch()
    e2e["executor_ms"] = time_ms(lambda: stem.attention(q, k, v, plan=plan), reps)
    e2e["auto_vs_cudnn"] = e2e["cudnn_ms"] / e2e["auto_ms"]
    e2e["sparse_vs_cudnn"] = e2e["cudnn_ms"] / e2e["sparse_ms"]
    row["e2e"] = e2e
    return row


def dense_overhead(L: int, reps: int) -> dict:
    """Where the dense path's time goes at one length (1-32-8-128): cuDNN direct, SDPA under the
    dense executor's backend list, the dense plan's construction, and ``stem.attention``."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import stem
    from stem.bench import random_qkv, time_ms
    from stem.planner import dense_plan

    q, k, v = random_qkv(1, 32, 8, L, 128, seed=L)
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

    def direct():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def ordered():
        with sdpa_kernel(order, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    out = {"L": L, "cudnn_direct_ms": time_ms(direct, reps), "sdpa_priority_list_ms": time_ms(ordered, reps),
           "dense_plan_ms": time_ms(lambda: dense_plan(1, 32, L, L, 128, q.device), reps),
           "dense_plan_host_ms": _host_ms(lambda: dense_plan(1, 32, L, L, 128, q.device)),
           "stem_attention_dense_cfg_ms": time_ms(lambda: stem.attention(q, k, v, config=stem.StemConfig(dense=True)),
                                                  reps),
           "cudnn_direct_host_ms": _host_ms(direct),
           "stem_attention_dense_cfg_host_ms": _host_ms(
               lambda: stem.attention(q, k, v, config=stem.StemConfig(dense=True)))}
    out["kernels_direct"] = _kernel_times(direct)
    out["kernels_stem_dense"] = _kernel_times(lambda: stem.attention(q, k, v, config=stem.StemConfig(dense=True)))
    return out


def _plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    labels = [f"B{r['B']} H{r['Hq']}/{r['Hkv']} D{r['D']}\n{r['L'] // 1024}K" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    w = 0.4
    ax[0].bar([i - w / 2 for i in x], [r["before"]["total_ms"] for r in rows], w, label="planner before")
    ax[0].bar([i + w / 2 for i in x], [r["after"]["total_ms"] for r in rows], w, label="planner after")
    ax[0].set_xticks(list(x), labels, fontsize=7)
    ax[0].set_ylabel("stem.plan wall ms (CUDA events, median)")
    ax[0].set_yscale("log")
    ax[0].legend()
    ax[0].set_title(res["card"])
    ax[1].bar([i - w / 2 for i in x], [r["e2e"]["auto_vs_cudnn"] for r in rows], w, label="auto")
    ax[1].bar([i + w / 2 for i in x], [r["e2e"]["sparse_vs_cudnn"] for r in rows], w, label="sparse forced")
    ax[1].axhline(1.0, color="grey", lw=0.8)
    ax[1].set_xticks(list(x), labels, fontsize=7)
    ax[1].set_ylabel("speedup vs cuDNN SDPA (e2e)")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    import torch

    import stem
    from stem.bench import _versions

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="stem_bench")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--cases", default=None, help="comma-separated case numbers (default: all)")
    args = p.parse_args(argv)
    cases = CASES if args.cases is None else [CASES[int(i)] for i in args.cases.split(",")]
    card = torch.cuda.get_device_name(0)
    rows = []
    for c in cases:
        rows.append(bench_case(*c, reps=args.reps))
        torch.cuda.empty_cache()
        r = rows[-1]
        print(f"{c}: planner {r['before']['total_ms']:.3f} -> {r['after']['total_ms']:.3f} ms "
              f"(host {r['after']['host_ms']:.3f}, device {r['after']['device_ms']:.3f}, scratch "
              f"{r['after']['scratch_mb']:.0f} MB); e2e cudnn {r['e2e']['cudnn_ms']:.3f} "
              f"auto {r['e2e']['auto_ms']:.3f} "
              f"sparse {r['e2e']['sparse_ms']:.3f} exec {r['e2e']['executor_ms']:.3f} [{r['e2e']['auto_dispatch']}]",
              flush=True)
    res = {"card": card, "versions": _versions(), "config": stem.StemConfig().to_dict(), "dtype": "bfloat16",
           "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks.planner.bench_planner",
                                *(argv if argv is not None else sys.argv[1:])]),
           "rows": rows, "dense_overhead_16k": dense_overhead(16384, args.reps)}
    os.makedirs(args.out, exist_ok=True)
    tag = card.replace(" ", "_").replace("/", "_")
    path = os.path.join(args.out, f"bench_planner_{tag}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    try:
        _plot(res, path[:-5] + ".png")
    except ImportError:
        print("(matplotlib missing: no plot)")
    print(json.dumps(res["dense_overhead_16k"], indent=1))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
