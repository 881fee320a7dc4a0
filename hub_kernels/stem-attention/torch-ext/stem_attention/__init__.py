"""stem-attention: block-sparse flash attention over a stem BlockPlan (prebuilt CUDA kernel).

Loaded through the Hugging Face ``kernels`` package::

    from kernels import get_kernel
    stem_attention = get_kernel("stem-attention/stem-attention", version=1)
    out, lse = stem_attention.block_sparse_attn_fwd(q, k, v, plan.kv_counts, plan.kv_indices,
                                                    plan.block_size, plan.q_offset, scale, True)

The ops live in this build's own namespace (``ops``): ``block_sparse_attn_fwd``,
``block_sparse_attn_varlen_fwd`` (packed variable-length batches), ``block_sparse_attn_fp8_fwd``
(e4m3 operands quantised by the caller, sm90, head dim 128), ``kernel_path``
and ``kernel_path_reason`` (what is supported and which kernel runs it, from csrc/supported.h)
and ``last_kernel_path``. ``supports`` and ``kernel_for`` below ask ``kernel_path``.
"""

from __future__ import annotations

import functools

import torch

from ._ops import add_op_namespace_prefix, ops

__all__ = ["block_sparse_attn_fwd", "block_sparse_attn_varlen_fwd", "block_sparse_attn_fp8_fwd", "supports",
           "supports_fp8", "kernel_for", "ops", "add_op_namespace_prefix"]

# Codes of the kernel_path op's `dtype` argument (csrc/supported.h: DtypeCode); -1 for any other
# dtype, which kernel_path rules out.
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}
# kernel= names and the op's `sm` argument.
_KERNELS = {"auto": 0, "sm80": 80, "sm90": 90}
_PATH_NAMES = {80: "sm80", 90: "sm90"}


def _sm_code(kernel: str) -> int:
    sm = _KERNELS.get(kernel) if isinstance(kernel, str) else None
    if sm is None:
        raise ValueError(f"kernel must be one of {sorted(_KERNELS)}, got {kernel!r}")
    return sm


@functools.lru_cache(maxsize=512)
def _kernel_path(dtype_code: int, head_dim: int, block_size: int, cc: tuple[int, int], sm: int) -> tuple[int, str]:
    path = int(ops.kernel_path(dtype_code, head_dim, block_size, cc[0], cc[1], sm))
    return path, "" if path else str(ops.kernel_path_reason(dtype_code, head_dim, block_size, cc[0], cc[1], sm))


_CAPABILITY: dict[int, tuple[int, int]] = {}  # CUDA device index -> compute capability


def _capability(index: int) -> tuple[int, int]:
    cc = _CAPABILITY.get(index)
    if cc is None:
        cc = _CAPABILITY[index] = tuple(torch.cuda.get_device_capability(index))
    return cc


def _resolve(dtype: torch.dtype, head_dim: int, block_size: int, device, kernel: str) -> tuple[int, str]:
    """(kernel path 90 / 80, "") or (0, why not), from the kernel_path op."""
    sm = _sm_code(kernel)
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type != "cuda":
        return 0, f"runs on CUDA devices, not {device.type}"
    index = torch.cuda.current_device() if device.index is None else device.index
    return _kernel_path(_DTYPE_CODES.get(dtype, -1), int(head_dim), int(block_size), _capability(index), sm)


def supports(dtype: torch.dtype, head_dim: int, block_size: int, device=None, kernel: str = "auto") -> str | None:
    """None when ``block_sparse_attn_fwd`` runs (dtype, head dim, plan block size) on ``device``
    (default: the current CUDA device) with ``kernel``; else why not."""
    path, why = _resolve(dtype, head_dim, block_size, device, kernel)
    return None if path else why


def kernel_for(dtype: torch.dtype, head_dim: int, block_size: int, device=None, kernel: str = "auto") -> str:
    """Which compiled kernel ``block_sparse_attn_fwd`` runs for these inputs: ``"sm90"`` (wgmma +
    TMA) or ``"sm80"`` (mma.sync); ValueError when it runs neither. ``kernel="auto"`` picks the sm90
    kernel where it applies (compute capability 9.0, head dim 64/128/256, plan blocks of 128 or 256
    tokens). ``ops.last_kernel_path()`` reports what the last call ran (90 or 80)."""
    path, why = _resolve(dtype, head_dim, block_size, device, kernel)
    if not path:
        raise ValueError(why)
    return _PATH_NAMES[path]


