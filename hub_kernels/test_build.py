"""CPU checks of the Hub kernel's sources and tooling, and of the `hub` executor's loading code.

* layout of hub_kernels/stem-attention, build.toml, metadata, the source hash;
* the supports contract (csrc/supported.h), compiled with the host compiler and checked against
  the written specification; the instantiation files against what that contract can select;
* the CUDA sources compile with nvcc (sm_80 and sm_90a) with one kernel per used instantiation,
  and the torch binding compiles against torch's headers;
* csrc/wgmma.cuh is what tools/gen_wgmma.py generates; no environment variable is read by the kernel;
* loading: a small variant directory made here (the kernel's real Python package, with an
  ``_ops.py`` that registers the op schemas of torch_binding.cpp in Python, and kernel_path /
  kernel_path_reason answered by supported.h compiled here) is loaded through the real
  ``kernels.get_kernel`` (LOCAL_KERNELS, offline HF cache) and through ``HubExecutor``.

Nothing here touches the network or needs a GPU.
"""

from __future__ import annotations

import ast
import ctypes
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from benchmarks.hub.throw_probe import FMT

ROOT = Path(__file__).resolve().parents[1]
HUB = ROOT / "hub_kernels"
KERNEL_DIR = HUB / "stem-attention"
CSRC = KERNEL_DIR / "csrc"
REPO_ID = "stem-attention/stem-attention"


def _load_build_module():
    spec = importlib.util.spec_from_file_location("stem_hub_build", HUB / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


build = _load_build_module()
kernels = pytest.importorskip("kernels")
CXX = shutil.which("g++") or shutil.which("c++")
needs_cxx = pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
_REAL_CUDA_IS_AVAILABLE = torch.cuda.is_available
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")


# ---- layout, build.toml, metadata -------------------------------------------------------------
def _kernel_files() -> list[str]:
    """The kernel directory's files relative to it: the ones git tracks (build output and caches
    are ignored), or every file outside build/ and caches where this is no git checkout."""
    r = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "."], cwd=KERNEL_DIR,
                       capture_output=True, text=True)
    if r.returncode == 0 and r.stdout.strip():
        return r.stdout.split()
    skip = {"build", "__pycache__", ".pytest_cache"}
    return [f.relative_to(KERNEL_DIR).as_posix() for f in KERNEL_DIR.rglob("*")
            if f.is_file() and not skip & set(f.relative_to(KERNEL_DIR).parts)]


def test_kernel_directory_holds_the_kernel_builder_layout_only():
    """build.toml, csrc/, torch-ext/, tests/: nothing else (the build output is not part of it)."""
    files = _kernel_files()
    assert {f.split("/")[0] for f in files} == {"build.toml", "csrc", "torch-ext", "tests"}, files
    assert {f for f in files if f.startswith("torch-ext/")} == {
        "torch-ext/torch_binding.cpp", "torch-ext/torch_binding.h", "torch-ext/stem_attention/__init__.py"}
    assert "tests/test_stem_attention.py" in files


def _kernel_sources() -> list[str]:
    """The sources of every [kernel.*] section of build.toml, in order."""
    return [src for k in build.read_build_toml()["kernel"].values() for src in k["src"]]


# kernel-builder's build.toml schema (kernels-data config v3, every struct deny_unknown_fields):
# the keys each table may hold, and the ones it must.
_SCHEMA_GENERAL = {"name", "version", "license", "upstream", "backends", "cuda", "hub", "neuron", "python-depends",
                   "xpu"}
_SCHEMA_HUB = {"repo-id", "branch"}
_SCHEMA_TORCH = {"include", "minver", "maxver", "pyext", "src"}
_SCHEMA_CUDA_KERNEL = {"backend", "cuda-capabilities", "cuda-flags", "cuda-minver", "cxx-flags", "depends", "include",
                       "src"}


def test_build_toml_follows_the_kernel_builder_schema():
    t = build.read_build_toml()
    assert set(t) == {"general", "torch", "kernel"}
    g = t["general"]
    assert set(g) <= _SCHEMA_GENERAL and {"name", "backends", "license"} <= set(g)
    assert re.fullmatch(r"[a-z][-a-z0-9]*[a-z0-9]", g["name"])
    assert set(g["hub"]) <= _SCHEMA_HUB
    assert set(t["torch"]) <= _SCHEMA_TORCH
    for name, k in t["kernel"].items():
        assert set(k) <= _SCHEMA_CUDA_KERNEL and {"backend", "depends", "src"} <= set(k), name
        assert k["depends"] == ["torch"], name
        for cap in k["cuda-capabilities"]:
            assert re.fullmatch(r"\d+\.\d+a?", cap), (name, cap)


