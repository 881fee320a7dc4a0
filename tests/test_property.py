"""Property test: random small shapes and configs against the float64 path."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import masked_attention64

import stem


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 2), Hkv=st.integers(1, 2), G=st.sampled_from([1, 2, 3]),
    Lk=st.integers(1, 16 * 64 + 40), frac=st.floats(0.01, 1.0), D=st.sampled_from([8, 16, 24]),
    bs_s=st.sampled_from([(16, 4), (16, 16), (32, 8), (16, 1)]), alpha=st.floats(0.05, 1.0),
    dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**31 - 1),
)
def test_random_shapes_match_float64(B, Hkv, G, Lk, frac, D, bs_s, alpha, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    Lq = max(1, int(Lk * frac))
    bs, S = bs_s
    cfg = stem.StemConfig(block_size=bs, stride=S, alpha=alpha)
    q = torch.randn(B, Hkv * G, Lq, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g, dtype=dtype)
    out, plan = stem.attention(q, k, v, config=cfg, backend="reference", return_plan=True)
    mask = plan.to_dense_mask()
    nQ, nK = mask.shape[2], mask.shape[3]
    # structural invariants of every plan
    rows = torch.arange(nQ) + plan.q_block_offset
    assert not (mask & (torch.arange(nK)[None, :] > rows[:, None])).any()      # causal
    assert mask[..., torch.arange(nQ), rows].all()                               # diagonal
    assert (plan.kv_counts == mask.sum(-1)).all()
    ref = masked_attention64(q, k, v, mask, bs)
    tol = 1e-11 if dtype == torch.float64 else 1e-5
    assert float((out.double() - ref).norm() / ref.norm()) < tol
