"""``stem bench``: planner, executors and end-to-end Stem against dense SDPA and FlexAttention.

Everything for one length runs in one process on one card: dense SDPA (cuDNN and flash backends,
causal), FlexAttention executing the *identical* plan (:meth:`stem.BlockPlan.to_flex_block_mask`,
compiled: diagonal blocks partial, the rest full), the stem planner alone, each usable stem
executor alone, and stem end-to-end (``backend="auto"``). Times are medians of CUDA-event timings
after warm-up. Writes ``bench_attention_<card>.json`` and ``.png`` into ``--out`` (default
``./stem_bench``).

The two helpers every benchmark of this project uses live here too:

* :func:`time_ms`: the median of CUDA-event timings of a callable (perf_counter on the CPU);
* :func:`random_qkv`: seeded random q, k, v of a (batch, heads, kv heads, length, head dim) shape.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time

from .config import StemConfig

__all__ = ["add_arguments", "main", "parse_shape", "random_qkv", "run_bench", "time_ms"]


def add_arguments(p) -> None:
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072],
                   help="sequence lengths (tokens), one row each")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32, help="query heads")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads (GQA)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--alpha", type=float, default=0.7, help="Stem Token Position-Decay alpha")
    p.add_argument("--block-size", type=int, default=128, help="Stem block size")
    p.add_argument("--ranking", default="stem", choices=["stem", "sampled_mass", "qmean_lse"],
                   help="StemConfig.ranking: the paper's metric, or an opt-in ranking")
    p.add_argument("--sampled-rows", type=int, default=None,
                   help="StemConfig.sampled_rows, with --ranking sampled_mass (default 4)")
    p.add_argument("--reps", type=int, default=10,
                   help="timed repetitions per measurement (median; half of them above 64K tokens, at least 3)")
    p.add_argument("--skip", nargs="*", default=[], help="methods to skip: flash cudnn flex torch_planner")
    p.add_argument("--out", default="stem_bench",
                   help="folder for bench_attention_<tag>.json and .png (default: ./stem_bench)")
    p.add_argument("--tag", default=None, help="file name tag (default: the card's name)")
    p.add_argument("--shapes", nargs="+", default=None, metavar="HQ:HKV:D[:B]",
                   help="a matrix: one run per shape (query heads, kv heads, head dim, batch) over --lengths, "
                        "in one JSON and one PNG; overrides --heads/--kv-heads/--head-dim/--batch (default: one "
                        "shape from those options)")


def bench_config(args) -> StemConfig:
    """The StemConfig of ``stem bench``'s options; ValueError (naming the option) if they disagree."""
    extra = {} if args.sampled_rows is None else {"sampled_rows": args.sampled_rows}
    return StemConfig(block_size=args.block_size, alpha=args.alpha, ranking=args.ranking, **extra)


def _config_label(config: dict) -> str:
    """"default config", or the fields that differ from it (for plot titles)."""
    default = StemConfig().to_dict()
    changed = [f"{k}={v}" for k, v in config.items() if default.get(k) != v]
    return "config " + ", ".join(changed) if changed else "default config"


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """``"HQ:HKV:D[:B]"`` -> (B, Hq, Hkv, D); ValueError naming the problem otherwise."""
    parts = text.split(":")
    try:
        vals = [int(x) for x in parts]
    except ValueError:
        vals = []
    if len(vals) not in (3, 4) or min(vals) < 1:
        raise ValueError(f"shape {text!r}: expected HQ:HKV:D or HQ:HKV:D:B with integers >= 1, e.g. 32:8:128")
    hq, hkv, d = vals[:3]
    b = vals[3] if len(vals) == 4 else 1
    if hq % hkv:
        raise ValueError(f"shape {text!r}: query heads ({hq}) must be a multiple of kv heads ({hkv})")
    return b, hq, hkv, d


