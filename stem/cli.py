"""The ``stem`` command: ``stem info``, ``stem demo``, ``stem bench`` (also ``python -m stem``).

``stem bench`` is the attention-level benchmark a user runs on their own GPU (stem/bench.py);
the repository's other benchmarks (model prefill TTFT, retrieval quality, several GPUs) live in
``benchmarks/`` of a source checkout.

Every bad value exits with status 2 and one ``stem ...: error: ...`` line on stderr (argparse's
convention); Ctrl-C exits with status 130. ``STEM_TRACEBACK=1`` shows the traceback of an error
raised while a command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

__all__ = ["build_parser", "main"]

_EPILOG = "Set STEM_TRACEBACK=1 to see the Python traceback of an error."


# ---- argument parsing ---------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``<prog>: error: <message>`` on stderr, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` after every option's help unless the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action)


def _int_at_least(lo: int):
    def check(s: str) -> int:
        try:
            x = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if x < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {x}")
        return x

    check.__name__ = f"integer >= {lo}"
    return check


def _block_size(s: str) -> int:
    try:
        x = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if not (16 <= x <= 256) or x & (x - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two in [16, 256], got {x}")
    return x


def _device_error(spec: str | None) -> str | None:
    """Why ``--device spec`` cannot run here, or None."""
    import torch

    if spec is None:
        return None
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        return f"argument --device: not a device: {spec!r} (use cpu, cuda or cuda:N)"
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":
        return f"argument --device: {spec!r} is not supported (use cpu, cuda or cuda:N)"
    if not torch.cuda.is_available():
        return f"argument --device: {spec!r} asked for, but CUDA is not available here (torch.cuda.is_available() " \
               f"is False); use --device cpu or leave --device out"
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"argument --device: {spec!r} asked for, but this machine has {torch.cuda.device_count()} CUDA " \
               f"device(s)"
    return None


def _check_demo(p: argparse.ArgumentParser, args) -> None:
    if args.heads % args.kv_heads:
        p.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads}): each key/value head "
                f"serves the same number of query heads")
    why = _device_error(args.device)
    if why:
        p.error(why)
    for name in ("plot", "json"):
        folder = os.path.dirname(getattr(args, name) or "")
        try:
            if folder:
                os.makedirs(folder, exist_ok=True)
        except OSError as e:
            p.error(f"argument --{name}: cannot create the folder {folder!r}: {e.strerror or e}")


def _check_bench(p: argparse.ArgumentParser, args) -> None:
    import torch

    for name in ("lengths", "batch", "heads", "kv_heads", "head_dim", "reps"):
        vals = getattr(args, name)
        for x in vals if isinstance(vals, list) else [vals]:
            if x < 1:
                p.error(f"argument --{name.replace('_', '-')}: must be an integer >= 1, got {x}")
    if args.heads % args.kv_heads:
        p.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    if args.shapes:
        from stem.bench import parse_shape

        for text in args.shapes:
            try:
                parse_shape(text)
            except ValueError as e:
                p.error(f"argument --shapes: {e}")
    bs = args.block_size
    if not (16 <= bs <= 256) or bs & (bs - 1):
        p.error(f"argument --block-size: must be a power of two in [16, 256], got {bs}")
    if not (0.0 < args.alpha <= 1.0):
        p.error(f"argument --alpha: must be in (0, 1], got {args.alpha}")
    from stem.bench import bench_config

    try:
        bench_config(args)
    except ValueError as e:  # e.g. --sampled-rows without --ranking sampled_mass
        p.error(f"arguments --ranking / --sampled-rows: {e}")
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU, and torch.cuda.is_available() is False here; `stem info` says what this machine "
                "has")


# help for the bench options that stem/bench.py leaves without one
_BENCH_HELP = {
    "batch": "batch size",
    "head_dim": "head dimension",
    "dtype": "dtype of q, k and v",
}


def build_parser() -> argparse.ArgumentParser:
    import stem

    p = _Parser(prog="stem", description="Stem sparse attention for long-context prefill.", epilog=_EPILOG,
                formatter_class=_Formatter)
    p.add_argument("--version", action="version", version=f"stem {stem.__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="{info,demo,bench}")
    kw = {"formatter_class": _Formatter, "epilog": _EPILOG}

    s = sub.add_parser("info", help="executors on this machine and why each is or isn't usable",
                       description="Executors on this machine and why each is or isn't usable; planner kernels; "
                                   "what backend='auto' decides at the default config.", **kw)
    s.set_defaults(fn=_info, check=None, parser=s)

    s = sub.add_parser("demo", help="run Stem on the built-in synthetic long-context workload",
                       description="Run Stem on a synthetic workload with attention sinks, local structure and "
                                   "planted needles (keys that a known span of later queries reads), and report "
                                   "the plan's density, its error against dense attention, whether every needle's "
                                   "readers keep the needle's block, and the time against dense SDPA.", **kw)
    s.add_argument("--length", type=_int_at_least(1), default=None,
                   help="sequence length in tokens (default: 8192 on CUDA, 4096 on the CPU)")
    s.add_argument("--heads", type=_int_at_least(1), default=8, help="query heads")
    s.add_argument("--kv-heads", type=_int_at_least(1), default=2,
                   help="key/value heads (grouped-query attention); must divide --heads")
    s.add_argument("--head-dim", type=_int_at_least(8), default=64, help="head dimension")
    s.add_argument("--block-size", type=_block_size, default=None,
                   help="Stem block size, a power of two in [16, 256] (default: 64 on CUDA, 32 on the CPU: "
                        "128 blocks at the default length, the regime of 16K tokens at block size 128)")
    s.add_argument("--seed", type=int, default=0, help="seed of the synthetic workload")
    s.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    s.add_argument("--reps", type=_int_at_least(1), default=None,
                   help="timed repetitions (median) of Stem and dense attention (default: 5 on CUDA; 1 on "
                        "the CPU, where the timed run is the one that computed the result)")
    s.add_argument("--plot", default=os.path.join("stem_demo", "plan.png"),
                   help="PNG path for the plan heatmap, its folder is created ('' to skip)")
    s.add_argument("--json", default=None, help="also write the numbers and the needle report to this JSON file "
                                                "(default: none)")
    s.set_defaults(fn=_demo, check=_check_demo, parser=s)

    from stem.bench import add_arguments as bench_args

    s = sub.add_parser("bench", help="GPU: planner, executors and end-to-end Stem vs dense SDPA and FlexAttention",
                       description="Attention-level benchmark on this machine's GPU; writes JSON + PNG into --out.",
                       **kw)
    bench_args(s)
    for action in s._actions:
        if action.help is None and action.dest in _BENCH_HELP:
            action.help = _BENCH_HELP[action.dest]
    s.set_defaults(fn=_bench, check=_check_bench, parser=s)
    return p


# ---- commands -----------------------------------------------------------------------------------
def _info(args) -> int:
    import torch

    import stem
    from stem.dispatch import executor_status

    print(f"stem {stem.__version__}  torch {torch.__version__}")
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
        p = torch.cuda.get_device_properties(0)
        print(f"CUDA: {p.name} (sm_{p.major}{p.minor}), torch CUDA {torch.version.cuda}")
    else:
        print("CUDA: not available (torch.cuda.is_available() is False)")
    for dev in devices:
        print(f"\nexecutors on {dev} (auto prefers higher priority; dense plans go to sdpa):")
        for row in executor_status(dev):
            mark = "yes" if row.usable else "no "
            text = row.description if row.usable else row.reason
            print(f"  [{mark}] {row.name:<10} prio {row.priority:>4}  {text}")
    from stem.planner import poolings

    kernels = [f"{name} ({', '.join(devs)})" for name, (_, devs) in poolings().items()]
    print("\nplanner pooling kernels:", ", ".join([*kernels, "torch (any device)"]))
    from stem.api import auto_dense_reason

    cfg = stem.StemConfig()
    n_dense = stem.budget._DENSE_BELOW
    print(f"\nauto decisions (default config, block_size={cfg.block_size}):")
    print(f"  plans are dense (-> sdpa) below {n_dense} blocks (up to {(n_dense - 1) * cfg.block_size} tokens)")
    n = n_dense
    while auto_dense_reason("cuda", n * cfg.block_size, n * cfg.block_size, cfg) is not None:
        n += 1
    print(f"  on CUDA, prefill shorter than {n * cfg.block_size} tokens runs dense SDPA without planning: the budgets "
          f"keep >= {stem.api.auto_dense_threshold('triton', 128, 4)} of the causal blocks there (the crossover "
          f"measured for the Triton executor at head dim 128, GQA 4; StemConfig.auto_dense_above overrides it)")
    return 0


def _phase(i: int, n: int, text: str) -> None:
    print(f"[{i}/{n}] {text} ...", flush=True)


def _sync(dev: str) -> None:
    import torch

    if dev.startswith("cuda"):
        torch.cuda.synchronize(dev)


def _needle_lines(rep: dict, info: dict) -> list[str]:
    """The demo's needle report as text (``rep`` from :func:`stem.workloads.needle_report`)."""
    rows = rep["needles"]
    if not rows:
        return ["needles: none (the sequence is too short to plant a needle and its readers)"]
    lines = [f"needles: {len(rows)} planted, {info['needle_len']} tokens each; each one is read by a span of later "
             f"query rows (the readers)"]
    for r in rows:
        a0, a1 = r["readers"]
        lines.append(
            f"  needle at {r['position']:>6} (key block {r['key_block']:>4}): readers {a0}-{a1 - 1}, "
            f"dense mass on its block {r['dense_mass']:.2f}, kept in {r['cells_kept']}/{r['cells']} "
            f"(head, reader block) cells"
            + ("" if r["cells_kept"] == r["cells"] else "  <- dropped"))
    lines.append(f"  the plan keeps {rep['kept_mass']:.3f} of the readers' dense attention mass")
    if rep["ok"]:
        lines.append(f"  all {len(rows)} needles kept by every reader block" if len(rows) > 1 else
                     "  the needle is kept by every reader block")
    else:
        bad = [r for r in rows if r["cells_kept"] < r["cells"]]
        what = ", ".join(f"{r['position']} ({r['cells'] - r['cells_kept']}/{r['cells']} cells dropped)" for r in bad)
        lines.append(f"MISSED: {len(bad)} of {len(rows)} needles dropped by some reader blocks: {what}")
    return lines


