"""Time-to-first-token of a Llama-3.1-8B-shaped model: transformers SDPA vs Stem, whole forward.

The model is built from a LlamaConfig with random weights (hidden 4096, 32 heads, 8 kv heads,
head dim 128, intermediate 14336, vocab 128256, llama3 RoPE, theta 500000) but only ``--layers``
decoder layers (default 4). One prefill forward over a single sequence with ``logits_to_keep=1``
(no vocab x L logits) and ``use_cache=False`` is timed with ``stem.bench.time_ms`` (CUDA events;
median of ``--iters`` after ``--warmup``). Attention is timed per layer with CUDA events recorded
around the attention function inside the same forwards (no host sync inside the forward), so the
JSON gives both the whole pass and the share of attention in it.

Scaling to 32 layers (reported separately as ``scaled``; the measured N-layer numbers are the
primary result). With ``other = ttft - attention`` (embedding, norms, projections, RoPE, MLP, head)
for the N measured layers:

    sdpa_32 = other_sdpa * 32 / N + 32 * mean_attn_sdpa
    stem_32 = other_stem * 32 / N + d * mean_attn_dense + (32 - d) * mean_attn_sparse

where d is the number of dense layers of the Stem schedule (default 2: layers 0 and 1, as the
authors ship). Embedding and head are counted as per-layer "other" time, which slightly
overstates both 32-layer totals by the same amount and so biases the speed-up towards 1.

Random weights: Stem's block count per query block is fixed by its budget (top-k), so its cost
does not depend on the data; the attention *pattern* of random weights is not that of a trained
model, so this measures speed, not accuracy.

Run from the repository root (writes bench_prefill.json and .png into --out):

    python -m benchmarks.prefill --out benchmarks/results --lengths 32768 65536 131072 --layers 4
    python -m benchmarks.prefill --tiny --out out/prefill    # CPU run of the same code path (tiny model)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from stem.bench import random_qkv, time_ms

FULL_LAYERS_8B = 32


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help="output folder (JSON + PNG)")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="prompt lengths (default 32768 65536 131072)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers to build (default 4)")
    p.add_argument("--full-layers", type=int, default=None, help="layers of the real model, for scaling (32)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed forwards per method and length (>= 1: the first also records plan densities "
                        "and dispatch routes)")
    p.add_argument("--iters", type=int, default=3, help="timed forwards per method and length (median)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="default bfloat16")
    p.add_argument("--block-size", type=int, default=None, help="Stem block size (default 128)")
    p.add_argument("--stride", type=int, default=None, help="Stem stride (default 8)")
    p.add_argument("--alpha", type=float, default=None, help="Stem decay alpha (default 0.7)")
    p.add_argument("--dense-layers", type=int, nargs="*", default=None, help="dense layers (default 0 1)")
    p.add_argument("--backend", default="auto", help="stem.attention backend (default auto)")
    p.add_argument("--precision", default="native", choices=["native", "fp8"],
                   help="StemModelConfig.precision of the sparse layers (default native)")
    p.add_argument("--allow-reference", action="store_true",
                   help="allow the (slow) reference executor on CUDA instead of failing")
    p.add_argument("--padded-batch", type=int, nargs="+", default=None, metavar="N",
                   help="instead of --lengths: one left-padded batch of prompts of these lengths (as generate "
                        "makes them); Stem serves it unpadded (stem.varlen_attention)")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile(fullgraph=True) of the whole forward (use_cache=True) for both "
                        "methods; whole-forward times only")
    p.add_argument("--tiny", action="store_true", help="tiny model, short lengths, CPU: a quick code-path test")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    tiny = a.tiny
    if a.padded_batch:
        a.lengths = [max(a.padded_batch)]
    a.lengths = sorted(a.lengths or ([128, 960] if tiny else [32768, 65536, 131072]))
    a.layers = a.layers or (2 if tiny else 4)
    a.full_layers = a.full_layers or (4 if tiny else FULL_LAYERS_8B)
    a.device = a.device or ("cpu" if tiny else "cuda")
    a.dtype = a.dtype or ("float32" if tiny else "bfloat16")
    a.block_size = a.block_size or (16 if tiny else 128)
    a.stride = a.stride or (4 if tiny else 8)
    a.alpha = 0.7 if a.alpha is None else a.alpha
    a.dense_layers = tuple(a.dense_layers if a.dense_layers is not None else ((0,) if tiny else (0, 1)))
    if tiny and "--iters" not in (argv or sys.argv):
        a.iters = 1
    if a.layers <= len(a.dense_layers) or any(i >= a.layers for i in a.dense_layers):
        p.error(f"--layers {a.layers} must exceed the dense layers {a.dense_layers} so sparse layers get measured")
    if a.iters < 1 or a.warmup < 1:
        p.error("--iters and --warmup must be >= 1")
    return a


def model_config(args):
    from transformers import LlamaConfig

    if args.tiny:
        shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16, vocab_size=256)
    else:  # Llama-3.1-8B
        shape = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, vocab_size=128256)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    return LlamaConfig(num_hidden_layers=args.layers, max_position_embeddings=max(131072, max(args.lengths)),
                       rope_parameters=rope, rms_norm_eps=1e-5, tie_word_embeddings=False, **shape)


def build_model(args, device, dtype):
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(model_config(args), dtype=dtype, attn_implementation="sdpa")
    return model.eval()


class LayerMarks:
    """Start/end marks around each attention call inside a forward: CUDA events on CUDA (read after
    the forward's end, which ``time_ms`` synchronises), perf_counter elsewhere.

    This is the one timer of its own here: ``time_ms`` times a whole callable, while the attention
    share needs marks *between* hooks inside one model forward, without a host sync per layer.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


class TimedAttention:
    """Registers "bench_sdpa" and "bench_stem": the real attention functions, timed per call."""

    def __init__(self, clock: LayerMarks):
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        import stem.integrations.transformers as sh

        self.clock, self.sh = clock, sh
        self.marks: list[tuple[int, object, object]] = []
        self.inspect = False
        self.density: dict[int, float] = {}
        AttentionInterface.register("bench_sdpa", self._wrap(sdpa_attention_forward))
        AttentionMaskInterface.register("bench_sdpa", sdpa_mask)
        AttentionInterface.register("bench_stem", self._wrap(sh.stem_attention_forward))
        AttentionMaskInterface.register("bench_stem", sh.stem_mask)

    def _wrap(self, fn):
        def timed(module, query, key, value, attention_mask, *a, **kw):
            if self.inspect:
                self._inspect(module, query, key, value)
            t0 = self.clock.mark()
            out = fn(module, query, key, value, attention_mask, *a, **kw)
            self.marks.append((module.layer_idx, t0, self.clock.mark()))
            return out

        return timed

    def _inspect(self, module, q, k, v):
        import stem

        mcfg = getattr(module, "_stem_model_config", None)
        cfg = mcfg.layer_config(module.layer_idx) if mcfg is not None else None
        if cfg is not None and not cfg.dense:
            self.density[module.layer_idx] = stem.plan(q, k, v, cfg).density

    def per_layer_ms(self, marks) -> dict[int, float]:
        out: dict[int, float] = {}
        for layer, a, b in marks:
            out[layer] = out.get(layer, 0.0) + self.clock.ms(a, b)
        return out


def probe_executor(args, device, dtype, stem_cfg) -> str:
    """Which executor backend="auto" picks for a sparse plan at the longest length (fail early on
    the slow reference executor on CUDA)."""
    import stem
    from stem.dispatch import DispatchKey, resolve

    cfg = model_config(args)
    L = max(args.lengths)
    q, k, v = random_qkv(1, cfg.num_attention_heads, cfg.num_key_value_heads, L, cfg.head_dim, dtype=dtype,
                         device=device, seed=args.seed)
    plan = stem.plan(q, k, v, stem_cfg)
    if plan.dense:
        return f"plan is dense at L={L} (budget covers every block): sdpa"
    if args.backend != "auto":
        return f"backend={args.backend}"
    ex, why = resolve("auto", DispatchKey.of(q, plan, need_lse=False))
    if device.type == "cuda" and ex.name == "reference" and not args.allow_reference:
        raise SystemExit(
            f"stem auto dispatch picked the reference executor on CUDA ({why}); it is an oracle, far too slow "
            f"for {L} tokens. Install/fix the triton executor (`stem info`) or pass --allow-reference."
        )
    return why


def model_inputs(args, L, vocab, device) -> dict:
    """input_ids (and for --padded-batch the attention mask and position ids) of one forward."""
    g = torch.Generator(device=device).manual_seed(args.seed + L)
    if not args.padded_batch:
        return {"input_ids": torch.randint(0, vocab, (1, L), device=device, generator=g)}
    B = len(args.padded_batch)
    x = torch.randint(0, vocab, (B, L), device=device, generator=g)
    mask = torch.zeros(B, L, dtype=torch.long, device=device)
    for i, n in enumerate(args.padded_batch):
        mask[i, L - n:] = 1  # left padding, as generate() makes it
    return {"input_ids": x, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def measure(model, inputs, method, timer: TimedAttention, device, args, bar) -> dict:
    sh = timer.sh
    model.set_attn_implementation(f"bench_{method}")

    def forward():
        with torch.inference_mode():
            model(**inputs, logits_to_keep=1, use_cache=False)
        bar.update(1)

    # first warm-up forward: untimed, records the plans' densities and the dispatch routes
    timer.marks = []
    timer.inspect = method == "stem" and not args.padded_batch
    sh.reset_dispatch_counts()
    forward()
    timer.inspect = False
    routes = sh.dispatch_counts()
    runs: list[list] = []  # the attention marks of every forward time_ms runs, warm-up ones first

    def timed_forward():
        timer.marks = []
        runs.append(timer.marks)
        forward()

    totals: list[float] = []
    time_ms(timed_forward, reps=args.iters, warmup=args.warmup - 1, device=device, samples=totals)
    layer_runs = [timer.per_layer_ms(marks) for marks in runs[args.warmup - 1:]]
    attn_totals = [sum(layers.values()) for layers in layer_runs]
    n = len(layer_runs[0])
    per_layer = [statistics.median(run[j] for run in layer_runs) for j in range(n)]
    ttft, attn = statistics.median(totals), statistics.median(attn_totals)
    res = {
        "ttft_ms": ttft,
        "ttft_ms_all": totals,
        "attn_ms": attn,
        "attn_share": attn / ttft,
        "other_ms": ttft - attn,
        "attn_ms_per_layer": per_layer,
        "routes": routes,
    }
    if method == "stem":
        dense = [per_layer[j] for j in range(n) if j in args.dense_layers]
        sparse = [per_layer[j] for j in range(n) if j not in args.dense_layers]
        res.update(
            dense_layer_attn_ms=statistics.fmean(dense) if dense else None,
            sparse_layer_attn_ms=statistics.fmean(sparse),
            sparse_layer_density=[timer.density[j] for j in sorted(timer.density)] or None,
        )
    if device.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def measure_compiled(model, inputs, device, args) -> dict:
    """Whole-forward medians, eager against torch.compile(fullgraph=True), for SDPA and Stem (with a
    cache: without one transformers adds a packed-sequence mask under compile that Stem leaves to
    SDPA). Compilation happens in the warm-up runs."""
    res = {}
    for method in ("sdpa", "stem"):
        model.set_attn_implementation(method)

        def fwd(**kw):
            return model(**kw, logits_to_keep=1, use_cache=True).logits

        for mode in ("eager", "compiled"):
            torch._dynamo.reset()
            fn = fwd if mode == "eager" else torch.compile(fwd, fullgraph=True)
            try:
                with torch.inference_mode():
                    res[f"{method}_{mode}_ms"] = time_ms(lambda fn=fn: fn(**inputs), reps=args.iters,
                                                         warmup=max(2, args.warmup), device=device)
            except Exception as e:  # report, do not hide: a compile failure is a result
                res[f"{method}_{mode}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    torch._dynamo.reset()
    return res


def scale(row, args) -> dict:
    N, F = args.layers, args.full_layers
    d = sum(1 for i in args.dense_layers if i < F)
    s, t = row["sdpa"], row["stem"]
    sdpa = s["other_ms"] * F / N + F * statistics.fmean(s["attn_ms_per_layer"])
    dense_ms = t["dense_layer_attn_ms"] if t["dense_layer_attn_ms"] is not None else 0.0
    stem = t["other_ms"] * F / N + d * dense_ms + (F - d) * t["sparse_layer_attn_ms"]
    return {"sdpa_ms": sdpa, "stem_ms": stem, "speedup": sdpa / stem}


def plot(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["results"] if "speedup" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    if rows:
        labels = [f"{r['length'] // 1024}K" if r["length"] >= 1024 else str(r["length"]) for r in rows]
        xs = range(len(rows))
        w = 0.38
        ax = axes[0]
        for off, m, color in ((-w / 2, "sdpa", "tab:gray"), (w / 2, "stem", "tab:green")):
            attn = [r[m]["attn_ms"] / 1e3 for r in rows]
            other = [r[m]["other_ms"] / 1e3 for r in rows]
            pos = [x + off for x in xs]
            ax.bar(pos, attn, w, color=color, label=f"{m}: attention")
            ax.bar(pos, other, w, bottom=attn, color=color, alpha=0.35, label=f"{m}: rest of the forward")
            for p_, a_, o_, r in zip(pos, attn, other, rows):
                ax.text(p_, a_ + o_, f"{100 * r[m]['attn_share']:.0f}%", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), labels)
        ax.set_ylabel("time to first token (s)")
        ax.set_title(f"measured: {data['model']['num_hidden_layers']} layers (label: attention share)")
        ax.legend(fontsize=7)
        ax = axes[1]
        sd = [r["scaled"]["sdpa_ms"] / 1e3 for r in rows]
        st = [r["scaled"]["stem_ms"] / 1e3 for r in rows]
        ax.plot(labels, sd, "o-", color="tab:gray", label="SDPA")
        ax.plot(labels, st, "o-", color="tab:green", label="Stem")
        for lab, a_, b_ in zip(labels, sd, st):
            ax.annotate(f"{a_ / b_:.2f}x", (lab, b_), textcoords="offset points", xytext=(0, -14), ha="center",
                        fontsize=8)
        ax.set_ylabel("time to first token (s)")
        ax.set_title(f"scaled to {data['scaled']['to_layers']} layers (see JSON 'scaled.formula')")
        ax.legend(fontsize=8)
    fig.suptitle(f"{data['model']['name']} prefill, {data['device']['name']}, {data['dtype']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(data) -> str:
    head = f"{'length':>8} | {'SDPA ms':>10} {'attn':>5} | {'Stem ms':>10} {'attn':>5} | {'speedup':>7} || " \
           f"{'SDPA x' + str(data['scaled']['to_layers']):>10} {'Stem':>10} {'speedup':>7}"
    lines = [f"device: {data['device']['name']}  model: {data['model']['name']} "
             f"({data['model']['num_hidden_layers']} layers measured)", head, "-" * len(head)]
    for r in data["results"]:
        if "speedup" not in r:
            lines.append(f"{r['length']:>8} | " + "; ".join(f"{m}: {r[m].get('error')}" for m in ("sdpa", "stem")
                                                           if isinstance(r.get(m), dict) and "error" in r[m]))
            continue
        s, t, c = r["sdpa"], r["stem"], r["scaled"]
        lines.append(
            f"{r['length']:>8} | {s['ttft_ms']:>10.1f} {100 * s['attn_share']:>4.0f}% | {t['ttft_ms']:>10.1f} "
            f"{100 * t['attn_share']:>4.0f}% | {r['speedup']:>6.2f}x || {c['sdpa_ms']:>10.1f} {c['stem_ms']:>10.1f} "
            f"{c['speedup']:>6.2f}x"
        )
        if "compiled" in r:
            lines.append("         compiled forward (use_cache=True): " + ", ".join(
                f"{k[:-3]} {v:.1f} ms" if k.endswith("_ms") else f"{k}: {v}" for k, v in r["compiled"].items()))
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import transformers

    import stem
    import stem.integrations.transformers as sh

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --tiny (CPU) or --device cpu")
    dtype = getattr(torch, args.dtype)
    os.makedirs(args.out, exist_ok=True)
    stem_cfg = stem.StemConfig(block_size=args.block_size, stride=args.stride, alpha=args.alpha)
    schedule = sh.StemModelConfig(base=stem_cfg, dense_layers=args.dense_layers, backend=args.backend,
                                  precision=args.precision)
    clock = LayerMarks(device)
    why = probe_executor(args, device, dtype, stem_cfg)
    model = build_model(args, device, dtype)
    sh.enable(model, schedule)  # stores the schedule on the attention modules
    timer = TimedAttention(clock)
    cfg = model.config
    data = {
        "benchmark": "bench_prefill",
        "command": " ".join(["python -m benchmarks.prefill", *(sys.argv[1:] if argv is None else argv)]),
        "model": {
            "name": "Llama-3.1-8B-shaped (random weights)" if not args.tiny else "tiny Llama (random weights)",
            "num_hidden_layers": args.layers,
            "num_hidden_layers_full": args.full_layers,
            "hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
            "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
            "rope_parameters": cfg.rope_parameters,
        },
        "dtype": args.dtype,
        "device": {
            "type": device.type,
            "name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "stem": stem.__version__, "python": platform.python_version()},
        "stem": {"schedule": schedule.to_dict(), "executor_probe": why},
        "timing": {"warmup": args.warmup, "iters": args.iters, "statistic": "median",
                   "clock": "stem.bench.time_ms: " + ("cuda events" if clock.cuda else "perf_counter"),
                   "forward": "model(input_ids, logits_to_keep=1, use_cache=False), inference_mode; "
                              + (f"a left-padded batch of {args.padded_batch}" if args.padded_batch else "batch 1"),
                   "attention": "per-layer marks around the attention function in the same forwards "
                                "(Stem: planning + execution)"},
        "lengths": args.lengths,
        "scaled": {
            "to_layers": args.full_layers,
            "formula": "sdpa = other_sdpa*F/N + F*mean(attn_sdpa); stem = other_stem*F/N + d*attn_dense + "
                       "(F-d)*attn_sparse; other = ttft - attention over the N measured layers (embedding and "
                       "head counted as per-layer other: both totals slightly overstated), d = dense layers",
            "note": f"measured {args.layers} layers; the 32-layer numbers are a linear extrapolation in layers",
        },
        "results": [],
    }
    json_path = os.path.join(args.out, "bench_prefill.json")
    bar = _progress(len(args.lengths) * 2 * (args.warmup + args.iters), args.no_progress)
    for L in args.lengths:
        bar.set_postfix_str(f"L={L}")
        inputs = model_inputs(args, L, cfg.vocab_size, device)
        row: dict = {"length": L}
        if args.padded_batch:
            row["batch_lengths"] = list(args.padded_batch)
        for method in ("sdpa", "stem"):
            if clock.cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                row[method] = measure(model, inputs, method, timer, device, args, bar)
            except torch.cuda.OutOfMemoryError as e:
                row[method] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
                if clock.cuda:
                    torch.cuda.empty_cache()
        if "ttft_ms" in row["sdpa"] and "ttft_ms" in row["stem"]:
            row["speedup"] = row["sdpa"]["ttft_ms"] / row["stem"]["ttft_ms"]
            row["attn_speedup"] = row["sdpa"]["attn_ms"] / row["stem"]["attn_ms"]
            row["scaled"] = scale(row, args)
        if args.compile:
            row["compiled"] = measure_compiled(model, inputs, device, args)
        data["results"].append(row)
        with open(json_path, "w") as f:  # rewritten after every length: partial results survive
            json.dump(data, f, indent=1)
    bar.close()
    sh.disable(model)
    print(table(data))
    try:
        plot(data, os.path.join(args.out, "bench_prefill.png"))
        print(f"wrote {json_path} and bench_prefill.png")
    except ImportError:
        print(f"wrote {json_path} (matplotlib is not installed: no bench_prefill.png)")
    return json.loads(json.dumps(data))


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


def _progress(total: int, off: bool):
    """A tqdm bar, or a silent stand-in when progress is off or tqdm is not installed."""
    if off:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        print("(tqdm is not installed: no progress bar; pip install tqdm)", file=sys.stderr)
        return _NoBar()
    return tqdm(total=total, desc="prefill", unit="fwd")


if __name__ == "__main__":
    main()
