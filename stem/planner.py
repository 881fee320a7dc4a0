"""The Stem planner: (q, k, v, config) -> BlockPlan (docs/method.md).

Scoring without the (L/S)^2 score matrix
----------------------------------------
The spec's block logit is the *mean* over the (bs/S)^2 strided cells of

    score[m, n] = scale * <q~[m], k~[n]> + bonus[n]

where q~[m] is the S query rows of group m, reversed and flattened to S*D, and k~[n] the S key
rows of group n flattened likewise. The inner product is bilinear, so its block mean factorises:

    logit[i, j] = scale / (bs/S)^2 * <sum_{m in i} q~[m], sum_{n in j} k~[n]> + mean_{n in j} bonus[n]

The planner therefore pools q and k once per block into (nQ, S*D) and (nK, S*D) sums (one
memory-bound pass over q and k) and multiplies those: nQ*nK*S*D multiply-adds instead of
(Lq/S)*(Lk/S)*S*D, and no score scratch at all. It is the same function, summed in another order.

Positions past the end act as zero vectors (they add nothing to the sums); the bonus of a key
group with no valid token is 0. Non-causal blocks get -inf.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .budget import block_budgets, is_dense_budget
from .config import StemConfig
from .plan import BlockPlan, _cdiv, block_geometry
from .validation import on_device, validate_qkv

__all__ = [
    "plan", "PooledStats", "pool", "pool_torch", "register_pooling", "poolings", "block_logits",
    "logits_from_stats", "select_blocks", "plan_from_stats", "dense_plan", "block_row_sums",
    "group_max_value_norms", "bonus_from_group_max", "register_varlen_pooling", "pool_varlen_torch",
    "plan_varlen_batched", "plan_width", "register_planner", "register_selector", "select_blocks_on_device",
]

log = logging.getLogger("stem")


@dataclass
class PooledStats:
    """The planner's intermediate result: everything block selection needs from q, k and v.

    Attributes:
        q_sum: (B, Hq, nQ, S, D), float32 (float64 for float64 input): per query block, the sum
            over its ``bs/S`` stride groups of the group's S rows, rows reversed within the group
            (the antidiagonal). Rows outside the queries count as zero.
        k_sum: (B, Hkv, nK, S, D), same dtype: the same sums for key blocks, rows not reversed.
        v_max: (B, Hkv, nK * bs/S): per key stride group, the largest value-row norm
            ``max_j ||v_j||_2``; 0 for groups past the end.
        q_block_offset: absolute block index of query block 0.
        kv_len: Lk, the number of valid keys (the value bonus is standardised over them).

    A pooling kernel (see :func:`register_pooling`) computes these in one pass over q, k, v;
    context parallelism assembles ``k_sum`` and ``v_max`` from the ranks' shards. Selection
    (:func:`plan_from_stats`) is the same code for both.
    """

    q_sum: torch.Tensor
    k_sum: torch.Tensor
    v_max: torch.Tensor
    q_block_offset: int
    kv_len: int


PoolFn = Callable[..., PooledStats]  # fn(q, k, v, config, q_offset) -> PooledStats
_POOLINGS: dict[str, tuple[PoolFn, tuple[str, ...]]] = {}
PlanFn = Callable[..., tuple]  # fn(q, k, v, config, q_offset, n_total) -> (kv_counts, kv_indices)
_PLANNERS: dict[str, tuple[PlanFn, tuple[str, ...]]] = {}
SelectFn = Callable[..., tuple]  # fn(logits, config, q_block_offset, n_total) -> (kv_counts, kv_indices)
_SELECTORS: dict[str, tuple[SelectFn, tuple[str, ...]]] = {}
_PLUGINS_LOADED = False


def register_pooling(name: str, fn: PoolFn, device_types: tuple[str, ...] = ("cuda",)) -> None:
    """Register an accelerated pooling kernel for the planner.

    ``fn(q, k, v, config, q_offset)`` must return a :class:`PooledStats` equal to
    :func:`pool_torch` up to float32 summation order. ``pooling="auto"`` uses the first registered
    kernel for the tensors' device type.
    """
    _POOLINGS[name] = (fn, tuple(device_types))


def register_planner(name: str, fn: PlanFn, device_types: tuple[str, ...] = ("cuda",)) -> None:
    """Register a whole-planner kernel under the pooling name ``name``: ``fn(q, k, v, config,
    q_offset, n_total)`` returns int32 ``(kv_counts (B, Hq, nQ), kv_indices (B, Hq, nQ, W))`` equal
    to the torch planner's plan up to float32 rounding (logits within float32 error of each other
    may swap places at a row's budget boundary). It serves float16/bfloat16/float32 inputs and
    the default ranking; ``pooling=name`` uses it (register the pooling kernel of the same name
    too), and ``pooling="auto"`` uses the first one registered for the device (the first-party
    ``"triton"`` planner on CUDA)."""
    _PLANNERS[name] = (fn, tuple(device_types))


def register_selector(name: str, fn: SelectFn, device_types: tuple[str, ...] = ("cuda",)) -> None:
    """Register a selection kernel: ``fn(logits, config, q_block_offset, n_total)`` returns what
    :func:`select_blocks` returns (ties at a row's budget boundary may go either way). Plans
    from an opt-in ranking (``StemConfig.ranking``) select with the first one registered for the
    device, unless ``pooling="torch"``."""
    _SELECTORS[name] = (fn, tuple(device_types))


def select_blocks_on_device(logits: torch.Tensor, config: StemConfig, q_block_offset: int, n_total: int,
                            impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`select_blocks` through the first selection kernel registered for the logits' device
    (``impl="torch"``: the torch ops)."""
    if impl != "torch":
        poolings()  # loads the plugins (they register their selectors)
        hit = next((h for h in _SELECTORS.values() if logits.device.type in h[1]), None)
        if hit is not None and logits.dtype == torch.float32:
            return hit[0](logits, config, q_block_offset, n_total)
    return select_blocks(logits, config, q_block_offset, n_total)


def poolings() -> dict[str, tuple[PoolFn, tuple[str, ...]]]:
    """Registered pooling kernels by name (the first-party Triton kernel and ``stem.planners``
    entry-point plugins, loaded once)."""
    global _PLUGINS_LOADED
    if not _PLUGINS_LOADED:
        _PLUGINS_LOADED = True
        from importlib.metadata import entry_points

        from .dispatch import first_party

        loaders = [("triton", first_party().register_planners)]
        loaders += [(ep.name, ep) for ep in entry_points(group="stem.planners")]
        for name, loader in loaders:
            try:  # an entry point names a callable that registers its kernels through register_pooling
                (loader.load() if hasattr(loader, "load") else loader)()
            except Exception as e:  # a broken plugin must not break planning on other paths
                log.warning("planner plugin %r failed to load (%s); using the torch planner", name, e)
    return _POOLINGS


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def block_row_sums(x: torch.Tensor, front: int, n_blocks: int, bs: int, stride: int) -> torch.Tensor:
    """Sum rows of x (B, H, L, D), placed after ``front`` zero rows and zero-padded to
    ``n_blocks * bs`` rows, over the bs/S stride groups of each block: (B, H, n_blocks, S, D)
    in the accumulation dtype (float32; float64 for float64 input)."""
    B, H, L, D = x.shape
    total = n_blocks * bs
    if front or L != total:  # only misaligned lengths pay for a padded copy
        x = F.pad(x, (0, 0, front, total - front - L))
    return x.unflatten(2, (n_blocks, bs // stride, stride)).sum(3, dtype=_acc_dtype(x))


def group_max_value_norms(v: torch.Tensor, stride: int, n_groups: int) -> torch.Tensor:
    """max ||v_j||_2 over each stride group: (B, Hkv, n_groups), groups past the end are 0."""
    norms = torch.linalg.vector_norm(v, dim=-1, dtype=_acc_dtype(v))  # (B, Hkv, Lk)
    norms = F.pad(norms, (0, n_groups * stride - v.shape[2]))
    return norms.unflatten(-1, (-1, stride)).amax(-1)


def bonus_from_group_max(u: torch.Tensor, config: StemConfig, n_kv_blocks: int, kv_len: int) -> torch.Tensor:
    """Per-key-block mean of the value-norm bonus (B, Hkv, nK) from group max norms ``u``
    (B, Hkv, nK*bs/S): ``lambda * relu((log(u + 1e-6) - mean) / (std + 1e-6))`` standardised over
    the groups holding a valid token (Bessel's std, as torch.std); groups past the end get 0."""
    S = config.stride
    n_valid = _cdiv(kv_len, S)
    z = torch.log(u + 1e-6)
    zv = z[..., :n_valid]
    mean = zv.mean(-1, keepdim=True)
    std = zv.std(-1, keepdim=True) if n_valid > 1 else torch.zeros_like(mean)
    bonus = config.value_weight * torch.relu((z - mean) / (std + 1e-6))
    bonus = F.pad(bonus[..., :n_valid], (0, bonus.shape[-1] - n_valid))
    return bonus.unflatten(-1, (n_kv_blocks, config.block_size // S)).mean(-1)


def pool_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: StemConfig, q_offset: int | None = None
) -> PooledStats:
    """:class:`PooledStats` with torch ops (any device; the reference for pooling kernels).

    q: (B, Hq, Lq, D) at absolute positions [q_offset, q_offset + Lq) (default: the last Lq);
    k, v: (B, Hkv, Lk, D), the whole sequence.
    """
    Lq, Lk = q.shape[2], k.shape[2]
    bs, S = config.block_size, config.stride
    off = Lk - Lq if q_offset is None else q_offset
    qbo, nQ, nK = block_geometry(Lq, Lk, off, bs)
    q_sum = block_row_sums(q, off - qbo * bs, nQ, bs, S).flip(3)  # reversed within each group
    k_sum = block_row_sums(k, 0, nK, bs, S)
    v_max = group_max_value_norms(v, S, nK * (bs // S))
    return PooledStats(q_sum, k_sum, v_max, qbo, Lk)


def pool(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: StemConfig, q_offset: int | None = None,
    impl: str = "auto",
) -> PooledStats:
    """:class:`PooledStats` through ``impl`` ("torch", a registered kernel name, or "auto": the
    first registered kernel for the device, else torch)."""
    q_offset = k.shape[2] - q.shape[2] if q_offset is None else q_offset
    if impl == "torch":
        return pool_torch(q, k, v, config, q_offset)
    impls = poolings()
    if impl == "auto":
        for fn, devs in impls.values():
            if q.device.type in devs:
                return fn(q, k, v, config, q_offset)
        return pool_torch(q, k, v, config, q_offset)
    if impl not in impls:
        raise ValueError(f"unknown planner pooling {impl!r}; available: {['auto', 'torch', *impls]}")
    return impls[impl][0](q, k, v, config, q_offset)


def logits_from_stats(stats: PooledStats, config: StemConfig) -> torch.Tensor:
    """Block logits (B, Hq, nQ, nK) from pooled statistics, -inf on non-causal blocks:
    ``scale / (bs/S)^2 * <q_sum, k_sum> + mean bonus of the key block``."""
    q_sum, k_sum = stats.q_sum, stats.k_sum
    B, Hq, nQ, S, D = q_sum.shape
    Hkv, nK = k_sum.shape[1], k_sum.shape[2]
    G = Hq // Hkv
    bs = config.block_size
    bonus = bonus_from_group_max(stats.v_max, config, nK, stats.kv_len)
    scale = 1.0 / (math.sqrt(D) * S * config.norm) / (bs // S) ** 2
    qs = q_sum.reshape(B, Hkv, G * nQ, S * D)
    ks = k_sum.reshape(B, Hkv, nK, S * D)
    logits = torch.matmul(qs, ks.transpose(-1, -2)).mul_(scale)  # (B, Hkv, G*nQ, nK)
    logits.view(B, Hkv, G, nQ, nK).add_(bonus[:, :, None, None, :].to(logits.dtype))
    logits = logits.view(B, Hq, nQ, nK)
    rows = torch.arange(nQ, device=q_sum.device) + stats.q_block_offset
    noncausal = torch.arange(nK, device=q_sum.device)[None, :] > rows[:, None]
    return logits.masked_fill_(noncausal, float("-inf"))


def block_logits(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: StemConfig, q_offset: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Block logits (B, Hq, nQ, nK), float32 (float64 for float64 input), -inf where non-causal:
    :func:`logits_from_stats` of :func:`pool`. Shapes as in :func:`stem.plan`."""
    return logits_from_stats(pool(q, k, v, config, q_offset, impl), config)


def select_blocks(
    logits: torch.Tensor, config: StemConfig, q_block_offset: int, n_total: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position-decayed top-k + sinks + window (docs/method.md, "Selection"), on the logits' device.

    logits: (B, Hq, nQ, nK) with -inf on non-causal blocks; query block i is absolute block
    ``q_block_offset + i`` of a sequence of ``n_total`` blocks. Returns int32 ``kv_counts``
    (B, Hq, nQ) and ``kv_indices`` (B, Hq, nQ, W). No host-device synchronisation: budgets come
    from shapes only.
    """
    B, H, nQ, nK = logits.shape
    keep, forced, kmax = _row_templates(config, n_total, q_block_offset, nQ, nK, logits.device)
    # Candidates per row: the top-kmax blocks (kept where rank < min(budget, causal blocks), so every
    # kept one is causal), then the sinks and the window. Everything stays (B, H, nQ, kmax + sinks +
    # window): no dense (nQ, nK) intermediate besides the logits themselves.
    top = torch.topk(logits, kmax, dim=-1, sorted=True).indices  # (B, H, nQ, kmax) int64
    cand = torch.cat([torch.where(keep, top, nK), forced.expand(B, H, nQ, -1)], dim=-1)
    cand = torch.sort(cand, dim=-1).values
    dup = cand[..., 1:] == cand[..., :-1]
    cand[..., 1:].masked_fill_(dup, nK)  # duplicates (a top-k pick that is also a sink/window) out
    cand = torch.sort(cand, dim=-1).values[..., : min(nK, kmax + config.sink_blocks + config.window_blocks)]
    valid = cand < nK
    return valid.sum(-1, dtype=torch.int32), torch.where(valid, cand, 0).to(torch.int32)


_TEMPLATE_CACHE: dict = {}


def _row_templates(config: StemConfig, n_total: int, q_block_offset: int, nQ: int, nK: int, dev):
    """Per query block, from shapes alone (cached per device, so repeated calls and CUDA-graph
    capture after a warm-up call do no host-to-device copy):

    * ``keep`` bool (nQ, kmax): top-k rank r is kept iff r < min(budget_i, causal blocks of i);
    * ``forced`` int64 (nQ, sinks + window): sink and window blocks, nK where not causal/valid;
    * ``kmax``: the largest budget (top-k width).
    """
    key = (n_total, float(config.alpha), float(config.k_rate), int(config.k_bias), config.sink_blocks,
           config.window_blocks, q_block_offset, nQ, nK, str(dev))
    hit = _TEMPLATE_CACHE.get(key)
    if hit is None:
        budgets = torch.tensor(
            block_budgets(n_total, config.alpha, config.k_rate, config.k_bias)[q_block_offset : q_block_offset + nQ]
        )
        rows = torch.arange(nQ) + q_block_offset  # absolute query block
        kmax = min(int(budgets.max()), nK)
        keep = torch.arange(kmax)[None, :] < torch.minimum(budgets, rows + 1)[:, None]
        forced = torch.cat(
            [
                torch.arange(config.sink_blocks).expand(nQ, -1),
                rows[:, None] - torch.arange(config.window_blocks - 1, -1, -1),
            ],
            dim=-1,
        )
        forced = torch.where((forced >= 0) & (forced <= rows[:, None]), forced, nK)
        if len(_TEMPLATE_CACHE) > 512:
            _TEMPLATE_CACHE.clear()
        hit = _TEMPLATE_CACHE[key] = (keep.to(dev), forced.to(dev), kmax)
    return hit


def plan_width(q_len: int, kv_len: int, q_offset: int, config: StemConfig) -> int:
    """W, the last dimension of the plan :func:`plan` makes for these lengths (host arithmetic; the
    compiled path's fake planner uses it)."""
    bs = config.block_size
    qbo, nQ, nK = block_geometry(q_len, kv_len, q_offset, bs)
    n_total = _cdiv(kv_len, bs)
    if config.dense or is_dense_budget(n_total, config.k_rate, config.k_bias):
        return nK
    kmax = min(max(block_budgets(n_total, config.alpha, config.k_rate, config.k_bias)[qbo : qbo + nQ]), nK)
    return min(nK, kmax + config.sink_blocks + config.window_blocks)


def dense_plan(
    batch: int, heads: int, q_len: int, kv_len: int, block_size: int, device, config: StemConfig | None = None,
    q_offset: int | None = None,
) -> BlockPlan:
    """A plan that keeps every causal block (what a dense layer or a short input gets)."""
    q_offset = kv_len - q_len if q_offset is None else q_offset
    qbo, nQ, nK = block_geometry(q_len, kv_len, q_offset, block_size)
    rows = torch.arange(nQ, device=device) + qbo
    cols = torch.arange(nK, device=device)
    counts = (rows + 1).to(torch.int32).expand(batch, heads, nQ).contiguous()
    idx = torch.where(cols[None, :] <= rows[:, None], cols[None, :], 0).to(torch.int32)
    indices = idx.expand(batch, heads, nQ, nK).contiguous()
    return BlockPlan(counts, indices, block_size, q_len, kv_len, config, dense=True, q_offset=q_offset,
                     _trusted=True)


_DENSE_CACHE: dict = {}


def cached_dense_plan(
    batch: int, heads: int, q_len: int, kv_len: int, block_size: int, device, config: StemConfig | None = None,
    q_offset: int | None = None,
) -> BlockPlan:
    """:func:`dense_plan`, cached per geometry, device and config (no launch and no object after
    the first call). For plans that stay internal (the dense shortcut of ``stem.attention``): a
    caller that hands the plan out must make a fresh one, or in-place edits would reach the cache."""
    key = (batch, heads, q_len, kv_len, block_size, str(device), q_offset, config)
    hit = _DENSE_CACHE.get(key)
    if hit is None:
        if len(_DENSE_CACHE) >= 8:
            _DENSE_CACHE.clear()
        hit = _DENSE_CACHE[key] = dense_plan(batch, heads, q_len, kv_len, block_size, device, config, q_offset)
    return hit


def plan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: StemConfig | None = None,
    *,
    q_offset: int | None = None,
    pooling: str = "auto",
) -> BlockPlan:
    """Plan Stem sparse attention.

    Args:
        q: (B, Hq, Lq, D) queries at absolute positions [q_offset, q_offset + Lq).
        k, v: (B, Hkv, Lk, D), Hq % Hkv == 0 (GQA: query head h reads kv head h // (Hq // Hkv)).
        config: StemConfig (default: the paper's).
        q_offset: absolute position of query 0; default Lk - Lq (the last Lq positions: Lq == Lk
            is prefill, Lq < Lk chunked prefill). Budgets use n = ceil(Lk / block_size) blocks and
            the value bonus is standardised over all Lk keys, so a plan for a chunk of queries
            equals those rows of the plan for the whole sequence.
        pooling: the kernel that computes the planner's :class:`PooledStats`: "auto" (an
            accelerated kernel where one is registered for the device, else torch), "torch", or
            a registered name (see :func:`poolings`). A name with a whole-planner kernel
            (:func:`register_planner`) runs that instead; on CUDA, "auto" and ``"triton"`` plan
            in four Triton kernels with no host synchronisation (the torch planner's plan up to
            float32 near-ties at a row's budget boundary).

    Returns:
        BlockPlan on q's device with int32 kv_counts (B, Hq, nQ), kv_indices (B, Hq, nQ, W).
    """
    config = StemConfig() if config is None else config
    validate_qkv(q, k, v, config=config, q_offset=q_offset)
    return plan_validated(q, k, v, config, q_offset=q_offset, pooling=pooling)


def plan_from_stats(stats: PooledStats, config: StemConfig, q_len: int, q_offset: int, n_total: int) -> BlockPlan:
    """Select blocks from pooled statistics: the plan for ``q_len`` queries at absolute
    ``q_offset`` against ``stats.kv_len`` keys, with budgets for a sequence of ``n_total`` blocks."""
    if config.ranking != "stem":
        raise ValueError(f"StemConfig.ranking={config.ranking!r} needs q and k, not pooled statistics: plan with "
                         "stem.plan (for context parallelism, the planner that gathers K)")
    counts, indices = select_blocks(logits_from_stats(stats, config), config, stats.q_block_offset, n_total)
    return BlockPlan(counts, indices, config.block_size, q_len, stats.kv_len, config, dense=False, q_offset=q_offset,
                     _trusted=True)


def plan_validated(q, k, v, config: StemConfig, *, q_offset: int | None = None, pooling: str = "auto") -> BlockPlan:
    """:func:`plan` for inputs that :func:`stem.validation.validate_qkv` already accepted."""
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    q_offset = Lk - Lq if q_offset is None else q_offset
    bs = config.block_size
    n_total = _cdiv(Lk, bs)
    if config.dense or is_dense_budget(n_total, config.k_rate, config.k_bias):
        return dense_plan(B, Hq, Lq, Lk, bs, q.device, config, q_offset)
    with torch.no_grad(), on_device(q):
        if config.ranking != "stem":  # an opt-in ranking (stem/ranking.py): same budgets, other scores
            from .ranking import plan_ranked
            return plan_ranked(q, k, v, config, q_offset, n_total, "torch" if pooling == "torch" else "auto")
        fused = _fused_planner(q, pooling)
        if fused is not None:  # the whole planner in a few kernels (no logits -> torch.topk round trip)
            counts, indices = fused(q, k, v, config, q_offset, n_total)
            return BlockPlan(counts, indices, bs, Lq, Lk, config, dense=False, q_offset=q_offset, _trusted=True)
        return plan_from_stats(pool(q, k, v, config, q_offset, pooling), config, Lq, q_offset, n_total)


def _fused_planner(q: torch.Tensor, pooling: str) -> PlanFn | None:
    """The registered whole-planner kernel for ``pooling`` on q's device, or None (float64 input
    keeps the torch planner: the kernels compute in float32)."""
    if pooling == "torch" or q.dtype == torch.float64:
        return None
    poolings()  # loads the plugins (they register their planners)
    if pooling == "auto":  # the first registered whole-planner kernel for q's device
        hit = next((h for h in _PLANNERS.values() if q.device.type in h[1]), None)
    else:
        hit = _PLANNERS.get(pooling)
    return hit[0] if hit is not None and q.device.type in hit[1] else None


# ---- packed variable-length batches (stem.varlen) --------------------------------------------------
VarlenPoolFn = Callable[..., tuple]  # fn(q, k, v, seqs, nQ, nK, config) -> (q_sum, k_sum, v_max)
_VARLEN_POOLINGS: dict[str, tuple[VarlenPoolFn, tuple[str, ...]]] = {}


def register_varlen_pooling(name: str, fn: VarlenPoolFn, device_types: tuple[str, ...] = ("cuda",)) -> None:
    """Register a pooling kernel for packed batches: ``fn(q, k, v, seqs, nQ, nK, config)``, with
    ``seqs`` a list of ``(q_start, len_q, k_start, len_k)`` rows of the packed q (T, Hq, D) and k/v
    (T, Hkv, D), returns padded ``(q_sum (B, Hq, nQ, S, D), k_sum (B, Hkv, nK, S, D), v_max
    (B, Hkv, nK * bs/S))``, each sequence's part equal to :func:`pool_torch` of that sequence alone
    and zero elsewhere."""
    _VARLEN_POOLINGS[name] = (fn, tuple(device_types))


def pool_varlen_torch(q, k, v, seqs, nQ: int, nK: int, config: StemConfig):
    """The varlen pooling with torch ops, one sequence at a time (the reference for kernels)."""
    B, Hq, Hkv, D = len(seqs), q.shape[1], k.shape[1], q.shape[2]
    bs, S = config.block_size, config.stride
    acc = _acc_dtype(q)
    q_sum = torch.zeros(B, Hq, nQ, S, D, dtype=acc, device=q.device)
    k_sum = torch.zeros(B, Hkv, nK, S, D, dtype=acc, device=q.device)
    v_max = torch.zeros(B, Hkv, nK * (bs // S), dtype=acc, device=q.device)
    for b, (a_q, lq, a_k, lk) in enumerate(seqs):
        if lq:
            st = pool_torch(q[a_q : a_q + lq].transpose(0, 1)[None], k[a_k : a_k + lk].transpose(0, 1)[None],
                            v[a_k : a_k + lk].transpose(0, 1)[None], config)
            q_sum[b, :, : st.q_sum.shape[2]] = st.q_sum[0]
            k_sum[b, :, : st.k_sum.shape[2]] = st.k_sum[0]
            v_max[b, :, : st.v_max.shape[2]] = st.v_max[0]
    return q_sum, k_sum, v_max


def _varlen_templates(config: StemConfig, lens, dense, nQ: int, nK: int, dev):
    """Per (sequence, row) ``keep`` bool (B, nQ, kmax) and ``forced`` int64 (B, nQ, sinks + window)
    (sentinel nK) and the top-k width ``kmax``: the single-sequence templates of each sequence,
    padded. Host arithmetic, one host-to-device copy, cached per batch geometry."""
    from .varlen import _seq_geometry

    key = ("varlen", config, tuple(lens), tuple(dense), nQ, nK, str(dev))
    hit = _TEMPLATE_CACHE.get(key)
    if hit is not None:
        return hit
    bs = config.block_size
    F_ = config.sink_blocks + config.window_blocks
    parts = []
    for (lq, lk), dn in zip(lens, dense):
        off, qbo, nq, nk = _seq_geometry(lq, lk, bs)
        if nq == 0:
            parts.append(None)
            continue
        rows = torch.arange(nq) + qbo
        if dn:  # every causal block: rank r kept iff r <= row
            kmax_b = nk
            keep = torch.arange(kmax_b)[None, :] < (rows + 1)[:, None]
            forced = torch.full((nq, F_), nK, dtype=torch.int64)
        else:
            keep, forced, kmax_b = _row_templates(config, nk, qbo, nq, nk, torch.device("cpu"))
            forced = torch.where(forced >= nk, nK, forced)
        parts.append((keep, forced, nq))
    kmax = max([p[0].shape[1] for p in parts if p is not None], default=1)
    B = len(lens)
    keep_all = torch.zeros(B, nQ, kmax, dtype=torch.bool)
    forced_all = torch.full((B, nQ, F_), nK, dtype=torch.int64)
    for b, p in enumerate(parts):
        if p is not None:
            keep, forced, nq = p
            keep_all[b, :nq, : keep.shape[1]] = keep
            forced_all[b, :nq] = forced
    if len(_TEMPLATE_CACHE) > 512:
        _TEMPLATE_CACHE.clear()
    hit = _TEMPLATE_CACHE[key] = (keep_all.to(dev), forced_all.to(dev), kmax)
    return hit


def _varlen_bonus(v_max: torch.Tensor, config: StemConfig, nK: int, kv_lens: torch.Tensor) -> torch.Tensor:
    """:func:`bonus_from_group_max` per sequence: (B, Hkv, nK), standardised over each sequence's
    own valid groups (``ceil(len_k / S)``)."""
    S = config.stride
    G = v_max.shape[-1]
    n_valid = (kv_lens + S - 1) // S  # (B,)
    m = (torch.arange(G, device=v_max.device)[None, :] < n_valid[:, None])[:, None, :]  # (B, 1, G)
    z = torch.log(v_max + 1e-6)
    n = n_valid.to(z.dtype)[:, None, None]
    mean = torch.where(m, z, 0).sum(-1, keepdim=True) / n.clamp(min=1)
    var = torch.where(m, (z - mean) ** 2, 0).sum(-1, keepdim=True) / (n - 1).clamp(min=1)
    std = torch.where(n > 1, var.sqrt(), 0)
    bonus = torch.where(m, config.value_weight * torch.relu((z - mean) / (std + 1e-6)), 0)
    return bonus.unflatten(-1, (nK, config.block_size // S)).mean(-1)


def plan_varlen_batched(q, k, v, cu_q, lens, dense, nQ: int, W: int, config: StemConfig, pooling: str = "auto"):
    """All sequences of a packed batch planned together. Rows of dense sequences are written
    directly (every causal block); the sparse sequences are planned in size classes (lengths within
    2x of the class's longest: at most log2(longest / shortest) + 1 classes, however many
    sequences), each with one pooling pass (a registered varlen kernel on the device, else torch per
    sequence), one block-logit GEMM over its padded pooled statistics and one selection with each
    sequence's own budgets, sinks and window. Returns int32 ``(kv_counts (B, Hq, nQ), kv_indices
    (B, Hq, nQ, W))``. Equal per sequence to :func:`plan` up to float32 summation order (ties at
    the budget boundary may break differently)."""
    from .varlen import _seq_geometry

    B, Hq = len(lens), q.shape[1]
    dev, bs = q.device, config.block_size
    geo = [_seq_geometry(lq, lk, bs) for lq, lk in lens]
    counts = torch.zeros(B, Hq, nQ, dtype=torch.int32, device=dev)
    indices = torch.zeros(B, Hq, nQ, W, dtype=torch.int32, device=dev)
    if B == 0 or nQ == 0:
        return counts, indices
    if any(dense):  # every causal block, written from shapes on the device
        qbo = torch.tensor([g[1] for g in geo], device=dev)
        n_rows = torch.tensor([g[2] if d else 0 for g, d in zip(geo, dense)], device=dev)
        row = torch.arange(nQ, device=dev)[None, :]
        dcount = torch.where(row < n_rows[:, None], row + qbo[:, None] + 1, 0)  # (B, nQ)
        slot = torch.arange(W, device=dev)
        counts.copy_(dcount[:, None].expand(B, Hq, nQ))
        indices.copy_(torch.where(slot < dcount[..., None], slot, 0)[:, None].expand(B, Hq, nQ, W))
    fn = _varlen_pooling(q, dev, pooling)
    starts, a_q, a_k = [], 0, 0
    for lq, lk in lens:
        starts.append((a_q, lq, a_k, lk))
        a_q, a_k = a_q + lq, a_k + lk
    sparse = sorted((b for b in range(B) if not dense[b] and lens[b][0] > 0), key=lambda b: -geo[b][3])
    while sparse:  # one pass per size class
        top_nk = geo[sparse[0]][3]
        group = [b for b in sparse if 2 * geo[b][3] > top_nk]
        sparse = sparse[len(group):]
        c, i = _plan_group(q, k, v, [starts[b] for b in group], [geo[b] for b in group], W, config, fn)
        at = torch.tensor(group, device=dev)
        counts.index_copy_(0, at, F.pad(c, (0, nQ - c.shape[2])))
        indices.index_copy_(0, at, F.pad(i, (0, W - i.shape[3], 0, nQ - i.shape[2])))
    return counts, indices


def _varlen_pooling(q, dev, pooling: str):
    if pooling == "auto":
        if q.dtype == torch.float64:
            return pool_varlen_torch
        poolings()  # loads the first-party kernels (they register their varlen variants too)
        return next((f for f, devs in _VARLEN_POOLINGS.values() if dev.type in devs), pool_varlen_torch)
    if pooling == "torch":
        return pool_varlen_torch
    poolings()
    if pooling not in _VARLEN_POOLINGS:
        raise ValueError(f"unknown varlen planner pooling {pooling!r}; available: "
                         f"{['auto', 'torch', *_VARLEN_POOLINGS]}")
    return _VARLEN_POOLINGS[pooling][0]


def _plan_group(q, k, v, seqs, geo, W: int, config: StemConfig, fn):
    """(counts (G, Hq, nQg), indices (G, Hq, nQg, <= W)) of sparse sequences ``seqs`` planned
    together on their padded (nQg, nKg) grid."""
    G_, Hq, D = len(seqs), q.shape[1], q.shape[2]
    Hkv = k.shape[1]
    dev, bs, S = q.device, config.block_size, config.stride
    nQ, nK = max(g[2] for g in geo), max(g[3] for g in geo)
    q_sum, k_sum, v_max = fn(q, k, v, seqs, nQ, nK, config)
    G = Hq // Hkv
    kv_lens = torch.tensor([s[3] for s in seqs], device=dev)
    bonus = _varlen_bonus(v_max, config, nK, kv_lens)  # (G_, Hkv, nK)
    scale = 1.0 / (math.sqrt(D) * S * config.norm) / (bs // S) ** 2
    logits = torch.matmul(q_sum.reshape(G_, Hkv, G * nQ, S * D), k_sum.reshape(G_, Hkv, nK, S * D).transpose(-1, -2))
    logits.mul_(scale).view(G_, Hkv, G, nQ, nK).add_(bonus[:, :, None, None, :].to(logits.dtype))
    logits = logits.view(G_, Hq, nQ, nK)
    qbo = torch.tensor([g[1] for g in geo], device=dev)
    rows = torch.arange(nQ, device=dev)[None, :] + qbo[:, None]  # (G_, nQ) absolute block
    noncausal = torch.arange(nK, device=dev)[None, None, :] > rows[:, :, None]  # (G_, nQ, nK)
    logits.masked_fill_(noncausal[:, None], float("-inf"))
    lens = [(s[1], s[3]) for s in seqs]
    keep, forced, kmax = _varlen_templates(config, lens, [False] * G_, nQ, nK, dev)
    if min(nK, kmax + forced.shape[-1]) > W:  # host arithmetic: a row could need more slots than the plan has
        raise RuntimeError(f"stem internal error: varlen plan width {W} < {min(nK, kmax + forced.shape[-1])} "
                           f"needed by the batch's budgets; please report this with the sequence lengths")
    top = torch.topk(logits, min(kmax, nK), dim=-1, sorted=True).indices
    keep = keep[..., : top.shape[-1]]
    cand = torch.cat([torch.where(keep[:, None], top, nK), forced[:, None].expand(G_, Hq, nQ, -1)], dim=-1)
    cand = torch.sort(cand, dim=-1).values
    cand[..., 1:].masked_fill_(cand[..., 1:] == cand[..., :-1], nK)
    cand = torch.sort(cand, dim=-1).values[..., :W]
    valid = cand < nK
    return valid.sum(-1, dtype=torch.int32), torch.where(valid, cand, 0).to(torch.int32)
