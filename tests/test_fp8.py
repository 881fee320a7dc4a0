"""precision="fp8": validation (CPU), the e4m3 quantisation and the FP8 kernel under Triton's CPU
interpreter, and the kernel on sm89+ GPUs, all against float64 math.

Error bound. With Gaussian q/k/v every e4m3 rounding (3 mantissa bits, ~2.7 % rms relative) of
q, k, v and the probabilities reaches the output nearly undamped: a float64 emulation of exactly
this quantisation gives a relative output error of ~4.7 % (bf16 end to end: ~0.3 %). The tests
allow ``FP8_TOL`` = 6 %; a dropped or wrong scale gives errors of order 1.

The interpreter checks run in ONE child process (TRITON_INTERPRET=1 must be set before triton is
imported; see test_triton_interpret.py); the child prints one JSON line {case: error or null}.
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch
from plan_compare import random_plan

FP8_TOL = 0.06  # relative L2 error of the output vs float64 (see the module docstring)
FP8_PV_TOL = 0.045  # precision="fp8_pv": only V (~2.6 %) and P (~2.1 %) rounded
FP8_TOL_TINY = 0.07  # the interpreter's tiny shapes: few rows, wider spread (seen: 0.038-0.050)
LSE_TOL = 0.15  # max abs error of the natural-log log-sum-exp

E4M3_MAX = 448.0


def reference(q, k, v, plan, scale):
    """float64 masked softmax over the plan's blocks and the causal mask: (out, lse) float64.
    Loops over heads (a (Lq, Lk) score matrix at a time)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    bs, off = plan.block_size, plan.q_offset
    blocks = plan.to_dense_mask()  # (B, Hq, nQ, nK), query block 0 is absolute block off // bs
    qpos = torch.arange(Lq, device=q.device) + off
    kpos = torch.arange(Lk, device=q.device)
    qb = qpos // bs - off // bs
    out = torch.empty(B, Hq, Lq, D, dtype=torch.float64, device=q.device)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float64, device=q.device)
    for b in range(B):
        for h in range(Hq):
            hk = h // (Hq // Hkv)
            keep = blocks[b, h][qb][:, kpos // bs] & (kpos[None, :] <= qpos[:, None])
            s = (q[b, h].double() @ k[b, hk].double().T) * scale
            s = s.masked_fill(~keep, float("-inf"))
            lse[b, h] = torch.logsumexp(s, -1)
            out[b, h] = torch.softmax(s, -1).nan_to_num(0.0) @ v[b, hk].double()
    return out, lse


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


# ---------------------------------------------------------------- validation (no kernel runs)


def test_attention_fp8_refuses_cpu_and_bad_values():
    import stem

    q = torch.randn(1, 2, 64, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA GPUs"):
        stem.attention(q, q, q, precision="fp8")
    with pytest.raises(ValueError, match="one of \\('native', 'fp8', 'fp8_pv'\\)"):
        stem.attention(q, q, q, precision="fp16")
    with pytest.raises(ValueError, match="'fp8_pv' runs on the 'hub' executor only, not backend='triton'"):
        stem.attention(q, q, q, precision="fp8_pv", backend="triton")
    with pytest.raises(ValueError, match="precision='fp8_pv' runs on CUDA GPUs"):
        stem.attention(q, q, q, precision="fp8_pv")
    with pytest.raises(ValueError, match="'hub' and 'triton' executors, not backend='reference'"):
        stem.attention(q, q, q, precision="fp8", backend="reference")
    with pytest.raises(ValueError, match="CUDA GPUs"):
        stem.attention(q, q, q, precision="fp8", backend="hub")


def test_fp8_reason_dtype_head_dim_and_capability(monkeypatch):
    from stem_backends.triton.executor import fp8_unsupported_reason

    def fake(dtype, d=64):
        return SimpleNamespace(dtype=dtype, device=torch.device("cuda", 0), shape=(1, 1, 8, d))

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a test card")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    t = fake(torch.bfloat16)
    assert "8.9+" in fp8_unsupported_reason(t, t, t, 64) and "8.0" in fp8_unsupported_reason(t, t, t, 64)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 9))
    assert fp8_unsupported_reason(t, t, t, 64) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert fp8_unsupported_reason(t, t, t, 128) is None
    for dt in (torch.float32, torch.float64):
        f = fake(dt)
        assert "float16 or bfloat16" in fp8_unsupported_reason(f, f, f, 64)
    h = fake(torch.float16)
    assert "float16 or bfloat16" in fp8_unsupported_reason(t, h, t, 64)  # mixed dtypes
    d16 = fake(torch.bfloat16, 16)
    assert "head dim >= 32" in fp8_unsupported_reason(d16, d16, d16, 64)
    assert "block size >= 64" in fp8_unsupported_reason(t, t, t, 32)


