#!/usr/bin/env bash
# Build, test, sanitize and time the stem-attention Hub kernel on a GPU machine, in one go.
#
#   bash benchmarks/gpu/gpu_build_and_test.sh       (from the repository root; writes under $OUT)
#
# Needs: nvcc + a CUDA build of torch, and `kernels` (installed, or its wheel in .whl/ for a
# machine without network; see hub_kernels/README.md for the pip download line).
# Steps: install carried wheels -> install this repo (editable, no deps) -> build the kernel ->
# the kernel's GPU tests (hub_kernels/stem-attention/tests) and the hub executor's GPU tests ->
# compute-sanitizer memcheck on a small case -> benchmark (hub sm90 and sm80 kernels vs the Triton
# executor vs dense cuDNN SDPA) -> a short table last.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/hub}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/hub_log.txt"
status=0
step() { echo "=== $* ($(date +%T))" | tee -a "$LOG"; }

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$LOG"
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$LOG"
nvcc --version | tail -1 | tee -a "$LOG"

step "wheels"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import kernels, huggingface_hub; print('kernels', kernels.__version__, 'huggingface_hub', huggingface_hub.__version__)" | tee -a "$LOG" || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2 | tee -a "$LOG"

step "build"
t0=$(date +%s)
python3 hub_kernels/build.py --jobs 16 2>&1 | tee "$OUT/hub_build.txt" | grep -E "built|error|Error|spill" | tee -a "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "BUILD FAILED"; tail -40 "$OUT/hub_build.txt"; exit 1; }
echo "build seconds: $(( $(date +%s) - t0 ))" | tee -a "$LOG"

step "tests: the kernel (both kernels via kernel=), the hub executor"
timeout ${TEST_TIMEOUT:-360} python3 -m pytest -q -p no:cacheprovider --maxfail=10 hub_kernels/stem-attention/tests \
  tests/test_gpu_hub_executor.py 2>&1 | tee "$OUT/hub_pytest.txt" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
grep -E "passed|failed" "$OUT/hub_pytest.txt" | tail -1 >> "$LOG"

step "compute-sanitizer memcheck"
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout ${SANITIZE_TIMEOUT:-180} compute-sanitizer --tool memcheck --error-exitcode 3 \
  python3 benchmarks/hub/sanitize_case.py > "$OUT/hub_memcheck.txt" 2>&1
rc=$?
tail -4 "$OUT/hub_memcheck.txt" | tee -a "$LOG"
echo "memcheck exit code: $rc" | tee -a "$LOG"
[ $rc -eq 0 ] || status=1

step "benchmark"
timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/hub/bench_hub.py --lengths ${BENCH_LENGTHS:-32768 131072} --json "$OUT/hub_bench.json" 2>&1 \
  | tee "$OUT/hub_bench.txt" | tail -6
tail -4 "$OUT/hub_bench.txt" >> "$LOG"
echo "tests+memcheck status: $status (0 = all passed)" | tee -a "$LOG"
exit $status
