"""The multi-process recipe as users run it: torchrun on one node, several processes (gloo on CPU),
and the context-parallel load-balance model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest


def test_torchrun_dist_check_on_one_node(tmp_path):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun is not on PATH")
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node=4", "-m", "benchmarks.distributed.dist_check", "--seq", "2048",
         "--ref-seq", "1024"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "dist_check: PASS" in proc.stdout
    (path,) = tmp_path.glob("dist_check*.json")
    data = json.loads(path.read_text())
    assert data, "rank 0 wrote no results"


def test_balance_model_partitions_the_work(tmp_path):
    from benchmarks.distributed import balance
    from stem.config import StemConfig

    data = balance.main(["--out", str(tmp_path), "--lengths", "262144", "--worlds", "2", "8"])
    cfg = StemConfig()
    for r in data["rows"]:
        blocks = balance.layout_blocks(r["blocks"], r["world"], r["layout"])
        assert sorted(i for b in blocks for i in b) == list(range(r["blocks"]))  # a partition of the rows
        assert sum(r["rank_blocks_lower"]) == r["single_gpu_blocks_lower"]
        assert 0 < r["efficiency_bound"] <= 1
    # a hand count for one rank: zigzag, 2 ranks, rank 0 holds chunks 0 and 3 of 4
    n = 262144 // cfg.block_size
    lo, _ = balance.row_work(n, cfg)
    c = n // 4
    zz2 = next(r for r in data["rows"] if r["world"] == 2 and r["layout"] == "zigzag")
    assert zz2["rank_blocks_lower"][0] == sum(lo[:c]) + sum(lo[3 * c:])
