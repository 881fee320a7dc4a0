#!/usr/bin/env python3
"""Every torch x CUDA build variant of the stem-attention Hub kernel, built here, ABI-checked.

    python hub_kernels/variants.py list                       # the matrix, and what each row needs
    python hub_kernels/variants.py build                      # build + check every row -> out/hub-variants/build
    python hub_kernels/variants.py build --only torch211-cxx11-cu130-x86_64-linux
    python hub_kernels/variants.py check DIR                  # kernel-abi-check over a build tree
    python hub_kernels/variants.py table                      # hub_kernels/variants.json as a Markdown table

A variant is compiled against the headers and libraries of the torch release it is for, taken from
that release's wheel (``pip download --no-deps torch==X``; only ``torch/include``, ``torch/lib``,
``torch/share/cmake`` and ``torch/version.py`` are unpacked, nothing is installed), with a CUDA
toolkit assembled from packages (``TOOLKITS``). Downloads are cached under ``--cache`` (default
``~/.cache/stem-hub``); the build tree is the layout ``kernels.get_kernel`` loads
(``build/<variant>/metadata.json`` and ``build/<variant>/stem_attention/``), and ``--hf-cache DIR``
lays it out as an offline Hugging Face cache. Each build is checked with ``kernel-abi-check``
(manylinux and Python ABI, the Hub's defaults) and ``record`` writes, per variant: built or not,
why not, seconds, library size, the check's findings (hub_kernels/variants.json).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RECORD = HERE / "variants.json"
DEFAULT_CACHE = Path(os.environ.get("STEM_HUB_CACHE", Path.home() / ".cache" / "stem-hub"))
DEFAULT_OUT = ROOT / "out" / "hub-variants"

# The Hub's ABI policy (the defaults of `kernels check`): the glibc/libstdc++ symbol versions of
# manylinux_2_28, and the stable Python ABI of Python 3.9.
MANYLINUX = "manylinux_2_28"
PYTHON_ABI = "3.9"


def _load_build():
    spec = importlib.util.spec_from_file_location("stem_hub_build", HERE / "build.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("stem_hub_build", mod)
    spec.loader.exec_module(mod)
    return mod


build = _load_build()


class TorchRelease(NamedTuple):
    """A torch minor release: the wheel pinned for its headers, the CUDA of that PyPI wheel, and the
    CUDA versions the release is built for (kernel-builder's list of required variants, where it
    names the release; otherwise only the PyPI wheel's, the one that can be confirmed here)."""

    version: str
    pypi_cuda: str
    cudas: tuple[str, ...]


# torch 2.8-2.11: CUDA versions from kernel-builder's build-variants list (x86_64-linux). 2.12+:
# the CUDA of the PyPI wheel only (its requirements: cuda-toolkit 13.0.x for 2.12-2.14, 13.2.x for
# 2.15); their other CUDA builds live on the PyTorch index, which is not a package registry here.
TORCH_RELEASES: dict[str, TorchRelease] = {r.version.rsplit(".", 1)[0]: r for r in (
    TorchRelease("2.8.0", "12.8", ("12.6", "12.8", "12.9")),
    TorchRelease("2.9.1", "12.8", ("12.6", "12.8", "12.9", "13.0")),
    TorchRelease("2.10.0", "12.8", ("12.6", "12.8", "13.0")),
    TorchRelease("2.11.0", "13.0", ("12.6", "12.8", "13.0")),
    TorchRelease("2.12.1", "13.0", ("13.0",)),
    TorchRelease("2.13.0", "13.0", ("13.0",)),
    TorchRelease("2.14.1", "13.0", ("13.0",)),
    TorchRelease("2.15.0", "13.2", ("13.2",)),
)}


class Toolkit(NamedTuple):
    """A CUDA toolkit assembled from packages: PyPI wheels (``pip``), or Debian packages (``deb``,
    fetched with apt-get from Debian's non-free component of ``deb_suite``) with the CUDA C++ core
    library headers (CCCL: ``nv/target``, ``cuda/std``) of the same CUDA release from PyPI (``pip``;
    Debian has them in its main component, under other versions)."""

    version: str
    pip: tuple[str, ...] = ()
    deb: tuple[str, ...] = ()
    deb_suite: str = ""


# CUDA 13: complete toolkits as PyPI wheels (nvcc, cicc, ptxas, crt headers, runtime, CCCL).
# CUDA 12: PyPI's nvidia-cuda-nvcc-cu12 wheels hold ptxas and libnvvm but no nvcc driver, cudafe++
# or cicc, so no wheel compiles CUDA C++; the newest complete CUDA 12 toolkit among the package
# registries is Debian's (12.5, in Debian's experimental suite; trixie has 12.4, which lacks
# cudaGetDriverEntryPointByVersion, CUDA 12.5+, that the sm90 kernel uses). Code built with a CUDA
# 12.x toolkit runs with any CUDA 12 runtime of a later minor version (CUDA's minor version
# compatibility, which `kernels` also relies on when it loads a cu12y variant under torch with CUDA
# 12.z, z >= y: the library needs libcudart.so.12 and holds machine code for sm_80/sm_90/sm_90a, no
# PTX to JIT), so the cu126, cu128 and cu129 variants of a torch release are one build with it.
TOOLKITS: dict[str, Toolkit] = {
    "12.5": Toolkit("12.5", deb=("nvidia-cuda-toolkit=12.5.40~12.5.0-2+b1", "nvidia-cuda-dev=12.5.39~12.5.0-2+b1",
                                 "libcudart12=12.5.39~12.5.0-2+b1"), deb_suite="experimental",
                    pip=("nvidia-cuda-cccl-cu12==12.5.39.post1",)),
    "13.0": Toolkit("13.0", pip=("nvidia-cuda-nvcc==13.0.88", "nvidia-nvvm==13.0.88", "nvidia-cuda-crt==13.0.88",
                                 "nvidia-cuda-runtime==13.0.96", "nvidia-cuda-cccl==13.0.85")),
    "13.2": Toolkit("13.2", pip=("nvidia-cuda-nvcc==13.2.86", "nvidia-nvvm==13.2.86", "nvidia-cuda-crt==13.2.86",
                                 "nvidia-cuda-runtime==13.2.86", "nvidia-cuda-cccl==13.2.86")),
}


def toolkit_for(cuda: str) -> Toolkit | None:
    """The toolkit that builds the variant for ``cuda``: the same version, or for CUDA 12 the CUDA 12
    toolkit at hand (minor version compatibility); None where there is none."""
    if cuda in TOOLKITS:
        return TOOLKITS[cuda]
    major = cuda.split(".")[0]
    older = [t for v, t in TOOLKITS.items() if v.split(".")[0] == major == "12" and _ver(v) <= _ver(cuda)]
    return max(older, key=lambda t: _ver(t.version)) if older else None


def _ver(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v))


