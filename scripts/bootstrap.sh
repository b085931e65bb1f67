#!/usr/bin/env bash
# Create the project's virtual environment (.venv) and install netlite into
# it in editable mode with the given extras. Idempotent: reinstalls only when
# setup.cfg or pyproject.toml changed since the last install.
#
# Usage: bash scripts/bootstrap.sh [extras]      (default: test,plot)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

extras="${1:-test,plot}"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv with $($python --version 2>&1)"
  "$python" -m venv .venv
fi
stamp=".venv/.netlite-installed-${extras//,/-}"
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[bootstrap] pip install -e .[${extras}]"
  .venv/bin/python -m pip install -q --upgrade pip
  # The only editable mode that maps layers/ onto netlite.layers is the
  # default (PEP 660 "lenient") one; never use editable_mode=compat.
  .venv/bin/python -m pip install -q -e ".[${extras}]"
  touch "$stamp"
fi
