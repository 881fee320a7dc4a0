"""The reference executor against independent float64 attention."""

import pytest
import torch
from reference import dense_causal_attention64, masked_attention64, rand_qkv

import stem

DENSE = stem.StemConfig(block_size=16, stride=4, dense=True)
SPARSE = stem.StemConfig(block_size=16, stride=4)


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("B,Hq,Hkv,L", [(1, 2, 2, 77), (2, 4, 1, 129), (2, 6, 2, 200)])
def test_dense_config_equals_dense_attention(gen, dtype, tol, B, Hq, Hkv, L):
    q, k, v = rand_qkv(gen, B, Hq, Hkv, L, L, 32, dtype=dtype)
    out = stem.attention(q, k, v, config=DENSE, backend="reference")
    assert out.dtype == dtype and out.shape == q.shape
    assert _rel(out, dense_causal_attention64(q, k, v)) < tol


def test_sparse_plan_equals_masked_float64(gen):
    q, k, v = rand_qkv(gen, 2, 4, 2, 16 * 80 + 3, 16 * 80 + 3, 16)
    out, plan = stem.attention(q, k, v, config=SPARSE, backend="reference", return_plan=True)
    assert not plan.dense
    ref = masked_attention64(q, k, v, plan.to_dense_mask(), 16)
    assert _rel(out, ref) < 1e-5
    # and it really is sparse: differs from dense attention
    assert _rel(out, dense_causal_attention64(q, k, v)) > 1e-3


def test_gqa_equals_repeated_kv(gen):
    q, k, v = rand_qkv(gen, 1, 8, 2, 16 * 70, 16 * 70, 16)
    plan = stem.plan(q, k, v, SPARSE)
    a = stem.attention(q, k, v, plan=plan, backend="reference")
    b = stem.attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), plan=plan, backend="reference")
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cfg", [DENSE, SPARSE])
def test_chunked_prefill_equals_last_rows(gen, cfg):
    L = 16 * 75 + 11
    q, k, v = rand_qkv(gen, 2, 4, 2, L, L, 16)
    full = stem.attention(q, k, v, config=cfg, backend="reference")
    for start in (16 * 50, 16 * 74):  # block-aligned chunks reproduce the full plan's rows
        part = stem.attention(q[:, :, start:], k, v, config=cfg, backend="reference")
        torch.testing.assert_close(part, full[:, :, start:], rtol=1e-5, atol=1e-6)
    # an unaligned chunk is still exact attention over its own plan
    part, plan = stem.attention(q[:, :, 1000:], k, v, config=cfg, backend="reference", return_plan=True)
    ref = masked_attention64(q[:, :, 1000:], k, v, plan.to_dense_mask(), 16)
    assert _rel(part, ref) < 1e-5


def test_lse_matches_float64(gen):
    q, k, v = rand_qkv(gen, 1, 2, 1, 100, 100, 16)
    out, lse = stem.attention(q, k, v, config=DENSE, backend="reference", return_lse=True)
    s = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) / 4.0
    s = s.masked_fill(torch.ones(100, 100, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("Lq,Lk", [(64, 64), (40, 100)])
def test_dense_plan_with_lse_takes_the_fused_dense_path_on_cpu(gen, Lq, Lk):
    q, k, v = rand_qkv(gen, 1, 4, 2, Lq, Lk, 16)
    out, lse = stem.attention(q, k, v, config=DENSE, return_lse=True)
    assert stem.last_dispatch() == "auto -> sdpa"
    s = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) / 4.0
    s = s.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool).triu(Lk - Lq + 1), float("-inf"))
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)
    assert _rel(out, dense_causal_attention64(q, k, v)) < 1e-5


def test_every_output_element_written(gen, monkeypatch):
    real_empty = torch.empty

    def poisoned_empty(*a, **kw):
        t = real_empty(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    q, k, v = rand_qkv(gen, 2, 4, 2, 16 * 60 + 7, 16 * 60 + 7, 16)
    out, lse = stem.attention(q, k, v, config=SPARSE, backend="reference", return_lse=True)
    assert not out.isnan().any() and not lse.isnan().any()


def test_custom_scale(gen):
    q, k, v = rand_qkv(gen, 1, 2, 2, 50, 50, 16)
    out = stem.attention(q, k, v, config=DENSE, backend="reference", scale=0.05)
    assert _rel(out, dense_causal_attention64(q, k, v, scale=0.05)) < 1e-5


def test_auto_dense_plan_uses_sdpa_and_matches(gen):
    q, k, v = rand_qkv(gen, 1, 4, 2, 300, 300, 32)
    out = stem.attention(q, k, v, config=DENSE)
    assert "sdpa" in stem.last_dispatch()
    assert _rel(out, dense_causal_attention64(q, k, v)) < 1e-5
    out = stem.attention(q[:, :, 100:], k, v, config=DENSE)
    assert _rel(out, dense_causal_attention64(q, k, v)[:, :, 100:]) < 1e-5


def test_auto_dense_shortcut_warns(monkeypatch, caplog):
    """On CUDA, auto may run dense attention instead of a near-dense plan: never silently."""
    import logging

    import stem.api as api

    monkeypatch.setattr(api, "auto_dense_reason", lambda *a, **k: "budgets keep >= 0.60 (test)")
    monkeypatch.setattr(api, "_warned", set())
    q, k, v = rand_qkv(torch.Generator().manual_seed(0), 1, 2, 1, 16 * 70, 16 * 70, 16)
    with caplog.at_level(logging.WARNING, logger="stem"):
        out = stem.attention(q, k, v, config=SPARSE)
    assert "sdpa" in stem.last_dispatch() and "budgets keep" in stem.last_dispatch()
    assert any("backend='triton'" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert _rel(out, dense_causal_attention64(q, k, v)) < 1e-5
