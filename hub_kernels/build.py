#!/usr/bin/env python3
"""Build the stem-attention Hub kernel without nix or network, in the layout ``kernels`` loads.

    python hub_kernels/build.py                  # the CUDA variant for this torch/CUDA (needs nvcc)
    python hub_kernels/build.py --hf-cache DIR   # also install the built tree as an offline HF cache

Output (``--out``, default ``hub_kernels/stem-attention/build``)::

    build/torch<XY>-cxx11-cu<ZZ>-x86_64-linux/   metadata.json, __init__.py, _ops.py, <ns>.so

``kernels`` 0.17 resolves a variant directory by name (``kernels.variants.parse_variant``), reads
``metadata.json`` from it and imports ``<variant>/__init__.py`` (or ``<variant>/<python
name>/__init__.py``) as a package named after ``metadata["id"]``. The op namespace of a build is
that id, ``_stem_attention_<source hash>``, so two builds of different sources load side by side.

Load a build with ``LOCAL_KERNELS=stem-attention/stem-attention=hub_kernels/stem-attention`` (see
hub_kernels/README.md). The build is reproducible: the namespace comes from a hash of the sources
and nothing depends on the clock.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNEL_DIR = HERE / "stem-attention"
DEFAULT_REPO_ID = "stem-attention/stem-attention"

__all__ = ["read_build_toml", "source_hash", "op_namespace", "arch_variant_name", "metadata", "write_metadata",
           "LINK_FLAGS", "cxx_runtime_linkage", "build_cuda", "install_to_hf_cache", "main"]

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
    tv = torch.__version__.split("+")[0].split(".")
    cv = torch.version.cuda.split(".")
    abi = "cxx11" if torch.compiled_with_cxx11_abi() else "cxx98"
    return f"torch{tv[0]}{tv[1]}-{abi}-cu{cv[0]}{cv[1]}-{platform.machine()}-{platform.system().lower()}"


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

_LIB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "{ns}.so")
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


def build_cuda(out_root: Path, *, archs: list[str] | None = None, jobs: int | None = None,
               verbose: bool = False) -> Path:
    """Compile the CUDA variant with torch.utils.cpp_extension; returns the variant directory."""
    import torch
    from torch.utils.cpp_extension import load

    toml = read_build_toml()
    kernel = toml["kernel"]["block_sparse_attn"]
    archs = archs or list(kernel["cuda-capabilities"])
    ns = op_namespace()
    variant = arch_variant_name()
    sources = [str(KERNEL_DIR / s) for s in toml["torch"]["src"] + kernel["src"] if s.endswith((".cpp", ".cu"))]
    includes = [str(KERNEL_DIR / d) for d in kernel.get("include", [])] + [str(KERNEL_DIR / "torch-ext")]
    obj_dir = out_root / "_objs" / ns
    obj_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    if jobs:
        os.environ["MAX_JOBS"] = str(jobs)
    load(
        name=ns,
        sources=sources,
        extra_include_paths=includes,
        # No -std flag: torch picks the C++ standard its headers were built with (C++20 for torch
        # 2.11); forcing C++17 changed the layout of torch types and crashed on a TORCH_CHECK throw.
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-lineinfo", "--ptxas-options=-warn-spills"],
        extra_ldflags=LINK_FLAGS,
        build_directory=str(obj_dir),
        is_python_module=False,
        verbose=verbose,
    )
    if not hasattr(getattr(torch.ops, ns), "block_sparse_attn_fwd"):
        raise RuntimeError(f"the built library did not register {ns}::block_sparse_attn_fwd")
    if cxx_runtime_linkage(obj_dir / f"{ns}.so") == "static":
        raise RuntimeError(f"{ns}.so carries its own copy of libstdc++ (linked statically); a failing check in "
                           "the op would crash the process. The link needs the shared libstdc++.so.6")
    vdir = _fresh_dir(out_root / variant)
    shutil.copy2(obj_dir / f"{ns}.so", vdir / f"{ns}.so")
    for f in (KERNEL_DIR / "torch-ext" / "stem_attention").glob("*.py"):
        shutil.copy2(f, vdir / f.name)
    (vdir / "_ops.py").write_text(_OPS_TEMPLATE.format(ns=ns))
    write_metadata(vdir, metadata(op_id=ns, archs=archs, toml=toml))
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
    ap.add_argument("--archs", default=None, help="CUDA capabilities, e.g. '8.0,9.0' (default: build.toml)")
    ap.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (MAX_JOBS)")
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
