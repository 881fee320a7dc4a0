"""Context-parallel Stem prefill on ``torch.distributed``.

Each rank of a process group holds a shard of the sequence (dim 2 of SDPA-layout tensors) and
computes the rows of the single-device ``stem.attention`` result that belong to its shard.

Layouts (``W`` ranks, full length ``L``):

* ``"zigzag"`` (default, causal load balance): the sequence is cut into ``2W`` equal chunks of
  ``c = L / (2W)`` tokens and rank ``r`` holds chunks ``r`` and ``2W-1-r`` concatenated, so every
  rank owns one cheap (early) and one expensive (late) chunk.
* ``"contiguous"``: rank ``r`` holds ``[r*L/W, (r+1)*L/W)`` (simple, but the last rank does most
  of the causal work).

Algorithm (per call):

1. Planning statistics. Stem's block logit factorises (see :mod:`stem.planner`): it needs, per
   key block, the sum of the strided key rows ``(S, D)`` and, per stride group, the largest value
   norm. Every rank computes these for its own keys (one pass over its shard) and the ranks
   all-gather them: ``(nK, S*D)`` floats per (batch, kv head), about ``1/8`` of K in size at the
   default sizes. The value bonus is standardised and the budgets ``n = ceil(L / bs)`` are taken
   over the whole sequence, exactly as the single-device planner does.
2. K and V are all-gathered asynchronously, one collective per chunk position ("piece"), so
   communication overlaps planning and, in the zigzag layout, the first (early) chunk's attention
   runs as soon as the first half of the sequence has arrived while the second half is in flight.
3. Each query chunk is planned from the gathered statistics at its true absolute position
   (``q_offset``) and executed by ``stem.attention(..., plan=..., q_offset=...)`` against the
   gathered keys up to the chunk's end (later keys are never attended to; the plan still comes
   from statistics of the full sequence).

Fast path: chunks aligned to the block size (``L`` divisible by ``2*W*block_size`` for zigzag,
``W*block_size`` for contiguous). Other lengths (``L`` divisible by ``2W`` resp. ``W``) are
exact too but slower: a block that straddles two ranks needs query rows of both, so Q is
all-gathered as well and each chunk is planned by :func:`stem.plan` on full-block query rows.

No host-device synchronisation: all shapes and budgets are known on the host, and collectives are
waited on with ``Work.wait()``, which orders the compute stream after the communication stream
without blocking the CPU (NCCL).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from .api import attention as _stem_attention
from .budget import is_dense_budget
from .config import StemConfig
from .plan import BlockPlan
from .planner import PooledStats, block_row_sums, dense_plan, group_max_value_norms, plan_from_stats
from .planner import plan as _stem_plan
from .validation import validate_qkv

__all__ = ["attention", "shard", "unshard", "shard_ranges", "LAYOUTS"]

LAYOUTS = ("zigzag", "contiguous")


# ---------------------------------------------------------------------------------------------
# layout geometry
# ---------------------------------------------------------------------------------------------
def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown context-parallel layout {layout!r}; use one of {list(LAYOUTS)}")


def _pieces(world_size: int, layout: str) -> int:
    return 2 if layout == "zigzag" else 1


def _chunk_index(rank: int, piece: int, world_size: int, layout: str) -> int:
    """Index (in the natural order of the full sequence) of ``piece`` of ``rank``'s shard."""
    if layout == "contiguous":
        return rank
    return rank if piece == 0 else 2 * world_size - 1 - rank


def _check_length(seq_len: int, world_size: int, layout: str) -> int:
    """Chunk length for a full sequence of ``seq_len`` tokens (raises when it does not split)."""
    parts = world_size * _pieces(world_size, layout)
    if seq_len <= 0 or seq_len % parts:
        hint = "2 * world_size" if layout == "zigzag" else "world_size"
        raise ValueError(
            f"layout {layout!r} over {world_size} ranks splits the sequence into {parts} equal chunks, "
            f"but the length {seq_len} is not divisible by {parts} ({hint}); pad the sequence (the padding "
            f"changes the plan: pad to a multiple of {parts} * block_size for the fast path) or use a "
            f"world size that divides it"
        )
    return seq_len // parts


