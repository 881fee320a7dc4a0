"""On the GPU: malformed plans raise (construction and after in-place edits), empty rows give 0
and LSE -inf on every CUDA executor, and a loaded plan's errors name the file."""

from __future__ import annotations

import pytest
import torch

import stem
from stem import BlockPlan

pytestmark = pytest.mark.gpu

CFG = stem.StemConfig()


def _inputs(seed, L=128 * 70, Hq=4, Hkv=2, D=128):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn(1, h, L, D, device="cuda", dtype=torch.bfloat16, generator=g) for h in (Hq, Hkv, Hkv))


def _usable():
    return [n for n in ("triton", "hub") if stem.executors()[n].unavailable_reason(torch.device("cuda")) is None]


def test_malformed_cuda_plans_raise(seed):
    q, k, v = _inputs(seed)
    with torch.no_grad():
        plan = stem.plan(q, k, v, CFG)
    for edit, match in (
        (lambda c, i: i.__setitem__((0, 1, 60, 0), -1), "is negative"),
        (lambda c, i: i.__setitem__((0, 1, 60, int(c[0, 1, 60]) - 1), 70), "out of range"),
        (lambda c, i: i.__setitem__((0, 1, 30, int(c[0, 1, 30]) - 1), 31), "not causal"),
        (lambda c, i: c.__setitem__((0, 0, 3), i.shape[-1] + 5), "is outside"),
    ):
        counts, idx = plan.kv_counts.clone(), plan.kv_indices.clone()
        edit(counts, idx)
        with pytest.raises(ValueError, match=match):
            BlockPlan(counts, idx, plan.block_size, plan.q_len, plan.kv_len)
    plan.kv_indices[0, 0, 50, 0] = 69  # in place, after construction: caught before any kernel runs
    for backend in ["auto", *_usable()]:
        with pytest.raises(ValueError, match="not strictly ascending|not causal"):
            stem.attention(q, k, v, plan=plan, backend=backend)


def test_empty_rows_on_every_cuda_executor(seed):
    q, k, v = _inputs(seed)
    with torch.no_grad():
        plan = stem.plan(q, k, v, CFG)
    counts = plan.kv_counts.clone()
    counts[0, 2, 40] = 0
    plan = BlockPlan(counts, plan.kv_indices.clone(), plan.block_size, plan.q_len, plan.kv_len, plan.config)
    rows = slice(40 * 128, 41 * 128)
    ref_out, ref_lse = stem.attention(q, k, v, plan=plan, backend="reference", return_lse=True)
    for backend in _usable():
        out, lse = stem.attention(q, k, v, plan=plan, backend=backend, return_lse=True)
        assert torch.equal(out[0, 2, rows], torch.zeros_like(out[0, 2, rows])), backend
        assert bool((lse[0, 2, rows] == float("-inf")).all()), backend
        assert torch.isfinite(out).all(), backend
        rel = float((out.float() - ref_out.float()).norm() / ref_out.float().norm())
        assert rel < 1e-2, (backend, rel)
    assert bool((ref_lse[0, 2, rows] == float("-inf")).all())


def test_load_to_cuda_names_the_file(tmp_path, seed):
    q, k, v = _inputs(seed)
    with torch.no_grad():
        plan = stem.plan(q, k, v, CFG)
    path = tmp_path / "p.safetensors"
    plan.save(str(path))
    assert torch.equal(BlockPlan.load(str(path), device="cuda").kv_indices, plan.kv_indices)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"p\.safetensors"):
        BlockPlan.load(str(path), device="cuda")
