"""GPU tests of the stem-attention kernel, loaded the way users load it: ``kernels.get_kernel``.

``LOCAL_KERNELS=stem-attention/stem-attention=<this kernel's directory>`` points ``get_kernel`` at
the build tree (``build/<variant>/``, made by ``python hub_kernels/build.py``). The tests need
torch, ``kernels`` and a CUDA GPU, nothing else: the oracle is a dense float64 attention over the
same plan written below. Outputs are poisoned first (NaN-filled memory is freed into the caching
allocator right before the kernel allocates its outputs), so an unwritten element shows up as NaN.
Both kernels are tested on every device through the op's ``kernel`` argument (``"sm80"`` runs
the sm80 kernel on Hopper too).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

pytestmark = pytest.mark.gpu

KERNEL_DIR = Path(__file__).resolve().parents[1]
REPO_ID = "stem-attention/stem-attention"
LOCAL_KERNELS = f"{REPO_ID}={KERNEL_DIR}"


@pytest.fixture(scope="module")
def hubmod():
    kernels = pytest.importorskip("kernels")
    if not list((KERNEL_DIR / "build").glob("torch*-cu*-*")):
        pytest.skip("no CUDA variant built: run `python hub_kernels/build.py` first")
    saved = os.environ.get("LOCAL_KERNELS")
    os.environ["LOCAL_KERNELS"] = LOCAL_KERNELS
    try:
        return kernels.get_kernel(REPO_ID, version=1)
    finally:
        if saved is None:
            del os.environ["LOCAL_KERNELS"]
        else:
            os.environ["LOCAL_KERNELS"] = saved


@pytest.fixture
def gen():
    """A seeded CPU generator; the seed is random per run and printed (replay: STEM_TEST_SEED)."""
    seed = int(os.environ.get("STEM_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"seed={seed} (replay with STEM_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)


# ---- plans and the oracle ----------------------------------------------------------------------
class Plan(NamedTuple):
    kv_counts: torch.Tensor  # int32 (B, Hq, nQ)
    kv_indices: torch.Tensor  # int32 (B, Hq, nQ, W), ascending in the first count entries
    block_size: int
    q_offset: int
    mask: torch.Tensor  # bool (B, Hq, nQ, nK): the selected blocks


def plan_from_mask(mask: torch.Tensor, block_size: int, q_offset: int) -> Plan:
    """Padded CSR of a block mask (non-causal blocks dropped), the layout of a stem BlockPlan."""
    nQ, nK = mask.shape[2], mask.shape[3]
    rows = torch.arange(nQ, device=mask.device) + q_offset // block_size
    mask = mask & (torch.arange(nK, device=mask.device)[None, :] <= rows[:, None])
    counts = mask.sum(-1, dtype=torch.int32)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)
    width = max(1, int(counts.max()))
    idx = torch.where(torch.arange(width, device=mask.device) < counts.unsqueeze(-1), order[..., :width], 0)
    return Plan(counts, idx.to(torch.int32).contiguous(), block_size, q_offset, mask)


def random_plan(B, Hq, Lq, Lk, bs, q_offset, density, gen, device="cuda") -> Plan:
    qbo = q_offset // bs
    nQ = (q_offset + Lq - 1) // bs - qbo + 1
    nK = -(-Lk // bs)
    mask = torch.rand(B, Hq, nQ, nK, generator=gen) < density
    rows = torch.arange(nQ)
    mask[..., rows, rows + qbo] = True  # every row sees its diagonal block
    return plan_from_mask(mask.to(device), bs, q_offset)


def reference(q, k, v, plan: Plan, scale: float):
    """Dense float64 attention restricted to the plan's blocks and the causal mask:
    (out float32, lse float32); rows that see no key get 0 and -inf."""
    B, Hq, Lq, D = q.shape
    Lk, bs = k.shape[2], plan.block_size
    pos = plan.q_offset + torch.arange(Lq, device=q.device)
    keys = torch.arange(Lk, device=q.device)
    qblock = pos // bs - plan.q_offset // bs
    allowed = plan.mask[:, :, qblock][..., keys // bs] & (keys[None, :] <= pos[:, None])
    g = Hq // k.shape[1]
    kf, vf = k.double().repeat_interleave(g, dim=1), v.double().repeat_interleave(g, dim=1)
    s = (q.double() @ kf.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0).unsqueeze(-1))
    return (p @ vf).float(), lse.float()


def expected_path(kernel: str, D: int, bs: int) -> int:
    """The specification: the sm90 kernel on compute capability 9.0 for head dims 64/128/256 and
    plan blocks of 128 or 256 tokens, unless the sm80 kernel is asked for; else the sm80 kernel."""
    sm90 = torch.cuda.get_device_capability() == (9, 0) and D in (64, 128, 256) and bs in (128, 256)
    return 90 if sm90 and kernel != "sm80" else 80


def poison_allocator(*shapes_dtypes):
    """Fill freed allocator blocks of these sizes with NaN, so that fresh outputs start as NaN."""
    bufs = [torch.full(s, float("nan"), dtype=d, device="cuda") for s, d in shapes_dtypes]
    del bufs


def run_and_check(hubmod, q, k, v, plan, *, kernel="auto", return_lse=True, scale=None):
    B, Hq, Lq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    poison_allocator(((B, Hq, Lq, D), q.dtype), ((B, Hq, Lq), torch.float32))
    out, lse = hubmod.block_sparse_attn_fwd(q, k, v, plan.kv_counts, plan.kv_indices, plan.block_size,
                                            plan.q_offset, scale, return_lse, kernel=kernel)
    torch.cuda.synchronize()
    assert hubmod.ops.last_kernel_path() == expected_path(kernel, D, plan.block_size)
    ref, ref_lse = reference(q, k, v, plan, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all(), "unwritten (NaN) or non-finite output elements"
    o = out.float()
    rel = float((o - ref).norm() / ref.norm())
    # Elementwise: an absolute floor plus two units of the output dtype's rounding at |ref| (the
    # kernel rounds P and the output to bf16/fp16; the reference keeps float32 until the end).
    atol, rtol, tol_rel = (2e-2, 2 ** -6, 1e-2) if q.dtype == torch.bfloat16 else (2e-3, 2 ** -9, 2e-3)
    excess = float(((o - ref).abs() - (atol + rtol * ref.abs())).max())
    assert rel < tol_rel and excess <= 0, f"rel {rel:.2e}, worst excess over tolerance {excess:.2e}"
    if return_lse:
        assert lse is not None and lse.dtype == torch.float32 and lse.shape == (B, Hq, Lq)
        assert torch.isfinite(lse).all()
        assert float((lse - ref_lse).abs().max()) < 2e-3
    else:
        assert lse is None
    return out, lse


def randn(shape, dtype, gen):
    return torch.randn(shape, generator=gen).to(dtype).cuda()


SHAPES = [  # (Lq, Lk, q_offset or None for Lk - Lq)
    (333, 333, None),
    (1000, 1000, None),
    (77, 611, None),  # chunked prefill, Lq < Lk
    (129, 700, 200),  # a chunk in the middle (context parallel)
    (1, 257, None),  # one query row
]
KERNELS = ["auto", "sm80", "sm90"]


# ---- the supports contract ------------------------------------------------------------------
def test_kernel_path_op_matches_the_specification(hubmod):
    """The compiled contract (csrc/supported.h through the op) against the written specification."""
    for dtype, code in ((torch.float16, 0), (torch.bfloat16, 1), (torch.float32, -1)):
        for D in (32, 64, 96, 128, 256):
            for bs in (32, 64, 128, 256, 512):
                for cc in ((7, 5), (8, 0), (8, 9), (9, 0), (10, 0)):
                    for kernel, sm in (("auto", 0), ("sm80", 80), ("sm90", 90)):
                        ok = code >= 0 and D in (64, 128, 256) and bs in (64, 128, 256) and cc >= (8, 0)
                        sm90 = ok and cc == (9, 0) and bs in (128, 256)
                        want = 0 if not ok or (kernel == "sm90" and not sm90) else (90 if sm90 and sm != 80 else 80)
                        got = hubmod.ops.kernel_path(code, D, bs, cc[0], cc[1], sm)
                        reason = hubmod.ops.kernel_path_reason(code, D, bs, cc[0], cc[1], sm)
                        assert got == want, (dtype, D, bs, cc, kernel, got, reason)
                        assert (reason == "") == (want != 0), (dtype, D, bs, cc, kernel, reason)


@pytest.mark.parametrize("kernel", KERNELS)
def test_supports_and_kernel_for(hubmod, kernel):
    for D in (64, 128, 256):
        for bs in (64, 128, 256):
            for dtype in (torch.float16, torch.bfloat16):
                want = expected_path(kernel, D, bs)
                if kernel == "sm90" and want != 90:
                    assert "sm90 kernel needs" in hubmod.supports(dtype, D, bs, "cuda", kernel=kernel)
                    with pytest.raises(ValueError, match="sm90 kernel needs"):
                        hubmod.kernel_for(dtype, D, bs, "cuda", kernel=kernel)
                else:
                    assert hubmod.supports(dtype, D, bs, "cuda", kernel=kernel) is None
                    assert hubmod.kernel_for(dtype, D, bs, "cuda", kernel=kernel) == f"sm{want}"
    assert "head dim 96" in hubmod.supports(torch.bfloat16, 96, 128, "cuda")
    assert "float16, bfloat16" in hubmod.supports(torch.float32, 128, 128, "cuda")
    assert "block size 32" in hubmod.supports(torch.bfloat16, 128, 32, "cuda")
    assert "CUDA" in hubmod.supports(torch.bfloat16, 128, 128, "cpu")
    with pytest.raises(ValueError, match="kernel must be one of"):
        hubmod.supports(torch.bfloat16, 128, 128, "cuda", kernel="sm100")


# ---- results ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bs", [64, 128, 256])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"Lq{s[0]}-Lk{s[1]}-off{s[2]}")
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_matches_reference(hubmod, gen, kernel, D, dtype, heads, shape, bs):
    Hq, Hkv = heads
    Lq, Lk, off = shape
    off = Lk - Lq if off is None else off
    B = 2
    q = randn((B, Hq, Lq, D), dtype, gen)
    k = randn((B, Hkv, Lk, D), dtype, gen)
    v = (torch.randn(B, Hkv, Lk, D, generator=gen) * (0.2 + 3 * torch.rand(B, Hkv, Lk, 1, generator=gen)))
    v = v.to(dtype).cuda()
    plan = random_plan(B, Hq, Lq, Lk, bs, off, 0.4, gen)
    if kernel == "sm90" and expected_path("sm90", D, bs) != 90:
        with pytest.raises(ValueError, match="sm90 kernel needs"):
            hubmod.block_sparse_attn_fwd(q, k, v, plan.kv_counts, plan.kv_indices, bs, off, 0.1, kernel=kernel)
        return
    run_and_check(hubmod, q, k, v, plan, kernel=kernel)


# ---- packed variable-length batches ------------------------------------------------------------------
VARLEN_MIX = [(700, 700), (0, 90), (129, 1000), (333, 333), (1, 257), (1500, 1500)]  # (len_q, len_k)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bs", [64, 128])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_varlen_matches_each_sequence(hubmod, gen, kernel, D, bs):
    """One launch over a packed batch equals the reference of each sequence on its own plan rows
    (misaligned query offsets, an empty sequence, GQA); the output is poisoned first."""
    if kernel == "sm90" and expected_path("sm90", D, bs) != 90:
        pytest.skip("the sm90 kernel does not run this head dim / block size")
    Hq, Hkv, dtype = 8, 2, torch.bfloat16
    lens = VARLEN_MIX
    Tq, Tk = sum(a for a, _ in lens), sum(b for _, b in lens)
    q, k, v = randn((Tq, Hq, D), dtype, gen), randn((Tk, Hkv, D), dtype, gen), randn((Tk, Hkv, D), dtype, gen)
    plans = [random_plan(1, Hq, lq, lk, bs, lk - lq, 0.4, gen) if lq else None for lq, lk in lens]
    nQ = max(p.kv_counts.shape[2] for p in plans if p is not None) + 1  # one spare row: must stay unread
    W = max(p.kv_indices.shape[3] for p in plans if p is not None)
    counts = torch.zeros(len(lens), Hq, nQ, dtype=torch.int32, device="cuda")
    indices = torch.zeros(len(lens), Hq, nQ, W, dtype=torch.int32, device="cuda")
    for b, p in enumerate(plans):
        if p is not None:
            counts[b, :, : p.kv_counts.shape[2]] = p.kv_counts[0]
            indices[b, :, : p.kv_counts.shape[2], : p.kv_indices.shape[3]] = p.kv_indices[0]
    cu_q = torch.tensor([0] + [sum(a for a, _ in lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32,
                        device="cuda")
    cu_k = torch.tensor([0] + [sum(b for _, b in lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32,
                        device="cuda")
    scale = 1.0 / math.sqrt(D)
    poison_allocator(((Tq, Hq, D), dtype), ((Hq, Tq), torch.float32))
    out, lse = hubmod.block_sparse_attn_varlen_fwd(q, k, v, cu_q, cu_k, counts, indices, bs, scale, True,
                                                   kernel=kernel)
    torch.cuda.synchronize()
    assert hubmod.ops.last_kernel_path() == expected_path(kernel, D, bs)
    assert out.shape == q.shape and lse.shape == (Hq, Tq)
    assert torch.isfinite(out).all(), "unwritten (NaN) output rows"
    a_q = a_k = 0
    for (lq, lk), p in zip(lens, plans):
        if lq:
            qs = q[a_q : a_q + lq].transpose(0, 1)[None]
            ks, vs = (t[a_k : a_k + lk].transpose(0, 1)[None] for t in (k, v))
            ref, ref_lse = reference(qs, ks, vs, p, scale)
            o = out[a_q : a_q + lq].transpose(0, 1)[None].float()
            rel = float((o - ref).norm() / ref.norm())
            assert rel < 1e-2, f"sequence (len_q={lq}, len_k={lk}): relative error {rel:.2e}"
            assert float((lse[:, a_q : a_q + lq] - ref_lse[0]).abs().max()) < 2e-3
        a_q, a_k = a_q + lq, a_k + lk


def rising_scores(D, dtype, gen, L=1024):
    """q, k, v (1, 2, L, D) on the GPU whose scores rise late: every query has a common +1
    component, so a key with +a in every channel scores about a * sqrt(D). Keys [256, 384) score
    about 1.2: 1 to 2.5 log2 units above every earlier score of a row, under the sm90 kernel's
    margins (8, and 2.75 for e4m3 P), so it keeps exponentials above 1 against the stale row max;
    dropping their sums would be a 7% error. Key 700 scores about 12, more than 10 log2 units
    above that: the max must be raised, and O and the sums rescaled."""
    q = torch.randn(1, 2, L, D, generator=gen) * 0.3 + 1.0
    k = torch.randn(1, 2, L, D, generator=gen) * 0.3
    k[:, :, 256:384] += 1.2 / math.sqrt(D)
    k[:, :, 700] += 12.0 / math.sqrt(D)
    v = torch.randn(1, 2, L, D, generator=gen)
    return (t.to(dtype).cuda() for t in (q, k, v))


@pytest.mark.parametrize("kernel", ["auto", "sm80"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_row_max_rising_late(hubmod, gen, kernel, D, dtype):
    """Scores that rise after the first key tile, a little and then a lot (rising_scores)."""
    q, k, v = rising_scores(D, dtype, gen)
    run_and_check(hubmod, q, k, v, random_plan(1, 2, q.shape[2], q.shape[2], 128, 0, 1.1, gen), kernel=kernel)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("D", [128, 256])
def test_long_walk_wraps_the_pipeline(hubmod, gen, kernel, D):
    """Many key tiles per query tile (the sm90 K and V rings wrap dozens of times), GQA, bf16."""
    if kernel == "sm90" and expected_path("sm90", D, 128) != 90:
        pytest.skip("no sm90 kernel on this device")
    B, Hq, Hkv, L = 1, 8, 2, 128 * 40 + 5
    q, k, v = (randn((B, H, L, D), torch.bfloat16, gen) for H in (Hq, Hkv, Hkv))
    run_and_check(hubmod, q, k, v, random_plan(B, Hq, L, L, 128, 0, 0.9, gen), kernel=kernel)


@pytest.mark.parametrize("kernel", ["auto", "sm80"])
@pytest.mark.parametrize("D", [128, 256])
def test_strided_inputs(hubmod, gen, kernel, D):
    """(B, L, H, D) tensors viewed as (B, H, L, D): strided rows, no copy needed."""
    B, Hq, Hkv, L = 1, 4, 2, 300
    q, k, v = (randn((B, L, H, D), torch.bfloat16, gen).transpose(1, 2) for H in (Hq, Hkv, Hkv))
    run_and_check(hubmod, q, k, v, random_plan(B, Hq, L, L, 128, 0, 0.5, gen), kernel=kernel, return_lse=False)


@pytest.mark.parametrize("kernel", ["auto", "sm80"])
def test_dense_plan_equals_sdpa(hubmod, gen, kernel):
    B, Hq, Hkv, L, D = 1, 4, 4, 517, 64
    q, k, v = (randn((B, H, L, D), torch.float16, gen) for H in (Hq, Hkv, Hkv))
    plan = random_plan(B, Hq, L, L, 128, 0, 1.1, gen)
    out, _ = hubmod.block_sparse_attn_fwd(q, k, v, plan.kv_counts, plan.kv_indices, 128, 0, D ** -0.5, False,
                                          kernel=kernel)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert float((out.float() - ref).abs().max()) < 1e-2


@pytest.mark.parametrize("kernel", ["auto", "sm80"])
@pytest.mark.parametrize("D", [64, 256])
def test_zero_count_rows_give_zero_and_minus_inf(hubmod, gen, kernel, D):
    B, Hq, L, bs = 1, 2, 256, 128
    q, k, v = (randn((B, Hq, L, D), torch.bfloat16, gen) for _ in range(3))
    counts = torch.tensor([[[1, 0], [0, 2]]], dtype=torch.int32, device="cuda")
    idx = torch.tensor([[[[0, 0], [0, 0]], [[0, 0], [0, 1]]]], dtype=torch.int32, device="cuda")
    poison_allocator(((B, Hq, L, D), q.dtype), ((B, Hq, L), torch.float32))
    out, lse = hubmod.block_sparse_attn_fwd(q, k, v, counts, idx, bs, 0, D ** -0.5, True, kernel=kernel)
    assert hubmod.ops.last_kernel_path() == expected_path(kernel, D, bs)
    assert (out[0, 0, 128:] == 0).all() and (out[0, 1, :128] == 0).all()
    assert torch.isinf(lse[0, 0, 128:]).all() and (lse[0, 0, 128:] < 0).all()
    assert torch.isfinite(out[0, 0, :128]).all() and torch.isfinite(lse[0, 1, 128:]).all()


@pytest.mark.parametrize(
    "change, kernel, match",
    [
        (lambda q, k, v: (q.float(), k.float(), v.float()), "auto", "float16, bfloat16"),
        (lambda q, k, v: tuple(t[..., :96].contiguous() for t in (q, k, v)), "auto", "head dim 96"),
        (lambda q, k, v: (q, k, v), "sm100", "kernel must be one of"),
    ],
)
def test_bad_inputs_raise(hubmod, change, kernel, match):
    q = torch.randn(1, 2, 128, 128, device="cuda", dtype=torch.bfloat16)
    k = v = torch.randn(1, 2, 128, 128, device="cuda", dtype=torch.bfloat16)
    counts = torch.ones(1, 2, 1, dtype=torch.int32, device="cuda")
    idx = torch.zeros(1, 2, 1, 1, dtype=torch.int32, device="cuda")
    q, k, v = change(q, k, v)
    with pytest.raises((TypeError, ValueError), match=match):
        hubmod.block_sparse_attn_fwd(q, k, v, counts, idx, 128, 0, 0.1, False, kernel=kernel)


# ---- the op's own checks, past the Python wrapper ----------------------------------------
# Every TORCH_CHECK of torch_binding.cpp that inputs can reach, provoked by calling the raw op
# ops.block_sparse_attn_fwd (the wrapper's own checks bypassed): (name, call, what the message says).
# In the child: q (1, 4, 256, 128) and k, v (1, 2, 256, 128) bf16, a valid plan of 128-token blocks
# (counts (1, 4, 2), idx (1, 4, 2, 1)); call(**changes) runs the op with some arguments replaced.
OP_CHECKS = [
    ("q on the CPU", "call(q=q.cpu())", "q, k, v, kv_counts and kv_indices must be CUDA tensors"),
    ("kv_counts on the CPU", "call(counts=counts.cpu())", "must be CUDA tensors"),
    ("two devices", "call(k=k.to('cuda:1'), v=v.to('cuda:1'))", "all tensors must be on one device"),
    ("mixed dtypes", "call(k=k.half(), v=v.half())", "q, k, v must share one dtype"),
    ("3-d q", "call(q=q[0])", r"q must be 4-d \(B, H, L, D\), got \[4, 256, 128\]"),
    ("head-dim stride", "call(q=q.transpose(2, 3).contiguous().transpose(2, 3))",
     "q needs unit stride on the head dim"),
    ("row stride not 16 bytes", "call(k=padded(k, 4), v=padded(v, 4))",
     r"k strides must be multiples of 8 elements \(16-byte rows\); got \[67584, 33792, 132, 1\]"),
    ("misaligned rows", "call(v=shifted(v))", "v must be 16-byte aligned"),
    ("dtype float32", "call(q=q.float(), k=k.float(), v=v.float())", r"dtype is not supported \(float16, bfloat16\)"),
    ("head dim 96", "call(q=q[..., :96].contiguous(), k=k[..., :96].contiguous(), v=v[..., :96].contiguous())",
     r"head dim 96 is not supported \(64, 128, 256\)"),
    ("block size 100", "call(bs=100)", r"plan block size 100 is not supported \(64, 128, 256\)"),
    ("kernel request 70", "call(sm=70)", r"kernel request 70 is not one of 0 \(auto\), 80 \(sm80\), 90 \(sm90\)"),
    ("sm90 for 64-token blocks", "call(bs=64, counts=ones(1, 4, 4), idx=zeros(1, 4, 4, 1), sm=90)",
     "the sm90 kernel needs compute capability 9.0, head dim 64, 128 or 256 and plan blocks of 128 or 256 tokens"),
    ("v shape differs from k", "call(v=v[:, :, :128])", r"k and v must be \(B, Hkv, Lk, D\) matching q"),
    ("batch of k differs", "call(k=k.expand(2, -1, -1, -1), v=v.expand(2, -1, -1, -1))",
     r"k and v must be \(B, Hkv, Lk, D\) matching q; got q \[1, 4, 256, 128\], k \[2, 2, 256, 128\]"),
    ("head ratio", "call(k=k[:, :1].expand(1, 3, -1, -1), v=v[:, :1].expand(1, 3, -1, -1))",
     r"query heads \(4\) must be a multiple of kv heads \(3\)"),
    ("Lq > Lk", "call(k=k[:, :, :128], v=v[:, :, :128])", r"need 0 < Lq <= Lk < 2\^30, got Lq=256, Lk=128"),
    ("Lq = 0", "call(q=q[:, :, :0])", r"need 0 < Lq <= Lk < 2\^30, got Lq=0, Lk=256"),
    ("q_offset past the end", "call(q=q[:, :, :128], counts=ones(1, 4, 1), idx=zeros(1, 4, 1, 1), q_offset=129)",
     r"q_offset \(129\) must lie in \[0, Lk - Lq\] = \[0, 128\]"),
    ("negative q_offset", "call(q_offset=-1)", r"q_offset \(-1\) must lie in \[0, Lk - Lq\] = \[0, 0\]"),
    ("scale 0", "call(scale=0.0)", "scale must be finite and > 0, got 0"),
    ("scale nan", "call(scale=float('nan'))", "scale must be finite and > 0, got nan"),
    ("int64 kv_counts", "call(counts=counts.long())", "kv_counts and kv_indices must be int32"),
    ("int64 kv_indices", "call(idx=idx.long())", "kv_counts and kv_indices must be int32"),
    ("non-contiguous kv_counts", "call(counts=ones(1, 2, 4).transpose(1, 2))",
     "kv_counts and kv_indices must be contiguous"),
    ("kv_counts shape", "call(counts=ones(1, 4, 3))",
     r"kv_counts must be \(B, Hq, nQ\) = \(1, 4, 2\), got \[1, 4, 3\]"),
    ("kv_indices shape", "call(idx=zeros(1, 4, 2, 0))", r"kv_indices must be \(B, Hq, nQ, W>=1\), got \[1, 4, 2, 0\]"),
    ("batch 65536", "call(**tiny(B=65536))", "batch and heads must be < 65536"),
    ("heads 65536", "call(**tiny(H=65536))", "batch and heads must be < 65536"),
]

_OP_CHECKS_CHILD = r"""
import json, sys
import kernels, torch
mod = kernels.get_kernel(sys.argv[1], version=1)
gen = torch.Generator(device="cuda").manual_seed(0)
q = torch.randn(1, 4, 256, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
k = torch.randn(1, 2, 256, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
v = torch.randn(1, 2, 256, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
ones = lambda *s: torch.ones(*s, dtype=torch.int32, device="cuda")
zeros = lambda *s: torch.zeros(*s, dtype=torch.int32, device="cuda")
counts, idx = ones(1, 4, 2), zeros(1, 4, 2, 1)

def call(q=q, k=k, v=v, counts=counts, idx=idx, bs=128, q_offset=0, scale=0.1, lse=True, sm=0):
    return mod.ops.block_sparse_attn_fwd(q, k, v, counts, idx, bs, q_offset, scale, lse, sm)

def padded(t, extra):  # rows of D + extra elements: strides not multiples of 8 elements
    return torch.zeros(*t.shape[:-1], t.shape[-1] + extra, device="cuda", dtype=t.dtype)[..., :t.shape[-1]]

def shifted(t):  # contiguous strides, data 2 bytes past a 16-byte boundary
    return torch.zeros(t.numel() + 8, device="cuda", dtype=t.dtype)[1:t.numel() + 1].view(t.shape)

def tiny(B=1, H=1):  # B x H rows of one token, head dim 64, everything else valid
    t = torch.randn(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16).expand(B, H, 1, 64)
    return dict(q=t, k=t[:, :1], v=t[:, :1], counts=ones(B, H, 1), idx=zeros(B, H, 1, 1))

def run(name, expr):
    if "cuda:1" in expr and torch.cuda.device_count() < 2:
        return {"case": name, "skip": "needs two GPUs"}
    try:
        eval(expr)
        torch.cuda.synchronize()
        return {"case": name, "returned": True}
    except Exception as e:
        return {"case": name, "type": type(e).__name__, "message": str(e).splitlines()[0]}

for name, expr in [("valid before", "call()")] + json.loads(sys.argv[2]) + [("valid after", "call()")]:
    print(json.dumps(run(name, expr)), flush=True)
"""


@pytest.fixture(scope="module")
def op_check_results(hubmod):
    """Runs every OP_CHECKS call in one child process; {case: result}, plus the child's exit status."""
    env = {**os.environ, "LOCAL_KERNELS": LOCAL_KERNELS}
    cases = [[name, expr] for name, expr, _ in OP_CHECKS]
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _OP_CHECKS_CHILD, REPO_ID, json.dumps(cases)],
                       capture_output=True, text=True, timeout=300, env=env)
    results = {}
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            d = json.loads(line)
            results[d["case"]] = d
    return r, results


def test_op_checks_leave_the_process_alive(op_check_results):
    """No failing check crashes the process: the child exits cleanly and a valid call runs after
    all of them."""
    r, results = op_check_results
    last = list(results)[-1] if results else "(none)"
    assert r.returncode == 0, f"the child died (rc {r.returncode}) after case {last!r}: {r.stderr[-3000:]}"
    assert results.get("valid before", {}).get("returned") and results.get("valid after", {}).get("returned"), results
    assert set(results) == {"valid before", "valid after"} | {name for name, _, _ in OP_CHECKS}


@pytest.mark.parametrize("name, expr, match", OP_CHECKS, ids=[c[0] for c in OP_CHECKS])
def test_op_check_raises(op_check_results, name, expr, match):
    """The raw op raises a RuntimeError whose message names the problem."""
    r, results = op_check_results
    res = results.get(name)
    if res is None:
        pytest.fail(f"{name!r} never ran: the child died before it (rc {r.returncode}): {r.stderr[-2000:]}")
    if "skip" in res:
        pytest.skip(res["skip"])
    assert not res.get("returned"), f"{expr} returned instead of raising"
    assert res["type"] == "RuntimeError", res
    assert res["message"].startswith("stem_attention.block_sparse_attn_fwd: "), res["message"]
    assert re.search(match, res["message"]), res["message"]


# ---- capture and compilation -------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["auto", "sm80"])
def test_cuda_graph_capture_and_replay(hubmod, gen, kernel):
    """The op captures into a CUDA graph (tensor maps are kernel parameters, no host sync) and a
    replay on new data in the same buffers gives the eager result."""
    B, Hq, Hkv, L, D = 1, 4, 2, 128 * 6 + 9, 128
    q, k, v = (randn((B, H, L, D), torch.bfloat16, gen) for H in (Hq, Hkv, Hkv))
    plan = random_plan(B, Hq, L, L, 128, 0, 0.6, gen)

    def call():
        return hubmod.block_sparse_attn_fwd(q, k, v, plan.kv_counts, plan.kv_indices, 128, 0, D ** -0.5, True,
                                            kernel=kernel)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g, lse_g = call()
    for t in (q, k, v):
        t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
    graph.replay()
    torch.cuda.synchronize()
    out_e, lse_e = call()
    assert torch.equal(out_g, out_e) and torch.equal(lse_g, lse_e)
    ref, _ = reference(q, k, v, plan, D ** -0.5)
    assert float((out_g.float() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.parametrize("return_lse", [True, False])
def test_torch_compile_fullgraph(hubmod, gen, return_lse):
    """torch.compile(fullgraph=True) traces the wrapper and the op (its registered fake gives the
    output shapes) with no graph break, and the compiled function returns the eager result."""
    torch._dynamo.reset()
    B, Hq, Hkv, L, D = 1, 4, 2, 128 * 5 + 3, 128
    q, k, v = (randn((B, H, L, D), torch.bfloat16, gen) for H in (Hq, Hkv, Hkv))
    plan = random_plan(B, Hq, L, L, 128, 0, 0.6, gen)

    def attend(q, k, v, counts, idx):
        out, lse = hubmod.block_sparse_attn_fwd(q * 1.0, k, v, counts, idx, 128, 0, D ** -0.5, return_lse)
        return (out + 0, lse) if return_lse else (out + 0, None)

    compiled = torch.compile(attend, fullgraph=True)
    out_c, lse_c = compiled(q, k, v, plan.kv_counts, plan.kv_indices)
    out_e, lse_e = attend(q, k, v, plan.kv_counts, plan.kv_indices)
    assert out_c.shape == q.shape and out_c.dtype == q.dtype
    assert torch.equal(out_c, out_e)
    if return_lse:
        assert lse_c.shape == (B, Hq, L) and lse_c.dtype == torch.float32 and torch.equal(lse_c, lse_e)
    else:
        assert lse_c is None

    # the fake implementation alone: shapes under FakeTensorMode
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fc, fi = mode.from_tensor(plan.kv_counts), mode.from_tensor(plan.kv_indices)
        fo, fl = hubmod.ops.block_sparse_attn_fwd(fq, fk, fv, fc, fi, 128, 0, 0.1, return_lse, 0)
    assert tuple(fo.shape) == tuple(q.shape) and fo.dtype == q.dtype
    assert tuple(fl.shape) == ((B, Hq, L) if return_lse else (0,)) and fl.dtype == torch.float32


# ---- the FP8 op (sm90, head dim 128) ------------------------------------------------------------
E4M3_MAX = 448.0


def fp8_key_columns(Lp: int) -> torch.Tensor:
    """Column of each key in vt8, from the PTX ISA's register layouts: in a 32-key k-step the e4m3 A
    fragment gives thread (lane % 4 = c) columns 4c..4c+3 and 16+4c..16+4c+3; the float32 score
    fragment gives it keys 8j+2c, 8j+2c+1 (j = 0..3), packed j = 0, 1 then j = 2, 3."""
    cols = torch.empty(Lp, dtype=torch.long)
    for base in range(0, Lp, 32):
        for c in range(4):
            keys = [2 * c, 2 * c + 1, 8 + 2 * c, 9 + 2 * c, 16 + 2 * c, 17 + 2 * c, 24 + 2 * c, 25 + 2 * c]
            for i, key in enumerate(keys):
                cols[base + key] = base + (4 * c + i if i < 4 else 16 + 4 * c + i - 4)
    return cols


def quantize_fp8(q, k, v):
    """The op's input contract written in torch (no smoothing of K): returns the op's tensors and
    the dequantised q, k, v in float64."""
    B, Hkv, Lk, D = k.shape
    Lp = -(-Lk // 128) * 128
    qs = (q.float().abs().amax(-1) / E4M3_MAX).clamp_min(1e-30)
    q8 = (q.float() / qs[..., None]).to(torch.float8_e4m3fn)
    kp = torch.nn.functional.pad(k.float(), (0, 0, 0, Lp - Lk))
    ks = (kp.view(B, Hkv, Lp // 128, -1).abs().amax(-1) / E4M3_MAX).clamp_min(1e-30)
    k8 = (kp / ks.repeat_interleave(128, -1)[..., None]).to(torch.float8_e4m3fn)
    vp = torch.nn.functional.pad(v.float(), (0, 0, 0, Lp - Lk))
    vs = (vp.abs().amax(2) / E4M3_MAX).clamp_min(1e-30)  # (B, Hkv, D)
    v8 = (vp / vs[:, :, None, :]).to(torch.float8_e4m3fn)  # (B, Hkv, Lp, D)
    vt8 = torch.empty(B, Hkv, D, Lp, dtype=torch.float8_e4m3fn, device=v.device)
    vt8[..., fp8_key_columns(Lp).to(v.device)] = v8.transpose(-1, -2)
    deq = (q8.double() * qs[..., None].double(),
           (k8.double() * ks.repeat_interleave(128, -1)[..., None].double())[:, :, :Lk],
           (v8.double() * vs[:, :, None, :].double())[:, :, :Lk])
    return (q8.contiguous(), k8.contiguous(), vt8.contiguous(), qs.contiguous(), ks.contiguous(),
            vs.contiguous()), deq


needs_fp8 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                               reason="the FP8 op runs on compute capability 9.0")


@needs_fp8
@pytest.mark.parametrize("dtype,B,Hq,Hkv,Lq,Lk,q_offset,bs", [
    (torch.bfloat16, 1, 4, 2, 1000, 1000, None, 128),
    (torch.float16, 2, 2, 1, 333, 777, None, 256),  # chunked prefill, padding keys
    (torch.bfloat16, 1, 2, 2, 129, 700, 200, 128),  # a chunk in the middle
])
def test_fp8_matches_dequantised_reference(hubmod, gen, dtype, B, Hq, Hkv, Lq, Lk, q_offset, bs):
    """Against float64 attention on the dequantised inputs, the only error left is the e4m3
    rounding of the probabilities (about 2 %); a wrong key order or scale gives errors of order 1."""
    assert hubmod.supports_fp8(128, bs) is None
    assert "head dim 128" in hubmod.supports_fp8(64, bs)
    q = randn((B, Hq, Lq, 128), dtype, gen)
    k, v = randn((B, Hkv, Lk, 128), dtype, gen), randn((B, Hkv, Lk, 128), dtype, gen)
    off = Lk - Lq if q_offset is None else q_offset
    plan = random_plan(B, Hq, Lq, Lk, bs, off, 0.6, gen)
    args, (qd, kd, vd) = quantize_fp8(q, k, v)
    poison_allocator(((B, Hq, Lq, 128), dtype), ((B, Hq, Lq), torch.float32))
    out, lse = hubmod.block_sparse_attn_fp8_fwd(*args, plan.kv_counts, plan.kv_indices, bs, off, Lk, 128 ** -0.5,
                                                True, out_dtype=dtype)
    ref, ref_lse = reference(qd, kd, vd, plan, 128 ** -0.5)
    assert out.dtype == dtype and out.shape == q.shape and torch.isfinite(out).all()
    rel = float((out.float() - ref).norm() / ref.norm())
    assert rel < 0.04, f"relative error {rel:.4f} against the dequantised inputs"
    assert float((lse - ref_lse).abs().max()) < 2e-3


@needs_fp8
@pytest.mark.parametrize("dtype,Lq,Lk,bs", [(torch.bfloat16, 1000, 1000, 128), (torch.float16, 333, 777, 256)])
def test_fp8_pv_only_matches_reference(hubmod, gen, dtype, Lq, Lk, bs):
    """q, k in the output dtype: only O += P V in e4m3. Against float64 attention with V
    dequantised, the error left is the rounding of P (about 2 %)."""
    B, Hq, Hkv = 1, 4, 2
    q = randn((B, Hq, Lq, 128), dtype, gen)
    k, v = randn((B, Hkv, Lk, 128), dtype, gen), randn((B, Hkv, Lk, 128), dtype, gen)
    plan = random_plan(B, Hq, Lq, Lk, bs, Lk - Lq, 0.6, gen)
    (_, _, vt8, _, _, vs), (_, _, vd) = quantize_fp8(q, k, v)
    none = torch.empty(0, 0, 0, device="cuda")
    poison_allocator(((B, Hq, Lq, 128), dtype), ((B, Hq, Lq), torch.float32))
    out, lse = hubmod.block_sparse_attn_fp8_fwd(q, k, vt8, none, none, vs, plan.kv_counts, plan.kv_indices, bs,
                                                Lk - Lq, Lk, 128 ** -0.5, True, out_dtype=dtype)
    ref, ref_lse = reference(q, k, vd, plan, 128 ** -0.5)
    assert out.dtype == dtype and torch.isfinite(out).all()
    rel = float((out.float() - ref).norm() / ref.norm())
    assert rel < 0.035, f"relative error {rel:.4f} against V dequantised"
    assert float((lse - ref_lse).abs().max()) < 2e-3


@needs_fp8
@pytest.mark.parametrize("pv_only", [False, True], ids=["fp8", "fp8_pv"])
def test_fp8_row_max_rising_late(hubmod, gen, pv_only):
    """rising_scores through the FP8 op (margin 2.75 for e4m3 P, stored as p * 64 under e4m3's
    largest value, 448)."""
    dtype, L = torch.bfloat16, 1024
    q, k, v = rising_scores(128, dtype, gen, L)
    plan = random_plan(1, 2, L, L, 128, 0, 1.1, gen)
    args, (qd, kd, vd) = quantize_fp8(q, k, v)
    if pv_only:
        none = torch.empty(0, 0, 0, device="cuda")
        args = (q, k, args[2], none, none, args[5])
        qd, kd = q.double(), k.double()
    poison_allocator(((1, 2, L, 128), dtype), ((1, 2, L), torch.float32))
    out, lse = hubmod.block_sparse_attn_fp8_fwd(*args, plan.kv_counts, plan.kv_indices, 128, 0, L, 128 ** -0.5,
                                                True, out_dtype=dtype)
    ref, ref_lse = reference(qd, kd, vd, plan, 128 ** -0.5)
    assert torch.isfinite(out).all()
    rel = float((out.float() - ref).norm() / ref.norm())
    assert rel < 0.04, f"relative error {rel:.4f} against the dequantised inputs"
    assert float((lse - ref_lse).abs().max()) < 2e-3


@needs_fp8
def test_fp8_op_checks_and_compile(hubmod, gen):
    torch._dynamo.reset()
    q, k, v = (randn((1, 2, 300, 128), torch.bfloat16, gen) for _ in range(3))
    plan = random_plan(1, 2, 300, 300, 128, 0, 0.6, gen)
    args, _ = quantize_fp8(q, k, v)
    with pytest.raises(RuntimeError, match="plan blocks must be 128 or 256"):
        hubmod.block_sparse_attn_fp8_fwd(*args, plan.kv_counts, plan.kv_indices, 64, 0, 300, 0.1)
    with pytest.raises(RuntimeError, match="float8_e4m3fn"):
        hubmod.block_sparse_attn_fp8_fwd(q, *args[1:], plan.kv_counts, plan.kv_indices, 128, 0, 300, 0.1)

    def attend(counts, idx):
        out, _ = hubmod.block_sparse_attn_fp8_fwd(*args, counts, idx, 128, 0, 300, 128 ** -0.5)
        return out * 2

    out_c = torch.compile(attend, fullgraph=True)(plan.kv_counts, plan.kv_indices)
    assert torch.equal(out_c, attend(plan.kv_counts, plan.kv_indices))
