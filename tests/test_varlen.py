"""Packed variable-length batches (stem.varlen_attention / stem.plan_varlen / VarlenBlockPlan) on CPU.

Oracles: each sequence run alone through stem.attention / stem.plan (the per-sequence contract), and
float64 masked attention over the plan's block mask (tests/reference.py), independent of both.
"""

from __future__ import annotations

import pytest
import torch

import stem
from stem.varlen import VarlenBlockPlan, plan_varlen_rows, varlen_plan_shape
from tests.reference import masked_attention64

# block 16 and stride 4 make sequences of >= 896 tokens sparse (56 blocks) while staying small
CFG = stem.StemConfig(block_size=16, stride=4, sink_blocks=1, window_blocks=2)
MIXED = [(1000, 1000), (40, 40), (600, 1100), (0, 30), (1, 950), (130, 130)]


def packed(gen, lens, Hq, Hkv, D, dtype=torch.float32):
    q = torch.randn(sum(a for a, _ in lens), Hq, D, generator=gen).to(dtype)
    k = torch.randn(sum(b for _, b in lens), Hkv, D, generator=gen).to(dtype)
    v = (torch.randn(k.shape, generator=gen) * (0.2 + 3 * torch.rand(k.shape[0], Hkv, 1, generator=gen))).to(dtype)
    cq = torch.tensor([0] + [sum(a for a, _ in lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32)
    ck = torch.tensor([0] + [sum(b for _, b in lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32)
    return q, k, v, cq, ck


def pieces(lens):
    a = b = 0
    for i, (lq, lk) in enumerate(lens):
        yield i, slice(a, a + lq), slice(b, b + lk), lq
        a, b = a + lq, b + lk


def alone(t, sl):
    return t[sl].transpose(0, 1)[None]


@pytest.mark.parametrize("Hq,Hkv,D", [(4, 2, 16), (4, 1, 64), (2, 2, 128), (2, 1, 256)])
def test_varlen_equals_each_sequence_alone(gen, Hq, Hkv, D):
    lens = MIXED if D <= 64 else [(1000, 1000), (40, 40), (300, 950)]
    q, k, v, cq, ck = packed(gen, lens, Hq, Hkv, D)
    out, lse, plan = stem.varlen_attention(q, k, v, cq, ck, config=CFG, backend="reference", return_lse=True,
                                           return_plan=True)
    assert out.shape == q.shape and lse.shape == (Hq, q.shape[0]) and lse.dtype == torch.float32
    assert not plan.dense and plan.batch_size == len(lens)
    saw_dense = saw_sparse = False
    for i, sq, sk, lq in pieces(lens):
        if lq == 0:
            continue
        o1, l1, p1 = stem.attention(alone(q, sq), alone(k, sk), alone(v, sk), config=CFG, backend="reference",
                                    return_lse=True, return_plan=True)
        mine = plan.sequence(i)
        assert torch.equal(mine.kv_counts, p1.kv_counts), f"sequence {i}: counts differ"
        valid = torch.arange(p1.kv_indices.shape[-1]) < p1.kv_counts[..., None]
        assert torch.equal(torch.where(valid, mine.kv_indices[..., : valid.shape[-1]], 0),
                           torch.where(valid, p1.kv_indices, 0)), f"sequence {i}: indices differ"
        assert torch.equal(out[sq], o1[0].transpose(0, 1)), f"sequence {i}: output differs"
        assert torch.equal(lse[:, sq], l1[0]), f"sequence {i}: lse differs"
        # independent float64 oracle on the plan's mask
        ref = masked_attention64(alone(q, sq), alone(k, sk), alone(v, sk), p1.to_dense_mask(), CFG.block_size)
        err = (out[sq].double() - ref[0].transpose(0, 1)).abs().max().item()
        assert err < 1e-4, f"sequence {i}: max error {err:.2e} against float64"
        saw_dense |= p1.dense
        saw_sparse |= not p1.dense
    assert saw_dense and saw_sparse, "the batch must mix dense and sparse sequences"
    if lens is MIXED:
        assert plan.kv_counts[3].sum() == 0, "a sequence without queries has no rows"


def test_batched_planner_equals_per_sequence_loop(gen):
    """The one-pass planner (the GPU path, here with torch pooling) against stem.plan per sequence;
    float64 inputs leave no near-ties."""
    lens = MIXED + [(2000, 2000), (900, 2300)]
    q, k, v, cq, ck = packed(gen, lens, 4, 2, 8, torch.float64)
    plan = stem.plan_varlen(q, k, v, cq, ck, config=CFG)  # per-sequence loop on CPU
    lens_t = plan.seqlens
    dense = [False] * len(lens)
    from stem.varlen import _dense_seq

    dense = [_dense_seq(a, b, CFG, "cpu", False) for a, b in lens_t]
    counts, indices, _ = plan_varlen_rows(q, k, v, cq, lens_t, plan.max_seqlen_q, plan.max_seqlen_k, CFG,
                                          impl="batched")
    assert any(dense) and not all(dense)
    assert torch.equal(counts, plan.kv_counts)
    valid = torch.arange(indices.shape[-1]) < counts[..., None]
    assert torch.equal(torch.where(valid, indices, 0), torch.where(valid, plan.kv_indices, 0))


def test_plan_shape_bounds_every_sequence(gen):
    """nQ and W from varlen_plan_shape fit every sequence's own plan, for random length mixes."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    for _ in range(12):
        n = int(torch.randint(1, 5, (1,), generator=g))
        lens = []
        for _ in range(n):
            lk = int(torch.randint(1, 3000, (1,), generator=g))
            lens.append((int(torch.randint(0, lk + 1, (1,), generator=g)), lk))
        if not any(a for a, _ in lens):
            continue
        q, k, v, cq, ck = packed(g, lens, 1, 1, 4)
        plan = stem.plan_varlen(q, k, v, cq, ck, config=CFG)
        mq, mk = max(a for a, _ in lens), max(b for _, b in lens)
        assert tuple(plan.kv_indices.shape) == varlen_plan_shape(n, 1, mq, mk, CFG)
        for i, sq, sk, lq in pieces(lens):
            if lq:
                p1 = stem.plan(alone(q, sq), alone(k, sk), alone(v, sk), CFG)
                assert p1.num_q_blocks <= plan.num_q_blocks and p1.kv_indices.shape[-1] <= plan.kv_indices.shape[-1]
                assert torch.equal(plan.sequence(i).kv_counts, p1.kv_counts)


def test_plan_save_load_plot_and_check(gen, tmp_path):
    lens = [(1000, 1000), (40, 40), (300, 950)]
    q, k, v, cq, ck = packed(gen, lens, 2, 1, 8)
    plan = stem.plan_varlen(q, k, v, cq, ck, config=CFG)
    path = str(tmp_path / "p.safetensors")
    plan.save(path)
    back = VarlenBlockPlan.load(path)
    assert torch.equal(back.kv_counts, plan.kv_counts) and torch.equal(back.kv_indices, plan.kv_indices)
    assert back.seqlens == plan.seqlens and back.config == CFG and back.max_seqlen_k == 1000
    out1 = stem.varlen_attention(q, k, v, cq, ck, plan=back, backend="reference")
    out2 = stem.varlen_attention(q, k, v, cq, ck, config=CFG, backend="reference")
    assert torch.equal(out1, out2)
    png = plan.plot(str(tmp_path / "p.png"), seq=2)
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="BlockPlan.load"):
        stem.BlockPlan.load(path)
    raw = bytearray(open(path, "rb").read())
    raw[-3] ^= 0xFF
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="bad.safetensors"):
        VarlenBlockPlan.load(str(bad))


@pytest.mark.parametrize("edit,match", [
    (lambda c, i: c.__setitem__((1, 0, 5), 1), "only 3 query blocks"),  # a row past sequence 1's end
    (lambda c, i: i.__setitem__((1, 0, 0, 0), 3), "out of range: sequence 1 has 3 key blocks"),
    (lambda c, i: i.__setitem__((0, 0, 2, 1), 9), "not causal"),
    (lambda c, i: c.__setitem__((0, 1, 0), 99), "outside"),
])
def test_malformed_varlen_plan_is_refused(gen, edit, match):
    lens = [(200, 200), (40, 40)]
    q, k, v, cq, ck = packed(gen, lens, 2, 1, 8)
    plan = stem.plan_varlen(q, k, v, cq, ck, config=CFG)
    counts, indices = plan.kv_counts.clone(), plan.kv_indices.clone()
    edit(counts, indices)
    with pytest.raises(ValueError, match=match):
        VarlenBlockPlan(counts, indices, 16, cq, ck, 200, 200, CFG)
    plan.kv_counts.copy_(counts)  # edited in place after planning: noticed before running
    plan.kv_indices.copy_(indices)
    with pytest.raises(ValueError, match=match):
        stem.varlen_attention(q, k, v, cq, ck, plan=plan, backend="reference")


def test_bad_inputs_name_the_problem(gen):
    q, k, v, cq, ck = packed(gen, [(30, 30), (20, 50)], 2, 1, 8)
    va = stem.varlen_attention
    with pytest.raises(ValueError, match="3 dims"):
        va(q[None], k, v, cq, ck)
    with pytest.raises(ValueError, match="int32"):
        va(q, k, v, cq.long(), ck)
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[-1\] = 50 but q has 49"):
        va(q[:49], k, v, cq, ck)
    with pytest.raises(ValueError, match="non-decreasing"):
        va(q, k, v, torch.tensor([0, 40, 30, 50], dtype=torch.int32), torch.tensor([0, 30, 60, 80],
           dtype=torch.int32))
    with pytest.raises(ValueError, match="must be 0"):
        va(q, k, v, cq + 1, ck)
    with pytest.raises(ValueError, match="sequence 0 has 30 queries but only 20 keys"):
        va(q, k, v, cq, torch.tensor([0, 20, 80], dtype=torch.int32))
    with pytest.raises(ValueError, match="2 sequences but cu_seqlens_k has 1"):
        va(q, k, v, cq, torch.tensor([0, 80], dtype=torch.int32))
    with pytest.raises(ValueError, match="max_seqlen_k=40 is smaller than the longest sequence"):
        va(q, k, v, cq, ck, 30, 40)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        va(q[:, :1].repeat(1, 3, 1), k.repeat(1, 2, 1), v.repeat(1, 2, 1), cq, ck)
    with pytest.raises(TypeError, match="VarlenBlockPlan"):
        va(q, k, v, cq, ck, plan=stem.plan(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                            v.transpose(0, 1)[None]))


def test_executors_without_varlen_are_skipped_with_a_reason():
    from stem.dispatch import DispatchKey, Executor, _cannot_run, executors

    class Batched(Executor):  # an executor that runs (B, H, L, D) batches only
        name = "batched-only"

    key = DispatchKey(torch.device("cpu"), torch.float32, 16, 16, False, False, varlen=True)
    assert "variable-length" in _cannot_run(Batched(), key)
    assert executors()["hub"].varlen is False
    plain = DispatchKey(torch.device("cpu"), torch.float32, 16, 16, False, False, varlen=True)
    assert _cannot_run(executors()["reference"], plain) is None


def test_varlen_with_an_opt_in_ranking_equals_each_sequence_alone(gen):
    cfg = CFG.replace(ranking="sampled_mass")
    lens = [(1000, 1000), (40, 40), (600, 1100)]
    q, k, v, cq, ck = packed(gen, lens, 4, 2, 16)
    plan = stem.plan_varlen(q, k, v, cq, ck, config=cfg)
    for i, sq, sk, _ in pieces(lens):
        p1 = stem.plan(alone(q, sq), alone(k, sk), alone(v, sk), cfg)
        assert torch.equal(plan.sequence(i).kv_counts, p1.kv_counts)
        assert torch.equal(plan.sequence(i).to_dense_mask(), p1.to_dense_mask())
    with pytest.raises(ValueError, match="ranking"):
        plan_varlen_rows(q, k, v, cq, plan.seqlens, 1000, 1100, cfg, impl="batched")
