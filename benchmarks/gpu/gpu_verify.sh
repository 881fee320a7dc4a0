#!/usr/bin/env bash
# One GPU call: build the hub kernel, run a few of its GPU tests and the hub executor's, the
# dispatch and transformers GPU tests with the hub kernel loadable (auto -> hub on Hopper), and the
# Llama-3.1-8B-shaped prefill benchmark with auto. Results under $OUT.
#
#   bash benchmarks/gpu/gpu_verify.sh       (it changes to the repository root itself; carry .whl/)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/hub}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 hub_kernels/build.py --jobs 16 2>&1 | grep -E "built|rror" || exit 1
export LOCAL_KERNELS=stem-attention/stem-attention=$PWD/hub_kernels/stem-attention
python3 -m pytest -q -p no:cacheprovider hub_kernels/stem-attention/tests -k "graph or crashing or long_walk or strided or compile" 2>&1 | tail -4
python3 -m pytest -q -p no:cacheprovider tests/test_gpu_hub_executor.py 2>&1 | tail -3
python3 -m pytest -q -p no:cacheprovider tests/test_gpu_triton.py -k "dispatch" 2>&1 | tail -3
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_transformers.py 2>&1 | tail -3
timeout 200 python3 -m benchmarks.prefill --out "$OUT" --lengths 32768 65536 131072 --layers 4 --no-progress 2>&1 | tail -10
