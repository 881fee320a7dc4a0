"""Executor registration and choice: first-party executors without installation, entry-point
plugins, the resolve-once cache and what last_dispatch() reports."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from reference import dense_causal_attention64, rand_qkv

import stem
import stem.dispatch as dispatch
from stem.dispatch import DispatchKey, Executor

ROOT = Path(__file__).resolve().parent.parent
DENSE = stem.StemConfig(block_size=16, stride=4, dense=True)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_plain_checkout_runs_without_installing(tmp_path):
    """A copy of stem/ and backends/ alone (no installed metadata, no stem_backends package on the
    path) runs stem.attention on CPU: the first-party executors are found beside the package."""
    import shutil

    for name in ("stem", "backends"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    code = textwrap.dedent("""
        import sys
        # hide any installed copy of the package (an editable install maps stem_backends elsewhere)
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in str(getattr(f, "__module__", "")).lower()]
        import importlib.util, torch
        assert importlib.util.find_spec("stem_backends") is None, "stem_backends is importable from elsewhere"
        import stem
        assert stem.__file__.startswith(sys.argv[1]), stem.__file__
        q = torch.randn(1, 2, 100, 16); k = torch.randn(1, 1, 100, 16)
        out = stem.attention(q, k, k)
        print(stem.last_dispatch(), sorted(stem.executors()))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "['cpu_gather', 'hub', 'reference', 'sdpa', 'triton']" in r.stdout, r.stdout


