import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen():
    """A fresh, randomly seeded generator per test (fresh inputs every run); seed printed on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def rand_qkv(gen, B, Hq, Hkv, Lq, Lk, D, dtype=torch.float32, value_spread=True):
    q = torch.randn(B, Hq, Lq, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=gen)
    if value_spread:  # values with varied norms so the value bonus matters
        v = v * (0.2 + 3 * torch.rand(B, Hkv, Lk, 1, generator=gen))
    return q, k, v.to(dtype)
