#!/usr/bin/env bash
# The planner's GPU checks and benchmarks on one CUDA card, from the repository root:
#   bash benchmarks/planner/gpu_planner.sh OUT_DIR [STEPS]
# STEPS (default "test bench calibrate"): any of test (GPU planner tests), bench
# (benchmarks.planner.bench_planner), calibrate (benchmarks.planner.calibrate_auto with the Triton
# executor), hub (build the hub kernel, then calibrate with it and run bench again).
set -u
cd "$(dirname "$0")/../.."
out=${1:?output folder}
steps=${2:-"test bench calibrate"}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
for s in $steps; do
  case $s in
    test) timeout ${TEST_TIMEOUT:-80} python3 -m pytest -q -x -m gpu tests/test_gpu_planner_fused.py \
            "tests/test_gpu_triton.py::test_planner_kernel_matches_torch" 2>&1 | tail -15 | tee "$out/test.log" ;;
    bench) timeout ${BENCH_TIMEOUT:-170} python3 -m benchmarks.planner.bench_planner --out "$out" --reps 5 ${BENCH_ARGS:-} 2>&1 | tail -60 ;;
    calibrate) timeout ${CAL_TIMEOUT:-190} python3 -m benchmarks.planner.calibrate_auto --out "$out" --tag triton --reps 3 \
                 --lengths ${CAL_LENGTHS:-8192 12288 16384 20480 24576 32768} --write-table 2>&1 | tail -80
               cp stem/api.py "$out/api.py" ;;
    hub) timeout 200 python3 hub_kernels/build.py --jobs 16 > "$out/hub_build.log" 2>&1 || tail -20 "$out/hub_build.log"
         export LOCAL_KERNELS=stem-attention/stem-attention=$PWD/hub_kernels/stem-attention
         timeout 300 python3 -m benchmarks.planner.calibrate_auto --out "$out" --tag hub 2>&1 | tail -80 ;;
  esac
done
