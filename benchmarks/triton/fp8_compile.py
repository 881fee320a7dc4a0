"""Compile the FP8 kernels for a GPU target without a GPU and check what the compiler made of them.

    python -m benchmarks.triton.fp8_compile [--arch 90]

For each head dim (64, 128, 256) the attention kernel (``fp8_tiles``' configuration, plan block
128) and the K/V quantisation kernel are compiled ahead of time through Triton (ptxas from its
wheel). Printed per kernel: the e4m3 tensor-core instructions in the PTX (``wgmma ... .e4m3`` on
sm90, ``mma ... .e4m3`` on sm89), local-memory instructions in the PTX, and shared memory,
registers and stack bytes of the cubin (spills by ptxas: the PTX itself has no local memory).
Exits non-zero when an attention kernel has no e4m3 tensor-core instruction or local memory in
its PTX. Needs no CUDA device.
"""

from __future__ import annotations

import argparse
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from stem.dispatch import first_party

first_party()
from stem_backends.triton import fp8  # noqa: E402

from .resources import kernel_resources  # noqa: E402


def _compile(fn, consts, ptr_types, arch, num_warps, num_stages):
    sig = {}
    for n in fn.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in ptr_types:
            sig[n] = ptr_types[n]
        elif n == "qk_scale":
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))




def _ptx_facts(ptx: str):
    mma = sorted({ln.split()[0] for ln in ptx.splitlines() if re.match(r"\s*(wgmma\.mma_async|mma\.sync)", ln)})
    e4m3 = [m for m in mma if "e4m3" in m]
    local = len(re.findall(r"\b(ld|st)\.local\b", ptx))
    return mma, e4m3, local


def attention_kernel(head_dim: int, arch: int, dtype: str = "bf16", block_size: int = 128, **tiles):
    bm, bn, warps, stages = fp8.fp8_tiles(block_size, head_dim, **tiles)
    tma = arch >= 90
    consts = dict(BS=block_size, BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=head_dim, SUB_M=block_size // bm,
                  SUB_N=block_size // bn, W_P2=256, RETURN_LSE=False, EXACT_CAST=False, USE_TMA=tma)
    ptrs = dict(Q="*" + dtype, O="*" + dtype, K8="*fp8e4nv", VT8="*fp8e4nv", KS="*fp32", VS="*fp32", KMEAN="*fp32",
                LSE="*fp32", COUNTS="*i32", INDICES="*i32",
                KD=f"tensordesc<fp8e4nv[{bn}, {head_dim}]>" if tma else "*fp8e4nv",
                VD=f"tensordesc<fp8e4nv[{head_dim}, {bn}]>" if tma else "*fp8e4nv")
    return _compile(fp8._stem_sparse_attn_fp8_fwd, consts, ptrs, arch, warps, stages), (bm, bn, warps, stages)


def quantize_kernel(head_dim: int, arch: int, dtype: str = "bf16", block_n: int = 128):
    consts = dict(BLOCK_N=block_n, HEAD_DIM=head_dim, EXACT_CAST=False)
    ptrs = dict(K="*" + dtype, V="*" + dtype, KMEAN="*fp32", K8="*fp8e4nv", VT8="*fp8e4nv", KS="*fp32", VS="*fp32")
    return _compile(fp8._quantize_kv_kernel, consts, ptrs, arch, 8, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for Hopper, 89 for Ada")
    args = ap.parse_args(argv)
    print(f"triton {triton.__version__}, sm_{args.arch}, bf16 inputs, plan block 128")
    print(f"{'kernel':>10} {'D':>4} {'tiles':>14} {'e4m3 mma':>9} {'local':>6} {'shared KiB':>10} {'regs':>5} "
          f"{'stack B':>7}  mma instructions")
    ok = True
    for D in (64, 128, 256):
        for name in ("attention", "quantize"):
            if name == "attention":
                kernel, t = attention_kernel(D, args.arch)
                desc = f"{t[0]}x{t[1]} w{t[2]} s{t[3]}"
            else:
                kernel, desc = quantize_kernel(D, args.arch, block_n=fp8.fp8_tiles(128, D)[1]), "-"
            mma, e4m3, local = _ptx_facts(kernel.asm["ptx"])
            shared, regs, stack = kernel_resources(kernel)
            if name == "attention":
                ok &= bool(e4m3) and local == 0
            print(f"{name:>10} {D:>4} {desc:>14} {len(e4m3):>9} {local:>6} {shared / 1024:>10.1f} {regs:>5} "
                  f"{stack:>7}  {' '.join(mma) or '-'}")
    if not ok:
        print("FAIL: an attention kernel has no e4m3 tensor-core instruction or local memory in its PTX")
        sys.exit(1)


if __name__ == "__main__":
    main()
