"""The demo's workload and its needle report: the needles are really read, the real planner keeps
them, and the report says so when a plan drops them."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import stem
from stem.cli import main
from stem.workloads import NEEDLE_LEN, _place_needles, needle_report, synthetic_qkv

SMALL = {"q_heads": 2, "kv_heads": 1, "head_dim": 64}
L, BS = 2048, 16  # 128 blocks: a sparse plan at a small size


@pytest.fixture(scope="module")
def small():
    q, k, v, info = synthetic_qkv(L, **SMALL)
    plan = stem.plan(q, k, v, stem.StemConfig(block_size=BS))
    return q, k, v, info, plan


def _without(plan, info, drop):
    """The plan with key blocks removed from query blocks: drop(mask, needle, (r0, r1)) edits the mask."""
    mask = plan.to_dense_mask().clone()
    for p, span in zip(info["needles"], info["readers"]):
        drop(mask, p, span)
    return stem.BlockPlan.from_dense_mask(mask, block_size=plan.block_size, q_len=plan.q_len, kv_len=plan.kv_len)


def _drop_needle_blocks(mask, p, span):
    r0, r1 = span
    mask[:, :, r0 // BS : (r1 - 1) // BS + 1, p // BS] = False


def test_needles_hold_most_of_their_readers_dense_mass(small):
    q, k, v, info, plan = small
    assert len(info["needles"]) == 6 and info["needle_len"] == NEEDLE_LEN
    rep = needle_report(q, k, stem.BlockPlan.from_dense_mask(
        torch.ones_like(plan.to_dense_mask()), block_size=BS, q_len=L, kv_len=L), info)
    for r in rep["needles"]:
        assert r["dense_mass"] > 0.5, r  # the readers really read the needle
        assert r["key_block"] >= 4, r  # not in the always-kept sink blocks
    assert rep["ok"] and rep["kept_mass"] == pytest.approx(1.0, abs=1e-5)  # a full plan keeps everything


def test_non_readers_barely_attend_to_the_needles(small):
    q, k, v, info, _ = small
    p, (r0, _) = info["needles"][0], info["readers"][0]
    rows = torch.arange(p + NEEDLE_LEN + 64, r0)  # after the needle, before its readers
    s = (q[0, 0, rows] @ k[0, 0].T) / 8.0
    s = s.masked_fill(torch.arange(L)[None, :] > rows[:, None], float("-inf"))
    assert float(s.softmax(-1)[:, p : p + NEEDLE_LEN].sum(-1).mean()) < 0.05


def test_real_planner_keeps_every_needle(small):
    q, k, v, info, plan = small
    assert plan.density < 0.7  # a sparse plan, not a dense one
    rep = needle_report(q, k, plan, info)
    assert rep["ok"], rep
    assert all(r["cells_kept"] == r["cells"] == 2 * 4 for r in rep["needles"])  # 2 heads x 4 reader blocks
    assert rep["kept_mass"] > 0.95


def test_report_says_when_the_needle_blocks_are_dropped(small):
    q, k, v, info, plan = small
    bad = _without(plan, info, _drop_needle_blocks)
    rep = needle_report(q, k, bad, info)
    assert not rep["ok"]
    assert rep["missed"] == info["needles"]
    assert all(r["cells_kept"] == 0 and r["kept_fraction"] == 0.0 for r in rep["needles"])
    assert rep["kept_mass"] < 0.5  # the readers lose most of their attention mass


def test_report_counts_one_dropped_cell(small):
    q, k, v, info, plan = small
    p, (r0, _) = info["needles"][2], info["readers"][2]

    def drop_one(mask, needle, span):
        if needle == p:
            mask[:, 1, r0 // BS, p // BS] = False

    rep = needle_report(q, k, _without(plan, info, drop_one), info)
    assert rep["missed"] == [p]
    row = rep["needles"][2]
    assert (row["cells"], row["cells_kept"]) == (8, 7)


def test_recency_plan_of_the_same_size_misses_the_needles(small):
    """Sinks + the most recent blocks, as many per row as Stem keeps: a plan that cannot see needles."""
    q, k, v, info, plan = small
    counts = plan.kv_counts[0]  # (H, nQ)
    nQ = plan.num_q_blocks
    mask = torch.zeros(1, counts.shape[0], nQ, nQ, dtype=torch.bool)
    for h in range(counts.shape[0]):
        for i in range(nQ):
            c = int(counts[h, i])
            mask[0, h, i, :4] = True
            mask[0, h, i, max(0, i - c + 5) : i + 1] = True
    recency = stem.BlockPlan.from_dense_mask(mask, block_size=BS, q_len=L, kv_len=L)
    assert recency.density <= plan.density + 0.01
    rep = needle_report(q, k, recency, info)
    assert not rep["ok"] and len(rep["missed"]) >= 3, rep
    assert rep["kept_mass"] < needle_report(q, k, plan, info)["kept_mass"] - 0.1


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40000), st.integers(0, 8), st.integers(0, 2**31 - 1))
def test_needle_placement(seq_len, needles, seed):
    placed = _place_needles(seq_len, needles, torch.Generator().manual_seed(seed))
    assert len(placed) <= needles
    prev_end = 0
    for p, r0, r1 in placed:
        assert p % NEEDLE_LEN == 0 and p >= NEEDLE_LEN  # inside one block of any size 16..256
        assert p + NEEDLE_LEN <= r0 < r1 <= seq_len  # readers come after the needle
        assert r0 >= prev_end  # reader spans are disjoint
        prev_end = r1
    if seq_len >= 1024 and needles:
        assert len(placed) == needles


def test_demo_reports_missed_needles(tmp_path, capsys, monkeypatch):
    """The demo itself: a planner that drops the needle blocks makes it print MISSED (and exit 0)."""
    real_plan = stem.plan

    def dropping_plan(q, k, v, config=None, **kw):
        plan = real_plan(q, k, v, config, **kw)
        _, _, _, info = synthetic_qkv(q.shape[2], **SMALL)
        return _without(plan, info, _drop_needle_blocks)

    monkeypatch.setattr(stem, "plan", dropping_plan)
    path = tmp_path / "demo.json"
    args = ["demo", "--length", str(L), "--block-size", str(BS), "--heads", "2", "--kv-heads", "1",
            "--plot", "", "--json", str(path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "MISSED: 6 of 6 needles" in out, out
    assert out.count("<- dropped") == 6
    res = json.loads(path.read_text())
    assert res["needles"]["ok"] is False and len(res["needles"]["missed"]) == 6

    monkeypatch.setattr(stem, "plan", real_plan)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "MISSED" not in out and "all 6 needles kept by every reader block" in out, out
    res = json.loads(path.read_text())
    assert res["needles"]["ok"] is True and len(res["needles"]["needles"]) == 6


def test_plan_plot_shows_kept_skipped_and_non_causal_blocks(small, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    _, _, _, _, plan = small
    path = plan.plot(str(tmp_path / "plan.png"), heads=[0])
    rgb = (imread(path)[..., :3] * 255).round().astype(int).reshape(-1, 3)
    colours = {tuple(c) for c in rgb.tolist()}
    kept, skipped, white = (0x1B, 0x3A, 0x6B), (0xF2, 0xC8, 0x94), (255, 255, 255)
    assert {kept, skipped, white} <= colours
    counts = {c: int((rgb == c).all(-1).sum()) for c in (kept, skipped)}
    assert counts[kept] > 1000 and counts[skipped] > 1000, counts  # both drawn as areas, not only the legend
