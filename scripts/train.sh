#!/usr/bin/env bash
# The README's main command: set up .venv, find MNIST, train Caffe's LeNet
# (a shortened schedule) on the Numba engine, print Caffe-style progress and
# write PNG plots of the training curves to runs/mnist/.
# Extra arguments go to `netlite train` (e.g. `make train ARGS="--engine numpy"`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh plot
# Say where the data comes from: NETLITE_DATA from the caller, from
# data-env.sh (../shared/datasets beside the repository), or not set (then
# netlite searches its user cache and /usr/share/datasets, and logs the
# folder it used).
if [ -n "${NETLITE_DATA:-}" ]; then
  _origin="set by the caller"
else
  _origin="set by scripts/data-env.sh: the datasets folder beside the repository"
fi
source scripts/data-env.sh
if [ -n "${NETLITE_DATA:-}" ]; then
  echo "[train] NETLITE_DATA=${NETLITE_DATA} (${_origin})"
else
  echo "[train] NETLITE_DATA is not set: netlite searches ~/.cache/netlite and /usr/share/datasets"
fi
unset _origin
exec .venv/bin/netlite train \
  --solver examples/mnist/lenet_quick_solver.prototxt \
  --engine numba --plot runs/mnist "$@"
