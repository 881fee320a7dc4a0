#!/usr/bin/env bash
# The README's first command: bootstrap nox into .venv-nox, then `nox -s demo` (installs stem into
# its own environment and runs `stem info` and the main job `stem demo`). Extra arguments go to
# `stem demo`, e.g. `bash ci/demo.sh --length 16384`.
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/nox.sh
run_nox -s demo -- "$@"
