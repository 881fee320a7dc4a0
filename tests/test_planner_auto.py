"""backend="auto"'s dense/sparse decision: the measured crossover table, its lookup, the override."""

import pytest
import torch

import stem
import stem.api as api
from stem.budget import min_density


def test_threshold_lookup_takes_the_nearest_calibrated_shape(monkeypatch):
    table = {"triton": {(64, 1, 32): 0.3, (64, 8, 32): 0.4, (64, 8, 16): 0.35, (128, 1, 32): 0.5, (128, 4, 32): 0.6,
                        (256, 4, 32): 0.7},
             "hub": {(128, 4, 32): 0.2}}
    monkeypatch.setattr(api, "_CROSSOVER", table)
    assert api.auto_dense_threshold("triton", 128, 4) == 0.6
    assert api.auto_dense_threshold("triton", 96, 3) == 0.6      # log-nearest: 96 -> 128, 3 -> 4
    assert api.auto_dense_threshold("triton", 80, 16) == 0.4     # 80 -> 64, 16 -> 8
    assert api.auto_dense_threshold("triton", 512, 1) == 0.7     # only G 4 is calibrated at 256
    assert api.auto_dense_threshold("hub", 64, 1) == 0.2
    assert api.auto_dense_threshold("someone_elses", 128, 1) == 0.5  # falls back to the Triton row
    # heads: the nearest calibrated head count first, then the GQA ratios calibrated there
    assert api.auto_dense_threshold("triton", 64, 7, heads=14) == 0.35
    assert api.auto_dense_threshold("triton", 64, 8, heads=64) == 0.4
    assert api.auto_dense_threshold("triton", 64, 1, heads=12) == 0.35  # only G 8 is calibrated at 16 heads


def test_decision_uses_the_table_and_the_config_overrides_it(monkeypatch):
    cfg = stem.StemConfig()
    n = 128  # 16K tokens
    d = min_density(n, cfg.alpha, cfg.k_rate, cfg.k_bias)
    monkeypatch.setattr(api, "_CROSSOVER", {"triton": {(128, 4, 32): d - 0.01}, "hub": {(128, 4, 32): d + 0.01}})
    why = api.auto_dense_reason("cuda", 16384, 16384, cfg, head_dim=128, gqa=4, executor="triton")
    assert why is not None and "measured for triton" in why
    assert api.auto_dense_reason("cuda", 16384, 16384, cfg, head_dim=128, gqa=4, executor="hub") is None
    assert api.auto_dense_reason("cpu", 16384, 16384, cfg, executor="triton") is None
    assert api.auto_dense_reason("cuda", 16384, 16384, cfg.replace(auto_dense_above=2.0), executor="triton") is None
    why = api.auto_dense_reason("cuda", 16384, 16384, cfg.replace(auto_dense_above=d - 0.02), executor="hub")
    assert why is not None and "StemConfig.auto_dense_above" in why


def test_committed_table_covers_every_calibrated_shape():
    for ex, rows in api._CROSSOVER.items():
        assert {(d, g, 32) for d in (64, 128, 256) for g in (1, 4, 8)} <= set(rows), ex
        assert all(0.0 < v <= 1.0 for v in rows.values()), rows


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_auto_dense_above_is_checked(bad):
    with pytest.raises(ValueError, match="auto_dense_above"):
        stem.StemConfig(auto_dense_above=bad)


def test_cached_dense_plan_is_the_dense_plan():
    from stem.planner import cached_dense_plan, dense_plan

    a = cached_dense_plan(2, 3, 500, 700, 64, torch.device("cpu"))
    b = dense_plan(2, 3, 500, 700, 64, torch.device("cpu"))
    assert a.dense and torch.equal(a.kv_counts, b.kv_counts) and torch.equal(a.kv_indices, b.kv_indices)
    assert a.q_offset == b.q_offset == 200
    assert cached_dense_plan(2, 3, 500, 700, 64, torch.device("cpu")) is a  # nothing new is made


def test_decision_names_the_head_count_it_used(monkeypatch):
    cfg = stem.StemConfig()
    d = min_density(128, cfg.alpha, cfg.k_rate, cfg.k_bias)  # 16K tokens
    # sparse at 32 heads, dense at 16: the planner's fixed cost weighs more with fewer heads
    monkeypatch.setattr(api, "_CROSSOVER", {"triton": {(64, 8, 32): d + 0.05, (64, 8, 16): d - 0.05}})
    assert api.auto_dense_reason("cuda", 16384, 16384, cfg, head_dim=64, gqa=7, heads=32) is None
    why = api.auto_dense_reason("cuda", 16384, 16384, cfg, head_dim=64, gqa=7, heads=14)
    assert why is not None and "16 heads" not in why and "14 heads" in why
