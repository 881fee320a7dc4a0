"""Where ``stem.attention``'s end-to-end time goes: GPU kernels against host launch time.

    python -m benchmarks.hub.e2e_breakdown [--lengths 16384 32768] [--json out.json]

For B 1, Hq 32, Hkv 8, D 128, bf16, the default StemConfig, per length:

* ``e2e``, ``plan``, ``exec``: CUDA-event medians (``stem.bench.time_ms``, 20 reps) of
  ``stem.attention(q, k, v)``, ``stem.plan(q, k, v)`` and ``stem.attention(q, k, v, plan=plan,
  backend="hub")``; ``*_host``: the median host wall time of one such call made on an idle device
  (the time Python takes to launch it);
* ``e2e_back_to_back``: the mean time of 20 calls issued without waiting (host-bound when it
  equals ``e2e_host``, device-bound when it equals ``e2e``);
* ``n_kernels``, ``gpu_kernel_ms_sum``, ``kernels``: the kernels of one call (torch.profiler) and
  their device times;
* ``graph``: a CUDA graph of the whole call, replayed (``graph_error`` when capture fails).

The Hub kernel is loaded the usual way (``LOCAL_KERNELS`` or the Hub); without it ``auto`` picks
another executor and ``exec`` fails. Prints one line per length and the largest kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import stem
from stem.bench import random_qkv, time_ms


def _host_ms(fn, n: int = 10) -> float:
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return sorted(times)[n // 2]


def breakdown(L: int) -> dict:
    """The measurements above for one length."""
    q, k, v = random_qkv(1, 32, 8, L, 128, dtype=torch.bfloat16, device="cuda", seed=L)
    plan = stem.plan(q, k, v)
    calls = {"e2e": lambda: stem.attention(q, k, v), "plan": lambda: stem.plan(q, k, v),
             "exec": lambda: stem.attention(q, k, v, plan=plan, backend="hub")}
    r: dict = {}
    for name, fn in calls.items():
        r[name] = time_ms(fn, reps=20, warmup=3)
        r[name + "_host"] = _host_ms(fn)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        calls["e2e"]()
    torch.cuda.synchronize()
    r["e2e_back_to_back"] = (time.perf_counter() - t0) / 20 * 1e3
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        calls["e2e"]()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    r["n_kernels"] = len(events)
    r["gpu_kernel_ms_sum"] = sum(e.device_time for e in events) / 1e3
    r["kernels"] = {}
    for e in events:
        r["kernels"][e.name[:60]] = r["kernels"].get(e.name[:60], 0.0) + e.device_time / 1e3
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                calls["e2e"]()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            calls["e2e"]()
        r["graph"] = time_ms(graph.replay, reps=20, warmup=3)
    except Exception as exc:  # report, do not fail the other measurements
        r["graph_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.hub.e2e_breakdown", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("e2e_breakdown needs a CUDA GPU", file=sys.stderr)
        return 2
    results = {}
    for L in args.lengths:
        r = results[L] = breakdown(L)
        print(L, {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items() if k != "kernels"}, flush=True)
        for name, ms in sorted(r["kernels"].items(), key=lambda x: -x[1])[:8]:
            print(f"   {ms:8.3f} ms  {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results,
                       "command": "python -m benchmarks.hub.e2e_breakdown " + " ".join(
                           sys.argv[1:] if argv is None else argv)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
