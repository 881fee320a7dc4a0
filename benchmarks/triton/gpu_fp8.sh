#!/usr/bin/env bash
# One GPU call (about 150 s at most): the FP8 GPU tests, then the FP8 benchmark. Results under $OUT.
#
#   OUT=out/fp8 bash benchmarks/triton/gpu_fp8.sh     (it changes to the repository root itself)
#
# Pass: pytest reports "passed" with no failures for tests/test_fp8.py, and the benchmark prints its
# table last (the JSON is written to $OUT/bench_fp8_<card>.json).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/fp8}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 60 python3 -m pytest -q -p no:cacheprovider -rs tests/test_fp8.py 2>&1 | tee "$OUT/test_fp8.log" | tail -6
timeout 85 python3 -m benchmarks.triton.bench_fp8 --out "$OUT" --lengths 32768 131072 --reps 5 --sweep 2>&1 \
  | tee "$OUT/bench_fp8.log" | tail -12
