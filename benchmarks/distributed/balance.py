"""Predicted load balance and memory of context-parallel Stem, from the budgets alone (no GPU).

Stem's per-row work is known before planning: query block ``i`` of an ``n``-block sequence keeps
``min(k_i, i + 1)`` top-k blocks plus up to ``sinks + window`` forced ones (fewer where they
overlap the top-k picks, which depends on the data), and every kept block costs the same
``4 * bs^2 * D`` FLOPs per query head. This tool sums that work over the query blocks each rank
owns under a layout and reports, per (world size, length):

* per-rank work (lower and upper bound) and the compute efficiency ``mean / max`` it allows: the
  best speed-up over one GPU is ``W * efficiency`` before any communication;
* the K/V one rank receives per layer in the all-gather, and the memory the gathered K/V takes
  (``2 * L * Hkv * D * bytes``), against the device memory: where it stops fitting, a ring of K/V
  blocks would be needed instead.

    python -m benchmarks.distributed.balance --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os

from stem.budget import block_budgets
from stem.config import StemConfig


def row_work(n: int, cfg: StemConfig) -> tuple[list[int], list[int]]:
    """(lower, upper) kept blocks of each of the n query blocks (prefill)."""
    b = block_budgets(n, cfg.alpha, cfg.k_rate, cfg.k_bias)
    lo = [min(b[i], i + 1) for i in range(n)]
    hi = [min(b[i] + cfg.sink_blocks + cfg.window_blocks, i + 1) for i in range(n)]
    return lo, hi


def layout_blocks(n: int, world: int, layout: str) -> list[list[int]]:
    """Query blocks of each rank (block-aligned chunks; n divisible by the chunk count)."""
    if layout == "contiguous":
        c = n // world
        return [list(range(r * c, (r + 1) * c)) for r in range(world)]
    c = n // (2 * world)
    return [list(range(r * c, (r + 1) * c)) + list(range((2 * world - 1 - r) * c, (2 * world - r) * c))
            for r in range(world)]


def predict(L: int, world: int, layout: str, cfg: StemConfig, hkv: int, d: int, elt: int, mem_gib: float) -> dict:
    n = L // cfg.block_size
    lo, hi = row_work(n, cfg)
    ranks = layout_blocks(n, world, layout)
    work_lo = [sum(lo[i] for i in blocks) for blocks in ranks]
    work_hi = [sum(hi[i] for i in blocks) for blocks in ranks]
    eff = [sum(w) / len(w) / max(w) for w in (work_lo, work_hi)]
    kv_full = 2 * L * hkv * d * elt
    return {
        "length": L, "world": world, "layout": layout, "blocks": n,
        "rank_blocks_lower": work_lo, "rank_blocks_upper": work_hi,
        "efficiency_bound": min(eff), "efficiency_bound_range": eff,
        "single_gpu_blocks_lower": sum(lo),
        "kv_received_per_rank_gib": kv_full * (world - 1) / world / 2**30,
        "kv_gathered_gib": kv_full / 2**30,
        "kv_gathered_fits": kv_full / 2**30 < 0.5 * mem_gib,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--lengths", type=int, nargs="+", default=[262144, 524288, 1048576])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--bytes", type=int, default=2, help="bytes per K/V element (bf16: 2)")
    p.add_argument("--memory-gib", type=float, default=141.0, help="device memory (H200: 141)")
    a = p.parse_args(argv)
    cfg = StemConfig()
    rows = [predict(L, W, layout, cfg, a.kv_heads, a.head_dim, a.bytes, a.memory_gib)
            for L in a.lengths for W in a.worlds for layout in ("zigzag", "contiguous")]
    data = {"config": cfg.to_dict(), "kv_heads": a.kv_heads, "head_dim": a.head_dim, "memory_gib": a.memory_gib,
            "command": "python -m benchmarks.distributed.balance " + " ".join(argv or []), "rows": rows}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "cp_balance_model.json"), "w") as f:
        json.dump(data, f, indent=1)
    print(f"{'L':>8} {'W':>2} {'layout':>10} | {'efficiency bound':>16} | {'K/V in per rank':>15} {'gathered K/V':>12}")
    for r in rows:
        print(f"{r['length']:>8} {r['world']:>2} {r['layout']:>10} | {r['efficiency_bound']:>16.3f} | "
              f"{r['kv_received_per_rank_gib']:>11.2f} GiB {r['kv_gathered_gib']:>8.2f} GiB")
    return data


if __name__ == "__main__":
    main()
