#!/usr/bin/env bash
# The README's test command (and what CI runs through .ci/run): bootstrap nox into .venv-nox, then
# `nox -s tests lint` (the CPU test suite in its own environment, then ruff). Extra arguments go to
# pytest, e.g. `bash ci/test.sh -x -k planner`.
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/nox.sh
run_nox -s tests lint -- "$@"
