"""The `stem` command line: info, a small demo, bench without a GPU, python -m stem-less entry."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from stem.cli import main


def test_info_lists_executors(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("reference", "sdpa", "triton", "hub"):
        assert name in out, out


def test_demo_small_writes_json(tmp_path, capsys):
    path = tmp_path / "demo.json"
    assert main(["demo", "--length", "4096", "--heads", "2", "--kv-heads", "1", "--plot", "", "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    assert 0 < res["density"] < 1 and res["rel_error"] < 0.5
    assert "reference" in res["executor"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_bench_without_cuda_says_why():
    r = subprocess.run([sys.executable, "-m", "stem.cli", "bench"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "CUDA" in (r.stdout + r.stderr)
    assert "Traceback" not in r.stderr
