"""The Triton pooling kernel as a planner plugin (``stem.planner.register_pooling``).

``register()`` is called by ``stem.planner.poolings()`` the first time a plan is made, never at
``import stem``; it imports no triton itself (the kernel module is imported on first use).
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

from stem.planner import (
    PooledStats,
    pool_torch,
    register_planner,
    register_pooling,
    register_selector,
    register_varlen_pooling,
)

__all__ = ["register", "pool_triton", "pool_triton_varlen", "plan_triton", "select_triton"]


def pool_triton(q, k, v, config, q_offset) -> PooledStats:
    """``stem.planner.PooledStats`` from one Triton kernel pass over q, k, v; equal to
    ``stem.planner.pool_torch`` up to float32 summation order (float64 input keeps the torch path:
    the kernel accumulates in float32)."""
    if q.dtype == torch.float64:
        return pool_torch(q, k, v, config, q_offset)
    from stem_backends.triton.block_pool import pooled_block_sums

    bs = config.block_size
    q_sum, k_sum, v_max = pooled_block_sums(q, k, v, bs, config.stride, q_offset)
    return PooledStats(q_sum, k_sum, v_max, q_offset // bs, k.shape[2])


def pool_triton_varlen(q, k, v, seqs, nQ, nK, config):
    """``stem.planner.pool_varlen_torch`` of a packed batch in two Triton launches (float32)."""
    from stem_backends.triton.block_pool import pooled_block_sums_varlen

    return pooled_block_sums_varlen(q, k, v, seqs, nQ, nK, config.block_size, config.stride)


def plan_triton(q, k, v, config, q_offset, n_total):
    """int32 ``(kv_counts, kv_indices)`` of the plan from the Triton planner kernels
    (``select.plan_triton``: pooling, bonus, logits, selection; no host synchronisation)."""
    from stem_backends.triton.select import plan_triton as run

    return run(q, k, v, config, q_offset, n_total)


def select_triton(logits, config, q_block_offset, n_total):
    """``stem.planner.select_blocks`` in one Triton launch (``select.select_triton``)."""
    from stem_backends.triton.select import select_triton as run

    return run(logits, config, q_block_offset, n_total)


def register() -> None:
    """Register ``pool_triton`` for CUDA tensors, or warn why not."""
    if importlib.util.find_spec("triton") is None:
        if torch.cuda.is_available():
            warnings.warn(
                "stem: triton is not installed, so planning on CUDA uses the slower torch pooling path; "
                "install it with `pip install triton` (or `pip install 'stem-attention[triton]'`)",
                RuntimeWarning,
                stacklevel=2,
            )
        return
    register_pooling("triton", pool_triton, ("cuda",))
    register_planner("triton", plan_triton, ("cuda",))
    register_selector("triton", select_triton, ("cuda",))
    register_varlen_pooling("triton", pool_triton_varlen, ("cuda",))
