"""The `stem` command line: info, a small demo, one-line errors (exit 2), --version, help with
defaults, `python -m stem`, Ctrl-C (exit 130), bench without a GPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import stem
from stem.cli import build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--length", "2048", "--block-size", "16", "--heads", "2", "--kv-heads", "1"]


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "stem", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def _one_line_error(err: str) -> str:
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error: " in lines[0], err
    return lines[0]


def test_info_lists_executors(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("reference", "sdpa", "triton", "hub"):
        assert name in out, out


def test_demo_small_writes_json_plot_and_phases(tmp_path, capsys):
    path, png = tmp_path / "out" / "demo.json", tmp_path / "plots" / "plan.png"
    assert main(["demo", *SMALL, "--plot", str(png), "--json", str(path)]) == 0
    out = capsys.readouterr().out
    phases = [line for line in out.splitlines() if line.startswith("[")]
    assert [p[:5] for p in phases] == [f"[{i}/6]" for i in range(1, 7)], out
    for word in ("generating", "planning", "running Stem", "running dense", "timing"):
        assert sum(word in p for p in phases) == 1, (word, phases)
    assert "elapsed:" in out and "all 6 needles kept by every reader block" in out, out
    res = json.loads(path.read_text())
    assert 0 < res["density"] < 0.7 and res["rel_error"] < 0.5
    assert "reference" in res["executor"]
    assert res["needles"]["ok"] and len(res["needles"]["needles"]) == 6
    assert {"dense_mass", "cells", "cells_kept", "kept_fraction", "kept_mass"} <= set(res["needles"]["needles"][0])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_default_plot_goes_to_an_ignored_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--length", "256", "--heads", "1", "--kv-heads", "1"]) == 0
    assert (tmp_path / "stem_demo" / "plan.png").is_file()
    with open(os.path.join(ROOT, ".gitignore")) as f:
        assert "stem_demo/" in f.read().split()


BAD_ARGS = [
    (["demo", "--length", "0"], "argument --length: must be an integer >= 1, got 0"),
    (["demo", "--length", "-5"], "argument --length: must be an integer >= 1, got -5"),
    (["demo", "--length", "abc"], "argument --length: expected an integer, got 'abc'"),
    (["demo", "--heads", "0"], "argument --heads: must be an integer >= 1"),
    (["demo", "--kv-heads", "0"], "argument --kv-heads: must be an integer >= 1"),
    (["demo", "--heads", "3", "--kv-heads", "2"], "--heads (3) must be a multiple of --kv-heads (2)"),
    (["demo", "--head-dim", "4"], "argument --head-dim: must be an integer >= 8"),
    (["demo", "--block-size", "48"], "argument --block-size: must be a power of two in [16, 256], got 48"),
    (["demo", "--block-size", "512"], "argument --block-size: must be a power of two in [16, 256], got 512"),
    (["demo", "--block-size", "8"], "argument --block-size: must be a power of two in [16, 256], got 8"),
    (["demo", "--reps", "0"], "argument --reps: must be an integer >= 1"),
    (["demo", "--device", "foo"], "argument --device: not a device: 'foo'"),
    (["demo", "--device", "mps"], "argument --device: 'mps' is not supported"),
    (["demo", "--plot", "/dev/null/x/plan.png"], "argument --plot: cannot create the folder '/dev/null/x'"),
    (["demo", "--nope"], "unrecognized arguments: --nope"),
    (["bench", "--lengths", "0"], "argument --lengths: must be an integer >= 1, got 0"),
    (["bench", "--block-size", "100"], "argument --block-size: must be a power of two in [16, 256], got 100"),
    (["bench", "--heads", "6", "--kv-heads", "4"], "--heads (6) must be a multiple of --kv-heads (4)"),
    (["bench", "--alpha", "0"], "argument --alpha: must be in (0, 1], got 0.0"),
    (["bench", "--shapes", "32:8"], "argument --shapes: shape '32:8': expected HQ:HKV:D or HQ:HKV:D:B"),
    (["bench", "--shapes", "32:8:x"], "argument --shapes: shape '32:8:x': expected HQ:HKV:D"),
    (["bench", "--shapes", "30:8:128"], "shape '30:8:128': query heads (30) must be a multiple of kv heads (8)"),
    (["bench", "--sampled-rows", "8"], "arguments --ranking / --sampled-rows: StemConfig.sampled_rows=8 applies to "
                                       "ranking='sampled_mass' only"),
    (["bench", "--ranking", "sampled_mass", "--sampled-rows", "3"], "sampled_rows must be a power of two"),
    (["bench", "--ranking", "oracle"], "argument --ranking: invalid choice: 'oracle'"),
    ([], "a command is required: info, demo or bench"),
    (["frob"], "invalid choice: 'frob'"),
]
if not torch.cuda.is_available():
    BAD_ARGS += [
        (["demo", "--device", "cuda"], "argument --device: 'cuda' asked for, but CUDA is not available here"),
        (["demo", "--device", "cuda:1"], "argument --device: 'cuda:1' asked for, but CUDA is not available here"),
    ]


@pytest.mark.parametrize("argv, message", BAD_ARGS, ids=[" ".join(a) or "(none)" for a, _ in BAD_ARGS])
def test_bad_values_give_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    line = _one_line_error(err)
    assert line.startswith("stem") and message in line, line
    assert "Traceback" not in out


def test_bad_value_through_the_real_entry_point():
    r = _run("demo", "--length", "0")
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    line = _one_line_error(r.stderr)
    assert line.startswith("stem demo: error: argument --length: must be an integer >= 1, got 0"), line
    assert r.stdout == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_bench_without_cuda_says_why():
    r = _run("bench")
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    line = _one_line_error(r.stderr)
    assert line.startswith("stem bench: error: needs a CUDA GPU") and "torch.cuda.is_available() is False" in line


@pytest.mark.parametrize("exc", [ValueError, TypeError, RuntimeError])
def test_library_errors_become_one_line(exc, monkeypatch, capsys):
    def boom(*a, **kw):
        raise exc("seq_len too large for this machine\nsecond line of detail")

    monkeypatch.setattr("stem.workloads.synthetic_qkv", boom)
    monkeypatch.delenv("STEM_TRACEBACK", raising=False)
    assert main(["demo", "--length", "64", "--plot", ""]) == 2
    assert _one_line_error(capsys.readouterr().err) == "stem: error: seq_len too large for this machine"
    monkeypatch.setenv("STEM_TRACEBACK", "1")
    with pytest.raises(exc):
        main(["demo", "--length", "64", "--plot", ""])


def test_keyboard_interrupt_in_process_exits_130(monkeypatch, capsys):
    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr("stem.workloads.synthetic_qkv", interrupted)
    assert main(["demo", "--length", "64", "--plot", ""]) == 130
    assert capsys.readouterr().err.strip() == "stem: interrupted"


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name == "nt", reason="POSIX signals")
def test_ctrl_c_exits_130_quietly():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # the phase lines must be flushed
    p = subprocess.Popen([sys.executable, "-m", "stem", "demo", "--length", "16384", "--plot", ""], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        seen = []
        for line in p.stdout:  # wait for the first phase line
            seen.append(line)
            if line.startswith("[1/"):
                break
        assert seen and seen[-1].startswith("[1/"), seen
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, (p.returncode, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"stem {stem.__version__}"


def test_python_dash_m_stem_help_and_version():
    r = _run("--help")
    assert r.returncode == 0 and "usage: stem" in r.stdout and "{info,demo,bench}" in r.stdout, r
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"stem {stem.__version__}", r


def test_every_option_has_help_and_shows_its_default():
    parser = build_parser()
    subs = parser._subparsers._group_actions[0].choices
    assert set(subs) == {"info", "demo", "bench"}
    for name, sub in subs.items():
        text = sub.format_help()
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            helped = sub._get_formatter()._get_help_string(action) or ""
            assert helped.strip(), (name, action.option_strings)
            assert "(default" in helped, (name, action.option_strings, helped)
            assert action.option_strings[-1] in text
    demo = subs["demo"].format_help()
    assert "(default: 8192 on CUDA, 4096 on the CPU)" in " ".join(demo.split())
    assert "(default: stem_demo/plan.png)" in " ".join(demo.split())


@pytest.mark.skipif(os.name == "nt", reason="POSIX pipes")
def test_closed_pipe_stops_quietly():
    """`stem demo | head -1`: the reader goes away; stem stops without a traceback (status 141)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    p = subprocess.Popen([sys.executable, "-m", "stem", "demo", "--length", "2048", "--plot", ""], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout.readline().startswith("stem demo:")
        p.stdout.close()
        err = p.stderr.read()
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 141, (p.returncode, err)
    assert err == "", err


def test_bench_shape_parsing():
    from stem.bench import parse_shape

    assert parse_shape("32:8:128") == (1, 32, 8, 128)
    assert parse_shape("32:8:128:4") == (4, 32, 8, 128)
    with pytest.raises(ValueError, match="integers >= 1"):
        parse_shape("32:8:0")


def test_bench_plot_names_the_config(tmp_path):
    """``stem bench``'s plot title names the config fields that differ from the default."""
    from stem.bench import _config_label, _plot

    assert _config_label(stem.StemConfig().to_dict()) == "default config"
    cfg = stem.StemConfig(ranking="sampled_mass", sampled_rows=8, alpha=1.0)
    assert _config_label(cfg.to_dict()) == "config alpha=1.0, ranking=sampled_mass, sampled_rows=8"
    res = {"card": "X", "config": cfg.to_dict(), "shape": {"B": 1, "Hq": 4, "Hkv": 2, "D": 64, "dtype": "bfloat16"},
           "rows": [{"L": 1024, "dense_cudnn_ms": 2.0, "exec_hub_ms": 1.0}, {"L": 2048, "dense_cudnn_ms": 8.0}]}
    _plot(res, str(tmp_path / "b.png"))
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