class Row(NamedTuple):
    """One variant: the torch release and CUDA version it is for, and the toolkit that builds it."""

    torch: TorchRelease
    cuda: str
    toolkit: Toolkit | None

    @property
    def variant(self) -> str:
        return build.variant_name(self.torch.version, self.cuda)

    @property
    def build_key(self) -> tuple[str, str] | None:
        """Rows with the same key compile to the same library (same torch headers, same toolkit)."""
        return (self.torch.version, self.toolkit.version) if self.toolkit else None


def matrix() -> list[Row]:
    return [Row(r, c, toolkit_for(c)) for r in TORCH_RELEASES.values() for c in r.cudas]


def _row(variant: str) -> Row:
    rows = {r.variant: r for r in matrix()}
    if variant not in rows:
        raise ValueError(f"no variant {variant!r} in the matrix; one of: {', '.join(rows)}")
    return rows[variant]


# ---- downloads ----------------------------------------------------------------------------------
def _pip_download(reqs: list[str], dest: Path) -> list[Path]:
    """Wheels for x86_64 Linux, no dependencies, into ``dest`` (pip reuses files already there)."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
           "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64", "--platform",
           "manylinux2014_x86_64", "--platform", "manylinux_2_12_x86_64", "--platform", "manylinux_2_5_x86_64",
           "--platform", "manylinux1_x86_64", "-d", str(dest), *reqs]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"pip download {' '.join(reqs)} failed (a package index reachable?):\n{r.stderr[-2000:]}")
    names = re.findall(r"(?:Saved|File was already downloaded) (\S+\.whl)", r.stdout)
    found = [Path(n) for n in names] or sorted(set(dest.glob("*.whl")) - before)
    return [p if p.is_absolute() else dest / p.name for p in found]


def _wheel_for(dest: Path, req: str) -> Path:
    """The cached wheel of ``name==version`` (downloaded when missing)."""
    name, version = req.split("==")
    pat = re.compile(rf"{name.replace('-', '_')}-{re.escape(version)}(-\d+)?-", re.I)
    hits = [p for p in dest.glob("*.whl") if pat.match(p.name)] if dest.is_dir() else []
    if not hits:
        hits = [p for p in _pip_download([req], dest) if pat.match(p.name)]
    if not hits:
        raise FileNotFoundError(f"pip did not leave a wheel of {req} in {dest}")
    return hits[0]


TORCH_MEMBERS = ("torch/include/", "torch/share/cmake/", "torch/version.py", "torch/utils/cpp_extension.py")
TORCH_LIBS = ("libc10.so", "libc10_cuda.so", "libtorch.so", "libtorch_cpu.so", "libtorch_cuda.so")


def fetch_torch(release: TorchRelease, cache: Path) -> Path:
    """``<cache>/torch/<version>/torch``: the headers, CMake files, version file and the libraries an
    extension links against, unpacked from the release's PyPI wheel."""
    dest = cache / "torch" / release.version
    done = dest / ".complete"
    if done.exists():
        return dest / "torch"
    whl = _wheel_for(cache / "wheels", f"torch=={release.version}")
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".torch-"))
    with zipfile.ZipFile(whl) as z:
        for m in z.namelist():
            if m.startswith(TORCH_MEMBERS) or m in {f"torch/lib/{lib}" for lib in TORCH_LIBS}:
                z.extract(m, tmp)
    version = _read_version(tmp / "torch" / "version.py")
    if version["cuda"] != release.pypi_cuda:
        raise RuntimeError(f"torch {release.version} from PyPI is a CUDA {version['cuda']} build, the matrix says "
                           f"{release.pypi_cuda}: fix TORCH_RELEASES in {Path(__file__).name}")
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(dest)
    done.write_text(whl.name + "\n")
    return dest / "torch"


