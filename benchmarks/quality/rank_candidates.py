"""Which block score finds the attention mass? Candidate rankings at Stem's budgets, on a real model.

    python -m benchmarks.quality.rank_candidates --cache out/quality_cache --out benchmarks/results

One dense forward captures the post-RoPE q, k, v of every layer (as ``python -m benchmarks.quality``);
for every layer >= 2 each candidate score ranks the key blocks, with Stem's per-row counts, sinks
and window (``recall.fill_mask``), and the recall (dense softmax mass inside the kept blocks) is
summarised. Candidates (scale = 1/sqrt(D); "s rows" = the last row of each of s equal parts of a
query block):

- ``stem``: Stem's block logits; ``oracle``: the true block mass;
- ``qmean_kmax`` / ``qmean_lse``: the query block's mean query against every key, max / log-sum-exp
  over the keys of each key block (cost: 1/block_size of dense Q K^T);
- ``s{n}_max``: largest score of n sampled rows in the block; ``s{n}_mass``: their mean softmax
  mass in the block (rows normalised over all causal keys); ``s{n}_maxnorm``: the largest
  row-normalised score (cost: n/block_size of dense Q K^T);
- ``two_level_*``: the sampled score, but only on Stem's top 2 x count candidates.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import stem
from stem.planner import block_logits

from .capture import build_document, capture_qkv
from .fetch import DEFAULT_CACHE, load_model
from .recall import _query_block_mass, block_mass, fill_mask, forced_and_causal, row_recall

__all__ = ["candidate_scores", "study", "main"]


def _sampled_rows(L: int, nQ: int, bs: int, s: int, device=None) -> torch.Tensor:
    r = torch.arange(nQ, device=device)[:, None] * bs + (bs // s) * (torch.arange(s, device=device)[None, :] + 1) - 1
    return r.clamp(max=L - 1)


def candidate_scores(q, k, bs: int, samples=(1, 2, 4, 8)) -> dict[str, torch.Tensor]:
    """Candidate scores (Hq, nQ, nK) for q (Hq, L, D), k (Hkv, L, D)."""
    Hq, L, D = q.shape
    G = Hq // k.shape[0]
    nQ = -(-L // bs)
    scale = D ** -0.5
    kr = k.float().repeat_interleave(G, 0)
    pad = nQ * bs - L
    out = {}
    qm = torch.nn.functional.pad(q.float(), (0, 0, 0, pad)).view(Hq, nQ, bs, D).mean(2)
    sc = torch.nn.functional.pad((qm @ kr.transpose(-1, -2)) * scale, (0, pad), value=float("-inf"))
    sc = sc.view(Hq, nQ, nQ, bs)
    out["qmean_kmax"] = sc.amax(-1)
    out["qmean_lse"] = torch.logsumexp(sc, -1)
    for s in samples:
        rows = _sampled_rows(L, nQ, bs, s, q.device)
        future = torch.arange(L, device=q.device)[None, :] > rows.flatten()[:, None]
        parts = {"max": [], "mass": [], "maxnorm": []}
        for h in range(Hq):  # one head at a time: (nQ * s, L) scores, not Hq times that
            sc = (q[h].float()[rows.flatten()] @ kr[h].transpose(-1, -2)) * scale
            sc = sc.masked_fill(future, float("-inf"))
            lse_r = torch.logsumexp(sc, -1).view(nQ, s, 1)
            sc = torch.nn.functional.pad(sc, (0, pad), value=float("-inf")).view(nQ, s, nQ, bs)
            blk_max, blk_lse = sc.amax(-1), torch.logsumexp(sc, -1)
            parts["max"].append(blk_max.amax(1))
            parts["mass"].append(torch.exp(blk_lse - lse_r).mean(1))
            parts["maxnorm"].append((blk_max - lse_r).amax(1))
        for kind, vals in parts.items():
            out[f"s{s}_{kind}"] = torch.stack(vals)
    return out


@torch.no_grad()
def study(qkv, cfg: stem.StemConfig, first: int = 2, progress: bool = True) -> dict:
    bs = cfg.block_size
    res = {}
    for li, (q, k, v) in enumerate(qkv):
        if li < first:
            continue
        q, k, v = q[0], k[0], v[0]
        mass = block_mass(q, k, bs)
        stem_mask = stem.plan(q[None], k[None], v[None], cfg).to_dense_mask()[0]
        nQ, nK = stem_mask.shape[-2:]
        forced, causal = forced_and_causal(nQ, nK, cfg)
        counts = stem_mask.sum(-1)
        logits = block_logits(q[None], k[None], v[None], cfg)[0]
        sc = {"stem": logits, "oracle": _query_block_mass(mass, bs), **candidate_scores(q, k, bs)}
        cand = fill_mask(logits, counts * 2, forced, causal)
        for base in ("s4_mass", "s2_mass", "s4_max"):
            sc[f"two_level_{base}"] = sc[base].masked_fill(~cand, float("-inf"))
        row = {}
        for name, s in sc.items():
            r = row_recall(mass, fill_mask(s, counts, forced, causal), bs)
            row[name] = {"mean": float(r.mean()), "p5": float(torch.quantile(r.flatten().double(), 0.05))}
        res[str(li)] = row
        if progress:
            print(li, " ".join(f"{n}:{v['mean']:.3f}" for n, v in row.items()), flush=True)
    names = list(next(iter(res.values())))
    summary = {n: {"mean": sum(r[n]["mean"] for r in res.values()) / len(res),
                   "p5": sum(r[n]["p5"] for r in res.values()) / len(res),
                   "mean_layers_3_10": sum(res[str(i)][n]["mean"] for i in range(3, 11) if str(i) in res)
                   / max(1, sum(str(i) in res for i in range(3, 11)))} for n in names}
    return {"layers": res, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.rank_candidates",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default=DEFAULT_CACHE)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=32)
    args = p.parse_args(argv)
    cfg = stem.StemConfig(block_size=args.block_size)
    model, tok, source = load_model(args.cache)
    ids, sources = build_document(tok, args.length)
    qkv, _ = capture_qkv(model, ids)
    res = study(qkv, cfg)
    res |= {"model": "SmolLM2-135M-Instruct", "gguf_sha256": source["gguf_sha256"], "length": args.length,
            "config": cfg.to_dict(), "text_sources": sources, "torch": torch.__version__,
            "command": " ".join(["python -m benchmarks.quality.rank_candidates",
                                 *(sys.argv[1:] if argv is None else argv)])}
    path = Path(args.out) / f"quality_rank_candidates_smollm2_{args.length // 1024}k_bs{args.block_size}.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    for n, s in res["summary"].items():
        print(f"{n:20s} {s['mean']:.4f} {s['p5']:.4f} {s['mean_layers_3_10']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
