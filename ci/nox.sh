# Sourced by ci/test.sh and ci/demo.sh: `run_nox ARGS...` runs nox (pinned in ci/constraints.txt)
# from a small bootstrap environment .venv-nox, creating it on first use. PYTHON picks the
# interpreter (default python3).
run_nox() {
  if [ ! -x .venv-nox/bin/nox ]; then
    "${PYTHON:-python3}" -m venv .venv-nox
    .venv-nox/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    .venv-nox/bin/python -m pip install -q -c ci/constraints.txt nox
  fi
  .venv-nox/bin/nox "$@"
}
