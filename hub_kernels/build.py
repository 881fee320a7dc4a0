#!/usr/bin/env python3
"""Build the stem-attention Hub kernel without nix or network, in the layout ``kernels`` loads.

    python hub_kernels/build.py                  # the CUDA variant for this torch/CUDA (needs nvcc)
    python hub_kernels/build.py --hf-cache DIR   # also install the built tree as an offline HF cache

Output (``--out``, default ``hub_kernels/stem-attention/build``)::

    build/torch<XY>-cxx11-cu<ZZ>-x86_64-linux/   metadata.json
        stem_attention/                          __init__.py, _ops.py, <ns>.abi3.so

The sources and the CUDA capabilities each compiles for come from build.toml: the ``[torch]``
sources with the host compiler, each ``[kernel.*]`` section's with nvcc for that section's
``cuda-capabilities`` only. ``Toolchain`` says what a build compiles against: the running torch and
the CUDA toolkit it finds (this script), or a torch release's unpacked wheel and a toolkit assembled
from packages (hub_kernels/variants.py, every torch x CUDA variant).

``kernels`` 0.17 resolves a variant directory by name (``kernels.variants.parse_variant``), reads
``metadata.json`` from it and imports ``<variant>/<python name>/__init__.py`` (or
``<variant>/__init__.py``) as a package named after ``metadata["id"]``. The op namespace of a build
is that id, ``_stem_attention_<source hash>``, so two builds of different sources load side by side.

Load a build with ``LOCAL_KERNELS=stem-attention/stem-attention=hub_kernels/stem-attention`` (see
hub_kernels/README.md). The op namespace is reproducible (a hash of the sources); the library's
bytes are not quite (nvcc names internal symbols after its process id).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
KERNEL_DIR = HERE / "stem-attention"

__all__ = ["read_build_toml", "source_hash", "op_namespace", "arch_variant_name", "variant_name", "metadata",
           "write_metadata", "kernel_groups", "gencode_flags", "Toolchain", "local_toolchain", "cxx_standard",
           "compile_commands", "compile_variant", "python_name", "LINK_FLAGS", "cxx_runtime_linkage", "build_cuda",
           "install_to_hf_cache", "main"]

# Link the C++ runtime as the shared object torch uses, by its soname. torch.utils.cpp_extension
# compiles and links with $CXX; where that compiler finds libstdc++.a but no libstdc++.so to link
# against (seen: an image whose CXX points at a relocated GCC 13.3 holding only the archive), g++
# silently links libstdc++ statically. The extension then carries its own copy of libstdc++ beside
# the process's shared one, and a TORCH_CHECK whose message formats a number (std::ostream) calls
# into the wrong locale facet and kills the process instead of raising (benchmarks/NOTES.md, "Op
# errors"). With the shared library found first, the implicit
# -lstdc++ that g++ appends pulls nothing; where g++ links it shared anyway, this changes nothing.
LINK_FLAGS = ["-l:libstdc++.so.6"]
# Defined by a library that carries its own copy of libstdc++ (none is a template that an
# extension instantiates itself).
_LIBSTDCXX_SYMBOLS = ("__cxa_throw", "__gxx_personality_v0", "_ZNSt6locale7classicEv")


def read_build_toml(path: Path = KERNEL_DIR / "build.toml") -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    with open(path, "rb") as f:
        return tomllib.load(f)


DEFAULT_REPO_ID = read_build_toml()["general"]["hub"]["repo-id"]


def _hash_files(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def _kernel_sources(kernel_dir: Path = KERNEL_DIR) -> list[Path]:
    files = [p for sub in ("csrc", "torch-ext") for p in (kernel_dir / sub).rglob("*")
             if p.is_file() and "__pycache__" not in p.parts]
    return files + [kernel_dir / "build.toml"]


def source_hash(kernel_dir: Path = KERNEL_DIR, length: int = 10) -> str:
    """Hex digest of the kernel sources (csrc/, torch-ext/, build.toml): names the op namespace."""
    return _hash_files(_kernel_sources(kernel_dir), kernel_dir)[:length]


def op_namespace(kernel_dir: Path = KERNEL_DIR) -> str:
    """The torch op namespace and metadata id of a build: ``_stem_attention_<source hash>``."""
    return f"_stem_attention_{source_hash(kernel_dir)}"


def arch_variant_name() -> str:
    """``torch<XY>-cxx11-cu<ZZ>-<cpu>-<os>`` for the torch of this process (the name ``kernels``
    matches against the running torch; see kernels.variants)."""
    import torch

    if torch.version.cuda is None:
        raise RuntimeError(f"torch {torch.__version__} has no CUDA; the CUDA variant needs a CUDA build of torch")
    return variant_name(torch.__version__, torch.version.cuda, platform.machine(), platform.system().lower())


def metadata(*, op_id: str, archs: list[str] | None, backend: str = "cuda", toml: dict | None = None) -> dict:
    """metadata.json content (the fields ``kernels.Metadata`` reads)."""
    general = (toml or read_build_toml())["general"]
    backend_info: dict = {"type": backend}
    if archs:
        backend_info["archs"] = list(archs)
    return {
        "name": general["name"],
        "id": op_id,
        "version": int(general["version"]),
        "license": general["license"],
        "python-depends": [],
        "backend": backend_info,
    }


def write_metadata(variant_dir: Path, meta: dict) -> Path:
    path = variant_dir / "metadata.json"
    path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


_OPS_TEMPLATE = '''"""Generated by hub_kernels/build.py: loads the compiled library and names its op namespace."""
import os

import torch

_LIB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "{lib}")
torch.ops.load_library(_LIB)
ops = torch.ops.{ns}


def add_op_namespace_prefix(op_name: str) -> str:
    return "{ns}::" + op_name
'''


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def kernel_groups(toml: dict | None = None, archs: list[str] | None = None) -> list[dict]:
    """The ``[kernel.*]`` sections of build.toml, each with the CUDA capabilities its sources compile
    for: ``[{"name", "archs", "sources", "includes"}]`` (sources are the .cu/.cpp files; headers are
    listed in build.toml for kernel-builder's sandbox only). ``archs`` keeps only those capabilities
    of each section (a section left with none is an error: its launchers would be missing)."""
    toml = toml or read_build_toml()
    groups = []
    for name, k in toml.get("kernel", {}).items():
        if k.get("backend") != "cuda":
            raise ValueError(f"build.toml [kernel.{name}]: backend {k.get('backend')!r}; "
                             "this builder builds 'cuda' kernels only")
        caps = list(k.get("cuda-capabilities") or [])
        if not caps:
            raise ValueError(f"build.toml [kernel.{name}] has no cuda-capabilities; "
                             "list the capabilities it compiles for")
        if archs is not None:
            kept = [c for c in caps if c in archs]
            if not kept:
                raise ValueError(f"--archs {','.join(archs)} keeps none of [kernel.{name}]'s capabilities {caps}; "
                                 "name at least one of them")
            caps = kept
        groups.append({"name": name, "archs": caps,
                       "sources": [s for s in k["src"] if s.endswith((".cu", ".cpp"))],
                       "includes": list(k.get("include", []))})
    if not groups:
        raise ValueError("build.toml has no [kernel.*] section")
    return groups


def gencode_flags(archs: list[str]) -> list[str]:
    """nvcc flags for capabilities as build.toml writes them: "8.0" -> sm_80 code, "9.0a" -> sm_90a
    code (no PTX: kernel-builder compiles each listed capability to machine code)."""
    flags = []
    for a in archs:
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)", a)
        if m is None:
            raise ValueError(f"CUDA capability {a!r} is not of the form MAJOR.MINOR[a|f] (e.g. 8.0, 9.0a)")
        cc = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        flags += ["-gencode", f"arch=compute_{cc},code=sm_{cc}"]
    return flags


class Toolchain(NamedTuple):
    """What one build compiles against: a torch release's headers and libraries (``torch_root`` holds
    ``include/`` and ``lib/``), the CUDA toolkit at ``cuda_home`` (``bin/nvcc``, ``include/``, a
    ``lib64/`` or ``lib/`` with libcudart), and the CUDA version of the torch build the variant is for
    (it names the variant; a CUDA 12 toolkit builds code for every CUDA 12 runtime)."""

    torch_root: Path
    torch_version: str
    torch_cuda: str
    cuda_home: Path
    cxx_std: str
    cxx: str = "g++"

    @property
    def variant(self) -> str:
        return variant_name(self.torch_version, self.torch_cuda)

    def nvcc(self) -> Path:
        return self.cuda_home / "bin" / "nvcc"

    def cudart(self) -> tuple[Path, str]:
        """(directory, linker argument) of the CUDA runtime library."""
        for sub in ("lib64", "lib"):
            d = self.cuda_home / sub
            if (d / "libcudart.so").exists():
                return d, "-lcudart"
            found = sorted(d.glob("libcudart.so.[0-9]*"))
            if found:
                return d, f"-l:{found[0].name.split('.so.')[0]}.so.{found[0].name.split('.so.')[1].split('.')[0]}"
        raise FileNotFoundError(f"no libcudart.so in {self.cuda_home}/lib64 or /lib: not a CUDA toolkit")

    def cuda_includes(self) -> list[Path]:
        inc = self.cuda_home / "include"
        return [inc] + ([inc / "cccl"] if (inc / "cccl").is_dir() else [])


def variant_name(torch_version: str, cuda: str, cpu: str = "x86_64", os_name: str = "linux") -> str:
    """``torch<MAJOR><MINOR>-cxx11-cu<MAJOR><MINOR>-<cpu>-<os>``, the name ``kernels`` matches."""
    tv = torch_version.split("+")[0].split(".")
    cv = cuda.split(".")
    if len(tv) < 2 or len(cv) < 2 or not all(x.isdigit() for x in tv[:2] + cv[:2]):
        raise ValueError(f"torch {torch_version!r} / CUDA {cuda!r}: expected versions like '2.11.0' and '13.0'")
    return f"torch{tv[0]}{tv[1]}-cxx11-cu{cv[0]}{cv[1]}-{cpu}-{os_name}"


def local_toolchain() -> Toolchain:
    """The toolchain of this process: its torch (a CUDA build) and the CUDA toolkit torch finds."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        raise RuntimeError(f"torch {torch.__version__} has no CUDA; the CUDA variant needs a CUDA build of torch")
    if not torch.compiled_with_cxx11_abi():
        raise RuntimeError(f"torch {torch.__version__} uses the pre-C++11 string ABI; Hub kernels are cxx11 builds")
    if CUDA_HOME is None:
        raise RuntimeError("no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)")
    root = Path(torch.__file__).parent
    # the host compiler torch's own extension builder uses ($CXX, else c++)
    return Toolchain(torch_root=root, torch_version=torch.__version__, torch_cuda=torch.version.cuda,
                     cuda_home=Path(CUDA_HOME), cxx_std=cxx_standard(root), cxx=os.environ.get("CXX") or "c++")


