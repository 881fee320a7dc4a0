"""Context-parallel Stem prefill (stem.distributed) on several GPUs: per-rank time vs one GPU.

Run from the repository root with torchrun's module mode (no path set-up needed):

    torchrun --nproc-per-node=2 -m benchmarks.distributed.bench_distributed --seqs 131072,262144,524288

Shapes: B=1, Hq=32, Hkv=8, D=128, bf16, default StemConfig, random data (``stem.bench.random_qkv``,
value norms spread over [0.2, 3.2) so the value bonus has something to read). For each length L:

* one GPU: ``stem.attention`` on the whole sequence, timed on rank 0 (the other ranks wait);
* W GPUs: ``stem.distributed.attention`` on zigzag shards (and contiguous with --contiguous),
  every rank timed by ``stem.bench.time_ms`` with a barrier before each run; the step time is the
  slowest rank's;
* the K/V all-gather alone (communication floor), and the scaling efficiency T1 / (W * T_W).

Medians over --iters runs after one warm-up. Rank 0 writes bench_distributed.json into $OUT (or
benchmarks/results/) and prints a table last. NVLink multicast stays off.
"""

from __future__ import annotations

import os

# NVLink multicast can take shared GPUs out of service: keep it off whatever the caller's env says.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from stem.bench import random_qkv, time_ms  # noqa: E402

B, HQ, HKV, D = 1, 32, 8, 128
DTYPE = torch.bfloat16
V_SCALE = (0.2, 3.2)


def results_dir() -> str:
    """$OUT if set, else benchmarks/results of this checkout."""
    out = os.environ.get("OUT") or str(Path(__file__).resolve().parents[1] / "results")
    os.makedirs(out, exist_ok=True)
    return out


def versions() -> dict:
    import stem

    return {"stem": stem.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
            "python": platform.python_version()}


def check_executor(dev) -> None:
    """On CUDA, fail early unless a fast sparse executor (hub or triton) is usable: the reference
    executor is an oracle, far too slow for these lengths."""
    from stem.dispatch import executor_status

    if dev.type != "cuda":
        return
    usable = [r.name for r in executor_status(dev) if r.usable and r.name in ("hub", "triton")]
    if not usable:
        raise SystemExit("no fast stem executor (hub or triton) is usable on this GPU; `stem info` says why")


def init_dist():
    """NCCL, one GPU per process (gloo on CPU: only for a smoke run of dist_check)."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.cuda.is_available():
        dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local)


def device_name(dev) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def rank_time(fn, iters: int, dev, group=None, barrier: bool = True) -> float:
    """Median ms per call of ``fn`` on this rank (``time_ms``), each run started after a barrier."""
    before = functools.partial(dist.barrier, group=group) if barrier else None
    return time_ms(fn, reps=iters, warmup=1, device=dev, before=before)


def slowest(x: float, dev) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def local_inputs(L: int, rank: int, world: int, device, seed: int):
    """This rank's shard-sized q, k, v (random: timing does not depend on which shard it is)."""
    return random_qkv(B, HQ, HKV, L // world, D, dtype=DTYPE, device=device, seed=seed * 1000 + rank,
                      v_scale=V_SCALE)


def bench_length(stem, sd, L, rank, world, dev, layouts, args) -> dict:
    row = {"L": L, "world": world, "device": device_name(dev)}
    if L <= args.single_max:  # one GPU: the whole sequence on rank 0 while the others wait
        if rank == 0:
            q, k, v = local_inputs(L, 0, 1, dev, seed=L)
            t1 = rank_time(functools.partial(stem.attention, q, k, v), args.iters, dev, barrier=False)
            row.update(one_gpu_ms=t1, one_gpu_dispatch=stem.last_dispatch(), density=stem.plan(q, k, v).density)
            del q, k, v
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        dist.barrier()
    q, k, v = local_inputs(L, rank, world, dev, seed=L + 1)
    for layout in layouts:
        for planner in ("stats", "full"):
            fn = functools.partial(sd.attention, q, k, v, layout=layout, planner=planner)
            t = rank_time(fn, args.iters, dev)
            all_ranks = [None] * world
            dist.all_gather_object(all_ranks, t)
            row[f"{layout}_{planner}_per_rank_ms"] = all_ranks
            row[f"{layout}_{planner}_step_ms"] = max(all_ranks)
    # communication floor: the K/V all-gather alone (zigzag reorder included)
    tc = rank_time(functools.partial(gather_kv, sd, k, v), args.iters, dev)
    row["kv_allgather_ms"] = slowest(tc, dev)
    if "one_gpu_ms" in row:
        for key in [key for key in row if key.endswith("_step_ms")]:
            row[key.replace("_step_ms", "_efficiency")] = row["one_gpu_ms"] / (world * row[key])
    return row


def gather_kv(sd, k, v):
    sd.unshard(k, layout="zigzag")
    sd.unshard(v, layout="zigzag")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="131072,262144,524288")
    ap.add_argument("--single-max", type=int, default=524288, help="largest L timed on one GPU")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--contiguous", action="store_true", help="also time the contiguous layout")
    ap.add_argument("--budget-s", type=float, default=150.0, help="skip remaining sizes past this wall time")
    args = ap.parse_args(argv)
    import stem
    import stem.distributed as sd

    rank, world, dev = init_dist()
    check_executor(dev)
    out_dir = results_dir() if rank == 0 else None
    command = " ".join(["torchrun", f"--nproc-per-node={world}", "-m", "benchmarks.distributed.bench_distributed",
                        *sys.argv[1:]])
    t_start = time.time()
    rows = []
    layouts = ["zigzag"] + (["contiguous"] if args.contiguous else [])
    for L in [int(s) for s in args.seqs.split(",")]:
        stop = torch.tensor([time.time() - t_start > args.budget_s], device=dev)
        dist.broadcast(stop, 0)  # rank 0 decides, so that every rank leaves the loop together
        if bool(stop):
            if rank == 0:
                print(f"[bench] skipping L={L}: past the --budget-s wall budget", flush=True)
            break
        rows.append(bench_length(stem, sd, L, rank, world, dev, layouts, args))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if rank == 0:
            print(json.dumps(rows[-1]), flush=True)
            with open(os.path.join(out_dir, "bench_distributed.json"), "w") as f:
                json.dump({"command": command, "world": world, "device": device_name(dev), "versions": versions(),
                           "shape": dict(B=B, Hq=HQ, Hkv=HKV, D=D, dtype=str(DTYPE), v_scale=V_SCALE),
                           "rows": rows}, f, indent=1)
    if rank == 0:
        print(f"\ncontext-parallel Stem, {world} x {rows[0]['device'] if rows else '?'}, B=1 Hq=32 Hkv=8 D=128 bf16")
        print(f"{'L':>8} {'density':>7} {'1 GPU ms':>9} {'zz stats':>9} {'zz full':>9} {'allgather':>9} {'eff.':>5}")
        for r in rows:
            print(f"{r['L']:>8} {r.get('density', float('nan')):7.3f} {r.get('one_gpu_ms', float('nan')):9.1f} "
                  f"{r['zigzag_stats_step_ms']:9.1f} {r['zigzag_full_step_ms']:9.1f} {r['kv_allgather_ms']:9.1f} "
                  f"{r.get('zigzag_stats_efficiency', float('nan')):5.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
