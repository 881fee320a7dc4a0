"""Context-parallel Stem (stem.distributed) on CPU: gloo, several processes on 127.0.0.1.

Every rank rebuilds the same full-sequence inputs from a seed, runs the single-process
``stem.attention`` (reference executor, float64) on the whole sequence as the oracle, and checks
that ``stem.distributed.attention`` on its shard returns exactly those rows. Block size 16 and
stride 4 keep the sizes small while the plans stay sparse (>= 56 blocks).
"""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import stem
import stem.distributed as sd
from stem.planner import plan as stem_plan

CFG = stem.StemConfig(block_size=16, stride=4)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(L, B=1, Hq=4, Hkv=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64)
    # uneven value norms so the value bonus matters for the selection
    v = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64) * torch.rand(B, Hkv, L, 1, generator=g).mul(3)
    return q, k, v


def _close(got, want, tol, tag):
    # plain comparison: torch.testing.assert_close imports torch.distributed.tensor (seconds per process)
    assert got.shape == want.shape, f"{tag}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol, f"{tag}: max abs error {err:.3g} > {tol:.1g}"


def _check_case(rank, group, L, layout, B=1, planner="stats", backend="reference", lse=False, cfg=CFG):
    world = dist.get_world_size(group)
    q, k, v = _inputs(L, B=B, seed=L + world)
    ref, ref_lse, plan = stem.attention(q, k, v, config=cfg, backend="reference", return_lse=True, return_plan=True)
    if L >= 56 * cfg.block_size:
        assert not plan.dense and plan.density < 0.9, "test inputs must give a sparse plan"
    ql, kl, vl = (sd.shard(x, group, layout) for x in (q, k, v))
    res = sd.attention(ql, kl, vl, group=group, layout=layout, config=cfg, backend=backend, planner=planner,
                       return_lse=lse, return_plan=True)
    out, chunk_plans = res[0], res[-1]
    tag = f"rank {rank}/{world} L={L} layout={layout} planner={planner} backend={backend}"
    # each chunk's plan is its rows of the single-process plan (absolute positions, full budgets)
    full_mask = plan.to_dense_mask()
    ranges = sd.shard_ranges(L, world, rank, layout)
    assert len(chunk_plans) == len(ranges), tag
    for p, (a, b) in zip(chunk_plans, ranges):
        assert (p.q_offset, p.q_len, p.kv_len, p.dense) == (a, b - a, b, plan.dense), f"{tag}: {p}"
        m = p.to_dense_mask()
        want = full_mask[:, :, p.q_block_offset:p.q_block_offset + p.num_q_blocks]
        assert torch.equal(m, want[..., :m.shape[-1]]) and not want[..., m.shape[-1]:].any(), f"{tag}: plan rows"
    _close(out, sd.shard(ref, group, layout), 1e-9, tag)
    if lse:
        _close(res[1], sd.shard(ref_lse[..., None], group, layout)[..., 0], 1e-5, tag + " lse")
    _close(sd.unshard(out, group, layout), ref, 1e-9, tag + " unshard")  # the full single-process result


def _check_errors(group):
    world = dist.get_world_size(group)
    q, k, v = _inputs(16 * 2 * world * 3)
    ql, kl, vl = (sd.shard(x, group, "contiguous") for x in (q, k, v))
    with pytest.raises(ValueError, match="unknown context-parallel layout"):
        sd.attention(ql, kl, vl, group=group, layout="ring", config=CFG)
    with pytest.raises(ValueError, match="even local length"):
        sd.attention(ql[:, :, :-1], kl[:, :, :-1], vl[:, :, :-1], group=group, layout="zigzag", config=CFG)
    with pytest.raises(ValueError, match="same positions"):
        sd.attention(ql, kl[:, :, :-2], vl[:, :, :-2], group=group, layout="contiguous", config=CFG)
    with pytest.raises(ValueError, match="planner must be"):
        sd.attention(ql, kl, vl, group=group, config=CFG, planner="ring")
    with pytest.raises(ValueError, match="not divisible"):
        sd.shard(q[:, :, :-1], group, "zigzag")


