"""The planner and the executors as ``torch.library`` custom ops, so ``torch.compile`` sees Stem as
four opaque graph nodes with known output shapes (fake implementations) and no graph break.

``stem.attention`` and ``stem.varlen_attention`` take this path while ``torch.compile`` traces
them; eager calls run the same Python directly. Host decisions that depend only on shapes and the
config (the dense shortcut, the executor choice) are made once at trace time
(:func:`torch.compiler.assume_constant_result`), so the compiled graph holds only the ops.

    stem::plan(q, k, v, config, q_offset, pooling) -> (kv_counts, kv_indices)
    stem::execute(q, k, v, kv_counts, kv_indices, block_size, q_offset, dense, backend, scale,
                  return_lse) -> (out, lse)
    stem::plan_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, config,
                      auto_dense) -> (kv_counts, kv_indices)
    stem::execute_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, kv_counts, kv_indices, block_size,
                         max_seqlen_q, max_seqlen_k, backend, scale, return_lse) -> (out, lse)

The module is imported (and the ops registered) by the first call that torch.compile traces, so
``import stem`` stays light (no torch._dynamo, no triton). ``config`` is the StemConfig as JSON;
``lse`` is an empty tensor when not asked for. The varlen ops read the cumulative lengths on the
host inside the op (so a compiled varlen call needs ``max_seqlen_q``/``max_seqlen_k`` given: they
fix the plan's shape).
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import torch
from torch import Tensor

from .config import StemConfig

__all__ = ["plan_op", "execute_op", "plan_varlen_op", "execute_varlen_op", "decide", "decide_varlen", "config_fields",
           "config_json"]


@lru_cache(maxsize=64)
def _config(config_json: str) -> StemConfig:
    return StemConfig.from_json(config_json)


def _lse_like(q: Tensor, shape) -> Tensor:
    return q.new_empty(shape, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)


# ---- trace-time decisions ------------------------------------------------------------------------
# A StemConfig crosses into these functions as a tuple of its field values: some torch releases
# cannot pass a frozen dataclass instance to a function whose result is assumed constant.
_FIELDS = tuple(f.name for f in dataclasses.fields(StemConfig))


def config_fields(config: StemConfig) -> tuple:
    """The config's field values, in field order (plain attribute reads: traceable)."""
    return tuple(getattr(config, name) for name in _FIELDS)


@lru_cache(maxsize=64)
def _from_fields(fields: tuple) -> StemConfig:
    return StemConfig(**dict(zip(_FIELDS, fields)))


@torch.compiler.assume_constant_result
def config_json(fields: tuple) -> str:
    return _from_fields(fields).to_json()


