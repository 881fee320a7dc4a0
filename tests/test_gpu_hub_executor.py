"""GPU tests of stem's `hub` executor with the kernel built in hub_kernels/stem-attention/build
(`python hub_kernels/build.py`), loaded through LOCAL_KERNELS like a user's local build."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

KERNEL_DIR = Path(__file__).resolve().parent.parent / "hub_kernels" / "stem-attention"
REPO_ID = "stem-attention/stem-attention"


@pytest.fixture(scope="module")
def hub():
    """The registered `hub` executor, (re)loaded from the local build."""
    pytest.importorskip("kernels")
    if not list((KERNEL_DIR / "build").glob("torch*-cu*-*")):
        pytest.skip("no CUDA variant built: run `python hub_kernels/build.py` first")
    import stem
    import stem.dispatch

    saved = os.environ.get("LOCAL_KERNELS")
    os.environ["LOCAL_KERNELS"] = f"{REPO_ID}={KERNEL_DIR}"
    ex = stem.executors()["hub"]
    ex.reset()
    stem.dispatch.clear_cache()
    try:
        assert ex.unavailable_reason(torch.device("cuda")) is None
        yield ex
    finally:
        if saved is None:
            del os.environ["LOCAL_KERNELS"]
        else:
            os.environ["LOCAL_KERNELS"] = saved
        ex.reset()
        stem.dispatch.clear_cache()


def _key(dtype=torch.bfloat16, head_dim=128, block_size=128):
    from stem.dispatch import DispatchKey

    return DispatchKey(torch.device("cuda"), dtype, head_dim, block_size, False, False)


def _qkv(L, gen, Hq=8, Hkv=2, D=128, dtype=torch.bfloat16):
    return tuple(torch.randn(1, H, L, D, generator=gen).to(dtype).cuda() for H in (Hq, Hkv, Hkv))


def test_executor_reports_the_loaded_build_and_the_contract(hub):
    assert "loaded build: torch" in hub.description
    assert hub.supports(_key()) is None
    assert "head dim 96" in hub.supports(_key(head_dim=96))
    assert "float16, bfloat16" in hub.supports(_key(dtype=torch.float32))
    hopper = torch.cuda.get_device_capability() == (9, 0)
    assert (hub.auto_skip_reason(_key()) is None) == hopper
    assert (hub.auto_skip_reason(_key(head_dim=256)) is None) == hopper
    assert "sm80 path" in hub.auto_skip_reason(_key(block_size=64))
    if hopper:
        assert "head dim 64" in hub.auto_skip_reason(_key(head_dim=64))


def test_stem_plan_through_the_hub_executor(hub, gen):
    """A real Stem plan (sparse, 64-token blocks), through stem.attention(backend="hub")."""
    import stem
    from stem.config import StemConfig

    q, k, v = _qkv(64 * 70 + 37, gen)
    out, lse, plan = stem.attention(q, k, v, config=StemConfig(block_size=64), backend="hub", return_lse=True,
                                    return_plan=True)
    assert plan.density < 0.9
    ref, ref_lse = stem.attention(q, k, v, plan=plan, backend="reference", return_lse=True)
    rel = float((out.float() - ref.float()).norm() / ref.float().norm())
    assert rel < 1e-2 and float((lse - ref_lse).abs().max()) < 2e-3


def test_auto_picks_the_hub_where_its_sm90_kernel_runs(hub, gen):
    import stem
    from stem.config import StemConfig

    q, k, v = _qkv(128 * 70 + 5, gen)
    plan = stem.plan(q, k, v, config=StemConfig())
    out = stem.attention(q, k, v, plan=plan)
    hopper = torch.cuda.get_device_capability() == (9, 0)
    assert ("auto -> hub" in stem.last_dispatch()) == hopper, stem.last_dispatch()
    ref = stem.attention(q, k, v, plan=plan, backend="reference")
    assert float((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
    q2, k2, v2 = _qkv(128 * 70 + 77, gen, Hq=8, Hkv=4, D=256)  # long enough that auto does not go dense
    plan2 = stem.plan(q2, k2, v2, config=StemConfig())
    out2 = stem.attention(q2, k2, v2, plan=plan2)
    assert ("auto -> hub" in stem.last_dispatch()) == hopper, stem.last_dispatch()
    ref2 = stem.attention(q2, k2, v2, plan=plan2, backend="reference")
    assert float((out2.float() - ref2.float()).norm() / ref2.float().norm()) < 1e-2
    plan64 = stem.plan(q, k, v, config=StemConfig(block_size=64))
    stem.attention(q, k, v, plan=plan64)
    assert "auto -> hub" not in stem.last_dispatch()  # the sm80 path: triton runs it faster
