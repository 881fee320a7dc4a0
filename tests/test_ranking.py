"""The opt-in ``qmean_lse`` block ranking against literal float64 loops, its plans against the
method's selection rule (tests/reference.py), and its Triton kernel under TRITON_INTERPRET=1."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from reference import rand_qkv, spec_selection

import stem
from stem.ranking import qmean_lse_scores, sampled_mass_scores

RANKED = stem.StemConfig(block_size=16, stride=4, ranking="qmean_lse")


def _literal_geometry(q, k, bs, q_offset):
    """First absolute query block, query and key block counts, and a float64 -inf score tensor
    (B, Hq, nQ, nK) for the literal references below."""
    Lq, Lk = q.shape[2], k.shape[2]
    qbo = q_offset // bs
    nQ = (q_offset + Lq - 1) // bs - qbo + 1
    nK = math.ceil(Lk / bs)
    return qbo, nQ, nK, torch.full((q.shape[0], q.shape[1], nQ, nK), float("-inf"), dtype=torch.float64)


def literal_scores(q, k, bs, q_offset):
    """float64 loops: mean of each query block's rows, log-sum-exp of its scaled scores over the
    keys of each causal key block."""
    q, k = q.double(), k.double()
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    qbo, nQ, nK, out = _literal_geometry(q, k, bs, q_offset)
    for b in range(B):
        for h in range(Hq):
            kh = k[b, h // (Hq // Hkv)]
            for i in range(nQ):
                a = qbo + i
                rows = [r for r in range(Lq) if a * bs <= q_offset + r < (a + 1) * bs]
                qbar = q[b, h, rows].mean(0)
                for j in range(min(a + 1, nK)):
                    keys = kh[j * bs:min((j + 1) * bs, Lk)]
                    out[b, h, i, j] = torch.logsumexp(keys @ qbar / math.sqrt(D), 0)
    return out


def literal_sampled_mass(q, k, bs, q_offset, n=4):
    """float64 loops: per query block, n rows (last of each n-th of the block, clamped into its
    rows), each row's causal softmax, mass per key block, mean over the rows."""
    q, k = q.double(), k.double()
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    qbo, nQ, nK, out = _literal_geometry(q, k, bs, q_offset)
    for i in range(nQ):
        a = qbo + i
        lo, hi = max(a * bs, q_offset), min((a + 1) * bs, q_offset + Lq) - 1
        rows = [min(max(a * bs + (bs // n) * (m + 1) - 1, lo), hi) for m in range(n)]
        for b in range(B):
            for h in range(Hq):
                kh = k[b, h // (Hq // Hkv)]
                acc = torch.zeros(nK, dtype=torch.float64)
                for p in rows:
                    w = torch.softmax(kh[: p + 1] @ q[b, h, p - q_offset] / math.sqrt(D), 0)
                    for j in range(a + 1):
                        acc[j] += w[j * bs:(j + 1) * bs].sum()
                out[b, h, i, : a + 1] = acc[: a + 1] / n
    return out


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,bs,off", [
    (1, 2, 2, 100, 100, 16, 16, None),
    (1, 4, 2, 40, 150, 8, 32, None),
    (1, 2, 1, 50, 170, 8, 32, 37),
])
def test_sampled_mass_equals_literal_float64(gen, B, Hq, Hkv, Lq, Lk, D, bs, off):
    q, k, _ = rand_qkv(gen, B, Hq, Hkv, Lq, Lk, D, dtype=torch.float64)
    o = Lk - Lq if off is None else off
    ref = literal_sampled_mass(q, k, bs, o)
    for chunk in (1, 1 << 22):
        got = sampled_mass_scores(q, k, bs, off, chunk_elems=chunk)
        assert torch.equal(torch.isinf(got), torch.isinf(ref))
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("n", [4, 8, 1])
def test_sampled_mass_plan_follows_the_selection_rule(gen, n):
    L = 16 * 57 + 3
    q, k, v = rand_qkv(gen, 1, 2, 1, L, L, 8, dtype=torch.float64)
    cfg = RANKED.replace(ranking="sampled_mass", sampled_rows=n)
    plan = stem.plan(q, k, v, cfg)
    mask = plan.to_dense_mask()
    for (b, h, i), blocks in spec_selection(literal_sampled_mass(q, k, 16, 0, n=n), cfg):
        assert torch.nonzero(mask[b, h, i]).flatten().tolist() == blocks, (b, h, i)


def test_sampled_rows_validation():
    with pytest.raises(ValueError, match="power of two in \\[1, block_size=16\\]"):
        stem.StemConfig(block_size=16, ranking="sampled_mass", sampled_rows=32)
    with pytest.raises(ValueError, match="power of two"):
        stem.StemConfig(ranking="sampled_mass", sampled_rows=6)
    with pytest.raises(ValueError, match="applies to ranking='sampled_mass' only"):
        stem.StemConfig(sampled_rows=8)
    with pytest.raises(TypeError, match="sampled_rows must be an int"):
        stem.StemConfig(ranking="sampled_mass", sampled_rows=8.0)
    cfg = stem.StemConfig(ranking="sampled_mass", sampled_rows=16)
    assert stem.StemConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,bs,off", [
    (1, 2, 2, 100, 100, 16, 16, None),
    (2, 4, 1, 77, 77, 8, 16, None),  # partial last block
    (1, 6, 2, 40, 150, 16, 32, None),  # chunked prefill: partial first block
    (1, 2, 1, 50, 170, 16, 32, 37),  # chunk in the middle
])
def test_scores_equal_literal_float64(gen, B, Hq, Hkv, Lq, Lk, D, bs, off):
    q, k, _ = rand_qkv(gen, B, Hq, Hkv, Lq, Lk, D, dtype=torch.float64)
    got = qmean_lse_scores(q, k, bs, off, impl="torch")
    ref = literal_scores(q, k, bs, Lk - Lq if off is None else off)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)
    # float32 input, in small chunks of query blocks
    from stem.ranking import block_query_means, qmean_lse_from_means

    o = Lk - Lq if off is None else off
    qf, kf = q.float(), k.float()
    chunked = qmean_lse_from_means(block_query_means(qf, o, bs), kf, o // bs, bs, D ** -0.5, chunk_elems=1)
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(chunked))
    torch.testing.assert_close(chunked[fin].double(), ref[fin], atol=1e-4, rtol=0)