def _read_version(path: Path) -> dict:
    text = path.read_text()
    ver = re.search(r"__version__\s*=\s*'([^']+)'", text)
    cuda = re.search(r"\bcuda\s*(?::\s*Optional\[str\])?\s*=\s*'([^']+)'", text)
    if ver is None:
        raise ValueError(f"{path}: no __version__")
    return {"version": ver.group(1), "cuda": cuda.group(1) if cuda else None}


def fetch_toolkit(tk: Toolkit, cache: Path) -> Path:
    """``<cache>/cuda/<version>``: a CUDA toolkit directory (bin/nvcc, nvvm/, include/, lib*/)."""
    dest = cache / "cuda" / tk.version
    if (dest / ".complete").exists():
        return dest
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".cuda-"))
    if tk.deb:
        _assemble_deb_toolkit(tk, cache, tmp)
    else:
        for req in tk.pip:
            with zipfile.ZipFile(_wheel_for(cache / "wheels", req)) as z:
                z.extractall(tmp / "x")
        roots = [p for p in (tmp / "x" / "nvidia").iterdir() if (p / "bin" / "nvcc").exists()]
        if len(roots) != 1:
            raise RuntimeError(f"CUDA {tk.version} wheels: expected one nvidia/<dir>/bin/nvcc, found {roots}")
        root = roots[0]
        for f in (root / "bin").iterdir():
            f.chmod(0o755) if f.is_file() else None
        (root / "nvvm" / "bin" / "cicc").chmod(0o755)
        shutil.move(str(root), tmp / "tk")
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    (tmp / "tk").rename(dest)
    shutil.rmtree(tmp)
    (dest / ".complete").write_text(tk.version + "\n")
    return dest


