#!/usr/bin/env bash
# The Python packages the GPU check needs that the lent GPU machine's image lacks, as wheels in
# .whl/ (ignored by git through .git/info/exclude), to name in the device call's `carry`.
# Run here, from the repository root, where pip reaches the package index:
#   bash benchmarks/gpu_wheels.sh
# Today that is Liger-Kernel alone: pure Python + Triton (py3-none-any). Its requirements,
# torch and triton, are on the image (torch 2.11, Triton 3.6), and so is transformers (for
# `archext profile --modes liger`). benchmarks/gpu_check.sh installs whatever .whl/ holds.
set -euo pipefail
cd "$(dirname "$0")/.."
LIGER=${LIGER_VERSION:-0.8.5}  # the version the glue in archext/bench/liger.py was read against
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
rm -f .whl/liger_kernel-*.whl  # one version only: two would stop the install there
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation py --abi none --platform any -d .whl "liger-kernel==$LIGER"
for w in .whl/*.whl; do
  echo "$w"
  unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^/  /'
done
du -ch .whl/*.whl | tail -n 1
