"""Stem configuration: a plain, validated, immutable dataclass."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

__all__ = ["StemConfig", "RANKINGS"]

RANKINGS = ("stem", "sampled_mass", "qmean_lse")  # block scores for selection (stem.ranking); "stem" is the paper's


@dataclass(frozen=True)
class StemConfig:
    """Hyper-parameters of Stem sparse attention (defaults: the paper's shipped config).

    Attributes:
        block_size: tokens per query/key block (power of two in [16, 256], multiple of ``stride``).
        stride: ``S``, the antidiagonal stride of the scoring step.
        alpha: Token Position-Decay factor; the last query block keeps ``alpha`` of the base
            budget (1.0 = no decay). May differ per layer (build one config per layer).
        k_rate, k_bias: base budget ``k0 = floor(k_rate * n) + k_bias`` for ``n >= 160`` blocks.
        sink_blocks: leading key blocks always kept.
        window_blocks: key blocks always kept ending at the diagonal (blocks ``i-w+1 .. i``).
        value_weight: ``lambda``, weight of the value-norm bonus.
        norm: extra divisor of the score scale ``1 / (sqrt(D) * S * norm)``.
        dense: keep every causal block (a dense layer).
        auto_dense_above: ``backend="auto"`` on CUDA runs exact dense attention instead of
            planning when the budgets alone keep at least this fraction of the causal blocks.
            None (default): the crossover measured per sparse executor, head dim, query heads
            in the call and GQA ratio (``stem.api.auto_dense_threshold``). It never changes a
            plan; values above 1 switch it off.
        ranking: the score that ranks key blocks inside each query block's budget. ``"stem"``
            (default): the paper's output-aware metric. Opt-in, not in the paper (see
            ``stem.ranking``): ``"sampled_mass"``, the exact softmax mass that ``sampled_rows``
            sampled query rows of the block put on each key block; ``"qmean_lse"``, the
            log-sum-exp over each key block's keys of the block-mean query's scores. Budgets,
            sinks and window are the same whichever ranks.
        sampled_rows: query rows sampled per query block by ``ranking="sampled_mass"`` (a power
            of two, at most the block size; default 4). More rows rank closer to the true block
            mass and cost proportionally more planning (README: quality on real models, recommended
            settings). Only with that ranking.
    """

    block_size: int = 128
    stride: int = 8
    alpha: float = 0.7
    k_rate: float = 0.1
    k_bias: int = 30
    sink_blocks: int = 4
    window_blocks: int = 4
    value_weight: float = 0.2
    norm: float = 1.0
    dense: bool = False
    auto_dense_above: float | None = None
    ranking: str = "stem"
    sampled_rows: int = 4

    def __post_init__(self) -> None:
        for name in ("block_size", "stride", "k_bias", "sink_blocks", "window_blocks", "sampled_rows"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int):
                raise TypeError(f"StemConfig.{name} must be an int, got {type(val).__name__} ({val!r})")
        for name in ("alpha", "k_rate", "value_weight", "norm", "auto_dense_above"):
            val = getattr(self, name)
            if val is None and name == "auto_dense_above":
                continue
            if isinstance(val, bool) or not isinstance(val, (int, float)):
                raise TypeError(f"StemConfig.{name} must be a float, got {type(val).__name__} ({val!r})")
            if not math.isfinite(val):
                raise ValueError(f"StemConfig.{name} must be finite, got {val!r}")
        if self.ranking not in RANKINGS:
            raise ValueError(f"StemConfig.ranking must be one of {RANKINGS}, got {self.ranking!r}")
        if not isinstance(self.dense, bool):
            raise TypeError(f"StemConfig.dense must be a bool, got {self.dense!r}")
        bs, s = self.block_size, self.stride
        if not (16 <= bs <= 256) or bs & (bs - 1):
            raise ValueError(f"StemConfig.block_size must be a power of two in [16, 256], got {bs}")
        if s < 1 or bs % s:
            raise ValueError(
                f"StemConfig.block_size ({bs}) must be a multiple of stride ({s}); "
                f"pick a stride that divides the block size, e.g. stride=8"
            )
        if not (0.0 < self.alpha <= 1.0):
            raise ValueError(f"StemConfig.alpha must be in (0, 1], got {self.alpha}")
        if self.k_rate < 0 or self.k_bias < 0:
            raise ValueError(f"StemConfig.k_rate and k_bias must be >= 0, got {self.k_rate}, {self.k_bias}")
        if self.sink_blocks < 0 or self.window_blocks < 1:
            raise ValueError(
                f"StemConfig.sink_blocks must be >= 0 and window_blocks >= 1 (the diagonal block), "
                f"got {self.sink_blocks}, {self.window_blocks}"
            )
        if self.value_weight < 0:
            raise ValueError(f"StemConfig.value_weight must be >= 0, got {self.value_weight}")
        if self.norm <= 0:
            raise ValueError(f"StemConfig.norm must be > 0, got {self.norm}")
        n = self.sampled_rows
        if not (1 <= n <= bs) or n & (n - 1):
            raise ValueError(f"StemConfig.sampled_rows must be a power of two in [1, block_size={bs}], got {n}")
        if n != 4 and self.ranking != "sampled_mass":
            raise ValueError(f"StemConfig.sampled_rows={n} applies to ranking='sampled_mass' only (ranking is "
                             f"{self.ranking!r}): leave it at 4 or set ranking='sampled_mass'")
        if self.auto_dense_above is not None and self.auto_dense_above <= 0:
            raise ValueError(f"StemConfig.auto_dense_above must be > 0 (above 1 switches it off), got "
                             f"{self.auto_dense_above}")

    def replace(self, **changes) -> StemConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> StemConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown StemConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> StemConfig:
        return cls.from_dict(json.loads(s))