def _demo(args) -> int:
    import torch
    import torch.nn.functional as F

    import stem
    from stem.api import auto_dense_reason
    from stem.bench import time_ms
    from stem.workloads import needle_report, synthetic_qkv

    t_start = time.perf_counter()
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.startswith("cuda")
    L = args.length or (8192 if cuda else 4096)
    bs = args.block_size or (64 if cuda else 32)
    reps = args.reps or (5 if cuda else 1)
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = stem.StemConfig(block_size=bs)
    n = 6
    print(f"stem demo: synthetic workload L={L} B=1 Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim} "
          f"{str(dtype).replace('torch.', '')} on {dev}, block size {bs} ({-(-L // bs)} blocks)", flush=True)

    _phase(1, n, "generating the workload (sinks, local structure, needles)")
    q, k, v, info = synthetic_qkv(L, q_heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                                  seed=args.seed, dtype=dtype, device=dev)

    _phase(2, n, "planning (stem.plan)")
    _sync(dev)
    t0 = time.perf_counter()
    plan = stem.plan(q, k, v, cfg)
    _sync(dev)
    t_plan_once = (time.perf_counter() - t0) * 1e3

    _phase(3, n, "running Stem on the plan (stem.attention)")
    t0 = time.perf_counter()
    out = stem.attention(q, k, v, plan=plan)
    _sync(dev)
    t_exec_once = (time.perf_counter() - t0) * 1e3
    executor = stem.last_dispatch()

    _phase(4, n, "running dense attention (SDPA, the exact answer)")

    def dense_fn():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    t0 = time.perf_counter()
    dense = dense_fn()
    _sync(dev)
    t_dense_once = (time.perf_counter() - t0) * 1e3
    err = float((out.double() - dense.double()).norm() / dense.double().norm())
    del dense

    _phase(5, n, "checking the needles (dense attention of their reader rows)")
    rep = needle_report(q, k, plan, info)

    if cuda or reps > 1:
        _phase(6, n, f"timing (median of {reps} runs each)")
        timed = [dense_fn, lambda: stem.plan(q, k, v, cfg), lambda: stem.attention(q, k, v, plan=plan)]
        t_dense, t_plan, t_exec = (time_ms(fn, reps=reps, warmup=int(cuda), device=dev) for fn in timed)
    else:
        _phase(6, n, "timing (CPU: the single runs above; --reps N for a median)")
        t_dense, t_plan, t_exec = t_dense_once, t_plan_once, t_exec_once
    t_stem = t_plan + t_exec

    print()
    if plan.dense:
        print(f"plan:     dense: at {plan.num_kv_blocks} blocks (< {stem.budget._DENSE_BELOW}) the budgets keep every "
              f"causal block; a longer --length or a smaller --block-size gives a sparse plan")
    else:
        print(f"plan:     density {plan.density:.3f} of the causal blocks ({plan.num_q_blocks} query blocks, "
              f"budgets + {cfg.sink_blocks} sink + {cfg.window_blocks} window blocks)")
    print(f"executor: {executor}")
    print(f"error:    {err:.2e} relative to dense attention (||stem - dense|| / ||dense||)")
    for line in _needle_lines(rep, info):
        print(line)
    print(f"time:     dense SDPA {t_dense:.1f} ms | stem {t_stem:.1f} ms (planner {t_plan:.1f} ms + executor "
          f"{t_exec:.1f} ms) | speedup {t_dense / t_stem:.2f}x")
    if not cuda and "reference" in (executor or ""):
        print("          on the CPU stem runs the unfused reference executor (an exact oracle, not a fast path); "
              "the speed claims are for CUDA: see `stem bench`")
    elif cuda:
        why = auto_dense_reason("cuda", L, L, cfg)
        if why:
            print(f"note:     stem.attention(q, k, v) with backend='auto' would run dense SDPA here ({why}); the demo "
                  f"runs the plan")
    result = {
        "device": dev, "dtype": str(dtype).replace("torch.", ""), "length": L, "heads": args.heads,
        "kv_heads": args.kv_heads, "head_dim": args.head_dim, "seed": args.seed, "config": cfg.to_dict(),
        "density": plan.density, "rel_error": err, "executor": executor,
        "dense_ms": t_dense, "stem_ms": t_stem, "planner_ms": t_plan, "executor_ms": t_exec, "reps": reps,
        "needles": rep,
    }
    if args.plot:
        try:
            print(f"plot:     {plan.plot(args.plot)} (kept / skipped / non-causal blocks of each head)")
        except ImportError as e:
            print(f"plot:     none ({e})")
    if args.json:
        result["elapsed_s"] = time.perf_counter() - t_start
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"json:     {args.json}")
    print(f"elapsed:  {time.perf_counter() - t_start:.1f} s", flush=True)
    return 0


def _bench(args) -> int:
    from stem.bench import main as bench_main

    return bench_main(args)


# ---- entry point --------------------------------------------------------------------------------
def main(argv=None) -> int:
    """Run the command line; returns the exit status (2 for bad input, 130 after Ctrl-C, 141 when the
    reader of stdout goes away)."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.cmd is None:
            parser.error("a command is required: info, demo or bench")
        if args.check is not None:
            args.check(args.parser, args)
        try:
            return args.fn(args) or 0
        except BrokenPipeError:
            raise
        except (ValueError, TypeError, RuntimeError, OSError, MemoryError) as e:
            if os.environ.get("STEM_TRACEBACK"):
                raise
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            print(f"stem: error: {msg}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        print("stem: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away, e.g. `stem info | head -1`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit-time flush must not fail
        return 141


if __name__ == "__main__":
    sys.exit(main())
