"""``stem eval``: the retrieval benchmark from the command line.

Wiring into stem/cli.py (two lines)::

    from stem.eval import cli as eval_cli      # at the top
    eval_cli.add_parser(subparsers)            # where the sub-commands are added

``add_parser`` sets ``fn=main`` (and ``func=main``) on the sub-parser, so a dispatcher that calls
``args.fn(args)`` runs it (stem/cli.py already does both). Also runnable alone: ``python -m stem.eval.cli --tiny``.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["add_parser", "main", "default_weights_dir", "parse_lengths"]


def default_weights_dir() -> str:
    """The committed model: ``benchmarks/models/retrieval`` of the source tree (else of the CWD)."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(here, "benchmarks", "models", "retrieval")
    return path if os.path.isdir(path) else os.path.join("benchmarks", "models", "retrieval")


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


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .harness import DEFAULT_METHODS

    p.add_argument("--weights", default=None,
                   help="model directory (config.json + model.safetensors); default: the committed "
                        "benchmarks/models/retrieval/")
    p.add_argument("--lengths", type=parse_lengths, default=None, help="prompt lengths, e.g. 4K,8K,16K (default)")
    p.add_argument("--depths", type=_floats, default=None, help="needle depths in [0,1], default 0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--needles", type=_ints, default=None, help="needles per haystack, default 1,4")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma list of: dense, stem, stem_a<alpha>, uniform_topk, stem_novb (default: all of "
                        "the standard set)")
    p.add_argument("--samples", type=int, default=None, help="prompts per cell (default 8; 2 with --tiny)")
    p.add_argument("--block-size", default="auto",
                   help="Stem block size, or 'auto' (largest power of two <= 128 giving >= 128 blocks)")
    p.add_argument("--dense-layers", type=_ints, default=[0], help="layers kept dense (default 0; '' for none)")
    p.add_argument("--backend", default="auto", help="stem executor (default auto; the one used is recorded)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=None, help="seconds; later cells are skipped after it")
    p.add_argument("--out", default=None, help="directory for eval<tag>.json and eval<tag>.png")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--tiny", action="store_true",
                   help="a quick smoke run: L=1024, block 16, 2 depths, needles 1,2, 2 samples (a random "
                        "tiny model if --weights does not exist)")
    p.add_argument("--no-progress", action="store_true")
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` sub-command to an argparse sub-parsers object."""
    p = subparsers.add_parser("eval", help="retrieval accuracy: dense vs Stem vs baselines at equal density",
                              description=__doc__.splitlines()[0])
    _configure(p)
    p.set_defaults(func=main, fn=main)  # stem/cli.py dispatches through args.fn
    return p


def main(args: argparse.Namespace) -> int:
    import torch

    from .harness import format_table, run_eval
    from .model import ModelConfig, RetrievalLM, load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    weights = args.weights or default_weights_dir()
    lengths, depths, needles, samples, bs = args.lengths, args.depths, args.needles, args.samples, args.block_size
    if args.tiny:
        lengths, depths = lengths or [1024], depths or [0.2, 0.8]
        needles, samples = needles or [1, 2], samples or 2
        bs = "16" if bs == "auto" else bs
    lengths, depths = lengths or [4096, 8192, 16384], depths or [0.1, 0.3, 0.5, 0.7, 0.9]
    needles, samples = needles or [1, 4], samples or 8
    if os.path.isdir(weights):
        model = load_model(weights, device=device)
        source = weights
    elif args.tiny:
        torch.manual_seed(args.seed)
        model = RetrievalLM(ModelConfig(d_model=64, n_layers=2, mlp_hidden=128, head_dim=16)).to(device).eval()
        source = "random tiny model (no weights found)"
    else:
        print(f"stem eval: no model at {weights}; train one with benchmarks/train_retrieval.py --out DIR "
              f"and pass --weights DIR", file=sys.stderr)
        return 2
    try:
        block_size = bs if bs == "auto" else int(bs)
        result = run_eval(
            model, lengths, depths, needles, [m.strip() for m in args.methods.split(",") if m.strip()],
            samples=samples, block_size=block_size, dense_layers=args.dense_layers, backend=args.backend,
            device=device, seed=args.seed, time_budget=args.time_budget, progress=not args.no_progress,
            out_dir=args.out, tag=args.tag,
        )
    except ValueError as e:
        print(f"stem eval: {e}", file=sys.stderr)
        return 2
    print(f"model: {source}")
    print(format_table(result))
    if result["skipped_cells"]:
        print(f"skipped {len(result['skipped_cells'])} cells (time budget)")
    if args.out:
        print(f"wrote {os.path.join(args.out, f'eval{args.tag}.json')} and .png")
    return 0


if __name__ == "__main__":
    parser = _configure(argparse.ArgumentParser(prog="stem eval", description=__doc__.splitlines()[0]))
    sys.exit(main(parser.parse_args()))