def _rows_ok(t: torch.Tensor) -> bool:
    """Unit stride on the head dim and 16-byte rows: what the kernels read without a copy."""
    return t.stride(-1) == 1 and all(s % 8 == 0 or n == 1 for s, n in zip(t.stride()[:-1], t.shape[:-1]))


def _aligned(t: torch.Tensor) -> bool:
    return _rows_ok(t) and t.data_ptr() % 16 == 0


def _check(q, k, v, kv_counts, kv_indices, block_size, kernel: str) -> None:
    """ValueError / TypeError for the common mistakes, before the op's own checks (which make
    the same checks and more, and raise RuntimeError)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d (B, H, L, D) tensor")
        if not t.is_cuda:
            raise ValueError(f"{name} must be a CUDA tensor, got {t.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError("q, k, v must share one dtype")
    path, why = _kernel_path(_DTYPE_CODES.get(q.dtype, -1), q.shape[-1], int(block_size),
                             _capability(q.get_device()), _sm_code(kernel))
    if not path:
        raise ValueError(f"stem_attention.block_sparse_attn_fwd: {why} (q is {q.dtype})")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"k, v must be (B, Hkv, Lk, D) with Hq % Hkv == 0; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if kv_counts.dtype != torch.int32 or kv_indices.dtype != torch.int32:
        raise TypeError("kv_counts and kv_indices must be int32")


def block_sparse_attn_fwd(q, k, v, kv_counts, kv_indices, block_size, q_offset, scale, return_lse=False, *,
                          kernel: str = "auto"):
    """Forward block-sparse causal attention over a stem plan.

    Args:
        q: (B, Hq, Lq, D) float16/bfloat16 CUDA tensor; row r is at absolute position q_offset + r.
        k, v: (B, Hkv, Lk, D), same dtype; query head h reads kv head h // (Hq // Hkv).
        kv_counts: int32 (B, Hq, nQ); kv_indices: int32 (B, Hq, nQ, W), ascending in the first
            kv_counts entries (the rest is padding).
        block_size: plan block size (64, 128 or 256); q_offset: absolute position of query row 0.
        scale: softmax scale; return_lse: also return the float32 (B, Hq, Lq) log-sum-exp.
        kernel: ``"auto"`` (the sm90 kernel where it applies, else the sm80 kernel), ``"sm80"``
            or ``"sm90"`` (ValueError where the sm90 kernel cannot run these inputs).

    Returns:
        (out like q, lse or None). Tensors with a head-dim stride other than 1 or rows that are
        not 16-byte aligned are copied to contiguous memory first. Under ``torch.compile`` the
        Python checks are left to the op, which checks the same at run time.
    """
    sm = _sm_code(kernel)
    if torch.compiler.is_compiling():
        q, k, v = (t if _rows_ok(t) else t.contiguous() for t in (q, k, v))
    else:
        _check(q, k, v, kv_counts, kv_indices, block_size, kernel)
        q, k, v = (t if _aligned(t) else t.contiguous() for t in (q, k, v))
    out, lse = ops.block_sparse_attn_fwd(
        q, k, v, kv_counts.contiguous(), kv_indices.contiguous(), int(block_size), int(q_offset), float(scale),
        bool(return_lse), sm,
    )
    return out, (lse if return_lse else None)


def block_sparse_attn_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, kv_counts, kv_indices, block_size, scale,
                                 return_lse=False, *, kernel: str = "auto"):
    """Forward block-sparse causal attention over a packed variable-length batch, one launch.

    Args:
        q: (total_q, Hq, D) float16/bfloat16 CUDA tensor; k, v: (total_k, Hkv, D).
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) cumulative lengths; sequence b owns rows
            ``cu_seqlens[b]:cu_seqlens[b + 1]`` and its queries are the last of its keys.
        kv_counts: int32 (B, Hq, nQ); kv_indices: int32 (B, Hq, nQ, W): one padded row block per
            sequence in its own block numbering (rows past a sequence's query blocks: count 0).
        block_size, scale, return_lse, kernel: as in :func:`block_sparse_attn_fwd`.

    Returns:
        (out (total_q, Hq, D) like q, lse float32 (Hq, total_q) or None).
    """
    sm = _sm_code(kernel)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-d (total, H, D) tensor")
    q, k, v = (t if _aligned(t) and t.is_contiguous() else t.contiguous() for t in (q, k, v))
    out, lse = ops.block_sparse_attn_varlen_fwd(
        q, k, v, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), kv_counts.contiguous(),
        kv_indices.contiguous(), int(block_size), float(scale), bool(return_lse), sm,
    )
    return out, (lse if return_lse else None)


def supports_fp8(head_dim: int, block_size: int, device=None) -> str | None:
    """None when ``block_sparse_attn_fp8_fwd`` runs (head dim, plan block size) on ``device``
    (default: the current CUDA device); else why not. The FP8 kernel is the sm90 kernel on e4m3
    operands: compute capability 9.0, head dim 128, plan blocks of 128 or 256 tokens."""
    why = supports(torch.bfloat16, head_dim, block_size, device, kernel="sm90")
    if why is not None:
        return why
    if head_dim != 128:
        return f"the FP8 kernel is built for head dim 128, got {head_dim}"
    return None


def block_sparse_attn_fp8_fwd(q8, k8, vt8, q_scale, k_scale, v_scale, kv_counts, kv_indices, block_size, q_offset,
                              lk, scale, return_lse=False, out_dtype=torch.bfloat16):
    """Forward block-sparse causal attention on FP8 (e4m3) tensor cores (sm90, head dim 128).

    Args:
        q8: (B, Hq, Lq, 128) float8_e4m3fn; q_scale: float32 (B, Hq, Lq), q ~ q8 * q_scale.
        k8: (B, Hkv, Lp, 128) float8_e4m3fn, Lp a multiple of 128, zeros past ``lk`` (the true key
            count); k_scale: float32 (B, Hkv, Lp // 128), one per 128-key tile.
        vt8: (B, Hkv, 128, Lp) float8_e4m3fn, V transposed with its keys permuted within every 32
            (``stem_backends.triton.fp8.quantize_kv(..., permute32=True)``); v_scale: float32
            (B, Hkv, 128), one per channel, v ~ v8 * v_scale.
        kv_counts, kv_indices, block_size (128 or 256), q_offset, scale: as in
            :func:`block_sparse_attn_fwd`; return_lse: also return the float32 (B, Hq, Lq)
            log-sum-exp of the scores q8 k8 (before any smoothing the caller did to k).
        out_dtype: torch.bfloat16 or torch.float16.

    With q8 and k8 in ``out_dtype`` itself (k8 then (B, Hkv, lk, 128)) only O += P V runs in e4m3;
    q_scale and k_scale are then not read (pass empty float32 tensors).

    Returns:
        (out (B, Hq, Lq, 128) in out_dtype, lse or None). Every tensor must be contiguous.
    """
    codes = {torch.float16: 0, torch.bfloat16: 1}
    if out_dtype not in codes:
        raise ValueError(f"out_dtype must be torch.bfloat16 or torch.float16, got {out_dtype}")
    out, lse = ops.block_sparse_attn_fp8_fwd(q8, k8, vt8, q_scale, k_scale, v_scale, kv_counts, kv_indices,
                                             int(block_size), int(q_offset), int(lk), float(scale), bool(return_lse),
                                             codes[out_dtype])
    return out, (lse if return_lse else None)


def _fake_block_sparse_attn_fp8_fwd(q8, k8, vt8, q_scale, k_scale, v_scale, kv_counts, kv_indices, block_size,
                                    q_offset, lk, scale, return_lse, out_dtype):
    out = q8.new_empty(q8.shape, dtype=torch.bfloat16 if out_dtype == 1 else torch.float16)
    lse = q8.new_empty(tuple(q8.shape[:3]) if return_lse else (0,), dtype=torch.float32)
    return out, lse


def _fake_block_sparse_attn_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, kv_counts, kv_indices, block_size, scale,
                                       return_lse, sm=0):
    out = q.new_empty(q.shape)
    lse = q.new_empty((q.shape[1], q.shape[0]) if return_lse else (0,), dtype=torch.float32)
    return out, lse


def _fake_block_sparse_attn_fwd(q, k, v, kv_counts, kv_indices, block_size, q_offset, scale, return_lse, sm=0):
    """Output shapes of the op for torch.compile / FakeTensor tracing: out like q (contiguous),
    lse float32 (B, Hq, Lq), or (0,) without it."""
    out = q.new_empty(q.shape)
    lse = q.new_empty(tuple(q.shape[:3]) if return_lse else (0,), dtype=torch.float32)
    return out, lse


for _name, _fake in (("block_sparse_attn_fwd", _fake_block_sparse_attn_fwd),
                     ("block_sparse_attn_varlen_fwd", _fake_block_sparse_attn_varlen_fwd),
                     ("block_sparse_attn_fp8_fwd", _fake_block_sparse_attn_fp8_fwd)):
    try:
        torch.library.register_fake(add_op_namespace_prefix(_name))(_fake)
    except RuntimeError as e:  # this build's namespace imported a second time in one process
        if "already" not in str(e):
            raise
