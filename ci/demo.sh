#!/usr/bin/env bash
# Install stem-attention into .venv and run the main job: `stem demo` on the built-in workload.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -c ci/constraints.txt -e ".[plot]"
stem info
stem demo "$@"
