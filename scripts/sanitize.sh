#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer over the CPU kernels and the emulated CUDA
# kernels (csrc/emu/):
#   scripts/sanitize.sh [pytest args]
# 1. copies the tree (tracked and untracked, not ignored, files) into $ARCHEXT_SANITIZE_DIR
#    (default build/sanitize; only changed files are rewritten, so the rebuild is incremental),
# 2. builds archext._C there with ARCHEXT_SANITIZE=1 ARCHEXT_CUDA=0 (-O1 -g, CPU kernels and
#    the emulated CUDA ones; the normal in-place build of this tree is not touched),
# 3. runs the op tests against that build, with libasan preloaded into Python (torch itself is
#    not instrumented: this checks archext's own code, every CPU ISA via the cpu_isa fixture),
# 4. runs tests/test_emu.py and a subset of the op tests on the emulated CUDA kernels
#    (ARCHEXT_TEST_BACKEND=cuda_emu): their reads and writes past a tensor, under ASan.
# Any ASan report (out-of-bounds read or write, use after free) or UBSan report (signed
# overflow, bad shift, misaligned or null access, float-to-int overflow, ...) aborts the run with
# a stack trace and a non-zero exit status.
# Environment: ARCHEXT_VENV (default .venv), MAX_JOBS (default 1), ARCHEXT_SANITIZE_DIR,
# ARCHEXT_FUZZ_EXAMPLES (fuzz budget, default the CI one), ARCHEXT_TEST_SEED.
set -euo pipefail
source "$(dirname "$0")/venv.sh"  # ROOT (the working directory), VENV, PY; ninja on PATH
WORK=${ARCHEXT_SANITIZE_DIR:-$ROOT/build/sanitize}

LIBASAN=$(gcc -print-file-name=libasan.so)
LIBSTDCXX=$(g++ -print-file-name=libstdc++.so)
[ -f "$LIBASAN" ] || { echo "sanitize.sh: libasan not found (gcc -print-file-name=libasan.so)" >&2; exit 1; }

t0=$SECONDS
mkdir -p "$WORK"
git ls-files -z --cached --others --exclude-standard -- csrc archext tests setup.py pyproject.toml |
  while IFS= read -r -d '' f; do
    [ -f "$f" ] || continue
    # A changed file gets a fresh mtime (not cp -p: an older mtime than the object would hide it
    # from ninja).
    if ! cmp -s "$f" "$WORK/$f"; then mkdir -p "$WORK/$(dirname "$f")"; cp "$f" "$WORK/$f"; fi
  done

echo "== sanitize.sh: building the ASan + UBSan extension in $WORK (MAX_JOBS=${MAX_JOBS:-1})"
(cd "$WORK" && ARCHEXT_SANITIZE=1 ARCHEXT_CUDA=0 MAX_JOBS=${MAX_JOBS:-1} "$PY" setup.py -q build_ext --inplace)
echo "== sanitize.sh: build took $((SECONDS - t0)) s"

# detect_leaks=0: CPython and torch keep allocations alive to exit by design.
# Torch is not instrumented, so container-overflow annotations cannot match: off.
# Reports go to files (pytest captures stderr, and an aborted process loses what it captured);
# any report is printed below and fails the script.
LOGS="$WORK/sanitizer-logs"
rm -rf "$LOGS" && mkdir -p "$LOGS"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1:detect_container_overflow=0:strict_init_order=1:check_initialization_order=1:log_path=$LOGS/asan}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1:log_path=$LOGS/ubsan}
t1=$SECONDS
echo "== sanitize.sh: tests under ASan + UBSan"
# The op tests and the reliability tests, less torch.compile (inductor compiles and loads C++
# in subprocesses that inherit LD_PRELOAD: minutes under ASan, for no archext code) and the
# huge-shape test (ASan's shadow memory on top of ~9 GiB); both run in the normal suite. So
# does the linear cross-entropy peak-RSS test: ASan's quarantine keeps freed memory resident.
# libstdc++ is preloaded after libasan: Python itself does not link it, so without it ASan's
# __cxa_throw interceptor finds no real __cxa_throw and aborts at the first C++ exception
# (every TORCH_CHECK that fails, and triton's import under opcheck).
(cd "$WORK" && PYTHONPATH="$WORK" LD_PRELOAD="$LIBASAN $LIBSTDCXX" ARCHEXT_SANITIZED=1 "$PY" -m pytest -q -p no:cacheprovider \
  tests/test_norm.py tests/test_activation.py tests/test_rope.py tests/test_stability.py \
  tests/test_attention.py tests/test_residual32.py tests/test_fuzz.py tests/test_reliability.py \
  -k "not compile and not peak_memory" -m "not slow" "$@") && rc=0 || rc=$?
echo "== sanitize.sh: tests took $((SECONDS - t1)) s, pytest exit code $rc"
t2=$SECONDS
echo "== sanitize.sh: the emulated CUDA kernels under ASan + UBSan"
(cd "$WORK" && PYTHONPATH="$WORK" LD_PRELOAD="$LIBASAN $LIBSTDCXX" ARCHEXT_SANITIZED=1 ARCHEXT_TEST_BACKEND=cuda_emu \
  ARCHEXT_FUZZ_EXAMPLES=${ARCHEXT_FUZZ_EXAMPLES:-25} "$PY" -m pytest -q -p no:cacheprovider tests/test_emu.py tests/test_fuzz.py \
  tests/test_rope.py tests/test_attention.py -k "not compile and not peak_memory and not opcheck" -m "not slow" \
  "$@") && rc_emu=0 || rc_emu=$?
[ "$rc" -ne 0 ] || rc=$rc_emu
echo "== sanitize.sh: emulated CUDA tests took $((SECONDS - t2)) s (total $((SECONDS - t0)) s), pytest exit code $rc_emu"
if compgen -G "$LOGS/*" >/dev/null; then
  echo "== sanitize.sh: sanitizer reports:" >&2
  cat "$LOGS"/* >&2
  exit 1
fi
echo "== sanitize.sh: no sanitizer report"
exit "$rc"
