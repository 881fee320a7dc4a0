"""The Triton planner kernels (backends/triton/select.py) on CPU through Triton's interpreter
(TRITON_INTERPRET=1), at tiny sizes, against the float64 torch planner (itself checked against the
literal spec in test_planner.py).

As in test_triton_interpret.py the interpreter must be on before triton is imported, so every
case runs in ONE child process (this file as a script); the child prints one JSON line
{case: error or null} and each pytest case asserts its own entry.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
import traceback

import pytest
import torch

# name -> (B, Hq, Hkv, Lq, Lk, D, block_size, stride, dtype, q_offset, extra config, scratch bytes)
CASES = {
    "fp32_prefill_gqa2": (1, 4, 2, 16 * 70 + 5, 16 * 70 + 5, 16, 16, 4, "float32", None, {}, None),
    "bf16_gqa4_decay": (1, 4, 1, 16 * 180, 16 * 180, 16, 16, 4, "bfloat16", None, {"alpha": 0.5}, None),
    "fp16_chunked_batch2": (2, 2, 1, 16 * 30, 16 * 100 + 3, 16, 16, 8, "float16", None, {}, None),
    "fp32_q_offset_middle": (1, 2, 2, 16 * 40, 16 * 120, 16, 16, 4, "float32", 16 * 50 + 7, {}, None),
    "fp32_chunks_of_one_pair": (2, 4, 2, 16 * 64, 16 * 64, 16, 16, 4, "float32", None, {}, 1),
    "fp32_batch2_blhd_layout": (2, 4, 2, 16 * 64 + 3, 16 * 64 + 3, 16, 16, 4, "float32", None, {"blhd": True}, None),
    "bf16_exact_ties": (1, 2, 1, 16 * 70, 16 * 70, 16, 16, 4, "bfloat16", None,
                        {"ties": True, "value_weight": 0.0}, None),
    "fp32_no_sinks_wide_window": (1, 2, 1, 32 * 60, 32 * 60, 8, 32, 8, "float32", None,
                                  {"sink_blocks": 0, "window_blocks": 7, "value_weight": 0.5}, None),
}


def _check(B, Hq, Hkv, Lq, Lk, D, bs, S, dtype, q_offset, extra, scratch, seed):
    extra = dict(extra)
    ties = extra.get("ties", False)
    from plan_compare import plan_mismatches
    from stem_backends.triton.select import plan_triton

    from stem.config import StemConfig

    gen = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    q = torch.randn(B, Hq, Lq, D, generator=gen).to(dt)
    k = torch.randn(B, Hkv, Lk, D, generator=gen).to(dt)
    v = (torch.randn(B, Hkv, Lk, D, generator=gen) * 3 * torch.rand(B, Hkv, Lk, 1, generator=gen)).to(dt)
    if extra.pop("ties", False):
        # key block j = one stride group repeated, times 3 (sinks), 2 (odd j) or 1 (even j): with no
        # value bonus, every row's logits take three values, so its threshold falls inside a tie
        n_blocks = -(-Lk // bs)
        mult = torch.tensor([3.0 if j < 4 else 1.0 + j % 2 for j in range(n_blocks)]).repeat_interleave(bs)[:Lk]
        k = (k[:, :, :S].float().repeat(1, 1, bs * n_blocks // S, 1)[:, :, :Lk] * mult[:, None]).to(dt)
    if extra.pop("blhd", False):  # (B, L, H, D) storage seen through a transpose: (batch, head) do not flatten
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    cfg = StemConfig(block_size=bs, stride=S, **extra)
    off = Lk - Lq if q_offset is None else q_offset
    n_total = -(-Lk // bs)
    stages = {}
    counts, indices = plan_triton(q, k, v, cfg, off, n_total, scratch_bytes=scratch, stages=stages)
    if scratch == 1:
        assert stages["chunk_pairs"] == 1, stages["chunk_pairs"]
    rows, differ, bad = plan_mismatches(counts, indices, q, k, v, cfg, off)
    assert not bad, f"{len(bad)} of {rows} rows break the selection rule, e.g. {bad[:3]}"
    if not ties:  # random logits: a row may differ from the float64 plan only at a rare near tie
        assert differ <= rows // 50, f"{differ} of {rows} rows differ from the float64 plan"


def _check_bonus(seed):
    """The bonus kernel with small chunks (several loop trips per pass) against the torch bonus."""
    from stem_backends.triton import interpreter_compat
    from stem_backends.triton.select import _bonus_kernel

    from stem.config import StemConfig
    from stem.planner import bonus_from_group_max

    interpreter_compat()
    gen = torch.Generator().manual_seed(seed)
    cfg = StemConfig(block_size=16, stride=4, value_weight=0.3)
    pairs, n_blocks, gpb = 3, 37, 4
    for kv_len in (n_blocks * 16, n_blocks * 16 - 9, 3):
        vmax = torch.rand(pairs, n_blocks * gpb, generator=gen) * 5
        n_valid = -(-kv_len // 4)
        vmax[:, n_valid:] = 0.0
        got = torch.full((pairs, n_blocks), float("nan"))
        _bonus_kernel[(pairs,)](vmax, got, n_valid, n_blocks * gpb, n_blocks, 0.3, GPB=gpb, CHUNK=16, NB=8)
        want = bonus_from_group_max(vmax[None], cfg, n_blocks, kv_len)[0]
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (kv_len, (got - want).abs().max())


def _check_select(seed):
    """The selection kernel alone (what ranked plans use on CUDA) against ``select_blocks`` in
    float64: the same rows on distinct scores; on tied scores (which may go either way, and so
    change how many picks coincide with sinks and window) the selection rule row by row."""
    from stem_backends.triton.select import select_triton

    from stem.budget import block_budgets
    from stem.config import StemConfig
    from stem.planner import select_blocks

    gen = torch.Generator().manual_seed(seed)
    for qbo, nQ, nK, ties in ((0, 70, 70, False), (30, 40, 70, False), (0, 70, 70, True)):
        cfg = StemConfig(block_size=16, alpha=0.6, sink_blocks=1, window_blocks=2)
        scores = torch.rand(2, 3, nQ, nK, generator=gen, dtype=torch.float64)
        if ties:
            scores = (scores * 4).floor()  # four distinct values
        causal = torch.arange(nK)[None, :] <= (qbo + torch.arange(nQ))[:, None]
        scores = scores.masked_fill(~causal, float("-inf"))
        want_c, want_i = select_blocks(scores, cfg, qbo, nK)
        got_c, got_i = select_triton(scores.float(), cfg, qbo, nK)
        if not ties:
            assert torch.equal(got_c, want_c) and torch.equal(got_i, want_i), qbo
            continue
        budgets = block_budgets(nK, cfg.alpha, cfg.k_rate, cfg.k_bias)
        for b, h, i in itertools.product(range(2), range(3), range(nQ)):
            diag = qbo + i
            sel = set(got_i[b, h, i, : got_c[b, h, i]].tolist())
            forced = {j for j in range(diag + 1) if j < cfg.sink_blocks or j > diag - cfg.window_blocks}
            keep = min(budgets[diag], diag + 1)
            row = scores[b, h, i]
            assert forced <= sel and max(sel) <= diag, (b, h, i)
            picked = sorted((row[j].item() for j in range(diag + 1) if j in sel), reverse=True)
            # the keep-th largest score of the row is reached by the selection, nothing unselected beats it
            kth = sorted(row[: diag + 1].tolist(), reverse=True)[keep - 1]
            assert sum(x >= kth for x in picked) >= keep, (b, h, i)
            assert all(row[j].item() <= kth for j in range(diag + 1) if j not in sel), (b, h, i)
            assert len(sel) <= keep + len(forced), (b, h, i)


def _child_main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    seed = int(os.environ["STEM_CHILD_SEED"])
    torch.set_num_threads(1)
    results = {}
    for name, args in CASES.items():
        try:
            _check(*args, seed=seed)
            results[name] = None
        except Exception:
            results[name] = traceback.format_exc(limit=6)
    for name, fn in (("bonus_multi_chunk", _check_bonus), ("select_alone", _check_select)):
        try:
            fn(seed)
            results[name] = None
        except Exception:
            results[name] = traceback.format_exc(limit=6)
    print(json.dumps(results))


_RESULTS: dict | None = None


def _results(seed: int) -> dict:
    global _RESULTS
    if _RESULTS is None:
        env = dict(os.environ, TRITON_INTERPRET="1", STEM_CHILD_SEED=str(seed))
        here = os.path.dirname(os.path.abspath(__file__))
        root = os.path.dirname(here)
        env["PYTHONPATH"] = os.pathsep.join([here, root, env.get("PYTHONPATH", "")])
        out = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                             timeout=1500)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if out.returncode != 0 or not lines:
            raise AssertionError(f"interpreter child failed (rc {out.returncode}):\n{out.stderr[-4000:]}")
        _RESULTS = json.loads(lines[-1])
    return _RESULTS


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("case", [*CASES, "bonus_multi_chunk", "select_alone"])
def test_triton_planner_matches_float64_planner(case, seed):
    err = _results(seed)[case]
    assert err is None, err


if __name__ == "__main__":
    _child_main()
