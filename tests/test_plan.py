import pytest
import torch
from reference import rand_qkv

import stem

CFG = stem.StemConfig(block_size=16, stride=4)


def test_save_load_round_trip(gen, tmp_path):
    q, k, v = rand_qkv(gen, 2, 4, 2, 16 * 70 + 3, 16 * 70 + 3, 16)
    plan = stem.plan(q, k, v, CFG)
    path = str(tmp_path / "plan.safetensors")
    plan.save(path)
    back = stem.BlockPlan.load(path)
    assert torch.equal(back.kv_counts, plan.kv_counts) and torch.equal(back.kv_indices, plan.kv_indices)
    assert (back.block_size, back.q_len, back.kv_len, back.q_offset, back.dense) == (
        plan.block_size, plan.q_len, plan.kv_len, plan.q_offset, plan.dense)
    assert back.config == CFG
    out1 = stem.attention(q, k, v, plan=plan, backend="reference")
    out2 = stem.attention(q, k, v, plan=back, backend="reference")
    assert torch.equal(out1, out2)


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "x.safetensors")
    save_file({"a": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a stem BlockPlan"):
        stem.BlockPlan.load(path)


def test_dense_mask_round_trip_and_density(gen):
    mask = torch.rand(2, 3, 10, 10, generator=gen) < 0.5
    mask |= torch.eye(10, dtype=torch.bool)
    plan = stem.BlockPlan.from_dense_mask(mask, block_size=16, q_len=160, kv_len=160)
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    assert torch.equal(plan.to_dense_mask(), mask & causal)
    assert abs(plan.density - float((mask & causal).sum()) / (2 * 3 * 55)) < 1e-12
    # indices ascending within the count
    for c, row in zip(plan.kv_counts.flatten().tolist(), plan.kv_indices.flatten(0, 2).tolist()):
        assert row[:c] == sorted(row[:c])


def test_repr_is_readable(gen):
    q, k, v = rand_qkv(gen, 1, 2, 1, 16 * 60, 16 * 60, 16)
    r = repr(stem.plan(q, k, v, CFG))
    assert "BlockPlan(" in r and "q_len=960" in r and "block_size=16" in r


def test_plot_writes_png(gen, tmp_path):
    pytest.importorskip("matplotlib")
    q, k, v = rand_qkv(gen, 1, 2, 1, 16 * 60, 16 * 60, 16)
    path = stem.plan(q, k, v, CFG).plot(str(tmp_path / "plan.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plan_rejects_inconsistent_geometry():
    with pytest.raises(ValueError, match="query blocks"):
        stem.BlockPlan(torch.zeros(1, 1, 3, dtype=torch.int32), torch.zeros(1, 1, 3, 1, dtype=torch.int32), 16, 16, 16)
    with pytest.raises(TypeError, match="int32"):
        stem.BlockPlan(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1, 1, dtype=torch.int32), 16, 16, 16)
