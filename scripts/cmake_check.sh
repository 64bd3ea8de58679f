#!/usr/bin/env bash
# The CMake build of archext as a plain C++ library against libtorch, its C++ tests and its C++
# benchmark: configure (against the venv's torch), build with ninja, ctest, archext_bench --quick.
#   scripts/cmake_check.sh
# Environment:
#   ARCHEXT_VENV       the virtual environment with torch (default .venv; ./run.sh creates it)
#   MAX_JOBS           parallel compile jobs (default 2)
#   ARCHEXT_WITH_CUDA  ON to also build the CUDA kernels (default OFF: CPU only)
#   BUILD_DIR          build directory (default build-cmake)
#   ARCHEXT_CMAKE_BENCH=0  skip the benchmark (the test command does)
set -euo pipefail
source "$(dirname "$0")/venv.sh"  # ROOT (the working directory), VENV, PY; ninja on PATH
BUILD_DIR=${BUILD_DIR:-build-cmake}
JOBS=${MAX_JOBS:-2}

command -v cmake >/dev/null || { echo "cmake_check.sh: cmake not found" >&2; exit 1; }
# ninja: the system one, or the pip package in the venv.
command -v ninja >/dev/null || { echo "cmake_check.sh: ninja not found (pip install ninja)" >&2; exit 1; }

# A build directory configured for another checkout (copied along, or committed by mistake) makes
# cmake refuse to configure: start that one afresh.
if [ -f "$BUILD_DIR/CMakeCache.txt" ]; then
  home=$(sed -n 's/^CMAKE_HOME_DIRECTORY:INTERNAL=//p' "$BUILD_DIR/CMakeCache.txt")
  if [ "$home" != "$ROOT" ]; then
    echo "== $BUILD_DIR was configured for ${home:-another source tree}; removing it"
    rm -rf "$BUILD_DIR"
  fi
fi

TORCH_PREFIX=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
echo "== configure ($BUILD_DIR, torch from $TORCH_PREFIX, ARCHEXT_WITH_CUDA=${ARCHEXT_WITH_CUDA:-OFF})"
cmake -S . -B "$BUILD_DIR" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" \
  -DPython_EXECUTABLE="$PY" \
  -DARCHEXT_WITH_CUDA="${ARCHEXT_WITH_CUDA:-OFF}"

echo "== build (ninja -j$JOBS)"
t0=$SECONDS
cmake --build "$BUILD_DIR" -j "$JOBS"
echo "== build took $((SECONDS - t0)) s"

echo "== ctest"
(cd "$BUILD_DIR" && ctest --output-on-failure)

if [ "${ARCHEXT_CMAKE_BENCH:-1}" = 1 ]; then
  echo "== archext_bench --quick"
  "$BUILD_DIR/archext_bench" --quick
fi
