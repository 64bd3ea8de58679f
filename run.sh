#!/usr/bin/env bash
# The two commands of the README, each doing all of its own set-up on a fresh machine:
#   ./run.sh ablate [archext ablate args] build, then train the lecture's architecture variants and
#                                         report them (table, JSON/CSV, PNG plots in ./ablate-out)
#   ./run.sh test  [pytest args]          build, then run the whole test suite (C++ tests included)
# and two more:
#   ./run.sh profile [args]               build, then `archext profile` (FLOPs / bytes / time per op)
#   ./run.sh bench [archext.bench args]   build, then print the kernel benchmark tables
# Set-up: a virtual environment in .venv (ARCHEXT_VENV to move it), torch (ARCHEXT_TORCH, default
# torch==2.14.1), the test tools (transformers for the Hugging Face parity tests; matplotlib for
# the plots of the main job), and an incremental in-place build of archext._C.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${ARCHEXT_VENV:-.venv}
PY="$VENV/bin/python"

setup() {
  [ -x "$PY" ] || python3 -m venv "$VENV"
  "$PY" -m pip install -q --disable-pip-version-check "${ARCHEXT_TORCH:-torch==2.14.1}" \
    numpy pytest hypothesis ninja expecttest transformers matplotlib 2>&1 | grep -v "^WARNING: Location" || true
  "$PY" -c "import torch" || { echo "run.sh: torch failed to install" >&2; exit 1; }
  echo "== building archext._C (MAX_JOBS=${MAX_JOBS:-2}, ARCHEXT_CUDA=${ARCHEXT_CUDA:-auto})"
  local t0=$SECONDS
  MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py -q build_ext --inplace
  echo "== build took $((SECONDS - t0)) s"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  ablate|profile)
    setup
    "$PY" -m archext "$cmd" "$@"
    ;;
  bench)
    setup
    "$PY" -m archext.bench "$@"
    # The RoPE and loss tables too when the default run was asked for.
    if [ $# -eq 0 ]; then
      "$PY" -m archext.bench rope --no-compile
      "$PY" -m archext.bench loss --no-compile
    fi
    ;;
  test)
    setup
    # The C++ library, its CTest suite (the plain C++ API, no Python), then the Python suite.
    ARCHEXT_VENV="$VENV" ARCHEXT_CMAKE_BENCH=0 scripts/cmake_check.sh
    "$PY" -m pytest -q "$@"
    # The CPU kernels again under AddressSanitizer + UBSan (a separate build in build/sanitize),
    # with the op and reliability tests; skipped when pytest arguments select a subset.
    if [ $# -eq 0 ]; then ARCHEXT_VENV="$VENV" MAX_JOBS=${MAX_JOBS:-2} scripts/sanitize.sh; fi
    ;;
  *)
    echo "usage: ./run.sh ablate [args] | ./run.sh test [pytest args] | ./run.sh profile [args] | ./run.sh bench [args]" >&2
    exit 2
    ;;
esac
