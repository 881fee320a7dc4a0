"""The block-gathered CPU executor against independent float64 attention (tests/reference.py)."""

import pytest
import torch
from reference import dense_causal_attention64, masked_attention64, rand_qkv

import stem

SPARSE = stem.StemConfig(block_size=16, stride=4)


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm())


def _expected(q, k, v, mask, bs, q_offset=None):
    """float64 attention under a block mask for queries at ``q_offset`` (default: the last Lq);
    rows that see no key are 0 (the executors' convention)."""
    Lq, Lk = q.shape[2], k.shape[2]
    end = Lk if q_offset is None else q_offset + Lq  # keys after the last query never matter
    nk = -(-end // bs)
    out = masked_attention64(q, k[:, :, :end], v[:, :, :end], mask[..., :nk], bs)
    return torch.nan_to_num(out, nan=0.0)


@pytest.mark.parametrize("dtype,tol,B,Hq,Hkv,Lq,Lk", [
    (torch.float32, 1e-5, 1, 2, 2, 16 * 57, 16 * 57),
    (torch.float32, 1e-5, 2, 4, 1, 16 * 56 + 5, 16 * 56 + 5),
    (torch.float32, 1e-5, 1, 6, 2, 300, 16 * 58 + 9),
    (torch.float64, 1e-12, 1, 4, 2, 16 * 56 + 5, 16 * 56 + 5),
    (torch.bfloat16, 2e-2, 1, 4, 2, 16 * 56 + 5, 16 * 56 + 5),
])
def test_stem_plan_equals_float64(gen, dtype, tol, B, Hq, Hkv, Lq, Lk):
    q, k, v = rand_qkv(gen, B, Hq, Hkv, Lq, Lk, 16, dtype=dtype)
    plan = stem.plan(q, k, v, SPARSE)
    assert not plan.dense
    out, lse = stem.attention(q, k, v, plan=plan, backend="cpu_gather", return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape
    ref = _expected(q, k, v, plan.to_dense_mask(), 16)
    assert _rel(out, ref) < tol
    assert _rel(out, dense_causal_attention64(q, k, v)) > 1e-3  # the plan really is sparse
    _, lse_ref = stem.attention(q.double(), k.double(), v.double(), plan=plan, backend="reference", return_lse=True)
    torch.testing.assert_close(lse.double(), lse_ref, atol=tol * 10, rtol=0)


@pytest.mark.parametrize("heads_agree", [True, False])
def test_hand_made_plans_with_gaps_and_empty_rows(gen, heads_agree):
    """Rows without their diagonal block, rows with nothing (output 0, lse -inf), heads that pick
    the same blocks (one gathered copy per KV head) or different ones (one per query head)."""
    B, Hq, Hkv, L, bs = 2, 6, 2, 16 * 20 + 7, 16
    q, k, v = rand_qkv(gen, B, Hq, Hkv, L, L, 16, dtype=torch.float64)
    n = -(-L // bs)
    shape = (B, Hkv if heads_agree else Hq, n, n)
    mask = torch.rand(shape, generator=gen) < 0.4
    if heads_agree:
        mask = mask.repeat_interleave(Hq // Hkv, 1)
    mask[:, :, 5] = False  # a query block with no key block at all
    mask[0, 1, 7, 7] = False  # no diagonal block: early rows of block 7 see only earlier blocks
    mask[1, 2, 9, :] = False
    mask[1, 2, 9, 9] = True  # only the diagonal block
    plan = stem.BlockPlan.from_dense_mask(mask, block_size=bs, q_len=L, kv_len=L)
    out, lse = stem.attention(q, k, v, plan=plan, backend="cpu_gather", return_lse=True)
    ref = _expected(q, k, v, plan.to_dense_mask(), bs)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    rows = slice(5 * bs, 6 * bs)
    assert bool((out[:, :, rows] == 0).all()) and bool((lse[:, :, rows] == float("-inf")).all())
    _, lse_ref = stem.attention(q, k, v, plan=plan, backend="reference", return_lse=True)
    torch.testing.assert_close(lse, lse_ref, atol=1e-12, rtol=0)


def test_chunk_in_the_middle(gen):
    """Queries at an explicit q_offset that is not Lk - Lq (context parallelism)."""
    q_full, k, v = rand_qkv(gen, 1, 4, 2, 16 * 60, 16 * 60, 16, dtype=torch.float64)
    off, Lq = 16 * 30 + 3, 300
    q = q_full[:, :, off:off + Lq]
    plan = stem.plan(q, k, v, SPARSE, q_offset=off)
    out = stem.attention(q, k, v, plan=plan, backend="cpu_gather", q_offset=off)
    ref = _expected(q, k, v, plan.to_dense_mask(), 16, q_offset=off)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("rows_per_call", [16, 100, 4096])
def test_grouping_of_query_blocks_does_not_change_the_result(gen, rows_per_call):
    from stem_backends.cpu_gather import gather_attention

    q, k, v = rand_qkv(gen, 1, 4, 2, 16 * 56 + 1, 16 * 56 + 1, 16, dtype=torch.float64)
    plan = stem.plan(q, k, v, SPARSE)
    out, _ = gather_attention(q, k, v, plan, 0.25, rows_per_call=rows_per_call)
    ref = masked_attention64(q, k, v, plan.to_dense_mask(), 16, scale=0.25)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


def test_auto_uses_it_on_cpu_for_sparse_plans(gen):
    q, k, v = rand_qkv(gen, 1, 2, 1, 16 * 60, 16 * 60, 16)
    stem.attention(q, k, v, config=SPARSE)
    assert stem.last_dispatch().startswith("auto -> cpu_gather"), stem.last_dispatch()
    stem.attention(q, k, v, config=SPARSE.replace(dense=True))
    assert stem.last_dispatch().startswith("auto -> sdpa"), stem.last_dispatch()


def test_unsupported_dtype_is_refused():
    from stem_backends.cpu_gather import CPUGatherExecutor

    from stem.dispatch import DispatchKey

    why = CPUGatherExecutor().supports(DispatchKey(torch.device("cpu"), torch.int32, 16, 16, False, False))
    assert why is not None and "float32" in why
