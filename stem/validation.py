"""Input checks shared by the planner, the executors and the public API."""

from __future__ import annotations

import contextlib
import math
import numbers

import torch

from .config import StemConfig

__all__ = ["validate_qkv", "validate_plan", "validate_scalars", "on_device", "check_tensors", "requires_grad",
           "pack_result"]


def on_device(t: torch.Tensor):
    """Make ``t``'s CUDA device current for the block (kernels launch on the current device, so a
    layer placed on cuda:1 by device_map must not launch on cuda:0); a no-op elsewhere."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensors(q, k, v, dims: int, layout: str, hint: str) -> None:
    """q, k, v are ``dims``-d tensors of one supported dtype on one device; errors name the
    ``layout`` and the ``hint`` (formatted with the tensor's name)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dims:
            raise ValueError(f"{name} must have {dims} dims {layout}, got shape {tuple(t.shape)}; "
                             + hint.format(name=name))
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; stem supports float16, bfloat16, float32 (float64 on CPU)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them with .to()")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def requires_grad(q, k, v) -> bool:
    """Whether autograd would track a computation on q, k, v (grad mode on and one requires grad)."""
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def pack_result(out, lse, plan, return_lse: bool, return_plan: bool):
    """``out``, ``(out, lse)``, ``(out, plan)`` or ``(out, lse, plan)`` as asked for."""
    result = (out,) + ((lse,) if return_lse else ()) + ((plan,) if return_plan else ())
    return result[0] if len(result) == 1 else result


def validate_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: StemConfig | None = None, q_offset: int | None = None,
    allow_empty: bool = False,
) -> None:
    """Raise a ValueError/TypeError naming the problem and the fix for malformed q, k, v.

    With ``allow_empty``, inputs with no batch, no query heads or no queries pass (the caller
    returns empty outputs, as SDPA does); otherwise they raise."""
    check_tensors(q, k, v, 4, "in SDPA layout (B, H, L, D)", "for (B, L, H, D) tensors pass {name}.transpose(1, 2)")
    B, Hq, Lq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (B, Hkv, Lk, D), got {tuple(k.shape)} and {tuple(v.shape)}")
    Bk, Hkv, Lk, Dk = k.shape
    if Bk != B:
        raise ValueError(f"batch size mismatch: q has B={B}, k/v have B={Bk}")
    if Dk != D:
        raise ValueError(f"head dim mismatch: q has D={D}, k/v have D={Dk}")
    if D == 0:
        raise ValueError(f"head dim is 0: q has shape {tuple(q.shape)}")
    if Hkv == 0:
        raise ValueError(f"k and v have no heads (Hkv=0, shape {tuple(k.shape)}); they need at least one")
    if Hq % Hkv:
        raise ValueError(
            f"query heads ({Hq}) must be a multiple of kv heads ({Hkv}) for GQA; "
            f"check num_attention_heads / num_key_value_heads"
        )
    if Lq > Lk:
        raise ValueError(
            f"q_len ({Lq}) > kv_len ({Lk}): queries must be the last Lq of the Lk key positions "
            f"(prefill Lq == Lk, chunked prefill Lq < Lk)"
        )
    if q_offset is not None:
        if isinstance(q_offset, bool) or not isinstance(q_offset, numbers.Integral):
            raise TypeError(f"q_offset must be an int, got {type(q_offset).__name__} ({q_offset!r})")
        if not (0 <= q_offset <= Lk - Lq):
            raise ValueError(f"q_offset ({q_offset}) must lie in [0, Lk - Lq] = [0, {Lk - Lq}]")
    if config is not None and not isinstance(config, StemConfig):
        raise TypeError(f"config must be a stem.StemConfig, got {type(config).__name__}")
    if not allow_empty and B * Hq * Lq == 0:
        raise ValueError(f"empty input: q has shape {tuple(q.shape)}; there is nothing to plan")


def validate_scalars(scale, return_lse, return_plan, backend) -> float | None:
    """Check the scalar arguments of ``stem.attention``; returns ``scale`` as a float (or None)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string such as 'auto' or 'triton', got {type(backend).__name__}")
    for name, val in (("return_lse", return_lse), ("return_plan", return_plan)):
        if not isinstance(val, bool):
            raise TypeError(f"{name} must be True or False, got {val!r}")
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number (default 1/sqrt(head dim)), got {type(scale).__name__} "
                        f"({scale!r})")
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be finite and > 0 (default 1/sqrt(head dim)), got {scale}")
    return scale


def validate_plan(plan, q: torch.Tensor, k: torch.Tensor, q_offset: int | None = None) -> None:
    """Check that a BlockPlan fits these q, k."""
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    if (plan.q_len, plan.kv_len) != (Lq, Lk):
        raise ValueError(f"plan is for q_len={plan.q_len}, kv_len={plan.kv_len} but q/k have {Lq}, {Lk}; re-plan")
    if q_offset is not None and q_offset != plan.q_offset:
        raise ValueError(f"plan is for q_offset={plan.q_offset} but q_offset={q_offset} was given; re-plan")
    if q_offset is None and plan.q_offset != Lk - Lq:
        raise ValueError(
            f"plan is for q_offset={plan.q_offset}, but without q_offset= the queries are the last {Lq} of {Lk} "
            f"positions (q_offset={Lk - Lq}); pass q_offset={plan.q_offset} to run the plan where it was made, "
            f"or re-plan"
        )
    if (plan.batch_size, plan.num_heads) != (B, Hq):
        raise ValueError(
            f"plan is for batch={plan.batch_size}, heads={plan.num_heads} but q has B={B}, Hq={Hq}; re-plan"
        )
    if plan.device != q.device:
        raise ValueError(f"plan is on {plan.device} but q is on {q.device}; use plan.to(q.device)")
    plan.ensure_checked()
