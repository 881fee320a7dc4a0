#!/usr/bin/env bash
# Retrieval quality on one GPU, in one command: train the retrieval model
# (python -m benchmarks.retrieval.train, into $OUT/retrieval_model), then run the retrieval benchmark
# (python -m benchmarks.retrieval) on the GPU: 4K/8K/16K, depths 0.1..0.9, 1 and 4 needles, all
# methods; then 32K on a smaller grid if time is left. Writes JSON + PNG into $OUT, prints a table last.
#
#   bash benchmarks/gpu/gpu_eval.sh        (it changes to the repository root itself;
#                                           OUT defaults to benchmarks/results)
#
# Budget (about 8 minutes): pip ~15 s, training <= TRAIN_BUDGET s of steps (+ held-out checks),
# eval <= EVAL_BUDGET s, 32K eval <= EVAL32_BUDGET s. Cells past a budget are skipped and recorded.
# To make the new model the committed one: copy $OUT/retrieval_model/* to benchmarks/retrieval/weights/.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/results}
TRAIN_BUDGET=${TRAIN_BUDGET:-175}
EVAL_BUDGET=${EVAL_BUDGET:-60}
EVAL32_BUDGET=${EVAL32_BUDGET:-25}
SAMPLES=${SAMPLES:-16}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG="$OUT/retrieval_gpu_eval.log"
MODEL="$OUT/retrieval_model"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >>"$LOG" 2>&1 \
  && stamp "pip install -e . ok" || stamp "pip install -e . failed: running from the checkout"
CARD=$(python3 -c "import torch; n=torch.cuda.get_device_name(); print('h200' if 'H200' in n else 'h100' if 'H100' in n else 'gpu')")
stamp "card tag: $CARD"

stamp "training"
python3 -m benchmarks.retrieval.train --out "$MODEL" --long32 --save-dtype bfloat16 --time-budget "$TRAIN_BUDGET" 2>&1 \
  | tee -a "$LOG" | grep -v "^  stage"
[ -f "$MODEL/model.safetensors" ] || { stamp "training failed"; exit 1; }

COMMON=(--weights "$MODEL" --device cuda --out "$OUT" --no-progress)
stamp "eval 4K-16K (auto executor)"
if ! python3 -m benchmarks.retrieval "${COMMON[@]}" --lengths 4K,8K,16K --depths 0.1,0.3,0.5,0.7,0.9 --needles 1,4 \
     --samples "$SAMPLES" --time-budget "$EVAL_BUDGET" --tag "_$CARD" >>"$LOG" 2>&1; then
  stamp "eval with backend=auto failed; retrying with the reference executor"
  tail -25 "$LOG"
  rm -f "$OUT"/retrieval_eval_"$CARD".*
  python3 -m benchmarks.retrieval "${COMMON[@]}" --lengths 4K,8K,16K --depths 0.1,0.5,0.9 --needles 1,4 \
    --samples "$SAMPLES" --backend reference --time-budget "$EVAL_BUDGET" --tag "_${CARD}_reference" >>"$LOG" 2>&1
fi
stamp "eval 32K"
python3 -m benchmarks.retrieval "${COMMON[@]}" --lengths 32K --depths 0.1,0.5,0.9 --needles 1,4 --samples 8 \
  --time-budget "$EVAL32_BUDGET" --tag "_${CARD}_32k" >>"$LOG" 2>&1 || { stamp "32K eval failed"; tail -15 "$LOG"; }
stamp "done"
python3 - "$OUT" "$MODEL" "$CARD" <<'PY'
import glob, json, sys
from benchmarks.retrieval.harness import format_table
out, model, card = sys.argv[1:]
log = json.load(open(f"{model}/train_log.json"))
print(f"training on {log['device_name']}: {log['train_seconds']}s, {log['total_steps']} steps")
for s in log["stages"]:
    print(f"  L={s['length']:>6} steps {s['steps_done']:>4}/{s['steps_planned']:<4} {s['seconds']:>6.1f}s "
          f"{s['tokens_per_s'] / 1e6:.2f}M tok/s loss {s['train_loss']:.3f} train_em {s['train_exact_match']:.3f} "
          f"heldout_em {s['heldout_dense_exact_match']:.3f}" + (" CUT" if s["cut_by_time_budget"] else ""))
for path in sorted(glob.glob(f"{out}/retrieval_eval_{card}*.json"), reverse=True):
    res = json.load(open(path))
    skipped = len(res["skipped_cells"])
    print(f"\n== {path.split('/')[-1]}: {res['eval_seconds']}s, {res['samples_per_cell']} samples/cell"
          + (f", {skipped} cells skipped (time budget)" if skipped else ""))
    print(format_table(res))
PY
