#!/usr/bin/env bash
# The whole test suite against another torch (and transformers) than CI's, in a venv and a clean
# clone of HEAD of their own, so that the working tree and .venv are left alone:
#   scripts/compat_check.sh 2.4.0 "transformers<5"   # the oldest torch setup.py admits
#   scripts/compat_check.sh 2.11.0                   # the GPU machine's torch
# The build is ARCHEXT_CUDA=auto: the CUDA kernels too where the toolkit's major version is
# torch's (2.11.0+cu130 with nvcc 13 here), the CPU kernels alone otherwise (2.4.0 is cu121).
# transformers 5 needs torch >= 2.6; give an older one for an older torch. Needs PyPI (pip
# downloads torch, about 3 GB with its CUDA libraries). Set ARCHEXT_COMPAT_DIR to move the venvs.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: scripts/compat_check.sh TORCH_VERSION [TRANSFORMERS_SPEC]" >&2; exit 2; }
torch_version=$1
transformers_spec=${2:-transformers}
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${ARCHEXT_COMPAT_DIR:-/tmp/archext-compat}/torch-$torch_version
venv=$dir/venv
mkdir -p "$dir"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "torch==$torch_version" "$transformers_spec" \
  numpy pytest hypothesis ninja expecttest matplotlib setuptools wheel 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
rm -rf "$dir/src"
git clone -q "$root" "$dir/src"
cd "$dir/src"
if ! MAX_JOBS=${MAX_JOBS:-2} "$venv/bin/python" setup.py -q build_ext --inplace > "$dir/build.log" 2>&1; then
  tail -n 40 "$dir/build.log"
  echo "compat_check: the build failed against torch $torch_version ($dir/build.log)" >&2
  exit 1
fi
grep "^archext:" "$dir/build.log" || true
"$venv/bin/python" -m pytest -q -p no:cacheprovider "${@:3}" tests