def test_executor_fp8_refuses_float32_cpu():
    from stem_backends.triton.executor import run_block_sparse_attention

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 64, 32)
    plan = random_plan(1, 2, 64, 64, 64, 0, gen)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        run_block_sparse_attention(q, q, q, plan, 0.2, precision="fp8")
    with pytest.raises(ValueError, match="precision must be one of"):
        run_block_sparse_attention(q, q, q, plan, 0.2, precision="e5m2")


def test_model_config_precision():
    from stem.integrations.transformers import StemModelConfig

    cfg = StemModelConfig(precision="fp8")
    assert cfg.to_dict()["precision"] == "fp8"
    assert StemModelConfig.from_dict(cfg.to_dict()) == cfg and hash(cfg) != hash(StemModelConfig())
    assert StemModelConfig().precision == "native"
    with pytest.raises(ValueError, match="precision"):
        StemModelConfig(precision="int8")


# ---------------------------------------------------------------- the kernels under the interpreter

# name -> (B, Hq, Hkv, Lq, Lk, D, block_size, dtype, q_offset, tiles, k channel offset, plan kind)
ATTN_CASES = {
    "bf16_gqa_chunked": (1, 4, 2, 80, 200, 32, 64, "bfloat16", None, {"block_m": 16, "block_n": 32}, 0.0,
                         "random"),
    "fp16_offset_subtiles": (2, 2, 1, 50, 170, 32, 64, "float16", 37, {"block_m": 32, "block_n": 32}, 0.0,
                             "random"),
    # the sm90 load path: K8/VT8 tiles through TMA tensor descriptors (the last head's tail is padding)
    "bf16_tma_descriptors": (2, 4, 2, 70, 140, 32, 64, "bfloat16", None,
                             {"use_tma": True, "block_m": 16, "block_n": 32}, 0.0, "random"),
    # K with a large common per-channel offset (as real models have): the smoothing keeps it accurate
    "bf16_k_offset_dense": (1, 2, 1, 96, 96, 64, 64, "bfloat16", None, {"block_m": 32, "block_n": 32}, 4.0,
                            "dense"),
}


def _check_cast(seed):
    """The kernel's cast (EXACT_CAST rounding, as under the interpreter) equals torch's e4m3 cast
    (round to nearest even) on random values over the whole range, carries and subnormals included."""
    import triton
    import triton.language as tl
    from stem_backends.triton import fp8

    globals()["_to_e4m3"] = fp8._to_e4m3  # a jitted function resolves names among the module's globals

    @triton.jit
    def cast_kernel(X, Y, N: tl.constexpr):
        o = tl.arange(0, N)
        tl.store(Y + o, _to_e4m3(tl.load(X + o), True))  # noqa: F821

    gen = torch.Generator().manual_seed(seed)
    n = 4096
    mag = torch.exp2(torch.rand(n, generator=gen, dtype=torch.float64) * 19 - 10)  # 2^-10 .. 2^9
    x = (mag * torch.randn(n, generator=gen, dtype=torch.float64).sign()).clamp(-E4M3_MAX, E4M3_MAX)
    x[:8] = torch.tensor([31.9, -31.99, 1.96, 0.0, 448.0, -448.0, 2.0 ** -9 * 1.5, 2.0 ** -7 * 1.06])
    x = x.float()
    y = torch.empty(n, dtype=torch.float8_e4m3fn)
    cast_kernel[(1,)](x, y, N=n)
    want = x.to(torch.float8_e4m3fn)  # torch rounds to nearest even
    bad = (y.float() != want.float()).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} casts differ, e.g. {x[bad[:4]].tolist()} -> {y.float()[bad[:4]].tolist()}"


