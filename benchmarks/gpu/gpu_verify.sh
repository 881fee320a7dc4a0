#!/usr/bin/env bash
# One device call: build the hub kernel, run its new GPU tests, the dispatch and transformers GPU
# tests with the hub kernel loadable (auto -> hub), and the Llama-3.1-8B-shaped prefill benchmark
# with auto (hub on Hopper). Results under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/stem_hub_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 hub_kernels/build.py --jobs 16 2>&1 | grep -E "built|rror" || exit 1
export LOCAL_KERNELS=stem-attention/stem-attention=$PWD/hub_kernels/stem-attention
python3 -m pytest -q -p no:cacheprovider tests/test_gpu_hub.py -k "graph or crashing or long_walk or strided" 2>&1 | tail -4
python3 -m pytest -q -p no:cacheprovider tests/test_gpu_triton.py -k "dispatch" 2>&1 | tail -3
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_transformers.py 2>&1 | tail -3
timeout 200 python3 benchmarks/bench_prefill.py --out "$OUT" --lengths 32768 65536 131072 --layers 4 --no-progress 2>&1 | tail -10
