"""The Triton kernels on CPU through Triton's interpreter (TRITON_INTERPRET=1), at tiny sizes.

The interpreter is chosen when a kernel is *defined*, so it must be on before triton and our kernel
modules are imported. To keep it from leaking into other test modules (which may compile real
kernels in the same pytest process), every check runs in ONE child process: this file executed as
a script with TRITON_INTERPRET=1. The child prints one JSON line {case: error or null}; each
pytest case below asserts its own entry. Oracles are independent: the reference executor
(stem_backends.reference) and the torch pooling of the planner (stem.planner.pool_torch).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from plan_compare import random_plan

# name -> (B, Hq, Hkv, Lq, Lk, D, block_size, dtype, q_offset, extra kwargs)
ATTN_CASES = {
    "fp32_prefill": (1, 2, 2, 96, 96, 16, 32, "float32", None, {}),
    "fp32_gqa_odd_len": (1, 4, 2, 77, 77, 32, 32, "float32", None, {}),
    "bf16_gqa4_odd": (1, 4, 1, 61, 61, 16, 16, "bfloat16", None, {}),
    "fp16_chunked": (1, 2, 1, 40, 150, 16, 32, "float16", None, {}),
    "fp32_q_offset_middle": (2, 2, 1, 50, 170, 16, 32, "float32", 37, {}),
    "fp32_subtiles": (1, 2, 1, 90, 130, 16, 64, "float32", None, {"block_m": 16, "block_n": 32}),
    "fp32_reversed_schedule": (1, 2, 2, 70, 100, 16, 16, "float32", 13, {"schedule": "reversed"}),
    "fp32_dense_plan": (1, 2, 1, 64, 64, 16, 16, "float32", None, {"dense": True}),
    "fp32_tma_descriptors": (2, 4, 2, 50, 120, 16, 32, "float32", None, {"use_tma": True, "block_n": 16}),
    "bf16_tma_descriptors": (1, 2, 1, 33, 99, 16, 16, "bfloat16", 40, {"use_tma": True}),
    # masked (diagonal) tiles through the descriptors too: the last tile of each head runs past Lk
    # into the next head's rows (or the zero fill at the end), which the causal mask must drop
    "bf16_tma_masked_odd": (2, 4, 2, 45, 99, 16, 16, "bfloat16", 30, {"use_tma": True, "tma_masked": True}),
    "fp32_tma_masked_subtiles": (1, 4, 1, 70, 130, 16, 32, "float32", None,
                                 {"use_tma": True, "tma_masked": True, "block_n": 16, "maxnreg": 128}),
    "fp32_negative_scale": (1, 2, 2, 50, 50, 16, 16, "float32", None, {"scale": -0.2}),  # scale not folded
}
# packed batches: name -> (per-sequence (len_q, len_k), Hq, Hkv, D, block_size, dtype)
VARLEN_CASES = {
    "varlen_fp32_mixed": ([(50, 50), (0, 20), (30, 90), (77, 77)], 4, 2, 16, 16, "float32"),
    "varlen_bf16_gqa4": ([(40, 40), (17, 60), (1, 33)], 4, 1, 16, 32, "bfloat16"),
}
# name -> (B, Hq, Hkv, Lq, Lk, D, block_size, stride, dtype, q_offset)
POOL_CASES = {
    "pool_fp32_prefill": (1, 4, 2, 200, 200, 16, 32, 8, "float32", None),
    "pool_bf16_gqa_odd": (1, 4, 1, 70, 233, 32, 16, 4, "bfloat16", None),
    "pool_fp32_q_offset": (1, 2, 2, 50, 300, 24, 32, 8, "float32", 100),
    "pool_fp16_stride16": (1, 2, 1, 64, 100, 16, 64, 16, "float16", 0),
}


def _check_attention(B, Hq, Hkv, Lq, Lk, D, bs, dtype, q_offset, extra, seed):
    from stem_backends.reference import reference_attention
    from stem_backends.triton.executor import run_block_sparse_attention

    gen = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    q = torch.randn(B, Hq, Lq, D, generator=gen).to(dt)
    k = torch.randn(B, Hkv, Lk, D, generator=gen).to(dt)
    v = torch.randn(B, Hkv, Lk, D, generator=gen).to(dt)
    off = Lk - Lq if q_offset is None else q_offset
    extra = dict(extra)
    plan = random_plan(B, Hq, Lq, Lk, bs, off, gen, dense=extra.pop("dense", False))
    scale = extra.pop("scale", 1.0 / math.sqrt(D))
    out = torch.full_like(q, float("nan"))  # poisoned: unwritten rows stay NaN
    lse = torch.full(q.shape[:3], float("nan"))
    out, lse = run_block_sparse_attention(q, k, v, plan, scale, True, out=out, lse_out=lse, **extra)
    ref, ref_lse = reference_attention(q, k, v, plan, scale, True)
    assert out.dtype == dt and out.shape == q.shape, (out.dtype, out.shape)
    assert torch.isfinite(out).all(), "non-finite output"
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    tol = 1e-5 if dt == torch.float32 else 2e-2
    assert err <= tol, f"relative error {err:.3e} > {tol}"
    lse_err = (lse.double() - ref_lse.double()).abs().max().item()
    assert lse.dtype == torch.float32 and lse_err <= 1e-4, f"lse max error {lse_err:.3e}"
    out2, none = run_block_sparse_attention(q, k, v, plan, scale, False, **extra)
    assert none is None and torch.equal(out2, out), "return_lse=False changed the output"


def _random_varlen(lens, Hq, Hkv, D, bs, dt, gen):
    from stem.varlen import VarlenBlockPlan

    q = torch.randn(sum(a for a, _ in lens), Hq, D, generator=gen).to(dt)
    k = torch.randn(sum(b for _, b in lens), Hkv, D, generator=gen).to(dt)
    v = (torch.randn(k.shape, generator=gen) * 3 * torch.rand(k.shape[0], Hkv, 1, generator=gen)).to(dt)
    plans = [random_plan(1, Hq, lq, lk, bs, lk - lq, gen) if lq else None for lq, lk in lens]
    nQ = max(p.num_q_blocks for p in plans if p is not None)
    W = max(p.kv_indices.shape[-1] for p in plans if p is not None)
    counts = torch.zeros(len(lens), Hq, nQ, dtype=torch.int32)
    indices = torch.zeros(len(lens), Hq, nQ, W, dtype=torch.int32)
    for b, p in enumerate(plans):
        if p is not None:
            counts[b, :, : p.num_q_blocks] = p.kv_counts[0]
            indices[b, :, : p.num_q_blocks, : p.kv_indices.shape[-1]] = p.kv_indices[0]
    cu = [torch.tensor([0] + [sum(x[j] for x in lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32)
          for j in (0, 1)]
    plan = VarlenBlockPlan(counts, indices, bs, cu[0], cu[1], max(a for a, _ in lens), max(b for _, b in lens))
    return q, k, v, plan


def _check_varlen(lens, Hq, Hkv, D, bs, dtype, seed):
    from stem_backends.reference import reference_attention, run_varlen_per_sequence
    from stem_backends.triton.executor import run_block_sparse_attention_varlen
    from stem_backends.triton.planner import pool_triton_varlen

    from stem.config import StemConfig
    from stem.planner import pool_varlen_torch

    gen = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    q, k, v, plan = _random_varlen(lens, Hq, Hkv, D, bs, dt, gen)
    scale = 1.0 / math.sqrt(D)
    out = torch.full_like(q, float("nan"))  # poisoned: unwritten rows stay NaN
    lse = torch.full((Hq, q.shape[0]), float("nan"))
    out, lse = run_block_sparse_attention_varlen(q, k, v, plan, scale, True, out=out, lse_out=lse)
    ref, ref_lse = run_varlen_per_sequence(reference_attention, q, k, v, plan, scale, True)
    assert torch.isfinite(out).all(), "non-finite output (a row was not written)"
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    tol = 1e-5 if dt == torch.float32 else 2e-2
    assert err <= tol, f"relative error {err:.3e} > {tol}"
    assert (lse.double() - ref_lse.double()).abs().max().item() <= 1e-4, "lse differs"
    cfg = StemConfig(block_size=bs, stride=8)
    nQ, nK = plan.num_q_blocks, max(-(-b // bs) for _, b in lens)
    seqs, a_q, a_k = [], 0, 0
    for lq, lk in plan.seqlens:
        seqs.append((a_q, lq, a_k, lk))
        a_q, a_k = a_q + lq, a_k + lk
    seqs = seqs[::-1]  # any order and subset of the packed sequences
    got = pool_triton_varlen(q, k, v, seqs, nQ, nK, cfg)
    want = pool_varlen_torch(q, k, v, seqs, nQ, nK, cfg)
    for name, a, b in zip(("q_sum", "k_sum", "v_max"), got, want):
        assert a.shape == b.shape and torch.allclose(a, b.float(), rtol=1e-5, atol=1e-4), name


def _check_pool(B, Hq, Hkv, Lq, Lk, D, bs, S, dtype, q_offset, seed):
    from stem_backends.triton.planner import pool_triton

    from stem.config import StemConfig
    from stem.planner import logits_from_stats, pool_torch

    gen = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    q = torch.randn(B, Hq, Lq, D, generator=gen).to(dt)
    k = torch.randn(B, Hkv, Lk, D, generator=gen).to(dt)
    v = (torch.randn(B, Hkv, Lk, D, generator=gen) * 3 * torch.rand(B, Hkv, Lk, 1, generator=gen)).to(dt)
    cfg = StemConfig(block_size=bs, stride=S)
    off = Lk - Lq if q_offset is None else q_offset
    got_stats, ref_stats = pool_triton(q, k, v, cfg, off), pool_torch(q, k, v, cfg, off)
    assert (got_stats.q_block_offset, got_stats.kv_len) == (ref_stats.q_block_offset, ref_stats.kv_len)
    for name in ("q_sum", "k_sum", "v_max"):
        a, b = getattr(got_stats, name), getattr(ref_stats, name)
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-4), name
    got = logits_from_stats(got_stats, cfg)
    ref = logits_from_stats(ref_stats, cfg)
    assert got.shape == ref.shape and got.dtype == torch.float32, (got.shape, ref.shape, got.dtype)
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), fin), "causal -inf pattern differs"
    assert torch.allclose(got[fin], ref[fin], rtol=1e-5, atol=1e-5), (got[fin] - ref[fin]).abs().max().item()


def _child_main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.set_num_threads(1)
    from conftest import child_report

    base = int(os.environ["STEM_TEST_SEED"])  # the parent test's seed (fresh per run unless fixed)
    checks = {}
    for off, cases, fn in ((0, ATTN_CASES, _check_attention), (50, VARLEN_CASES, _check_varlen),
                           (100, POOL_CASES, _check_pool)):
        for i, (name, args) in enumerate(cases.items()):
            checks[name] = lambda fn=fn, args=args, seed=base + off + i: fn(*args, seed=seed)
    child_report(checks)


@pytest.fixture(scope="module")
def interpreted_results():
    from conftest import interpreted_child_results

    return interpreted_child_results(__file__)


@pytest.mark.parametrize("case", list(ATTN_CASES) + list(VARLEN_CASES) + list(POOL_CASES))
def test_interpreted_kernel(interpreted_results, case):
    assert case in interpreted_results, f"case {case} did not run"
    assert interpreted_results[case] is None, interpreted_results[case]


def test_executor_reasons_without_cuda():
    from stem_backends.triton.executor import TritonExecutor

    from stem.dispatch import DispatchKey
    from stem.plan import BlockPlan

    ex = TritonExecutor()
    assert (ex.name, ex.priority, ex.device_types) == ("triton", 50, ("cuda",))
    assert "CUDA" in ex.unavailable_reason(torch.device("cpu"))
    counts = torch.ones(1, 2, 1, dtype=torch.int32)
    plan = BlockPlan(counts, torch.zeros(1, 2, 1, 1, dtype=torch.int32), 16, 10, 10)
    q = torch.randn(1, 2, 10, 48)
    key = DispatchKey.of(q, plan, need_lse=True)
    assert "head dim 48" in ex.supports(key)
    q64 = torch.randn(1, 2, 10, 16, dtype=torch.float64)
    assert "float64" in ex.supports(DispatchKey.of(q64, plan, need_lse=False))
    q16 = torch.randn(1, 2, 10, 16)
    assert ex.supports(DispatchKey.of(q16, plan, need_lse=True)) is None


def test_importing_backends_does_not_import_triton():
    code = (
        "import sys, stem, stem_backends.triton.executor, stem_backends.triton.planner; "
        "assert 'triton' not in sys.modules, 'triton imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


if __name__ == "__main__":
    _child_main()
