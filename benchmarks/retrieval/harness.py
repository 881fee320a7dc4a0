"""The retrieval benchmark: accuracy of the model under dense attention, Stem and baselines.

Methods (names accepted by :func:`run_eval`):

- ``dense``: causal SDPA in every layer.
- ``stem``: Stem with the default config (alpha 0.7, value bonus 0.2) at the chosen block size, in
  every layer except ``dense_layers`` (default: layer 0): ``stem.plan`` then
  ``stem.attention(plan=...)``, so the plan is executed even where ``backend="auto"`` would take its
  dense shortcut (recorded per length as ``auto_would_run_dense_on_cuda``).
- ``stem_a<alpha>`` (e.g. ``stem_a0.5``): the same with another Token Position-Decay alpha.
- ``uniform_topk``: the same block logits WITHOUT the value bonus, the same k for every query
  block (no position decay), plus the same sinks and window; k is chosen per (layer, sample) so
  the plan's measured density matches the density Stem's plan had on that (layer, sample).
- ``stem_novb``: Stem with ``value_weight=0`` (same position-decayed budgets, so the same density
  up to top-k / forced-block overlap; the measured density is reported next to Stem's).
- ``sampled_mass``: Stem's budgets, sinks and window with the opt-in ranking
  ``StemConfig(ranking="sampled_mass")`` (stem/ranking.py); ``sampled_mass_r<n>``: the same with
  ``sampled_rows=n``.
- ``<method>+fp8`` (e.g. ``dense+fp8``, ``stem+fp8``): the same plan executed with
  ``stem.attention(..., precision="fp8")`` (CUDA, sm89+); ``dense+fp8`` runs the dense plan
  (every causal block) through the FP8 kernel, which isolates the effect of FP8 itself.

Both baselines' plans are built as :class:`stem.BlockPlan` and run through
``stem.attention(plan=...)``. Accuracy is the exact match of the answer tokens under greedy
decoding: the prompt is prefilled with the method's attention, the answer tokens are then fed
through the KV cache with dense attention (decode), teacher-forced: all argmaxes right <=> greedy
decoding produces the answer.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

import stem
from stem.api import auto_dense_reason
from stem.plan import BlockPlan
from stem.planner import block_logits, dense_plan

from .data import DataConfig, eval_examples
from .model import RetrievalLM, dense_attention

__all__ = ["run_eval", "auto_block_size", "parse_method", "DEFAULT_METHODS", "uniform_topk_mask",
           "format_table", "plot_heatmaps"]

DEFAULT_METHODS = ("dense", "stem", "stem_a1.0", "stem_a0.85", "stem_a0.5", "uniform_topk", "stem_novb")
STEM_DEFAULT_ALPHA = stem.StemConfig().alpha


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # dense | stem | uniform | stem_novb
    alpha: float = STEM_DEFAULT_ALPHA
    ranking: str = "stem"
    precision: str = "native"
    rows: int = 4  # StemConfig.sampled_rows (ranking="sampled_mass" only)


def parse_method(name: str) -> Method:
    if name.endswith("+fp8"):
        base = parse_method(name[: -len("+fp8")])
        if base.kind == "uniform":
            raise ValueError("uniform_topk+fp8 is not supported: its density target comes from the native 'stem' run")
        return Method(name, base.kind, base.alpha, base.ranking, "fp8", base.rows)
    if name == "dense":
        return Method(name, "dense")
    if name == "stem":
        return Method(name, "stem")
    if name == "uniform_topk":
        return Method(name, "uniform")
    if name == "stem_novb":
        return Method(name, "stem_novb")
    if name == "sampled_mass":
        return Method(name, "stem", ranking="sampled_mass")
    rows = name.removeprefix("sampled_mass_r")
    if name.startswith("sampled_mass_r") and rows in ("1", "2", "8", "16", "32"):
        return Method(name, "stem", ranking="sampled_mass", rows=int(rows))
    if name.startswith("stem_a"):
        try:
            alpha = float(name[len("stem_a"):])
        except ValueError:
            alpha = -1.0
        if 0.0 < alpha <= 1.0:
            return Method(name, "stem", alpha)
    raise ValueError(
        f"unknown method {name!r}; use dense, stem, stem_a<alpha> (0 < alpha <= 1, e.g. stem_a0.5), "
        f"uniform_topk, stem_novb, sampled_mass or sampled_mass_r<rows> (1, 2, 8, 16, 32), each but uniform_topk "
        f"optionally with +fp8"
    )


def auto_block_size(length: int, min_blocks: int = 128) -> int:
    """The largest power of two in [16, 128] that gives at least ``min_blocks`` blocks (so the
    Stem budget is below the number of blocks and the plan is sparse); 16 for short inputs."""
    bs = 128
    while bs > 16 and length // bs < min_blocks:
        bs //= 2
    return bs


# ---- baselines ------------------------------------------------------------------------------
def _forced_and_causal(nQ: int, nK: int, cfg: stem.StemConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(nQ, device=device)[:, None] + (nK - nQ)
    cols = torch.arange(nK, device=device)[None, :]
    causal = cols <= rows
    forced = (cols < cfg.sink_blocks) | ((cols > rows - cfg.window_blocks) & causal)
    return forced & causal, causal


def uniform_topk_mask(logits: torch.Tensor, target_density: torch.Tensor, cfg: stem.StemConfig) -> torch.Tensor:
    """bool (B, Hq, nQ, nK): for each batch row b the same k for every query block and head (top-k
    of ``logits``, plus sinks and window, causal only), k chosen so the density (selected /
    causal blocks over all heads and query blocks) is closest to ``target_density[b]``."""
    B, H, nQ, nK = logits.shape
    forced, causal = _forced_and_causal(nQ, nK, cfg, logits.device)
    order = logits.argsort(-1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(nK, device=logits.device).expand_as(order))
    n_causal = causal.sum() * H

    def density(k: torch.Tensor) -> torch.Tensor:  # k: (B,) -> (B,)
        sel = ((rank < k[:, None, None, None]) | forced) & causal
        return sel.sum((1, 2, 3)) / n_causal

    lo = torch.zeros(B, dtype=torch.long, device=logits.device)  # density(lo) <= target < density(hi)
    hi = torch.full((B,), nK + 1, dtype=torch.long, device=logits.device)
    target = target_density.to(logits.device, torch.float64)
    for _ in range(max(1, math.ceil(math.log2(nK + 2)))):  # fixed trip count: no host sync
        mid = (lo + hi) // 2
        below = density(mid).double() <= target
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    d_lo, d_hi = density(lo).double(), density(hi.clamp(max=nK)).double()
    k = torch.where((target - d_lo).abs() <= (d_hi - target).abs(), lo, hi.clamp(max=nK))
    return ((rank < k[:, None, None, None]) | forced) & causal


def _auto_dense(L: int, cfg: stem.StemConfig) -> str | None:
    """Why stem.attention(config=..., backend="auto") on CUDA would skip this plan and run dense
    (a speed shortcut of the API; the harness always executes the plan), or None."""
    return auto_dense_reason("cuda", L, L, cfg)


def _per_sample_density(plan: BlockPlan) -> torch.Tensor:
    causal = plan.causal_blocks_per_row().sum() * plan.num_heads
    return plan.kv_counts.sum((1, 2)).double() / causal


# ---- one forward pass per (cell, method) -------------------------------------------------------
class _Runner:
    """Builds the attn_fn of a method and records per-layer plan densities."""

    def __init__(self, cfg: stem.StemConfig, dense_layers: set[int], backend: str) -> None:
        self.cfg = cfg
        self.dense_layers = dense_layers
        self.backend = backend
        self.stem_density: dict[int, torch.Tensor] = {}  # layer -> (B,), from the default Stem run
        self.dispatch: set[str] = set()

    def attn_fn(self, method: Method, record: dict[int, torch.Tensor]):
        cfg = self.cfg

        def fn(q, k, v, layer_idx):
            if layer_idx in self.dense_layers or (method.kind == "dense" and method.precision == "native"):
                return dense_attention(q, k, v)
            if method.kind == "dense":  # every causal block, through the FP8 kernel
                plan = dense_plan(q.shape[0], q.shape[1], q.shape[2], k.shape[2], cfg.block_size, q.device, cfg)
                out = stem.attention(q, k, v, plan=plan, backend=self.backend, precision="fp8")
            elif method.kind in ("stem", "stem_novb"):
                extra = {"sampled_rows": method.rows} if method.ranking == "sampled_mass" else {}
                c = (cfg.replace(alpha=method.alpha, ranking=method.ranking, **extra) if method.kind == "stem"
                     else cfg.replace(value_weight=0.0))
                # Plan explicitly: stem.attention(config=...) with backend="auto" may skip planning
                # and run dense where the budgets are too dense to be faster (a speed shortcut);
                # the quality benchmark must execute the Stem plan itself.
                plan = stem.plan(q, k, v, c)
                out = stem.attention(q, k, v, plan=plan, backend=self.backend, precision=method.precision)
            else:  # uniform top-k at Stem's measured density for this (layer, sample)
                target = self.stem_density.get(layer_idx)
                if target is None:
                    raise RuntimeError("uniform_topk needs the 'stem' method to run first on the same inputs")
                c0 = cfg.replace(value_weight=0.0)
                logits = block_logits(q, k, v, c0)
                mask = uniform_topk_mask(logits, target, cfg)
                plan = BlockPlan.from_dense_mask(mask, block_size=cfg.block_size, q_len=q.shape[2],
                                                 kv_len=k.shape[2], config=None)
                out = stem.attention(q, k, v, plan=plan, backend=self.backend)
            if self.backend == "auto" or method.precision != "native":
                self.dispatch.add(stem.last_dispatch() or "?")
            else:
                self.dispatch.add(self.backend)
            record[layer_idx] = _per_sample_density(plan)
            return out

        return fn


@torch.no_grad()
def _answer_correct(model: RetrievalLM, prompts, answers, attn_fn, autocast) -> torch.Tensor:
    with autocast():
        logits, cache = model(prompts, attn_fn, return_kv=True, last_only=True)
        ext = model.extend(answers[:, :-1], cache) if answers.shape[1] > 1 else logits[:, :0]
    pred = torch.cat((logits[:, -1:], ext), 1).argmax(-1)
    return (pred == answers).all(-1)


def run_eval(
    model: RetrievalLM,
    lengths=(4096, 8192, 16384),
    depths=(0.1, 0.3, 0.5, 0.7, 0.9),
    n_needles=(1, 4),
    methods=DEFAULT_METHODS,
    *,
    samples: int = 8,
    block_size: int | str = "auto",
    dense_layers=(0,),
    stem_config: stem.StemConfig | None = None,
    backend: str = "auto",
    data_config: DataConfig | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    time_budget: float | None = None,
    progress: bool = True,
    out_dir: str | None = None,
    tag: str = "",
    meta: dict | None = None,
) -> dict:
    """Run the benchmark; returns (and, with ``out_dir``, writes) a JSON-able result dict.

    Args:
        model: a RetrievalLM (e.g. from :func:`benchmarks.retrieval.load_model`).
        lengths, depths, n_needles: the grid (prompt length in tokens, depth of the queried
            needle in [0, 1], needles in the haystack).
        methods: names, see the module docstring; ``uniform_topk`` needs ``stem`` (run first).
        samples: prompts per cell (batched).
        block_size: int, or "auto" (:func:`auto_block_size` per length).
        dense_layers: layers that stay dense under every sparse method.
        stem_config: base StemConfig (block_size is overridden per length); default the paper's.
        backend: stem executor ("auto" records which one ran).
        time_budget: seconds; cells not started by then are skipped (recorded as skipped).
        progress: show a tqdm bar (skipped with a note when tqdm is not installed).
        out_dir: write ``retrieval_eval{tag}.json`` and ``retrieval_eval{tag}.png`` there.
        meta: extra JSON-able fields recorded in the result (e.g. ``untrained``, ``weights``,
            ``command``, ``versions``); ``untrained`` defaults to False.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device).eval()
    mlist = [parse_method(m) for m in methods]
    names = [m.name for m in mlist]
    if len(set(names)) != len(names):
        raise ValueError(f"methods repeat: {names}")
    if "uniform_topk" in names and ("stem" not in names or names.index("stem") > names.index("uniform_topk")):
        raise ValueError("uniform_topk matches Stem's measured density: list 'stem' before it in methods")
    n_layers = model.cfg.n_layers
    dense_layers = set(int(x) for x in dense_layers)
    if any(not 0 <= x < n_layers for x in dense_layers):
        raise ValueError(f"dense_layers {sorted(dense_layers)} out of range for a {n_layers}-layer model")
    dcfg = data_config or DataConfig.from_dict(getattr(model, "data_config", None))
    base = stem_config or stem.StemConfig()
    cuda = device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    cells = [(L, d, n) for L in lengths for n in n_needles for d in depths]
    configs = {}
    for L in lengths:
        bs = auto_block_size(L) if block_size == "auto" else int(block_size)
        c = base.replace(block_size=bs, stride=min(base.stride, bs))
        n_blocks = -(-L // bs)
        configs[L] = {"config": c.to_dict(), "n_blocks": n_blocks,
                      "dense_budget": stem.budget.is_dense_budget(n_blocks, c.k_rate, c.k_bias),
                      "auto_would_run_dense_on_cuda": _auto_dense(L, c)}
    result = {
        "untrained": False, **(meta or {}),
        "tag": tag, "device": str(device),
        "card": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__, "stem": stem.__version__,
        "dtype": "bfloat16 autocast" if cuda else "float32",
        "lengths": list(lengths), "depths": list(depths), "n_needles": list(n_needles), "methods": names,
        "samples_per_cell": samples, "seed": seed, "dense_layers": sorted(dense_layers), "backend": backend,
        "stem_configs": {str(L): v for L, v in configs.items()},
        "data_config": dcfg.to_dict(), "cells": [], "skipped_cells": [],
    }
    bar = _progress_bar(len(cells) * len(mlist)) if progress else None
    t_start = time.perf_counter()
    dispatch: set[str] = set()
    for L, depth, n in cells:
        if time_budget is not None and time.perf_counter() - t_start > time_budget:
            result["skipped_cells"].append({"length": L, "depth": depth, "needles": n})
            if bar is not None:
                bar.update(len(mlist))
            continue
        cfg = stem.StemConfig.from_dict(configs[L]["config"])
        prompts, answers = eval_examples(dcfg, L, depth, n, samples, seed=seed)
        prompts, answers = prompts.to(device), answers.to(device)
        runner = _Runner(cfg, dense_layers, backend)
        for m in mlist:
            record: dict[int, torch.Tensor] = {}
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            correct = _answer_correct(model, prompts, answers, runner.attn_fn(m, record), autocast)
            if cuda:
                torch.cuda.synchronize()
            secs = time.perf_counter() - t0
            if m.name == "stem":
                runner.stem_density = dict(record)
            layers = sorted(record)
            per_layer = {str(i): [round(float(x), 4) for x in record[i].cpu()] for i in layers}
            dens = (torch.stack([record[i] for i in layers]).mean(0).cpu() if layers else torch.ones(samples))
            result["cells"].append({
                "length": L, "depth": depth, "needles": n, "method": m.name,
                "accuracy": float(correct.float().mean()), "correct": [bool(x) for x in correct.cpu()],
                "density": float(dens.mean()), "density_per_layer": per_layer, "seconds": round(secs, 3),
            })
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"L={L} d={depth} n={n} {m.name}")
        dispatch |= runner.dispatch
    if bar is not None:
        bar.close()
    result["dispatch"] = sorted(dispatch)
    result["eval_seconds"] = round(time.perf_counter() - t_start, 1)
    result["summary"] = summarize(result)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"retrieval_eval{tag}.json"), "w") as f:
            json.dump(result, f, indent=1)
        try:
            plot_heatmaps(result, os.path.join(out_dir, f"retrieval_eval{tag}.png"))
        except ImportError:
            print("(matplotlib is not installed: no retrieval_eval PNG; pip install matplotlib)")
    return result


