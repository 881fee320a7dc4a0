"""nox sessions: tests (CPU), lint, demo, bench, hub kernel build, and GPU tests across CUDA builds.

    nox -s tests              # CPU suite (what CI runs through ci/test.sh)
    nox -s lint               # ruff
    nox -s demo               # the main job on the built-in workload
    nox -s "gpu_tests(cuda='cu130')"   # GPU tests against one CUDA build of torch
    nox -s hub_build          # build the Hub kernel variants for the local torch/CUDA
    nox -s hub_layout         # CPU: universal variant, layout/metadata/offline-loading tests
    nox -s gpu_hub            # GPU: build + test + sanitize + time the CUDA variant
    nox -s bench              # stem bench (GPU)

GPU rows: each `gpu_tests` row first tries to install the torch wheel for its CUDA version from
the PyTorch index into a venv that can also see the system's packages; where no registry is
reachable (the lent GPU machines have no network), the row runs with the torch already installed
and says so. README.md lists which rows ran where.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True

CONSTRAINTS = ("-c", "ci/constraints.txt")
CUDA_ROWS = {"cu126": "12.6", "cu128": "12.8", "cu130": "13.0"}


def _install_cpu(session: nox.Session, extras: str) -> None:
    session.install("torch==2.13.0")
    session.install(*CONSTRAINTS, "-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """CPU test suite (GPU tests are skipped without CUDA)."""
    _install_cpu(session, "test")
    session.run("python", "-m", "pytest", "-q", "-m", "not gpu", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "stem", "backends", "tests", "benchmarks", "hub_kernels", "noxfile.py")


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: `stem demo` on the built-in synthetic long-context workload."""
    _install_cpu(session, "plot")
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
    """Build the Hub kernel: the CUDA variant for the local torch/CUDA and the torch-universal one
    (needs nvcc and a CUDA build of torch; `--universal` alone builds anywhere)."""
    session.install("-e", ".", "--no-deps")
    session.run("python", "hub_kernels/build.py", *(session.posargs or ["--all"]))


@nox.session
def hub_layout(session: nox.Session) -> None:
    """CPU: build the torch-universal variant and check layout, metadata and offline loading."""
    _install_cpu(session, "test")
    session.run("python", "hub_kernels/build.py", "--universal")
    session.run("python", "-m", "pytest", "-q", "tests/test_hub_layout.py")


@nox.session(venv_params=["--system-site-packages"])
def gpu_hub(session: nox.Session) -> None:
    """GPU: build the CUDA variant, run tests/test_gpu_hub.py, compute-sanitizer and the hub benchmark
    (hub_kernels/gpu_build_and_test.sh; on the offline GPU machines carry the `kernels` wheel)."""
    session.run("bash", "hub_kernels/gpu_build_and_test.sh", external=True)


@nox.session(venv_params=["--system-site-packages"])
def bench(session: nox.Session) -> None:
    """`stem bench` on the local GPU; results under benchmarks/results/."""
    session.install("-e", ".[bench]", "--no-deps")
    session.run("stem", "bench", *session.posargs)