def test_entry_point_plugin_is_found(tmp_path, monkeypatch):
    """A third-party executor declared in the stem.executors entry-point group is registered and
    runs when asked for by name."""
    pkg = tmp_path / "stem_test_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        import torch
        from stem.dispatch import Executor

        class Doubling(Executor):
            name = "doubling"
            priority = -5
            def forward(self, q, k, v, plan, scale, return_lse):
                return torch.full_like(q, 2.0), None
    """))
    dist = tmp_path / "stem_test_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: stem-test-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[stem.executors]\ndoubling = stem_test_plugin:Doubling\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(dispatch, "_REGISTRY", {})
    monkeypatch.setattr(dispatch, "_BY_PRIORITY", [])
    monkeypatch.setattr(dispatch, "_LOAD_ERRORS", {})
    monkeypatch.setattr(dispatch, "_CHOICES", {})
    monkeypatch.setattr(dispatch, "_LOADED", False)
    assert "doubling" in stem.executors()
    assert {"reference", "sdpa", "triton", "hub"} <= set(stem.executors())
    q = torch.randn(1, 2, 40, 16)
    out = stem.attention(q, q[:, :1], q[:, :1], backend="doubling")
    assert torch.equal(out, torch.full_like(q, 2.0))
    assert stem.last_dispatch() == "doubling (asked for by name)"
    # auto never picks it over the reference executor (lower priority)
    stem.attention(q, q[:, :1], q[:, :1], config=stem.StemConfig(block_size=16, stride=4))
    assert stem.last_dispatch().startswith("auto -> ")
    assert "doubling" not in stem.last_dispatch().split(" (")[0]


def test_broken_plugin_is_reported_not_fatal(tmp_path, monkeypatch):
    dist = tmp_path / "stem_broken-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: stem-broken\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[stem.executors]\nbroken = no_such_module_here:Thing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, val in (("_REGISTRY", {}), ("_BY_PRIORITY", []), ("_LOAD_ERRORS", {}), ("_CHOICES", {}),
                      ("_LOADED", False)):
        monkeypatch.setattr(dispatch, name, val)
    rows = {r.name: r for r in stem.executor_status("cpu")}
    assert not rows["broken"].usable and "failed to load" in rows["broken"].reason
    with pytest.raises(RuntimeError, match="failed to load"):
        stem.attention(torch.randn(1, 1, 8, 16), torch.randn(1, 1, 8, 16), torch.randn(1, 1, 8, 16), backend="broken")


def test_resolve_once_per_key(monkeypatch):
    """Each (backend, key) is decided once: a second call with the same key asks no executor again;
    a new key, or a registration, decides anew."""
    calls = []

    class Counting(Executor):
        name = "counting"
        priority = 10_000
        device_types = ("cpu",)

        def supports(self, key):
            calls.append(key)
            return None if key.head_dim == 16 else "head dim 16 only"

        def forward(self, q, k, v, plan, scale, return_lse):
            return torch.zeros_like(q), (torch.zeros(q.shape[:3]) if return_lse else None)

    stem.executors()
    monkeypatch.setattr(dispatch, "_REGISTRY", dict(dispatch._REGISTRY))
    monkeypatch.setattr(dispatch, "_BY_PRIORITY", list(dispatch._BY_PRIORITY))
    monkeypatch.setattr(dispatch, "_CHOICES", {})
    stem.register_executor(Counting())
    cfg = stem.StemConfig(block_size=16, stride=4)
    q = torch.randn(1, 2, 64, 16)
    for _ in range(3):
        stem.attention(q, q[:, :1], q[:, :1], config=cfg)
    assert len(calls) == 1 and stem.last_dispatch() == "auto -> counting"
    stem.attention(q, q[:, :1], q[:, :1], config=cfg, return_lse=True)  # a new key
    assert len(calls) == 2
    q32 = torch.randn(1, 2, 64, 32)
    stem.attention(q32, q32[:, :1], q32[:, :1], config=cfg)  # the counting executor declines: next one
    assert len(calls) == 3 and "skipped counting: head dim 16 only" in stem.last_dispatch()
    stem.attention(q32, q32[:, :1], q32[:, :1], config=cfg)
    assert len(calls) == 3
    key = DispatchKey(torch.device("cpu"), torch.float32, 16, 16, False, False)
    assert dispatch.resolve("auto", key)[0].name == "counting"


def test_explicit_backend_reported_and_checked(gen):
    q, k, v = rand_qkv(gen, 1, 2, 1, 80, 80, 16)
    out = stem.attention(q, k, v, config=DENSE, backend="reference")
    assert stem.last_dispatch() == "reference (asked for by name)"
    assert _rel(out, dense_causal_attention64(q, k, v)) < 1e-5
    q, k, v = rand_qkv(gen, 1, 2, 1, 16 * 60, 16 * 60, 16)  # 60 blocks: a sparse plan
    with pytest.raises(ValueError, match="sdpa.*cannot run.*sparse"):
        stem.attention(q, k, v, config=stem.StemConfig(block_size=16, stride=4), backend="sdpa")
    with pytest.raises(ValueError, match="unknown stem backend 'nope'"):
        stem.attention(q, k, v, backend="nope")
    with pytest.raises(TypeError, match="backend must be a string"):
        stem.attention(q, k, v, backend=3)


def test_first_party_loader_falls_back_to_the_checkout(monkeypatch):
    """With no stem_backends on the path, the loader imports backends/ beside the stem package."""
    real = importlib.util.find_spec
    hidden = lambda name, *a: None if name == "stem_backends" else real(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", hidden)
    ours = [m for m in sys.modules if m == "stem_backends" or m.startswith("stem_backends.")]
    saved = {m: sys.modules.pop(m) for m in ours}
    try:
        mod = dispatch.first_party()
        assert Path(mod.__file__).resolve() == ROOT / "backends" / "__init__.py"
        assert {type(e).__name__ for e in mod.executors()} >= {"ReferenceExecutor", "TritonExecutor"}
    finally:
        for m in [m for m in sys.modules if m == "stem_backends" or m.startswith("stem_backends.")]:
            del sys.modules[m]
        sys.modules.update(saved)


def test_dense_executor_puts_cudnn_first_and_restores_the_order():
    """The dense executor's CUDA path runs SDPA with cuDNN first (it was the fastest dense kernel
    measured), restores the caller's priority order afterwards and leaves the enable flags alone."""
    from stem_backends.sdpa import _cudnn_first
    from torch.nn.attention import SDPBackend

    before = torch._C._get_sdp_priority_order()
    flags = torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()
    with _cudnn_first():
        inside = torch._C._get_sdp_priority_order()
        assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()) == flags
    assert inside[0] == int(SDPBackend.CUDNN_ATTENTION) and sorted(inside) == sorted(before)
    assert torch._C._get_sdp_priority_order() == before
