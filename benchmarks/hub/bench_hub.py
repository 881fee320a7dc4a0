#!/usr/bin/env python3
"""Time the compiled stem-attention Hub kernel beside the Triton executor and dense cuDNN SDPA.

    python benchmarks/hub/bench_hub.py --lengths 32768 131072 --json out.json
    python benchmarks/hub/bench_hub.py --shapes 8:4:256 32:8:128 --lengths 32768 131072

Run from the repository root after `python hub_kernels/build.py`; the kernel is loaded with
kernels.get_kernel from that build (LOCAL_KERNELS). Shapes (`--shapes Hq:Hkv:D`, default 32:8:128):
B=1, bf16, random data, the default StemConfig plan (its planning time is timed too, for the end to
end time plan + hub kernel). Timings are medians over CUDA-event-timed repeats after warm-up.
The hub kernel is timed as `auto` picks (the sm90 kernel on Hopper) and with kernel="sm80" (the
same op's sm80 kernel). Reports TFLOP/s of the sparse kernels on the selected blocks (causal pairs
only) and of dense cuDNN on the causal triangle.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

from stem.bench import random_qkv, time_ms

ROOT = Path(__file__).resolve().parents[2]
KERNEL_DIR = ROOT / "hub_kernels" / "stem-attention"
REPO_ID = "stem-attention/stem-attention"


def selected_pairs(plan) -> int:
    """Causal (query, key) pairs inside the selected blocks (diagonal blocks count their triangle)."""
    bs, B, H = plan.block_size, plan.batch_size, plan.num_heads
    total = int(plan.kv_counts.sum()) * bs * bs
    # every plan row keeps its diagonal block in a Stem plan: subtract the masked upper triangle
    return total - plan.num_q_blocks * B * H * (bs * (bs - 1) // 2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--shapes", nargs="+", default=["32:8:128"], help="Hq:Hkv:D, each timed at every length")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--hub-only", action="store_true", help="time only the hub kernel (both of its kernels)")
    args = ap.parse_args(argv)

    import kernels
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import stem
    from stem.config import StemConfig

    os.environ["LOCAL_KERNELS"] = f"{REPO_ID}={KERNEL_DIR}"
    hub = kernels.get_kernel(REPO_ID, version=1)
    triton_run = None
    if not args.hub_only:
        try:
            from stem_backends.triton.executor import run_block_sparse_attention as triton_run
        except Exception as e:  # noqa: BLE001 - report, keep timing the rest
            print(f"triton executor unavailable: {e}")

    dev = torch.cuda.get_device_name()
    B = 1
    shapes = [tuple(int(x) for x in s.split(":")) for s in args.shapes]
    rows = []
    for (Hq, Hkv, D), L in ((s, L) for s in shapes for L in args.lengths):
        scale = 1 / math.sqrt(D)
        q, k, v = random_qkv(B, Hq, Hkv, L, D, dtype=torch.bfloat16, device="cuda", seed=L)
        plan = stem.plan(q, k, v, StemConfig())
        pairs = selected_pairs(plan)
        sparse_flop = 4.0 * D * pairs
        dense_flop = 4.0 * D * B * Hq * L * (L + 1) / 2
        row = {"B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "L": L, "device": dev, "density": plan.density,
               "selected_pairs": pairs}
        row["plan_ms"] = time_ms(lambda q=q, k=k, v=v: stem.plan(q, k, v, StemConfig()), reps=args.reps)

        def run_hub(q=q, k=k, v=v, plan=plan, kernel="auto", scale=scale):
            return hub.block_sparse_attn_fwd(q, k, v, plan.kv_counts, plan.kv_indices, plan.block_size,
                                             plan.q_offset, scale, False, kernel=kernel)

        out_hub = run_hub()[0]
        row["hub_ms"] = time_ms(run_hub, reps=args.reps)
        row["hub_kernel"] = f"sm{hub.ops.last_kernel_path()}"
        row["hub_tflops_selected"] = sparse_flop / row["hub_ms"] / 1e9
        if row["hub_kernel"] == "sm90":  # the same op's sm80 kernel, asked for by name
            out80 = run_hub(kernel="sm80")[0]
            assert hub.ops.last_kernel_path() == 80
            row["hub_sm80_ms"] = time_ms(lambda: run_hub(kernel="sm80"), reps=args.reps)
            row["sm90_vs_sm80_rel_diff"] = float((out80.float() - out_hub.float()).norm() / out_hub.float().norm())
            del out80
        if triton_run is not None:
            def run_triton(q=q, k=k, v=v, plan=plan, scale=scale):
                return triton_run(q, k, v, plan, scale, False)

            out_tr = run_triton()[0]
            row["triton_ms"] = time_ms(run_triton, reps=args.reps)
            row["triton_tflops_selected"] = sparse_flop / row["triton_ms"] / 1e9
            row["hub_vs_triton_rel_err"] = float((out_hub.float() - out_tr.float()).norm() / out_tr.float().norm())
            row["speedup_vs_triton"] = row["triton_ms"] / row["hub_ms"]
            del out_tr
        kr = k.repeat_interleave(Hq // Hkv, dim=1)
        vr = v.repeat_interleave(Hq // Hkv, dim=1)
        for name, backend in () if args.hub_only else (("cudnn", SDPBackend.CUDNN_ATTENTION),):
            try:
                with sdpa_kernel(backend):
                    def run_dense(q=q, kr=kr, vr=vr):
                        return torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True)

                    run_dense()
                    row[f"{name}_dense_ms"] = time_ms(run_dense, reps=max(3, args.reps // 2))
                row[f"{name}_dense_tflops"] = dense_flop / row[f"{name}_dense_ms"] / 1e9
            except Exception as e:  # noqa: BLE001
                row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:200]
        if "cudnn_dense_tflops" in row:
            row["hub_frac_of_cudnn_tflops"] = row["hub_tflops_selected"] / row["cudnn_dense_tflops"]
            row["speedup_vs_cudnn_dense"] = row["cudnn_dense_ms"] / row["hub_ms"]
            row["end_to_end_ms"] = row["plan_ms"] + row["hub_ms"]
            row["end_to_end_speedup_vs_cudnn_dense"] = row["cudnn_dense_ms"] / row["end_to_end_ms"]
        rows.append(row)
        del q, k, v, kr, vr, plan, out_hub
        torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)

    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print(f"\n{dev}: B=1 bf16, default StemConfig plan; e2e = plan + hub")
    hdr = (f"{'Hq:Hkv:D':>9} {'L':>7} {'dens':>5} {'kernel':>6} {'hub ms':>8} {'sm80 ms':>8} {'triton ms':>9} "
           f"{'x trit':>6} {'cudnn ms':>9} {'hub TF/s':>8} {'cudnn TF/s':>10} {'hub/cudnn':>9} {'plan ms':>7} "
           f"{'e2e x cudnn':>11}")
    print(hdr)
    for r in rows:
        print(f"{r['Hq']:>3}:{r['Hkv']}:{r['D']:<3} {r['L']:>7} {r['density']:>5.2f} {r['hub_kernel']:>6} "
              f"{r['hub_ms']:>8.2f} "
              f"{r.get('hub_sm80_ms', float('nan')):>8.2f} {r.get('triton_ms', float('nan')):>9.2f} "
              f"{r.get('speedup_vs_triton', float('nan')):>6.2f} {r.get('cudnn_dense_ms', float('nan')):>9.2f} "
              f"{r['hub_tflops_selected']:>8.1f} {r.get('cudnn_dense_tflops', float('nan')):>10.1f} "
              f"{r.get('hub_frac_of_cudnn_tflops', float('nan')):>9.2f} {r['plan_ms']:>7.2f} "
              f"{r.get('end_to_end_speedup_vs_cudnn_dense', float('nan')):>11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
