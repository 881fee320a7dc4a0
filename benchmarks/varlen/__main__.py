"""A mixed-length batch of prompts packed into one tensor: Stem varlen against dense baselines.

Default batch: 8 prompts of 4K, 8K, 12K, 16K, 24K, 32K, 48K and 64K tokens (212,992 in all),
Hq 32, Hkv 8, head dim 128, bf16, default StemConfig. Methods, all timed in one run (CUDA-event
medians via ``stem.bench.time_ms``):

* ``stem_varlen``: ``stem.varlen_attention`` end to end (plan + execute, one launch of each);
* ``stem_plan`` / ``stem_exec``: its planner alone and its executor alone on the same plan;
* ``dense_varlen``: dense causal attention over the packed batch with
  ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention varlen) where this torch has it;
* ``dense_per_seq``: dense causal SDPA (cuDNN first) one prompt at a time;
* ``dense_padded``: dense causal SDPA over the batch right-padded to the longest prompt;
* ``flex_plan``: FlexAttention over the packed batch with a document-causal mask restricted to
  Stem's plan (the same selected blocks; needs every prompt length to be a multiple of the block).

Correctness: each prompt's rows of ``stem_varlen`` are compared with ``stem.attention`` on that
prompt alone (relative error reported). Writes ``bench_varlen_<gpu>.json`` and ``.png``:

    python -m benchmarks.varlen --out benchmarks/results
    python -m benchmarks.varlen --tiny --out out/varlen     # CPU run of the same code path
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform

import torch

import stem
from stem.bench import time_ms

DEFAULT_LENGTHS = [4096, 8192, 12288, 16384, 24576, 32768, 49152, 65536]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="prompt lengths (default: the 8 above)")
    p.add_argument("--heads", type=int, nargs=2, default=None, metavar=("HQ", "HKV"), help="default 32 8")
    p.add_argument("--head-dim", type=int, default=None, help="default 128")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="small CPU run of the same code path")
    a = p.parse_args(argv)
    a.lengths = a.lengths or ([512, 1100, 260] if a.tiny else DEFAULT_LENGTHS)
    a.heads = a.heads or ([4, 2] if a.tiny else [32, 8])
    a.head_dim = a.head_dim or (16 if a.tiny else 128)
    a.device = "cpu" if a.tiny else "cuda"
    a.dtype = torch.float32 if a.tiny else torch.bfloat16
    if a.tiny:
        a.iters, a.warmup = 1, 1
    return a


def make_batch(args):
    g = torch.Generator().manual_seed(0)
    Hq, Hkv = args.heads
    T = sum(args.lengths)
    q = torch.randn(T, Hq, args.head_dim, generator=g).to(args.dtype).to(args.device)
    k = torch.randn(T, Hkv, args.head_dim, generator=g).to(args.dtype).to(args.device)
    v = torch.randn(T, Hkv, args.head_dim, generator=g).to(args.dtype).to(args.device)
    cu = torch.tensor([0] + [sum(args.lengths[: i + 1]) for i in range(len(args.lengths))], dtype=torch.int32,
                      device=args.device)
    return q, k, v, cu


def dense_per_seq(q, k, v, lengths):
    import torch.nn.functional as F

    a = 0
    for n in lengths:
        F.scaled_dot_product_attention(q[a : a + n].transpose(0, 1)[None], k[a : a + n].transpose(0, 1)[None],
                                       v[a : a + n].transpose(0, 1)[None], is_causal=True, enable_gqa=True)
        a += n


def padded(q, k, v, lengths):
    B, L = len(lengths), max(lengths)
    out = []
    for t in (q, k, v):
        x = t.new_zeros(B, L, t.shape[1], t.shape[2])
        a = 0
        for i, n in enumerate(lengths):
            x[i, :n] = t[a : a + n]
            a += n
        out.append(x.transpose(1, 2))
    return out


def flex_mask(plan, lengths, device):
    """The varlen plan as one FlexAttention BlockMask over the packed batch (block-aligned prompts)."""
    from torch.nn.attention.flex_attention import BlockMask

    bs = plan.block_size
    T = sum(lengths)
    nb = T // bs
    Hq = plan.num_heads
    full = torch.zeros(1, Hq, nb, nb, dtype=torch.bool, device=device)
    part = torch.zeros_like(full)
    doc = torch.zeros(T, dtype=torch.int32, device=device)
    a = 0
    for i, n in enumerate(lengths):
        doc[a : a + n] = i
        p = plan.sequence(i).to_dense_mask()[0]  # (Hq, nQ, nK)
        s, m = a // bs, n // bs
        diag = torch.eye(m, dtype=torch.bool, device=device)
        full[0, :, s : s + m, s : s + m] = p & ~diag
        part[0, :, s : s + m, s : s + m] = p & diag
        a += n

    def causal_doc(b, h, qi, ki):
        return (doc[qi] == doc[ki]) & (qi >= ki)

    def csr(mask):
        counts = mask.sum(-1, dtype=torch.int32)
        idx = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts, idx

    pc, pi = csr(part)
    fc, fi = csr(full)
    return BlockMask.from_kv_blocks(pc, pi, fc, fi, BLOCK_SIZE=bs, mask_mod=causal_doc, seq_lengths=(T, T))


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device(args.device)
    q, k, v, cu = make_batch(args)
    L = args.lengths
    mx = max(L)
    results: dict = {}

    def run(name, fn, **extra):
        try:
            results[name] = {"ms": time_ms(fn, reps=args.iters, warmup=args.warmup, device=dev), **extra}
        except Exception as e:  # a baseline this torch/GPU lacks: say so in the results
            results[name] = {"ms": None, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(f"{name:14s} {results[name]}", flush=True)

    with torch.inference_mode():
        out, plan = stem.varlen_attention(q, k, v, cu, cu, mx, mx, return_plan=True)
        route = stem.last_dispatch()
        errs = []
        a = 0
        for n in L:
            ref = stem.attention(*(t[a : a + n].transpose(0, 1)[None] for t in (q, k, v)))
            errs.append(((out[a : a + n].float() - ref[0].transpose(0, 1).float()).norm() / ref.float().norm()).item())
            a += n
        density = plan.density
        run("stem_varlen", lambda: stem.varlen_attention(q, k, v, cu, cu, mx, mx))
        run("stem_plan", lambda: stem.plan_varlen(q, k, v, cu, cu, mx, mx))
        from stem.dispatch import DispatchKey, resolve

        ex, _ = resolve("auto", DispatchKey.of(q, plan, False, varlen=True))
        run("stem_exec", lambda: ex.forward_varlen(q, k, v, plan, 1 / math.sqrt(q.shape[-1]), False), executor=ex.name)
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            varlen_attn = None
        if varlen_attn is not None and dev.type == "cuda":
            import inspect

            params = inspect.signature(varlen_attn).parameters  # its keywords changed across torch releases
            kw = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
            if "enable_gqa" in params:
                kr, vr, note = k, v, "enable_gqa=True"
                kw["enable_gqa"] = True
            else:
                G = q.shape[1] // k.shape[1]
                kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
                note = "K/V repeated to Hq heads outside the timed region (this torch has no enable_gqa)"
            run("dense_varlen", lambda: varlen_attn(q, kr, vr, cu, cu, mx, mx, **kw), note=note, kwargs=str(kw))
        else:
            results["dense_varlen"] = {"ms": None, "error": "torch.nn.attention.varlen.varlen_attn unavailable"}
        run("dense_per_seq", lambda: dense_per_seq(q, k, v, L))
        import torch.nn.functional as F

        pad = padded(q, k, v, L)
        run("dense_padded", lambda: F.scaled_dot_product_attention(*pad, is_causal=True, enable_gqa=True),
            note="right-padded to the longest prompt; padded rows computed too")
        pad.clear()  # free the padded copies before the next method
        if all(n % plan.block_size == 0 for n in L) and dev.type == "cuda":
            from torch.nn.attention.flex_attention import flex_attention

            bm = flex_mask(plan, L, dev)
            flex = torch.compile(flex_attention)
            q4, k4, v4 = (t.transpose(0, 1)[None] for t in (q, k, v))
            run("flex_plan", lambda: flex(q4, k4, v4, block_mask=bm, enable_gqa=True))
        else:
            results["flex_plan"] = {"ms": None, "error": "needs CUDA and block-aligned prompt lengths"}
    name = torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu"
    base = results["dense_varlen"]["ms"] or results["dense_per_seq"]["ms"]
    data = {
        "device": name, "torch": torch.__version__, "lengths": L, "total_tokens": sum(L), "heads": args.heads,
        "head_dim": args.head_dim, "dtype": str(args.dtype), "config": plan.config.to_dict(), "density": density,
        "route": route, "per_sequence_rel_error": errs, "results": results,
        "stem_over_dense": (results["stem_varlen"]["ms"] / base) if base else None,
        "command": "python -m benchmarks.varlen " + " ".join(argv or []),
    }
    tag = name.replace(" ", "_")
    path = os.path.join(args.out, f"bench_varlen_{tag}.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    try:
        from matplotlib.figure import Figure

        names = [n for n, r in results.items() if r["ms"] is not None]
        fig = Figure(figsize=(7, 3.6))
        ax = fig.subplots()
        ax.barh(names, [results[n]["ms"] for n in names], color="#3b6ea8")
        ax.set_xlabel("ms (median)")
        ax.set_title(f"{len(L)} prompts, {sum(L)} tokens, {name}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path[:-5] + ".png", dpi=110)
    except ImportError:
        pass
    print(f"density {density:.3f}; route {route}; max per-sequence rel error {max(errs):.2e}")
    print(f"stem_varlen / dense = {data['stem_over_dense']}")
    return data


if __name__ == "__main__":
    main()
