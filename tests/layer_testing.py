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

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)

#: Every tolerance of the generic layer tests, by purpose and dtype.  A
#: float32 run is held to the float32 entry and a float64 run to the
#: float64 entry; a test that needs another one states its own reason.
TOLERANCES = {
    # Fast engine against the NumPy reference, same dtype.  The kernels
    # reorder sums (parallel and pairwise reductions), so a few ulps of
    # relative error (eps32 = 1.2e-7, eps64 = 2.2e-16) accumulate over
    # rows of up to ~1e5 terms: 1e-5 relative is ~100 float32 ulps and
    # 1e-12 ~5000 float64 ulps.
    "parity": {
        F32: {"rtol": 1e-5, "atol": 1e-6},
        F64: {"rtol": 1e-12, "atol": 1e-13},
    },
    # A layer against its float64 naive oracle (tests/naive.py), which
    # sees the same inputs widened exactly.  The layer rounds every
    # operation in its own dtype; the harness fixtures keep reductions
    # under ~1e3 terms of magnitude under ~10, so the error stays below
    # ~1e3 * eps of the largest term: 2e-5 (float32) and 1e-12 (float64)
    # leave a margin of ~100 over that.
    "oracle": {
        F32: {"rtol": 2e-5, "atol": 2e-5},
        F64: {"rtol": 1e-12, "atol": 1e-12},
    },
}

#: The name the engine-parity tests have always used.
PARITY_TOL = TOLERANCES["parity"]

#: Caffe's exhaustive gradient check, run in float64.  Central differences
#: have a truncation error of about h^2 |f'''| / 6 ~ 1e-9 at h = 1e-4 for
#: the O(1) curvatures of the fixtures, and a rounding error of about
#: eps64 |f| / h ~ 1e-11; a threshold of 1e-6 (relative above 1, absolute
#: below) sits three orders of magnitude above both and four below
#: Caffe's float32 thresholds (1e-2, 1e-3), so a wrong term in a gradient
#: cannot hide in it.  Layers with kinks also declare ``kink`` and
#: ``kink_range`` (at least the step).
GRADIENT_CHECK = {"stepsize": 1e-4, "threshold": 1e-6}


def tolerance(kind, dtype):
    """``TOLERANCES[kind][dtype]``: a dict with ``rtol`` and ``atol``."""
    return TOLERANCES[kind][np.dtype(dtype)]


def assert_close(actual, expected, kind, dtype, what=""):
    """``assert_allclose`` at ``TOLERANCES[kind][dtype]``.

    The absolute part is multiplied by ``max(1, max|expected|)``: the
    rounding error of a sum scales with its largest terms, not with its
    (possibly cancelled) result.
    """
    tol = tolerance(kind, dtype)
    expected = np.asarray(expected, dtype=np.float64)
    finite = expected[np.isfinite(expected)]
    scale = max(1.0, float(np.max(np.abs(finite), initial=0.0)))
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64), expected, rtol=tol["rtol"],
        atol=tol["atol"] * scale, err_msg=what,
    )


def f32(v):
    """A proto float32 field's value as the layer reads it, widened exactly
    (for the float64 oracles)."""
    return float(np.float32(v))


def rel_err(a, b):
    """``max |a - b| / max(max |b|, 1e-300)``: the worst error relative to
    the largest reference value (the cross-checks' figure of merit)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


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
               propagate_down=None, dtype=np.float32, num_tops=None):
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
    if num_tops is None:
        num_tops = layer.exact_num_top_blobs if layer.exact_num_top_blobs > 0 else 1
    top = [netlite.Blob(dtype=dtype, device=device) for _ in range(num_tops)]
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


def assert_numba_falls_back(layer_text, bottom_arrays, top_diff_arrays,
                            propagate_down, dtype):
    """A layer without Numba kernels of its own: its Numba engine runs the
    NumPy reference, so tops, bottom diffs and parameter diffs are
    identical (:func:`run_engine` on each engine, a fresh layer from
    ``layer_text`` each time)."""

    def make():
        return netlite.create_layer(layer_text, dtype=dtype)

    ref = run_engine("numpy", make, bottom_arrays, top_diff_arrays,
                     propagate_down, dtype)
    got = run_engine("numba", make, bottom_arrays, top_diff_arrays,
                     propagate_down, dtype)
    for a, b in zip(ref, got):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
