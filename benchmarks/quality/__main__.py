"""Attention recall of Stem on a real pretrained model, against uniform top-k and an oracle.

    python -m benchmarks.quality.fetch --cache out/quality_cache          # once (needs requirements.txt)
    python -m benchmarks.quality --cache out/quality_cache --out benchmarks/results

One dense forward of SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads, head dim 64) on an
8,192-token English document captures the post-RoPE q, k, v of every layer; for each layer and
method the recall (the dense softmax mass of each query row inside its kept key blocks) is
summarised per head and per layer. Writes ``quality_recall_smollm2_<L>k<tag>.json`` and ``.png``.
Default config: block 32, stride 8 (256 blocks at 8K, so the plan is sparse), the paper's alpha,
budgets, sinks, window and value weight.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

import stem

from .capture import build_document, capture_qkv
from .fetch import DEFAULT_CACHE, load_model
from .recall import DIAGNOSTICS, METHODS, layer_recall

__all__ = ["build_parser", "run_study", "whole_model", "plot", "main"]

FIRST_SPARSE_LAYER = 2  # the authors keep layers 0-1 dense; the whole-model mean skips them


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--cache", default=DEFAULT_CACHE, help=f"converted checkpoint cache (default {DEFAULT_CACHE})")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON and PNG")
    p.add_argument("--length", type=int, default=8192, help="document tokens (default 8192)")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--stride", type=int, default=8)
    p.add_argument("--alpha", type=float, default=stem.StemConfig().alpha)
    p.add_argument("--chunk", type=int, default=256, help="query rows per dense-softmax chunk")
    p.add_argument("--layers", default=None, help="comma list of layers (default: all)")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    return p


def whole_model(layers: list[dict], first: int = FIRST_SPARSE_LAYER) -> dict:
    """Per method, the mean over layers >= ``first`` of each layer's mean / p5 / density."""
    use = [r for r in layers if r["layer"] >= first] or layers
    keys = ("mean", "p5", "mean_sparse_rows", "p5_sparse_rows", "density")
    return {m: {k: sum(r[m][k] for r in use) / len(use) for k in keys} for m in METHODS + DIAGNOSTICS} | {
        "layers": [r["layer"] for r in use]}


@torch.no_grad()
def run_study(model, input_ids: torch.Tensor, cfg: stem.StemConfig, *, chunk: int = 256,
              layers: list[int] | None = None, progress: bool = True) -> dict:
    """Capture q/k/v with one dense forward, then :func:`layer_recall` per layer."""
    t0 = time.perf_counter()
    qkv, logits = capture_qkv(model, input_ids)
    t_fwd = time.perf_counter() - t0
    nll = float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), input_ids[0, 1:]))
    del logits
    rows = []
    t1 = time.perf_counter()
    for li, (q, k, v) in enumerate(qkv):
        if layers is not None and li not in layers:
            continue
        r = layer_recall(q[0], k[0], v[0], cfg, chunk=chunk)
        rows.append({"layer": li, **r})
        if progress:
            print(f"layer {li:2d}: " + "  ".join(f"{m} {r[m]['mean']:.4f}/{r[m]['p5']:.3f}" for m in METHODS),
                  flush=True)
    return {"layers": rows, "whole_model": whole_model(rows), "document_nll": nll,
            "seconds": {"forward": t_fwd, "recall": time.perf_counter() - t1}}


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharex=True)
    xs = [r["layer"] for r in res["layers"]]
    for m in METHODS + DIAGNOSTICS:
        style = dict(ls="--", lw=1, marker=".", ms=2) if m in DIAGNOSTICS else dict(marker="o", ms=3)
        for ax, key in zip(axes, ("mean", "p5")):
            ax.plot(xs, [r[m][key] for r in res["layers"]], label=m + (" (diagnostic)" if m in DIAGNOSTICS else ""),
                    **style)
    for ax, title in zip(axes, ("mean recall over query rows", "5th percentile over query rows")):
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("dense softmax mass inside kept blocks")
    axes[0].legend()
    c = res["config"]
    fig.suptitle(f"{res['model']}, {res['length']} tokens, block {c['block_size']}, stride {c['stride']}, "
                 f"alpha {c['alpha']} (density {res['whole_model']['stem']['density']:.3f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _versions() -> dict:
    out = {"stem": stem.__version__, "torch": torch.__version__, "python": platform.python_version(),
           "cpu_threads": torch.get_num_threads(), "machine": platform.machine()}
    for name in ("transformers", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = stem.StemConfig(block_size=args.block_size, stride=args.stride, alpha=args.alpha)
    layers = None if args.layers is None else [int(x) for x in args.layers.split(",") if x.strip()]
    t0 = time.perf_counter()
    model, tokenizer, source = load_model(args.cache)
    t_load = time.perf_counter() - t0
    input_ids, sources = build_document(tokenizer, args.length)
    res = run_study(model, input_ids, cfg, chunk=args.chunk, layers=layers)
    res["seconds"]["load"] = t_load
    res["seconds"]["total"] = time.perf_counter() - t0
    c = model.config
    out = {
        "model": "SmolLM2-135M-Instruct",
        "model_source": source,
        "gguf_sha256": source["gguf_sha256"],
        "architecture": {"layers": c.num_hidden_layers, "q_heads": c.num_attention_heads,
                         "kv_heads": c.num_key_value_heads, "head_dim": getattr(c, "head_dim", None),
                         "dtype": "float32 (dequantised Q4_1)"},
        "length": args.length,
        "text_sources": sources,
        "config": {k: getattr(cfg, k) for k in ("block_size", "stride", "alpha", "k_rate", "k_bias",
                                                "sink_blocks", "window_blocks", "value_weight", "norm")},
        "budgets": stem.block_budgets(-(-args.length // cfg.block_size), cfg.alpha, cfg.k_rate, cfg.k_bias),
        "methods": list(METHODS),
        "diagnostic_scores": list(DIAGNOSTICS),
        "metric": "recall = dense causal softmax mass (float32) of a query row inside the key blocks its "
                  "plan keeps; mean and 5th percentile over the rows (all heads pooled) per layer; "
                  "*_sparse_rows: only rows whose query block's budget is below its causal blocks; "
                  "whole_model: mean over layers >= 2; diagnostic scores rank blocks by the exact block "
                  "mean / max of scale*q.k over all token pairs (Stem's counts, sinks and window)",
        **res,
        "command": " ".join(["python -m benchmarks.quality", *(sys.argv[1:] if argv is None else argv)]),
        "versions": _versions(),
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    stemname = f"quality_recall_smollm2_{args.length // 1024}k{args.tag}"
    jpath = Path(args.out) / f"{stemname}.json"
    jpath.write_text(json.dumps(out, indent=1) + "\n")
    plot(out, str(Path(args.out) / f"{stemname}.png"))
    w = out["whole_model"]
    print(f"whole model (layers >= {FIRST_SPARSE_LAYER}), mean / p5 recall, density:")
    for m in METHODS + DIAGNOSTICS:
        print(f"  {m:13s} {w[m]['mean']:.4f} / {w[m]['p5']:.4f}  density {w[m]['density']:.3f}")
    print(f"document NLL {out['document_nll']:.3f}; {out['seconds']['total']:.0f} s; wrote {jpath} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
