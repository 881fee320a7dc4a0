#!/usr/bin/env bash
# Context parallelism on a machine with >= 2 GPUs (H100s or H200s), in one command:
#   1. benchmarks.distributed.dist_check        torchrun, all GPUs: context-parallel == single-GPU stem.attention
#   2. benchmarks.distributed.bench_distributed torchrun: 128K-512K per-rank time vs one GPU
#   3. tests/test_gpu_multi.py                  cuda:1 tensors with cuda:0 current; accelerate device_map split
#
#   bash benchmarks/gpu/gpu_dist.sh       (it changes to the repository root itself)
#
# Results and logs go to $OUT (benchmarks/results without it). Each step has its own time limit so a
# hang in one still returns the others. NVLink multicast stays off (it can take shared GPUs out of
# service): the variables are exported here, inherited by torchrun's workers, and set again inside
# the Python modules. torchrun runs them in module mode (-m) from the repository root.
set -uo pipefail
cd "$(dirname "$0")/../.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
NPROC=${NPROC:-$(( NGPU >= 4 ? 4 : NGPU ))}
T_CHECK=${T_CHECK:-70} T_BENCH=${T_BENCH:-115} T_TEST=${T_TEST:-85}
{ nvidia-smi --query-gpu=index,name,memory.total --format=csv; nvidia-smi topo -m; \
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/env.txt" 2>&1
head -4 "$OUT/env.txt"
# editable install registers the executors' entry points (no network needed: --no-deps)
$PY -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/env_pip.txt" 2>&1 \
  || echo "pip install -e . failed (see env_pip.txt); running from the checkout (stem finds backends/ itself)"
if [ "$NPROC" -lt 2 ]; then echo "need >= 2 GPUs, found $NGPU"; exit 1; fi
TR="$PY -m torch.distributed.run --nproc-per-node=$NPROC --master-addr=127.0.0.1 --master-port"
ENVS="NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1"

echo "== dist_check ($NPROC GPUs)"
timeout "$T_CHECK" env $ENVS $TR=29511 -m benchmarks.distributed.dist_check --seq ${SEQ_CHECK:-32768} 2>&1 \
  | grep -v -i warn | tee "$OUT/dist_check.log" | grep -E "PASS|FAIL|Error|error" | tail -20
echo "== bench_distributed ($NPROC GPUs)"
timeout "$T_BENCH" env $ENVS $TR=29512 -m benchmarks.distributed.bench_distributed --seqs ${SEQS:-131072,262144,524288} \
  --budget-s $(( T_BENCH - 45 )) 2>&1 | grep -v -i warn | tee "$OUT/bench.log" | tail -8
echo "== tests/test_gpu_multi.py"
# planner/executors that launch on the current device can fault the CUDA context: every test
# that may reach a Triton kernel runs in its own process so the others still report.
T0=$(date +%s)
{
  $PY -m pytest -q -p no:cacheprovider tests/test_gpu_multi.py -k "torch or reference or sdpa" 2>&1 | tail -3
  for t in "test_planner_launches_on_tensor_device[auto]" "test_executor_launches_on_tensor_device[triton]" \
           "test_executor_launches_on_tensor_device[auto]" test_attention_end_to_end_on_second_device \
           test_device_map_split_model_matches_one_gpu; do
    left=$(( T_TEST - ($(date +%s) - T0) ))
    [ "$left" -gt 5 ] || { echo "SKIPPED (time): $t"; continue; }
    echo "-- $t"
    timeout "$left" $PY -m pytest -q -p no:cacheprovider "tests/test_gpu_multi.py::$t" 2>&1 \
      | grep -E "^(E  |FAILED|PASSED|SKIPPED)|passed|failed|skipped|error" | head -12
  done
} 2>&1 | tee "$OUT/test_gpu_multi.log" | grep -E "passed|failed|skipped|SKIPPED|^--|^E " | head -40
