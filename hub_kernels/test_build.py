"""CPU checks of the Hub kernel packaging (hub_kernels/) and of the `hub` executor's reasons.

The torch-universal variant is built into a temporary directory and loaded through the real
`kernels` package (get_local_kernel, get_kernel + LOCAL_KERNELS, get_kernel from an offline HF
cache). Nothing here touches the network.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
KERNEL_DIR = ROOT / "hub_kernels" / "stem-attention"
REPO_ID = "stem-attention/stem-attention"


def _load_build_module():
    spec = importlib.util.spec_from_file_location("stem_hub_build", ROOT / "hub_kernels" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


build = _load_build_module()
kernels = pytest.importorskip("kernels")
needs_triton_source = pytest.mark.skipif(
    not build.TRITON_SOURCE.exists(), reason="backends/triton/block_sparse_attn.py not present yet"
)


def test_build_toml_has_required_fields():
    t = build.read_build_toml()
    g = t["general"]
    assert g["name"] == "stem-attention"
    assert isinstance(g["version"], int) and g["version"] >= 1
    assert g["license"] == "Apache-2.0"
    assert g["backends"] == ["cuda"]
    assert sorted(t["torch"]["src"]) == ["torch-ext/torch_binding.cpp", "torch-ext/torch_binding.h"]
    k = t["kernel"]["block_sparse_attn"]
    assert k["backend"] == "cuda"
    assert {"8.0", "9.0a"} <= set(k["cuda-capabilities"])
    assert any(s.endswith(".cu") for s in k["src"])
    for src in t["torch"]["src"] + k["src"]:
        assert (KERNEL_DIR / src).is_file(), f"build.toml lists a missing source: {src}"
    # every CUDA source in csrc/ is listed (an unlisted one would silently not be built)
    listed = set(k["src"])
    for f in (KERNEL_DIR / "csrc").rglob("*.cu"):
        assert f.relative_to(KERNEL_DIR).as_posix() in listed


def test_metadata_writer_is_valid(tmp_path):
    ns = build.op_namespace("cuda")
    assert ns.isidentifier() and ns.startswith("_stem_attention_")
    meta = build.metadata(op_id=ns, archs=["8.0", "9.0"])
    path = build.write_metadata(tmp_path, meta)
    raw = json.loads(path.read_text())
    assert set(raw) == {"name", "id", "version", "license", "python-depends", "backend"}
    assert raw["python-depends"] == []
    parsed = kernels.Metadata.read_from_file(path)  # the loader's own parser
    assert parsed.id == ns
    assert parsed.name.python_name == "stem_attention"
    assert parsed.version == 1 and parsed.license == "Apache-2.0"
    assert str(parsed.backend.backend_type).lower().endswith("cuda")
    assert parsed.backend.archs == ["8.0", "9.0"]


def test_source_hash_is_stable_and_tracks_sources(tmp_path):
    import shutil

    copy = tmp_path / "k"
    shutil.copytree(KERNEL_DIR, copy, ignore=shutil.ignore_patterns("build", "__pycache__"))
    h0 = build.source_hash(copy)
    assert build.source_hash(copy) == h0
    f = copy / "csrc" / "block_sparse_attn.h"
    f.write_text(f.read_text() + "\n// changed\n")
    assert build.source_hash(copy) != h0


def test_arch_variant_name_parses():
    from kernels.variants import ArchVariant, parse_variant

    name = "torch211-cxx11-cu130-x86_64-linux"  # the shape build.arch_variant_name() produces
    v = parse_variant(name)
    assert isinstance(v, ArchVariant) and v.variant_str == name
    if torch.version.cuda is None:
        with pytest.raises(RuntimeError, match="no CUDA"):
            build.arch_variant_name()


@pytest.fixture(scope="module")
def universal_tree(tmp_path_factory):
    if not build.TRITON_SOURCE.exists():
        pytest.skip("backends/triton/block_sparse_attn.py not present yet")
    root = tmp_path_factory.mktemp("hub")
    vdir = build.build_universal(root / "build")
    return root, vdir


def test_universal_layout(universal_tree):
    root, vdir = universal_tree
    assert vdir.name == "torch-universal"
    assert (vdir / "__init__.py").is_file() and (vdir / "_triton" / "block_sparse_attn.py").is_file()
    meta = kernels.Metadata.read_from_file(vdir / "metadata.json")
    assert meta.id.startswith("_stem_attention_universal_") and meta.id.isidentifier()
    # the copy is generated output: identical to the original apart from the header line
    copied = (vdir / "_triton" / "block_sparse_attn.py").read_text().split("\n", 1)[1]
    assert copied == build.TRITON_SOURCE.read_text()


def test_universal_loads_with_get_local_kernel(universal_tree):
    root, _ = universal_tree
    mod = kernels.get_local_kernel(root)
    assert mod.VARIANT == "universal"
    assert "block_sparse_attn_fwd" in mod.__all__ and callable(mod.block_sparse_attn_fwd)
    assert mod.supports(torch.bfloat16, 128, 128) is None
    assert "head dim" in mod.supports(torch.bfloat16, 96, 128)


_CHILD = r"""
import json, sys
import kernels
mod = kernels.get_kernel(sys.argv[1], version=1)
print(json.dumps({"variant": mod.VARIANT, "file": mod.__file__, "has_fwd": callable(mod.block_sparse_attn_fwd)}))
"""


def _run_child(env_extra: dict, code: str = _CHILD, args=(REPO_ID,)):
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_KERNELS", "HF_HUB_OFFLINE", "KERNELS_CACHE")}
    env.update(env_extra)
    env["HF_HUB_OFFLINE"] = "1"  # never touch the network
    r = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_universal_loads_with_get_kernel_and_local_kernels(universal_tree):
    root, vdir = universal_tree
    out = _run_child({"LOCAL_KERNELS": f"{REPO_ID}={root}"})
    assert out == {"variant": "universal", "file": str(vdir / "__init__.py"), "has_fwd": True}


def test_universal_loads_from_offline_hf_cache(universal_tree, tmp_path):
    root, _ = universal_tree
    snap = build.install_to_hf_cache(root / "build", tmp_path / "cache", REPO_ID)
    out = _run_child({"KERNELS_CACHE": str(tmp_path / "cache")})
    assert out["variant"] == "universal" and out["has_fwd"]
    assert out["file"].startswith(str(snap))


_INTERPRET_CHILD = r"""
import json, math, sys
from pathlib import Path
import torch, kernels
from stem.plan import BlockPlan
from stem_backends.reference import reference_attention
mod = kernels.get_local_kernel(Path(sys.argv[1]))
g = torch.Generator().manual_seed(int(sys.argv[2]))
B, Hq, Hkv, Lq, Lk, D, bs = 1, 2, 1, 37, 70, 16, 16
q = torch.randn(B, Hq, Lq, D, generator=g); k = torch.randn(B, Hkv, Lk, D, generator=g)
v = torch.randn(B, Hkv, Lk, D, generator=g)
off = Lk - Lq; qbo = off // bs; nQ = (off + Lq - 1) // bs - qbo + 1; nK = -(-Lk // bs)
mask = torch.rand(B, Hq, nQ, nK, generator=g) < 0.5
mask[..., torch.arange(nQ), torch.arange(nQ) + qbo] = True
plan = BlockPlan.from_dense_mask(mask, block_size=bs, q_len=Lq, kv_len=Lk)
o, l = mod.block_sparse_attn_fwd(q, k, v, plan.kv_counts, plan.kv_indices, bs, plan.q_offset, 1 / math.sqrt(D), True)
ro, rl = reference_attention(q, k, v, plan, 1 / math.sqrt(D), True)
print(json.dumps({"out": float((o - ro).abs().max()), "lse": float((l - rl).abs().max())}))
"""


def test_universal_kernel_matches_reference_under_triton_interpreter(universal_tree):
    pytest.importorskip("triton")
    root, _ = universal_tree
    seed = int.from_bytes(os.urandom(2), "little")
    out = _run_child({"TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}, _INTERPRET_CHILD, (str(root), str(seed)))
    assert out["out"] < 1e-4 and out["lse"] < 1e-4, (seed, out)


# ---- HubExecutor reasons ---------------------------------------------------------------------
def test_hub_executor_registered_attributes():
    from stem_backends.hub import DEFAULT_REPO, HubExecutor

    import stem

    ex = HubExecutor()
    assert (ex.name, ex.device_types) == ("hub", ("cuda",))
    assert ex.priority > stem.executors()["triton"].priority  # its sm90 path measured faster on Hopper
    assert ex.repo == DEFAULT_REPO


def test_hub_repo_env_override(monkeypatch):
    from stem_backends.hub import HubExecutor

    monkeypatch.setenv("STEM_HUB_REPO", "someone/other-kernel")
    assert HubExecutor().repo == "someone/other-kernel"
    assert HubExecutor(repo="x/y").repo == "x/y"


def test_hub_unavailable_on_cpu_device():
    from stem_backends.hub import HubExecutor

    assert "not cpu" in HubExecutor().unavailable_reason(torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA reason")
def test_hub_unavailable_without_cuda():
    from stem_backends.hub import HubExecutor

    assert "no CUDA device" in HubExecutor().unavailable_reason(torch.device("cuda"))


def test_hub_unavailable_without_kernels_package(monkeypatch):
    from stem_backends import hub

    real = importlib.util.find_spec
    monkeypatch.setattr(hub.importlib.util, "find_spec", lambda name, *a: None if name == "kernels" else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    reason = hub.HubExecutor().unavailable_reason(torch.device("cuda"))
    assert "kernels" in reason and "pip install 'stem-attention[hub]'" in reason


def test_hub_unavailable_on_old_gpu(monkeypatch):
    from stem_backends import hub

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert "compute capability 8.0" in hub.HubExecutor().unavailable_reason(torch.device("cuda"))


def test_hub_reason_lists_variants_when_none_matches(monkeypatch, tmp_path):
    """A tree with only a CUDA variant for another torch: the reason names what was found."""
    from stem_backends import hub

    other = tmp_path / "build" / "torch19-cxx11-cu118-x86_64-linux"
    other.mkdir(parents=True)
    build.write_metadata(other, build.metadata(op_id="_stem_attention_0000000000", archs=["8.0"]))
    (other / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    monkeypatch.setenv("LOCAL_KERNELS", f"{REPO_ID}={tmp_path}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    ex = hub.HubExecutor()
    reason = ex.unavailable_reason(torch.device("cuda"))
    assert "no build variant" in reason and "torch19-cxx11-cu118-x86_64-linux" in reason
    assert "hub_kernels/build.py" in reason
    assert ex.load()[1] == reason  # cached


def test_hub_reason_for_untrusted_repo(monkeypatch):
    from stem_backends import hub

    def fake_get_kernel(repo, **kw):
        raise ValueError(f"Kernel repository '{repo}' is not from a trusted publisher. Set trust_remote_code=True")

    monkeypatch.setattr(kernels, "get_kernel", fake_get_kernel)
    mod, reason = hub.HubExecutor(repo="nobody/x").load()
    assert mod is None and "untrusted" in reason and hub.TRUST_ENV in reason


def test_import_stem_does_not_import_kernels():
    code = "import sys, stem, stem_backends.hub; print('kernels' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_generated_wgmma_wrappers_are_current():
    """csrc/wgmma.cuh is generated by hub_kernels/tools/gen_wgmma.py; a hand edit or a stale file fails."""
    r = subprocess.run([sys.executable, str(ROOT / "hub_kernels" / "tools" / "gen_wgmma.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("src", ["csrc/inst/block_sparse_attn_sm90_bf16_d128.cu",
                                 "csrc/inst/block_sparse_attn_sm90_fp16_d64.cu",
                                 "csrc/block_sparse_attn_dispatch.cu"])
def test_cuda_sources_compile(tmp_path, src):
    """The torch-free CUDA sources compile for sm_90a (wgmma, TMA) and sm_80, with no register spills
    and no serialised wgmma, where nvcc exists (no GPU needed)."""
    cmd = ["nvcc", "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a",
           "-gencode=arch=compute_80,code=sm_80", "--ptxas-options=-v", "-I", str(KERNEL_DIR / "csrc"),
           "-c", str(KERNEL_DIR / src), "-o", str(tmp_path / "k.o")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    spills = [ln for ln in r.stderr.splitlines() if re.search(r"\b[1-9]\d* bytes spill stores", ln)]
    assert not spills, spills
    # ptxas serialises every wgmma of a kernel when registers they use are redefined mid-pipeline
    assert "Potential Performance Loss" not in r.stderr, r.stderr[-4000:]


def test_auto_skips_hub_without_its_sm90_path(monkeypatch):
    """auto prefers the hub kernel only where it runs its sm90 path; by name it still runs."""
    import types

    from stem_backends.hub import HubExecutor

    from stem.dispatch import Executor, choose_executor

    q = k = v = torch.zeros(1, 2, 8, 128)
    plan = types.SimpleNamespace(block_size=128)
    ex = HubExecutor()

    def fake(variant, kernel=None):
        mod = types.SimpleNamespace(VARIANT=variant, block_sparse_attn_fwd=lambda *a: None)
        if kernel is not None:
            mod.kernel_for = lambda dtype, d, bs, dev: kernel
        return mod

    monkeypatch.setattr(ex, "load", lambda: (fake("universal"), None))
    assert "Triton kernel" in ex.auto_skip_reason(q, k, v, plan)
    monkeypatch.setattr(ex, "load", lambda: (fake("cuda", "sm80"), None))
    assert "sm80 path" in ex.auto_skip_reason(q, k, v, plan)
    monkeypatch.setattr(ex, "load", lambda: (fake("cuda"), None))
    assert "predates" in ex.auto_skip_reason(q, k, v, plan)
    monkeypatch.setattr(ex, "load", lambda: (fake("cuda", "sm90"), None))
    assert ex.auto_skip_reason(q, k, v, plan) is None

    class Slow(Executor):
        name, priority, device_types = "slow", 99, ("cpu",)

        def auto_skip_reason(self, q, k, v, plan):
            return "slower here"

    class Fast(Executor):
        name, priority, device_types = "fast", 1, ("cpu",)

    monkeypatch.setattr("stem.dispatch._by_priority", lambda: [("slow", Slow()), ("fast", Fast())])
    chosen, why = choose_executor(q, k, v, plan)
    assert chosen.name == "fast" and "slow: slower here" in why
