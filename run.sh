#!/usr/bin/env bash
# The two commands of the README, each doing all of its own set-up on a fresh machine:
#   ./run.sh ablate [archext ablate args] build, then train the lecture's architecture variants and
#                                         report them (table, JSON/CSV, PNG plots in ./ablate-out)
#   ./run.sh test  [pytest args]          build, then run the whole test suite (C++ tests included)
# and three more:
#   ./run.sh test-emu [pytest args]       build, then run the op tests on the CUDA kernels, emulated
#                                         on the CPU (csrc/emu/; part of `test`)
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

# The CUDA kernels run on the CPU by the emulated execution model (csrc/emu/, archext/testing.py),
# in place of the CPU kernels under the op tests: every op test file under the forward schedule;
# the property tests, which reach every kernel but attention's, and the attention tests under the
# three others (reverse, random, one warp running ahead); with warp_ahead (made to expose a
# missing barrier) the norm, stability and attention tests too, whose kernels hold the
# block-wide barriers and warp reductions.
# tests/test_emu.py shows the faults the emulation catches; the property tests run once more on
# the scalar paths (ARCHEXT_CUDA_VECTOR=0). ~3 min on 2 cores.
test_emu() {
  local t0=$SECONDS schedule
  ARCHEXT_TEST_BACKEND=cuda_emu ARCHEXT_EMU_SCHEDULE=forward "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_emu.py tests/test_norm.py tests/test_activation.py tests/test_rope.py \
    tests/test_stability.py tests/test_attention.py tests/test_residual32.py tests/test_packing.py \
    tests/test_fuzz.py tests/test_reliability.py -m "not slow" "$@"
  for schedule in reverse random; do
    ARCHEXT_TEST_BACKEND=cuda_emu ARCHEXT_EMU_SCHEDULE=$schedule ARCHEXT_EMU_SEED=$t0 \
      "$PY" -m pytest -q -p no:cacheprovider tests/test_fuzz.py tests/test_attention.py \
      -k "not opcheck and not compile" "$@"
  done
  # The scalar paths that the packed ones replaced (ARCHEXT_CUDA_VECTOR=0), under every property.
  ARCHEXT_TEST_BACKEND=cuda_emu ARCHEXT_EMU_SCHEDULE=random ARCHEXT_EMU_SEED=$t0 ARCHEXT_CUDA_VECTOR=0 \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_fuzz.py "$@"
  ARCHEXT_TEST_BACKEND=cuda_emu ARCHEXT_EMU_SCHEDULE=warp_ahead ARCHEXT_EMU_SEED=$t0 \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_fuzz.py tests/test_norm.py tests/test_stability.py \
    tests/test_attention.py -m "not slow" -k "not opcheck and not compile" "$@"
  echo "== test-emu took $((SECONDS - t0)) s"
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
    # The CUDA kernels, emulated (when the build has them: Linux x86-64); skipped when pytest
    # arguments select a subset.
    if [ $# -eq 0 ] && "$PY" -c "import sys; from archext import testing; sys.exit(not testing.available())"; then
      test_emu
    fi
    # The CPU kernels again under AddressSanitizer + UBSan (a separate build in build/sanitize),
    # with the op and reliability tests; skipped when pytest arguments select a subset.
    if [ $# -eq 0 ]; then ARCHEXT_VENV="$VENV" MAX_JOBS=${MAX_JOBS:-2} scripts/sanitize.sh; fi
    ;;
  test-emu)
    setup
    test_emu "$@"
    ;;
  *)
    echo "usage: ./run.sh ablate [args] | ./run.sh test [pytest args] | ./run.sh test-emu [pytest args] | ./run.sh profile [args] | ./run.sh bench [args]" >&2
    exit 2
    ;;
esac
