"""The Triton planner (backends/triton/select.py, ``stem.plan(..., pooling="triton")`` on CUDA) against the float64
CPU planner: the same plan up to near ties at a row's budget boundary (tests/plan_compare.py
states the rule). Also: no host synchronisation, CUDA-graph capture, bounded scratch."""

import pytest
import torch
from plan_compare import plan_mismatches

import stem

pytestmark = pytest.mark.gpu


def _qkv(B, Hq, Hkv, Lq, Lk, D, dtype, gen, layout="bhld"):
    q = torch.randn(B, Hq, Lq, D, generator=gen)
    k = torch.randn(B, Hkv, Lk, D, generator=gen)
    v = torch.randn(B, Hkv, Lk, D, generator=gen) * (0.2 + 3 * torch.rand(B, Hkv, Lk, 1, generator=gen))
    out = []
    for t in (q, k, v):
        t = t.to(dtype)
        if layout == "blhd":  # what a model's (B, L, H, D) projections transposed look like
            t = t.transpose(1, 2).contiguous().transpose(1, 2)
        out.append(t.cuda())
    return out


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,dtype,q_offset,layout,pooling", [
    (1, 8, 2, 20000, 20000, 128, torch.bfloat16, None, "bhld", "triton"),
    (2, 4, 1, 5000, 23000, 64, torch.float16, None, "blhd", "triton"),
    (1, 4, 4, 4000, 23000, 256, torch.bfloat16, 9000, "bhld", "triton"),
    (1, 2, 1, 16384 * 2 + 100, 16384 * 2 + 100, 128, torch.float32, None, "bhld", "triton"),
    (1, 8, 2, 17000, 17000, 128, torch.bfloat16, None, "blhd", "auto"),  # the default takes this planner
])
def test_plan_matches_float64_planner(gen, B, Hq, Hkv, Lq, Lk, D, dtype, q_offset, layout, pooling):
    q, k, v = _qkv(B, Hq, Hkv, Lq, Lk, D, dtype, gen, layout)
    cfg = stem.StemConfig()
    plan = stem.plan(q, k, v, cfg, q_offset=q_offset, pooling=pooling)
    assert not plan.dense
    # 3xTF32 sums of 1024-term products: about 1e-5 of the row's largest logit (float32 GEMMs: ~1e-6)
    rows, differ, bad = plan_mismatches(plan.kv_counts, plan.kv_indices, q, k, v, cfg, q_offset, rel_tol=1e-4)
    assert not bad, f"{len(bad)} of {rows} rows break the selection rule, e.g. {bad[:3]}"
    assert differ <= max(2, rows // 200), f"{differ} of {rows} rows differ from the float64 plan"


def test_auto_pooling_runs_the_triton_planner(monkeypatch):
    calls = []
    stem.planner.poolings()
    fn, devs = stem.planner._PLANNERS["triton"]
    monkeypatch.setitem(stem.planner._PLANNERS, "triton", (lambda *a, **kw: calls.append(1) or fn(*a, **kw), devs))
    q = torch.randn(1, 4, 9000, 64, device="cuda", dtype=torch.bfloat16)
    stem.plan(q, q[:, :2], q[:, :2])
    assert calls, "pooling='auto' on CUDA did not run the registered whole-planner kernel"


def test_chunked_scratch_gives_the_same_plan(gen):
    from stem_backends.triton.select import plan_triton

    B, Hq, Hkv, L, D = 2, 8, 4, 12000, 128
    q, k, v = _qkv(B, Hq, Hkv, L, L, D, torch.bfloat16, gen, "blhd")
    cfg = stem.StemConfig(block_size=64)
    n = -(-L // 64)
    stages = {}
    counts, indices = plan_triton(q, k, v, cfg, 0, n, scratch_bytes=1, stages=stages)
    assert stages["chunk_pairs"] == 1
    c1, i1 = plan_triton(q, k, v, cfg, 0, n)
    assert torch.equal(counts, c1) and torch.equal(indices, i1)
    rows, differ, bad = plan_mismatches(counts, indices, q, k, v, cfg, rel_tol=1e-4)
    assert not bad, bad[:3]


def test_plan_makes_no_host_sync_and_captures_in_a_cuda_graph(gen):
    q, k, v = _qkv(1, 8, 2, 30000, 30000, 128, torch.bfloat16, gen)
    cfg = stem.StemConfig()
    want = stem.plan(q, k, v, cfg, pooling="triton")  # warm-up: compiles the kernels, caches the budgets on the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stem.plan(q, k, v, cfg, pooling="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        stem.plan(q, k, v, cfg, pooling="triton")
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = stem.plan(q, k, v, cfg, pooling="triton")
    q2, k2, v2 = _qkv(1, 8, 2, 30000, 30000, 128, torch.bfloat16, gen)
    q.copy_(q2), k.copy_(k2), v.copy_(v2)
    got.kv_indices.fill_(-1), got.kv_counts.fill_(-1)
    graph.replay()
    torch.cuda.synchronize()
    want = stem.plan(q, k, v, cfg, pooling="triton")
    assert torch.equal(got.kv_counts, want.kv_counts) and torch.equal(got.kv_indices, want.kv_indices)


def test_scratch_stays_bounded():
    B, Hq, Hkv, L, D = 1, 32, 8, 65536, 128
    q, k, v = (torch.randn(B, h, L, D, device="cuda", dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
    stem.plan(q, k, v, pooling="triton")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    plan = stem.plan(q, k, v, pooling="triton")
    torch.cuda.synchronize()
    out_bytes = plan.kv_counts.numel() * 4 + plan.kv_indices.numel() * 4
    extra = torch.cuda.max_memory_allocated() - base - out_bytes
    assert extra <= 128 * 2**20, f"planner scratch {extra / 2**20:.1f} MB"


def test_ranked_plans_select_with_the_triton_kernel(gen):
    """sampled_mass plans on CUDA select with the Triton selection kernel: the same rows as the
    torch selection on the same scores (random scores: exact ties are rare)."""
    from stem_backends.triton.ranking import sampled_mass_triton

    from stem.planner import select_blocks

    q, k, v = _qkv(1, 8, 2, 20000, 20000, 128, torch.bfloat16, gen)
    cfg = stem.StemConfig(ranking="sampled_mass")
    scores = sampled_mass_triton(q, k, 0, cfg.block_size, 128 ** -0.5)
    n = -(-20000 // cfg.block_size)
    want_c, want_i = select_blocks(scores, cfg, 0, n)
    plan = stem.plan(q, k, v, cfg)
    rows_differ = ((plan.kv_indices != want_i).any(-1) | (plan.kv_counts != want_c)).sum().item()
    assert rows_differ <= plan.kv_counts.numel() // 500, rows_differ