def _check_quantize(seed):
    """quantize_kv against float64: per-tile K scale = amax/448 of K minus its float64 mean, per
    (tile, channel) V scale, every element within e4m3's half ulp, zero padding, V transposed."""
    from stem_backends.triton.fp8 import P_SCALE, quantize_kv

    gen = torch.Generator().manual_seed(seed)
    B, H, L, D, bn, pad = 2, 3, 100, 32, 32, 64
    k = (torch.randn(B, H, L, D, generator=gen) * 2 + torch.randn(B, H, 1, D, generator=gen) * 3).bfloat16()
    v = (torch.randn(B, H, L, D, generator=gen) * torch.rand(B, H, 1, D, generator=gen) * 5).bfloat16()
    k8, vt8, ks, vs, kmean = quantize_kv(k, v, bn, pad)
    Lp = 128
    assert k8.shape == (B, H, Lp, D) and vt8.shape == (B, H, D, Lp) and ks.shape == (B, H, Lp // bn)
    assert vs.shape == (B, H, Lp // bn, D) and k8.dtype == vt8.dtype == torch.float8_e4m3fn
    k64, v64 = k.double(), v.double()
    mean = k64.mean(dim=2)
    assert torch.allclose(kmean.double(), mean, rtol=0, atol=1e-5)
    kc = torch.nn.functional.pad(k64 - mean[:, :, None], (0, 0, 0, Lp - L))
    kc[:, :, L:] = 0
    vp = torch.nn.functional.pad(v64, (0, 0, 0, Lp - L))
    want_ks = kc.view(B, H, Lp // bn, bn * D).abs().amax(-1) / E4M3_MAX
    assert torch.allclose(ks.double(), want_ks, rtol=1e-5, atol=0), "k scales"
    want_vs = vp.view(B, H, Lp // bn, bn, D).abs().amax(-2) / E4M3_MAX
    want_vs = torch.where(want_vs > 0, want_vs, 1.0)
    assert torch.allclose(vs.double() * P_SCALE, want_vs, rtol=1e-5, atol=0), "v scales"
    # dequantised values: |x - x~| <= 2^-4 |x| + 2^-10 scale (half ulp, normal and subnormal ranges)
    kd = k8.double() * ks.double().repeat_interleave(bn, -1)[..., None]
    assert (kd - kc).abs().le(2.0 ** -4 * kc.abs() + 2.0 ** -10 * want_ks.repeat_interleave(bn, -1)[..., None]
                              + 1e-6).all(), "k rounding"
    vd = vt8.double().transpose(-1, -2) * want_vs.repeat_interleave(bn, -2)
    assert (vd - vp).abs().le(2.0 ** -4 * vp.abs() + 2.0 ** -10 * want_vs.repeat_interleave(bn, -2) + 1e-6).all(), \
        "v rounding"
    assert (k8[:, :, L:].float() == 0).all() and (vt8[..., L:].float() == 0).all(), "padding is not zero"
    # the largest element of each tile maps to +-448 exactly
    assert torch.equal(k8.float().view(B, H, Lp // bn, -1).abs().amax(-1)[:, :, : L // bn],
                       torch.full((B, H, L // bn), E4M3_MAX))


def _hub_key_column(n: int) -> int:
    """Column of key n in the Hub FP8 kernel's V^T, written from the register layouts in the PTX
    ISA: the e4m3 A fragment of a 32-wide k-step gives thread (lane % 4 = c) columns 4c..4c+3 and
    16+4c..16+4c+3 of its row; the f32 accumulator of S gives it keys 8j+2c, 8j+2c+1 (j = 0..3).
    The kernel packs groups j = 0, 1 into the first register and j = 2, 3 into the third."""
    base, o = n - n % 32, n % 32
    for c in range(4):
        keys = [2 * c, 2 * c + 1, 8 + 2 * c, 9 + 2 * c, 16 + 2 * c, 17 + 2 * c, 24 + 2 * c, 25 + 2 * c]
        cols = [4 * c, 4 * c + 1, 4 * c + 2, 4 * c + 3, 16 + 4 * c, 17 + 4 * c, 18 + 4 * c, 19 + 4 * c]
        if o in keys:
            return base + cols[keys.index(o)]
    raise AssertionError(n)


def _check_quantize_hub(seed):
    """The Hub FP8 layout: quantize_kv(v_per_channel=True, permute32=True) puts key n of V in column
    _hub_key_column(n) with one scale per channel; quantize_rows scales each row of Q by amax/448."""
    from stem_backends.triton.fp8 import P_SCALE, quantize_kv, quantize_rows

    gen = torch.Generator().manual_seed(seed)
    B, H, L, D, bn, pad = 1, 2, 150, 32, 64, 128
    k = torch.randn(B, H, L, D, generator=gen).bfloat16()
    v = (torch.randn(B, H, L, D, generator=gen) * torch.rand(B, H, 1, D, generator=gen) * 5).bfloat16()
    k8, vt8, ks, vs, _ = quantize_kv(k, v, bn, pad, v_per_channel=True, permute32=True)
    Lp = 256
    assert vt8.shape == (B, H, D, Lp) and vs.shape == (B, H, D)
    want_vs = v.double().abs().amax(2) / E4M3_MAX
    assert torch.allclose(vs.double() * P_SCALE, want_vs, rtol=1e-6, atol=0), "per-channel v scales"
    perm = torch.tensor([_hub_key_column(n) for n in range(Lp)])
    vd = vt8.double()[..., perm].transpose(-1, -2)[:, :, :L] * want_vs[:, :, None, :]
    v64 = v.double()
    assert (vd - v64).abs().le(2.0 ** -4 * v64.abs() + 2.0 ** -10 * want_vs[:, :, None, :] + 1e-6).all(), \
        "v layout or rounding"
    assert (vt8.float()[..., perm[L:]] == 0).all(), "padding keys are not zero"
    q = (torch.randn(B, H, 70, D, generator=gen) * torch.rand(B, H, 70, 1, generator=gen) * 8).bfloat16()
    q8, qs = quantize_rows(q)
    q64 = q.double()
    want_qs = q64.abs().amax(-1) / E4M3_MAX
    assert q8.shape == q.shape and qs.shape == q.shape[:3]
    assert torch.allclose(qs.double(), want_qs, rtol=1e-6, atol=0), "q row scales"
    qd = q8.double() * want_qs[..., None]
    assert (qd - q64).abs().le(2.0 ** -4 * q64.abs() + 2.0 ** -10 * want_qs[..., None] + 1e-6).all(), "q rounding"


def _check_attention(B, Hq, Hkv, Lq, Lk, D, bs, dtype, q_offset, tiles, k_shift, kind, seed):
    from stem_backends.triton.executor import run_block_sparse_attention

    gen = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    q = torch.randn(B, Hq, Lq, D, generator=gen).to(dt)
    k = (torch.randn(B, Hkv, Lk, D, generator=gen) + k_shift * torch.randn(1, 1, 1, D, generator=gen)).to(dt)
    v = torch.randn(B, Hkv, Lk, D, generator=gen).to(dt)
    off = Lk - Lq if q_offset is None else q_offset
    plan = random_plan(B, Hq, Lq, Lk, bs, off, gen, dense=kind == "dense")
    scale = 1.0 / math.sqrt(D)
    out = torch.full_like(q, float("nan"))  # poisoned: unwritten rows stay NaN
    lse = torch.full(q.shape[:3], float("nan"))
    out, lse = run_block_sparse_attention(q, k, v, plan, scale, True, out=out, lse_out=lse, precision="fp8",
                                          **tiles)
    ref, ref_lse = reference(q, k, v, plan, scale)
    assert out.dtype == dt and torch.isfinite(out).all(), "non-finite output (a row was not written)"
    err = rel_err(out, ref)
    assert err <= FP8_TOL_TINY, f"relative error {err:.4f} > {FP8_TOL_TINY}"
    lse_err = (lse.double() - ref_lse).abs().max().item()
    assert lse_err <= LSE_TOL, f"lse max error {lse_err:.4f} > {LSE_TOL}"
    out2, none = run_block_sparse_attention(q, k, v, plan, scale, False, precision="fp8", **tiles)
    assert none is None and torch.equal(out2, out), "return_lse=False changed the output"


def _child_main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.set_num_threads(1)
    from conftest import child_report

    base = int(os.environ["STEM_TEST_SEED"])
    checks = {"cast": lambda: _check_cast(base), "quantize_kv": lambda: _check_quantize(base + 1),
              "quantize_hub": lambda: _check_quantize_hub(base + 2)}
    for i, (name, args) in enumerate(ATTN_CASES.items()):
        checks[name] = lambda args=args, i=i: _check_attention(*args, seed=base + 10 + i)
    child_report(checks)


@pytest.fixture(scope="module")
def interpreted_results():
    from conftest import interpreted_child_results

    return interpreted_child_results(__file__)


@pytest.mark.parametrize("case", ["cast", "quantize_kv", "quantize_hub", *ATTN_CASES])
def test_interpreted_fp8(interpreted_results, case):
    assert case in interpreted_results, f"case {case} did not run"
    assert interpreted_results[case] is None, interpreted_results[case]


# ---------------------------------------------------------------- GPU (sm89+)

needs_fp8_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+)")


def _gpu_inputs(gen, B, Hq, Hkv, L, D, dtype, k_shift=0.0):
    q = torch.randn(B, Hq, L, D, generator=gen).to(dtype)
    k = (torch.randn(B, Hkv, L, D, generator=gen) + k_shift * torch.randn(1, 1, 1, D, generator=gen)).to(dtype)
    v = torch.randn(B, Hkv, L, D, generator=gen).to(dtype)
    return q.cuda(), k.cuda(), v.cuda()


@pytest.mark.gpu
@needs_fp8_gpu
@pytest.mark.parametrize("D,dtype,Hq,Hkv,L,k_shift", [
    (128, torch.bfloat16, 8, 2, 16384, 0.0),  # 128 blocks of 128: a sparse plan
    (128, torch.bfloat16, 4, 1, 9000, 4.0),  # odd length, K with a channel offset
    (64, torch.float16, 4, 4, 8192, 0.0),
    (256, torch.bfloat16, 2, 1, 2000, 0.0),  # fewer than 56 blocks: a dense plan
])
@torch.no_grad()
def test_gpu_fp8_matches_float64_on_stem_plan(D, dtype, Hq, Hkv, L, k_shift, gen):
    from stem_backends.triton.executor import run_block_sparse_attention

    import stem

    q, k, v = _gpu_inputs(gen, 1, Hq, Hkv, L, D, dtype, k_shift)
    plan = stem.plan(q, k, v)
    scale = 1.0 / math.sqrt(D)
    ref, ref_lse = reference(q, k, v, plan, scale)
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device="cuda")
    out, lse = run_block_sparse_attention(q, k, v, plan, scale, True, out=out, lse_out=lse, precision="fp8")
    nat = run_block_sparse_attention(q, k, v, plan, scale, out=torch.full_like(q, float("nan")))[0]
    err, err_native = rel_err(out, ref), rel_err(nat, ref)
    print(f"fp8 relative error {err:.4f}, {dtype} {err_native:.5f} ({err / err_native:.1f}x)")
    assert torch.isfinite(out).all(), "non-finite output (a row was not written)"
    assert err <= FP8_TOL, f"fp8 relative error {err:.4f} > {FP8_TOL} ({dtype}: {err_native:.5f})"
    assert (lse.double() - ref_lse).abs().max().item() <= LSE_TOL
    via_api = stem.attention(q, k, v, plan=plan, precision="fp8")
    assert rel_err(via_api, ref) <= FP8_TOL


@pytest.mark.gpu
@needs_fp8_gpu
@torch.no_grad()
def test_gpu_attention_fp8_auto_plans_and_matches_float64(gen):
    import stem

    q, k, v = _gpu_inputs(gen, 1, 4, 2, 16384, 128, torch.bfloat16)
    out, lse, plan = stem.attention(q, k, v, precision="fp8", return_lse=True, return_plan=True)
    assert not plan.dense
    assert "precision='fp8'" in stem.last_dispatch()
    ref, ref_lse = reference(q, k, v, plan, 1.0 / math.sqrt(128))
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) <= FP8_TOL
    assert (lse.double() - ref_lse).abs().max().item() <= LSE_TOL


@pytest.mark.gpu
@needs_fp8_gpu
def test_gpu_fp8_refusals():
    import stem

    q = torch.randn(1, 2, 256, 64, device="cuda")
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        stem.attention(q, q, q, precision="fp8")
    qb = q.bfloat16().requires_grad_()
    with pytest.raises(ValueError, match="forward-only"):
        stem.attention(qb, qb, qb, precision="fp8")
    with pytest.raises(ValueError, match="'hub' and 'triton' executors"):
        stem.attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), precision="fp8", backend="sdpa")


# ---------------------------------------------------------------- the Hub kernel's FP8 path (sm90)

def _hub_fp8_or_skip():
    from stem.dispatch import executors

    hub = executors()["hub"]
    if hub.unavailable_reason(torch.device("cuda")) is not None:
        pytest.skip(f"hub: {hub.unavailable_reason(torch.device('cuda'))}")
    t = torch.empty(1, 1, 1, 128, dtype=torch.bfloat16, device="cuda")
    why = hub.fp8_unsupported_reason(t, 128)
    if why is not None:
        pytest.skip(why)
    return hub


@pytest.mark.gpu
@needs_fp8_gpu
@pytest.mark.parametrize("dtype,B,Hq,Hkv,L,q_offset,bs,k_shift,kind", [
    (torch.bfloat16, 1, 8, 2, 16384, None, 128, 0.0, "stem"),  # a sparse Stem plan
    (torch.float16, 2, 4, 1, 3000, None, 256, 4.0, "dense"),  # odd length, padding keys, K offset
    (torch.bfloat16, 1, 4, 2, 1000, 1500, 128, 0.0, "random"),  # chunked prefill: Lq < Lk, unaligned offset
])
@torch.no_grad()
def test_gpu_hub_fp8_matches_float64(dtype, B, Hq, Hkv, L, q_offset, bs, k_shift, kind, gen):
    """The Hub kernel's FP8 path against float64 on the true q/k/v: a wrong key order, scale or
    mask gives errors of order 1, e4m3 rounding about 5 %."""
    import stem

    _hub_fp8_or_skip()
    Lk = L if q_offset is None else q_offset + L
    q = torch.randn(B, Hq, L, 128, generator=gen).to(dtype).cuda()
    k = torch.randn(B, Hkv, Lk, 128, generator=gen) + k_shift * torch.randn(1, 1, 1, 128, generator=gen)
    k = k.to(dtype).cuda()
    v = torch.randn(B, Hkv, Lk, 128, generator=gen).to(dtype).cuda()
    off = Lk - L if q_offset is None else q_offset
    if kind == "stem":
        plan = stem.plan(q, k, v)
        assert not plan.dense
    else:
        plan = random_plan(B, Hq, L, Lk, bs, off, gen, dense=kind == "dense").to("cuda")
    scale = 1.0 / math.sqrt(128)
    ref, ref_lse = reference(q, k, v, plan, scale)
    out, lse = stem.attention(q, k, v, plan=plan, precision="fp8", backend="hub", return_lse=True)
    assert "hub, precision='fp8'" in stem.last_dispatch()
    err = rel_err(out, ref)
    tri = stem.attention(q, k, v, plan=plan, precision="fp8", backend="triton")
    print(f"hub fp8 relative error {err:.4f}; triton fp8 {rel_err(tri, ref):.4f}")
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert err <= FP8_TOL, f"hub fp8 relative error {err:.4f} > {FP8_TOL}"
    assert (lse.double() - ref_lse).abs().max().item() <= LSE_TOL
    auto = stem.attention(q, k, v, plan=plan, precision="fp8")
    assert "hub, precision='fp8' (backend='auto')" in stem.last_dispatch()
    assert torch.equal(auto, out)
    # only P V in FP8: a smaller error (V and P rounded, not Q and K), the exact lse
    pv, lse_pv = stem.attention(q, k, v, plan=plan, precision="fp8_pv", return_lse=True)
    assert "hub, precision='fp8_pv'" in stem.last_dispatch()
    err_pv = rel_err(pv, ref)
    print(f"hub fp8_pv relative error {err_pv:.4f}")
    assert pv.dtype == dtype and torch.isfinite(pv).all()
    assert err_pv <= FP8_PV_TOL and err_pv < err, f"fp8_pv relative error {err_pv:.4f} (fp8: {err:.4f})"
    assert (lse_pv.double() - ref_lse).abs().max().item() <= 2e-3


@pytest.mark.gpu
@needs_fp8_gpu
@torch.no_grad()
def test_gpu_hub_fp8_refusals():
    import stem

    hub = _hub_fp8_or_skip()
    q = torch.randn(1, 2, 512, 64, device="cuda", dtype=torch.bfloat16)
    assert "head dim 128" in hub.fp8_unsupported_reason(q, 128)
    with pytest.raises(ValueError, match="head dim 128"):
        stem.attention(q, q, q, precision="fp8", backend="hub")
    stem.attention(q, q, q, precision="fp8")  # auto: the Triton FP8 path, saying why not the hub
    assert "triton, precision='fp8'" in stem.last_dispatch() and "head dim 128" in stem.last_dispatch()
    q = torch.randn(1, 2, 512, 128, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="128 or 256"):
        stem.attention(q, q, q, precision="fp8", backend="hub", config=stem.StemConfig(block_size=64))
    q64 = torch.randn(1, 2, 512, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="'fp8_pv' runs on the Hub kernel only.*head dim 128"):
        stem.attention(q64, q64, q64, precision="fp8_pv")


if __name__ == "__main__":
    _child_main()
