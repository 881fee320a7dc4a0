"""Shared pytest setup for every test folder (tests/, benchmarks/, hub_kernels/).

* GPU tests (marker ``gpu``) are skipped where no CUDA device is visible.
* ``gen``: a fresh torch.Generator per test. Its seed is random on every run, so each run sees new
  inputs, and printed on failure; ``STEM_TEST_SEED=<int>`` fixes it to replay a failure.
"""

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def test_seed() -> int:
    """The seed of this test run: ``STEM_TEST_SEED`` if set, else fresh random bits."""
    env = os.environ.get("STEM_TEST_SEED")
    if env is not None and env.strip() != "":
        try:
            return int(env)
        except ValueError:
            raise pytest.UsageError(f"STEM_TEST_SEED must be an integer, got {env!r}") from None
    return int.from_bytes(os.urandom(4), "little")


test_seed.__test__ = False  # a helper, not a test


def interpreted_child_results(script: str, timeout: float = 300) -> dict:
    """Run ``script`` (a test file run as a program) under Triton's CPU interpreter in a child
    process (the interpreter must be on before triton is imported) with this run's seed in
    ``STEM_TEST_SEED``; return the dict the child printed on its ``STEM_RESULTS {json}`` line (case
    name -> None or the failure's traceback). Skips when triton is not installed."""
    import importlib.util
    import json
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton)")
    seed = test_seed()
    print(f"seed={seed} (replay with STEM_TEST_SEED={seed})")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", STEM_TEST_SEED=str(seed))
    here = os.path.dirname(os.path.abspath(__file__))  # the child imports this file (child_report)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("STEM_RESULTS ")]
    assert proc.returncode == 0 and lines, f"interpreter child failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("STEM_RESULTS "):])


@pytest.fixture
def seed() -> int:
    """This test's seed (see :func:`test_seed`), printed so that a failure names it."""
    s = test_seed()
    print(f"seed={s} (replay with STEM_TEST_SEED={s})")
    return s


@pytest.fixture
def gen(seed):
    """A torch.Generator (CPU) seeded with this test's seed."""
    return torch.Generator().manual_seed(seed)


def child_report(checks: dict) -> None:
    """In an interpreter child (:func:`interpreted_child_results`): run each check (name ->
    zero-argument callable) and print the ``STEM_RESULTS {json}`` line (name -> None, or the
    failure's traceback)."""
    import json
    import traceback

    results = {}
    for name, fn in checks.items():
        try:
            fn()
            results[name] = None
        except Exception:
            results[name] = traceback.format_exc(limit=4)
    print("STEM_RESULTS " + json.dumps(results))