def time_ms(fn, reps: int = 7, warmup: int = 2, *, device=None, before=None, samples=None) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` timed runs after ``warmup`` untimed runs.

    On CUDA each run starts on an idle device (a sync before it) and is timed with a pair of CUDA
    events on the current stream, read after the run (no host sync inside the timed region); on
    the CPU with ``time.perf_counter``.

    Args:
        fn: the work to time; its result is discarded.
        reps, warmup: timed and untimed runs.
        device: where ``fn`` runs (``"cuda"``, ``"cuda:1"``, ``"cpu"``, a torch.device); default
            CUDA when available, else the CPU.
        before: called before every run (warm-up and timed), outside the timed region, e.g. a
            barrier across ranks.
        samples: a list; when given, every timed run's milliseconds are appended to it.
    """
    import torch

    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError(f"time_ms: device {dev} requested but torch.cuda.is_available() is False")
    if reps < 1 or warmup < 0:
        raise ValueError(f"time_ms needs reps >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    times = []
    with torch.cuda.device(dev) if cuda else contextlib.nullcontext():
        for i in range(warmup + reps):
            if before is not None:
                before()
            if cuda:
                torch.cuda.synchronize()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                ms = a.elapsed_time(b)
            else:
                t0 = time.perf_counter()
                fn()
                ms = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                times.append(ms)
    if samples is not None:
        samples.extend(times)
    return statistics.median(times)


def random_qkv(batch: int, heads: int, kv_heads: int, length: int, head_dim: int, *, dtype=None, device=None,
               seed: int = 0, v_scale: tuple[float, float] | None = None):
    """Random q (batch, heads, length, head_dim) and k, v (batch, kv_heads, length, head_dim).

    Standard normal entries of ``dtype`` (default bfloat16) drawn on ``device`` (default CUDA when
    available, else the CPU) from one ``torch.Generator`` seeded with ``seed``, in the order q, k, v.
    The same seed on the same kind of device gives the same tensors; draw on
    ``device="cpu"`` and move them where every rank or card must see identical inputs.
    ``v_scale=(lo, hi)`` multiplies each value vector by a factor uniform in [lo, hi), so value
    norms vary as in real models (Stem's value bonus reads them).
    """
    import torch

    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dtype is None else dtype
    g = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randn(batch, heads, length, head_dim, device=dev, dtype=dtype, generator=g)
    k = torch.randn(batch, kv_heads, length, head_dim, device=dev, dtype=dtype, generator=g)
    v = torch.randn(batch, kv_heads, length, head_dim, device=dev, dtype=dtype, generator=g)
    if v_scale is not None:
        lo, hi = v_scale
        scale = lo + (hi - lo) * torch.rand(batch, kv_heads, length, 1, device=dev, generator=g)
        v = (v.float() * scale).to(dtype)
    return q, k, v


def _pair_count(plan) -> float:
    """(query, key) pairs the plan computes (diagonal blocks counted causally), summed over b, h."""
    bs = plan.block_size
    diag = plan.batch_size * plan.num_heads * plan.num_q_blocks
    full = float(plan.kv_counts.sum()) - diag
    return full * bs * bs + diag * bs * (bs + 1) / 2


def _bench_one(L, args, cfg, flex, sparse_execs) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import stem

    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    B, Hq, Hkv, D = args.batch, args.heads, args.kv_heads, args.head_dim
    q, k, v = random_qkv(B, Hq, Hkv, L, D, dtype=dtype, device=dev, seed=L)
    row = {"L": L}
    dense_pairs = B * Hq * L * (L + 1) / 2
    reps = max(3, args.reps if L <= 65536 else args.reps // 2)

    def dense(backend):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    ref_dense = None
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        if name in args.skip:
            continue
        try:
            row[f"dense_{name}_ms"] = time_ms(lambda b=backend: dense(b), reps)
            row[f"dense_{name}_tflops"] = 4 * D * dense_pairs / row[f"dense_{name}_ms"] / 1e9
            if ref_dense is None:
                ref_dense = dense(backend)
        except RuntimeError as e:
            row[f"dense_{name}_error"] = str(e).splitlines()[0]

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    plan = stem.plan(q, k, v, cfg)
    torch.cuda.synchronize()
    row["planner_peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    row["planner_ms"] = time_ms(lambda: stem.plan(q, k, v, cfg), reps)
    if "torch_planner" not in args.skip:
        row["planner_torch_ms"] = time_ms(lambda: stem.plan(q, k, v, cfg, pooling="torch"), reps)
    row["density"] = plan.density
    row["plan_dense"] = plan.dense
    pairs = _pair_count(plan)
    row["sparse_pairs_fraction"] = pairs / dense_pairs
    for name in sparse_execs:
        try:
            out = stem.attention(q, k, v, plan=plan, backend=name)
            row[f"exec_{name}_ms"] = time_ms(lambda n=name: stem.attention(q, k, v, plan=plan, backend=n), reps)
            row[f"exec_{name}_tflops"] = 4 * D * pairs / row[f"exec_{name}_ms"] / 1e9
            if ref_dense is not None:  # how far the sparse result is from dense attention (information)
                row[f"exec_{name}_rel_err_vs_dense"] = float(
                    (out.float() - ref_dense.float()).norm() / ref_dense.float().norm())
        except Exception as e:  # report, keep benchmarking the rest
            row[f"exec_{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if flex is not None and not plan.dense:
        try:
            bm = plan.to_flex_block_mask()
            row["flex_ms"] = time_ms(lambda: flex(q, k, v, block_mask=bm, enable_gqa=True), reps)
            row["flex_tflops"] = 4 * D * pairs / row["flex_ms"] / 1e9
            # the flex mask must be the same plan: compare with the reference executor's output
            ref = stem.attention(q, k, v, plan=plan, backend="reference")
            fo = flex(q, k, v, block_mask=bm, enable_gqa=True)
            row["flex_rel_diff_vs_reference"] = float((fo.float() - ref.float()).norm() / ref.float().norm())
            del ref, fo
        except Exception as e:
            row["flex_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    row["e2e_ms"] = time_ms(lambda: stem.attention(q, k, v, config=cfg), reps)
    row["e2e_executor"] = stem.last_dispatch()
    if "dense_cudnn_ms" in row:
        row["e2e_speedup_vs_cudnn"] = row["dense_cudnn_ms"] / row["e2e_ms"]
    return row


def run_bench(args, progress=True) -> dict:
    import torch

    from stem.dispatch import executor_status

    if not torch.cuda.is_available():
        raise RuntimeError("stem bench needs a CUDA GPU (torch.cuda.is_available() is False)")
    dev = torch.device("cuda")
    card = torch.cuda.get_device_name(0)
    cfg = bench_config(args)
    B, Hq, Hkv, D = args.batch, args.heads, args.kv_heads, args.head_dim
    sparse_execs = [
        r.name for r in executor_status(dev) if r.usable and r.name not in ("sdpa", "reference")
    ]
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **kw):
            return x

    flex = None
    if "flex" not in args.skip:
        from torch.nn.attention.flex_attention import flex_attention

        # one compile per length; a fresh cache per shape keeps a --shapes matrix under dynamo's
        # recompile limit (past it flex_attention runs unfused and materialises the L x L scores)
        torch._dynamo.reset()
        flex = torch.compile(flex_attention, dynamic=False)

    rows = []
    for L in tqdm(args.lengths, desc="stem bench", disable=not progress):
        rows.append(_bench_one(L, args, cfg, flex, sparse_execs))
        torch.cuda.empty_cache()
    return {
        "card": card,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "versions": _versions(),
        "shape": {"B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "dtype": args.dtype},
        "config": cfg.to_dict(),
        "command": " ".join(["stem", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else " ".join(sys.argv),
        "rows": rows,
    }


def _versions() -> dict:
    import platform

    import torch

    import stem

    out = {"stem": stem.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def _plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    keys = list(dict.fromkeys(k for r in rows for k in r if k.endswith("_ms") and k != "planner_torch_ms"))
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for key in keys:
        xs = [r["L"] for r in rows if key in r]
        ax[0].plot(xs, [r[key] for r in rows if key in r], marker="o", label=key[:-3])
    ax[0].set_xscale("log", base=2)
    ax[0].set_yscale("log")
    ax[0].set_xlabel("sequence length")
    ax[0].set_ylabel("ms (median)")
    ax[0].legend(fontsize=8)
    sh = res["shape"]
    fig.suptitle(f"{res['card']}: B={sh['B']} Hq={sh['Hq']} Hkv={sh['Hkv']} D={sh['D']} {sh['dtype']}; "
                 f"{_config_label(res['config'])}", fontsize=10)
    for key in [k for k in keys if k.startswith(("exec_", "flex", "e2e"))]:
        xs = [r["L"] for r in rows if key in r and "dense_cudnn_ms" in r]
        ax[1].plot(xs, [r["dense_cudnn_ms"] / r[key] for r in rows if key in r and "dense_cudnn_ms" in r],
                   marker="o", label=key[:-3])
    ax[1].axhline(1.0, color="grey", lw=0.8)
    ax[1].set_xscale("log", base=2)
    ax[1].set_xlabel("sequence length")
    ax[1].set_ylabel("speedup vs cuDNN dense causal")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(res: dict) -> str:
    cols = ["L", "density", "dense_cudnn_ms", "dense_flash_ms", "flex_ms", "planner_ms", "planner_torch_ms",
            "exec_triton_ms", "exec_hub_ms", "e2e_ms", "e2e_speedup_vs_cudnn", "planner_peak_extra_mb"]
    cols = [c for c in cols if any(c in r for r in res["rows"])]
    lines = [" | ".join(f"{c.replace('_ms', ''):>12}" for c in cols)]
    for r in res["rows"]:
        cells = []
        for c in cols:
            x = r.get(c, float("nan"))
            cells.append(f"{x:>12.3f}" if isinstance(x, float) else f"{x!s:>12}")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def _plot_matrix(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in res["runs"]:
        sh = run["shape"]
        label = f"B{sh['B']} Hq{sh['Hq']} Hkv{sh['Hkv']} D{sh['D']}"
        rows = [r for r in run["rows"] if "dense_cudnn_ms" in r]
        line = ax[0].plot([r["L"] for r in rows], [r["dense_cudnn_ms"] / r["e2e_ms"] for r in rows], marker="o",
                          label=label)[0]
        ex = [r for r in rows if "exec_hub_tflops" in r or "exec_triton_tflops" in r]
        ax[1].plot([r["L"] for r in ex], [r.get("exec_hub_tflops", r.get("exec_triton_tflops")) for r in ex],
                   marker="o", color=line.get_color(), label=label)
        ax[1].plot([r["L"] for r in rows], [r["dense_cudnn_tflops"] for r in rows], ls=":", color=line.get_color())
    ax[0].axhline(1.0, color="grey", lw=0.8)
    ax[0].set_ylabel("stem.attention (plan + execute) speed-up vs cuDNN dense")
    ax[1].set_ylabel("TFLOP/s: sparse executor on its blocks (solid), cuDNN dense (dotted)")
    for a in ax:
        a.set_xscale("log", base=2)
        a.set_xlabel("sequence length")
        a.legend(fontsize=7)
    fig.suptitle(f"{res['card']}, {res['dtype']}, {_config_label(res['config'])}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args) -> int:
    import copy

    import torch

    if not torch.cuda.is_available():
        print("stem bench: needs a CUDA GPU (torch.cuda.is_available() is False); `stem info` says what this "
              "machine has", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    card_tag = torch.cuda.get_device_name(0).replace(" ", "_").replace("/", "_")
    if args.shapes:
        runs = []
        for text in args.shapes:
            one = copy.copy(args)
            one.batch, one.heads, one.kv_heads, one.head_dim = parse_shape(text)
            runs.append(run_bench(one))
            print(f"B {one.batch} Hq {one.heads} Hkv {one.kv_heads} D {one.head_dim}")
            print(_table(runs[-1]), flush=True)
        res = {k: runs[0][k] for k in ("card", "torch", "cuda", "versions", "config", "command")}
        res["dtype"] = args.dtype
        res["runs"] = [{"shape": r["shape"], "rows": r["rows"]} for r in runs]
        tag, plot = args.tag or "matrix_" + card_tag, _plot_matrix
    else:
        res = run_bench(args)
        tag, plot = args.tag or card_tag, _plot
    jpath = os.path.join(args.out, f"bench_attention_{tag}.json")
    with open(jpath, "w") as f:
        json.dump(res, f, indent=1)
    try:
        plot(res, jpath[:-5] + ".png")
    except ImportError:
        print("(matplotlib missing: no plot)")
    print(f"card: {res['card']}  torch {res['torch']}  -> {jpath}")
    if not args.shapes:
        print(_table(res))
    return 0
