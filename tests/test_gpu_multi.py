"""Placement on a non-current GPU (accelerate ``device_map`` / pipeline sharding).

With ``device_map="auto"`` a layer may live on ``cuda:1`` while the current device stays ``cuda:0``.
The planner and every executor must then launch on the tensors' device. A launch on the current
device (Triton's default) either faults, reads through peer access at the wrong stream order, or
silently runs on the other GPU; these tests catch all three:

* values: results on cuda:1 (current device cuda:0) equal an independent oracle (the reference
  executor on CPU in float32, and the plan made with cuda:1 current);
* kernels: the CUDA profiler sees every kernel of the call on device 1, none on device 0;
* memory: nothing is allocated on device 0 during the call;
* a Llama split over two GPUs with accelerate gives the logits of the model on one GPU.

Needs >= 2 CUDA devices (skipped otherwise).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import stem

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs >= 2 CUDA devices"
    ),
]

L, HQ, HKV, D = 8192, 8, 2, 128  # 64 blocks of 128: a sparse default plan
CFG = stem.StemConfig()


def _inputs(dtype=torch.bfloat16, L=L):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, HQ, L, D, generator=g)
    k = torch.randn(1, HKV, L, D, generator=g)
    v = torch.randn(1, HKV, L, D, generator=g) * (0.2 + 3 * torch.rand(1, HKV, L, 1, generator=g))
    return [t.to(dtype) for t in (q, k, v)]


def _on_wrong_current_device(fn):
    """Run ``fn`` with cuda:0 current; return (result, CUDA kernel device indices or None, bytes
    allocated on cuda:0 beyond what was there)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.set_device(0)
    for d in (0, 1):
        torch.cuda.synchronize(d)
    torch.cuda.reset_peak_memory_stats(0)
    base = torch.cuda.memory_allocated(0)
    with contextlib.ExitStack() as stack:
        try:  # kernel-level check where the CUDA profiler (CUPTI) works on this machine
            prof = stack.enter_context(profile(activities=[ProfilerActivity.CUDA]))
        except Exception:
            prof = None
        res = fn()
        for d in (0, 1):
            torch.cuda.synchronize(d)
    extra = torch.cuda.max_memory_allocated(0) - base
    assert torch.cuda.current_device() == 0, "the call changed the current device"
    devs = None
    if prof is not None:
        devs = {e.device_index for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA} or None
    return res, devs, extra


def _check_placement(devs, extra, what):
    assert extra == 0, f"{what} allocated {extra} bytes on cuda:0 (tensors are on cuda:1)"
    if devs is not None:  # None: this profiler build records no kernel events; values still checked
        assert devs == {1}, f"{what} launched kernels on devices {sorted(devs)}; expected only cuda:1"


@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_planner_launches_on_tensor_device(impl):
    q, k, v = (t.to("cuda:1") for t in _inputs())
    with torch.cuda.device(1):
        want = stem.plan(q, k, v, CFG, pooling=impl)
    got, devs, extra = _on_wrong_current_device(lambda: stem.plan(q, k, v, CFG, pooling=impl))
    assert got.device == torch.device("cuda:1")
    assert not want.dense and want.density < 0.9
    assert torch.equal(got.to_dense_mask(), want.to_dense_mask()), "plan differs when cuda:0 is current"
    _check_placement(devs, extra, f"stem.plan(pooling={impl!r})")


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton", "auto"])
def test_executor_launches_on_tensor_device(backend):
    from stem.dispatch import get_executor

    q, k, v = (t.to("cuda:1") for t in _inputs())
    with torch.cuda.device(1):
        if backend == "sdpa":
            plan = stem.plan(q, k, v, CFG.replace(dense=True))
        else:
            plan = stem.plan(q, k, v, CFG, pooling="torch")
    try:
        get_executor("triton" if backend == "auto" else backend, q.device)
    except (RuntimeError, ValueError) as e:
        pytest.skip(f"{backend}: {e}")
    # independent oracle: the reference executor in float32 (torch ops), cuda:1 current, same plan
    with torch.cuda.device(1):
        ref = stem.attention(q.float(), k.float(), v.float(), plan=plan, backend="reference")
    out, devs, extra = _on_wrong_current_device(lambda: stem.attention(q, k, v, plan=plan, backend=backend))
    assert out.device == torch.device("cuda:1")
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    _check_placement(devs, extra, f"stem.attention(backend={backend!r})")


def test_attention_end_to_end_on_second_device():
    """Plan + execute (backend auto) on cuda:1 equals the same call with cuda:1 current."""
    q, k, v = (t.to("cuda:1") for t in _inputs())
    with torch.cuda.device(1):
        want = stem.attention(q, k, v, config=CFG)
    got, devs, extra = _on_wrong_current_device(lambda: stem.attention(q, k, v, config=CFG))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    _check_placement(devs, extra, "stem.attention(auto)")


def test_device_map_split_model_matches_one_gpu():
    """A 4-layer Llama (random weights, bf16) split over cuda:0/cuda:1 with accelerate gives the
    logits it gives on one GPU, with every layer's attention served by Stem (sparse plans)."""
    transformers = pytest.importorskip("transformers")
    accelerate = pytest.importorskip("accelerate")
    import stem.integrations.transformers as sh

    cfg = transformers.LlamaConfig(
        hidden_size=1024, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        head_dim=128, vocab_size=1024, max_position_embeddings=32768,
    )
    torch.manual_seed(0)
    with torch.device("cuda:0"):
        model = transformers.LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval()
    schedule = sh.StemModelConfig(dense_layers=())  # every layer sparse (16K tokens = 128 blocks)
    ids = torch.randint(0, 1024, (1, 16384), generator=torch.Generator().manual_seed(1)).to("cuda:0")

    def run():
        sh.reset_dispatch_counts()
        with torch.no_grad():
            out = model(ids).logits.float()
        assert sh.dispatch_counts() == {"stem": 4}, sh.dispatch_counts()
        return out.to("cuda:0")

    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        dense = model(ids).logits.float()
    sh.enable(model, schedule)
    one = run()
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
                  "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1}
    model = accelerate.dispatch_model(model, device_map=device_map)
    assert next(model.model.layers[3].parameters()).device == torch.device("cuda:1")
    torch.cuda.set_device(0)
    split = run()
    torch.testing.assert_close(split, one, rtol=1e-2, atol=1e-2)
    assert (one - dense).abs().max() > 10 * (split - one).abs().max(), "Stem did not change the logits: is it on?"