def cxx_standard(torch_root: Path) -> str:
    """The C++ standard a torch release compiles CUDA extensions with (``c++17`` up to torch 2.11,
    ``c++20`` later), read from the release's own torch/utils/cpp_extension.py: its CUDA flags
    (``cuda_cflags = ['-std=...']``), else the standard its code names most often."""
    path = Path(torch_root) / "utils" / "cpp_extension.py"
    text = path.read_text()
    cuda = re.findall(r"cuda_cflags = \['-std=(c\+\+\d+)'\]", text)
    if cuda:
        return cuda[0]
    stds = re.findall(r"'-std=(c\+\+\d+)'", text)
    if not stds:
        raise ValueError(f"{path} names no C++ standard ('-std=c++NN'): not a torch release's cpp_extension.py")
    return max(set(stds), key=stds.count)


_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
               "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr", "-O3", "-lineinfo",
               "--ptxas-options=-warn-spills"]
_CXX_FLAGS = ["-O3", "-fPIC"]
# First on the include path of every compile: headers that keep the library within the manylinux
# baseline the Hub checks (manylinux_2_28) when the build machine's C library is newer (see the
# header files; kernel-abi-check, hub_kernels/variants.py, finds what they avoid).
COMPAT_INCLUDE = HERE / "compat" / "manylinux_2_28"