def _progress_bar(total: int):
    """A tqdm bar, or None (with a note) when tqdm is not installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        print("(tqdm is not installed: no progress bar; pip install tqdm)")
        return None
    return tqdm(total=total, desc="retrieval", unit="run", dynamic_ncols=True)


# ---- reporting ------------------------------------------------------------------------------
def summarize(result: dict) -> dict:
    """Mean accuracy and density per (method, length) and per (method, length, needles)."""
    acc, dens = defaultdict(list), defaultdict(list)
    for c in result["cells"]:
        for key in ((c["method"], c["length"]), (c["method"], c["length"], c["needles"])):
            acc[key].append(c["accuracy"])
            dens[key].append(c["density"])
    out = {}
    for key in acc:
        out["/".join(str(x) for x in key)] = {
            "accuracy": sum(acc[key]) / len(acc[key]), "density": sum(dens[key]) / len(dens[key]),
            "cells": len(acc[key]),
        }
    return out


def format_table(result: dict) -> str:
    """Accuracy (and mean sparse-layer density) per method and length, plus the ratio to dense."""
    s = result["summary"]
    lengths = [L for L in result["lengths"] if any(f"{m}/{L}" in s for m in result["methods"])]
    head = f"{'method':<14}" + "".join(f"{'L=' + str(L):>22}" for L in lengths) + f"{'mean acc':>10}"
    lines = ["UNTRAINED MODEL (smoke run of the pipeline): these accuracies mean nothing"] \
        if result.get("untrained") else []
    lines += [f"card: {result['card']}  dtype: {result['dtype']}  dense layers: {result['dense_layers']}  "
              f"executor(s): {'; '.join(result.get('dispatch', [])) or '-'}",
              "cell = accuracy (density of the sparse layers' plans); blocks per length: "
              + ", ".join(f"{L}: bs={result['stem_configs'][str(L)]['config']['block_size']}" for L in lengths),
              head, "-" * len(head)]
    for m in result["methods"]:
        row, accs = f"{m:<14}", []
        for L in lengths:
            r = s.get(f"{m}/{L}")
            if r is None:
                row += f"{'-':>22}"
                continue
            accs.append(r["accuracy"])
            row += f"{r['accuracy']:>14.3f} ({r['density']:.2f})"
        row += f"{sum(accs) / max(1, len(accs)):>10.3f}"
        lines.append(row)
    return "\n".join(lines)


def plot_heatmaps(result: dict, path: str) -> str:
    """PNG: one depth x length accuracy heatmap per (needles, method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, lengths, depths, needles = result["methods"], result["lengths"], result["depths"], result["n_needles"]
    acc = {(c["method"], c["length"], c["depth"], c["needles"]): c["accuracy"] for c in result["cells"]}
    fig, axes = plt.subplots(len(needles), len(methods), figsize=(2.3 * len(methods) + 1, 2.4 * len(needles) + 0.8),
                             squeeze=False)
    im = None
    for r, n in enumerate(needles):
        for c, m in enumerate(methods):
            ax = axes[r][c]
            grid = [[acc.get((m, L, d, n), float("nan")) for L in lengths] for d in depths]
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            for i in range(len(depths)):
                for j in range(len(lengths)):
                    if not math.isnan(grid[i][j]):
                        ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(lengths)), [f"{L // 1024}K" if L >= 1024 else str(L) for L in lengths],
                          fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
            if r == 0:
                ax.set_title(m, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{n} needle(s)\ndepth", fontsize=8)
            if r == len(needles) - 1:
                ax.set_xlabel("length", fontsize=8)
    title = f"retrieval exact match, {result['card']}"
    if result.get("untrained"):
        title += " (UNTRAINED model: smoke run, accuracies mean nothing)"
    fig.suptitle(title, fontsize=10)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.6)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
