"""The planner against an independent literal float64 implementation of the method (tests/reference.py)."""

import pytest
import torch
from reference import rand_qkv, spec_logits, spec_selection

import stem
from stem.planner import block_logits


@pytest.mark.parametrize(
    "L,bs,S,alpha,Hq,Hkv",
    [
        (16 * 100, 16, 4, 0.7, 2, 1),      # 100 blocks: mid regime, decaying
        (16 * 180 + 9, 16, 4, 0.7, 2, 2),  # 181 blocks: large regime, odd length
        (32 * 70 + 31, 32, 8, 1.0, 4, 2),  # no decay, GQA
        (16 * 75, 16, 16, 0.5, 2, 1),      # stride == block
    ],
)
def test_selection_matches_literal_spec(gen, L, bs, S, alpha, Hq, Hkv):
    cfg = stem.StemConfig(block_size=bs, stride=S, alpha=alpha)
    q, k, v = rand_qkv(gen, 1, Hq, Hkv, L, L, 16, dtype=torch.float64)
    ref = spec_logits(q, k, v, cfg)
    got = block_logits(q, k, v, cfg, impl="torch")
    assert torch.equal(torch.isfinite(got), torch.isfinite(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin], ref[fin], rtol=1e-10, atol=1e-10)
    plan = stem.plan(q, k, v, cfg)
    mask = plan.to_dense_mask()
    for (b, h, i), expected in spec_selection(ref, cfg):
        assert mask[b, h, i].nonzero().flatten().tolist() == expected, (b, h, i)
    assert not plan.dense and plan.density < 0.95


def test_budget_really_decays(gen):
    cfg = stem.StemConfig(block_size=16, stride=4)
    q, k, v = rand_qkv(gen, 1, 2, 1, 16 * 200, 16 * 200, 16)
    plan = stem.plan(q, k, v, cfg)
    counts = plan.kv_counts[0, 0]
    # late rows keep at most alpha*k0 + sinks + window blocks; early rows more
    assert int(counts[-1]) <= 35 + 8
    assert int(counts[100]) > int(counts[-1])


def test_value_bonus_changes_selection(gen):
    cfg = stem.StemConfig(block_size=16, stride=4)
    q, k, v = rand_qkv(gen, 1, 2, 1, 16 * 120, 16 * 120, 16)
    v[:, :, 16 * 30: 16 * 31] *= 50  # one block of huge values
    with_bonus = stem.plan(q, k, v, cfg).to_dense_mask()
    without = stem.plan(q, k, v, cfg.replace(value_weight=0.0)).to_dense_mask()
    assert with_bonus[..., 30].sum() > without[..., 30].sum()
    assert with_bonus[0, :, 60:, 30].all()


def test_chunk_plan_equals_rows_of_full_plan(gen):
    cfg = stem.StemConfig(block_size=16, stride=4)
    q, k, v = rand_qkv(gen, 2, 4, 2, 16 * 90 + 5, 16 * 90 + 5, 16)
    full = stem.plan(q, k, v, cfg).to_dense_mask()
    for s, e in [(16 * 40, q.shape[2]), (16 * 30, 16 * 50)]:
        part = stem.plan(q[:, :, s:e], k, v, cfg, q_offset=s).to_dense_mask()
        assert torch.equal(part, full[:, :, s // 16:(e - 1) // 16 + 1])


def test_plan_is_dense_when_budget_covers_everything(gen):
    q, k, v = rand_qkv(gen, 1, 2, 1, 16 * 40, 16 * 40, 16)
    plan = stem.plan(q, k, v, stem.StemConfig(block_size=16, stride=4))
    assert plan.dense and plan.density == 1.0
    q, k, v = rand_qkv(gen, 1, 2, 1, 16 * 100, 16 * 100, 16)
    plan = stem.plan(q, k, v, stem.StemConfig(block_size=16, stride=4, dense=True))
    assert plan.dense and plan.density == 1.0


def test_sinks_and_window_always_kept(gen):
    cfg = stem.StemConfig(block_size=16, stride=4, alpha=0.1)
    q, k, v = rand_qkv(gen, 1, 2, 1, 16 * 300, 16 * 300, 16)
    mask = stem.plan(q, k, v, cfg).to_dense_mask()
    n = mask.shape[-1]
    for i in range(n):
        assert mask[0, :, i, : min(4, i + 1)].all()
        assert mask[0, :, i, max(0, i - 3): i + 1].all()
        assert not mask[0, :, i, i + 1:].any()
