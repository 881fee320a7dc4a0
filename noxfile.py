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

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True

CONSTRAINTS = ("-c", "ci/constraints.txt")
CUDA_ROWS = {"cu126": "12.6", "cu128": "12.8", "cu130": "13.0"}
LINT_PATHS = ("stem", "backends", "tests", "benchmarks", "hub_kernels", "noxfile.py", "conftest.py")


def _install(session: nox.Session, extras: str) -> None:
    """torch (the CPU-tested release from ci/constraints.txt), then stem with ``extras``."""
    session.install(*CONSTRAINTS, "torch")
    session.install(*CONSTRAINTS, "-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """CPU test suite (tests/, benchmarks/, hub_kernels/; GPU tests are skipped without CUDA)."""
    _install(session, "test")
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


def _torch_cuda(session: nox.Session) -> str:
    out = session.run("python", "-c", "import torch; print(torch.version.cuda or 'cpu')", silent=True)
    return (out or "").strip().splitlines()[-1]


@nox.session(venv_params=["--system-site-packages"])
@nox.parametrize("cuda", list(CUDA_ROWS))
def gpu_tests(session: nox.Session, cuda: str) -> None:
    """GPU tests against the torch build for one CUDA version (see the module docstring)."""
    want = CUDA_ROWS[cuda]
    if _torch_cuda(session) != want:
        try:
            session.install("torch", "--index-url", f"https://download.pytorch.org/whl/{cuda}", silent=True)
        except Exception:  # nox raises its own CommandFailed; any failure means no registry here
            session.warn(f"could not install torch for {cuda} (no registry reachable?): using the installed torch")
    have = _torch_cuda(session)
    session.log(f"row {cuda}: running with torch CUDA {have}" + ("" if have == want else f" (wanted {want})"))
    session.install("-e", ".", "--no-deps")
    # exit code 5 = nothing collected (no GPU tests selected on this machine): not a failure here
    session.run("python", "-m", "pytest", "-q", "-m", "gpu", *session.posargs, success_codes=[0, 5])


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
