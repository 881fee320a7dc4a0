"""BlockPlan.to_flex_block_mask against the plan's own dense mask and causality (CPU).

The expected token-level mask is built independently of the converter: key token k is visible to
query row r (absolute position q_offset + r) iff the plan selects the block pair
(to_dense_mask) and q_offset + r >= k. The BlockMask is read back three ways: its block-level
``to_dense()``, its full / partial block lists expanded to tokens with its own ``mask_mod``, and
compiled FlexAttention on the CPU against a float64 masked softmax (marked slow: compiling).
"""

import os
import shutil

import pytest
import torch

import stem
from stem.plan import BlockPlan

flex_mod = pytest.importorskip("torch.nn.attention.flex_attention")

# (q_len, kv_len, block_size): prefill, lengths off the block grid, chunked prefill at an aligned offset
GEOMETRIES = [(64, 64, 16), (100, 100, 16), (48, 112, 16), (37, 101, 16), (200, 328, 32)]


def _random_plan(q_len, kv_len, bs, gen, B=2, H=3, p=0.5):
    nK = -(-kv_len // bs)
    qbo = (kv_len - q_len) // bs
    nQ = (kv_len - 1) // bs - qbo + 1
    mask = torch.rand(B, H, nQ, nK, generator=gen) < p
    return BlockPlan.from_dense_mask(mask, block_size=bs, q_len=q_len, kv_len=kv_len)


def _expected_token_mask(plan):
    """bool (B, Hq, q_len, kv_len): the plan's blocks, causally, at token level."""
    bs = plan.block_size
    rows = torch.arange(plan.q_len) + plan.q_offset  # absolute query positions
    cols = torch.arange(plan.kv_len)
    blocks = plan.to_dense_mask()[:, :, rows // bs - plan.q_block_offset][..., cols // bs]
    return blocks & (rows[:, None] >= cols[None, :])


def _token_mask_from_block_mask(bm, q_len, kv_len):
    """Expand a BlockMask's full and partial block lists to tokens (partial ones through mask_mod)."""
    bs_q, bs_k = bm.BLOCK_SIZE
    B, H = bm.kv_num_blocks.shape[:2]
    out = torch.zeros(B, H, q_len, kv_len, dtype=torch.bool)
    lists = [(bm.full_kv_num_blocks, bm.full_kv_indices, True), (bm.kv_num_blocks, bm.kv_indices, False)]
    for counts, indices, is_full in lists:
        for b in range(B):
            for h in range(H):
                for i in range(counts.shape[2]):
                    for j in indices[b, h, i, : int(counts[b, h, i])].tolist():
                        r = torch.arange(i * bs_q, min((i + 1) * bs_q, q_len))
                        c = torch.arange(j * bs_k, min((j + 1) * bs_k, kv_len))
                        if is_full:
                            out[b, h, r[:, None], c[None, :]] = True
                        else:
                            keep = bm.mask_mod(torch.tensor(b), torch.tensor(h), r[:, None], c[None, :])
                            out[b, h, r[:, None], c[None, :]] |= keep
    return out


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_block_mask_equals_plan_and_causality(geometry, gen):
    q_len, kv_len, bs = geometry
    plan = _random_plan(q_len, kv_len, bs, gen)
    bm = plan.to_flex_block_mask()
    B, H, nQ, nK = plan.to_dense_mask().shape
    assert tuple(bm.shape) == (B, H, q_len, kv_len) and tuple(bm.BLOCK_SIZE) == (bs, bs)
    assert bm.kv_num_blocks.shape == (B, H, nQ) and bm.full_kv_indices.shape == (B, H, nQ, nK)
    # block level: selected causal blocks, nothing else
    diag = torch.arange(nQ) + plan.q_block_offset
    causal_blocks = torch.arange(nK)[None, :] <= diag[:, None]
    want_blocks = plan.to_dense_mask() & causal_blocks
    assert torch.equal(bm.to_dense().bool(), want_blocks)
    # only diagonal blocks are partial, every other selected block is full
    assert bool((bm.kv_indices[..., 0] == diag.to(torch.int32)).all())
    diag_selected = want_blocks.gather(-1, diag.view(1, 1, nQ, 1).expand(B, H, nQ, 1))[..., 0]
    assert torch.equal(bm.kv_num_blocks.bool(), diag_selected)
    assert int(bm.full_kv_num_blocks.sum()) == int(want_blocks.sum()) - int(bm.kv_num_blocks.sum())
    # token level, through the BlockMask's own lists and mask_mod
    assert torch.equal(_token_mask_from_block_mask(bm, q_len, kv_len), _expected_token_mask(plan))


def _masked_softmax_attention(q, k, v, mask):
    """float64 attention with an explicit bool (B, Hq, Lq, Lk) mask; fully masked rows give 0."""
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


def _compiled_flex():
    # Eager flex_attention applies mask_mod densely and ignores the block lists, so only the
    # compiled kernel (inductor's CPU template, built with the C++ compiler) tests the lists.
    if not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++", "c++")):
        pytest.skip("compiled FlexAttention on the CPU needs a C++ compiler")
    return torch.compile(flex_mod.flex_attention, dynamic=False)


@pytest.mark.slow
@pytest.mark.parametrize("geometry", [(64, 64, 16), (100, 100, 16), (37, 101, 16)])
def test_compiled_flex_attention_on_cpu_matches_masked_softmax(geometry, gen):
    q_len, kv_len, bs = geometry
    flex = _compiled_flex()
    plan = _random_plan(q_len, kv_len, bs, gen, B=1, H=4, p=0.6)
    q = torch.randn(1, 4, q_len, 16, generator=gen)
    k = torch.randn(1, 2, kv_len, 16, generator=gen)
    v = torch.randn(1, 2, kv_len, 16, generator=gen)
    out = flex(q, k, v, block_mask=plan.to_flex_block_mask(), enable_gqa=True)
    want = _masked_softmax_attention(q, k, v, _expected_token_mask(plan))
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_stem_plan_through_compiled_flex_equals_reference_executor(gen):
    """A planner-made plan (rows end at the diagonal) gives the reference executor's output."""
    flex = _compiled_flex()
    cfg = stem.StemConfig(block_size=16, stride=4)
    L = 16 * 64
    q = torch.randn(1, 4, L, 32, generator=gen)
    k = torch.randn(1, 2, L, 32, generator=gen)
    v = torch.randn(1, 2, L, 32, generator=gen)
    plan = stem.plan(q, k, v, cfg)
    assert plan.density < 1.0
    out = flex(q, k, v, block_mask=plan.to_flex_block_mask(), enable_gqa=True)
    ref = stem.attention(q, k, v, plan=plan, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_unaligned_query_offset_is_rejected(gen):
    plan = _random_plan(40, 100, 16, gen)  # q_offset 60 is not a multiple of 16
    with pytest.raises(ValueError, match="multiple of block_size"):
        plan.to_flex_block_mask()
