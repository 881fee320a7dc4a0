import pytest

from stem.budget import base_budget, block_budgets, is_dense_budget


@pytest.mark.parametrize(
    "n,k0", [(1, 1), (40, 40), (55, 55), (56, 41), (100, 50), (159, 61), (160, 46), (200, 50), (1024, 132)]
)
def test_base_budget(n, k0):
    assert base_budget(n) == k0


def test_short_sequence_is_dense():
    assert block_budgets(40, 0.7) == [40] * 40
    assert is_dense_budget(55) and not is_dense_budget(56)


# hand-computed: r = linspace(k0, alpha*k0, n-k0); k_i = clamp(floor(r[i-k0]), 1, k0)
@pytest.mark.parametrize(
    "n,alpha,expect",
    [
        (100, 0.7, {0: 50, 49: 50, 50: 50, 51: 49, 75: 42, 99: 35}),   # 50 - 15*25/49 = 42.35
        (100, 1.0, {0: 50, 50: 50, 75: 50, 99: 50}),
        (200, 0.7, {49: 50, 50: 50, 125: 42, 199: 35}),               # 50 - 15*75/149 = 42.45
        (200, 1.0, {199: 50}),
        (1024, 0.7, {131: 132, 132: 132, 577: 112, 1023: 92}),         # 132 - 39.6*445/891 = 112.22
        (1024, 1.0, {1023: 132, 600: 132}),
    ],
)
def test_decayed_budget_values(n, alpha, expect):
    b = block_budgets(n, alpha)
    assert len(b) == n
    for i, k in expect.items():
        assert b[i] == k, (i, b[i], k)


def test_budget_monotone_and_clamped():
    b = block_budgets(500, 0.01)
    assert min(b) >= 1 and max(b) == base_budget(500)
    assert all(x >= y for x, y in zip(b, b[1:]))


def test_min_density_and_auto_dense_rule(monkeypatch):
    from stem import StemConfig
    from stem.api import auto_dense_reason
    from stem.budget import min_density

    # n = 128: budgets 55 .. 38 -> hand sum: rows < 55 keep all; later rows keep min(k_i, i+1) = k_i
    b = block_budgets(128, 0.7)
    expect = (sum(range(1, 56)) + sum(b[55:])) / sum(range(1, 129))
    assert abs(min_density(128, 0.7, 0.1, 30) - expect) < 1e-12
    cfg = StemConfig()
    assert auto_dense_reason("cpu", 16384, 16384, cfg) is None            # CPU: never
    assert "dense attention is faster" in auto_dense_reason("cuda", 8192, 8192, cfg)   # 0.81 >= 0.70 (measured)
    assert auto_dense_reason("cuda", 16384, 16384, cfg) is None           # 0.60 < 0.70
    assert auto_dense_reason("cuda", 4096, 4096, cfg) is None             # planner is dense by itself
    assert auto_dense_reason("cuda", 16384, 16384, cfg.replace(dense=True)) is None
    assert auto_dense_reason("cuda", 16384, 16384, cfg.replace(auto_dense_above=1.01)) is None
    assert "auto_dense_above=0.58" in auto_dense_reason("cuda", 16384, 16384, cfg.replace(auto_dense_above=0.58))