def compile_commands(tc: Toolchain, ns: str, obj_dir: Path, *, archs: list[str] | None = None,
                     kernel_dir: Path = KERNEL_DIR) -> tuple[list[list[str]], list[str], Path]:
    """(compile commands, link command, library path) of one variant: the torch binding with the
    host compiler, each [kernel.*] section's CUDA sources with nvcc for that section's capabilities
    only, then one shared library linked against torch and the CUDA runtime."""
    toml = read_build_toml(kernel_dir / "build.toml")
    torch_inc = [tc.torch_root / "include", tc.torch_root / "include" / "torch" / "csrc" / "api" / "include"]
    defines = [f"-DTORCH_EXTENSION_NAME={ns}", "-DTORCH_API_INCLUDE_EXTENSION_H", "-D_GLIBCXX_USE_CXX11_ABI=1"]
    sys_inc = [a for p in [COMPAT_INCLUDE, *torch_inc, *tc.cuda_includes()] for a in ("-isystem", str(p))]
    torch_section = toml.get("torch", {})
    ext_inc = [f"-I{kernel_dir / d}" for d in torch_section.get("include", [])] + [f"-I{kernel_dir / 'torch-ext'}"]
    cmds, objs = [], []

    def obj_for(src: str) -> Path:
        o = obj_dir / (src.replace("/", "__") + ".o")
        objs.append(o)
        return o

    for src in torch_section.get("src", []):
        if src.endswith(".cpp"):
            cmds.append([tc.cxx, "-c", str(kernel_dir / src), "-o", str(obj_for(src)), f"-std={tc.cxx_std}",
                         *_CXX_FLAGS, *defines, *ext_inc, *sys_inc])
    for g in kernel_groups(toml, archs):
        inc = [f"-I{kernel_dir / d}" for d in g["includes"]]
        for src in g["sources"]:
            if src.endswith(".cu"):
                cmds.append([str(tc.nvcc()), "-c", str(kernel_dir / src), "-o", str(obj_for(src)), "-ccbin", tc.cxx,
                             f"-std={tc.cxx_std}", *_NVCC_FLAGS, *gencode_flags(g["archs"]),
                             "--compiler-options", ",".join(_CXX_FLAGS), *defines, *inc, *sys_inc])
            else:
                cmds.append([tc.cxx, "-c", str(kernel_dir / src), "-o", str(obj_for(src)), f"-std={tc.cxx_std}",
                             *_CXX_FLAGS, *defines, *inc, *sys_inc])
    lib = obj_dir / f"{ns}.abi3.so"
    cudart_dir, cudart = tc.cudart()
    link = [tc.cxx, "-shared", *map(str, objs), "-o", str(lib), f"-L{tc.torch_root / 'lib'}", "-lc10", "-lc10_cuda",
            "-ltorch_cpu", "-ltorch_cuda", "-ltorch", f"-L{cudart_dir}", cudart, *LINK_FLAGS]
    return cmds, link, lib


