"""The public entry point: ``stem.attention``."""

from __future__ import annotations

import functools
import logging
import math

import torch

from .budget import is_dense_budget, min_density
from .config import StemConfig
from .dispatch import DispatchKey, resolve
from .plan import BlockPlan
from .planner import cached_dense_plan, dense_plan, plan_validated
from .validation import on_device, pack_result, requires_grad, validate_plan, validate_qkv, validate_scalars

__all__ = ["attention"]

log = logging.getLogger("stem")
_last: str | None = None  # the last call's executor and why (see last_dispatch)
_warned: set[str] = set()


# Budget density (stem.budget.min_density) above which backend="auto" runs dense SDPA, per sparse
# executor and (head dim, GQA ratio): the crossover of sparse end to end (plan + executor) against
# dense SDPA (cuDNN first), bf16, Hq 32, default StemConfig, written by
# `python -m benchmarks.planner.calibrate_auto --write-table` on the card it should serve. These
# rows were measured on an NVIDIA H200 (benchmarks/results/calibrate_auto_{hub,triton}_NVIDIA_H200.json):
# the midpoint between the densities of the longest length where dense won and the shortest from
# which sparse won (hub: 8K-32K tokens; Triton: 8K-64K).
_CROSSOVER = {'hub': {(64, 1, 32): 0.6371, (64, 4, 32): 0.6371, (64, 8, 32): 0.6371, (128, 1, 16): 0.6371, (128, 1, 32): 0.7432, (128, 4, 16): 0.7432, (128, 4, 32): 0.7432, (128, 8, 16): 0.6371, (128, 8, 32): 0.7432, (256, 1, 16): 0.7432, (256, 1, 32): 0.7432, (256, 4, 16): 0.7432, (256, 4, 32): 0.8087, (256, 8, 16): 0.7432, (256, 8, 32): 0.7432}, 'triton': {(64, 1, 16): 0.5106, (64, 1, 32): 0.7016, (64, 4, 16): 0.6371, (64, 4, 32): 0.7016, (64, 8, 16): 0.5106, (64, 8, 32): 0.7016, (128, 1, 32): 0.4896, (128, 4, 32): 0.7016, (128, 8, 32): 0.7016, (256, 1, 32): 0.4896, (256, 4, 32): 0.7016, (256, 8, 32): 0.7016}}  # noqa: E501


_DEFAULT_CONFIG = StemConfig()  # frozen: one instance serves every call without a config


def auto_dense_threshold(executor: str, head_dim: int, gqa: int, heads: int = 32) -> float:
    """The measured crossover density for ``executor`` (an executor without its own row uses the
    Triton executor's) at the nearest calibrated head dim, then the nearest calibrated number of
    query heads in the call (``heads``: Hq x batch entries; with few heads the planner's fixed
    cost weighs more), then the nearest GQA ratio (all by ratio)."""
    table = _CROSSOVER.get(executor) or _CROSSOVER["triton"]
    lg = math.log2

    def near(x, options):
        return min(options, key=lambda o: (abs(lg(max(x, 1)) - lg(o)), o))

    d = near(head_dim, sorted({k[0] for k in table}))
    h = near(heads, sorted({k[2] for k in table if k[0] == d}))
    g = near(gqa, sorted({k[1] for k in table if k[0] == d and k[2] == h}))
    return table[(d, g, h)]


def sparse_executor(device, dtype, head_dim: int, config: StemConfig, need_lse: bool) -> str:
    """Name of the executor ``backend="auto"`` runs a sparse plan with ("triton" when none can:
    the sparse path then raises its own error)."""
    try:
        return resolve("auto", DispatchKey(device, dtype, int(head_dim), config.block_size, False, need_lse))[0].name
    except RuntimeError:
        return "triton"


def auto_dense_reason(
    device_type: str, Lq: int, Lk: int, config: StemConfig, q_offset: int | None = None, *,
    head_dim: int = 128, gqa: int = 4, executor: str = "triton", heads: int = 32,
) -> str | None:
    """Why ``backend="auto"`` runs dense attention without planning, or None (host arithmetic only,
    from shapes and the config): on CUDA, when the budgets alone keep at least
    ``config.auto_dense_above`` of the causal blocks, or by default the crossover measured for the
    sparse ``executor`` that auto would run, ``head_dim``, ``gqa`` (Hq / Hkv) and ``heads`` (Hq x
    batch entries)."""
    if device_type != "cuda" or config.dense:
        return None
    return _auto_dense_reason(Lq, Lk, config, q_offset, head_dim, gqa, executor, heads, id(_CROSSOVER))


