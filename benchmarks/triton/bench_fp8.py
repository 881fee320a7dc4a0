"""precision="fp8" against the bf16 Triton executor, FlexAttention on the same plan and dense cuDNN.

    python -m benchmarks.triton.bench_fp8 --out DIR [--lengths 32768 131072] [--reps 5] [--sweep]

Times (CUDA-event medians, ``stem.bench.time_ms``) at B 1, Hq 32, Hkv 8, D 128, bf16 inputs, on
the default Stem plan (planned once per length, outside the timing):

* ``fp8``: ``stem.attention(q, k, v, plan=plan, precision="fp8", backend="triton")`` (quantisation
  of K/V included; ``fp8_quantize`` times that launch alone),
* ``fp8_hub``: the same with ``backend="hub"``, the Hub kernel's FP8 path where the loaded build
  has it (sm90, head dim 128; ``fp8_hub_quantize`` times its three quantisation launches alone,
  ``fp8_hub_e2e`` plans too: ``stem.attention(q, k, v, precision="fp8")``); ``fp8_pv_hub``:
  ``precision="fp8_pv"`` (only P V in FP8, Q K^T in bf16),
* ``bf16``: the Triton executor in the input dtype (``backend="triton"``); ``bf16_hub``: the Hub
  kernel in the input dtype,
* ``flex``: FlexAttention (``torch.compile``) with ``plan.to_flex_block_mask()``,
* ``cudnn``: dense causal SDPA through cuDNN.

Errors at ``--err-len`` (default 16384, the shortest power of two with a sparse default plan):
relative L2 and max abs error of the fp8 and bf16 outputs against a float64 masked softmax on the
same plan, for Gaussian inputs and for K with a large per-channel offset (where the fp8 path's K
smoothing matters; also without it). Writes ``bench_fp8_<card>.json`` (card, versions, command)
into ``--out`` and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch


def reference(q, k, v, plan, scale):
    """float64 masked softmax over the plan's blocks and the causal mask (one head at a time)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    bs, off = plan.block_size, plan.q_offset
    blocks = plan.to_dense_mask()
    qpos = torch.arange(Lq, device=q.device) + off
    kpos = torch.arange(Lk, device=q.device)
    qb = qpos // bs - off // bs
    out = torch.empty(B, Hq, Lq, D, dtype=torch.float64, device=q.device)
    for b in range(B):
        for h in range(Hq):
            hk = h // (Hq // Hkv)
            keep = blocks[b, h][qb][:, kpos // bs] & (kpos[None, :] <= qpos[:, None])
            s = (q[b, h].double() @ k[b, hk].double().T * scale).masked_fill(~keep, float("-inf"))
            out[b, h] = torch.softmax(s, -1) @ v[b, hk].double()
    return out


def _errors(out, ref):
    d = out.double() - ref
    return {"rel_l2": float(d.norm() / ref.norm()), "max_abs": float(d.abs().max()),
            "max_abs_over_max_ref": float(d.abs().max() / ref.abs().max())}


def accuracy(L, H, Hkv, D, seed):
    """fp8 and bf16 errors vs float64 on the default plan, Gaussian and channel-offset K."""
    from stem_backends.triton.fp8 import block_sparse_attention_fp8

    import stem
    from stem.bench import random_qkv

    res = {}
    for name, shift in (("gaussian", 0.0), ("k_channel_offset_4", 4.0)):
        q, k, v = random_qkv(1, H, Hkv, L, D, device="cuda", seed=seed)
        if shift:
            g = torch.Generator(device="cuda").manual_seed(seed + 1)
            k = (k.float() + shift * torch.randn(1, 1, 1, D, device="cuda", generator=g)).to(k.dtype)
        plan = stem.plan(q, k, v)
        scale = 1.0 / math.sqrt(D)
        ref = reference(q, k, v, plan, scale)
        fp8 = stem.attention(q, k, v, plan=plan, precision="fp8", backend="triton")
        bf16 = stem.attention(q, k, v, plan=plan, backend="triton")
        row = {"fp8": _errors(fp8, ref), "bf16": _errors(bf16, ref), "density": plan.density}
        for key, prec in (("fp8_hub", "fp8"), ("fp8_pv_hub", "fp8_pv")):
            try:
                row[key] = _errors(stem.attention(q, k, v, plan=plan, precision=prec, backend="hub"), ref)
            except (ValueError, RuntimeError) as e:
                row[f"{key}_error"] = str(e).splitlines()[0][:200]
        raw, _ = block_sparse_attention_fp8(q, k, v, plan.kv_counts, plan.kv_indices, block_size=plan.block_size,
                                            q_offset=plan.q_offset, scale=scale, smooth_k=False)
        row["fp8_no_smoothing"] = _errors(raw, ref)
        res[name] = row
        del q, k, v, ref, fp8, bf16, raw
        torch.cuda.empty_cache()
    return res


def timing(L, H, Hkv, D, reps, flex, sweep):
    import torch.nn.functional as F
    from stem_backends.hub import HubExecutor
    from stem_backends.triton.executor import run_block_sparse_attention
    from stem_backends.triton.fp8 import fp8_tiles, quantize_kv
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import stem
    from stem.bench import _pair_count, random_qkv, time_ms

    q, k, v = random_qkv(1, H, Hkv, L, D, device="cuda", seed=L)
    plan = stem.plan(q, k, v)
    pairs = _pair_count(plan)
    dense_pairs = H * L * (L + 1) / 2
    row = {"L": L, "density": plan.density, "sparse_pairs_fraction": pairs / dense_pairs}
    scale = 1.0 / math.sqrt(D)

    def put(name, fn, flop_pairs=pairs):
        try:
            fn()
            row[f"{name}_ms"] = time_ms(fn, reps)
            row[f"{name}_tflops"] = 4 * D * flop_pairs / row[f"{name}_ms"] / 1e9
        except Exception as e:  # report, keep benchmarking the rest
            row[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"

    put("fp8", lambda: stem.attention(q, k, v, plan=plan, precision="fp8", backend="triton"))
    bn = fp8_tiles(plan.block_size, D)[1]
    put("fp8_quantize", lambda: quantize_kv(k, v, bn, plan.block_size))
    row.pop("fp8_quantize_tflops", None)
    put("fp8_hub", lambda: stem.attention(q, k, v, plan=plan, precision="fp8", backend="hub"))
    if "fp8_hub_ms" in row:
        put("fp8_hub_quantize", lambda: HubExecutor.quantize_fp8(q, k, v, plan.block_size))
        row.pop("fp8_hub_quantize_tflops", None)
        put("fp8_hub_e2e", lambda: stem.attention(q, k, v, precision="fp8"))
        put("fp8_pv_hub", lambda: stem.attention(q, k, v, plan=plan, precision="fp8_pv", backend="hub"))
    put("bf16", lambda: stem.attention(q, k, v, plan=plan, backend="triton"))
    put("bf16_hub", lambda: stem.attention(q, k, v, plan=plan, backend="hub"))
    if flex is not None:
        bm = plan.to_flex_block_mask()
        put("flex", lambda: flex(q, k, v, block_mask=bm, enable_gqa=True))

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    put("cudnn", cudnn, dense_pairs)
    if sweep:
        for t in ((128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 2), (128, 128, 8, 2)):
            tiles = dict(zip(("block_m", "block_n", "num_warps", "num_stages"), t))
            put("fp8_tiles_" + "_".join(map(str, t)),
                lambda tiles=tiles: run_block_sparse_attention(q, k, v, plan, scale, precision="fp8", **tiles))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--err-len", type=int, default=16384, help="length of the error check (16K: a sparse plan)")
    ap.add_argument("--sweep", action="store_true",
                    help="also time a few other FP8 tile configurations (at the first length)")
    ap.add_argument("--no-flex", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fp8 needs a CUDA GPU", file=sys.stderr)
        return 2
    from stem.bench import _versions

    os.makedirs(args.out, exist_ok=True)
    card = torch.cuda.get_device_name(0)
    H, Hkv, D = args.heads, args.kv_heads, args.head_dim
    res = {"card": card, "capability": list(torch.cuda.get_device_capability()), "versions": _versions(),
           "command": "python -m benchmarks.triton.bench_fp8 " + " ".join(sys.argv[1:] if argv is None else argv),
           "shape": {"B": 1, "Hq": H, "Hkv": Hkv, "D": D, "dtype": "bfloat16"}, "plan": "default StemConfig()"}
    path = os.path.join(args.out, f"bench_fp8_{card.replace(' ', '_')}.json")
    with torch.no_grad():
        res["errors"] = {"L": args.err_len, **accuracy(args.err_len, H, Hkv, D, seed=1)}
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        flex = None
        if not args.no_flex:
            from torch.nn.attention.flex_attention import flex_attention

            flex = torch.compile(flex_attention, dynamic=False)
        res["rows"] = []
        for i, L in enumerate(args.lengths):
            res["rows"].append(timing(L, H, Hkv, D, args.reps, flex, args.sweep and i == 0))
            torch.cuda.empty_cache()
            with open(path, "w") as f:  # partial results survive a timeout
                json.dump(res, f, indent=1)

    print(f"{card}; B1 Hq{H} Hkv{Hkv} D{D} bf16 inputs, default Stem plan; {path}")
    e = res["errors"]
    for name in ("gaussian", "k_channel_offset_4"):
        r = e[name]
        hub = f"hub fp8 rel {r['fp8_hub']['rel_l2']:.4f} (max abs {r['fp8_hub']['max_abs']:.4f}), " \
            if "fp8_hub" in r else ""
        hub += f"hub fp8_pv rel {r['fp8_pv_hub']['rel_l2']:.4f}, " if "fp8_pv_hub" in r else ""
        print(f"errors vs float64 at {e['L']} ({name}): {hub}fp8 rel {r['fp8']['rel_l2']:.4f} "
              f"(no smoothing {r['fp8_no_smoothing']['rel_l2']:.4f}), bf16 rel {r['bf16']['rel_l2']:.5f}; "
              f"max abs fp8 {r['fp8']['max_abs']:.4f} bf16 {r['bf16']['max_abs']:.4f}")
    names = ["fp8_hub", "fp8_hub_quantize", "fp8_hub_e2e", "fp8_pv_hub", "bf16_hub", "fp8", "fp8_quantize", "bf16",
             "flex", "cudnn"]
    names += sorted({k[:-3] for r in res["rows"] for k in r if k.startswith("fp8_tiles_") and k.endswith("_ms")})
    print(f"{'L':>7} {'density':>7} " + " ".join(f"{n + ' ms':>22}" for n in names) + f" {'hub fp8/bf16':>11}")
    for r in res["rows"]:
        cells = [(f"{r[n + '_ms']:>10.2f} ({r[n + '_tflops']:6.0f} TF)" if n + "_tflops" in r
                  else f"{r[n + '_ms']:>22.2f}") if n + "_ms" in r else f"{'-':>22}" for n in names]
        sp = f"{r['bf16_hub_ms'] / r['fp8_hub_ms']:.2f}x" if "fp8_hub_ms" in r and "bf16_hub_ms" in r else "-"
        print(f"{r['L']:>7} {r['density']:>7.3f} " + " ".join(cells) + f" {sp:>11}")
        for k in r:
            if k.endswith("_error"):
                print(f"  {k}: {r[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