def test_plan_follows_the_selection_rule(gen):
    """Stem's budgets, sinks and window, top-k by the new scores (tests/reference.py's literal
    selection, fed with literal float64 scores)."""
    L = 16 * 60 + 5
    q, k, v = rand_qkv(gen, 1, 4, 2, L, L, 8, dtype=torch.float64)
    plan = stem.plan(q, k, v, RANKED)
    assert not plan.dense and plan.config.ranking == "qmean_lse"
    mask = plan.to_dense_mask()
    for (b, h, i), blocks in spec_selection(literal_scores(q, k, 16, 0), RANKED):
        assert torch.nonzero(mask[b, h, i]).flatten().tolist() == blocks, (b, h, i)
    # the same budgets as Stem: identical counts up to top-k picks that overlap the sinks/window
    default = stem.plan(q, k, v, RANKED.replace(ranking="stem"))
    assert int((plan.kv_counts - default.kv_counts).abs().max()) <= RANKED.sink_blocks + RANKED.window_blocks
    assert not torch.equal(plan.to_dense_mask(), default.to_dense_mask())  # the ranking did change


def test_default_ranking_is_the_paper(gen):
    L = 16 * 58
    q, k, v = rand_qkv(gen, 1, 2, 1, L, L, 8)
    a = stem.plan(q, k, v, stem.StemConfig(block_size=16, stride=4))
    b = stem.plan(q, k, v, stem.StemConfig(block_size=16, stride=4, ranking="stem"))
    assert torch.equal(a.kv_counts, b.kv_counts) and torch.equal(a.kv_indices, b.kv_indices)
    assert stem.StemConfig().ranking == "stem"


def test_attention_with_ranking_runs_the_ranked_plan(gen):
    L = 16 * 57
    q, k, v = rand_qkv(gen, 1, 2, 1, L, L, 16)
    out, plan = stem.attention(q, k, v, config=RANKED, return_plan=True)
    assert plan.config.ranking == "qmean_lse"
    torch.testing.assert_close(out, stem.attention(q, k, v, plan=plan, backend="reference"), atol=1e-5, rtol=0)


def test_bad_ranking_and_stats_path_raise():
    with pytest.raises(ValueError, match="sampled_mass"):
        stem.StemConfig(ranking="max")
    from stem.planner import plan_from_stats, pool_torch

    q = torch.randn(1, 2, 16 * 60, 8)
    stats = pool_torch(q, q[:, :1], q[:, :1], RANKED, 0)
    with pytest.raises(ValueError, match="stem.plan"):
        plan_from_stats(stats, RANKED, q.shape[2], 0, 60)
    with pytest.raises(ValueError, match="unknown ranking kernel"):
        qmean_lse_scores(q, q[:, :1], 16, impl="nope")