def test_build_toml_has_required_fields():
    from stem_backends.hub import DEFAULT_REPO

    t = build.read_build_toml()
    g = t["general"]
    assert g["name"] == "stem-attention"
    assert isinstance(g["version"], int) and g["version"] >= 1
    assert g["license"] == "Apache-2.0"
    assert g["backends"] == ["cuda"]
    assert g["hub"]["repo-id"] == DEFAULT_REPO  # where stem's hub executor loads the kernel from
    assert sorted(t["torch"]["src"]) == ["torch-ext/torch_binding.cpp", "torch-ext/torch_binding.h"]
    # the binding includes csrc headers: [torch] must name csrc as an include directory
    binding = (KERNEL_DIR / "torch-ext" / "torch_binding.cpp").read_text()
    assert any((CSRC / h).is_file() for h in re.findall(r'#include "([^"]+)"', binding))
    assert "csrc" in t["torch"]["include"]
    for src in t["torch"]["src"] + _kernel_sources():
        assert (KERNEL_DIR / src).is_file(), f"build.toml lists a missing source: {src}"
    # every file in csrc/ is listed (an unlisted one would silently not be built or shipped)
    on_disk = {f.relative_to(KERNEL_DIR).as_posix() for f in CSRC.rglob("*") if f.is_file()}
    assert on_disk == set(_kernel_sources())


def test_build_toml_arch_groups():
    """The sm90 kernel (wgmma, setmaxnreg: Hopper's architecture-specific instructions) compiles for
    9.0a only; the sm80 kernel and the dispatch for 8.0 and 9.0 (the op runs the sm80 kernel on
    Hopper too, and sm_80 machine code does not run on a 9.x device); each .cu file in one group."""
    k = build.read_build_toml()["kernel"]
    assert set(k) == {"block_sparse_attn_sm80", "block_sparse_attn_sm90"}
    sm80, sm90 = k["block_sparse_attn_sm80"], k["block_sparse_attn_sm90"]
    assert sm80["cuda-capabilities"] == ["8.0", "9.0"] and sm90["cuda-capabilities"] == ["9.0a"]
    cu80 = {s for s in sm80["src"] if s.endswith(".cu")}
    cu90 = {s for s in sm90["src"] if s.endswith(".cu")}
    assert not cu80 & cu90
    assert cu90 == {f.relative_to(KERNEL_DIR).as_posix() for f in CSRC.glob("inst/*sm90*.cu")}
    assert "csrc/block_sparse_attn_dispatch.cu" in cu80
    # the headers each .cu file of a group includes are listed in that group (kernel-builder copies
    # a section's listed files)
    for group in (sm80, sm90):
        for src in (s for s in group["src"] if s.endswith(".cu")):
            for inc in re.findall(r'#include "([^"]+)"', (KERNEL_DIR / src).read_text()):
                rel = (KERNEL_DIR / src).parent.joinpath(inc).resolve().relative_to(KERNEL_DIR).as_posix()
                assert rel in group["src"], (src, rel)


def test_metadata_writer_is_valid(tmp_path):
    ns = build.op_namespace()
    assert ns.isidentifier() and ns.startswith("_stem_attention_")
    meta = build.metadata(op_id=ns, archs=["8.0", "9.0a"])
    path = build.write_metadata(tmp_path, meta)
    raw = json.loads(path.read_text())
    assert set(raw) == {"name", "id", "version", "license", "python-depends", "backend"}
    assert raw["python-depends"] == []
    parsed = kernels.Metadata.read_from_file(path)  # the loader's own parser
    assert parsed.id == ns
    assert parsed.name.python_name == "stem_attention"
    assert parsed.version == 1 and parsed.license == "Apache-2.0"
    assert str(parsed.backend.backend_type).lower().endswith("cuda")
    assert parsed.backend.archs == ["8.0", "9.0a"]


def test_source_hash_is_stable_and_tracks_sources(tmp_path):
    copy = tmp_path / "k"
    shutil.copytree(KERNEL_DIR, copy, ignore=shutil.ignore_patterns("build", "__pycache__"))
    h0 = build.source_hash(copy)
    assert build.source_hash(copy) == h0
    f = copy / "csrc" / "supported.h"
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


def test_build_has_no_other_variants():
    """One variant: the compiled CUDA kernel (no torch-universal/Triton packaging)."""
    assert not hasattr(build, "build_universal")
    with pytest.raises(SystemExit):
        build.main(["--universal"])


# ---- the supports contract (csrc/supported.h) ---------------------------------------------------
_CONTRACT_SRC = r"""
#include <cstring>
#include "supported.h"

// supported.h is usable at compile time (the dispatch relies on it in `if constexpr`).
static_assert(stem_attn::sm90_head_dim(128), "constexpr");
static_assert(stem_attn::kernel_path(stem_attn::kBFloat16, 128, 128, 9, 0).path >= 0, "constexpr");

extern "C" int stem_kernel_path(int dtype, int head_dim, int block_size, int major, int minor, int sm) {
  return stem_attn::kernel_path(dtype, head_dim, block_size, major, minor, sm).path;
}
extern "C" int stem_kernel_path_reason(int dtype, int head_dim, int block_size, int major, int minor, int sm,
                                       char* buf, int n) {
  const std::string s = stem_attn::kernel_path_reason(dtype, head_dim, block_size, major, minor, sm);
  std::strncpy(buf, s.c_str(), n - 1);
  buf[n - 1] = 0;
  return static_cast<int>(s.size());
}
"""