@torch.compiler.assume_constant_result
def decide(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int, q_len: int, kv_len: int,
           q_offset: int | None, fields: tuple, need_lse: bool, gqa: int = 4, heads: int = 32) -> tuple:
    """(executor name, dense plan?, differentiable?, why) for a (B, H, L, D) call: what the eager
    path decides for the same shapes and config (``fields``: :func:`config_fields`; ``gqa`` = Hq / Hkv;
    ``heads`` = Hq x B)."""
    from .api import auto_dense_reason
    from .budget import is_dense_budget
    from .dispatch import DispatchKey, resolve

    config = _from_fields(fields)
    shortcut = False
    if backend == "auto" and device.type == "cuda":
        from .api import sparse_executor

        executor = sparse_executor(device, dtype, head_dim, config, need_lse)
        shortcut = auto_dense_reason(device.type, q_len, kv_len, config, q_offset, head_dim=head_dim, gqa=gqa,
                                     heads=heads, executor=executor) is not None
    n = -(-kv_len // config.block_size)
    dense = shortcut or config.dense or is_dense_budget(n, config.k_rate, config.k_bias)
    ex, why = resolve(backend, DispatchKey(device, dtype, head_dim, config.block_size, dense, need_lse))
    return ex.name, dense, ex.differentiable, why


@torch.compiler.assume_constant_result
def decide_varlen(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int, fields: tuple,
                  need_lse: bool) -> tuple:
    """(executor name, why) for a packed batch (planned sparse: which sequences are dense is only
    known from the lengths, inside the ops)."""
    from .dispatch import DispatchKey, resolve

    config = _from_fields(fields)

    ex, why = resolve(backend, DispatchKey(device, dtype, head_dim, config.block_size, config.dense, need_lse, True))
    return ex.name, why


# ---- (B, H, L, D) ops ------------------------------------------------------------------------------------
@torch.library.custom_op("stem::plan", mutates_args=())
def plan_op(q: Tensor, k: Tensor, v: Tensor, config: str, q_offset: int, pooling: str) -> tuple[Tensor, Tensor]:
    from .planner import plan_validated

    p = plan_validated(q, k, v, _config(config), q_offset=q_offset, pooling=pooling)
    return p.kv_counts, p.kv_indices


@plan_op.register_fake
def _(q, k, v, config, q_offset, pooling):
    from .plan import block_geometry
    from .planner import plan_width

    cfg = _config(config)
    _, nq, _ = block_geometry(q.shape[2], k.shape[2], q_offset, cfg.block_size)
    w = plan_width(q.shape[2], k.shape[2], q_offset, cfg)
    B, H = q.shape[0], q.shape[1]
    return q.new_empty(B, H, nq, dtype=torch.int32), q.new_empty(B, H, nq, w, dtype=torch.int32)


@torch.library.custom_op("stem::execute", mutates_args=())
def execute_op(q: Tensor, k: Tensor, v: Tensor, kv_counts: Tensor, kv_indices: Tensor, block_size: int,
               q_offset: int, dense: bool, backend: str, scale: float, return_lse: bool) -> tuple[Tensor, Tensor]:
    from .dispatch import DispatchKey, resolve
    from .plan import BlockPlan
    from .planner import dense_plan

    if dense and kv_counts.numel() == 0:  # the dense shortcut: no plan was made
        plan = dense_plan(q.shape[0], q.shape[1], q.shape[2], k.shape[2], block_size, q.device, q_offset=q_offset)
    else:
        plan = BlockPlan(kv_counts, kv_indices, block_size, q.shape[2], k.shape[2], None, dense, q_offset,
                         _trusted=True)
    ex, _ = resolve(backend, DispatchKey.of(q, plan, return_lse))
    out, lse = ex.forward(q, k, v, plan, scale, return_lse)
    # the fake promises fresh contiguous outputs (CPU SDPA's lse comes out transposed)
    out = out.clone() if out.data_ptr() in (q.data_ptr(), k.data_ptr(), v.data_ptr()) else out.contiguous()
    return out, (lse.contiguous() if lse is not None else _lse_like(q, (0,)))


@execute_op.register_fake
def _(q, k, v, kv_counts, kv_indices, block_size, q_offset, dense, backend, scale, return_lse):
    return q.new_empty(q.shape), _lse_like(q, q.shape[:3] if return_lse else (0,))


# ---- packed variable-length ops -----------------------------------------------------------------------
@torch.library.custom_op("stem::plan_varlen", mutates_args=())
def plan_varlen_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                   max_seqlen_k: int, config: str, auto_dense: bool) -> tuple[Tensor, Tensor]:
    from .varlen import _max_lengths, _read_lengths, plan_varlen_rows

    lens = _read_lengths(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0])
    mq, mk = _max_lengths(lens, max_seqlen_q, max_seqlen_k)
    counts, indices, _ = plan_varlen_rows(q, k, v, cu_seqlens_q, lens, mq, mk, _config(config), auto_dense=auto_dense)
    return counts, indices


@plan_varlen_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, config, auto_dense):
    from .varlen import varlen_plan_shape

    B, H, nq, w = varlen_plan_shape(cu_seqlens_q.shape[0] - 1, q.shape[1], max_seqlen_q, max_seqlen_k,
                                    _config(config), auto_dense and q.device.type == "cuda")
    return q.new_empty(B, H, nq, dtype=torch.int32), q.new_empty(B, H, nq, w, dtype=torch.int32)


@torch.library.custom_op("stem::execute_varlen", mutates_args=())
def execute_varlen_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, kv_counts: Tensor,
                      kv_indices: Tensor, block_size: int, max_seqlen_q: int, max_seqlen_k: int, backend: str,
                      scale: float, return_lse: bool) -> tuple[Tensor, Tensor]:
    from .dispatch import DispatchKey, resolve
    from .varlen import VarlenBlockPlan

    plan = VarlenBlockPlan(kv_counts, kv_indices, block_size, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           _trusted=True)
    ex, _ = resolve(backend, DispatchKey.of(q, plan, return_lse, varlen=True))
    out, lse = ex.forward_varlen(q, k, v, plan, scale, return_lse)
    return out.contiguous(), (lse.contiguous() if lse is not None else _lse_like(q, (0,)))


@execute_varlen_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, kv_counts, kv_indices, block_size, max_seqlen_q, max_seqlen_k, backend,
      scale, return_lse):
    return q.new_empty(q.shape), _lse_like(q, (q.shape[1], q.shape[0]) if return_lse else (0,))
