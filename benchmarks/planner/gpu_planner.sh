#!/usr/bin/env bash
# The planner's GPU checks and benchmarks on one CUDA card, from the repository root:
#   bash benchmarks/planner/gpu_planner.sh OUT_DIR [STEPS]
# STEPS, run in the order given (default "test calibrate hub bench"):
#   test       GPU planner tests (float64 comparison, no host sync, CUDA graph, scratch bound)
#   calibrate  benchmarks.planner.calibrate_auto with the Triton executor; writes the crossovers
#              into stem/api.py (copied to OUT_DIR/api.py)
#   hub        builds the hub kernel, loads it (LOCAL_KERNELS) for the later steps and calibrates
#              with it (auto's sparse executor on sm90)
#   bench      benchmarks.planner.bench_planner (planner stages before/after, e2e auto vs cuDNN)
#   ranking    benchmarks.quality.gpu_ranking (the opt-in rankings' kernels: check and planner time)
# Each step is bounded by `timeout` (TEST_TIMEOUT, CAL_TIMEOUT, BENCH_TIMEOUT seconds);
# CAL_LENGTHS and BENCH_ARGS narrow the calibration lengths and the benchmark cases.
set -u
cd "$(dirname "$0")/../.."
out=${1:?output folder}
steps=${2:-"test calibrate hub bench"}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cal_lengths=${CAL_LENGTHS:-8192 12288 16384 20480 24576 32768 49152 65536}
for s in $steps; do
  case $s in
    test) timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -m gpu tests/test_gpu_planner_fused.py \
            "tests/test_gpu_triton.py::test_planner_kernel_matches_torch" 2>&1 | tail -15 | tee "$out/test.log" ;;
    calibrate)
      # shellcheck disable=SC2086
      timeout "${CAL_TIMEOUT:-400}" python3 -m benchmarks.planner.calibrate_auto --out "$out" --tag triton \
        --reps 3 --lengths $cal_lengths --write-table 2>&1 | tail -80
      cp stem/api.py "$out/api.py" ;;
    hub)
      timeout 300 python3 hub_kernels/build.py --jobs 16 > "$out/hub_build.log" 2>&1 || tail -20 "$out/hub_build.log"
      export LOCAL_KERNELS=stem-attention/stem-attention=$PWD/hub_kernels/stem-attention
      # shellcheck disable=SC2086
      timeout "${CAL_TIMEOUT:-400}" python3 -m benchmarks.planner.calibrate_auto --out "$out" --tag hub \
        --reps 3 --head-dims 64 128 --lengths $cal_lengths --write-table 2>&1 | tail -80
      cp stem/api.py "$out/api.py" ;;
    # shellcheck disable=SC2086
    bench) timeout "${BENCH_TIMEOUT:-400}" python3 -m benchmarks.planner.bench_planner --out "$out" --reps 5 \
             ${BENCH_ARGS:-} 2>&1 | tail -60 ;;
    ranking) timeout "${RANK_TIMEOUT:-150}" python3 -m benchmarks.quality.gpu_ranking --reps 20 \
               --out "$out/quality_ranking_gpu.json" 2>&1 | tail -30 ;;
    *) echo "unknown step $s (test, calibrate, hub, bench, ranking)"; exit 2 ;;
  esac
done