def _run(cmd: list[str], verbose: bool) -> None:
    if verbose:
        print(" ".join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if verbose and r.stderr:
        print(r.stderr, end="", flush=True)
    if r.returncode != 0:
        raise RuntimeError(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-4000:]}{r.stderr[-8000:]}")


def compile_variant(out_root: Path, tc: Toolchain, *, archs: list[str] | None = None, jobs: int | None = None,
                    verbose: bool = False, kernel_dir: Path = KERNEL_DIR) -> Path:
    """Compile the CUDA variant for ``tc`` into ``out_root/<variant>/``; returns that directory."""
    from concurrent.futures import ThreadPoolExecutor

    toml = read_build_toml(kernel_dir / "build.toml")
    ns = op_namespace(kernel_dir)
    obj_dir = _fresh_dir(Path(out_root) / "_objs" / f"{tc.variant}-{ns}")
    cmds, link, lib = compile_commands(tc, ns, obj_dir, archs=archs, kernel_dir=kernel_dir)
    with ThreadPoolExecutor(max_workers=max(1, jobs or os.cpu_count() or 1)) as pool:
        for f in [pool.submit(_run, c, verbose) for c in cmds]:
            f.result()
    _run(link, verbose)
    if cxx_runtime_linkage(lib) == "static":
        raise RuntimeError(f"{lib.name} carries its own copy of libstdc++ (linked statically); a failing check in "
                           "the op would crash the process. The link needs the shared libstdc++.so.6")
    vdir = _fresh_dir(Path(out_root) / tc.variant)
    pkg = vdir / python_name(toml)
    pkg.mkdir()
    shutil.copy2(lib, pkg / lib.name)
    for f in (kernel_dir / "torch-ext" / python_name(toml)).glob("*.py"):
        shutil.copy2(f, pkg / f.name)
    (pkg / "_ops.py").write_text(_OPS_TEMPLATE.format(ns=ns, lib=lib.name))
    all_archs = sorted({a for g in kernel_groups(toml, archs) for a in g["archs"]}, key=_arch_key)
    write_metadata(vdir, metadata(op_id=ns, archs=all_archs, toml=toml))
    return vdir