def _build_contract_lib(out_dir: Path) -> Path:
    src = out_dir / "contract.cpp"
    src.write_text(_CONTRACT_SRC)
    lib = out_dir / "libstem_contract.so"
    r = subprocess.run([CXX, "-std=c++17", "-O1", "-shared", "-fPIC", "-I", str(CSRC), str(src), "-o", str(lib)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return lib


class Contract:
    """supported.h compiled with the host compiler, called through ctypes."""

    def __init__(self, lib: Path):
        self.path = lib
        self.lib = ctypes.CDLL(str(lib))
        self.lib.stem_kernel_path.argtypes = [ctypes.c_int] * 6
        self.lib.stem_kernel_path_reason.argtypes = [ctypes.c_int] * 6 + [ctypes.c_char_p, ctypes.c_int]

    def path_of(self, dtype, head_dim, block_size, major, minor, sm=0) -> int:
        return self.lib.stem_kernel_path(dtype, head_dim, block_size, major, minor, sm)

    def reason(self, dtype, head_dim, block_size, major, minor, sm=0) -> str:
        buf = ctypes.create_string_buffer(512)
        self.lib.stem_kernel_path_reason(dtype, head_dim, block_size, major, minor, sm, buf, 512)
        return buf.value.decode()


@pytest.fixture(scope="module")
def contract(tmp_path_factory):
    if CXX is None:
        pytest.skip("no host C++ compiler")
    return Contract(_build_contract_lib(tmp_path_factory.mktemp("contract")))


DTYPES = {"fp16": 0, "bf16": 1}
GRID_DTYPES = (-1, 0, 1, 2)
GRID_HEAD_DIMS = (16, 32, 64, 96, 128, 192, 256, 512)
GRID_BLOCKS = (16, 32, 64, 96, 128, 192, 256, 512)
GRID_CCS = ((7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0))
GRID_SMS = (0, 80, 90)


def spec_path(dtype: int, head_dim: int, block_size: int, cc: tuple[int, int], sm: int) -> int:
    """The written specification of the contract (what README and docstrings promise)."""
    if sm not in (0, 80, 90):
        return 0
    if dtype not in (0, 1) or head_dim not in (64, 128, 256) or block_size not in (64, 128, 256) or cc < (8, 0):
        return 0
    sm90 = cc == (9, 0) and block_size in (128, 256)
    if sm == 80:
        return 80
    if sm == 90:
        return 90 if sm90 else 0
    return 90 if sm90 else 80


def _grid():
    for d in GRID_DTYPES:
        for h in GRID_HEAD_DIMS:
            for b in GRID_BLOCKS:
                for cc in GRID_CCS:
                    for sm in GRID_SMS:
                        yield d, h, b, cc, sm


def test_contract_matches_the_specification(contract):
    wrong = [(d, h, b, cc, sm, contract.path_of(d, h, b, *cc, sm), spec_path(d, h, b, cc, sm))
             for d, h, b, cc, sm in _grid() if contract.path_of(d, h, b, *cc, sm) != spec_path(d, h, b, cc, sm)]
    assert not wrong, f"(dtype, head dim, block, cc, sm, got, want): {wrong[:10]} ({len(wrong)} in all)"


def test_contract_reasons(contract):
    for d, h, b, cc, sm in _grid():
        reason = contract.reason(d, h, b, *cc, sm)
        assert (reason == "") == (contract.path_of(d, h, b, *cc, sm) != 0), (d, h, b, cc, sm, reason)
    assert contract.reason(2, 128, 128, 9, 0) == "dtype is not supported (float16, bfloat16)"
    assert contract.reason(1, 96, 128, 9, 0) == "head dim 96 is not supported (64, 128, 256)"
    assert contract.reason(1, 128, 32, 9, 0) == "plan block size 32 is not supported (64, 128, 256)"
    assert contract.reason(1, 128, 128, 7, 5) == "needs compute capability 8.0 or newer, the device has 7.5"
    assert contract.reason(1, 256, 128, 9, 0, 90) == ""
    assert "sm90 kernel needs compute capability 9.0" in contract.reason(1, 256, 64, 9, 0, 90)
    assert "head dim 256, plan block size 64" in contract.reason(1, 256, 64, 9, 0, 90)
    assert "0 (auto), 80 (sm80), 90 (sm90)" in contract.reason(1, 128, 128, 9, 0, 70)
    assert contract.path_of(1, 128, 128, 9, 0, 70) == 0


_INST_RE = re.compile(r"template cudaError_t (run_block_sparse_attn|run)<(__nv_bfloat16|__half), (\d+)"
                      r"(?:, (kNative|kFp8|kFp8PV))?>\(")
_INST_NAME_RE = re.compile(r"block_sparse_attn_(sm90_)?(fp8_|fp8pv_)?(bf16|fp16)_d(\d+)\.cu")


def _instantiation_files() -> dict[tuple[str, str, int], Path]:
    """(kernel, dtype, head dim) -> the inst/*.cu file, checked against the instantiation it holds."""
    out = {}
    for f in sorted((CSRC / "inst").glob("*.cu")):
        m = _INST_NAME_RE.fullmatch(f.name)
        assert m, f"unexpected instantiation file name {f.name}"
        kernel = ("sm90_" + m.group(2)[:-1] if m.group(2) else "sm90") if m.group(1) else "sm80"
        key = (kernel, m.group(3), int(m.group(4)))
        found = _INST_RE.findall(f.read_text())
        want = ("run" if kernel != "sm80" else "run_block_sparse_attn",
                "__nv_bfloat16" if key[1] == "bf16" else "__half", str(key[2]),
                {"sm80": "", "sm90": "kNative", "sm90_fp8": "kFp8", "sm90_fp8pv": "kFp8PV"}[kernel])
        assert found == [want], f"{f.name} instantiates {found}, its name says {want}"
        out[key] = f
    return out


def test_instantiations_are_what_the_contract_selects(contract):
    """One inst/*.cu file per (kernel, dtype, head dim) that kernel_path can select, and no other;
    build.toml builds each of them."""
    used = set()
    for name, code in DTYPES.items():
        for h in GRID_HEAD_DIMS:
            for b in GRID_BLOCKS:
                for cc in GRID_CCS:
                    for sm in GRID_SMS:
                        path = contract.path_of(code, h, b, *cc, sm)
                        if path:
                            used.add((f"sm{path}", name, h))
    # the FP8 kernels (block_sparse_attn_fp8_fwd, both products or P V only): head dim 128, bf16 or fp16
    used |= {(kind, name, 128) for kind in ("sm90_fp8", "sm90_fp8pv") for name in DTYPES}
    files = _instantiation_files()
    assert set(files) == used, f"files without use: {set(files) - used}; uses without a file: {used - set(files)}"
    listed = set(_kernel_sources())
    assert {f.relative_to(KERNEL_DIR).as_posix() for f in files.values()} <= listed
    assert len(files) == 16 and sum(k[0] == "sm90" for k in files) == 6


def test_no_experiment_switches_left_in_the_kernel():
    """One code path: no runtime experiment fields in Params, one template per sm90 kernel."""
    header = (CSRC / "block_sparse_attn.h").read_text()
    params = header[header.index("struct Params"):header.index("};", header.index("struct Params"))]
    for word in ("tuning", "allow_sm90", "sm90_", "stages", "overlap", "pingpong", "l2", "order"):
        assert word not in params.lower(), word
    sm90 = (CSRC / "block_sparse_attn_sm90.cuh").read_text()
    assert re.search(r"template <typename T, int kD, int kPrec>\s*__global__ void __launch_bounds__\(384, 1\)\s*"
                     r"block_sparse_attn_sm90_kernel", sm90)
    sm80 = (CSRC / "block_sparse_attn_kernel.cuh").read_text()
    assert re.search(r"template <typename T, int kD, int kBlockM>\s*__global__", sm80)


# ---- no environment variables in the kernel ---------------------------------------------------------
_ENV_WORDS_CPP = re.compile(r"\b(getenv|secure_getenv|_dupenv_s|environ|setenv|putenv)\b")


def _env_reads_py(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "environb", "getenv", "getenvb", "putenv"):
            found.append(f"{path.name}:{node.lineno} .{node.attr}")
        elif isinstance(node, ast.Name) and node.id in ("environ", "getenv"):
            found.append(f"{path.name}:{node.lineno} {node.id}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names]
            if isinstance(node, ast.ImportFrom) and node.module == "os" and set(names) & {"environ", "getenv"}:
                found.append(f"{path.name}:{node.lineno} from os import {names}")
            if any(n == "os" or n.startswith("os.") for n in names if isinstance(node, ast.Import)):
                found.append(f"{path.name}:{node.lineno} import os")
    return found


def test_kernel_reads_no_environment_variable():
    """csrc/ and torch-ext/ read no environment variable: what runs is decided by the op's arguments."""
    found = []
    for f in sorted((KERNEL_DIR / "csrc").rglob("*")) + sorted((KERNEL_DIR / "torch-ext").rglob("*")):
        if f.suffix in (".h", ".cuh", ".cu", ".cpp", ".cc"):
            found += [f"{f.name}:{i + 1} {m.group(0)}" for i, line in enumerate(f.read_text().splitlines())
                      for m in _ENV_WORDS_CPP.finditer(line)]
        elif f.suffix == ".py":
            found += _env_reads_py(f)
    assert not found, found
    # the checks find what they look for
    assert _ENV_WORDS_CPP.search('const char* e = std::getenv("X");')
    probe = Path(__file__).parent / "__env_probe_tmp.py"
    try:
        probe.write_text("import os\nx = os.environ.get('X')\n")
        assert len(_env_reads_py(probe)) == 2
    finally:
        probe.unlink()


def test_generated_wgmma_wrappers_are_current():
    """csrc/wgmma.cuh is generated by hub_kernels/tools/gen_wgmma.py; a hand edit or a stale file fails."""
    r = subprocess.run([sys.executable, str(HUB / "tools" / "gen_wgmma.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ---- the CUDA sources and the binding compile ------------------------------------------------------
_ENTRY_RE = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")


def _nvcc(src: Path, out_dir: Path) -> subprocess.CompletedProcess:
    cmd = ["nvcc", "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80",
           "--ptxas-options=-v", "-I", str(CSRC), "-c", str(src), "-o", str(out_dir / (src.stem + ".o"))]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every CUDA source of build.toml compiled with nvcc (in parallel): {relative path: result}."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    out = tmp_path_factory.mktemp("nvcc")
    srcs = [s for s in _kernel_sources() if s.endswith(".cu")]
    with ThreadPoolExecutor(max_workers=max(1, min(len(srcs), os.cpu_count() or 1))) as pool:
        results = list(pool.map(lambda s: _nvcc(KERNEL_DIR / s, out), srcs))
    return dict(zip(srcs, results))


def _entries(r: subprocess.CompletedProcess, arch: str) -> list[str]:
    return [name for name, a in _ENTRY_RE.findall(r.stderr) if a == arch]


@needs_nvcc
def test_cuda_sources_compile(compiled):
    """The torch-free CUDA sources compile for sm_90a (wgmma, TMA) and sm_80 where nvcc exists (no
    GPU needed); the sm90 kernels have no register spills and no serialised wgmma."""
    for src, r in compiled.items():
        assert r.returncode == 0, f"{src}:\n{r.stderr[-4000:]}"
        if "sm90" in src:
            spills = [ln for ln in r.stderr.splitlines() if re.search(r"\b[1-9]\d* bytes spill stores", ln)]
            assert not spills, (src, spills)
        # ptxas serialises every wgmma of a kernel when registers they use are redefined mid-pipeline
        assert "Potential Performance Loss" not in r.stderr, (src, r.stderr[-4000:])


@needs_nvcc
def test_compiled_kernels_are_the_used_instantiations(compiled):
    """The sm_90a code holds one kernel per used configuration and nothing else: one sm90 kernel
    per (dtype, head dim 64/128/256) and four FP8 kernels (both products or P V only; bf16 / fp16; head
    dim 128); sm80
    kernels with 128- and 64-row query tiles for head dims
    64/128 (plan blocks of 128/256 and of 64 tokens) and 64-row tiles only for head dim 256."""
    total_sm90, total_sm80 = 0, 0
    for src, r in compiled.items():
        entries = _entries(r, "sm_90a")
        m = _INST_NAME_RE.search(src)
        if m is None:  # the dispatch defines no kernel
            assert entries == [], (src, entries)
            continue
        if m.group(1):
            assert len(entries) == 1 and "block_sparse_attn_sm90_kernel" in entries[0], (src, entries)
            total_sm90 += 1
        else:
            want = 1 if int(m.group(4)) == 256 else 2
            assert len(entries) == want and all("block_sparse_attn_fwd_kernel" in e for e in entries), (src, entries)
            total_sm80 += len(entries)
    assert (total_sm90, total_sm80) == (10, 10)


def _cuda_include() -> Path | None:
    nvcc = shutil.which("nvcc")
    for cand in ([Path(nvcc).resolve().parents[1] / "include"] if nvcc else []) + [Path("/usr/local/cuda/include")]:
        if (cand / "cuda_runtime.h").is_file():
            return cand
    return None


@needs_cxx
def test_torch_binding_compiles(tmp_path):
    """torch_binding.cpp (the op schemas, the checks through supported.h) compiles against this
    torch's headers; a CPU build of torch lacks one generated CUDA header, supplied here."""
    from torch.utils.cpp_extension import include_paths

    cuda_inc = _cuda_include()
    if cuda_inc is None:
        pytest.skip("no CUDA headers (cuda_runtime.h)")
    incs = [str(p) for p in include_paths()]
    macros = Path(incs[0]) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not macros.exists():
        shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
        shim.mkdir(parents=True)
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n")
        incs.append(str(tmp_path / "shim"))
    cmd = [CXX, "-std=c++20", "-fsyntax-only", *(f"-I{p}" for p in incs), f"-I{cuda_inc}", f"-I{CSRC}",
           "-DTORCH_EXTENSION_NAME=_stem_attention_syntax", str(KERNEL_DIR / "torch-ext" / "torch_binding.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]


_FMT_SRC = FMT  # a number formatted with std::ostream, as a TORCH_CHECK message does (no torch)
_FMT_CHILD = r"""
import ctypes, sys
import torch  # the host process of an extension: torch has loaded the shared libstdc++
lib = ctypes.CDLL(sys.argv[1])
buf = ctypes.create_string_buffer(64)
good = lib.fmt(42, buf, 64)
print(buf.value.decode(), bool(good))
"""


@needs_cxx
def test_link_flags_keep_one_cxx_runtime(tmp_path):
    """build.py links libstdc++ as the shared object torch uses: a library linked with its flags
    formats a number in a torch process (as a TORCH_CHECK message does), and the built library's
    check tells that link from one that carries its own static copy of libstdc++ (which, beside
    torch's, breaks that formatting; benchmarks/NOTES.md, "Op errors")."""
    src = tmp_path / "fmt.cpp"
    src.write_text(_FMT_SRC)
    shared = tmp_path / "fmt_shared.so"
    subprocess.run([CXX, "-O1", "-fPIC", "-shared", str(src), "-o", str(shared), *build.LINK_FLAGS], check=True,
                   capture_output=True, timeout=300)
    r = subprocess.run([sys.executable, "-c", _FMT_CHILD, str(shared)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.split("\n")[0] == "got 42 True", r.stdout + r.stderr[-2000:]
    if not (shutil.which("readelf") and shutil.which("nm")):
        pytest.skip("no binutils (readelf, nm): cxx_runtime_linkage cannot tell")
    assert build.cxx_runtime_linkage(shared) == "shared"
    static = tmp_path / "fmt_static.so"
    if subprocess.run([CXX, "-O1", "-fPIC", "-shared", str(src), "-o", str(static), "-static-libstdc++"],
                      capture_output=True, timeout=300).returncode == 0:
        assert build.cxx_runtime_linkage(static) == "static"


# ---- a variant made here, loaded through `kernels` -----------------------------------------------------
def _op_schemas() -> list[str]:
    """The schemas torch_binding.cpp registers (``ops.def("...")``, adjacent literals joined)."""
    src = (KERNEL_DIR / "torch-ext" / "torch_binding.cpp").read_text()
    schemas = []
    for m in re.finditer(r'ops\.def\(\s*((?:"(?:[^"\\]|\\.)*"\s*)+)', src):
        schemas.append("".join(re.findall(r'"((?:[^"\\]|\\.)*)"', m.group(1))))
    return schemas


_FAKE_OPS = '''"""Made by hub_kernels/test_build.py: the op schemas of torch_binding.cpp, registered in Python.

kernel_path and kernel_path_reason answer from csrc/supported.h compiled with the host compiler;
block_sparse_attn_fwd returns zeros of the op's output shapes (a CPU stand-in: no attention here).
"""
import ctypes

import torch

NS = {ns!r}
_C = ctypes.CDLL({lib!r})
_C.stem_kernel_path.argtypes = [ctypes.c_int] * 6
_C.stem_kernel_path_reason.argtypes = [ctypes.c_int] * 6 + [ctypes.c_char_p, ctypes.c_int]
_LIB = torch.library.Library(NS, "DEF")
for _schema in {schemas!r}:
    _LIB.define(_schema)


def _kernel_path(dtype, head_dim, block_size, cc_major, cc_minor, sm=0):
    return int(_C.stem_kernel_path(dtype, head_dim, block_size, cc_major, cc_minor, sm))


def _kernel_path_reason(dtype, head_dim, block_size, cc_major, cc_minor, sm=0):
    buf = ctypes.create_string_buffer(512)
    _C.stem_kernel_path_reason(dtype, head_dim, block_size, cc_major, cc_minor, sm, buf, 512)
    return buf.value.decode()


def _fwd(q, k, v, kv_counts, kv_indices, block_size, q_offset, scale, return_lse, sm=0):
    B, H, L, _ = q.shape
    return q.new_zeros(q.shape), q.new_zeros((B, H, L) if return_lse else (0,), dtype=torch.float32)


_LIB.impl("kernel_path", _kernel_path, "CompositeExplicitAutograd")
_LIB.impl("kernel_path_reason", _kernel_path_reason, "CompositeExplicitAutograd")
_LIB.impl("last_kernel_path", lambda: 0, "CompositeExplicitAutograd")
_LIB.impl("block_sparse_attn_fwd", _fwd, "CPU")
ops = getattr(torch.ops, NS)


def add_op_namespace_prefix(op_name: str) -> str:
    return NS + "::" + op_name
'''


def _variant_here() -> tuple[str, str, list[str] | None]:
    """(variant directory name, metadata backend, archs) that `kernels` accepts for this torch."""
    if torch.version.cuda is not None:
        return build.arch_variant_name(), "cuda", sorted({a for g in build.kernel_groups() for a in g["archs"]})
    tv = torch.__version__.split("+")[0].split(".")
    abi = "cxx11" if torch.compiled_with_cxx11_abi() else "cxx98"
    return f"torch{tv[0]}{tv[1]}-{abi}-cpu-{platform.machine()}-{platform.system().lower()}", "cpu", None


def make_variant_tree(root: Path, lib: Path) -> Path:
    """<root>/build/<variant>/: the kernel's Python package, metadata.json and a Python _ops.py."""
    ns = "_stem_attention_test_" + hashlib.sha1(str(root).encode()).hexdigest()[:10]
    name, backend, archs = _variant_here()
    vdir = root / "build" / name
    vdir.mkdir(parents=True)
    for f in (KERNEL_DIR / "torch-ext" / "stem_attention").glob("*.py"):
        shutil.copy2(f, vdir / f.name)
    (vdir / "_ops.py").write_text(_FAKE_OPS.format(ns=ns, lib=str(lib), schemas=_op_schemas()))
    build.write_metadata(vdir, build.metadata(op_id=ns, archs=archs, backend=backend))
    return vdir


@pytest.fixture(scope="module")
def variant_tree(tmp_path_factory):
    if CXX is None:
        pytest.skip("no host C++ compiler")
    root = tmp_path_factory.mktemp("hubtree")
    lib = _build_contract_lib(root)
    return root, make_variant_tree(root, lib)


def test_op_schemas_are_read_from_the_binding():
    schemas = _op_schemas()
    names = [s.split("(", 1)[0] for s in schemas]
    assert names == ["block_sparse_attn_fwd", "block_sparse_attn_varlen_fwd", "block_sparse_attn_fp8_fwd",
                     "kernel_path", "kernel_path_reason", "last_kernel_path"]
    assert "bool return_lse, int sm=0) -> (Tensor, Tensor)" in schemas[0]
    assert "Tensor cu_seqlens_q, Tensor cu_seqlens_k" in schemas[1] and schemas[1].endswith("-> (Tensor, Tensor)")
    assert "Tensor q_scale, Tensor k_scale, Tensor v_scale" in schemas[2] and schemas[2].endswith("-> (Tensor, Tensor)")
    assert schemas[4].endswith("-> str")


_CHILD = r"""
import json, sys
import kernels
mod = kernels.get_kernel(sys.argv[1], version=1)
print(json.dumps({"file": mod.__file__, "has_fwd": callable(mod.block_sparse_attn_fwd),
                  "path": mod.ops.kernel_path(1, 128, 128, 9, 0, 0),
                  "reason": mod.ops.kernel_path_reason(1, 96, 128, 9, 0, 0)}))
"""


def _run_child(env_extra: dict, code: str = _CHILD, args=(REPO_ID,)):
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_KERNELS", "HF_HUB_OFFLINE", "KERNELS_CACHE")}
    env.update(env_extra)
    env["HF_HUB_OFFLINE"] = "1"  # never touch the network
    r = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_variant_loads_with_get_kernel_and_local_kernels(variant_tree):
    root, vdir = variant_tree
    out = _run_child({"LOCAL_KERNELS": f"{REPO_ID}={root}"})
    assert out == {"file": str(vdir / "__init__.py"), "has_fwd": True, "path": 90,
                   "reason": "head dim 96 is not supported (64, 128, 256)"}


def test_variant_loads_from_offline_hf_cache(variant_tree, tmp_path):
    root, _ = variant_tree
    snap = build.install_to_hf_cache(root / "build", tmp_path / "cache", REPO_ID)
    out = _run_child({"KERNELS_CACHE": str(tmp_path / "cache")})
    assert out["has_fwd"] and out["path"] == 90
    assert out["file"].startswith(str(snap))


@pytest.fixture
def loaded(variant_tree, monkeypatch):
    """The variant loaded in this process through kernels.get_kernel, on a pretend CUDA device."""
    root, _ = variant_tree
    monkeypatch.setenv("LOCAL_KERNELS", f"{REPO_ID}={root}")
    monkeypatch.delenv("STEM_HUB_REPO", raising=False)
    cc = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: cc["value"])
    mod = kernels.get_kernel(REPO_ID, version=1)

    def set_cc(value):
        cc["value"] = value
        mod._CAPABILITY.clear()  # the wrapper reads a device's capability once

    set_cc((9, 0))
    return mod, set_cc


def test_python_wrapper_asks_the_contract(loaded):
    """supports / kernel_for of the kernel's Python package answer from the op (supported.h)."""
    mod, set_cc = loaded
    assert mod.supports(torch.bfloat16, 128, 128, "cuda") is None
    assert mod.kernel_for(torch.bfloat16, 128, 128, "cuda") == "sm90"
    assert mod.kernel_for(torch.float16, 64, 256, "cuda:0") == "sm90"
    assert mod.kernel_for(torch.bfloat16, 128, 64, "cuda") == "sm80"
    assert mod.kernel_for(torch.bfloat16, 256, 128, "cuda") == "sm90"
    assert mod.kernel_for(torch.bfloat16, 256, 64, "cuda") == "sm80"
    assert mod.kernel_for(torch.bfloat16, 128, 128, "cuda", kernel="sm80") == "sm80"
    assert "sm90 kernel needs" in mod.supports(torch.bfloat16, 256, 64, "cuda", kernel="sm90")
    assert mod.supports(torch.bfloat16, 96, 128, "cuda") == "head dim 96 is not supported (64, 128, 256)"
    assert "float16, bfloat16" in mod.supports(torch.float32, 128, 128, "cuda")
    assert "not cpu" in mod.supports(torch.bfloat16, 128, 128, "cpu")
    with pytest.raises(ValueError, match="plan block size 32"):
        mod.kernel_for(torch.bfloat16, 128, 32, "cuda")
    with pytest.raises(ValueError, match="kernel must be one of"):
        mod.kernel_for(torch.bfloat16, 128, 128, "cuda", kernel="sm100")
    set_cc((8, 6))
    assert mod.kernel_for(torch.bfloat16, 128, 128, "cuda") == "sm80"
    assert "compute capability 9.0" in mod.supports(torch.bfloat16, 128, 128, "cuda", kernel="sm90")
    set_cc((7, 5))
    assert "8.0 or newer" in mod.supports(torch.bfloat16, 128, 128, "cuda")


def test_wrapper_rejects_bad_input_before_the_op(loaded):
    mod, _ = loaded
    q = torch.zeros(1, 2, 8, 128, dtype=torch.bfloat16)
    counts = torch.ones(1, 2, 1, dtype=torch.int32)
    idx = torch.zeros(1, 2, 1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        mod.block_sparse_attn_fwd(q, q, q, counts, idx, 128, 0, 0.1)
    with pytest.raises(ValueError, match="kernel must be one of"):
        mod.block_sparse_attn_fwd(q, q, q, counts, idx, 128, 0, 0.1, kernel="fast")


def test_fake_registration_traces_with_torch_compile(loaded, monkeypatch):
    """The wrapper and the op trace with torch.compile(fullgraph=True) (the op's registered fake
    gives the shapes), here on CPU tensors against the stand-in op; FakeTensorMode alone too."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mod, _ = loaded
    monkeypatch.setattr(torch.cuda, "is_available", _REAL_CUDA_IS_AVAILABLE)  # dynamo asks the real one
    B, H, L, D = 1, 4, 40, 64
    q = torch.randn(B, H, L, D, dtype=torch.bfloat16)
    k = v = torch.randn(B, 2, L, D, dtype=torch.bfloat16)
    counts = torch.ones(B, H, 1, dtype=torch.int32)
    idx = torch.zeros(B, H, 1, 1, dtype=torch.int32)
    for return_lse in (True, False):
        torch._dynamo.reset()

        def attend(q, k, v, return_lse=return_lse):
            out, lse = mod.block_sparse_attn_fwd(q.transpose(1, 2).transpose(1, 2), k, v, counts, idx, 64, 0, 0.125,
                                                 return_lse, kernel="sm80")
            return out * 2, lse

        out, lse = torch.compile(attend, fullgraph=True, backend="aot_eager")(q, k, v)
        assert out.shape == q.shape and out.dtype == q.dtype
        if return_lse:
            assert lse.shape == (B, H, L) and lse.dtype == torch.float32
        else:
            assert lse is None
        with FakeTensorMode() as fm:
            fo, fl = mod.ops.block_sparse_attn_fwd(fm.from_tensor(q), fm.from_tensor(k), fm.from_tensor(v),
                                                   fm.from_tensor(counts), fm.from_tensor(idx), 64, 0, 0.1,
                                                   return_lse, 80)
        assert tuple(fo.shape) == (B, H, L, D) and fo.dtype == torch.bfloat16
        assert tuple(fl.shape) == ((B, H, L) if return_lse else (0,)) and fl.dtype == torch.float32


# ---- the hub executor ------------------------------------------------------------------------------
def _key(dtype=torch.bfloat16, head_dim=128, block_size=128, device="cuda"):
    from stem.dispatch import DispatchKey

    return DispatchKey(device=torch.device(device), dtype=dtype, head_dim=head_dim, block_size=block_size,
                       dense=False, need_lse=False)


def test_hub_executor_with_the_loaded_variant(loaded):
    from stem_backends.hub import HubExecutor

    _, set_cc = loaded
    ex = HubExecutor()
    assert ex.unavailable_reason(torch.device("cuda")) is None
    assert "loaded build: " + _variant_here()[0] in ex.description
    assert ex.supports(_key()) is None
    assert ex.auto_skip_reason(_key()) is None
    assert "head dim 96" in ex.supports(_key(head_dim=96))
    assert "float16, bfloat16" in ex.supports(_key(dtype=torch.float32))
    assert ex.supports(_key(block_size=64)) is None
    assert "sm80 path" in ex.auto_skip_reason(_key(block_size=64))
    assert ex.auto_skip_reason(_key(head_dim=256)) is None
    assert "sm80 path" in ex.auto_skip_reason(_key(head_dim=256, block_size=64))
    assert "head dim 96" in ex.auto_skip_reason(_key(head_dim=96))
    set_cc((8, 9))
    ex2 = HubExecutor()
    assert ex2.supports(_key()) is None and "sm80 path" in ex2.auto_skip_reason(_key())
    assert not hasattr(HubExecutor, "unsupported_reason")


def test_hub_executor_loads_once_and_reads_the_environment_once(loaded, monkeypatch):
    import types

    from stem_backends import hub

    ex = hub.HubExecutor()
    calls = []
    real = ex._load_uncached
    monkeypatch.setattr(ex, "_load_uncached", lambda: calls.append(1) or real())
    env_reads = []
    real_get = os.environ.get

    def counting_get(key, default=None):
        if key in (hub.REPO_ENV, hub.TRUST_ENV, "LOCAL_KERNELS", "HF_HUB_OFFLINE"):
            env_reads.append(key)
        return real_get(key, default)

    mod, reason = ex.load()
    assert reason is None and len(calls) == 1
    monkeypatch.setenv("STEM_HUB_REPO", "someone/else")  # read at load only: no effect now
    monkeypatch.setattr(hub.os.environ, "get", counting_get)
    assert ex.repo == REPO_ID
    plan = types.SimpleNamespace(kv_counts=None, kv_indices=None, block_size=128, q_offset=0)
    seen = []
    monkeypatch.setattr(mod, "block_sparse_attn_fwd", lambda *a: seen.append(a) or ("out", None))
    for _ in range(3):
        assert ex.forward("q", "k", "v", plan, 0.1, False) == ("out", None)
        ex.supports(_key())
        ex.auto_skip_reason(_key())
    assert len(calls) == 1 and len(seen) == 3
    assert env_reads == [], env_reads
    ex.reset()
    assert ex.repo == "someone/else"


def test_hub_executor_registered_attributes():
    from stem_backends.hub import DEFAULT_REPO, HubExecutor

    import stem

    ex = HubExecutor()
    assert (ex.name, ex.device_types) == ("hub", ("cuda",))
    assert ex.priority > stem.executors()["triton"].priority  # its sm90 path measured faster on Hopper
    assert ex.repo == DEFAULT_REPO or os.environ.get("STEM_HUB_REPO")


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
    assert ex.supports(_key()) == reason and ex.auto_skip_reason(_key()) == reason


def test_hub_reason_for_a_module_that_is_not_this_kernel(monkeypatch):
    import types

    from stem_backends import hub

    monkeypatch.setattr(kernels, "get_kernel", lambda repo, **kw: types.SimpleNamespace(block_sparse_attn_fwd=print))
    mod, reason = hub.HubExecutor(repo="someone/other").load()
    assert mod is None and "supports, kernel_for" in reason


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


def test_readme_names_no_removed_switch():
    text = (HUB / "README.md").read_text()
    for word in ("STEM_ATTN_", "--universal", "torch-universal/"):
        assert word not in text, word
    assert 'kernel="sm80"' in text
