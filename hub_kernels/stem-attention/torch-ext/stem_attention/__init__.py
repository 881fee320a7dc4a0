"""stem-attention: block-sparse flash attention over a stem BlockPlan (prebuilt CUDA kernel).

Loaded through the Hugging Face ``kernels`` package::

    from kernels import get_kernel
    stem_attention = get_kernel("stem-attention/stem-attention", version=1)
    out, lse = stem_attention.block_sparse_attn_fwd(q, k, v, plan.kv_counts, plan.kv_indices,
                                                    plan.block_size, plan.q_offset, scale, True)

The op itself is ``ops.block_sparse_attn_fwd`` (registered in this build's own namespace).
"""

from __future__ import annotations

import os

import torch

from ._ops import add_op_namespace_prefix, ops

__all__ = ["block_sparse_attn_fwd", "supports", "kernel_for", "ops", "add_op_namespace_prefix", "VARIANT"]

VARIANT = "cuda"  # the compiled sm80 + sm90a kernels (the torch-universal build says "universal")

_DTYPES = (torch.float16, torch.bfloat16)
_HEAD_DIMS = (64, 128, 256)
_BLOCK_SIZES = (64, 128, 256)


def supports(dtype: torch.dtype, head_dim: int, block_size: int) -> str | None:
    """None when the kernel runs this (dtype, head dim, plan block size); else why not."""
    if dtype not in _DTYPES:
        return f"dtype {dtype} is not supported (float16, bfloat16)"
    if head_dim not in _HEAD_DIMS:
        return f"head dim {head_dim} is not supported ({', '.join(map(str, _HEAD_DIMS))})"
    if block_size not in _BLOCK_SIZES:
        return f"plan block size {block_size} is not supported ({', '.join(map(str, _BLOCK_SIZES))})"
    return None


def kernel_for(dtype: torch.dtype, head_dim: int, block_size: int, device) -> str:
    """Which compiled kernel ``block_sparse_attn_fwd`` runs for these inputs: ``"sm90"`` (wgmma +
    TMA: compute capability 9.0, head dim 64/128, plan blocks of 128 or 256 tokens, unless the
    environment sets STEM_ATTN_SM90=0) or ``"sm80"`` (mma.sync, every other supported case).
    ``ops.last_kernel_path()`` reports what the last call actually ran (90 or 80)."""
    if supports(dtype, head_dim, block_size) is not None:
        raise ValueError(supports(dtype, head_dim, block_size))
    hopper = torch.cuda.get_device_capability(torch.device(device)) == (9, 0)
    if hopper and head_dim in (64, 128) and block_size % 128 == 0 and os.environ.get("STEM_ATTN_SM90") != "0":
        return "sm90"
    return "sm80"


def _aligned(t: torch.Tensor) -> bool:
    return (
        t.stride(-1) == 1
        and all(s % 8 == 0 or n == 1 for s, n in zip(t.stride()[:-1], t.shape[:-1]))
        and t.data_ptr() % 16 == 0
    )


def _check(q, k, v, kv_counts, kv_indices, block_size) -> None:
    """Clear Python errors for the common mistakes, before the op's own TORCH_CHECKs.

    (Known issue, seen on torch 2.11 + this build: a failing TORCH_CHECK inside the op crashed the
    process instead of raising; until that is understood, reject bad input here.)"""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d (B, H, L, D) tensor")
        if not t.is_cuda:
            raise ValueError(f"{name} must be a CUDA tensor, got {t.device}")
    why = supports(q.dtype, q.shape[-1], int(block_size))
    if why is not None:
        raise ValueError(f"stem_attention.block_sparse_attn_fwd: {why}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError("q, k, v must share one dtype")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"k, v must be (B, Hkv, Lk, D) with Hq % Hkv == 0; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if kv_counts.dtype != torch.int32 or kv_indices.dtype != torch.int32:
        raise TypeError("kv_counts and kv_indices must be int32")


def block_sparse_attn_fwd(q, k, v, kv_counts, kv_indices, block_size, q_offset, scale, return_lse=False):
    """Forward block-sparse causal attention over a stem plan.

    Args:
        q: (B, Hq, Lq, D) float16/bfloat16 CUDA tensor; row r is at absolute position q_offset + r.
        k, v: (B, Hkv, Lk, D), same dtype; query head h reads kv head h // (Hq // Hkv).
        kv_counts: int32 (B, Hq, nQ); kv_indices: int32 (B, Hq, nQ, W), ascending in the first
            kv_counts entries (the rest is padding).
        block_size: plan block size (64, 128 or 256); q_offset: absolute position of query row 0.
        scale: softmax scale; return_lse: also return the float32 (B, Hq, Lq) log-sum-exp.

    Returns:
        (out like q, lse or None). Tensors with a head-dim stride other than 1 or rows that are
        not 16-byte aligned are copied to contiguous memory first.
    """
    _check(q, k, v, kv_counts, kv_indices, block_size)
    q, k, v = (t if _aligned(t) else t.contiguous() for t in (q, k, v))
    out, lse = ops.block_sparse_attn_fwd(
        q, k, v, kv_counts.contiguous(), kv_indices.contiguous(), int(block_size), int(q_offset), float(scale),
        bool(return_lse),
    )
    return out, (lse if return_lse else None)
