"""The public entry point: ``stem.attention``."""

from __future__ import annotations

import logging
import math
import os

import torch

from .budget import is_dense_budget, min_density
from .config import StemConfig
from .dispatch import choose_executor, get_executor
from .plan import BlockPlan
from .planner import dense_plan, plan_validated
from .validation import on_device, validate_plan, validate_qkv

__all__ = ["attention"]

log = logging.getLogger("stem")
_last_choice: str | None = None  # the last backend="auto" decision (see last_dispatch)
_warned: set[str] = set()

# backend="auto" on CUDA runs dense attention (exact, a superset of any plan) instead of planning when
# the budgets alone keep at least this fraction of the causal blocks: there the sparse path cannot
# beat a dense kernel (H200, default config, 16K tokens: budget density 0.60, Triton executor +
# planner 4.2 ms vs cuDNN 3.85 ms; 32K: 0.36, 8.5 ms vs 14.8 ms). STEM_AUTO_DENSE_DENSITY=1.01
# turns this off (auto then always runs the Stem plan).
AUTO_DENSE_DENSITY = 0.55


def auto_dense_reason(
    device_type: str, Lq: int, Lk: int, config: StemConfig, q_offset: int | None = None
) -> str | None:
    """Why ``backend="auto"`` runs dense attention without planning, or None (host arithmetic only)."""
    if device_type != "cuda" or config.dense:
        return None
    threshold = float(os.environ.get("STEM_AUTO_DENSE_DENSITY", AUTO_DENSE_DENSITY))
    bs = config.block_size
    n = -(-Lk // bs)
    if is_dense_budget(n, config.k_rate, config.k_bias):
        return None  # the planner returns a dense plan by itself
    off = Lk - Lq if q_offset is None else q_offset
    d = min_density(n, config.alpha, config.k_rate, config.k_bias, off // bs, (off + Lq - 1) // bs + 1)
    if d < threshold:
        return None
    return (f"budgets keep >= {d:.2f} of the causal blocks at {n} blocks (>= STEM_AUTO_DENSE_DENSITY="
            f"{threshold}): dense attention is faster here and exact")


def last_dispatch() -> str | None:
    """One line saying which executor the last ``backend="auto"`` call used, and why."""
    return _last_choice


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
):
    """Stem sparse causal attention.

    Args:
        q: (B, Hq, Lq, D) queries; the last Lq of the Lk positions (Lq == Lk: prefill;
            Lq < Lk: chunked prefill). float16, bfloat16, float32 (float64 on CPU).
        k, v: (B, Hkv, Lk, D), same dtype and device; Hq % Hkv == 0 (GQA, K/V never repeated).
        config: StemConfig (default: the paper's). Ignored when ``plan`` is given.
        plan: a BlockPlan to execute instead of planning (e.g. from :func:`stem.plan`).
        backend: "auto" (dense plans -> "sdpa"; CPU -> "reference"; CUDA -> the fastest usable
            executor), or an executor name ("reference", "triton", "hub", ...; see ``stem info``).
        scale: softmax scale, default 1/sqrt(D).
        return_plan: also return the BlockPlan.
        return_lse: also return the float32 log-sum-exp (B, Hq, Lq) of each row (natural log).
        q_offset: absolute position of query 0 (default Lk - Lq). Context parallelism uses it to
            run a chunk of queries against the whole (gathered) K/V.

    Returns:
        out (B, Hq, Lq, D) in q's dtype; ``(out, plan)``, ``(out, lse)`` or ``(out, lse, plan)``
        as requested.
    """
    validate_qkv(q, k, v, config=config, q_offset=q_offset)
    with on_device(q):
        return _attention(q, k, v, config, plan, backend, scale, return_plan, return_lse, q_offset)


def _attention(q, k, v, config, plan, backend, scale, return_plan, return_lse, q_offset):
    global _last_choice
    dense_why = None
    config = StemConfig() if config is None else config
    if plan is None and backend == "auto":
        dense_why = auto_dense_reason(q.device.type, q.shape[2], k.shape[2], config, q_offset)
        if dense_why is not None:
            plan = dense_plan(q.shape[0], q.shape[1], q.shape[2], k.shape[2], config.block_size, q.device, config,
                              q_offset)
    if plan is None:
        plan = plan_validated(q, k, v, config, q_offset=q_offset)
    else:
        if not isinstance(plan, BlockPlan):
            raise TypeError(f"plan must be a stem.BlockPlan, got {type(plan).__name__}")
        validate_plan(plan, q, k, q_offset)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "auto":
        ex, why = choose_executor(q, k, v, plan, need_lse=return_lse)
        if dense_why is not None:
            why = f"{why}: {dense_why}"
        if _last_choice != why:
            if dense_why is not None and why not in _warned:
                # never switch to dense silently: a quality measurement must know it measured dense
                _warned.add(why)
                log.warning("stem: %s; pass backend='triton' (or set STEM_AUTO_DENSE_DENSITY=1.01) to run the "
                            "Stem plan instead", why)
            else:
                log.info("stem: %s", why)
        _last_choice = why
    else:
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__}")
        ex = get_executor(backend, q.device)
        why = ex.unsupported_reason(q, k, v, plan)
        if why is None and return_lse and not ex.returns_lse:
            why = "it does not return the log-sum-exp (return_lse=True)"
        if why is not None:
            raise ValueError(f"stem backend {backend!r} cannot run these inputs: {why}")
    out, lse = ex.forward(q, k, v, plan, scale, return_lse)
    result = (out,)
    if return_lse:
        result += (lse,)
    if return_plan:
        result += (plan,)
    return result[0] if len(result) == 1 else result