def shard_ranges(seq_len: int, world_size: int, rank: int, layout: str = "zigzag") -> list[tuple[int, int]]:
    """Absolute ``[start, end)`` token ranges held by ``rank``, in the order they are concatenated."""
    _check_layout(layout)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    c = _check_length(seq_len, world_size, layout)
    out = []
    for p in range(_pieces(world_size, layout)):
        j = _chunk_index(rank, p, world_size, layout)
        out.append((j * c, (j + 1) * c))
    return out


def _group_geometry(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "stem.distributed needs an initialised process group: call torch.distributed.init_process_group "
            "(e.g. under torchrun) first"
        )
    return dist.get_world_size(group), dist.get_rank(group)


def shard(x: torch.Tensor, group=None, layout: str = "zigzag", *, rank: int | None = None,
          world_size: int | None = None) -> torch.Tensor:
    """This rank's shard (dim 2) of a full-sequence tensor ``x`` (B, H, L, D), contiguous.

    ``rank``/``world_size`` default to the process group's; pass both to shard without one.
    """
    _check_layout(layout)
    if rank is None or world_size is None:
        world_size, rank = _group_geometry(group)
    if x.dim() < 3:
        raise ValueError(f"shard expects (B, H, L, ...) tensors with the sequence in dim 2, got {tuple(x.shape)}")
    ranges = shard_ranges(x.shape[2], world_size, rank, layout)
    return torch.cat([x[:, :, a:b] for a, b in ranges], dim=2).contiguous()


