"""GPU checks of the Triton executor and planner kernel (full sizes; skipped without CUDA).

Fresh random inputs each run, outputs poisoned with NaN before the kernel writes them, oracles
independent of the kernels: float64 attention through the reference executor, the reference
executor on the same plan and inputs, and the torch planner.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.gpu

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _exec_or_skip():
    from stem_backends.triton.executor import TritonExecutor

    ex = TritonExecutor()
    why = ex.unavailable_reason(torch.device("cuda"))
    if why is not None:
        pytest.skip(why)
    return ex


def _random_plan(B, Hq, Lq, Lk, bs, off, density, gen, empty=0.0):
    """Random block plan; every row keeps its diagonal and first block, then a fraction ``empty``
    of the (batch, head, query block) rows is emptied (kv_counts 0)."""
    from stem.plan import BlockPlan

    qbo = off // bs
    nQ = (off + Lq - 1) // bs - qbo + 1
    nK = -(-Lk // bs)
    mask = torch.rand(B, Hq, nQ, nK, generator=gen, device="cuda") < density
    mask[..., torch.arange(nQ), torch.arange(nQ) + qbo] = True
    mask[..., :1] = True
    if empty:
        mask &= ~(torch.rand(B, Hq, nQ, 1, generator=gen, device="cuda") < empty)
    return BlockPlan.from_dense_mask(mask, block_size=bs, q_len=Lq, kv_len=Lk, q_offset=off)


def _poisoned_launch(q, k, v, plan, scale, return_lse, **kw):
    """Run the kernel into NaN-poisoned outputs: a row the kernel fails to write stays NaN."""
    from stem_backends.triton.executor import run_block_sparse_attention

    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device=q.device) if return_lse else None
    return run_block_sparse_attention(q, k, v, plan, scale, return_lse, out=out, lse_out=lse, **kw)


CASES = [
    # (D, dtype, group, Lq, Lk)
    (D, dt, g, Lq, Lk)
    for D in (64, 128, 256)
    for dt in (torch.bfloat16, torch.float16)
    for g in (1, 4)
    for (Lq, Lk) in ((3001, 3001), (1111, 4099))
]


@needs_cuda
@pytest.mark.parametrize("D,dtype,group,Lq,Lk", CASES)
def test_executor_matches_float64_and_reference(D, dtype, group, Lq, Lk, seed):
    from stem_backends.reference import reference_attention

    _exec_or_skip()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    B, Hkv, bs = 1, 2, 128
    Hq = Hkv * group
    q = torch.randn(B, Hq, Lq, D, device="cuda", generator=gen).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, device="cuda", generator=gen).to(dtype)
    v = torch.randn(B, Hkv, Lk, D, device="cuda", generator=gen).to(dtype)
    plan = _random_plan(B, Hq, Lq, Lk, bs, Lk - Lq, 0.4, gen)
    scale = 1.0 / math.sqrt(D)
    out, lse = _poisoned_launch(q, k, v, plan, scale, True)
    torch.cuda.synchronize()
    assert not out.isnan().any() and not lse.isnan().any(), "unwritten (NaN) outputs"
    ref64, lse64 = reference_attention(q.double(), k.double(), v.double(), plan, scale, True)
    rel64 = ((out.double() - ref64).norm() / ref64.norm()).item()
    assert rel64 <= 1e-2, f"relative error vs float64 {rel64:.3e}"
    ref, ref_lse = reference_attention(q, k, v, plan, scale, True)
    rel = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert rel <= 1e-2, f"relative error vs reference executor {rel:.3e}"
    assert (lse.double() - lse64).abs().max().item() <= 1e-3
    assert (lse - ref_lse).abs().max().item() <= 1e-3


# the default table's entries (pick_tiles) and the alternatives the benchmark's sweep runs
TILE_CASES = [
    (64, {}), (64, dict(block_m=128, block_n=64, num_warps=4, num_stages=3)),
    (64, dict(block_m=128, block_n=128, num_warps=4, num_stages=3, tma_masked=True)),
    (128, {}), (128, dict(block_m=128, block_n=128, num_warps=8, num_stages=3, tma_masked=True)),
    (128, dict(block_m=128, block_n=64, num_warps=8, num_stages=2)),
    (128, dict(block_m=64, block_n=64, num_warps=4, num_stages=2)),
    (128, dict(block_m=128, block_n=128, num_warps=8, num_stages=2, use_tma=False)),
    (256, {}), (256, dict(block_m=64, block_n=64, num_warps=4, num_stages=2, tma_masked=True)),
    (256, dict(block_m=128, block_n=32, num_warps=8, num_stages=3)),
]


@needs_cuda
@pytest.mark.parametrize("group", [1, 8])
@pytest.mark.parametrize("D,tiles", TILE_CASES)
def test_tile_configs_match_float64(D, tiles, group, seed):
    """Each tile configuration against float64: bf16, odd lengths, queries in the middle of the keys
    (Lq < Lk, q_offset), GQA 1/4/8, a fifth of the rows empty (output 0, LSE -inf), poisoned outputs."""
    from stem_backends.reference import reference_attention

    _exec_or_skip()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    B, Hkv, Lq, Lk, off = 1, 2, 1111, 2999, 1500
    Hq = Hkv * group
    q = torch.randn(B, Hq, Lq, D, device="cuda", generator=gen).bfloat16()
    k = torch.randn(B, Hkv, Lk, D, device="cuda", generator=gen).bfloat16()
    v = torch.randn(B, Hkv, Lk, D, device="cuda", generator=gen).bfloat16()
    plan = _random_plan(B, Hq, Lq, Lk, 128, off, 0.5, gen, empty=0.2)
    scale = 1.0 / math.sqrt(D)
    out, lse = _poisoned_launch(q, k, v, plan, scale, True, **tiles)
    torch.cuda.synchronize()
    assert not out.isnan().any() and not lse.isnan().any(), "unwritten (NaN) outputs"
    ref64, lse64 = reference_attention(q.double(), k.double(), v.double(), plan, scale, True)
    rel = ((out.double() - ref64).norm() / ref64.norm()).item()
    assert rel <= 1e-2, f"relative error vs float64 {rel:.3e}"
    empty = (plan.kv_counts == 0).repeat_interleave(128, dim=-1)[..., off % 128: off % 128 + Lq]
    assert empty.any() and (~empty).any()
    assert (out[empty] == 0).all() and (lse[empty] == float("-inf")).all()
    assert (lse[~empty].double() - lse64[~empty]).abs().max().item() <= 1e-3


@needs_cuda
@pytest.mark.parametrize("D", [64, 128, 256])
def test_executor_tma_path(D, seed):
    """The TMA tensor-descriptor path for unmasked tiles, against float64 (bf16, GQA 4, Lq < Lk)."""
    from stem_backends.reference import reference_attention

    _exec_or_skip()
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm90+")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    B, Hq, Hkv, Lq, Lk = 2, 8, 2, 1111, 4099
    q = torch.randn(B, Hq, Lq, D, device="cuda", generator=gen).bfloat16()
    k = torch.randn(B, Hkv, Lk, D, device="cuda", generator=gen).bfloat16()
    v = torch.randn(B, Hkv, Lk, D, device="cuda", generator=gen).bfloat16()
    plan = _random_plan(B, Hq, Lq, Lk, 128, Lk - Lq, 0.4, gen)
    out, lse = _poisoned_launch(q, k, v, plan, 0.08, True, use_tma=True)
    ref64, lse64 = reference_attention(q.double(), k.double(), v.double(), plan, 0.08, True)
    assert not out.isnan().any()
    rel = ((out.double() - ref64).norm() / ref64.norm()).item()
    assert rel <= 1e-2, rel
    assert (lse.double() - lse64).abs().max().item() <= 1e-3
    # the same tiles through both load paths: the same arithmetic, only the loads differ (the default
    # tiles of the two paths differ, and with them the summation order)
    tiles = dict(block_m=64 if D > 128 else 128, block_n=64, num_warps=8, num_stages=2)
    via_tma, _ = _poisoned_launch(q, k, v, plan, 0.08, False, use_tma=True, **tiles)
    plain, _ = _poisoned_launch(q, k, v, plan, 0.08, False, use_tma=False, **tiles)
    rel_plain = ((via_tma.float() - plain.float()).norm() / plain.float().norm()).item()
    assert rel_plain <= 1e-5, rel_plain


@needs_cuda
@pytest.mark.parametrize("bs,tiles,schedule", [
    (128, {}, "sorted"), (128, {}, "reversed"), (64, {}, "sorted"), (256, {}, "sorted"),
    (32, {}, "sorted"), (128, {"block_m": 64, "block_n": 32}, "sorted"), (128, {"use_tma": True}, "sorted"),
])
def test_executor_float32_equals_reference(bs, tiles, schedule, seed):
    """float32 inputs (ieee dots): equal to the reference executor within float32 rounding."""
    from stem_backends.reference import reference_attention

    _exec_or_skip()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 777, 2050, 64
    q = torch.randn(B, Hq, Lq, D, device="cuda", generator=gen)
    k = torch.randn(B, Hkv, Lk, D, device="cuda", generator=gen)
    v = torch.randn(B, Hkv, Lk, D, device="cuda", generator=gen)
    plan = _random_plan(B, Hq, Lq, Lk, bs, 1000, 0.5, gen)  # queries in the middle of the keys
    out, lse = _poisoned_launch(q, k, v, plan, 0.11, True, schedule=schedule, **tiles)
    ref, ref_lse = reference_attention(q, k, v, plan, 0.11, True)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel <= 2e-6, f"relative error {rel:.3e}"
    assert (lse - ref_lse).abs().max().item() <= 1e-4


@needs_cuda
def test_stem_attention_dispatches_triton_and_matches_reference(seed):
    import stem

    _exec_or_skip()
    torch.manual_seed(seed)
    B, Hq, Hkv, L, D = 1, 8, 2, 16384 + 77, 128
    q, k, v = (torch.randn(B, h, L, D, device="cuda", dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
    out, plan = stem.attention(q, k, v, backend="triton", return_plan=True)
    assert not plan.dense
    ref, _ = stem.executors()["reference"].forward(q, k, v, plan, 1 / math.sqrt(D), False)
    rel = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert rel <= 1e-2, rel
    status = {s.name: s for s in stem.executor_status("cuda")}
    assert status["triton"].usable, status["triton"].reason


@needs_cuda
@pytest.mark.parametrize("Lq,Lk,q_offset,G", [(20000, 20000, None, 4), (5000, 23000, None, 1), (4000, 23000, 9000, 4)])
def test_planner_kernel_matches_torch(Lq, Lk, q_offset, G, seed):
    from stem_backends.triton.planner import pool_triton

    from stem.config import StemConfig
    from stem.planner import block_logits, logits_from_stats, poolings, select_blocks

    _exec_or_skip()
    assert "triton" in poolings(), "the triton pooling kernel did not register"
    torch.manual_seed(seed)
    cfg = StemConfig()
    Hkv, D = 2, 128
    q = torch.randn(1, Hkv * G, Lq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, Hkv, Lk, D, device="cuda", dtype=torch.bfloat16)
    v = (torch.randn(1, Hkv, Lk, D, device="cuda") * torch.rand(1, Hkv, Lk, 1, device="cuda") * 2).bfloat16()
    off = Lk - Lq if q_offset is None else q_offset
    torch.cuda.synchronize()
    got = logits_from_stats(pool_triton(q, k, v, cfg, off), cfg)
    ref = block_logits(q, k, v, cfg, off, impl="torch")
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), fin)
    assert torch.allclose(got[fin], ref[fin], rtol=1e-4, atol=1e-5), (got[fin] - ref[fin]).abs().max().item()
    bs = cfg.block_size
    n_total = -(-Lk // bs)
    ca, ia = select_blocks(got, cfg, off // bs, n_total)
    cb, ib = select_blocks(ref, cfg, off // bs, n_total)
    from stem.plan import BlockPlan

    ma = BlockPlan(ca, ia, bs, Lq, Lk, q_offset=off).to_dense_mask()
    mb = BlockPlan(cb, ib, bs, Lq, Lk, q_offset=off).to_dense_mask()
    overlap = (ma & mb).sum().item() / mb.sum().item()
    assert overlap >= 0.999, f"selection overlap {overlap:.5f}"


@needs_cuda
@pytest.mark.parametrize("use_tma", [False, True])
def test_executor_cuda_graph_capture(use_tma):
    import functools

    from stem_backends.triton.executor import run_block_sparse_attention

    import stem

    _exec_or_skip()
    if use_tma and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm90+")
    B, Hq, Hkv, L, D = 1, 4, 1, 9000, 128
    q, k, v = (torch.randn(B, h, L, D, device="cuda", dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
    plan = stem.plan(q, k, v, stem.StemConfig(block_size=64))
    ex = stem.executors()["triton"]
    ex.forward(q, k, v, plan, 0.1, True)  # the executor entry point itself
    fwd = functools.partial(run_block_sparse_attention, use_tma=use_tma)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fwd(q, k, v, plan, 0.1, True)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = fwd(q, k, v, plan, 0.1, True)
    q.copy_(torch.randn_like(q))  # new inputs, same buffers
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    want, want_lse = fwd(q, k, v, plan, 0.1, True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


@needs_cuda
def test_auto_dispatch_dense_below_threshold_sparse_above(monkeypatch):
    import stem

    _exec_or_skip()
    D = 128
    for L, expect in ((8192, "sdpa"), (16384, "triton")):  # budget densities 0.81 and 0.60 (stem/api.py)
        q, k, v = (torch.randn(1, h, L, D, device="cuda", dtype=torch.bfloat16) for h in (8, 2, 2))
        out = stem.attention(q, k, v)
        why = stem.last_dispatch()
        # the sparse case goes to the fastest usable plan executor: triton, or the hub kernel's
        # sm90 path where a hub build is loadable (LOCAL_KERNELS)
        assert why.startswith(f"auto -> {expect}") or (expect == "triton" and why.startswith("auto -> hub")), why
        dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        rel = ((out.float() - dense.float()).norm() / dense.float().norm()).item()
        assert rel < (1e-2 if expect == "sdpa" else 0.5), rel
