"""The retrieval benchmark from the command line: accuracy of a small trained model under dense
attention, Stem and baselines at equal density.

Run from the repository root:

    python -m benchmarks.retrieval --out benchmarks/results                # 4K-16K grid, committed model
    python -m benchmarks.retrieval --tiny --out out/retrieval              # committed model, 1K tokens, ~1 min on CPU
    python -m benchmarks.retrieval --untrained --out out/retrieval         # pipeline smoke run: numbers mean nothing

The model is the one committed in ``benchmarks/retrieval/weights/`` (trained by
``python -m benchmarks.retrieval.train``) unless ``--weights DIR`` names another. Writes
``retrieval_eval<tag>.json`` and ``.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

__all__ = ["build_parser", "main", "default_weights_dir", "parse_lengths"]

TRAIN_HINT = "python -m benchmarks.retrieval.train --out DIR"


def default_weights_dir() -> str:
    """The committed model: ``benchmarks/retrieval/weights`` of this checkout."""
    return str(Path(__file__).resolve().parent / "weights")


def parse_lengths(text: str) -> list[int]:
    """'4K,8K,16384' -> [4096, 8192, 16384]."""
    out = []
    for part in text.split(","):
        p = part.strip().lower()
        try:
            out.append(int(float(p[:-1]) * 1024) if p.endswith("k") else int(p))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad length {part!r}; use e.g. 4K,8K,16384") from None
    if any(x < 64 for x in out):
        raise argparse.ArgumentTypeError(f"lengths must be >= 64 tokens, got {out}")
    return out


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _shown_path(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (results files name no machine
    paths), else absolute."""
    root = Path(__file__).resolve().parents[2]
    full = Path(path).resolve()
    return str(full.relative_to(root)) if full.is_relative_to(root) else str(full)


def build_parser() -> argparse.ArgumentParser:
    from .harness import DEFAULT_METHODS

    p = argparse.ArgumentParser(prog="python -m benchmarks.retrieval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--weights", default=None,
                   help="model directory (config.json + model.safetensors); default: the committed "
                        "benchmarks/retrieval/weights/")
    p.add_argument("--lengths", type=parse_lengths, default=None, help="prompt lengths, e.g. 4K,8K,16K (default)")
    p.add_argument("--depths", type=_floats, default=None, help="needle depths in [0,1], default 0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--needles", type=_ints, default=None, help="needles per haystack, default 1,4")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma list of: dense, stem, stem_a<alpha>, uniform_topk, stem_novb (default: all of "
                        "the standard set)")
    p.add_argument("--samples", type=int, default=None, help="prompts per cell (default 8; 2 with --tiny/--untrained)")
    p.add_argument("--block-size", default="auto",
                   help="Stem block size, or 'auto' (largest power of two <= 128 giving >= 128 blocks)")
    p.add_argument("--dense-layers", type=_ints, default=[0], help="layers kept dense (default 0; '' for none)")
    p.add_argument("--backend", default="auto", help="stem executor (default auto; the one used is recorded)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=None, help="seconds; later cells are skipped after it")
    p.add_argument("--out", default=None, help="directory for retrieval_eval<tag>.json and .png")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    small = p.add_mutually_exclusive_group()
    small.add_argument("--tiny", action="store_true",
                       help="a quick run of the trained model on a small grid: L=1024, block 16, depths 0.2,0.8, "
                            "needles 1,2, 2 samples (grid options still override)")
    small.add_argument("--untrained", action="store_true",
                       help="smoke run of the pipeline on a randomly initialised tiny model (no weights needed) on "
                            "the --tiny grid: the accuracies mean nothing; the JSON records \"untrained\": true")
    p.add_argument("--no-progress", action="store_true")
    return p


def _banner(lines: list[str]) -> str:
    width = max(len(x) for x in lines)
    bar = "!" * (width + 4)
    return "\n".join([bar, *(f"! {x:<{width}} !" for x in lines), bar])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    import stem

    from .harness import format_table, run_eval
    from .model import ModelConfig, RetrievalLM, load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    weights = args.weights or default_weights_dir()
    lengths, depths, needles, samples, bs = args.lengths, args.depths, args.needles, args.samples, args.block_size
    if args.tiny or args.untrained:
        lengths, depths = lengths or [1024], depths or [0.2, 0.8]
        needles, samples = needles or [1, 2], samples or 2
        bs = "16" if bs == "auto" else bs
    lengths, depths = lengths or [4096, 8192, 16384], depths or [0.1, 0.3, 0.5, 0.7, 0.9]
    needles, samples = needles or [1, 4], samples or 8
    if args.untrained:
        torch.manual_seed(args.seed)
        model = RetrievalLM(ModelConfig(d_model=64, n_layers=2, mlp_hidden=128, head_dim=16))
        model.reset_parameters(torch.Generator().manual_seed(args.seed))
        model = model.to(device).eval()
        source = "randomly initialised tiny model (--untrained)"
        print(_banner([
            "SMOKE RUN on an UNTRAINED model (--untrained): this checks that the pipeline runs end to end.",
            "Its accuracies are meaningless (a random model answers nothing right). For real numbers",
            f"run without --untrained (the committed model in {weights}).",
        ]), file=sys.stderr)
    else:
        if not os.path.isdir(weights):
            print(f"python -m benchmarks.retrieval: no model directory at {weights}.\n"
                  f"  Fix: train one with `{TRAIN_HINT}` and pass --weights DIR (the committed model lives in "
                  f"benchmarks/retrieval/weights/ of a full checkout), or run --untrained for a smoke run of "
                  f"the pipeline.", file=sys.stderr)
            return 2
        try:
            model = load_model(weights, device=device)
        except (FileNotFoundError, ValueError) as e:
            print(f"python -m benchmarks.retrieval: cannot load the model in {weights}: {e}\n"
                  f"  Fix: `{TRAIN_HINT}` and pass --weights DIR.", file=sys.stderr)
            return 2
        source = weights
    meta = {
        "untrained": bool(args.untrained),
        "weights": None if args.untrained else _shown_path(weights),
        "command": " ".join(["python -m benchmarks.retrieval", *(sys.argv[1:] if argv is None else argv)]),
        "versions": {"stem": stem.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
                     "python": platform.python_version()},
    }
    try:
        block_size = bs if bs == "auto" else int(bs)
        result = run_eval(
            model, lengths, depths, needles, [m.strip() for m in args.methods.split(",") if m.strip()],
            samples=samples, block_size=block_size, dense_layers=args.dense_layers, backend=args.backend,
            device=device, seed=args.seed, time_budget=args.time_budget, progress=not args.no_progress,
            out_dir=args.out, tag=args.tag, meta=meta,
        )
    except ValueError as e:
        print(f"python -m benchmarks.retrieval: {e}", file=sys.stderr)
        return 2
    print(f"model: {source}")
    print(format_table(result))
    if result["skipped_cells"]:
        print(f"skipped {len(result['skipped_cells'])} cells (time budget)")
    if args.out:
        print(f"wrote {os.path.join(args.out, f'retrieval_eval{args.tag}.json')} and .png")
    if args.untrained:
        print("UNTRAINED MODEL: the accuracies above are a smoke test of the pipeline and mean nothing.",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
