#!/usr/bin/env bash
# Install stem-attention with its test extras into .venv and run the CPU test suite.
# This is the README's test command; .ci/run calls it on a fresh CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch: keep an installed one (e.g. a CUDA build); else the pinned CPU-tested release.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -c ci/constraints.txt -e ".[test]"
set +e
python -m pytest -q -ra -m "not gpu" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests (exit 5): the suite is missing or every test was deselected" >&2
fi
exit "$rc"