# --- the Triton kernel, in a child process with TRITON_INTERPRET=1 (see test_triton_interpret.py) ---
# name -> (B, Hq, Hkv, Lq, Lk, D, block_size, q_offset, dtype, block_q)
KERNEL_CASES = {
    "fp32_prefill_gqa2": (1, 4, 2, 100, 100, 16, 16, None, "float32", None),
    "fp32_gqa3_odd_d": (1, 3, 1, 70, 233, 24, 16, None, "float32", None),
    "fp32_middle_chunk_b2": (2, 2, 2, 50, 300, 16, 32, 100, "float32", 2),
    "bf16_chunked": (1, 2, 1, 40, 150, 16, 32, None, "bfloat16", None),
}

# sampled_mass kernel variants: one pass (all (batch, kv head) pairs in one launch, or one per
# launch with the smallest scratch) and two passes
SAMPLED_VARIANTS = {"": {}, "_chunked": {"scratch_bytes": 1}, "_two_pass": {"one_pass": False}, "_rows8": {"n": 8},
                    "_rows1": {"n": 1}}


def _child() -> None:
    from stem_backends.triton.ranking import qmean_lse_triton, sampled_mass_triton

    from stem.ranking import block_query_means, qmean_lse_from_means, sampled_mass_scores

    results = {}
    for name, (B, Hq, Hkv, Lq, Lk, D, bs, off, dtype, block_q) in KERNEL_CASES.items():
        try:
            g = torch.Generator().manual_seed(len(name))
            q = torch.randn(B, Hq, Lq, D, generator=g).to(getattr(torch, dtype))
            k = torch.randn(B, Hkv, Lk, D, generator=g).to(getattr(torch, dtype))
            o = Lk - Lq if off is None else off
            qbar = block_query_means(q, o, bs)
            got = qmean_lse_triton(qbar, k, o // bs, bs, D ** -0.5, block_q=block_q)
            # oracle: the torch path with the means rounded to k's dtype, as the kernel multiplies
            ref = qmean_lse_from_means(qbar.to(k.dtype).float(), k.float(), o // bs, bs, D ** -0.5)
            fin = torch.isfinite(ref)
            assert torch.equal(fin, torch.isfinite(got)), "causal pattern differs"
            err = float((got[fin] - ref[fin]).abs().max())
            assert err < (2e-2 if dtype == "bfloat16" else 1e-4), f"max error {err}"
            results[name] = None
        except Exception as e:  # reported per case
            results[name] = f"{type(e).__name__}: {e}"
        for variant, kw in SAMPLED_VARIANTS.items():  # the sampled_mass kernel, against the float32 torch path
            try:
                got = sampled_mass_triton(q, k, o, bs, D ** -0.5, block_q=block_q, **kw)
                ref = sampled_mass_scores(q.float(), k.float(), bs, o, n=kw.get("n", 4))
                fin = torch.isfinite(ref)
                assert torch.equal(fin, torch.isfinite(got)), "causal pattern differs"
                err = float((got[fin] - ref[fin]).abs().max())
                assert err < (1e-2 if dtype == "bfloat16" else 1e-5), f"max error {err}"
                results[f"sampled{variant}_{name}"] = None
            except Exception as e:
                results[f"sampled{variant}_{name}"] = f"{type(e).__name__}: {e}"
    print(json.dumps(results))


@pytest.fixture(scope="module")
def kernel_results():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=600)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    assert proc.returncode == 0 and lines, f"interpreter child failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1])


@pytest.mark.parametrize("case", list(KERNEL_CASES)
                         + [f"sampled{v}_{c}" for v in SAMPLED_VARIANTS for c in KERNEL_CASES])
def test_triton_kernel_interpreted(kernel_results, case):
    assert kernel_results[case] is None, kernel_results[case]


if __name__ == "__main__":
    _child()


def test_sampled_mass_scratch_slabs_are_disjoint():
    """The interpreter runs programs one after another, so it cannot see two programs sharing
    scratch: check the layout itself. Every program's slab lies inside its head's region and no
    two slabs overlap."""
    from stem_backends.triton.ranking import scratch_layout

    ends = torch.tensor([9, 9, 7, 5, 3, 1], dtype=torch.int64)
    for n_rows in (16, 64):
        offsets, per_head = scratch_layout(ends, n_rows)
        owner = torch.full((per_head,), -1)
        for p, (o, e) in enumerate(zip(offsets.tolist(), ends.tolist())):
            assert o >= 0 and o + e * n_rows <= per_head
            assert (owner[o:o + e * n_rows] == -1).all(), f"program {p} overlaps another"
            owner[o:o + e * n_rows] = p
