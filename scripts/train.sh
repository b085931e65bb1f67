#!/usr/bin/env bash
# The README's main command: set up .venv, find MNIST, train Caffe's LeNet
# (a shortened schedule) on the Numba engine, print Caffe-style progress and
# write PNG plots of the training curves to runs/mnist/.
# Extra arguments go to `netlite train` (e.g. `make train ARGS="--engine numpy"`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh plot
source scripts/data-env.sh
exec .venv/bin/netlite train \
  --solver examples/mnist/lenet_quick_solver.prototxt \
  --engine numba --plot runs/mnist "$@"
