"""stem-attention, torch-universal variant: the stem Triton block-sparse attention kernel.

This variant carries no compiled code: ``_triton/block_sparse_attn.py`` (and the sibling modules it
imports) is a copy of the stem project's ``backends/triton/block_sparse_attn.py``, made by
``hub_kernels/build.py --universal`` at build time. It runs wherever Triton runs (any recent CUDA GPU, or the Triton
interpreter with ``TRITON_INTERPRET=1``), so ``get_kernel`` works even where no compiled variant
matches this torch/CUDA. Triton is imported on first use.
"""

from __future__ import annotations

import torch

__all__ = ["block_sparse_attn_fwd", "supports", "VARIANT"]

VARIANT = "universal"


def supports(dtype: torch.dtype, head_dim: int, block_size: int) -> str | None:
    """None when the Triton kernel runs this (dtype, head dim, plan block size); else why not."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} is not supported (float16, bfloat16, float32)"
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        return f"head dim {head_dim} is not supported (a power of two in [16, 256])"
    if block_size < 16 or block_size & (block_size - 1):
        return f"plan block size {block_size} is not supported (a power of two >= 16)"
    return None


def _launcher():
    try:
        from ._triton import block_sparse_attn as impl
    except ImportError as e:
        if getattr(e, "name", None) == "triton" or str(e).startswith("No module named 'triton"):
            raise ImportError(f"the stem-attention universal kernel needs triton: pip install triton ({e})") from e
        raise ImportError(f"the packaged stem Triton kernel failed to import: {e}") from e
    for name in ("block_sparse_attention", "run_block_sparse_attention"):
        fn = getattr(impl, name, None)
        if fn is not None:
            return fn
    raise ImportError("the packaged Triton module has neither block_sparse_attention nor run_block_sparse_attention")


def block_sparse_attn_fwd(q, k, v, kv_counts, kv_indices, block_size, q_offset, scale, return_lse=False):
    """Same contract as the compiled variant: (out like q, float32 lse (B, Hq, Lq) or None)."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    fn = _launcher()
    out, lse = fn(
        q, k, v, kv_counts.contiguous(), kv_indices.contiguous(), block_size=int(block_size),
        q_offset=int(q_offset), scale=float(scale), return_lse=bool(return_lse),
    )
    return out, (lse if return_lse else None)