def _worker(rank, world, port, schedule, errq):
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        # one set of processes serves every world size: sub-groups of the first w ranks
        groups = {w: (None if w == world else dist.new_group(list(range(w)))) for w, _ in schedule}
        for w, cases in schedule:
            if rank >= w:
                continue
            for case in cases:
                if case == "errors":
                    _check_errors(groups[w])
                else:
                    _check_case(rank, groups[w], **case)
        dist.barrier()
    except BaseException:
        errq.put(f"rank {rank}: {traceback.format_exc()}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _start_method() -> str:
    # "spawn" re-imports torch in every child: ~12 s for 4 children on a 2-core CI runner. Forking
    # the already-imported parent is instant; it is safe here because each child sets one intra-op
    # thread before any torch work (no OpenMP region runs in a forked child) and creates its own
    # gloo group. STEM_TEST_MP_START=spawn (or forkserver) overrides.
    default = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    return os.environ.get("STEM_TEST_MP_START", default)


def _spawn(world, schedule):
    method = _start_method()
    ctx = mp.get_context(method)
    errq = ctx.SimpleQueue()
    try:
        mp.start_processes(_worker, args=(world, _free_port(), schedule, errq), nprocs=world, join=True,
                           start_method=method)
    except Exception as e:
        msgs = []
        while not errq.empty():
            msgs.append(errq.get())
        raise AssertionError("\n".join(msgs) or str(e)) from None


# Lengths: 960 = 60 blocks of 16 (sparse, base budget 42), divisible by 2*W*16 for W = 2, 3;
# 1024 = 64 blocks for W = 4; 964 / 963 are off the block grid (exact slow path).
SCHEDULE = [
    (2, [
        dict(L=960, layout="zigzag"),
        dict(L=960, layout="contiguous", B=2, lse=True),
        dict(L=960, layout="zigzag", planner="full"),
        dict(L=964, layout="zigzag"),  # chunks of 241 tokens: blocks straddle ranks
        dict(L=256, layout="zigzag", backend="auto"),  # 16 blocks: dense plan through sdpa
        "errors",
    ]),
    (3, [
        dict(L=960, layout="zigzag", lse=True),
        dict(L=963, layout="contiguous"),
        "errors",
    ]),
    (4, [dict(L=1024, layout="zigzag"), dict(L=1024, layout="contiguous", planner="full")]),
]


def test_context_parallel_equals_single_process_world_2_3_4():
    """One spawn of 4 gloo processes; world sizes 2 and 3 run on sub-groups (the ``group`` argument)."""
    _spawn(4, SCHEDULE)


# ---- single-process pieces ---------------------------------------------------------------------
def test_shard_ranges_zigzag_and_contiguous():
    assert sd.shard_ranges(16, 2, 0, "zigzag") == [(0, 4), (12, 16)]
    assert sd.shard_ranges(16, 2, 1, "zigzag") == [(4, 8), (8, 12)]
    assert sd.shard_ranges(12, 3, 2, "contiguous") == [(8, 12)]
    covered = sorted(r for w in range(3) for r in sd.shard_ranges(18, 3, w, "zigzag"))
    assert covered == [(i * 3, i * 3 + 3) for i in range(6)]
    with pytest.raises(ValueError, match="not divisible by 6"):
        sd.shard_ranges(20, 3, 0, "zigzag")
    with pytest.raises(ValueError, match="unknown context-parallel layout"):
        sd.shard_ranges(16, 2, 0, "striped")
    with pytest.raises(ValueError, match="outside"):
        sd.shard_ranges(16, 2, 2, "zigzag")


def test_shard_explicit_rank_matches_ranges():
    x = torch.arange(24.0).view(1, 1, 24, 1)
    got = sd.shard(x, layout="zigzag", rank=1, world_size=3)
    assert got.flatten().tolist() == [4.0, 5.0, 6.0, 7.0, 16.0, 17.0, 18.0, 19.0]


def test_attention_without_process_group_raises():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    q, k, v = _inputs(64)
    with pytest.raises(RuntimeError, match="init_process_group"):
        sd.attention(q, k, v, config=CFG)


def test_chunk_plans_from_gathered_stats_equal_planner_rows(gen):
    """A chunk planned from whole-sequence statistics (as the ranks assemble them) is exactly the
    rows of the single-device plan of the whole sequence, for early, middle and late chunks."""
    from stem.planner import block_row_sums, group_max_value_norms

    L, c = 1536, 256
    q, k, v = (t.double() for t in (torch.randn(1, 4, L, 16, generator=gen), torch.randn(1, 2, L, 16, generator=gen),
                                    torch.randn(1, 2, L, 16, generator=gen) * 3))
    full = stem_plan(q, k, v, CFG)
    k_sum = block_row_sums(k, 0, L // CFG.block_size, CFG.block_size, CFG.stride)
    v_max = group_max_value_norms(v, CFG.stride, L // CFG.stride)
    for a in (0, 512, L - c):
        got = sd._plan_chunk_from_stats(q[:, :, a:a + c], k_sum, v_max, a, CFG)
        rows = slice(a // CFG.block_size, (a + c) // CFG.block_size)
        assert (got.q_offset, got.kv_len) == (a, a + c)
        assert torch.equal(got.kv_counts, full.kv_counts[:, :, rows])
        assert torch.equal(got.to_dense_mask(), full.to_dense_mask()[:, :, rows, : got.num_kv_blocks])
