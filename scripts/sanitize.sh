#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer over the CPU kernels:
#   scripts/sanitize.sh [pytest args]
# 1. copies the tree (tracked and untracked, not ignored, files) into $ARCHEXT_SANITIZE_DIR
#    (default build/sanitize; only changed files are rewritten, so the rebuild is incremental),
# 2. builds archext._C there with ARCHEXT_SANITIZE=1 ARCHEXT_CUDA=0 (-O1 -g, CPU kernels only;
#    the normal in-place build of this tree is not touched),
# 3. runs the op tests against that build, with libasan preloaded into Python (torch itself is
#    not instrumented: this checks archext's own code, every CPU ISA via the cpu_isa fixture).
# Any ASan report (out-of-bounds read or write, use after free) or UBSan report (signed
# overflow, bad shift, misaligned or null access, float-to-int overflow, ...) aborts the run with
# a stack trace and a non-zero exit status.
# Environment: ARCHEXT_VENV (default .venv), MAX_JOBS (default 1), ARCHEXT_SANITIZE_DIR,
# ARCHEXT_FUZZ_EXAMPLES (fuzz budget, default the CI one), ARCHEXT_TEST_SEED.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd -P)
VENV=${ARCHEXT_VENV:-.venv}
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PY="$VENV/bin/python"
WORK=${ARCHEXT_SANITIZE_DIR:-$ROOT/build/sanitize}
[ -x "$PY" ] || { echo "sanitize.sh: no Python at $PY (create the venv with ./run.sh first)" >&2; exit 1; }

LIBASAN=$(gcc -print-file-name=libasan.so)
[ -f "$LIBASAN" ] || { echo "sanitize.sh: libasan not found (gcc -print-file-name=libasan.so)" >&2; exit 1; }
[ -x "$VENV/bin/ninja" ] && export PATH="$PATH:$VENV/bin"

t0=$SECONDS
mkdir -p "$WORK"
git ls-files -z --cached --others --exclude-standard -- csrc archext tests setup.py pyproject.toml |
  while IFS= read -r -d '' f; do
    [ -f "$f" ] || continue
    if ! cmp -s "$f" "$WORK/$f"; then mkdir -p "$WORK/$(dirname "$f")"; cp -p "$f" "$WORK/$f"; fi
  done

echo "== sanitize.sh: building the ASan + UBSan extension in $WORK (MAX_JOBS=${MAX_JOBS:-1})"
(cd "$WORK" && ARCHEXT_SANITIZE=1 ARCHEXT_CUDA=0 MAX_JOBS=${MAX_JOBS:-1} "$PY" setup.py -q build_ext --inplace)
echo "== sanitize.sh: build took $((SECONDS - t0)) s"

# detect_leaks=0: CPython and torch keep allocations alive to exit by design.
# Torch is not instrumented, so container-overflow annotations cannot match: off.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1:detect_container_overflow=0:strict_init_order=1:check_initialization_order=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
t1=$SECONDS
echo "== sanitize.sh: tests under ASan + UBSan"
# The op tests and the reliability tests; torch.compile (inductor compiles C++ in
# subprocesses that inherit LD_PRELOAD, minutes under ASan) and the huge-shape tests (ASan's
# shadow memory on top of ~10 GiB) are left to the normal run.
(cd "$WORK" && PYTHONPATH="$WORK" LD_PRELOAD="$LIBASAN" ARCHEXT_SANITIZED=1 "$PY" -m pytest -q -p no:cacheprovider \
  tests/test_norm.py tests/test_activation.py tests/test_rope.py tests/test_stability.py \
  tests/test_fuzz.py tests/test_reliability.py -k "not compile" -m "not slow" "$@")
echo "== sanitize.sh: tests took $((SECONDS - t1)) s (total $((SECONDS - t0)) s); no sanitizer report"