def _all_gather(x: torch.Tensor, group, async_op: bool):
    """All-gather a contiguous tensor into one buffer; returns (buffer (W, *x.shape), work).

    The collective writes ranks' tensors one after another along dim 0 of a (W * x.shape[0], ...)
    buffer (the layout every backend accepts), viewed here as (W, *x.shape).
    """
    world_size = dist.get_world_size(group)
    buf = torch.empty((world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    work = fn(buf, x, group=group, async_op=async_op)
    return buf.view(world_size, *x.shape), work


def _all_gather_pieces(tensors, n_pieces: int, group, async_op: bool):
    """Start one all-gather per piece (dim 2 split into ``n_pieces`` equal parts) of each tensor,
    piece-major (piece 0 of every tensor first), so that early pieces arrive first.

    Returns, per tensor, ``[(buffer (W, *piece_shape), work)]`` with ``buffer[w]`` rank ``w``'s piece.
    """
    out = [[None] * n_pieces for _ in tensors]
    for p in range(n_pieces):
        for t, x in enumerate(tensors):
            m = x.shape[2] // n_pieces
            piece = x[:, :, p * m:(p + 1) * m].contiguous()
            buf, work = _all_gather(piece, group, async_op)
            out[t][p] = (buf, work)
    return out


def _place(full: torch.Tensor, buf: torch.Tensor, piece: int, layout: str) -> None:
    """Copy the gathered ``piece`` of every rank to its natural position in ``full`` (dim 2)."""
    world_size, m = buf.shape[0], buf.shape[3]
    for w in range(world_size):
        j = _chunk_index(w, piece, world_size, layout)
        full[:, :, j * m:(j + 1) * m].copy_(buf[w])


def unshard(x_local: torch.Tensor, group=None, layout: str = "zigzag") -> torch.Tensor:
    """All-gather the shards (dim 2) of all ranks back into the full-sequence tensor."""
    _check_layout(layout)
    world_size, _ = _group_geometry(group)
    n_pieces = _pieces(world_size, layout)
    if x_local.shape[2] % n_pieces:
        raise ValueError(f"layout {layout!r} needs an even local length, got {x_local.shape[2]}")
    shape = list(x_local.shape)
    shape[2] *= world_size
    full = torch.empty(shape, dtype=x_local.dtype, device=x_local.device)
    for p, (buf, _work) in enumerate(_all_gather_pieces([x_local], n_pieces, group, async_op=False)[0]):
        _place(full, buf, p, layout)
    return full


# ---------------------------------------------------------------------------------------------
# planning statistics (the factorised logits of stem.planner, from gathered per-block sums)
# ---------------------------------------------------------------------------------------------
def _local_stats(k: torch.Tensor, v: torch.Tensor, config: StemConfig) -> torch.Tensor:
    """(B, Hkv, nb*S*D + Ll/S) float: per-block strided key sums, then per-group max value norms.

    ``k``, ``v`` (B, Hkv, Ll, D) with ``Ll`` a multiple of the block size (so that the local
    blocks are whole blocks of the full sequence, and stride groups whole groups).
    """
    B, H, Ll, D = k.shape
    bs, S = config.block_size, config.stride
    k_sum = block_row_sums(k, 0, Ll // bs, bs, S)  # (B, H, nb, S, D), as the planner computes it
    u = group_max_value_norms(v, S, Ll // S)  # (B, H, Ll/S)
    return torch.cat([k_sum.reshape(B, H, -1), u], dim=-1)


def _plan_chunk_from_stats(q_chunk: torch.Tensor, k_sum: torch.Tensor, v_max: torch.Tensor, start: int,
                           config: StemConfig) -> BlockPlan:
    """Plan a block-aligned query chunk at absolute ``start`` from the gathered statistics of the
    whole sequence (``k_sum`` (B, Hkv, nK, S, D), ``v_max`` (B, Hkv, L/S)), with the planner's own
    selection code; the plan is then cut to keys ``[0, start + Lq)`` (the executor gets K/V
    truncated there)."""
    Lq = q_chunk.shape[2]
    bs, S = config.block_size, config.stride
    L = v_max.shape[-1] * S
    q_sum = block_row_sums(q_chunk, 0, Lq // bs, bs, S).flip(3)  # as the planner's pooling computes it
    stats = PooledStats(q_sum, k_sum, v_max, start // bs, L)
    return _truncate_plan(plan_from_stats(stats, config, Lq, start, k_sum.shape[2]), start + Lq)


def _truncate_plan(p: BlockPlan, end: int) -> BlockPlan:
    """The same plan for K/V cut at token ``end`` (no selected block lies past the chunk's end)."""
    n_end = -(-end // p.block_size)
    idx = p.kv_indices[..., :n_end] if p.kv_indices.shape[-1] > n_end else p.kv_indices
    return BlockPlan(p.kv_counts, idx, p.block_size, p.q_len, end, p.config, p.dense, p.q_offset, _trusted=True)


# ---------------------------------------------------------------------------------------------
# the context-parallel attention
# ---------------------------------------------------------------------------------------------
def attention(
    q_local: torch.Tensor,
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    *,
    group=None,
    layout: str = "zigzag",
    config: StemConfig | None = None,
    backend: str = "auto",
    scale: float | None = None,
    return_lse: bool = False,
    return_plan: bool = False,
    planner: str = "stats",
):
    """Context-parallel Stem attention: this rank's rows of ``stem.attention`` on the full sequence.

    Args:
        q_local: (B, Hq, L_local, D) this rank's queries (its shard of the sequence, see ``layout``).
        k_local, v_local: (B, Hkv, L_local, D) this rank's keys and values (same shard).
        group: the process group (default: the world). Every rank must call with equal shapes.
        layout: "zigzag" (rank r holds chunks r and 2W-1-r of 2W) or "contiguous".
        config: StemConfig (default: the paper's); the budgets use the full length L = W * L_local.
        backend: executor for every chunk ("auto", "triton", "reference", ...), as in stem.attention.
        scale: softmax scale (default 1/sqrt(D)).
        return_lse: also return the float32 log-sum-exp (B, Hq, L_local) of each local row.
        return_plan: also return this rank's BlockPlans, one per local chunk (absolute
            ``q_offset``; ``kv_len`` is the chunk's end).
        planner: "stats" (default: plan from all-gathered per-block statistics, overlapping the
            K/V gather) or "full" (``stem.plan`` on the gathered K/V, using a registered planner
            kernel where there is one). Lengths off the block grid always use "full".

    Returns:
        out (B, Hq, L_local, D) in q's dtype, in the same shard layout as q_local; with
        ``return_lse`` / ``return_plan`` a tuple ``(out, [lse], [plans])``.
    """
    device = q_local.device if isinstance(q_local, torch.Tensor) else None
    # Launch on the tensors' device even where the caller's current CUDA device differs (kernels
    # that launch on the current device, such as Triton's, would otherwise run on the wrong GPU).
    guard = torch.cuda.device(device) if device is not None and device.type == "cuda" else contextlib.nullcontext()
    with guard:
        out, lse, plans = _attention(q_local, k_local, v_local, group, layout, config, backend, scale, return_lse,
                                     planner)
    result = (out,) + ((lse,) if return_lse else ()) + ((plans,) if return_plan else ())
    return result[0] if len(result) == 1 else result


def _attention(q_local, k_local, v_local, group, layout, config, backend, scale, return_lse, planner):
    _check_layout(layout)
    if planner not in ("stats", "full"):
        raise ValueError(f"planner must be 'stats' or 'full', got {planner!r}")
    world_size, rank = _group_geometry(group)
    shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in (q_local, k_local, v_local)]
    if all(s is not None and len(s) == 4 for s in shapes) and not shapes[0][2] == shapes[1][2] == shapes[2][2]:
        raise ValueError(
            f"q_local, k_local, v_local have {shapes[0][2]}, {shapes[1][2]}, {shapes[2][2]} tokens: context-parallel "
            f"prefill needs each rank's q, k and v shards to cover the same positions"
        )
    validate_qkv(q_local, k_local, v_local, config=config)
    config = StemConfig() if config is None else config
    B, Hq, Ll, D = q_local.shape
    Hkv = k_local.shape[1]
    n_pieces = _pieces(world_size, layout)
    if Ll % n_pieces:
        raise ValueError(
            f"layout 'zigzag' needs an even local length (two chunks of L/(2W) tokens per rank), got {Ll}; "
            f"make the full length divisible by 2 * world_size (= {2 * world_size}) or use layout='contiguous'"
        )
    L = Ll * world_size
    c = Ll // n_pieces
    bs = config.block_size
    n_total = -(-L // bs)
    dense = config.dense or is_dense_budget(n_total, config.k_rate, config.k_bias)
    aligned = c % bs == 0
    use_stats = planner == "stats" and aligned and not dense
    need_q = not aligned and not dense  # boundary blocks need query rows of a neighbouring rank

    # 1. start the collectives: tiny statistics first, then K and V piece by piece
    stats_buf = stats_work = None
    if use_stats:
        local = _local_stats(k_local, v_local, config)
        stats_buf, stats_work = _all_gather(local, group, async_op=True)
    k_parts, v_parts = _all_gather_pieces([k_local, v_local], n_pieces, group, async_op=True)
    q_parts = _all_gather_pieces([q_local], n_pieces, group, async_op=True)[0] if need_q else None

    # chunks of this rank: (local start, absolute start)
    chunks = [(p * c, _chunk_index(rank, p, world_size, layout) * c) for p in range(n_pieces)]

    # 2. plan (from statistics: overlaps the K/V all-gather)
    plans: list[BlockPlan | None] = [None] * n_pieces
    if dense:
        for p, (_ls, a) in enumerate(chunks):
            plans[p] = dense_plan(B, Hq, c, a + c, bs, q_local.device, config, q_offset=a)
    elif use_stats:
        stats_work.wait()
        nb_local = Ll // bs
        S = config.stride
        ksz = nb_local * S * D
        k_sum = torch.empty(B, Hkv, n_total * S * D, dtype=stats_buf.dtype, device=stats_buf.device)
        u = torch.empty(B, Hkv, L // S, dtype=stats_buf.dtype, device=stats_buf.device)
        for w in range(world_size):  # place each rank's pieces at their natural positions
            for p in range(n_pieces):
                j = _chunk_index(w, p, world_size, layout)
                kb = (c // bs) * S * D
                k_sum[:, :, j * kb:(j + 1) * kb] = stats_buf[w, :, :, p * kb:(p + 1) * kb]
                ug = c // S
                u[:, :, j * ug:(j + 1) * ug] = stats_buf[w, :, :, ksz + p * ug:ksz + (p + 1) * ug]
        k_sum = k_sum.view(B, Hkv, n_total, S, D)
        with torch.no_grad():
            for p, (ls, a) in enumerate(chunks):
                plans[p] = _plan_chunk_from_stats(q_local[:, :, ls:ls + c], k_sum, u, a, config)

    # 3. execute chunk by chunk as the K/V pieces arrive
    k_full = torch.empty(B, Hkv, L, D, dtype=k_local.dtype, device=k_local.device)
    v_full = torch.empty_like(k_full)
    out = torch.empty_like(q_local)
    lse = torch.empty(B, Hq, Ll, dtype=torch.float32, device=q_local.device) if return_lse else None
    if dense or use_stats:
        # plans are ready: run each chunk as soon as its keys have arrived (zigzag piece 0 needs
        # only the first half of the sequence, so it overlaps the second half's all-gather)
        for p in range(n_pieces):
            _gather_into(k_parts, v_parts, k_full, v_full, p, layout)
            _run_chunk(chunks[p], c, plans[p], q_local, k_full, v_full, out, lse, backend, scale)
    else:  # "full" planner (or lengths off the block grid): plan against the whole gathered K/V
        for p in range(n_pieces):
            _gather_into(k_parts, v_parts, k_full, v_full, p, layout)
        q_full = None
        if need_q:
            q_full = torch.empty(B, Hq, L, D, dtype=q_local.dtype, device=q_local.device)
            for p, (buf, work) in enumerate(q_parts):
                work.wait()
                _place(q_full, buf, p, layout)
        for p, (ls, a) in enumerate(chunks):
            plans[p] = _plan_full(q_local[:, :, ls:ls + c], q_full, k_full, v_full, a, config)
            _run_chunk(chunks[p], c, plans[p], q_local, k_full, v_full, out, lse, backend, scale)
    return out, lse, plans


def _gather_into(k_parts, v_parts, k_full, v_full, p: int, layout: str) -> None:
    """Wait for piece ``p`` of K and V and copy it to its natural positions."""
    for parts, full in ((k_parts, k_full), (v_parts, v_full)):
        buf, work = parts[p]
        work.wait()
        _place(full, buf, p, layout)
        parts[p] = None  # free the staging buffer (its copy is queued on this stream)


def _plan_full(q_chunk, q_full, k_full, v_full, start: int, config: StemConfig) -> BlockPlan:
    """``stem.plan`` of one chunk against the full K/V; off the block grid, the chunk's boundary
    blocks are planned with their full query rows (from the gathered Q) and the plan re-labelled."""
    Lq = q_chunk.shape[2]
    L, bs = k_full.shape[2], config.block_size
    end = start + Lq
    if q_full is None:
        p = _stem_plan(q_chunk, k_full, v_full, config, q_offset=start)
    else:
        a0, a1 = (start // bs) * bs, min(-(-end // bs) * bs, L)
        p = _stem_plan(q_full[:, :, a0:a1], k_full, v_full, config, q_offset=a0)
        p = BlockPlan(p.kv_counts, p.kv_indices, bs, Lq, L, config, p.dense, q_offset=start)
    return _truncate_plan(p, end)


def _run_chunk(chunk, c, plan, q_local, k_full, v_full, out, lse, backend, scale) -> None:
    ls, a = chunk
    end = a + c
    res = _stem_attention(
        q_local[:, :, ls:ls + c], k_full[:, :, :end], v_full[:, :, :end],
        plan=plan, backend=backend, scale=scale, return_lse=lse is not None, q_offset=a,
    )
    if lse is None:
        out[:, :, ls:ls + c].copy_(res)
    else:
        out[:, :, ls:ls + c].copy_(res[0])
        lse[:, :, ls:ls + c].copy_(res[1])
