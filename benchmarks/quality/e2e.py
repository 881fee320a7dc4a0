"""Whole-model quality of block-selection methods on a real model: per-layer attention recall and
output error, next-token KL / top-1 agreement / perplexity against dense, and passkey retrieval.

    python -m benchmarks.quality.e2e --cache out/quality_cache --out benchmarks/results

Each method of :mod:`benchmarks.quality.methods` replaces the attention of every layer >= 2 during
prefill (transformers' ``AttentionInterface``, the same hook as the recall study; decode steps and
layers 0-1 run transformers' own SDPA): the layer's post-RoPE q, k, v give the method's plan, and
``stem.attention(plan=..., backend=...)`` runs it (the CPU gather executor by default).

Metrics (all against the dense model on the same input):

- per layer, on the q, k, v of one *dense* forward (teacher forcing, so errors do not compound):
  attention recall (mean and 5th percentile over query rows; ``recall.row_recall``), relative
  error of the attention output ``||O - O_dense|| / ||O_dense||``, and density;
- whole model, each method in every layer at once: KL(dense || method) of the next-token
  distribution, top-1 agreement and the perplexity of the document, over its last ``--last``
  positions;
- passkey retrieval: a five-digit key in a sentence at a relative depth of filler text (the same
  offline sources), a question at the end, greedy decoding of 8 tokens; right if the key appears.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

import stem

from .capture import build_document, capture_qkv
from .fetch import DEFAULT_CACHE, MODELS, load_model
from .methods import METHODS, method_plan
from .recall import block_mass, row_recall

__all__ = ["run_plan", "mean_over_docs", "patched", "forward_logits", "next_token_metrics", "layer_metrics",
           "passkey_prompt", "passkey_run", "main"]

ATTN_NAME = "stem_quality_method"
FIRST_SPARSE = 2


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def method_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                         **kwargs):
        run = getattr(module, "_stem_quality_run", None)
        L = query.shape[2]
        if run is None or L == 1 or L != key.shape[2] or module.layer_idx < run["first_sparse"]:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
        plan = method_plan(run["method"], query, key, value, run["config"])
        run["density"][module.layer_idx] = float(plan.density)
        out = run_plan(query, key, value, plan, scaling, run["backend"])
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(ATTN_NAME, method_attention)


# --backend values that run the plan with stem.attention(precision=backend), or its roundings
# emulated in float32 on any device (fp8_error.emulate); the reference stays exact
FP8_BACKENDS = ("fp8", "fp8_pv")
EMULATED_BACKENDS = ("fp8_emulated", "fp8_pv_emulated")


def run_plan(q, k, v, plan: stem.BlockPlan, scale: float | None, backend: str) -> torch.Tensor:
    """Attention of q (1, Hq, L, D), k, v (1, Hkv, L, D) restricted to ``plan`` (prefill).

    ``backend="masked"``: exact masked attention in the inputs' dtype, one query head at a time
    (torch SDPA with the plan's token mask; float32 inputs give float32 attention on any device).
    The quality study uses it on a GPU, where the sparse kernels compute in bf16/fp16 and would add
    their rounding to the selection's error. ``backend="fp8"`` / ``"fp8_pv"``: ``stem.attention(...,
    precision=backend)`` on bfloat16 copies (CUDA), the output cast back to q's dtype: the plan's
    error plus FP8's. ``"fp8_emulated"`` / ``"fp8_pv_emulated"``: the same roundings emulated
    (``fp8_error.emulate``) around masked float32 attention, on any device and any head dim.
    Anything else: ``stem.attention(backend=backend)``."""
    if backend in FP8_BACKENDS:
        out = stem.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), plan=plan, scale=scale, precision=backend)
        return out.to(q.dtype)
    if backend != "masked" and backend not in EMULATED_BACKENDS:
        return stem.attention(q, k, v, plan=plan, scale=scale, backend=backend)
    L, G = q.shape[2], q.shape[1] // k.shape[1]
    blocks = plan.to_dense_mask()[0]  # (Hq, nQ, nK)
    pos = torch.arange(L, device=q.device)
    cell = pos // plan.block_size
    if backend in EMULATED_BACKENDS:
        from .fp8_error import emulate

        def allowed(h, r0, r1):
            return blocks[h][cell[r0:r1]][:, cell[:r1]]

        s = scale if scale is not None else q.shape[-1] ** -0.5
        out = emulate(q[0], k[0], v[0], s, backend.removesuffix("_emulated"), allowed)
        return out.unsqueeze(0).to(q.dtype)
    causal = pos[None, :] <= pos[:, None]
    out = torch.empty_like(q)
    for h in range(q.shape[1]):
        mask = blocks[h][cell][:, cell] & causal
        out[:, h:h + 1] = F.scaled_dot_product_attention(q[:, h:h + 1], k[:, h // G:h // G + 1],
                                                         v[:, h // G:h // G + 1], attn_mask=mask, scale=scale)
    return out


@contextmanager
def patched(model, method: str, config: stem.StemConfig, backend: str = "auto", first_sparse: int = FIRST_SPARSE):
    """Run ``model`` with ``method``'s plans in every attention layer >= ``first_sparse`` (prefill
    only). Yields a dict whose ``density`` maps layer -> plan density of the last prefill."""
    _register()
    layers = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
    if not layers:
        raise ValueError("found no attention modules (modules with layer_idx and o_proj)")
    run = {"method": method, "config": config, "backend": backend, "first_sparse": first_sparse, "density": {}}
    before = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    for m in layers:
        m._stem_quality_run = run
    try:
        yield run
    finally:
        for m in layers:
            del m._stem_quality_run
        model.set_attn_implementation(before)


@torch.no_grad()
def forward_logits(model, ids: torch.Tensor, method: str, config: stem.StemConfig, last: int,
                   backend: str = "auto", first_sparse: int = FIRST_SPARSE) -> tuple[torch.Tensor, dict]:
    """float32 logits (last, V) of the last ``last`` positions, and per-layer densities."""
    with patched(model, method, config, backend, first_sparse) as run:
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=last).logits[0].float()
    return logits, dict(run["density"])


def mean_over_docs(docs: list[dict]) -> dict:
    """Per method, the mean of each metric over documents (``docs``: one {method: metrics} per
    document), with ``<metric>_sem`` (standard error of the mean; 0 for one document) and ``docs``."""
    out = {}
    for m in docs[0]:
        rows = [d[m] for d in docs]
        agg = {"docs": len(rows)}
        for key in rows[0]:
            xs = torch.tensor([float(r[key]) for r in rows], dtype=torch.float64)
            agg[key] = float(xs.mean())
            agg[key + "_sem"] = float(xs.std() / len(xs) ** 0.5) if len(xs) > 1 else 0.0
        out[m] = agg
    return out


def next_token_metrics(dense: torch.Tensor, other: torch.Tensor, targets: torch.Tensor) -> dict:
    """KL(dense || other) (mean over positions, nats), top-1 agreement, and the perplexity of
    ``targets`` under both (logits (P, V); targets (P - 1,) are the tokens after the first P - 1)."""
    lp, lq = F.log_softmax(dense, -1), F.log_softmax(other, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    nll_d = F.nll_loss(lp[:-1], targets)
    nll_o = F.nll_loss(lq[:-1], targets)
    return {"kl_mean": float(kl.mean()), "kl_p95": float(torch.quantile(kl.double(), 0.95)),
            "top1_agreement": float((dense.argmax(-1) == other.argmax(-1)).float().mean()),
            "ppl": float(nll_o.exp()), "ppl_dense": float(nll_d.exp()),
            "ppl_ratio": float((nll_o - nll_d).exp())}


@torch.no_grad()
def layer_metrics(qkv: list, methods: list[str], config: stem.StemConfig, backend: str = "auto",
                  first_sparse: int = FIRST_SPARSE, chunk: int = 256, progress: bool = True) -> list[dict]:
    """Per layer >= ``first_sparse``: recall (mean, p5), output relative error and density of each
    method on the layer's dense-forward q, k, v (teacher forcing)."""
    rows = []
    for li, (q, k, v) in enumerate(qkv):
        if li < first_sparse:
            continue
        mass = block_mass(q[0], k[0], config.block_size, chunk=chunk)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        row = {"layer": li}
        for m in methods:
            plan = method_plan(m, q, k, v, config, chunk=chunk)
            out = run_plan(q, k, v, plan, None, backend)
            rec = row_recall(mass, plan.to_dense_mask()[0], config.block_size)
            p5 = float(torch.quantile(rec.flatten().double(), 0.05))
            row[m] = {"recall_mean": float(rec.mean()), "recall_p5": p5,
                      "out_rel_err": float((out - ref).norm() / ref.norm()), "density": float(plan.density)}
        rows.append(row)
        if progress:
            print(f"layer {li:2d}: " + "  ".join(f"{m} {row[m]['recall_mean']:.3f}/{row[m]['out_rel_err']:.3f}"
                                                  for m in methods), flush=True)
    return rows


NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\n\nWhat is the pass key? The pass key is"
PREFACE = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
           "I will quiz you about the pass key.\n\n")


def passkey_prompt(tokenizer, filler: list[int], length: int, depth: float, key: int, offset: int,
                   instructed: bool = False) -> torch.Tensor:
    """Token ids (1, length): filler tokens from ``filler[offset:]`` with the needle sentence at
    relative ``depth`` of the filler, then the question; ``instructed`` opens with :data:`PREFACE`."""
    needle = tokenizer(NEEDLE.format(key=key), add_special_tokens=False)["input_ids"]
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    head = tokenizer(PREFACE, add_special_tokens=False)["input_ids"] if instructed else []
    n_fill = length - len(needle) - len(question) - len(head)
    if offset + n_fill > len(filler):
        raise ValueError(f"filler too short: {len(filler)} tokens, need {offset + n_fill}")
    body = filler[offset:offset + n_fill]
    at = int(depth * n_fill)
    return torch.tensor([head + body[:at] + needle + body[at:] + question])


@torch.no_grad()
def greedy(model, ids: torch.Tensor, steps: int) -> list[int]:
    out = model(input_ids=ids, use_cache=True)
    past, nxt, toks = out.past_key_values, out.logits[0, -1].argmax(), []
    for _ in range(steps):
        toks.append(int(nxt))
        out = model(input_ids=nxt.view(1, 1), past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[0, -1].argmax()
    return toks


def passkey_run(model, tokenizer, filler: list[int], methods: list[str], config: stem.StemConfig, length: int,
                depths: list[float], per_depth: int, seed: int = 0, backend: str = "auto",
                deadline: float | None = None, progress: bool = True, first_sparse: int = FIRST_SPARSE,
                instructed: bool = False, skip: int = 0) -> list[dict]:
    """One record per (prompt, method): depth, key, generated text, right or not, densities.
    The prompts are a fixed sequence of ``per_depth * len(depths)`` (from ``seed``; a larger
    ``per_depth`` extends it, the first prompts stay the same); the first ``skip`` are not run, so a
    run can continue where another stopped (records keep their index in the whole sequence).
    Stops between prompts once ``time.time() > deadline``."""
    rng = random.Random(seed)
    recs = []
    prompts = [(d, rng.randrange(10000, 100000), rng.randrange(0, len(filler) - length)) for _ in range(per_depth)
               for d in depths]
    if not 0 <= skip < len(prompts):
        raise ValueError(f"skip={skip}: there are {len(prompts)} prompts (per_depth x depths); skip must be in "
                         f"[0, {len(prompts)}) (lower --skip-prompts or raise --per-depth)")
    for n, (depth, key, offset) in enumerate(prompts):
        if n < skip:
            continue
        if deadline is not None and time.time() > deadline:
            break
        ids = passkey_prompt(tokenizer, filler, length, depth, key, offset, instructed).to(model.device)
        for m in methods:
            with patched(model, m, config, backend, first_sparse) as run:
                text = tokenizer.decode(greedy(model, ids, 8))
            recs.append({"prompt": n, "depth": depth, "key": key, "method": m, "text": text,
                         "right": str(key) in text.replace(" ", ""),
                         "density": sum(run["density"].values()) / max(1, len(run["density"]))})
        if progress:
            marks = " ".join(f"{r['method']}={int(r['right'])}" for r in recs[-len(methods):])
            print(f"passkey {n}: depth {depth} {marks}", flush=True)
    return recs


def summarise_passkey(recs: list[dict]) -> dict:
    """Per method: accuracy, its binomial standard error, the number of prompts, and accuracy per
    depth; plus, per method, the prompts dense got right that the method lost, and the reverse."""
    out = {}
    by = {}
    for r in recs:
        by.setdefault(r["method"], []).append(r)
    dense = {r["prompt"]: r["right"] for r in by.get("dense", [])}
    for m, rs in by.items():
        n = len(rs)
        acc = sum(r["right"] for r in rs) / n
        depths = sorted({r["depth"] for r in rs})
        out[m] = {"accuracy": acc, "stderr": (acc * (1 - acc) / n) ** 0.5, "prompts": n,
                  "per_depth": {str(d): sum(r["right"] for r in rs if r["depth"] == d)
                                / sum(r["depth"] == d for r in rs) for d in depths},
                  "lost_vs_dense": sum(dense.get(r["prompt"], False) and not r["right"] for r in rs),
                  "gained_vs_dense": sum((not dense.get(r["prompt"], True)) and r["right"] for r in rs),
                  "density": sum(r["density"] for r in rs) / n}
    return out


def plot(layers: dict | None, kl: dict | None, path: str) -> None:
    """PNG: per-layer recall and output error of each method (from a ``--part layers`` result) and
    KL / top-1 disagreement against density (from a ``--part kl`` result); either may be None."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 2 * bool(layers) + bool(kl)  # only the panels with data
    fig, axes = plt.subplots(1, n, figsize=(5.7 * n, 4.6), squeeze=False)
    axes = list(axes[0])
    if layers:
        xs = [r["layer"] for r in layers["layers"]]
        for m in layers["methods"]:
            if m == "dense":
                continue
            key = {"stem": "black", "sampled_mass": "tab:green", "qmean_lse": "tab:pink", "oracle": "tab:blue"}
            style = dict(marker="o", ms=3, lw=2, color=key[m]) if m in key else dict(lw=1, alpha=0.6)
            axes[0].plot(xs, [r[m]["recall_mean"] for r in layers["layers"]], label=m, **style)
            axes[1].plot(xs, [r[m]["out_rel_err"] for r in layers["layers"]], label=m, **style)
        axes[0].set_title("attention recall (mean over query rows)")
        axes[1].set_title("attention output: ||O - O_dense|| / ||O_dense||")
        axes[1].set_yscale("log")
        for ax in axes[:2]:
            ax.set_xlabel("layer")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7, ncol=2)
    if kl:
        ax = axes[-1]
        for m, r in kl["kl"].items():
            ax.scatter(r["density_mean"], r["kl_mean"], s=30)
            ax.annotate(m, (r["density_mean"], r["kl_mean"]), fontsize=7)
        ax.set_xlabel("mean density over sparse layers")
        ax.set_ylabel("next-token KL(dense || method), nats")
        ax.set_yscale("log")
        ax.set_title(f"whole model, last {kl.get('last')} positions")
        ax.grid(alpha=0.3)
    src = layers or kl
    c = src["config"]
    title = (f"{src['model']}, {src['length']} tokens,{' ' if n > 1 else chr(10)}block {c['block_size']}, "
             f"stride {c['stride']}; layers >= {src['first_sparse_layer']} sparse")
    fig.suptitle(title, fontsize=10 if n > 1 else 9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.e2e", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--cache", default=DEFAULT_CACHE)
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2",
                   help="which converted checkpoint of --cache (benchmarks.quality.fetch --model)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--part", choices=("layers", "kl", "passkey", "plot"), required=True,
                   help="plot: a PNG from the layers and kl JSON files already in --out")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--stride", type=int, default=8)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--last", type=int, default=2048, help="positions scored for KL / top-1 / perplexity")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--per-depth", type=int, default=4)
    p.add_argument("--minutes", type=float, default=None, help="passkey: stop starting prompts after this")
    p.add_argument("--skip-prompts", type=int, default=0,
                   help="passkey: do not run the first N prompts of the (fixed) prompt sequence, to continue "
                        "where another run with the same flags stopped")
    p.add_argument("--doc-offset", type=int, default=0,
                   help="layers/kl: skip this many tokens of the document's sources (another document)")
    p.add_argument("--docs", type=int, default=1,
                   help="kl: documents scored, each --length tokens further into the sources (mean and "
                        "standard error over them)")
    p.add_argument("--passkey-style", choices=("doc", "instructed"), default="doc",
                   help="instructed: the prompt opens with a sentence saying a pass key is hidden in the text")
    p.add_argument("--backend", default="auto",
                   help="executor for the plans (stem.attention's backend), or 'masked': exact masked attention in "
                        "float32, one head at a time (for GPU runs, whose kernels compute in bf16), or 'fp8' / "
                        "'fp8_pv': stem.attention(precision=...) on bf16 copies (CUDA), or 'fp8_emulated' / "
                        "'fp8_pv_emulated': their roundings emulated around masked float32 attention (any device)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the model runs in float32 on it)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--first-sparse", type=int, default=FIRST_SPARSE,
                   help="layers below this index stay dense (transformers' own SDPA)")
    p.add_argument("--tag", default="")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.part == "plot":
        name = f"{args.model}_{args.length // 1024}k{args.tag}"
        load = [Path(args.out) / f"quality_e2e_{part}_{name}.json" for part in ("layers", "kl")]
        data = [json.loads(f.read_text()) if f.is_file() else None for f in load]
        if not any(data):
            raise SystemExit(f"none of {[str(f) for f in load]} exists; run --part layers / --part kl first")
        plot(*data, str(Path(args.out) / f"quality_e2e_{name}.png"))
        return 0
    cfg = stem.StemConfig(block_size=args.block_size, stride=args.stride, auto_dense_above=2.0)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {list(METHODS)}")
    model, tok, source = load_model(args.cache, args.model)
    model.to(args.device)
    res = {"model": source["model"], "gguf_sha256": source["gguf_sha256"], "part": args.part,
           "length": args.length, "config": cfg.to_dict(), "methods": methods, "first_sparse_layer": args.first_sparse,
           "command": " ".join(["python -m benchmarks.quality.e2e", *(sys.argv[1:] if argv is None else argv)]),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device,
           "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
           "backend": args.backend}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.part in ("layers", "kl"):
        def document(offset: int) -> tuple[torch.Tensor, list[dict]]:
            ids, sources = build_document(tok, args.length + offset)
            return ids[:, offset:].to(args.device), sources

        ids, res["text_sources"] = document(args.doc_offset)
        res["doc_offset"] = args.doc_offset
        if args.part == "layers":
            qkv, _ = capture_qkv(model, ids)
            res["layers"] = layer_metrics(qkv, methods, cfg, args.backend, args.first_sparse)
        else:
            res["last"] = args.last
            res["docs"] = []
            for d in range(args.docs):
                offset = args.doc_offset + d * args.length
                if d:
                    ids, _ = document(offset)
                # the reference is exact: with an FP8 backend it runs as masked float32 attention
                ref_backend = "masked" if args.backend in FP8_BACKENDS + EMULATED_BACKENDS else args.backend
                dense, _ = forward_logits(model, ids, "dense", cfg, args.last, ref_backend, args.first_sparse)
                targets = ids[0, -args.last + 1:]
                doc = {"doc_offset": offset, "kl": {}}
                for m in methods:
                    t = time.time()
                    logits, dens = forward_logits(model, ids, m, cfg, args.last, args.backend, args.first_sparse)
                    r = next_token_metrics(dense, logits, targets)
                    r["density_mean"] = sum(dens.values()) / max(1, len(dens))
                    r["seconds"] = time.time() - t
                    doc["kl"][m] = r
                    print(f"doc {d} {m:14s} KL {r['kl_mean']:.4f} top1 {r['top1_agreement']:.4f} "
                          f"ppl x{r['ppl_ratio']:.4f} density {r['density_mean']:.3f} ({r['seconds']:.1f} s)",
                          flush=True)
                res["docs"].append(doc)
                res["kl"] = mean_over_docs([x["kl"] for x in res["docs"]])
                Path(args.out, f"quality_e2e_kl{args.tag}.partial.json").write_text(json.dumps(res, indent=1))
    else:
        filler_ids, sources = build_document(tok, 60000 if args.length <= 8192 else 4 * args.length)
        res["text_sources"] = sources
        deadline = None if args.minutes is None else t0 + 60 * args.minutes
        recs = passkey_run(model, tok, filler_ids[0].tolist(), methods, cfg, args.length,
                           [float(d) for d in args.depths.split(",")], args.per_depth, backend=args.backend,
                           deadline=deadline, instructed=args.passkey_style == "instructed",
                           first_sparse=args.first_sparse, skip=args.skip_prompts)
        res["passkey_style"] = args.passkey_style
        res["skip_prompts"] = args.skip_prompts
        res["passkey"] = {"records": recs, "summary": summarise_passkey(recs), "needle": NEEDLE, "question": QUESTION}
    res["seconds"] = time.time() - t0
    path = Path(args.out) / f"quality_e2e_{args.part}_{args.model}_{args.length // 1024}k{args.tag}.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {path} ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
