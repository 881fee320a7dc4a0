#!/usr/bin/env bash
# One GPU call after benchmarks/gpu/gpu_build_and_test.sh has built the kernel (same machine):
# `stem bench` with the hub executor loaded (LOCAL_KERNELS) beside Triton, FlexAttention on the
# same plan, and dense cuDNN/flash SDPA. Results under $OUT.
#
#   bash benchmarks/gpu/gpu_final.sh        (it changes to the repository root itself)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/hub}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
echo "=== stem info / bench with the hub kernel"
export LOCAL_KERNELS=stem-attention/stem-attention=$PWD/hub_kernels/stem-attention
stem info 2>&1 | tee "$OUT/info.txt" | grep -E "hub|triton|auto" | head -8
timeout 240 stem bench --out "$OUT" --reps 7 2>&1 | grep -v "it/s\]" | tail -12
