"""Packed variable-length batches on the GPU: the batched planner and the Triton executor against
each sequence run alone, torch.compile with the real executors, and CUDA-graph capture.

Oracles: stem.plan / stem.attention per sequence (the per-sequence contract) and float64 masked
attention over each sequence's plan (tests/reference.py).
"""

from __future__ import annotations

import pytest
import torch

import stem
from tests.reference import masked_attention64
from tests.test_varlen import alone, pieces
from tests.test_varlen import packed as cpu_packed

pytestmark = pytest.mark.gpu

MIX = [(4096, 4096), (1000, 1000), (7000 + 37, 7000 + 37), (300, 5000), (0, 200), (2500, 9000), (130, 130)]


def packed(gen, lens, Hq, Hkv, D, dtype=torch.bfloat16):
    return tuple(t.cuda() for t in cpu_packed(gen, lens, Hq, Hkv, D, dtype))


@pytest.mark.parametrize("Hq,Hkv,D", [(8, 2, 128), (4, 4, 64), (4, 1, 256)])
def test_gpu_varlen_matches_each_sequence_alone(gen, Hq, Hkv, D):
    cfg = stem.StemConfig(block_size=64)  # 64-token blocks: the 4K-9K sequences are sparse
    q, k, v, cq, ck = packed(gen, MIX, Hq, Hkv, D)
    poison = torch.full_like(q, float("nan"))
    out, lse, plan = stem.varlen_attention(q, k, v, cq, ck, config=cfg, return_lse=True, return_plan=True)
    assert stem.last_dispatch().startswith("auto -> triton"), stem.last_dispatch()
    assert torch.isfinite(out).all() and out.data_ptr() != poison.data_ptr()
    assert not plan.dense
    rows = diff = 0
    for i, sq, sk, lq in pieces(MIX):
        if lq == 0:
            continue
        o1, l1, p1 = stem.attention(alone(q, sq), alone(k, sk), alone(v, sk), config=cfg, return_lse=True,
                                    return_plan=True)
        mine = plan.sequence(i)
        # plans: the batched planner sums in another order than the per-sequence one, so a block tied
        # at the budget boundary may go either way; anything more is a bug
        rows += p1.kv_counts.numel()
        diff += int((mine.kv_counts != p1.kv_counts).sum()) + int(
            (mine.to_dense_mask() != p1.to_dense_mask()).any(-1).sum())
        ref = masked_attention64(alone(q, sq), alone(k, sk), alone(v, sk), mine.to_dense_mask(),
                                 cfg.block_size)
        err = ((out[sq].double() - ref[0].transpose(0, 1)).norm() / ref.norm()).item()
        assert err < 1e-2, f"sequence {i}: relative error {err:.2e} against float64 on its own plan"
        if torch.equal(mine.to_dense_mask(), p1.to_dense_mask()):
            torch.testing.assert_close(out[sq], o1[0].transpose(0, 1), rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(lse[:, sq], l1[0].float(), rtol=1e-3, atol=1e-3)
    assert diff <= max(2, rows // 500), f"{diff} of {rows} plan rows differ from the per-sequence plans"


def test_gpu_varlen_compiles_and_captures(gen):
    cfg = stem.StemConfig(block_size=64)
    lens = [(4096, 4096), (300, 5000), (1000, 1000)]
    q, k, v, cq, ck = packed(gen, lens, 8, 2, 128)

    def f(q, k, v, cq, ck):
        return stem.varlen_attention(q, k, v, cq, ck, 4096, 5000, config=cfg)

    torch._dynamo.reset()
    ex = torch._dynamo.explain(f)(q, k, v, cq, ck)
    assert ex.graph_break_count == 0, [str(b.reason)[:200] for b in ex.break_reasons]
    got = torch.compile(f, fullgraph=True)(q, k, v, cq, ck)
    torch.testing.assert_close(got, f(q, k, v, cq, ck), rtol=0, atol=0)


def test_gpu_attention_compiles_with_real_executors_and_captures(gen):
    q = torch.randn(1, 8, 16384, 128, generator=gen).to(torch.bfloat16).cuda()
    k = torch.randn(1, 2, 16384, 128, generator=gen).to(torch.bfloat16).cuda()
    v = torch.randn(1, 2, 16384, 128, generator=gen).to(torch.bfloat16).cuda()
    cfg = stem.StemConfig(auto_dense_above=2.0)  # the sparse path at 16K

    def f(q, k, v):
        return stem.attention(q, k, v, config=cfg)

    torch._dynamo.reset()
    ex = torch._dynamo.explain(f)(q, k, v)
    assert ex.graph_break_count == 0, [str(b.reason)[:200] for b in ex.break_reasons]
    want = f(q, k, v)
    got = torch.compile(f, fullgraph=True)(q, k, v)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # CUDA-graph capture of the eager call (no host sync inside it)
    f(q, k, v)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = f(q, k, v)
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, want, rtol=0, atol=0)


@pytest.mark.parametrize("D", [64, 128])
def test_gpu_varlen_hub_matches_triton(gen, D):
    from stem.dispatch import executors

    hub = executors()["hub"]
    if hub.unavailable_reason(torch.device("cuda")) is not None or not hub.varlen:
        pytest.skip(f"hub kernel with the varlen op not loadable: {hub.unavailable_reason(torch.device('cuda'))}")
    cfg = stem.StemConfig(auto_dense_above=2.0)
    lens = [(20000, 20000), (3000, 9000), (0, 100), (777, 777)]
    q, k, v, cq, ck = packed(gen, lens, 8, 2, D)
    plan = stem.plan_varlen(q, k, v, cq, ck, config=cfg)
    o_hub, l_hub = stem.varlen_attention(q, k, v, cq, ck, plan=plan, backend="hub", return_lse=True)
    o_tri, l_tri = stem.varlen_attention(q, k, v, cq, ck, plan=plan, backend="triton", return_lse=True)
    rel = ((o_hub.float() - o_tri.float()).norm() / o_tri.float().norm()).item()
    assert rel < 1e-2, rel
    assert (l_hub - l_tri).abs().max().item() < 2e-3
    out = stem.varlen_attention(q, k, v, cq, ck, config=cfg)
    if torch.cuda.get_device_capability() == (9, 0):  # at head dim 64 triton is the faster one
        want = "auto -> hub" if D > 64 else "auto -> triton"
        assert stem.last_dispatch().startswith(want), stem.last_dispatch()
    torch.testing.assert_close(out, o_hub if D > 64 else o_tri, rtol=0, atol=0)
