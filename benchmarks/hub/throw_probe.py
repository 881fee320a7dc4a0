#!/usr/bin/env python3
"""Does a TORCH_CHECK thrown inside a torch op of *any* extension built here crash the process?

Builds minimal extensions with torch.utils.cpp_extension (a torch op registered with
TORCH_LIBRARY and a pybind11 function, each failing a TORCH_CHECK; one built as pure C++, one with
a .cu source through nvcc like the stem-attention build, and pure C++ with -std=c++17 / c++20 forced)
and calls each in a child process.
Separates a fault of this toolchain/torch build from one of the stem-attention sources.

    python benchmarks/hub/throw_probe.py BUILD_DIR
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CPP = r"""
#include <torch/all.h>
#include <torch/library.h>
at::Tensor probe_fail(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 99, "probe: x must be 99-d, got ", x.sizes());
  return x;
}
TORCH_LIBRARY(NS, m) { m.def("probe_fail(Tensor x) -> Tensor", &probe_fail); }
"""
CU = r"""
__global__ void probe_kernel(float* x) { x[0] = 1.f; }
void probe_launch(float* x) { probe_kernel<<<1, 1>>>(x); }
"""

CHILD = """
import sys, torch
torch.ops.load_library(sys.argv[1])
try:
    getattr(torch.ops, sys.argv[2]).probe_fail(torch.zeros(2))
    print("RETURNED")
except RuntimeError as e:
    print("RAISED:", str(e).splitlines()[0][:120])
"""


def build(root: Path, name: str, with_cu: bool, std: str | None = None) -> Path:
    from torch.utils.cpp_extension import load

    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "op.cpp").write_text(CPP.replace("NS", name))
    sources = [str(d / "op.cpp")]
    if with_cu:
        (d / "k.cu").write_text(CU)
        sources.append(str(d / "k.cu"))
    flags = ["-O3"] + ([f"-std={std}"] if std else [])
    load(name=name, sources=sources, build_directory=str(d), is_python_module=False,
         extra_cflags=flags, extra_cuda_cflags=flags, verbose=False)
    return d / f"{name}.so"


def raises_cleanly(root: Path) -> bool:
    """True when a failing TORCH_CHECK in a minimal pure-C++ extension op raises a RuntimeError
    in a child process; False when that crashes the child too (a fault of torch/toolchain here)."""
    so = build(root, "probe_cpp", False)
    r = subprocess.run([sys.executable, "-c", CHILD, str(so), "probe_cpp"], capture_output=True, text=True,
                       timeout=120)
    return r.returncode == 0 and "RAISED" in r.stdout


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/throw_probe")
    import torch

    print("torch", torch.__version__, "| built with:", [ln.strip() for ln in torch.__config__.show().splitlines()
                                                      if "C++ Version" in ln or "GCC" in ln])
    cases = (("probe_cpp", False, None), ("probe_cu", True, None), ("probe_cpp17", False, "c++17"),
             ("probe_cpp20", False, "c++20"))
    for name, with_cu, std in cases:
        try:
            so = build(root, name, with_cu, std)
        except Exception as e:  # noqa: BLE001
            print(f"{name}: build failed: {e}")
            continue
        r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CHILD, str(so), name],
                           capture_output=True, text=True, timeout=120)
        print(f"{name}: rc {r.returncode}: {(r.stdout + r.stderr).strip().splitlines()[:2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
