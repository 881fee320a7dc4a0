"""GPU check and timing of the ``qmean_lse`` ranking kernel beside the default planner.

    python -m benchmarks.quality.gpu_ranking            # on a CUDA machine
    TRITON_INTERPRET=1 python -m benchmarks.quality.gpu_ranking --smoke   # tiny, on CPU

1. Correctness: the Triton scores against the torch path (``stem.ranking.qmean_lse_from_means``,
   float32, with the block means rounded to bf16 as the kernel multiplies them), on fresh random
   bf16 inputs (output poisoned first), prefill and chunked prefill, and the fraction of plan
   rows whose selected blocks equal those of the torch-path plan.
2. Timing (B 1, Hq 32, Hkv 8, D 128, bf16; CUDA-event medians): ``stem.plan`` with the default
   config (the paper's planner), with ``ranking="qmean_lse"``, and the ranking kernel alone with a
   few tile shapes; and ``stem.plan`` with ``ranking="sampled_mass"`` (4 and 8 sampled rows).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import stem
from stem.ranking import block_query_means, qmean_lse_from_means, qmean_lse_scores

__all__ = ["main"]


def _median_ms(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def check(L: int, Lq: int, dev: str, H=(32, 8), D=128, bs=128, seed=0) -> dict:
    from stem_backends.triton.ranking import qmean_lse_triton

    g = torch.Generator(device=dev).manual_seed(seed)
    Hq, Hkv = H
    q = torch.randn(1, Hq, Lq, D, device=dev, generator=g).bfloat16()
    k = torch.randn(1, Hkv, L, D, device=dev, generator=g).bfloat16()
    v = torch.randn(1, Hkv, L, D, device=dev, generator=g).bfloat16()
    off = L - Lq
    qbar = block_query_means(q, off, bs)
    got = qmean_lse_triton(qbar, k, off // bs, bs, D ** -0.5)
    ref = qmean_lse_from_means(qbar.bfloat16().float(), k.float(), off // bs, bs, D ** -0.5)
    fin = torch.isfinite(ref)
    same_pattern = bool(torch.equal(fin, torch.isfinite(got)))
    rel = float((got[fin] - ref[fin]).norm() / ref[fin].norm())
    cfg = stem.StemConfig(block_size=bs, ranking="qmean_lse")
    p_kernel = stem.plan(q, k, v, cfg)
    p_torch = stem.plan(q, k, v, cfg, pooling="torch")
    rows_equal = float((p_kernel.to_dense_mask() == p_torch.to_dense_mask()).all(-1).float().mean())
    from stem_backends.triton.ranking import sampled_mass_triton

    from stem.ranking import sampled_mass_scores

    sm = sampled_mass_triton(q, k, off, bs, D ** -0.5)
    sm_ref = sampled_mass_scores(q.float(), k.float(), bs, off)
    sfin = torch.isfinite(sm_ref)
    same_pattern = same_pattern and bool(torch.equal(sfin, torch.isfinite(sm)))
    sm_rel = float((sm[sfin] - sm_ref[sfin]).norm() / sm_ref[sfin].norm())
    return {"L": L, "Lq": Lq, "same_causal_pattern": same_pattern, "rel_err": rel, "sampled_mass_rel_err": sm_rel,
            "max_abs_err": float((got[fin] - ref[fin]).abs().max()), "plan_rows_equal": rows_equal,
            "density": p_kernel.density}


# sampled_mass kernel shapes timed: (block_q, warps, stages, one pass, scratch MB); the first is the default
SAMPLED_SWEEP = ((4, 4, 3, True, 512), (4, 4, 3, False, 512), (4, 4, 2, True, 512), (4, 4, 3, True, 128),
                 (8, 4, 3, True, 512), (8, 8, 3, True, 512), (8, 8, 2, True, 512), (2, 4, 3, True, 512),
                 (4, 8, 3, True, 512))


def timing(L: int, reps: int, dev: str, H=(32, 8), D=128, bs=128) -> dict:
    from stem_backends.triton.ranking import qmean_lse_triton

    Hq, Hkv = H
    q = torch.randn(1, Hq, L, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, Hkv, L, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, Hkv, L, D, device=dev, dtype=torch.bfloat16)
    base = stem.StemConfig(block_size=bs)
    ranked = base.replace(ranking="qmean_lse")
    out = {"L": L, "plan_default_ms": _median_ms(lambda: stem.plan(q, k, v, base), reps),
           "plan_qmean_lse_ms": _median_ms(lambda: stem.plan(q, k, v, ranked), reps),
           "scores_qmean_lse_ms": _median_ms(lambda: qmean_lse_scores(q, k, bs), reps),
           "plan_sampled_mass_ms": _median_ms(lambda: stem.plan(q, k, v, base.replace(ranking="sampled_mass")), reps),
           "plan_sampled_mass_bs64_a1_ms": _median_ms(lambda: stem.plan(q, k, v, base.replace(
               ranking="sampled_mass", block_size=64, alpha=1.0)), reps),
           "plan_sampled_mass_rows8_ms": _median_ms(lambda: stem.plan(q, k, v, base.replace(
               ranking="sampled_mass", sampled_rows=8)), reps),
           "plan_sampled_mass_rows8_bs64_a1_ms": _median_ms(lambda: stem.plan(q, k, v, base.replace(
               ranking="sampled_mass", sampled_rows=8, block_size=64, alpha=1.0)), reps),
           "plan_default_bs64_a1_ms": _median_ms(lambda: stem.plan(q, k, v, base.replace(block_size=64, alpha=1.0)),
                                                 reps),
           "density_default": stem.plan(q, k, v, base).density, "density_qmean_lse": stem.plan(q, k, v, ranked).density}
    qbar = block_query_means(q, 0, bs)
    for bq, warps in ((16, 8), (8, 4), (8, 8), (32, 8), (4, 4)):
        out[f"kernel_bq{bq}_w{warps}_ms"] = _median_ms(
            lambda bq=bq, warps=warps: qmean_lse_triton(qbar, k, 0, bs, D ** -0.5, block_q=bq, num_warps=warps), reps)
    from stem_backends.triton.ranking import sampled_mass_triton

    default = None
    for bq, warps, stages, one_pass, mb in SAMPLED_SWEEP:
        name = f"sampled_{'1p' if one_pass else '2p'}_bq{bq}_w{warps}_s{stages}_{mb}MB"

        def run(bq=bq, warps=warps, stages=stages, one_pass=one_pass, mb=mb):
            return sampled_mass_triton(q, k, 0, bs, D ** -0.5, block_q=bq, num_warps=warps, num_stages=stages,
                                       one_pass=one_pass, scratch_bytes=mb << 20)
        got = run()
        default = got if default is None else default  # each shape against the default (checked in check())
        out[name + "_maxdiff"] = float((got - default).nan_to_num(0.0, 0.0, 0.0).abs().max())
        del got
        out[name + "_ms"] = _median_ms(run, max(3, reps // 4))
    for n in (8, 16):  # more sampled rows per query block, default tile shape
        out[f"sampled_rows{n}_ms"] = _median_ms(lambda n=n: sampled_mass_triton(q, k, 0, bs, D ** -0.5, n=n),
                                                max(3, reps // 4))
    if L <= 32768:
        out["scores_torch_path_ms"] = _median_ms(lambda: qmean_lse_scores(q, k, bs, impl="torch"), max(3, reps // 4))
    flops = 2 * Hq * D * sum(min(i + 1, L // bs) * bs for i in range(L // bs))
    out["kernel_tflops_at_default"] = flops / (out["kernel_bq16_w8_ms"] * 1e-3) / 1e12
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.gpu_ranking", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes (for TRITON_INTERPRET=1 on a CPU)")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    if args.smoke:
        res = {"check": [check(64 * 16 + 5, 64 * 16 + 5, "cpu", H=(4, 2), D=16, bs=16),
                         check(64 * 16, 300, "cpu", H=(4, 1), D=16, bs=16, seed=1)]}
    else:
        dev = "cuda"
        res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
        import triton

        res["triton"] = triton.__version__
        res["check"] = [check(8192, 8192, dev), check(8192 + 77, 8192 + 77, dev, seed=1),
                        check(32768, 4096 + 5, dev, seed=2)]
        res["timing"] = [timing(32768, args.reps, dev), timing(131072, args.reps, dev)]
    for c in res["check"]:
        print("check", c)
    for t in res.get("timing", []):
        print("timing", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in t.items()})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    ok = all(c["same_causal_pattern"] and c["rel_err"] < 1e-2 and c["sampled_mass_rel_err"] < 2e-2
             and c["plan_rows_equal"] > 0.9 for c in res["check"])
    print("checks", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
