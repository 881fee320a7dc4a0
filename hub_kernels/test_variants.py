"""CPU tests of the variant matrix, the ABI check, the publish step and variant selection.

Nothing here downloads or compiles a torch variant (that is `python hub_kernels/variants.py build`
or `nox -s hub_variant`); the ABI tests compile two tiny libraries with the host compiler, the
loading tests lay fake variant directories side by side and let `kernels.get_kernel` choose, in a
child process that presents itself as a given torch/CUDA release.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HUB = ROOT / "hub_kernels"
REPO_ID = "stem-attention/stem-attention"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"stem_hub_test_{name}", HUB / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


variants = _load("variants")
publish = _load("publish")
build = variants.build
kernels = pytest.importorskip("kernels")
CXX = shutil.which("g++")

# kernel-builder's list of required build variants for CUDA on x86_64 Linux (docs/source/builder/
# build-variants.md of huggingface/kernels, as of torch 2.11, and the torch 2.8/2.9 list before it).
KERNEL_BUILDER_REQUIRED = {
    "torch28-cxx11-cu126-x86_64-linux", "torch28-cxx11-cu128-x86_64-linux", "torch28-cxx11-cu129-x86_64-linux",
    "torch29-cxx11-cu126-x86_64-linux", "torch29-cxx11-cu128-x86_64-linux", "torch29-cxx11-cu130-x86_64-linux",
    "torch29-cxx11-cu129-x86_64-linux",
    "torch210-cxx11-cu126-x86_64-linux", "torch210-cxx11-cu128-x86_64-linux", "torch210-cxx11-cu130-x86_64-linux",
    "torch211-cxx11-cu126-x86_64-linux", "torch211-cxx11-cu128-x86_64-linux", "torch211-cxx11-cu130-x86_64-linux",
}


# ---- the matrix -----------------------------------------------------------------------------------
def test_matrix_holds_every_variant_kernel_builder_requires():
    names = [r.variant for r in variants.matrix()]
    assert len(names) == len(set(names))
    assert KERNEL_BUILDER_REQUIRED <= set(names), KERNEL_BUILDER_REQUIRED - set(names)


def test_matrix_names_parse_as_kernels_variants():
    from kernels.variants import ArchVariant, parse_variant

    for row in variants.matrix():
        v = parse_variant(row.variant)
        assert isinstance(v, ArchVariant) and v.variant_str == row.variant
        assert str(v.framework.version) == ".".join(row.torch.version.split(".")[:2])
        assert str(v.arch.backend.version) == row.cuda


def test_matrix_covers_each_torch_minor_from_2_8_with_its_pypi_cuda():
    minors = sorted(variants.TORCH_RELEASES, key=lambda m: tuple(map(int, m.split("."))))
    assert minors[0] == "2.8" and len(minors) >= 8
    for m, rel in variants.TORCH_RELEASES.items():
        assert rel.version.startswith(m + ".")
        assert rel.pypi_cuda in rel.cudas  # the wheel the headers come from is one of its builds


def test_toolkit_for_uses_minor_version_compatibility_within_cuda_12_only():
    assert variants.toolkit_for("12.6").version == "12.5"
    assert variants.toolkit_for("12.9").version == "12.5"
    assert variants.toolkit_for("13.0").version == "13.0"
    assert variants.toolkit_for("13.1") is None  # CUDA 13 toolkits are only used for their own version
    assert variants.toolkit_for("12.4") is None  # an older runtime than the toolkit: not compatible
    assert variants.toolkit_for("11.8") is None


def test_rows_sharing_a_build_key_are_the_cuda_12_rows_of_one_torch():
    keys: dict = {}
    for row in variants.matrix():
        keys.setdefault(row.build_key, []).append(row.cuda)
    for (torch_version, tk), cudas in keys.items():
        assert len(cudas) == 1 or all(c.startswith("12.") for c in cudas), (torch_version, tk, cudas)


def test_unknown_variant_is_named_in_the_error():
    with pytest.raises(ValueError, match="no variant 'torch27-cxx11-cu118-x86_64-linux' in the matrix"):
        variants.build_all(Path("unused"), Path("unused"), only=["torch27-cxx11-cu118-x86_64-linux"])


def test_variant_name_rejects_malformed_versions():
    assert build.variant_name("2.11.0+cu130", "13.0") == "torch211-cxx11-cu130-x86_64-linux"
    with pytest.raises(ValueError, match="expected versions like"):
        build.variant_name("2", "13.0")


def test_gencode_flags():
    assert build.gencode_flags(["8.0", "9.0a"]) == ["-gencode", "arch=compute_80,code=sm_80",
                                                   "-gencode", "arch=compute_90a,code=sm_90a"]
    with pytest.raises(ValueError, match="MAJOR.MINOR"):
        build.gencode_flags(["sm_90"])


def test_compile_commands_build_each_section_for_its_own_capabilities(tmp_path):
    """The sm90 instantiations compile for sm_90a only, everything else of the CUDA code for sm_80
    and sm_90; the binding with the host compiler, against the toolchain's torch and CUDA."""
    tc = build.Toolchain(torch_root=tmp_path / "torch", torch_version="2.11.0", torch_cuda="13.0",
                         cuda_home=tmp_path / "cuda", cxx_std="c++17")
    (tmp_path / "cuda" / "lib").mkdir(parents=True)
    (tmp_path / "cuda" / "lib" / "libcudart.so.13").write_bytes(b"")
    cmds, link, lib = build.compile_commands(tc, "_ns", tmp_path / "obj")
    by_src = {Path(c[2]).relative_to(build.KERNEL_DIR).as_posix(): c for c in cmds}
    for src, c in by_src.items():
        archs = [a for a in c if a.startswith("arch=")]
        if "inst/" in src and "sm90" in src:
            assert archs == ["arch=compute_90a,code=sm_90a"], src
        elif src.endswith(".cu"):
            assert archs == ["arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90"], src
        else:
            assert c[0] == "g++" and not archs, src
        assert "-std=c++17" in c and str(tmp_path / "torch" / "include") in c
        assert c[c.index("-isystem") + 1] == str(build.COMPAT_INCLUDE)  # first on the include path
    assert "torch-ext/torch_binding.cpp" in by_src
    assert len([s for s in by_src if s.endswith(".cu")]) == 17
    assert link[-2:] == ["-l:libcudart.so.13", *build.LINK_FLAGS] and lib.name == "_ns.abi3.so"
    with pytest.raises(ValueError, match="keeps none of"):
        build.compile_commands(tc, "_ns", tmp_path / "obj", archs=["8.0"])


