"""Compile the Triton executor's kernel for a GPU target without a GPU and print its resources.

    python -m benchmarks.triton.resources [--arch 90]

For each head dim (64, 128, 256) and load path (TMA descriptors or plain loads), the configuration
``pick_tiles`` picks is compiled ahead of time through Triton (ptxas included in its wheel) and the
cubin is read with the ``cuobjdump`` Triton ships: shared memory per program, registers per thread
and the stack frame (spill) bytes. Programs per SM follow from these: 228 KiB of shared memory and
65,536 registers per SM on Hopper. Needs no CUDA device (CPU-only torch is enough).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from stem.dispatch import first_party

first_party()
from stem_backends.triton import block_sparse_attn as bsa  # noqa: E402


def compile_resources(tiles, head_dim: int, tma: bool, arch: int, dtype: str = "bf16", block_size: int = 128):
    """(shared bytes, registers, stack bytes) of the kernel compiled for sm_<arch> with ``tiles``."""
    fn = bsa._stem_sparse_attn_fwd
    consts = dict(BS=block_size, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, HEAD_DIM=head_dim,
                  SUB_M=block_size // tiles.block_m, SUB_N=block_size // tiles.block_n, W_P2=256, USE_ORDER=False,
                  RETURN_LSE=False, DOT_PREC="tf32", UPCAST=False, USE_TMA=tma, TMA_MASKED=tma and tiles.tma_masked,
                  VARLEN=False, FOLD=True)
    sig = {}
    for n in fn.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in ("Q", "K", "V", "O"):
            sig[n] = "*" + dtype
        elif n == "LSE":
            sig[n] = "*fp32"
        elif n in ("COUNTS", "INDICES", "ORDER", "CU_Q", "CU_K"):
            sig[n] = "*i32"
        elif n in ("KD", "VD"):
            sig[n] = f"tensordesc<{dtype}[{tiles.block_n}, {head_dim}]>" if tma else "*" + dtype
        elif n == "qk_scale":
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    opts = dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    if tiles.maxnreg:
        opts["maxnreg"] = tiles.maxnreg
    return kernel_resources(triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts))


def kernel_resources(kernel) -> tuple[int, int, int]:
    """(shared memory bytes, registers per thread, stack bytes per thread) of a compiled Triton
    kernel, from ``cuobjdump -res-usage`` of its cubin (stack > 0: ptxas spilled)."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", usage)
    return kernel.metadata.shared, int(m.group(1)), int(m.group(2))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for Hopper")
    args = ap.parse_args(argv)
    print(f"triton {triton.__version__}, sm_{args.arch}, bf16, plan block 128")
    print(f"{'D':>4} {'path':>6} {'tiles':>48} {'shared KiB':>10} {'regs':>5} {'stack B':>7}")
    for D in (64, 128, 256):
        for tma in (True, False):
            t = bsa.pick_tiles(128, D, torch.bfloat16, tma)
            shared, regs, stack = compile_resources(t, D, tma, args.arch)
            desc = f"{t.block_m}x{t.block_n} w{t.num_warps} s{t.num_stages} cap {t.maxnreg} tma_masked {t.tma_masked}"
            print(f"{D:>4} {'tma' if tma else 'loads':>6} {desc:>48} {shared / 1024:>10.1f} {regs:>5} {stack:>7}")


if __name__ == "__main__":
    main()
