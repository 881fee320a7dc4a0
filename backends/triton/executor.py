"""The Triton executor: block-sparse flash attention that runs a BlockPlan on CUDA.

The kernel lives in ``stem_backends.triton.block_sparse_attn``; this module is the thin
host side (checks, layout, launch) and imports triton only when a launch happens.
``run_block_sparse_attention`` also runs on CPU tensors under ``TRITON_INTERPRET=1`` (the CPU tests
use it); the executor itself serves CUDA only.
"""

from __future__ import annotations

import importlib.util

import torch

from stem.dispatch import Executor

__all__ = ["TritonExecutor", "run_block_sparse_attention", "run_block_sparse_attention_varlen", "supports",
           "check_inputs", "fp8_unsupported_reason", "DEFAULT_SCHEDULE", "PRECISIONS"]

# "native": the input dtype end to end (today's kernel); "fp8": e4m3 matrix products (sm89+).
PRECISIONS = ("native", "fp8")

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# "reversed" (late query blocks first, no sort) won on one NVIDIA H200 at 32K-128K by 1-4 % over
# "sorted" (query blocks ordered by selected-block count, heaviest first): 128K 67.1 vs 70.0 ms,
# 64K 20.8 vs 20.9, 32K 7.00 vs 7.07; 16K 3.09 vs 3.07 (benchmarks/gpu_triton_check.py).
DEFAULT_SCHEDULE = "reversed"


def _pow2_in(x: int, lo: int, hi: int) -> bool:
    return lo <= x <= hi and x & (x - 1) == 0


def supports(dtype: torch.dtype, head_dim: int, block_size: int) -> str | None:
    """None when the kernel runs this (dtype, head dim, plan block size); else why not."""
    if dtype not in _DTYPES:
        return f"dtype {dtype} is not supported (float16, bfloat16 or float32; use the reference backend for float64)"
    if not _pow2_in(head_dim, 16, 256):
        return f"head dim {head_dim} is not supported (a power of two in [16, 256]; use the reference backend)"
    if not _pow2_in(block_size, 16, 256):
        return f"plan block size {block_size} is not supported (a power of two in [16, 256])"
    return None


def check_inputs(q, k, v, plan) -> str | None:
    """None when the kernel can run these inputs, else why not (and what to do instead)."""
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    why = supports(q.dtype, q.shape[-1], plan.block_size)
    if why is not None:
        return why
    if not (q.device == k.device == v.device == plan.device):
        return f"q, k, v and the plan must be on one device, got {q.device}, {k.device}, {v.device}, {plan.device}"
    if (plan.q_len, plan.kv_len) != (q.shape[2], k.shape[2]) or tuple(plan.kv_counts.shape[:2]) != tuple(q.shape[:2]):
        return "the plan does not match q/k shapes; re-plan"
    return None


def fp8_unsupported_reason(q, k, v, block_size: int | None = None) -> str | None:
    """None when the FP8 kernel can run these inputs (and plan block size), else what is wrong and
    how to fix it."""
    if q.dtype not in (torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype):
        return (f"precision='fp8' takes float16 or bfloat16 q/k/v (quantised to e4m3 on the GPU), got {q.dtype}, "
                f"{k.dtype}, {v.dtype}; cast the inputs to bfloat16 or use precision='native'")
    if q.shape[-1] < 32 or (block_size is not None and block_size < 64):
        # an FP8 tensor-core product reduces over at least 32 elements (head dim for Q.K^T, keys for
        # P.V), and sm90's FP8 instructions (wgmma) take 64-row tiles: Triton 3.6 emits no FP8
        # tensor-core instruction for 32-row query tiles there
        return (f"precision='fp8' needs head dim >= 32 and plan block size >= 64, got {q.shape[-1]} and "
                f"{block_size}; use precision='native' (or StemConfig(block_size=128), the default)")
    if q.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(q.device)
        if (major, minor) < (8, 9):
            return (f"precision='fp8' needs FP8 tensor cores (compute capability 8.9+, Ada/Hopper or newer); "
                    f"{torch.cuda.get_device_name(q.device)} is {major}.{minor}: use precision='native'")
        return None
    from triton import knobs

    if q.device.type == "cpu" and knobs.runtime.interpret:
        return None  # Triton's CPU interpreter (tests)
    return f"precision='fp8' runs on CUDA GPUs (sm89+) only, not on {q.device.type}: use precision='native'"


