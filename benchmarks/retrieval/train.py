"""Train the small retrieval model of the retrieval benchmark (benchmarks/retrieval/), reproducibly from a seed.

A curriculum of stages: most steps at short lengths (the retrieval skill: find the needle with
the queried key, copy its value), then a few steps at 4K, 8K and 16K (and 32K with --long32)
so the skill holds at the lengths the benchmark uses. bf16 autocast, fused AdamW, SDPA flash.

Run from the repository root:

    python -m benchmarks.retrieval.train --out out/retrieval_model     # default "h100" preset (GPU)
    python -m benchmarks.retrieval.train --out out/retrieval_tiny --preset tiny --device cpu   # smoke run

The committed model (benchmarks/retrieval/weights/) is the GPU recipe with ``--long32
--save-dtype bfloat16`` on an H200 (``bash benchmarks/gpu/gpu_eval.sh`` trains and evaluates it).

Writes ``model.safetensors`` + ``config.json`` (model and data config, training summary) and
``train_log.json`` (loss / accuracy per stage) into --out. Every step is a function of the seed;
only --time-budget (a safety cap, off unless given) can cut a stage short, and the log says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks.retrieval.data import DataConfig, answer_positions, eval_examples, train_batch
from benchmarks.retrieval.model import ModelConfig, RetrievalLM, save_model


@dataclass
class Stage:
    length: int
    batch: int
    steps: int
    needles: tuple[int, int]  # inclusive range, drawn per step
    queries: int


PRESETS: dict[str, list[Stage]] = {
    # ~3.3K steps, ~155 s of steps on one H200 (bf16, no torch.compile; measured 2026-11-28).
    # Mostly short haystacks with several needles (the key-matching skill), a few long steps.
    "h100": [
        Stage(256, 256, 1200, (1, 6), 6),
        Stage(512, 128, 900, (2, 8), 6),
        Stage(1024, 64, 500, (2, 8), 4),
        Stage(2048, 32, 300, (2, 8), 4),
        Stage(4096, 16, 150, (1, 8), 4),
        Stage(8192, 8, 100, (1, 8), 4),
        Stage(16384, 4, 80, (1, 8), 4),
    ],
    "tiny": [
        Stage(128, 16, 30, (1, 2), 2),
        Stage(256, 8, 20, (1, 4), 2),
    ],
}
LONG32 = Stage(32768, 2, 40, (1, 8), 4)
MODEL_PRESETS = {
    "h100": ModelConfig(),
    "tiny": ModelConfig(d_model=64, n_layers=2, mlp_hidden=128, head_dim=16),
}


def parse_stages(text: str) -> list[Stage]:
    out = []
    for part in text.split(","):
        f = [int(x) for x in part.strip().split("x")]
        if not 3 <= len(f) <= 5:
            raise SystemExit(f"--stages: bad stage {part!r}; use LENGTHxBATCHxSTEPS[xMAXNEEDLES[xQUERIES]]")
        out.append(Stage(f[0], f[1], f[2], (1, f[3] if len(f) > 3 else 4), f[4] if len(f) > 4 else 4))
    return out


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@torch.no_grad()
def heldout_accuracy(model, data_cfg, length, device, n=32, seed=12345, autocast=None) -> float:
    """Exact-match accuracy (dense, teacher-forced argmax = greedy) on held-out eval prompts."""
    model.eval()
    hits, total = 0, 0
    for i, depth in enumerate((0.1, 0.5, 0.9)):
        ids, ans = eval_examples(data_cfg, length, depth, 1 + 3 * (i % 2), max(1, n // 3), seed=seed)
        full = torch.cat((ids, ans), 1).to(device)
        with autocast():
            logits = model(full)
        P, A = ids.shape[1], ans.shape[1]
        pred = logits[:, P - 1 : P - 1 + A].argmax(-1).cpu()
        hits += int((pred == ans).all(-1).sum())
        total += ids.shape[0]
    model.train()
    return hits / total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output directory (model.safetensors, config.json, train_log.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="h100")
    ap.add_argument("--long32", action="store_true", help="add a final 32K stage")
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds; a safety cap: stages are shortened (and the log says so) to end in time")
    ap.add_argument("--stages", default=None,
                    help="override the preset's stages: LENGTHxBATCHxSTEPS[xMAXNEEDLES[xQUERIES]],... e.g. 256x32x500")
    ap.add_argument("--model", default=None, help="override model config fields, JSON, e.g. '{\"n_layers\": 4}'")
    ap.add_argument("--save-dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    stages = list(PRESETS[args.preset]) if args.stages is None else parse_stages(args.stages)
    stages += [LONG32] if args.long32 else []
    mcfg, dcfg = MODEL_PRESETS[args.preset], DataConfig()
    if args.model:
        mcfg = ModelConfig.from_dict({**mcfg.to_dict(), **json.loads(args.model)})
    model = RetrievalLM(mcfg)
    model.reset_parameters(torch.Generator().manual_seed(args.seed))
    model.to(device).train()
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=cuda,
    )

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    sdpa_ctx = None
    if cuda:  # never the O(L^2)-memory math fallback
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa_ctx = lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,  # noqa: E731
                                        SDPBackend.EFFICIENT_ATTENTION])
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)  # batches, drawn on the device
    host_gen = torch.Generator().manual_seed(args.seed + 2)  # needle counts: no device sync per step
    total_steps = sum(s.steps for s in stages)
    planned_tokens = [s.length * s.batch * s.steps for s in stages]
    print(f"model: {model.num_parameters() / 1e6:.2f}M params, {mcfg}", flush=True)
    print(f"stages: {[(s.length, s.batch, s.steps) for s in stages]} ({total_steps} steps)", flush=True)

    log = {"seed": args.seed, "preset": args.preset, "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
           "torch": torch.__version__, "model": mcfg.to_dict(), "data": dcfg.to_dict(), "stages": []}
    t_start = time.perf_counter()
    step = 0
    for si, st in enumerate(stages):
        t0 = time.perf_counter()
        stage_budget = None
        if args.time_budget is not None:  # share what is left in proportion to the planned work
            left = args.time_budget - (t0 - t_start)
            stage_budget = left * planned_tokens[si] / sum(planned_tokens[si:])
        loss_acc = torch.zeros((), device=device)
        tok_acc = torch.zeros((), device=device)
        em_acc = torch.zeros((), device=device)
        n_acc, done, cut = 0, 0, False
        for i in range(st.steps):
            n_needles = int(torch.randint(st.needles[0], st.needles[1] + 1, (1,), generator=host_gen))
            ids, tgt = train_batch(dcfg, st.batch, st.length, n_needles, st.queries, gen)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total_steps, args.lr, args.warmup)
            with autocast():
                if sdpa_ctx is not None:
                    with sdpa_ctx():
                        logits = model(ids)
                else:
                    logits = model(ids)
            pos = answer_positions(dcfg, st.length, st.queries, device)  # same in every row; no sync
            lg, tg = logits[:, pos], tgt[:, pos]
            loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            done += 1
            tail = i >= st.steps - max(10, st.steps // 5)  # metrics over the last fifth of the stage
            if tail:
                with torch.no_grad():
                    right = lg.argmax(-1) == tg
                    loss_acc += loss.detach()
                    tok_acc += right.float().mean()
                    em_acc += right.view(st.batch, st.queries, dcfg.value_len).all(-1).float().mean()
                    n_acc += 1
            if i % 100 == 0:
                print(f"  stage {si} L={st.length} step {i}/{st.steps} loss {loss.item():.4f} "
                      f"({time.perf_counter() - t_start:.0f}s)", flush=True)  # sync: once per 100 steps
            if stage_budget is not None and i % 10 == 9 and time.perf_counter() - t0 > stage_budget:
                cut = True
                break
        if cuda:
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        n_acc = max(n_acc, 1)
        held = heldout_accuracy(model, dcfg, st.length, device, autocast=autocast)
        rec = {"length": st.length, "batch": st.batch, "steps_planned": st.steps, "steps_done": done,
               "cut_by_time_budget": cut, "needles": list(st.needles), "queries": st.queries,
               "seconds": round(secs, 2), "tokens_per_s": round(done * st.batch * st.length / secs),
               "train_loss": float(loss_acc / n_acc), "train_token_acc": float(tok_acc / n_acc),
               "train_exact_match": float(em_acc / n_acc), "heldout_dense_exact_match": held}
        log["stages"].append(rec)
        print(f"stage {si}: L={st.length} steps={done}/{st.steps} {secs:.1f}s loss={rec['train_loss']:.4f} "
              f"tok_acc={rec['train_token_acc']:.3f} em={rec['train_exact_match']:.3f} heldout_em={held:.3f}"
              + (" (cut by time budget)" if cut else ""), flush=True)
    log["train_seconds"] = round(time.perf_counter() - t_start, 1)
    log["total_steps"] = step
    os.makedirs(args.out, exist_ok=True)
    save_dtype = getattr(torch, args.save_dtype)
    summary = {k: log[k] for k in ("seed", "preset", "device_name", "torch", "train_seconds", "total_steps")}
    save_model(model, args.out, dtype=save_dtype, extra={"data": dcfg.to_dict(), "training": summary})
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=2)
    print(f"trained in {log['train_seconds']}s; wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
