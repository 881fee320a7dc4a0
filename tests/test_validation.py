"""Bad inputs get clear exceptions that name the problem."""

import math

import pytest
import torch

import stem


def qkv(B=1, Hq=2, Hkv=1, Lq=64, Lk=64, D=16, dtype=torch.float32):
    return torch.randn(B, Hq, Lq, D, dtype=dtype), torch.randn(B, Hkv, Lk, D, dtype=dtype), torch.randn(
        B, Hkv, Lk, D, dtype=dtype)


def test_wrong_rank():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"4 dims.*\(B, H, L, D\)"):
        stem.attention(q[0], k, v)


def test_batch_and_head_dim_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="batch size mismatch"):
        stem.attention(q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match="head dim mismatch"):
        stem.attention(q, k[..., :8], v[..., :8])


def test_head_counts():
    q, k, v = qkv(Hq=3, Hkv=2)
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of kv heads \(2\)"):
        stem.attention(q, k, v)


def test_q_longer_than_k():
    q, k, v = qkv(Lq=65, Lk=64)
    with pytest.raises(ValueError, match=r"q_len \(65\) > kv_len \(64\)"):
        stem.attention(q, k, v)


def test_dtype_and_device_mismatch():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="share one dtype"):
        stem.attention(q, k.double(), v)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        stem.attention(q.long(), k, v)
    with pytest.raises(ValueError, match="one device"):
        stem.attention(q, k.to("meta"), v)


def test_k_v_shape_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        stem.attention(q, k, v[:, :, :10])


def test_config_errors():
    with pytest.raises(ValueError, match="multiple of stride"):
        stem.StemConfig(block_size=32, stride=3)
    with pytest.raises(ValueError, match="power of two"):
        stem.StemConfig(block_size=96, stride=8)
    with pytest.raises(ValueError, match="power of two"):
        stem.StemConfig(block_size=512)
    for field in ("alpha", "k_rate", "value_weight", "norm"):
        with pytest.raises(ValueError, match=f"StemConfig.{field} must be finite"):
            stem.StemConfig(**{field: math.nan})
    with pytest.raises(ValueError, match="alpha"):
        stem.StemConfig(alpha=0.0)
    with pytest.raises(TypeError, match="block_size must be an int"):
        stem.StemConfig(block_size=128.0)
    with pytest.raises(ValueError, match="unknown StemConfig fields"):
        stem.StemConfig.from_dict({"blocksize": 64})


def test_unknown_and_unavailable_backend():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"unknown stem backend 'nope'.*available"):
        stem.attention(q, k, v, backend="nope")
    if "triton" in stem.executors():
        with pytest.raises(RuntimeError, match=r"'triton' is unavailable on cpu"):
            stem.attention(q, k, v, backend="triton")


def test_plan_mismatch():
    q, k, v = qkv(Lq=64, Lk=64)
    plan = stem.plan(q, k, v, stem.StemConfig(block_size=16, stride=4))
    q2, k2, v2 = qkv(Lq=80, Lk=80)
    with pytest.raises(ValueError, match="re-plan"):
        stem.attention(q2, k2, v2, plan=plan)
    with pytest.raises(TypeError, match="stem.BlockPlan"):
        stem.attention(q, k, v, plan="plan")


def test_bad_q_offset():
    q, k, v = qkv(Lq=32, Lk=64)
    with pytest.raises(ValueError, match="q_offset"):
        stem.attention(q, k, v, q_offset=40)