@functools.lru_cache(maxsize=256)
def _auto_dense_reason(Lq: int, Lk: int, config: StemConfig, q_offset: int | None, head_dim: int, gqa: int,
                       executor: str, heads: int, table_id: int) -> str | None:
    # cached: a model calls this once per layer with the same shapes (about 13 us of host
    # arithmetic each time); table_id keys it on the crossover table in use
    bs = config.block_size
    n = -(-Lk // bs)
    if is_dense_budget(n, config.k_rate, config.k_bias):
        return None  # the planner returns a dense plan by itself
    off = Lk - Lq if q_offset is None else q_offset
    d = min_density(n, config.alpha, config.k_rate, config.k_bias, off // bs, (off + Lq - 1) // bs + 1)
    if config.auto_dense_above is not None:
        limit, what = config.auto_dense_above, f"StemConfig.auto_dense_above={config.auto_dense_above}"
    else:
        limit = auto_dense_threshold(executor, head_dim, gqa, heads)
        what = f"{limit:.3f}, the crossover measured for {executor} at head dim {head_dim}, GQA {gqa}, {heads} heads"
    if d < limit:
        return None
    return f"budgets keep >= {d:.2f} of the causal blocks at {n} blocks (>= {what}): dense attention is faster here"


def last_dispatch() -> str | None:
    """One line saying which executor the last ``stem.attention`` call used, and why."""
    return _last


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    config: StemConfig | None = None,
    plan: BlockPlan | None = None,
    backend: str = "auto",
    scale: float | None = None,
    return_plan: bool = False,
    return_lse: bool = False,
    q_offset: int | None = None,
    precision: str = "native",
):
    """Stem sparse causal attention.

    Args:
        q: (B, Hq, Lq, D) queries; the last Lq of the Lk positions (Lq == Lk: prefill;
            Lq < Lk: chunked prefill). float16, bfloat16, float32 (float64 on CPU).
        k, v: (B, Hkv, Lk, D), same dtype and device; Hq % Hkv == 0 (GQA, K/V never repeated).
        config: StemConfig (default: the paper's). With ``plan`` it must equal the plan's own
            config (a plan runs as it was made); leave it out then.
        plan: a BlockPlan to execute instead of planning (e.g. from :func:`stem.plan`); its
            geometry must match the call (lengths, heads, device and ``q_offset``), else
            ValueError naming both values.
        backend: "auto" (dense plans -> "sdpa"; CPU -> "cpu_gather"; CUDA -> the fastest usable
            executor), or an executor name ("reference", "triton", "hub", ...; see ``stem info``).
        scale: softmax scale, a finite number > 0; default 1/sqrt(D).
        return_plan: also return the BlockPlan.
        return_lse: also return the float32 log-sum-exp (B, Hq, Lq) of each row (natural log).
        q_offset: absolute position of query 0 (default Lk - Lq). Context parallelism uses it to
            run a chunk of queries against the whole (gathered) K/V.
        precision: "native" (the matrix products in the input dtype) or "fp8": float16/bfloat16
            q/k/v are quantised on the GPU to float8 e4m3 with per-block scales and both matrix
            products run on FP8 tensor cores (fp32 accumulation, output in q's dtype). "fp8"
            runs on CUDA GPUs of compute capability 8.9+ only, on the Hub kernel (``backend``
            "auto" or "hub"; compute capability 9.0, head dim 128, plan blocks of 128 or 256)
            or the Triton executor ("auto" elsewhere, or "triton"; head dim >= 32, plan blocks
            >= 64); any plan, dense ones included. It raises ValueError elsewhere.
            "fp8_pv": only P V on FP8 tensor cores (V quantised per channel, P as e4m3), Q K^T
            in the input dtype: less error than "fp8" (only V and P are rounded), on the Hub
            kernel only (compute capability 9.0, head dim 128, plan blocks of 128 or 256).

    Returns:
        out (B, Hq, Lq, D) in q's dtype; ``(out, plan)``, ``(out, lse)`` or ``(out, lse, plan)``
        as requested. Empty inputs (B, Hq or Lq = 0) give empty outputs, as SDPA does.

    Forward only: the sparse executors have no backward, so inputs that require grad (with grad
    mode on) raise unless the plan is dense (dense SDPA, differentiable). For training, use
    ``torch.nn.functional.scaled_dot_product_attention`` or FlexAttention with
    ``plan.to_flex_block_mask()``.
    """
    validate_qkv(q, k, v, config=config, q_offset=q_offset, allow_empty=True)
    scale = validate_scalars(scale, return_lse, return_plan, backend)
    if plan is not None:
        if not isinstance(plan, BlockPlan):
            raise TypeError(f"plan must be a stem.BlockPlan, got {type(plan).__name__}")
        if config is not None and config != plan.config:
            raise ValueError(f"config= and plan= disagree: the plan was made with {plan.config}, config= is {config}; "
                             "a plan runs as it was made, so pass only plan=")
    if precision != "native":
        _check_fp8(q, k, v, backend, precision, (plan if plan is not None else config or StemConfig()).block_size)
        if torch.compiler.is_compiling():
            raise compile_unsupported(f"precision={precision!r}")
    if q.shape[0] * q.shape[1] * q.shape[2] == 0:
        return _empty(q, return_lse, return_plan)
    if torch.compiler.is_compiling():
        return _attention_traced(q, k, v, config, plan, backend, scale, return_plan, return_lse, q_offset)
    with on_device(q):
        return _attention(q, k, v, config, plan, backend, scale, return_plan, return_lse, q_offset, precision)


PRECISIONS = ("native", "fp8", "fp8_pv")


def _check_fp8(q, k, v, backend, precision, block_size) -> None:
    """ValueError unless ``precision`` is "fp8" / "fp8_pv" and its path can run these inputs."""
    if precision not in PRECISIONS[1:]:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp8_pv" and backend not in ("auto", "hub"):
        raise ValueError(f"precision='fp8_pv' runs on the 'hub' executor only, not backend={backend!r}: pass "
                         "backend='auto' or 'hub', or precision='fp8' / 'native'")
    if backend not in ("auto", "triton", "hub"):
        raise ValueError(f"precision='fp8' runs on the 'hub' and 'triton' executors, not backend={backend!r}: pass "
                         "backend='auto', 'hub' or 'triton', or precision='native'")
    if q.device.type != "cuda":
        raise ValueError(f"precision={precision!r} runs on CUDA GPUs (compute capability 8.9+) only, not on "
                         f"{q.device.type}: use precision='native'")
    if requires_grad(q, k, v):
        raise ValueError(f"precision={precision!r} is forward-only (no backward): run it under torch.no_grad() or "
                         "torch.inference_mode(), or use precision='native' with dense attention to train")
    from .dispatch import first_party

    first_party()
    from stem_backends.triton.executor import fp8_unsupported_reason

    why = fp8_unsupported_reason(q, k, v, block_size)
    if why is not None:
        raise ValueError(why)
    if precision == "fp8_pv":
        why = _fp8_hub_reason(q, block_size)
        if why is not None:
            raise ValueError(f"precision='fp8_pv' runs on the Hub kernel only, which cannot run this call: {why}; "
                             "use precision='fp8' or 'native'")
    elif backend == "hub":
        why = _fp8_hub_reason(q, block_size)
        if why is not None:
            raise ValueError(f"precision='fp8' with backend='hub': {why}; pass backend='triton' (or 'auto')")


def _fp8_hub_reason(q, block_size) -> str | None:
    """None when the Hub kernel's FP8 path runs q's shape with plan blocks of ``block_size``."""
    from .dispatch import executors

    hub = executors().get("hub")
    if hub is None:
        return "no 'hub' executor is registered"
    reason = getattr(hub, "fp8_unsupported_reason", None)
    return "the 'hub' executor has no FP8 path" if reason is None else reason(q, block_size)


def compile_unsupported(what: str) -> ValueError:
    return ValueError(f"{what} is not supported inside torch.compile: a plan object is checked and built on the "
                      f"host. Plan inside the compiled function (pass config=), or make and run plans eagerly")


def _attention_traced(q, k, v, config, plan, backend, scale, return_plan, return_lse, q_offset):
    """The path torch.compile traces: host decisions made once at trace time, then two custom ops
    (stem.ops): no graph break, no data-dependent guard."""
    from .ops import config_fields, config_json, decide

    if plan is not None or return_plan:
        raise compile_unsupported("plan= / return_plan=True")
    config = _DEFAULT_CONFIG if config is None else config
    Lq, D, Lk = q.shape[2], q.shape[3], k.shape[2]
    off = Lk - Lq if q_offset is None else q_offset
    fields = config_fields(config)
    name, dense, differentiable, _ = decide(backend, q.device, q.dtype, D, Lq, Lk, q_offset, fields, return_lse,
                                            q.shape[1] // k.shape[1], q.shape[0] * q.shape[1])
    if requires_grad(q, k, v):
        raise RuntimeError("stem.attention is forward-only inside torch.compile (its ops have no backward): run the "
                           "compiled prefill under torch.no_grad() or torch.inference_mode()")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    cfg = config_json(fields)
    if dense:
        counts = indices = torch.empty(0, dtype=torch.int32, device=q.device)
    else:
        counts, indices = torch.ops.stem.plan(q, k, v, cfg, off, "auto")
    out, lse = torch.ops.stem.execute(q, k, v, counts, indices, config.block_size, off, dense, name, scale, return_lse)
    return (out, lse) if return_lse else out


def _empty(q, return_lse, return_plan):
    if return_plan:
        raise ValueError(f"empty input (q shape {tuple(q.shape)}): there is no plan to return; call without "
                         "return_plan=True")
    out = q.new_empty(q.shape)
    if not return_lse:
        return out
    return out, torch.empty(q.shape[:3], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                            device=q.device)


def _attention(q, k, v, config, plan, backend, scale, return_plan, return_lse, q_offset, precision="native"):
    global _last
    dense_why = None
    config = _DEFAULT_CONFIG if config is None else config
    fp8 = precision != "native"
    if plan is None and backend == "auto" and not fp8:
        dense_why = auto_dense_reason(q.device.type, q.shape[2], k.shape[2], config, q_offset, head_dim=q.shape[-1],
                                      gqa=q.shape[1] // k.shape[1], heads=q.shape[0] * q.shape[1],
                                      executor=sparse_executor(q.device, q.dtype, q.shape[-1], config, return_lse)
                                      if q.is_cuda else "triton")
        if dense_why is not None:
            # the plan only tells the dense executor "every causal block": a cached one costs no launch
            make = dense_plan if return_plan else cached_dense_plan
            plan = make(q.shape[0], q.shape[1], q.shape[2], k.shape[2], config.block_size, q.device, config,
                        q_offset)
    if plan is None:
        plan = plan_validated(q, k, v, config, q_offset=q_offset)
    else:
        validate_plan(plan, q, k, q_offset)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if fp8:  # the Hub kernel's FP8 path where it runs these inputs, else Triton's; sparse and dense plans alike
        name, why = backend, f"{backend}, precision={precision!r}"
        if precision == "fp8_pv":  # checked: the Hub kernel runs it
            name, why = "hub", f"hub, precision='fp8_pv' (backend={backend!r})"
        elif backend == "auto":
            hub_why = _fp8_hub_reason(q, plan.block_size)
            name = "hub" if hub_why is None else "triton"
            why = ("hub, precision='fp8' (backend='auto')" if hub_why is None
                   else f"triton, precision='fp8' (backend='auto'; not the hub: {hub_why})")
        ex, _ = resolve(name, DispatchKey.of(q, plan, return_lse))
        if _last != why:
            log.info("%s", why)
        _last = why
        out, lse = ex.forward(q, k, v, plan, scale, return_lse, precision=precision)
        return pack_result(out, lse, plan, return_lse, return_plan)
    ex, why = resolve(backend, DispatchKey.of(q, plan, return_lse))
    if not ex.differentiable and requires_grad(q, k, v):
        raise RuntimeError(
            f"stem.attention is forward-only (inference prefill): the {ex.name!r} executor has no backward and "
            "q/k/v require grad. Run it under torch.no_grad() or torch.inference_mode(); to train, use dense "
            "torch.nn.functional.scaled_dot_product_attention or FlexAttention with plan.to_flex_block_mask()"
        )
    if dense_why is not None:
        why = f"{why}: {dense_why}"
        if why not in _warned:
            # never switch to dense silently: a quality measurement must know it measured dense
            _warned.add(why)
            log.warning("%s; pass backend='triton' (or StemConfig(auto_dense_above=2)) to run the "
                        "Stem plan instead", why)
    elif _last != why:
        log.info("%s", why)
    _last = why
    out, lse = ex.forward(q, k, v, plan, scale, return_lse)
    return pack_result(out, lse, plan, return_lse, return_plan)
