#!/usr/bin/env bash
# The single-GPU suite in one command: install (editable, no deps), GPU tests (Triton subset at
# D=128 + transformers), `stem bench` (attention sweep 8K-128K), and the Llama-3.1-8B-shaped prefill
# benchmark (python -m benchmarks.prefill). Results and logs under $OUT.
#
#   bash benchmarks/gpu/gpu_suite.sh        (it changes to the repository root itself;
#                                            OUT defaults to benchmarks/results)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/results}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q -e . --no-deps --no-build-isolation >/dev/null 2>&1 || echo "pip install -e failed"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
stem info 2>&1 | tee "$OUT/info.txt"
t0=$(date +%s)
timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_triton.py -k "(128 and bfloat16) or graph or dispatch or planner" 2>&1 | tail -4 | tee "$OUT/tests_triton.txt"
timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_transformers.py 2>&1 | tail -4 | tee "$OUT/tests_transformers.txt"
echo "tests took $(( $(date +%s) - t0 )) s"
timeout 170 stem bench --out "$OUT" --reps 7 2>&1 | grep -v "it/s\]" | tail -12
timeout 110 python3 -m benchmarks.prefill --out "$OUT" --lengths 32768 65536 131072 --layers 4 --no-progress 2>&1 | tail -8
echo "total $(( $(date +%s) - t0 )) s"
