#!/usr/bin/env bash
# The GPU check, as one script for a lent GPU machine (see benchmarks/README.md):
#   build with the CUDA kernels there, run the CUDA tests, run the GPU benchmark table.
# Writes everything under $OUT (default ./gpu-out). Uses the machine's own python3 and torch
# (no venv: nothing can be installed there). Run from the repository root:
#   OUT=/some/dir bash benchmarks/gpu_check.sh
# STAGES (default build,test,sanitize,bench) runs a part, so that the whole fits the device
# tool's 10 minutes a call: e.g. STAGES=build,test, then STAGES=sanitize, then STAGES=bench on
# the same warm machine (the in-place build stays between calls; a stage that needs it and
# finds no CUDA build rebuilds first). Not in the default: bench_scalar, the tables again with
# ARCHEXT_CUDA_VECTOR=0.
set -uo pipefail
OUT=${OUT:-gpu-out}
STAGES=",${STAGES:-build,test,sanitize,bench},"
stage() { [[ "$STAGES" == *",$1,"* ]]; }
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/machine.txt"

has_cuda_build() {
  "$PY" -c "import archext, sys; sys.exit(0 if archext.build_info()['cuda_kernels'] else 1)" 2>/dev/null
}
if stage build || ! has_cuda_build; then
  t0=$SECONDS
  # Only the GPU at hand (9.0 = H100/H200), all cores.
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} ARCHEXT_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
    "$PY" setup.py -q build_ext --inplace 2>&1 | tail -n 20 | tee "$OUT/build.txt"
  echo "build: $((SECONDS - t0)) s" | tee -a "$OUT/build.txt"
fi

test_rc=0
if stage test; then
  # Every test that has a CUDA parametrisation (the fuzz properties included). No -x: the first
  # run of kernels that have never run should report every failure at once; the whole log is
  # kept, its summary printed.
  "$PY" -m pytest -q -p no:cacheprovider --tb=short --maxfail=200 -k "cuda" tests \
    > "$OUT/tests_cuda_full.txt" 2>&1
  test_rc=$?
  grep -E "^(FAILED|ERROR)" "$OUT/tests_cuda_full.txt" | head -n 60
  tail -n 30 "$OUT/tests_cuda_full.txt" | tee "$OUT/tests_cuda.txt"
  # Failures again with the packed / register paths off (ARCHEXT_CUDA_VECTOR=0,
  # written without a GPU): whether those paths or the kernels beneath them are to blame.
  failed=$(grep -oE "^FAILED [^ ]+" "$OUT/tests_cuda_full.txt" | cut -d" " -f2 | head -n 100)
  if [ -n "$failed" ]; then
    # shellcheck disable=SC2086
    ARCHEXT_CUDA_VECTOR=0 "$PY" -m pytest -q -p no:cacheprovider --tb=short $failed \
      > "$OUT/tests_cuda_failed_scalar.txt" 2>&1
    echo "failed tests rerun with ARCHEXT_CUDA_VECTOR=0: exit code $?" | tee -a "$OUT/machine.txt"
    tail -n 15 "$OUT/tests_cuda_failed_scalar.txt"
  fi
fi

# compute-sanitizer over a CUDA subset (each op family's reference test): memcheck (out-of-
# bounds and misaligned accesses; PyTorch's caching allocator off so that a read past a tensor
# is not inside a cached block) and racecheck (shared-memory hazards). 10-100x slower than a
# plain run: a subset, each tool under a time limit. Not yet run on a GPU (issue 8).
CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
SUBSET='cuda and (test_matches_reference or test_cross_entropy_matches_reference or test_softmax_matches_reference or test_qk_norm_rope)'
if ! stage sanitize; then
  :
elif [ -x "$CS" ]; then
  for tool in memcheck racecheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${SANITIZER_TIMEOUT:-300}" "$CS" --tool "$tool" \
      --error-exitcode 99 --print-limit 20 "$PY" -m pytest -q -x -p no:cacheprovider -k "$SUBSET" \
      tests/test_norm.py tests/test_activation.py tests/test_rope.py tests/test_stability.py \
      2>&1 | tail -n 40 | tee "$OUT/compute_sanitizer_$tool.txt"
    echo "compute-sanitizer $tool exit code: ${PIPESTATUS[0]}" | tee -a "$OUT/machine.txt"
  done
else
  echo "compute-sanitizer not found" | tee -a "$OUT/machine.txt"
fi

# The same tables with the packed / register paths off (ARCHEXT_CUDA_VECTOR=0), to set beside the default ones (optional:
# STAGES=bench_scalar).
if stage bench_scalar; then
  ARCHEXT_CUDA_VECTOR=0 "$PY" -m archext.bench --device cuda --full --no-compile --markdown \
    --json "$OUT/bench_cuda_scalar.json" 2>&1 | tee "$OUT/bench_cuda_scalar.md"
  ARCHEXT_CUDA_VECTOR=0 "$PY" -m archext.bench rope --device cuda --full --no-compile 2>&1 \
    | tee "$OUT/bench_rope_cuda_scalar.txt"
  ARCHEXT_CUDA_VECTOR=0 "$PY" -m archext.bench loss --device cuda --full --no-compile \
    --json "$OUT/bench_loss_cuda_scalar.json" 2>&1 | tee "$OUT/bench_loss_cuda_scalar.txt"
fi

if stage bench; then
  "$PY" -m archext.bench --device cuda --full --no-compile --markdown \
    --json "$OUT/bench_cuda.json" 2>&1 | tee "$OUT/bench_cuda.md"
  "$PY" -m archext.bench rope --device cuda --full --no-compile 2>&1 | tee "$OUT/bench_rope_cuda.txt"
  "$PY" -m archext.bench loss --device cuda --full --no-compile \
    --json "$OUT/bench_loss_cuda.json" 2>&1 | tee "$OUT/bench_loss_cuda.txt"
fi

echo "tests exit code: $test_rc" | tee -a "$OUT/machine.txt"
exit "$test_rc"
