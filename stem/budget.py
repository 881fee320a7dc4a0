"""Token Position-Decay budgets (docs/method.md, "Budget"). Pure host arithmetic on shapes."""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

__all__ = ["base_budget", "block_budgets", "is_dense_budget", "min_density"]

# Fixed by the method (the authors' release), not user-tunable.
_DENSE_BELOW = 56
_MID_BELOW = 160
_MID_RATE = 0.2
_MID_BIAS = 30


def base_budget(n: int, k_rate: float = 0.1, k_bias: int = 30) -> int:
    """Base budget ``k0`` for a sequence of ``n`` query blocks."""
    if n < _DENSE_BELOW:
        return n
    if n < _MID_BELOW:
        return int(math.floor(_MID_RATE * n + _MID_BIAS))
    return int(math.floor(k_rate * n)) + int(k_bias)


@lru_cache(maxsize=256)
def _budgets(n: int, alpha: float, k_rate: float, k_bias: int) -> tuple[int, ...]:
    k0 = base_budget(n, k_rate, k_bias)
    if k0 >= n:
        return tuple([n] * n)
    # real host tensors even when called under a fake-tensor mode (torch.compile's shape pass)
    with unset_fake_temporarily():
        r = torch.linspace(k0, alpha * k0, n - k0, dtype=torch.float64, device="cpu")
        decayed = torch.clamp(torch.floor(r), 1, k0).to(torch.int64).tolist()
    return tuple([k0] * k0 + decayed)


def block_budgets(n: int, alpha: float = 0.7, k_rate: float = 0.1, k_bias: int = 30) -> list[int]:
    """Top-k budget ``k_i`` of each of the ``n`` query blocks (0-based), before sinks and window.

    Blocks ``i < k0`` get ``k0`` (all their causal blocks fit); later blocks get
    ``clamp(floor(linspace(k0, alpha*k0, n-k0)[i-k0]), 1, k0)``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return list(_budgets(int(n), float(alpha), float(k_rate), int(k_bias)))


def is_dense_budget(n: int, k_rate: float = 0.1, k_bias: int = 30) -> bool:
    """True when the budget keeps every causal block of every query block."""
    return base_budget(n, k_rate, k_bias) >= n


@lru_cache(maxsize=256)
def min_density(
    n: int, alpha: float, k_rate: float, k_bias: int, row_start: int = 0, row_end: int | None = None
) -> float:
    """Lower bound of a plan's density from the budgets alone (before sinks and window), over
    query blocks [row_start, row_end) of an n-block sequence: sum min(k_i, i+1) / sum (i+1)."""
    row_end = n if row_end is None else row_end
    b = block_budgets(n, alpha, k_rate, k_bias)
    kept = sum(min(b[i], i + 1) for i in range(row_start, row_end))
    causal = sum(i + 1 for i in range(row_start, row_end))
    return kept / causal if causal else 1.0
