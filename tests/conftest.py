"""Shared pytest configuration.

* Fails fast with a clear message when netlite is not installed (the layer
  zoo is only importable as ``netlite.layers`` after ``pip install -e .``).
* Puts ``tests/`` on ``sys.path`` so test modules can import
  ``layer_testing`` (shared helpers).
* Restores the global engine/mode/RNG after every test.
"""

import os
import sys

import pytest

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
