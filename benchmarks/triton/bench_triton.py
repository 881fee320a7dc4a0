"""The Triton executor against FlexAttention on the same plan, the Hub kernel and dense cuDNN.

Run from the repository root (kernel built with ``python hub_kernels/build.py`` and
``LOCAL_KERNELS=stem-attention/stem-attention=hub_kernels/stem-attention`` to include the Hub
kernel; without it that column is empty):

    python -m benchmarks.triton.bench_triton [--sweep] [--lengths 32768,65536,131072] [--extra]

Shapes: B=1, Hq=32, Hkv=8, D=128, bf16, default StemConfig plan, random data
(``stem.bench.random_qkv``); ``--extra`` adds D=64 Hq=14 Hkv=2 at 128K and D=256 Hq=8 Hkv=4 at 32K.
FlexAttention (compiled) runs the identical plan through ``BlockPlan.to_flex_block_mask``. FLOPs
are counted on the selected blocks only: 4·D per causal (query, key) pair inside them (diagonal
blocks count their lower triangle); dense cuDNN on the causal triangle. Times: ``stem.bench.time_ms``
medians (CUDA events, warm L2). ``--sweep`` also times the kernel's other tile and code-generation
configurations (``VARIANTS``) in every row. Writes bench_triton_<card>.json (+ .png) into --out and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import stem
from stem.bench import random_qkv, time_ms
from stem.dispatch import first_party

first_party()
from stem_backends.triton.executor import run_block_sparse_attention  # noqa: E402

HUB_REPO = "stem-attention/stem-attention"

# head dim -> variant name -> options of run_block_sparse_attention ("default": what the executor
# runs, i.e. pick_tiles' table). With explicit tiles the register cap and masked-tile TMA are off
# unless given.
VARIANTS = {
    128: {"default": {},
          "m128_n128_w8_s3": dict(block_m=128, block_n=128, num_warps=8, num_stages=3),
          "m128_n128_w8_s3_tmamask": dict(block_m=128, block_n=128, num_warps=8, num_stages=3, tma_masked=True),
          "m128_n64_w8_s2_nocap": dict(block_m=128, block_n=64, num_warps=8, num_stages=2, tma_masked=True),
          "m64_n64_w4_s2": dict(block_m=64, block_n=64, num_warps=4, num_stages=2),
          "plain_loads": dict(use_tma=False)},
    64: {"default": {}, "m128_n128_w4_s2_tmamask": dict(block_m=128, block_n=128, num_warps=4, num_stages=2,
                                                       tma_masked=True),
         "m128_n64_w4_s3": dict(block_m=128, block_n=64, num_warps=4, num_stages=3)},
    256: {"default": {}, "m64_n64_w4_s2": dict(block_m=64, block_n=64, num_warps=4, num_stages=2),
          "m128_n64_w8_s2_tmamask": dict(block_m=128, block_n=64, num_warps=8, num_stages=2, tma_masked=True)},
}


def selected_flops(plan, D: int) -> float:
    """4·D per causal (query, key) pair inside the selected blocks: kv_counts · bs² pairs, less the
    masked upper triangle (bs·(bs-1)/2 pairs) of every selected diagonal block. Full-length rows
    only (Lq a multiple of bs, q_offset 0)."""
    bs = plan.block_size
    nq = plan.kv_counts.shape[-1]
    W = plan.kv_indices.shape[-1]
    diag = (torch.arange(nq, device=plan.kv_counts.device) + plan.q_offset // bs).view(1, 1, nq, 1)
    valid = torch.arange(W, device=plan.kv_counts.device).view(1, 1, 1, W) < plan.kv_counts.unsqueeze(-1)
    n_diag = int(((plan.kv_indices == diag) & valid).sum())
    n_sel = int(plan.kv_counts.sum())
    return 4.0 * D * (n_sel * bs * bs - n_diag * bs * (bs - 1) // 2)


def load_hub():
    if not os.environ.get("LOCAL_KERNELS"):
        return None
    try:
        import kernels

        return kernels.get_kernel(HUB_REPO, version=1)
    except Exception as e:  # noqa: BLE001 - report, keep timing the rest
        print(f"[hub] unavailable: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return None


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def measure(shape, L, reps, hub, variants, with_flex=True, with_cudnn=True):
    """One row: every Triton variant, FlexAttention on the same plan, the Hub kernel, dense cuDNN."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    Hq, Hkv, D = shape
    q, k, v = random_qkv(1, Hq, Hkv, L, D, dtype=torch.bfloat16, device="cuda", seed=L + D)
    scale = 1 / math.sqrt(D)
    plan = stem.plan(q, k, v, stem.StemConfig())
    flop = selected_flops(plan, D)
    dense_flop = 4.0 * D * Hq * L * (L + 1) / 2
    row = {"L": L, "Hq": Hq, "Hkv": Hkv, "D": D, "density": plan.density, "selected_tflop": flop / 1e12,
           "triton": {}}
    ref = None
    if with_flex:
        bm = plan.to_flex_block_mask()
        fa = torch.compile(flex_attention, dynamic=False)

        def flex():
            return fa(q, k, v, block_mask=bm, scale=scale, enable_gqa=True)

        try:
            ref = flex()
            row["flex_ms"] = time_ms(flex, reps=reps, warmup=3)
            row["flex_tflops"] = flop / row["flex_ms"] / 1e9
        except Exception as e:  # noqa: BLE001
            print(f"[flex] {type(e).__name__}: {str(e)[:300]}", flush=True)
    for name, opts in variants.items():
        def tri(opts=opts):
            return run_block_sparse_attention(q, k, v, plan, scale, False, **opts)[0]

        try:
            t0 = time.time()
            o = tri()
            torch.cuda.synchronize()
            err = rel(o, ref) if ref is not None else None
            ms = time_ms(tri, reps=reps, warmup=3)
            row["triton"][name] = {"ms": ms, "tflops": flop / ms / 1e9, "rel_err_vs_flex": err,
                                   "first_call_s": round(time.time() - t0, 1)}
            if err is not None and not err < 2e-2:
                print(f"[{name}] WRONG rel err vs flex {err}", flush=True)
                row["triton"][name]["ms"] = None
            print(f"[L={L} D={D}] {name}: {ms:.3f} ms {flop / ms / 1e9:.0f} TFLOP/s err {err}", flush=True)
        except Exception as e:  # noqa: BLE001 - a variant that does not compile or fit is reported
            row["triton"][name] = {"ms": None, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"[L={L} D={D}] {name}: failed {type(e).__name__}: {str(e)[:300]}", flush=True)
    if hub is not None:
        def run_hub():
            return hub.block_sparse_attn_fwd(q, k, v, plan.kv_counts, plan.kv_indices, plan.block_size,
                                             plan.q_offset, scale, False)
        try:
            o = run_hub()[0]
            row["hub_rel_err_vs_flex"] = rel(o, ref) if ref is not None else None
            row["hub_ms"] = time_ms(run_hub, reps=reps, warmup=3)
            row["hub_tflops"] = flop / row["hub_ms"] / 1e9
        except Exception as e:  # noqa: BLE001
            print(f"[hub] {type(e).__name__}: {str(e)[:300]}", flush=True)
    if with_cudnn:
        kr, vr = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
        try:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                def dense():
                    return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
                row["cudnn_dense_ms"] = time_ms(dense, reps=max(3, reps // 2), warmup=2)
            row["cudnn_dense_tflops"] = dense_flop / row["cudnn_dense_ms"] / 1e9
        except Exception as e:  # noqa: BLE001
            print(f"[cudnn] {type(e).__name__}: {str(e)[:300]}", flush=True)
    ok = {n: r["ms"] for n, r in row["triton"].items() if r.get("ms")}
    if ok:
        row["triton_best"] = min(ok, key=ok.get)
    if "default" in ok and row.get("flex_ms"):
        row["flex_over_triton"] = row["flex_ms"] / ok["default"]
    if "default" in ok and row.get("hub_ms"):
        row["triton_over_hub"] = ok["default"] / row["hub_ms"]
    print("[row] " + json.dumps(row), flush=True)
    return row


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["table"]
    labels = [f"{r['L'] // 1024}K D{r['D']}\nHq{r['Hq']} Hkv{r['Hkv']}" for r in rows]

    def best(r):
        return r["triton"].get(r.get("triton_best"), {}).get("ms")

    series = [("Triton, default tiles", lambda r: r["triton"].get("default", {}).get("ms")),
              ("Triton, best tiles of the row", best),
              ("Flex, same plan", lambda r: r.get("flex_ms")), ("Hub kernel", lambda r: r.get("hub_ms")),
              ("cuDNN dense", lambda r: r.get("cudnn_dense_ms"))]
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    w = 0.16
    for j, (name, get) in enumerate(series):
        ms = [get(r) or 0.0 for r in rows]
        tf = [(r["selected_tflop"] * 1e3 / get(r)) if get(r) else 0.0 for r in rows]
        if name == "cuDNN dense":
            tf = [r.get("cudnn_dense_tflops", 0.0) for r in rows]
        x = [i + (j - 2) * w for i in range(len(rows))]
        ax[0].bar(x, ms, w, label=name)
        ax[1].bar(x, tf, w, label=name)
    ax[0].set_yscale("log")
    ax[0].set_ylabel("ms (log)")
    ax[1].set_ylabel("TFLOP/s (selected blocks; cuDNN: causal triangle)")
    for a in ax:
        a.set_xticks(range(len(rows)))
        a.set_xticklabels(labels, fontsize=8)
        a.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{results['card']}, bf16, B=1, default Stem plan; torch {results['torch']}, "
                 f"triton {results['triton']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _without_out(args):
    """The command line without ``--out DIR`` (a local folder, not a parameter of the measurement)."""
    out, skip = [], False
    for a in args:
        if skip or a.startswith("--out="):
            skip = False
            continue
        skip = a == "--out"
        if not skip:
            out.append(a)
    return out


def main(argv=None):
    import triton

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="32768,65536,131072")
    ap.add_argument("--sweep", action="store_true", help="also time the kernel's other configurations (VARIANTS)")
    ap.add_argument("--extra", action="store_true", help="add D=64 Hq=14 Hkv=2 128K and D=256 Hq=8 Hkv=4 32K")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    args = ap.parse_args(argv)
    t0 = time.time()
    card = torch.cuda.get_device_name()
    results = {"card": card, "torch": torch.__version__, "triton": triton.__version__, "stem": stem.__version__,
               "command": " ".join(["python -m benchmarks.triton.bench_triton", *_without_out(argv or sys.argv[1:])]),
               "timing": "stem.bench.time_ms: CUDA events, median, warm L2",
               "flops": "selected blocks: 4*D per causal (q, k) pair inside them; cuDNN: causal triangle"}
    hub = load_hub()

    def variants(D):
        return VARIANTS[D] if args.sweep else {"default": {}}

    table = []
    for L in (int(x) for x in args.lengths.split(",") if x):
        table.append(measure((32, 8, 128), L, args.reps, hub, variants(128)))
        torch.cuda.empty_cache()
    if args.extra:
        table.append(measure((14, 2, 64), 131072, args.reps, hub, variants(64)))
        table.append(measure((8, 4, 256), 32768, args.reps, hub, variants(256)))
    results["table"] = table
    results["seconds"] = round(time.time() - t0)
    os.makedirs(args.out, exist_ok=True)
    tag = card.replace(" ", "_")
    with open(os.path.join(args.out, f"bench_triton_{tag}.json"), "w") as f:
        json.dump(results, f, indent=1)
    try:
        plot(results, os.path.join(args.out, f"bench_triton_{tag}.png"))
    except Exception as e:  # noqa: BLE001
        print(f"[plot] {e}", flush=True)
    for r in table:
        if len(r["triton"]) > 1:
            print(f"\nvariants L={r['L']} D={r['D']}: flex {r.get('flex_ms')} ms")
            for n, t in sorted(r["triton"].items(), key=lambda kv: kv[1].get("ms") or 1e9):
                print(f"  {n:>20} {t.get('ms') or float('nan'):8.3f} ms  {t.get('tflops', 0):5.0f} TF/s")
    print(f"\n{card}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"{'shape':>22} {'dens':>5} {'triton':>8} {'best':>8} {'flex':>8} {'hub':>8} {'cudnn':>8} "
          f"{'flex/tri':>8} {'tri/hub':>7} {'TF tri':>6} {'TF flex':>7} {'TF hub':>6} {'TF cudnn':>8}")
    for r in table:
        t = r["triton"].get("default", {})
        b = r["triton"].get(r.get("triton_best"), {})
        print(f"{r['L']:>7} D{r['D']:<3} Hq{r['Hq']:<2} Hkv{r['Hkv']:<2} {r['density']:5.2f} "
              f"{t.get('ms') or float('nan'):8.2f} {b.get('ms') or float('nan'):8.2f} "
              f"{r.get('flex_ms', float('nan')):8.2f} {r.get('hub_ms', float('nan')):8.2f} "
              f"{r.get('cudnn_dense_ms', float('nan')):8.2f} {r.get('flex_over_triton', float('nan')):8.3f} "
              f"{r.get('triton_over_hub', float('nan')):7.3f} {t.get('tflops', float('nan')):6.0f} "
              f"{r.get('flex_tflops', float('nan')):7.0f} {r.get('hub_tflops', float('nan')):6.0f} "
              f"{r.get('cudnn_dense_tflops', float('nan')):8.0f}  best={r.get('triton_best')}")
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
