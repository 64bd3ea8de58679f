# Sourced by scripts/*.sh (after `set -euo pipefail`): makes the repository root the working
# directory and ROOT, resolves the virtual environment (ARCHEXT_VENV, default .venv, as run.sh
# creates it) to VENV and its Python to PY, fails with a message naming the calling script when
# there is none, and puts the venv's pip-installed ninja on PATH.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd -P)
VENV=${ARCHEXT_VENV:-.venv}
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  echo "$(basename "$0"): no Python at $PY (create the venv with ./run.sh first)" >&2
  exit 1
fi
if [ -x "$VENV/bin/ninja" ]; then export PATH="$PATH:$VENV/bin"; fi
