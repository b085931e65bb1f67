"""Helpers shared by the layer tests (import as ``layer_testing``).

Fixtures are built the way Caffe's tests build them: blobs filled by a
filler drawn from the global RNG (seeded with 1701 before every test by
conftest).
"""

import numpy as np
import pytest

import netlite
from netlite import backend, fillers
from netlite.io import FillerParameter

#: Tolerances for comparing a fast engine with the NumPy reference, keyed by
#: dtype.  float32: the kernels reorder sums (parallel reductions), so a few
#: ulps of relative error (~1e-7 each) accumulate over rows of up to ~1e5
#: terms; 1e-5 relative is ~100 ulps.  float64: the same argument at 1e-16
#: gives ~1e-12.
PARITY_TOL = {
    np.dtype(np.float32): {"rtol": 1e-5, "atol": 1e-6},
    np.dtype(np.float64): {"rtol": 1e-12, "atol": 1e-13},
}


def filler(type_="gaussian", **fields):
    """A FillerParameter, e.g. ``filler("gaussian", std=10)``."""
    return FillerParameter(type=type_, **fields)


def make_blob(shape, dtype, fill=None, device="cpu"):
    """A Blob of ``shape``; ``fill`` is a FillerParameter, an array or None."""
    blob = netlite.Blob(shape, dtype=dtype, device=device)
    if isinstance(fill, FillerParameter):
        fillers.get_filler(fill).fill(blob)
    elif fill is not None:
        blob.data[...] = np.asarray(fill)
    return blob


def random_labels(shape, num_classes, dtype):
    """Integer labels in [0, num_classes) drawn from the global RNG, stored
    as floats (Caffe's ``rand() % num_classes`` fixtures)."""
    gen = netlite.rng.get_rng()
    return gen.integers(0, num_classes, size=shape).astype(dtype)


def requires_numba():
    """Skip unless Numba is importable."""
    return pytest.mark.skipif(not backend.numba_available(), reason="numba missing")


def requires_gpu():
    """Skip unless CuPy and a CUDA device are available; marks the test gpu."""
    def decorate(fn):
        fn = pytest.mark.gpu(fn)
        return pytest.mark.skipif(
            not backend.cupy_available(), reason="CuPy or a CUDA device missing"
        )(fn)

    return decorate


def run_engine(engine, layer_factory, bottom_arrays, top_diff_arrays=None,
               propagate_down=None, dtype=np.float32):
    """Set up a fresh layer on copies of the inputs, run forward (and
    backward when top diffs are given) on ``engine`` ("numpy", "numba" or
    "cupy"); return (top datas, bottom diffs, param diffs) as NumPy arrays.

    Used by the engine-parity tests: same inputs, two engines, compare.
    """
    device = "gpu" if engine == "cupy" else "cpu"
    if engine != "cupy":
        backend.set_cpu_engine(engine)
    netlite.set_random_seed(1701)
    bottom = [make_blob(a.shape, dtype, a, device=device) for a in bottom_arrays]
    layer = layer_factory()
    layer.device = device
    top = [netlite.Blob(dtype=dtype, device=device) for _ in range(
        layer.exact_num_top_blobs if layer.exact_num_top_blobs > 0 else 1)]
    layer.setup(bottom, top)
    layer.forward(bottom, top)
    tops = [backend.to_numpy(t.data).copy() for t in top]
    bottom_diffs, param_diffs = [], []
    if top_diff_arrays is not None:
        for t, d in zip(top, top_diff_arrays):
            t.diff[...] = t.xp.asarray(d.astype(dtype))
        for p in layer.blobs:
            p.diff[...] = 0
        pd = propagate_down or [True] * len(bottom)
        layer.backward(top, pd, bottom)
        bottom_diffs = [backend.to_numpy(b.diff).copy() for b in bottom]
        param_diffs = [backend.to_numpy(p.diff).copy() for p in layer.blobs]
    return tops, bottom_diffs, param_diffs