def test_cxx_standard_is_read_from_the_release(tmp_path):
    (tmp_path / "utils").mkdir()
    (tmp_path / "utils" / "cpp_extension.py").write_text("x = 1\n                cuda_cflags = ['-std=c++17']\n")
    assert build.cxx_standard(tmp_path) == "c++17"
    (tmp_path / "utils" / "cpp_extension.py").write_text("a = ['-std=c++20', '-fPIC']\nb = a + ['-std=c++20']\n"
                                                         "doc = \"e.g. ['-std=c++17']\"\n")
    assert build.cxx_standard(tmp_path) == "c++20"
    (tmp_path / "utils" / "cpp_extension.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="names no C\\+\\+ standard"):
        build.cxx_standard(tmp_path)


# ---- the ABI check and the manylinux compat header ------------------------------------------------
_SHARED_PTR_SRC = r"""
#include <memory>
#include <string>
std::shared_ptr<std::string> keep;
extern "C" long use_count(const char* s) {
  auto p = std::make_shared<std::string>(s);
  keep = p;                       // copying a shared_ptr: libstdc++'s reference count
  return p.use_count();
}
"""


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
def test_abi_check_finds_glibc_2_32_and_the_compat_header_removes_it(tmp_path):
    """A library whose code copies a shared_ptr references glibc 2.32's __libc_single_threaded
    (libstdc++ of GCC 11+ on glibc 2.32+): kernel-abi-check rejects it for manylinux_2_28. Built with
    build.py's compat include first, the same code passes, and still counts references."""
    pytest.importorskip("kernel_abi_check")
    import ctypes

    src = tmp_path / "sp.cpp"
    src.write_text(_SHARED_PTR_SRC)
    for name, extra in (("plain", []), ("compat", ["-isystem", str(build.COMPAT_INCLUDE)])):
        d = tmp_path / name
        d.mkdir()
        subprocess.run([CXX, "-O2", "-fPIC", "-shared", *extra, str(src), "-o", str(d / f"{name}.so"),
                        *build.LINK_FLAGS], check=True, capture_output=True)
    plain = variants.abi_check(tmp_path / "plain")
    if plain == {"plain.so": []}:
        pytest.skip("this C library has no __libc_single_threaded (glibc < 2.32): nothing to avoid")
    assert plain == {"plain.so": ["manylinux: __libc_single_threaded needs GLIBC 2.32"]}
    assert variants.abi_check(tmp_path / "compat") == {"compat.so": []}
    assert ctypes.CDLL(str(tmp_path / "compat" / "compat.so")).use_count(b"x") == 2


def test_abi_check_of_a_directory_without_libraries(tmp_path):
    pytest.importorskip("kernel_abi_check")
    with pytest.raises(FileNotFoundError, match="no shared library"):
        variants.abi_check(tmp_path)


def test_the_committed_record_is_consistent():
    """hub_kernels/variants.json: one row per matrix variant, each built one with its library size
    and check result, each unbuilt one with its reason."""
    doc = json.loads(variants.RECORD.read_text())
    assert doc["manylinux"] == variants.MANYLINUX and doc["python_abi"] == variants.PYTHON_ABI
    assert [r["variant"] for r in doc["variants"]] == [r.variant for r in variants.matrix()]
    for r in doc["variants"]:
        if r["built"]:
            assert r["so_bytes"] > 100_000 and r["abi_check"] in ("pass", "fail") and r["seconds"] >= 0
            assert (r["abi_check"] == "pass") == (not r["abi_findings"])
        else:
            assert r["why_not"]


# ---- a tree of several variants: which one kernels picks, and stem's error when none fits ---------
def _fake_tree(root: Path, names: list[str]) -> Path:
    """<root>/build/<variant>/{metadata.json, stem_attention/__init__.py} for each name; the package
    only says which variant it is."""
    for name in names:
        vdir = root / "build" / name
        (vdir / "stem_attention").mkdir(parents=True)
        (vdir / "stem_attention" / "__init__.py").write_text(f"VARIANT = {name!r}\n")
        build.write_metadata(vdir, build.metadata(op_id="_stem_attention_fake" + name.split("-")[0].lstrip("torch")
                                                  + name.split("-")[2], archs=["8.0", "9.0", "9.0a"]))
    return root / "build"


TREE = ["torch210-cxx11-cu128-x86_64-linux", "torch211-cxx11-cu126-x86_64-linux",
        "torch211-cxx11-cu128-x86_64-linux", "torch211-cxx11-cu130-x86_64-linux",
        "torch213-cxx11-cu130-x86_64-linux"]

# A child process that presents itself, case by case, as torch <version> built with CUDA <cuda> on
# a compute capability 9.0 device, and loads the kernel the way stem does (kernels reads the torch
# and CUDA versions at each call).
_PICK = r"""
import json, sys
import torch
torch.cuda.is_available = lambda: True
torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
import kernels
from stem_backends.hub import _explain_load_error
out = []
for version, cuda in json.loads(sys.argv[2]):
    torch.__version__, torch.version.cuda = version, cuda
    try:
        out.append({"variant": kernels.get_kernel(sys.argv[1], version=1).VARIANT})
    except Exception as e:
        out.append({"error": _explain_load_error(sys.argv[1], e)})
print(json.dumps(out))
"""


def _pick(env_extra: dict, cases: list[tuple[str, str]]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_KERNELS", "KERNELS_CACHE", "HF_HUB_CACHE")}
    env.update(env_extra, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", _PICK, REPO_ID, json.dumps(cases)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


PICKS = [
    (("2.11.0+cu130", "13.0"), "torch211-cxx11-cu130-x86_64-linux"),
    (("2.11.0+cu128", "12.8"), "torch211-cxx11-cu128-x86_64-linux"),
    (("2.11.0+cu126", "12.6"), "torch211-cxx11-cu126-x86_64-linux"),
    (("2.11.0", "12.9"), "torch211-cxx11-cu128-x86_64-linux"),  # newest CUDA 12 variant not newer than 12.9
    (("2.10.0", "12.8"), "torch210-cxx11-cu128-x86_64-linux"),
    (("2.13.0", "13.0"), "torch213-cxx11-cu130-x86_64-linux"),
]
NO_MATCH = [("2.10.0", "12.6"), ("2.9.1", "12.8"), ("2.13.0", "12.8")]


@pytest.fixture(scope="module")
def picked(tmp_path_factory):
    """What get_kernel loads from an offline HF cache holding TREE, for each case of PICKS and NO_MATCH."""
    root = tmp_path_factory.mktemp("tree")
    cache = root / "hf-cache"
    build.install_to_hf_cache(_fake_tree(root, TREE), cache, REPO_ID)
    cases = [c for c, _ in PICKS] + NO_MATCH
    return dict(zip(cases, _pick({"KERNELS_CACHE": str(cache)}, cases)))


@pytest.mark.parametrize("case,want", PICKS)
def test_get_kernel_picks_the_variant_of_the_running_torch(picked, case, want):
    assert picked[case] == {"variant": want}


@pytest.mark.parametrize("case", NO_MATCH)
def test_stem_names_the_variants_when_none_matches(picked, case):
    err = picked[case]["error"]
    assert f"no build variant of {REPO_ID} matches torch {case[0]} / CUDA {case[1]}" in err
    for name in TREE:
        assert name in err


def test_local_build_tree_is_picked_the_same_way(tmp_path):
    _fake_tree(tmp_path, TREE)
    assert _pick({"LOCAL_KERNELS": f"{REPO_ID}={tmp_path}"}, [("2.11.0", "12.8")]) == [
        {"variant": "torch211-cxx11-cu128-x86_64-linux"}]


# ---- publish ----------------------------------------------------------------------------------
class _FakeApi:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def call(**kwargs):
            if name == "upload_folder":
                folder = Path(kwargs["folder_path"])
                kwargs["files"] = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
            self.calls.append((name, kwargs))
        return call


def _records(names, result="pass"):
    return {n: {"variant": n, "abi_check": result} for n in names}


def test_publish_dry_run_prints_the_upload_and_calls_nothing(tmp_path):
    tree = _fake_tree(tmp_path, TREE[:2])
    (tree / "_objs").mkdir()  # build leftovers: no metadata.json, not uploaded
    lines = []
    ops = publish.publish(tree, dry_run=True, records=_records(TREE[:2]), api=_FakeApi(), out=lines.append)
    text = "\n".join(lines)
    assert f"repository {REPO_ID} (type kernel), branch v1: 2 variants" in text
    assert f"build/{TREE[0]}/metadata.json" in text and f"build/{TREE[1]}/stem_attention/__init__.py" in text
    assert "_objs" not in text and "README.md" in text
    assert "would call HfApi.upload_folder(" in text
    assert ops["upload_folder"]["revision"] == "v1"


def test_publish_uploads_the_layout_kernels_resolves(tmp_path):
    """The uploaded folder, laid out as a Hub snapshot on branch v1 (a commit named by refs/v1, as
    huggingface_hub caches it), is what get_kernel(version=1) loads offline."""
    tree = _fake_tree(tmp_path / "t", TREE)
    api = _FakeApi()
    publish.publish(tree, records=_records(TREE), api=api, out=lambda s: None)
    names = [c[0] for c in api.calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    create_repo, create_branch, upload = (c[1] for c in api.calls)
    assert create_repo == {"repo_id": REPO_ID, "repo_type": "kernel", "exist_ok": True}
    assert create_branch == {"repo_id": REPO_ID, "repo_type": "kernel", "branch": "v1", "exist_ok": True}
    assert upload["revision"] == "v1" and upload["repo_type"] == "kernel"
    assert upload["delete_patterns"] == [f"build/{n}/**" for n in TREE]
    files = upload["files"]
    assert "README.md" in files
    assert {f.split("/")[1] for f in files if f.startswith("build/")} == set(TREE)
    # the same files as a Hub cache snapshot (refs/v1 -> commit), resolved by kernels offline
    snap_root = tmp_path / "cache" / "kernels--stem-attention--stem-attention"
    snap = snap_root / "snapshots" / ("0" * 40)
    for f in files:
        if f.startswith("build/"):
            (snap / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(tree.parent / f, snap / f)
    (snap_root / "refs").mkdir(parents=True)
    (snap_root / "refs" / "v1").write_text("0" * 40)
    assert _pick({"KERNELS_CACHE": str(tmp_path / "cache")}, [("2.11.0", "13.0")]) == [
        {"variant": "torch211-cxx11-cu130-x86_64-linux"}]


def test_publish_refuses_unchecked_variants_and_bad_trees(tmp_path):
    tree = _fake_tree(tmp_path, TREE[:2])
    with pytest.raises(ValueError, match=f"no passing kernel-abi-check recorded for {TREE[1]}"):
        publish.publish(tree, dry_run=True, records={**_records(TREE[:1]), **_records(TREE[1:2], "fail")},
                        out=lambda s: None)
    publish.publish(tree, dry_run=True, records={}, unchecked=True, out=lambda s: None)
    with pytest.raises(FileNotFoundError, match="no variant directories"):
        publish.publish(tmp_path / "build" / TREE[0] / "stem_attention", dry_run=True, unchecked=True,
                        out=lambda s: None)
    with pytest.raises(ValueError, match="expected 'org/name'"):
        publish.publish(tree, repo_id="no-slash", dry_run=True, unchecked=True, out=lambda s: None)
