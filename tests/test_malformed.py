"""Nothing silently wrong: malformed plans, plan files, odd scalars, empty inputs, autograd and
argument precedence all raise a clear error (or, for empty inputs, return empty outputs); valid
random plans agree with a float64 masked softmax."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from reference import dense_causal_attention64, masked_attention64, rand_qkv

import stem
from stem import BlockPlan

SPARSE = stem.StemConfig(block_size=16, stride=4)


def _plan_and_inputs(gen, L=16 * 60, Hq=2, Hkv=1):
    q, k, v = rand_qkv(gen, 1, Hq, Hkv, L, L, 16)
    return stem.plan(q, k, v, SPARSE), q, k, v


def _edited(plan, counts=None, indices=None, **geometry):
    fields = dict(block_size=plan.block_size, q_len=plan.q_len, kv_len=plan.kv_len, config=plan.config,
                  dense=plan.dense, q_offset=plan.q_offset)
    fields.update(geometry)
    return BlockPlan(plan.kv_counts.clone() if counts is None else counts,
                     plan.kv_indices.clone() if indices is None else indices, **fields)


# ---- malformed plan contents -----------------------------------------------------------------
def test_negative_index_raises(gen):
    plan, *_ = _plan_and_inputs(gen)
    idx = plan.kv_indices.clone()
    idx[0, 1, 50, 0] = -3
    with pytest.raises(ValueError, match=r"kv_indices\[0, 1, 50, 0\] = -3 is negative"):
        _edited(plan, indices=idx)


def test_count_above_width_raises(gen):
    plan, *_ = _plan_and_inputs(gen)
    counts = plan.kv_counts.clone()
    counts[0, 0, 5] = plan.kv_indices.shape[-1] + 1
    with pytest.raises(ValueError, match=r"kv_counts\[0, 0, 5\] = \d+ is outside \[0, W=\d+\]"):
        _edited(plan, counts=counts)
    counts[0, 0, 5] = -1
    with pytest.raises(ValueError, match=r"kv_counts\[0, 0, 5\] = -1 is outside"):
        _edited(plan, counts=counts)


def test_out_of_range_and_non_causal_indices_raise(gen):
    plan, *_ = _plan_and_inputs(gen)
    idx = plan.kv_indices.clone()
    idx[0, 0, 59, plan.kv_counts[0, 0, 59] - 1] = plan.num_kv_blocks
    with pytest.raises(ValueError, match=r"out of range: the plan has 60 key blocks"):
        _edited(plan, indices=idx)
    idx = plan.kv_indices.clone()
    idx[0, 0, 10, plan.kv_counts[0, 0, 10] - 1] = 11  # query block 10 may read blocks <= 10
    with pytest.raises(ValueError, match=r"is not causal: query block 10 is absolute block 10.*must be <= 10"):
        _edited(plan, indices=idx)


def test_unsorted_or_repeated_indices_raise(gen):
    plan, *_ = _plan_and_inputs(gen)
    idx = plan.kv_indices.clone()
    idx[0, 0, 40, 1] = idx[0, 0, 40, 0]
    with pytest.raises(ValueError, match=r"kv_indices\[0, 0, 40\] is not strictly ascending"):
        _edited(plan, indices=idx)


def test_in_place_edit_after_construction_is_caught_by_attention(gen):
    plan, q, k, v = _plan_and_inputs(gen)
    plan.kv_indices[0, 0, 30, 0] = -1  # edited after the plan was made
    with pytest.raises(ValueError, match="is negative"):
        stem.attention(q, k, v, plan=plan)


def test_padding_past_the_count_is_ignored(gen):
    plan, q, k, v = _plan_and_inputs(gen)
    idx = plan.kv_indices.clone()
    valid = torch.arange(idx.shape[-1]) < plan.kv_counts.unsqueeze(-1)
    idx[~valid] = 12345  # garbage in the padding is fine
    out = stem.attention(q, k, v, plan=_edited(plan, indices=idx))
    torch.testing.assert_close(out, stem.attention(q, k, v, plan=plan), rtol=0, atol=0)


def test_empty_rows_give_zero_output_and_minus_inf_lse(gen):
    plan, q, k, v = _plan_and_inputs(gen)
    counts = plan.kv_counts.clone()
    counts[0, 1, 20] = 0
    empty_plan = _edited(plan, counts=counts)
    out, lse = stem.attention(q, k, v, plan=empty_plan, return_lse=True)
    rows = slice(20 * 16, 21 * 16)
    assert torch.equal(out[0, 1, rows], torch.zeros_like(out[0, 1, rows]))
    assert torch.isinf(lse[0, 1, rows]).all() and (lse[0, 1, rows] < 0).all()
    assert torch.isfinite(out).all()
    ref = masked_attention64(q, k, v, empty_plan.to_dense_mask(), 16)
    other = torch.ones(out.shape[2], dtype=torch.bool)
    other[rows] = False
    assert float((out[0, 1, other].double() - ref[0, 1, other]).abs().max()) < 1e-5


# ---- plan files ------------------------------------------------------------------------------
def test_plan_file_errors_name_the_file(gen, tmp_path):
    plan, *_ = _plan_and_inputs(gen)
    path = tmp_path / "plan.safetensors"
    plan.save(str(path))
    assert torch.equal(BlockPlan.load(str(path)).kv_indices, plan.kv_indices)
    raw = path.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"truncated\.safetensors"):
        BlockPlan.load(str(tmp_path / "truncated.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors"):
        BlockPlan.load(str(tmp_path / "missing.safetensors"))
    # flip bytes inside the tensor data: the checksum notices (counts up to ~1e9 otherwise load)
    corrupt = bytearray(raw)
    corrupt[-40:-36] = b"\xff\xff\xff\x7f"
    (tmp_path / "corrupt.safetensors").write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match=r"corrupt\.safetensors.*edited or corrupted"):
        BlockPlan.load(str(tmp_path / "corrupt.safetensors"))


def test_plan_file_with_edited_metadata_is_refused(gen, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    plan, *_ = _plan_and_inputs(gen)
    path = tmp_path / "plan.safetensors"
    plan.save(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    meta["q_len"] = str(int(meta["q_len"]) - 5)  # still the same number of query blocks
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"edited\.safetensors.*edited or corrupted"):
        BlockPlan.load(str(tmp_path / "edited.safetensors"))
    del meta["sha256"]  # a file without a checksum is still checked for its contents
    tensors["kv_indices"][0, 0, 3, 0] = -7
    save_file(tensors, str(tmp_path / "nosum.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"nosum\.safetensors.*is negative"):
        BlockPlan.load(str(tmp_path / "nosum.safetensors"))


# ---- precedence ------------------------------------------------------------------------------
def test_plan_q_offset_must_match_the_call(gen):
    q, k, v = rand_qkv(gen, 1, 2, 1, 16 * 20, 16 * 80, 16)
    plan = stem.plan(q, k, v, SPARSE, q_offset=16 * 30)
    with pytest.raises(ValueError, match=r"plan is for q_offset=480.*last 320 of 1280 positions \(q_offset=960\)"):
        stem.attention(q, k, v, plan=plan)
    out = stem.attention(q, k, v, plan=plan, q_offset=16 * 30)  # said explicitly: runs
    assert out.shape == q.shape


def test_config_with_plan_must_agree(gen):
    plan, q, k, v = _plan_and_inputs(gen)
    stem.attention(q, k, v, plan=plan, config=SPARSE)  # the same config: fine
    with pytest.raises(ValueError, match="config= and plan= disagree"):
        stem.attention(q, k, v, plan=plan, config=SPARSE.replace(alpha=0.9))


def test_plan_geometry_must_match(gen):
    plan, q, k, v = _plan_and_inputs(gen)
    with pytest.raises(ValueError, match=r"plan is for q_len=960, kv_len=960 but q/k have 944, 960"):
        stem.attention(q[:, :, 16:], k, v, plan=plan)
    with pytest.raises(ValueError, match=r"plan is for batch=1, heads=2 but q has B=1, Hq=4"):
        stem.attention(q.repeat(1, 2, 1, 1), k, v, plan=plan)


# ---- scalars ---------------------------------------------------------------------------------
@pytest.mark.parametrize("scale,err,msg", [
    (float("nan"), ValueError, "scale must be finite and > 0"),
    (float("inf"), ValueError, "scale must be finite and > 0"),
    (0.0, ValueError, "scale must be finite and > 0"),
    (-0.1, ValueError, "scale must be finite and > 0"),
    ("x", TypeError, "scale must be a real number"),
    (True, TypeError, "scale must be a real number"),
])
def test_bad_scale(gen, scale, err, msg):
    q, k, v = rand_qkv(gen, 1, 2, 1, 32, 32, 16)
    with pytest.raises(err, match=msg):
        stem.attention(q, k, v, scale=scale)


@pytest.mark.parametrize("q_offset,err,msg", [
    (1.0, TypeError, "q_offset must be an int"), ("3", TypeError, "q_offset must be an int"),
    (-1, ValueError, r"q_offset \(-1\) must lie in"), (100, ValueError, r"q_offset \(100\) must lie in"),
])
def test_bad_q_offset(gen, q_offset, err, msg):
    q, k, v = rand_qkv(gen, 1, 2, 1, 32, 64, 16)
    with pytest.raises(err, match=msg):
        stem.attention(q, k, v, q_offset=q_offset)


def test_bad_flags_and_backend(gen):
    q, k, v = rand_qkv(gen, 1, 2, 1, 32, 32, 16)
    with pytest.raises(TypeError, match="return_lse must be True or False"):
        stem.attention(q, k, v, return_lse="yes")
    with pytest.raises(TypeError, match="backend must be a string"):
        stem.attention(q, k, v, backend=None)


def test_no_heads_messages(gen):
    q, k, v = rand_qkv(gen, 1, 2, 1, 32, 32, 16)
    with pytest.raises(ValueError, match=r"k and v have no heads \(Hkv=0"):
        stem.attention(q, k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match="head dim is 0"):
        stem.attention(q[..., :0], k[..., :0], v[..., :0])


@pytest.mark.parametrize("shape_q,shape_kv", [((0, 2, 32, 16), (0, 1, 32, 16)), ((1, 2, 0, 16), (1, 1, 0, 16)),
                                              ((1, 2, 0, 16), (1, 1, 50, 16)), ((1, 0, 32, 16), (1, 1, 32, 16))])
def test_empty_inputs_give_empty_outputs(shape_q, shape_kv):
    q, k, v = torch.randn(shape_q), torch.randn(shape_kv), torch.randn(shape_kv)
    out = stem.attention(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    out, lse = stem.attention(q, k, v, return_lse=True)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    with pytest.raises(ValueError, match="no plan to return"):
        stem.attention(q, k, v, return_plan=True)
    with pytest.raises(ValueError, match="nothing to plan"):
        stem.plan(q, k, v)


# ---- autograd --------------------------------------------------------------------------------
def test_backward_through_a_sparse_plan_raises_clearly(gen):
    q, k, v = rand_qkv(gen, 1, 2, 1, 16 * 60, 16 * 60, 16)
    q.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"forward-only.*torch.no_grad\(\).*scaled_dot_product_attention"):
        stem.attention(q, k, v, config=SPARSE)
    with torch.no_grad():
        assert stem.attention(q, k, v, config=SPARSE).shape == q.shape


def test_dense_plans_are_differentiable(gen):
    q, k, v = (t.double().requires_grad_(True) for t in rand_qkv(gen, 1, 2, 1, 40, 40, 8))
    out = stem.attention(q, k, v, config=SPARSE.replace(dense=True))
    assert stem.last_dispatch() == "auto -> sdpa"
    g = torch.autograd.grad(out.sum(), (q, k, v))
    ref = torch.autograd.grad(dense_causal_attention64(q, k, v).sum(), (q, k, v))
    for a, b in zip(g, ref):
        torch.testing.assert_close(a, b)


# ---- property tests ----------------------------------------------------------------------------
_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(data=st.data(), kind=st.sampled_from(["negative", "range", "causal", "order", "count_hi", "count_lo"]))
def test_any_malformed_plan_raises(data, kind):
    """Whatever entry is broken, and however, constructing the plan raises a ValueError naming it."""
    bs = 16
    nQ = data.draw(st.integers(2, 12), label="nQ")
    H = data.draw(st.integers(1, 3), label="H")
    L = nQ * bs
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    mask = torch.rand(1, H, nQ, nQ, generator=g) < 0.5
    mask[..., torch.arange(nQ), torch.arange(nQ)] = True
    plan = BlockPlan.from_dense_mask(mask, block_size=bs, q_len=L, kv_len=L)
    counts, idx = plan.kv_counts.clone(), plan.kv_indices.clone()
    h, i = data.draw(st.integers(0, H - 1)), data.draw(st.integers(1, nQ - 1))
    c = int(counts[0, h, i])
    j = data.draw(st.integers(0, c - 1))
    if kind == "negative":
        idx[0, h, i, j] = data.draw(st.integers(-10**9, -1))
        match = "is negative"
    elif kind == "range":
        idx[0, h, i, j] = data.draw(st.integers(nQ, 10**9))
        match = "out of range"
    elif kind == "causal":
        if i == nQ - 1:
            i -= 1
            c, j = int(counts[0, h, i]), 0
        idx[0, h, i, c - 1] = data.draw(st.integers(i + 1, nQ - 1))
        match = "not causal|not strictly ascending"
    elif kind == "order":
        assume(idx.shape[-1] >= 2)
        if c < 2:
            counts[0, h, i], idx[0, h, i, :2] = 2, torch.tensor([i, 0])
        else:
            idx[0, h, i, :c] = idx[0, h, i, :c].flip(0)
        match = "not strictly ascending"
    elif kind == "count_hi":
        counts[0, h, i] = data.draw(st.integers(idx.shape[-1] + 1, 10**9))
        match = "is outside"
    else:
        counts[0, h, i] = data.draw(st.integers(-10**9, -1))
        match = "is outside"
    with pytest.raises(ValueError, match=match):
        BlockPlan(counts, idx, bs, L, L)


@_SETTINGS
@given(scale=st.one_of(st.floats().filter(lambda x: not (math.isfinite(x) and x > 0)),
                       st.text(max_size=3), st.booleans(), st.lists(st.floats(), max_size=2)))
def test_any_bad_scale_raises(scale):
    q = torch.randn(1, 1, 20, 8)
    with pytest.raises((TypeError, ValueError), match="scale must be"):
        stem.attention(q, q, q, scale=scale)


@_SETTINGS
@given(data=st.data())
def test_random_valid_plans_match_float64(data):
    """Any valid plan (random masks, chunked offsets, GQA, lengths off the block grid) runs on the
    reference executor and equals a float64 masked softmax."""
    bs = data.draw(st.sampled_from([16, 32]))
    Lk = data.draw(st.integers(1, 6 * bs))
    Lq = data.draw(st.integers(1, Lk))
    off = data.draw(st.integers(0, Lk - Lq))
    Hkv, G = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    q, k, v = rand_qkv(g, 1, Hkv * G, Hkv, Lq, Lk, 8, dtype=torch.float64)
    qbo, nQ = off // bs, (off + Lq - 1) // bs - off // bs + 1
    nK = -(-Lk // bs)
    mask = torch.rand(1, Hkv * G, nQ, nK, generator=g) < data.draw(st.floats(0.0, 1.0))
    mask[..., torch.arange(nQ), torch.arange(nQ) + qbo] = True
    plan = BlockPlan.from_dense_mask(mask, block_size=bs, q_len=Lq, kv_len=Lk, q_offset=off)
    out = stem.attention(q, k, v, plan=plan, q_offset=off, backend="reference")
    # the float64 oracle assumes queries are the last Lq keys: give it keys up to the last query
    end = off + Lq
    ref = masked_attention64(q, k[:, :, :end], v[:, :, :end], plan.to_dense_mask()[..., : -(-end // bs)], bs)
    assert float((out - ref).abs().max()) < 1e-10


def test_plans_in_inference_mode(gen):
    """Inference tensors keep no version counter: plans made and run under inference_mode work."""
    q, k, v = rand_qkv(gen, 1, 2, 1, 16 * 60, 16 * 60, 16)
    with torch.inference_mode():
        plan = stem.plan(q, k, v, SPARSE)
        out = stem.attention(q, k, v, plan=plan)
        hand = BlockPlan(plan.kv_counts.clone(), plan.kv_indices.clone(), 16, plan.q_len, plan.kv_len)
        torch.testing.assert_close(stem.attention(q, k, v, plan=hand), out, rtol=0, atol=0)
