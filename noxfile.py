"""nox sessions: the single runner of the test, lint, demo, build and GPU workflows.

    nox -s tests lint         # CPU test suite + ruff (what CI runs: bash ci/test.sh)
    nox -s demo               # the main job on the built-in workload (bash ci/demo.sh)
    nox -s "gpu_tests(cuda='cu130')"   # GPU tests against one CUDA build of torch
    nox -s hub_build          # build the Hub kernel for the local torch/CUDA (needs nvcc)
    nox -s gpu_hub            # GPU: build + test + sanitize + time the Hub kernel
    nox -s bench              # `stem bench` on the local GPU

Versions come from ci/constraints.txt (one pin per tool, CPU torch included). GPU rows: each
``gpu_tests`` row first tries to install the torch wheel for its CUDA version from the PyTorch index
into an environment that also sees the system's packages; where no registry is reachable, the row
runs with the torch already installed and says so in its log.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True

CONSTRAINTS = ("-c", "ci/constraints.txt")
CUDA_ROWS = {"cu126": "12.6", "cu128": "12.8", "cu130": "13.0"}
LINT_PATHS = ("stem", "backends", "tests", "benchmarks", "hub_kernels", "noxfile.py", "conftest.py")
HUB_OUT = "out/hub-variants"


def _hub_variants():
    """hub_kernels/variants.py (stdlib only at import): the torch x CUDA matrix of the Hub kernel."""
    spec = importlib.util.spec_from_file_location("stem_hub_variants", Path(__file__).parent / "hub_kernels" /
                                                  "variants.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


HUB_MATRIX = [(row.torch.version.rsplit(".", 1)[0], row.cuda) for row in _hub_variants().matrix()]


def _install(session: nox.Session, extras: str) -> None:
    """torch (the CPU-tested release from ci/constraints.txt), then stem with ``extras``."""
    session.install(*CONSTRAINTS, "torch")
    session.install(*CONSTRAINTS, "-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """CPU test suite (tests/, benchmarks/, hub_kernels/; GPU tests are skipped without CUDA)."""
    _install(session, "test")
    session.install(*CONSTRAINTS, "kernel-abi-check")  # the ABI check of hub_kernels/test_variants.py
    session.run("python", "-m", "pytest", "-q", "-ra", "-m", "not gpu", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the whole tree."""
    session.install(*CONSTRAINTS, "ruff")
    session.run("ruff", "check", *LINT_PATHS)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: `stem demo` on the built-in synthetic long-context workload."""
    _install(session, "plot")
    session.run("stem", "info")
    session.run("stem", "demo", *session.posargs)


def _see_outer_packages(session: nox.Session) -> None:
    """Let the session's environment see the packages of the interpreter that runs nox (its CUDA
    torch): --system-site-packages reaches only a base interpreter's packages, not those of a
    virtual environment nox itself runs in. Packages installed in the session come first."""
    import sysconfig

    inner = session.run("python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", silent=True)
    Path((inner or "").strip().splitlines()[-1], "_nox_outer_site.pth").write_text(sysconfig.get_paths()["purelib"])


def _torch_cuda(session: nox.Session) -> str:
    """The CUDA version torch in the session is built for: "cpu" for a CPU build, "no torch" without."""
    code = "try:\n import torch\nexcept ImportError:\n print('no torch')\nelse:\n print(torch.version.cuda or 'cpu')"
    out = session.run("python", "-c", code, silent=True)
    return (out or "").strip().splitlines()[-1]


@nox.session(venv_params=["--system-site-packages"])
@nox.parametrize("cuda", list(CUDA_ROWS))
def gpu_tests(session: nox.Session, cuda: str) -> None:
    """One GPU row: torch for this CUDA version, the Hub kernel built for it, every GPU test. Run nox
    with the interpreter that holds the CUDA torch (`python3 -m nox ...`)."""
    want = CUDA_ROWS[cuda]
    _see_outer_packages(session)
    if _torch_cuda(session) != want:
        try:
            session.install("torch", "--index-url", f"https://download.pytorch.org/whl/{cuda}", "--retries", "1",
                            "--timeout", "30", silent=True)
        except Exception:  # nox raises its own CommandFailed; any failure means no torch for this row
            session.error(f"row {cuda}: the torch here is {_torch_cuda(session)!r}, not a CUDA {want} build, and "
                          f"torch for CUDA {want} could not be installed (no PyTorch index reachable?); run this "
                          "row where it is installed, with nox run by that Python (python3 -m nox)")
    have = _torch_cuda(session)
    if have != want:
        session.error(f"row {cuda}: torch is built for CUDA {have}, not {want}")
    session.run("python", "-c", "import torch, sys; ok = torch.cuda.is_available(); "
                "print('torch', torch.__version__, 'device', torch.cuda.get_device_name() if ok else None); "
                "sys.exit(0 if ok else 'no CUDA device: a GPU row needs one')")
    session.install("-e", ".", "--no-deps", "--no-build-isolation")
    session.run("python", "hub_kernels/build.py", "--jobs", str(os.cpu_count() or 1))
    env = {"LOCAL_KERNELS": "stem-attention/stem-attention=hub_kernels/stem-attention"}
    # exit code 5 (no test collected) fails the row like any other non-zero code
    session.run("python", "-m", "pytest", "-q", "-ra", "-m", "gpu", *session.posargs, env=env)


@nox.session
@nox.parametrize("torch,cuda", HUB_MATRIX)
def hub_variant(session: nox.Session, torch: str, cuda: str) -> None:
    """Build one Hub variant (torch release x CUDA version: its wheel's headers and libraries, a CUDA
    toolkit from packages; nothing installed into this environment but the checker) into
    out/hub-variants/build and kernel-abi-check it (hub_kernels/variants.py)."""
    session.install(*CONSTRAINTS, "kernel-abi-check")
    variant = _hub_variants().build.variant_name(torch + ".0", cuda)
    session.run("python", "hub_kernels/variants.py", "build", "--out", HUB_OUT, "--only", variant, *session.posargs)


@nox.session
def hub_variants(session: nox.Session) -> None:
    """Every Hub variant into one tree (out/hub-variants/build), its record (hub_kernels/variants.json)
    and an offline HF cache of the tree (out/hub-variants/hf-cache) that kernels.get_kernel loads."""
    session.install(*CONSTRAINTS, "kernel-abi-check")
    session.run("python", "hub_kernels/variants.py", "build", "--out", HUB_OUT, "--record", "hub_kernels/variants.json",
                "--hf-cache", f"{HUB_OUT}/hf-cache", *session.posargs)


@nox.session
def hub_publish(session: nox.Session) -> None:
    """Upload the variant tree to the Hub (hub_kernels/publish.py). Without arguments a dry run:
    `nox -s hub_publish -- out/hub-variants/build --record hub_kernels/variants.json` uploads
    (HF_TOKEN needed)."""
    session.install(*CONSTRAINTS, "kernels")
    args = session.posargs or [f"{HUB_OUT}/build", "--record", "hub_kernels/variants.json", "--dry-run"]
    session.run("python", "hub_kernels/publish.py", *args)


@nox.session(venv_params=["--system-site-packages"])
def hub_build(session: nox.Session) -> None:
    """Build the Hub kernel for the local torch/CUDA (needs nvcc and a CUDA build of torch)."""
    session.install("-e", ".", "--no-deps")
    session.run("python", "hub_kernels/build.py", *session.posargs)


@nox.session(venv_params=["--system-site-packages"])
def gpu_hub(session: nox.Session) -> None:
    """GPU: build the Hub kernel, run its tests, compute-sanitizer and its benchmark
    (benchmarks/gpu/gpu_build_and_test.sh; on offline GPU machines carry the `kernels` wheel)."""
    session.run("bash", "benchmarks/gpu/gpu_build_and_test.sh", external=True)


@nox.session(venv_params=["--system-site-packages"])
def bench(session: nox.Session) -> None:
    """`stem bench` on the local GPU (JSON + PNG)."""
    session.install("-e", ".[bench]", "--no-deps")
    session.run("stem", "bench", *(session.posargs or ["--out", "benchmarks/results"]))
