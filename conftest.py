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
