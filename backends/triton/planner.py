"""Registers the Triton block-logit kernel with the stem planner (entry point ``stem.planners``).

``register()`` is called by ``stem.planner.logits_impls()`` the first time a plan is made, never at
``import stem``; it imports no triton itself (the kernel module is imported on first use).
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

from stem.planner import register_logits_impl

__all__ = ["register", "triton_block_logits"]


def triton_block_logits(q, k, v, config, q_offset):
    """fn(q, k, v, config, q_offset) -> float32 (B, Hq, nQ, nK) block logits, -inf non-causal;
    equal to ``stem.planner.block_logits_torch`` up to float32 summation order."""
    from stem_backends.triton.block_pool import block_logits_triton

    if q.dtype == torch.float64:  # the kernel accumulates in float32; float64 keeps the torch path
        from stem.planner import block_logits_torch

        return block_logits_torch(q, k, v, config, q_offset)
    return block_logits_triton(q, k, v, config, q_offset)


def register() -> None:
    """Register ``triton_block_logits`` for CUDA tensors, or warn why not."""
    if importlib.util.find_spec("triton") is None:
        if torch.cuda.is_available():
            warnings.warn(
                "stem: triton is not installed, so planning on CUDA uses the slower torch block-logit path; "
                "install it with `pip install triton` (or `pip install 'stem-attention[triton]'`)",
                RuntimeWarning,
                stacklevel=2,
            )
        return
    register_logits_impl("triton", triton_block_logits, ("cuda",))