_NVCC_PROFILE = """TOP = $(_HERE_)/..
NVVMIR_LIBRARY_DIR = $(TOP)/nvvm/libdevice
PATH += $(TOP)/nvvm/bin:$(_HERE_):
INCLUDES += "-I$(TOP)/include" $(_SPACE_)
LIBRARIES =+ $(_SPACE_) "-L$(TOP)/lib64"
"""


def _assemble_deb_toolkit(tk: Toolkit, cache: Path, tmp: Path) -> None:
    """Debian's CUDA packages, unpacked (not installed) into the usual toolkit layout."""
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in tk.deb if not list(debs.glob(p.replace("=", "_").replace(":", "%3a") + "_*.deb"))]
    if missing:
        _apt_download(missing, tk.deb_suite, debs, cache)
    x = tmp / "x"
    for p in tk.deb:
        deb = next(debs.glob(p.replace("=", "_").replace(":", "%3a") + "_*.deb"))
        # nvidia-cuda-dev is mostly static libraries: only its headers are needed
        members = ["./usr/include"] if p.startswith("nvidia-cuda-dev") else []
        tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
        x.mkdir(exist_ok=True)
        subprocess.run(["tar", "-x", "-C", str(x), *members], input=tar, check=True)
    tk_dir = tmp / "tk"
    for sub in ("bin/crt", "nvvm/bin", "nvvm/libdevice", "lib64"):
        (tk_dir / sub).mkdir(parents=True, exist_ok=True)
    libexec = x / "usr" / "lib" / "nvidia-cuda-toolkit"
    shutil.copy2(libexec / "bin" / "nvcc", tk_dir / "bin" / "nvcc")
    for tool in ("cudafe++", "ptxas", "fatbinary", "nvlink", "bin2c", "nvprune", "cuobjdump"):
        shutil.copy2(x / "usr" / "bin" / tool, tk_dir / "bin" / tool)
    for stub in (libexec / "bin" / "crt").iterdir():
        shutil.copy2(stub, tk_dir / "bin" / "crt" / stub.name)
    shutil.copy2(libexec / "bin" / "cicc", tk_dir / "nvvm" / "bin" / "cicc")
    shutil.copy2(libexec / "libdevice" / "libdevice.10.bc", tk_dir / "nvvm" / "libdevice" / "libdevice.10.bc")
    shutil.copytree(x / "usr" / "include", tk_dir / "include")
    for req in tk.pip:  # CCCL headers
        with zipfile.ZipFile(_wheel_for(cache / "wheels", req)) as z:
            z.extractall(tmp / "w")
    for inc in (tmp / "w").glob("nvidia/*/include"):
        shutil.copytree(inc, tk_dir / "include", dirs_exist_ok=True, ignore=shutil.ignore_patterns("__init__.py"))
    cudart = sorted((x / "usr" / "lib" / "x86_64-linux-gnu").glob("libcudart.so.12.*"))[0]
    shutil.copy2(cudart, tk_dir / "lib64" / "libcudart.so.12")
    (tk_dir / "bin" / "nvcc.profile").write_text(_NVCC_PROFILE)


def _apt_download(pkgs: list[str], suite: str, dest: Path, cache: Path) -> None:
    """apt-get download from Debian's non-free component of ``suite``, with its own package lists
    (the system's apt configuration is not touched)."""
    state = cache / "apt"
    (state / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (state / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    src = state / "sources.list"
    src.write_text(f"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
                   f"http://deb.debian.org/debian {suite} non-free\n")
    opts = ["-o", f"Dir::Etc::SourceList={src}", "-o", "Dir::Etc::SourceParts=/dev/null", "-o",
            f"Dir::State::Lists={state / 'lists'}", "-o", f"Dir::Cache={state}", "-o", "APT::Architecture=amd64"]
    if shutil.which("apt-get") is None:
        raise RuntimeError("the CUDA 12 toolkit comes from Debian packages: this needs apt-get (Debian or Ubuntu)")
    for cmd in (["apt-get", *opts, "update"], ["apt-get", *opts, "download", *pkgs]):
        r = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:1] + cmd[-len(pkgs) - 1:])} failed:\n{r.stderr[-2000:]}")