def _arch_key(a: str) -> tuple[int, int, str]:
    m = re.fullmatch(r"(\d+)\.(\d+)(.*)", a)
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else (0, 0, a)


def python_name(toml: dict | None = None) -> str:
    """The kernel's Python package name: its name with dashes as underscores (``stem_attention``)."""
    return (toml or read_build_toml())["general"]["name"].replace("-", "_")


def build_cuda(out_root: Path, *, archs: list[str] | None = None, jobs: int | None = None,
               verbose: bool = False) -> Path:
    """Compile the CUDA variant for the torch of this process and load it once as a check."""
    import torch

    tc = local_toolchain()
    vdir = compile_variant(out_root, tc, archs=archs, jobs=jobs, verbose=verbose)
    ns = op_id_of(vdir)
    torch.ops.load_library(str(next((vdir / python_name()).glob("*.so"))))
    if not hasattr(getattr(torch.ops, ns), "block_sparse_attn_fwd"):
        raise RuntimeError(f"the built library did not register {ns}::block_sparse_attn_fwd")
    return vdir


def cxx_runtime_linkage(lib: Path) -> str:
    """How a shared library gets the C++ runtime: ``"shared"`` (it needs libstdc++.so.6 and defines
    none of its symbols), ``"static"`` (it carries a copy of libstdc++), ``"none"`` (neither), or
    ``"unknown"`` without binutils (readelf, nm)."""
    if not (shutil.which("readelf") and shutil.which("nm")):
        return "unknown"
    dyn = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    syms = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True).stdout
    defined = {ln.split()[-1].split("@")[0] for ln in syms.splitlines() if ln.strip()}
    if defined.intersection(_LIBSTDCXX_SYMBOLS):
        return "static"
    return "shared" if "[libstdc++.so.6]" in dyn else "none"


def install_to_hf_cache(build_root: Path, cache_dir: Path, repo_id: str = DEFAULT_REPO_ID, version: int = 1) -> Path:
    """Lay the built variants out as a Hugging Face cache snapshot of ``repo_id`` (ref ``v<version>``),
    so that ``get_kernel(repo_id, version=version)`` resolves offline (HF_HUB_OFFLINE=1, with
    KERNELS_CACHE or HF_HUB_CACHE pointing at ``cache_dir``). Returns the snapshot directory."""
    variants = [p for p in Path(build_root).iterdir() if p.is_dir() and (p / "metadata.json").exists()]
    if not variants:
        raise FileNotFoundError(f"no built variants (directories with metadata.json) in {build_root}")
    commit = hashlib.sha1("".join(sorted(p.name + op_id_of(p) for p in variants)).encode()).hexdigest()
    repo_dir = Path(cache_dir) / ("kernels--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit / "build"
    snap.mkdir(parents=True, exist_ok=True)
    for p in variants:
        dst = snap / p.name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(p, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / f"v{version}").write_text(commit)
    return snap.parent


def op_id_of(variant_dir: Path) -> str:
    return json.loads((variant_dir / "metadata.json").read_text())["id"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=KERNEL_DIR / "build", help="build root (default: %(default)s)")
    ap.add_argument("--archs", default=None,
                    help="only these of build.toml's CUDA capabilities, e.g. '8.0,9.0a' (default: all)")
    ap.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: CPU count)")
    ap.add_argument("--hf-cache", type=Path, default=None, help="also install the build as an offline HF cache here")
    ap.add_argument("--repo-id", default=DEFAULT_REPO_ID, help="repo id for --hf-cache (default: %(default)s)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    archs = args.archs.split(",") if args.archs else None
    vdir = build_cuda(args.out, archs=archs, jobs=args.jobs, verbose=args.verbose)
    print(f"built {vdir}  (id {op_id_of(vdir)})")
    if args.hf_cache is not None:
        print(f"installed as an HF cache snapshot: {install_to_hf_cache(args.out, args.hf_cache, args.repo_id)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
