#!/usr/bin/env bash
# One device call: train the retrieval model (benchmarks/train_retrieval.py, into $OUT/model),
# then run `stem eval` on the GPU (4K/8K/16K, depths 0.1..0.9, 1 and 4 needles, all methods;
# then 32K on a smaller grid if time is left). Writes JSON + PNG into $OUT, prints a table last.
#
#   bash benchmarks/gpu_eval.sh            # on the device machine (OUT is set there)
#
# Budget (command limit 480 s): pip ~15 s, training <= TRAIN_BUDGET s of steps (+ held-out checks),
# eval <= EVAL_BUDGET s, 32K eval <= EVAL32_BUDGET s. Cells past a budget are skipped and recorded.
# At most 8 files come back: run.log, model/ (3), eval_<card>.json/.png, eval_<card>_32k.json/.png.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/stem_gpu_eval}
TRAIN_BUDGET=${TRAIN_BUDGET:-175}
EVAL_BUDGET=${EVAL_BUDGET:-60}
EVAL32_BUDGET=${EVAL32_BUDGET:-25}
SAMPLES=${SAMPLES:-16}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG="$OUT/run.log"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >>"$LOG" 2>&1 \
  && stamp "pip install -e . ok" || stamp "pip install -e . failed: executors are registered by hand below"
CARD=$(python3 -c "import torch; n=torch.cuda.get_device_name(); print('h200' if 'H200' in n else 'h100' if 'H100' in n else 'gpu')")
stamp "card tag: $CARD"

stamp "training"
python3 benchmarks/train_retrieval.py --out "$OUT/model" --long32 --save-dtype bfloat16 --time-budget "$TRAIN_BUDGET" 2>&1 \
  | tee -a "$LOG" | grep -v "^  stage"
[ -f "$OUT/model/model.safetensors" ] || { stamp "training failed"; exit 1; }

# stem eval, with the executors registered even when the entry points are not installed.
run_eval() {
  python3 - "$@" <<'EOF'
import argparse, os, sys
sys.path.insert(0, os.getcwd())
import stem
if "triton" not in stem.executors():  # no package metadata: alias backends/ and register by hand
    import importlib.util
    spec = importlib.util.spec_from_file_location("stem_backends", "backends/__init__.py",
                                                  submodule_search_locations=["backends"])
    mod = importlib.util.module_from_spec(spec); sys.modules["stem_backends"] = mod; spec.loader.exec_module(mod)
    from stem_backends.reference import ReferenceExecutor
    from stem_backends.sdpa import DenseSDPAExecutor
    from stem_backends.triton.executor import TritonExecutor
    from stem_backends.triton.planner import register
    for ex in (ReferenceExecutor(), DenseSDPAExecutor(), TritonExecutor()):
        stem.register_executor(ex, replace=True)
    register()
import torch
torch.backends.cuda.matmul.allow_tf32 = True  # the reference executor's float32 einsums (fallback path)
from stem.eval.cli import _configure, main
sys.exit(main(_configure(argparse.ArgumentParser()).parse_args(sys.argv[1:])))
EOF
}

COMMON=(--weights "$OUT/model" --device cuda --out "$OUT" --no-progress)
stamp "eval 4K-16K (auto executor)"
if ! run_eval "${COMMON[@]}" --lengths 4K,8K,16K --depths 0.1,0.3,0.5,0.7,0.9 --needles 1,4 \
     --samples "$SAMPLES" --time-budget "$EVAL_BUDGET" --tag "_$CARD" >>"$LOG" 2>&1; then
  stamp "eval with backend=auto failed; retrying with the reference executor"
  tail -25 "$LOG"
  rm -f "$OUT"/eval_"$CARD".*
  run_eval "${COMMON[@]}" --lengths 4K,8K,16K --depths 0.1,0.5,0.9 --needles 1,4 --samples "$SAMPLES" \
    --backend reference --time-budget "$EVAL_BUDGET" --tag "_${CARD}_reference" >>"$LOG" 2>&1
fi
stamp "eval 32K"
run_eval "${COMMON[@]}" --lengths 32K --depths 0.1,0.5,0.9 --needles 1,4 --samples 8 \
  --time-budget "$EVAL32_BUDGET" --tag "_${CARD}_32k" >>"$LOG" 2>&1 || { stamp "32K eval failed"; tail -15 "$LOG"; }
stamp "done"
python3 - "$OUT" <<'EOF'
import glob, json, sys
from stem.eval.harness import format_table
log = json.load(open(f"{sys.argv[1]}/model/train_log.json"))
print(f"training on {log['device_name']}: {log['train_seconds']}s, {log['total_steps']} steps")
for s in log["stages"]:
    print(f"  L={s['length']:>6} steps {s['steps_done']:>4}/{s['steps_planned']:<4} {s['seconds']:>6.1f}s "
          f"{s['tokens_per_s'] / 1e6:.2f}M tok/s loss {s['train_loss']:.3f} train_em {s['train_exact_match']:.3f} "
          f"heldout_em {s['heldout_dense_exact_match']:.3f}" + (" CUT" if s["cut_by_time_budget"] else ""))
for path in sorted(glob.glob(f"{sys.argv[1]}/eval_*.json"), reverse=True):
    res = json.load(open(path))
    skipped = len(res["skipped_cells"])
    print(f"\n== {path.split('/')[-1]}: {res['eval_seconds']}s, {res['samples_per_cell']} samples/cell"
          + (f", {skipped} cells skipped (time budget)" if skipped else ""))
    print(format_table(res))
EOF
