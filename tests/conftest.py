"""Shared pytest configuration.

* Fails fast with a clear message when netlite is not installed (the layer
  zoo is only importable as ``netlite.layers`` after ``pip install -e .``).
* Puts ``tests/`` on ``sys.path`` so test modules can import
  ``layer_testing`` (shared helpers).
* Restores the global engine/mode/RNG after every test.
* Runs the suite on the NumPy reference engine by default: the library's
  default is ``numba``, but a hand-written test should not depend on which
  engine the machine picks.  ``NETLITE_CPU_ENGINE=numba pytest`` runs it on
  the fast engine instead; LayerTestCase's parity tests and every test that
  calls ``set_cpu_engine`` choose their engines themselves.  Set in the
  environment, so the subprocesses tests start (the CLI, examples) inherit
  it; tests of the default itself remove it.
* Sets the threshold of the Numba kernels' multi-threaded builds
  (``NETLITE_PARALLEL_MIN_ELEMENTS``) so that the passes between GEMMs,
  which the library never threads, take them on the tests' larger inputs.
"""

import os
import sys

import pytest

os.environ.setdefault("NETLITE_CPU_ENGINE", "numpy")
# The kernels' multi-threaded builds from 2**15 elements, also for the passes
# between GEMMs (which the library never threads), so the parity tests'
# larger cases exercise them.
os.environ.setdefault("NETLITE_PARALLEL_MIN_ELEMENTS", str(1 << 15))
sys.path.insert(0, os.path.dirname(__file__))

try:
    import netlite
    import netlite.layers  # noqa: F401
except ImportError as exc:  # pragma: no cover - set-up error path
    raise SystemExit(
        f"netlite is not installed in editable mode ({exc}): run `pip install -e .`"
    ) from None

from netlite import backend  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Deselect the LayerTestCase tests that do not apply to their case
    (see layer_test_case.LayerTestCase.applies)."""
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("inapplicable") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(autouse=True)
def _restore_global_state():
    engine, mode = backend.cpu_engine(), backend.mode()
    netlite.set_random_seed(1701)
    yield
    backend.set_cpu_engine(engine)
    if mode == "cpu":
        backend.set_mode_cpu()


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    """Caffe's TestDtypes: every typed test runs in float32 and float64."""
    import numpy as np

    return np.dtype(request.param)