# ---- build and check ----------------------------------------------------------------------------
def toolchain_for(row: Row, cache: Path) -> object:
    if row.toolkit is None:
        raise RuntimeError(f"no CUDA {row.cuda} toolkit among the package registries ({', '.join(TOOLKITS)} are)")
    torch_root = fetch_torch(row.torch, cache)
    cuda_home = fetch_toolkit(row.toolkit, cache)
    return build.Toolchain(torch_root=torch_root, torch_version=row.torch.version, torch_cuda=row.cuda,
                           cuda_home=cuda_home, cxx_std=build.cxx_standard(torch_root))


def abi_check(variant_dir: Path) -> dict:
    """kernel-abi-check over every shared library of a variant: {library: [findings]} (empty lists:
    compatible with MANYLINUX and the Python PYTHON_ABI stable ABI)."""
    try:
        from kernel_abi_check import ObjectFile
    except ImportError as e:
        raise RuntimeError("kernel-abi-check is not installed: "
                           "pip install -c ci/constraints.txt kernel-abi-check") from e
    libs = sorted(Path(variant_dir).rglob("*.so"))
    if not libs:
        raise FileNotFoundError(f"no shared library in {variant_dir}")
    out = {}
    for lib in libs:
        obj = ObjectFile(str(lib))
        found = [f"manylinux: {v.name} needs {v.dep} {v.version}" for v in obj.check_manylinux(MANYLINUX)]
        found += [f"python abi: {v!r}" for v in obj.check_python_abi(PYTHON_ABI)]
        out[lib.relative_to(variant_dir).as_posix()] = found
    return out


def build_row(row: Row, out: Path, cache: Path, *, jobs: int | None, reuse: dict, verbose: bool = False) -> dict:
    """Build one row into ``out/build/<variant>`` (a row whose build key was already built is a copy
    of that build), check it, and return its record."""
    rec: dict = {"variant": row.variant, "torch": row.torch.version, "cuda": row.cuda,
                 "toolkit": row.toolkit.version if row.toolkit else None}
    build_root = out / "build"
    t0 = time.monotonic()
    try:
        if row.build_key in reuse:
            src = reuse[row.build_key]
            dst = build_root / row.variant
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst)
            rec["same_build_as"] = src.name
            vdir = dst
        else:
            tc = toolchain_for(row, cache)
            vdir = build.compile_variant(build_root, tc, jobs=jobs, verbose=verbose)
            reuse[row.build_key] = vdir
    except Exception as e:  # the record says why a row did not build
        rec.update(built=False, why_not=f"{type(e).__name__}: {str(e)[-1500:]}")
        return rec
    lib = next((vdir / build.python_name()).glob("*.so"))
    rec.update(built=True, seconds=round(time.monotonic() - t0, 1), so_bytes=lib.stat().st_size,
               so=lib.relative_to(vdir).as_posix())
    findings = abi_check(vdir)
    rec["abi_check"] = "pass" if not any(findings.values()) else "fail"
    rec["abi_findings"] = [f for fs in findings.values() for f in fs][:20]
    return rec


def build_all(out: Path, cache: Path, *, only: list[str] | None = None, jobs: int | None = None,
              verbose: bool = False) -> list[dict]:
    rows = [_row(v) for v in only] if only else matrix()
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    reuse: dict = {}
    records = []
    for row in rows:
        print(f"== {row.variant} (torch {row.torch.version}, CUDA toolkit "
              f"{row.toolkit.version if row.toolkit else '-'})", flush=True)
        rec = build_row(row, out, cache, jobs=jobs, reuse=reuse, verbose=verbose)
        print("   " + json.dumps({k: v for k, v in rec.items() if k != "abi_findings"}), flush=True)
        for f in rec.get("abi_findings", []):
            print("   abi: " + f)
        records.append(rec)
        (out / "records.json").write_text(json.dumps(_merge(out / "records.json", records), indent=1) + "\n")
    return records


