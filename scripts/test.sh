#!/usr/bin/env bash
# The README's test command: set up .venv, find the data, run the test suite.
# Extra arguments go to pytest (e.g. `make test ARGS="-k softmax"`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh test,plot
source scripts/data-env.sh
echo "[test] NETLITE_DATA=${NETLITE_DATA:-<unset>}  engine=${NETLITE_CPU_ENGINE:-numpy}"
exec .venv/bin/python -m pytest "$@"
