"""Measure where ``backend="auto"`` should switch from dense SDPA to the Stem plan: sparse end to end
(``stem.attention`` planning + the auto-chosen sparse executor) against dense SDPA as the dense
path runs it (cuDNN first), for head dims 64 / 128 / 256 and GQA ratios 1 / 4 / 8 (Hq 32, or --heads), over
8K-64K tokens, bf16, default StemConfig.

    python -m benchmarks.planner.calibrate_auto --out benchmarks/results
    python -m benchmarks.planner.calibrate_auto --table-from benchmarks/results/calibrate_auto_X.json

Per (sparse executor, D, G) it prints the crossover as a budget density (``stem.budget.min_density``
of the whole prefill), keyed by (D, G, Hq): the midpoint between the density of the longest length where dense was
faster and the shortest length from which sparse was faster at every measured length. The table
``_CROSSOVER`` in ``stem/api.py`` holds these numbers. Writes ``calibrate_auto_<tag>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

LENGTHS = [8192, 12288, 16384, 20480, 24576, 32768, 49152, 65536]


def crossover(points: list[dict]) -> float:
    """Density threshold from measured points (dicts with density, dense_ms, sparse_ms): auto
    runs dense where the budget density is above it."""
    pts = sorted(points, key=lambda p: -p["density"])  # short (dense-ish) to long
    wins = [p["sparse_ms"] < p["dense_ms"] for p in pts]
    first = next((i for i in range(len(pts)) if all(wins[i:])), None)
    if first is None:  # sparse never wins from some length on: dense everywhere measured
        return round(pts[-1]["density"] - 1e-3, 4)
    if first == 0:  # sparse wins everywhere measured
        return round(min(1.0, pts[0]["density"] + 1e-3), 4)
    return round((pts[first - 1]["density"] + pts[first]["density"]) / 2, 4)


def _measure(Hq: int, Hkv: int, L: int, D: int, cfg, reps: int) -> dict:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import stem
    from stem.bench import random_qkv, time_ms
    from stem.budget import min_density

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    q, k, v = random_qkv(1, Hq, Hkv, L, D, seed=L, v_scale=(0.2, 3.0))

    def dense():
        with sdpa_kernel(order, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hq != Hkv)

    sparse_cfg = cfg.replace(auto_dense_above=2.0)
    n = -(-L // cfg.block_size)
    row = {"D": D, "G": Hq // Hkv, "Hq": Hq, "Hkv": Hkv, "L": L,
           "density": min_density(n, cfg.alpha, cfg.k_rate, cfg.k_bias),
           "dense_ms": time_ms(dense, reps),
           "sparse_ms": time_ms(lambda: stem.attention(q, k, v, config=sparse_cfg), reps)}
    why = stem.last_dispatch() or "auto -> ?"
    row["executor"] = why.split()[2]
    row["plan_ms"] = time_ms(lambda: stem.plan(q, k, v, cfg), reps)
    return row


def _key(key: str) -> tuple[int, int, int]:
    """"D,G,Hq" (or "D,G" from files written before the head count was a key: Hq 32) -> a table key."""
    parts = [int(x) for x in key.split(",")]
    return (parts[0], parts[1], parts[2] if len(parts) > 2 else 32)


def write_table(table: dict) -> None:
    """Replace the ``_CROSSOVER = ...`` line of stem/api.py with ``table`` merged into it."""
    import stem.api

    merged = {ex: dict(rows) for ex, rows in stem.api._CROSSOVER.items()}
    for ex, rows in table.items():
        merged.setdefault(ex, {}).update({_key(key): val for key, val in rows.items()})
    path = stem.api.__file__
    lines = open(path).read().split("\n")
    at = next(i for i, ln in enumerate(lines) if ln.startswith("_CROSSOVER = "))
    body = {ex: dict(sorted(rows.items())) for ex, rows in sorted(merged.items())}
    lines[at] = f"_CROSSOVER = {body!r}  # noqa: E501"
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print(lines[at])


def main(argv=None) -> int:
    import torch

    import stem
    from stem.bench import _versions

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="stem_bench")
    p.add_argument("--tag", default=None)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--gqa", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--write-table", action="store_true",
                   help="write the measured crossovers into stem/api.py's _CROSSOVER (other executors' rows kept)")
    p.add_argument("--table-from", default=None, metavar="JSON",
                   help="measure nothing: write the crossovers of a calibrate_auto JSON into stem/api.py")
    args = p.parse_args(argv)
    if args.table_from:
        with open(args.table_from) as f:
            write_table(json.load(f)["crossover_density"])
        return 0
    cfg = stem.StemConfig()
    rows, table = [], {}
    card = torch.cuda.get_device_name(0)
    os.makedirs(args.out, exist_ok=True)
    tag = args.tag or card.replace(" ", "_").replace("/", "_")
    path = os.path.join(args.out, f"calibrate_auto_{tag}.json")

    def save():  # after every (D, G): a run cut short keeps what it measured
        res = {"card": card, "versions": _versions(), "config": cfg.to_dict(), "dtype": "bfloat16",
               "command": " ".join(["python", "-m", "benchmarks.planner.calibrate_auto",
                                    *(argv if argv is not None else sys.argv[1:])]),
               "crossover_density": table, "rows": rows}
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        if args.write_table:
            write_table(table)

    for D in args.head_dims:
        for G in args.gqa:
            Hq, Hkv = args.heads, args.heads // G
            pts = []
            for L in args.lengths:
                row = _measure(Hq, Hkv, L, D, cfg, args.reps)
                pts.append(row)
                rows.append(row)
                print(f"D {D} G {G} L {L}: density {row['density']:.3f} dense {row['dense_ms']:.3f} sparse "
                      f"{row['sparse_ms']:.3f} (plan {row['plan_ms']:.3f}, {row['executor']})", flush=True)
                torch.cuda.empty_cache()
            ex = pts[-1]["executor"]
            table.setdefault(ex, {})[f"{D},{G},{Hq}"] = crossover(pts)
            save()
    print("crossover density (auto runs dense above it):", json.dumps(table))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