def _merge(path: Path, records: list[dict]) -> list[dict]:
    old = json.loads(path.read_text()) if path.exists() else []
    by = {r["variant"]: r for r in old}
    by.update({r["variant"]: r for r in records})
    order = [r.variant for r in matrix()]
    return sorted(by.values(), key=lambda r: order.index(r["variant"]) if r["variant"] in order else len(order))


def write_record(records: list[dict], path: Path = RECORD, *, command: str, date: str) -> Path:
    host = {"machine": platform.machine(), "cxx": _first_line(["g++", "--version"]), "glibc": platform.libc_ver()[1]}
    doc = {"command": command, "date": date, "host": host, "manylinux": MANYLINUX, "python_abi": PYTHON_ABI,
           "kernel_abi_check": _dist_version("kernel-abi-check"), "variants": records}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def table(doc: dict) -> str:
    """The record as a Markdown table: variant, built?, why not, build seconds, library size, check."""
    lines = ["| variant | torch | CUDA toolkit | built | why not | build s | .so size | kernel-abi-check |",
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["variants"]:
        if r["built"]:
            secs = f"{r['seconds']:.0f}" if "same_build_as" not in r else f"(same build as {r['same_build_as']})"
            size = f"{r['so_bytes'] / 2**20:.2f} MiB"
            check = r["abi_check"] + ("" if not r["abi_findings"] else ": " + "; ".join(r["abi_findings"]))
            lines.append(f"| `{r['variant']}` | {r['torch']} | {r['toolkit']} | yes | | {secs} | {size} | {check} |")
        else:
            why = r["why_not"].splitlines()[0][:160]
            lines.append(f"| `{r['variant']}` | {r['torch']} | {r['toolkit'] or '-'} | no | {why} | | | |")
    return "\n".join(lines)


def _first_line(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        return ""


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the matrix")
    b = sub.add_parser("build", help="build and check variants")
    b.add_argument("--only", nargs="*", default=None, help="variant names (default: every row)")
    b.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output root (default: %(default)s)")
    b.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="download cache (default: %(default)s)")
    b.add_argument("--jobs", type=int, default=None)
    b.add_argument("--hf-cache", type=Path, default=None, help="also lay the tree out as an offline HF cache here")
    b.add_argument("--record", type=Path, default=None, help="write the record (JSON) here")
    b.add_argument("-v", "--verbose", action="store_true")
    c = sub.add_parser("check", help="kernel-abi-check every variant of a build tree")
    c.add_argument("tree", type=Path)
    t = sub.add_parser("table", help="the record as a Markdown table")
    t.add_argument("record", type=Path, nargs="?", default=RECORD)
    args = ap.parse_args(argv)
    if args.cmd == "table":
        print(table(json.loads(args.record.read_text())))
        return 0
    if args.cmd == "list":
        for row in matrix():
            tk = f"CUDA {row.toolkit.version} toolkit" if row.toolkit else "no toolkit"
            print(f"{row.variant:40s} torch {row.torch.version:8s} {tk}")
        return 0
    if args.cmd == "check":
        bad = 0
        for vdir in sorted(p for p in args.tree.iterdir() if (p / "metadata.json").exists()):
            for lib, found in abi_check(vdir).items():
                print(f"{vdir.name}/{lib}: {'pass' if not found else 'FAIL'}")
                for f in found:
                    print("   " + f)
                bad += bool(found)
        return 1 if bad else 0
    records = build_all(args.out, args.cache, only=args.only, jobs=args.jobs, verbose=args.verbose)
    if args.record:
        cmd = "python hub_kernels/variants.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_record(records, args.record, command=cmd, date=time.strftime("%Y-%m-%d", time.gmtime()))
    if args.hf_cache is not None:
        print("HF cache snapshot:", build.install_to_hf_cache(args.out / "build", args.hf_cache))
    failed = [r["variant"] for r in records if not r.get("built") or r.get("abi_check") != "pass"]
    print(f"{len(records) - len(failed)}/{len(records)} variants built and passed kernel-abi-check")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
