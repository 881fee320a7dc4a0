#!/usr/bin/env python3
"""Diagnose how the compiled op reports bad input: each case runs in a child process (a crash
kills only the child) and prints whether it raised a RuntimeError, crashed, or returned.

    python hub_kernels/check_op_errors.py          (after python hub_kernels/build.py, on a GPU)

Cases: a head dim the op rejects (a TORCH_CHECK in torch_binding.cpp), with torch's C++ stack
traces on and off, and a native backtrace under gdb when gdb exists.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent / "stem-attention"

CHILD = f"""
import torch, kernels
from pathlib import Path
mod = kernels.get_local_kernel(Path({str(KERNEL_DIR)!r}))
q = torch.randn(1, 2, 128, 96, device="cuda", dtype=torch.bfloat16)
counts = torch.ones(1, 2, 1, dtype=torch.int32, device="cuda")
idx = torch.zeros(1, 2, 1, 1, dtype=torch.int32, device="cuda")
try:
    mod.ops.block_sparse_attn_fwd(q, q, q, counts, idx, 128, 0, 0.1, False)
    print("RETURNED")
except RuntimeError as e:
    print("RAISED:", str(e).splitlines()[0][:160])
"""


def run(name: str, env: dict[str, str], prefix: list[str] | None = None) -> None:
    cmd = (prefix or []) + [sys.executable, "-X", "faulthandler", "-c", CHILD]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    out = (r.stdout + r.stderr).strip().splitlines()
    print(f"--- {name}: rc {r.returncode}")
    for line in out[-25:]:
        print("   ", line[:200])


def main() -> int:
    run("default", {})
    run("TORCH_SHOW_CPP_STACKTRACES=0", {"TORCH_SHOW_CPP_STACKTRACES": "0"})
    run("TORCH_DISABLE_ADDR2LINE=1", {"TORCH_DISABLE_ADDR2LINE": "1"})
    if shutil.which("gdb"):
        run("gdb backtrace", {}, ["gdb", "-q", "-batch", "-ex", "run", "-ex", "bt 25", "--args"])
    else:
        print("--- gdb not found: no native backtrace")
    return 0


if __name__ == "__main__":
    sys.exit(main())