def _work_order(plan):
    """Heaviest-first permutation of the plan's work items, cached on the plan (device op, no sync)."""
    from stem_backends.triton.block_sparse_attn import work_order

    counts = plan.kv_counts
    key = (counts.data_ptr(), counts._version)
    cached = getattr(plan, "_triton_work_order", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    order = work_order(counts)
    if not torch.cuda.is_available() or not torch.cuda.is_current_stream_capturing():
        plan._triton_work_order = (key, order)  # never cache a tensor owned by a graph being captured
    return order


def run_block_sparse_attention(q, k, v, plan, scale: float, return_lse: bool = False, *,
                               schedule: str = DEFAULT_SCHEDULE, out=None, lse_out=None, precision: str = "native",
                               **tiles):
    """Run ``plan`` with the Triton kernel: out (B, Hq, Lq, D) in q.dtype, lse float32 (B, Hq, Lq)
    (natural log) or None. ``tiles`` may override the kernel configuration (use_tma, and
    block_m, block_n, num_warps, num_stages, maxnreg, tma_masked: see ``pick_tiles``);
    ``out``/``lse_out`` are optional preallocated contiguous outputs (the tests poison them).
    ``precision``: "native" (the input dtype) or "fp8" (float16/bfloat16 inputs quantised to e4m3
    on the GPU, sm89+; ``stem_backends.triton.fp8``; tiles: block_m, block_n, num_warps,
    num_stages; the schedule is always "reversed").
    Works on CUDA, and on CPU tensors when TRITON_INTERPRET=1 was set before triton was imported."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    why = check_inputs(q, k, v, plan)
    if why is None and precision == "fp8":
        why = fp8_unsupported_reason(q, k, v, plan.block_size)
    if why is not None:
        raise ValueError(f"triton executor cannot run these inputs: {why}")
    from stem_backends.triton.block_sparse_attn import block_sparse_attention

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    counts, indices = plan.kv_counts, plan.kv_indices
    if indices.stride(-1) != 1:
        indices = indices.contiguous()
    for name, buf, shape, dtype in (("out", out, q.shape, q.dtype), ("lse_out", lse_out, q.shape[:3], torch.float32)):
        if buf is not None and (buf.shape != shape or buf.dtype != dtype or not buf.is_contiguous()
                                or buf.device != q.device):
            raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)} on {q.device}")
    if precision == "fp8":
        from stem_backends.triton.fp8 import block_sparse_attention_fp8

        return block_sparse_attention_fp8(q, k, v, counts, indices, block_size=plan.block_size,
                                          q_offset=plan.q_offset, scale=scale, return_lse=return_lse, out=out,
                                          lse_out=lse_out, **tiles)
    order = _work_order(plan) if schedule == "sorted" else None
    return block_sparse_attention(
        q, k, v, counts, indices, block_size=plan.block_size, q_offset=plan.q_offset, scale=scale,
        return_lse=return_lse, schedule=schedule, order=order, out=out, lse_out=lse_out, **tiles,
    )


def run_block_sparse_attention_varlen(q, k, v, plan, scale: float, return_lse: bool = False, *, out=None,
                                      lse_out=None, **tiles):
    """Run a ``stem.VarlenBlockPlan`` on a packed batch in one launch: q (total_q, Hq, D), k/v
    (total_k, Hkv, D) -> (out like q, lse float32 (Hq, total_q) or None). No host sync. Works on
    CUDA, and on CPU tensors under TRITON_INTERPRET=1."""
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"triton executor: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    why = supports(q.dtype, q.shape[-1], plan.block_size)
    if why is not None:
        raise ValueError(f"triton executor cannot run these inputs: {why}")
    if not (q.device == k.device == v.device == plan.device):
        raise ValueError(f"triton executor: q, k, v and the plan must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}, {plan.device}")
    from stem_backends.triton.block_sparse_attn import block_sparse_attention_varlen

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    indices = plan.kv_indices if plan.kv_indices.stride(-1) == 1 else plan.kv_indices.contiguous()
    return block_sparse_attention_varlen(q, k, v, plan.cu_seqlens_q, plan.cu_seqlens_k, plan.kv_counts, indices,
                                         block_size=plan.block_size, scale=scale, return_lse=return_lse, out=out,
                                         lse_out=lse_out, **tiles)


class TritonExecutor(Executor):
    name = "triton"
    priority = 50
    device_types = ("cuda",)
    description = "Triton block-sparse flash attention over the plan's selected blocks (CUDA, sm80+)"
    returns_lse = True

    def unavailable_reason(self, device) -> str | None:
        device = torch.device(device)
        if device.type != "cuda":
            return f"runs on CUDA tensors only, not {device.type} (no CUDA here: use backend='reference')"
        if not torch.cuda.is_available():
            return "no CUDA device is visible (torch.cuda.is_available() is False)"
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"compute capability {major}.{minor} < 8.0 (the kernel needs Ampere or newer)"
        return None

    varlen = True

    def supports(self, key) -> str | None:
        return supports(key.dtype, key.head_dim, key.block_size)

    def forward(self, q, k, v, plan, scale, return_lse, precision: str = "native"):
        return run_block_sparse_attention(q, k, v, plan, scale, return_lse, precision=precision)

    def forward_varlen(self, q, k, v, plan, scale, return_lse):
        return run_block_sparse_attention_varlen(q, k, v, plan, scale, return_lse)
