"""Tests for Softmax (port of test_softmax_layer.cpp, then other axes,
in-place use, stability, non-finite inputs and the engines)."""

import warnings

import naive
import numpy as np
import pytest
from layer_test_case import LayerTestCase
from layer_testing import (
    PARITY_TOL,
    assert_close,
    filler,
    make_blob,
    requires_gpu,
    requires_numba,
)

import netlite
from netlite import backend
from netlite.layers.softmax import SoftmaxLayer

SHAPE = (2, 10, 2, 3)


class TestSoftmaxLayer(LayerTestCase):
    """The standard tests for every kind of axis: the channel axis with
    spatial positions (strided, inner > 1), rows (inner = 1), the first and
    the last axis, negative axes; the Numba parity, forward and contract
    tests run on each."""

    shape, axis = (2, 4, 2, 3), 1
    cases = {
        "channels": {},
        "rows": {"shape": (3, 7)},
        "axis0": {"shape": (3, 2, 4), "axis": 0},
        "axis2": {"shape": (2, 2, 3, 2), "axis": 2},
        "axis_last": {"shape": (2, 3, 5), "axis": -1},
        "axis_neg3": {"shape": (2, 3, 2, 3), "axis": -3},
    }

    @property
    def layer(self):
        return f'type: "Softmax" softmax_param {{ axis: {self.axis} }}'

    @property
    def bottoms(self):
        return [(self.shape, filler("gaussian"))]

    def oracle(self, bottoms, blobs):
        return [naive.softmax(bottoms[0], self.axis)]

@pytest.fixture
def bottom(dtype):
    # Caffe's fixture: (2, 10, 2, 3) Gaussian (std 1).
    return make_blob(SHAPE, dtype, filler("gaussian"))


def _softmax64(x, axis):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ----------------------------------------------------------- Caffe's tests
def test_forward(bottom, dtype):
    layer, top = SoftmaxLayer(), netlite.Blob(dtype=dtype)
    layer.setup([bottom], [top])
    layer.forward([bottom], [top])
    x, y = bottom.data, top.data
    assert y.shape == SHAPE and y.dtype == dtype
    for i in range(SHAPE[0]):
        for k in range(SHAPE[2]):
            for w in range(SHAPE[3]):
                total = y[i, :, k, w].sum()
                assert 0.999 <= total <= 1.001
                # Computed without the max subtraction, as Caffe's test does.
                scale = np.exp(x[i, :, k, w].astype(np.float64)).sum()
                expected = np.exp(x[i, :, k, w].astype(np.float64)) / scale
                assert np.all(np.abs(y[i, :, k, w] - expected) <= 1e-4)


def test_gradient(bottom, dtype):
    layer, top = SoftmaxLayer(), netlite.Blob(dtype=dtype)
    checker = netlite.GradientChecker(1e-2, 1e-3)
    checker.check_gradient_exhaustive(layer, [bottom], [top])


# ------------------------------------------------------------ beyond Caffe
def test_backward_closed_form(bottom, dtype):
    layer, top = SoftmaxLayer(), netlite.Blob(dtype=dtype)
    layer.setup([bottom], [top])
    layer.forward([bottom], [top])
    dy = netlite.rng.get_rng().standard_normal(SHAPE)
    top.diff = dy
    layer.backward([top], [True], [bottom])
    y = _softmax64(bottom.data, 1)
    dy = top.diff.astype(np.float64)
    expected = (dy - (dy * y).sum(axis=1, keepdims=True)) * y
    assert_close(bottom.diff, expected, "oracle", dtype)


def test_in_place_matches_out_of_place(bottom, dtype):
    x = bottom.data.copy()
    dy = netlite.rng.get_rng().standard_normal(SHAPE)
    layer, top = SoftmaxLayer(), netlite.Blob(dtype=dtype)
    layer.setup([bottom], [top])
    layer.forward([bottom], [top])
    top.diff = dy
    layer.backward([top], [True], [bottom])
    blob = make_blob(SHAPE, dtype, x)
    in_place = SoftmaxLayer()
    in_place.setup([blob], [blob])
    in_place.forward([blob], [blob])
    np.testing.assert_array_equal(blob.data, top.data)
    blob.diff = dy
    in_place.backward([blob], [True], [blob])
    # The same operations in the same order (dot is complete before dx is
    # written), so in place is bit for bit out of place.
    np.testing.assert_array_equal(blob.diff, bottom.diff)


def test_large_scores_do_not_overflow(dtype):
    x = np.array([[1000.0, 1001.0, 999.0], [-1000.0, -1001.0, -999.0]])
    data = make_blob((2, 3), dtype, x)
    layer, top = SoftmaxLayer(), netlite.Blob(dtype=dtype)
    layer.setup([data], [top])
    layer.forward([data], [top])
    assert_close(top.data[0], _softmax64([1, 2, 0], 0), "oracle", dtype)
    assert_close(top.data[1], _softmax64([1, 0, 2], 0), "oracle", dtype)


def test_non_finite_scores(dtype):
    # -inf is a legitimate score (probability 0); NaN or +inf make only
    # their own column NaN (Softmax is not a loss: the NaN stays visible).
    x = np.array([[-np.inf, 0.0, 0.0], [np.nan, 1.0, 2.0], [np.inf, 1.0, 2.0],
                  [-np.inf, -np.inf, -np.inf], [0.0, 1.0, 2.0]])
    data = make_blob(x.shape, dtype, x)
    layer, top = SoftmaxLayer(), netlite.Blob(dtype=dtype)
    layer.setup([data], [top])
    layer.forward([data], [top])
    np.testing.assert_array_equal(top.data[0], [0, 0.5, 0.5])
    assert np.all(np.isnan(top.data[1:4]))
    assert_close(top.data[4], _softmax64([0, 1, 2], 0), "oracle", dtype)


def test_bad_axis_names_layer(bottom):
    layer = SoftmaxLayer('name: "prob" softmax_param { axis: 4 }')
    with pytest.raises(netlite.LayerSetupError, match="Softmax layer 'prob'.*axis"):
        layer.setup([bottom], [netlite.Blob()])


def test_empty_blob(dtype):
    data = make_blob((0, 3), dtype)
    layer, top = SoftmaxLayer(), netlite.Blob(dtype=dtype)
    layer.setup([data], [top])
    layer.forward([data], [top])
    layer.backward([top], [True], [data])
    assert top.shape == (0, 3)


def test_registered_type():
    assert isinstance(netlite.create_layer('type: "Softmax"'), SoftmaxLayer)


@pytest.mark.torch
def test_matches_torch():
    torch = pytest.importorskip("torch")
    gen = netlite.rng.get_rng()
    x, dy = gen.standard_normal(SHAPE) * 3, gen.standard_normal(SHAPE)
    data = make_blob(SHAPE, np.float64, x)
    layer, top = SoftmaxLayer(), netlite.Blob(dtype=np.float64)
    layer.setup([data], [top])
    layer.forward([data], [top])
    top.diff = dy
    layer.backward([top], [True], [data])
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.softmax(xt, dim=1)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(top.data, yt.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(data.diff, xt.grad.numpy(), rtol=1e-10, atol=1e-15)


# ---------------------------------------------------------------- engines
PARITY_CASES = [
    # (shape, axis): rows (inner 1) short, long (several online blocks) and
    # parallel; strided (inner > 1) small and parallel; other axes.
    ((2, 10, 2, 3), 1),
    ((64, 10), 1),
    ((7, 3000), 1),
    ((40, 1000), 1),
    ((3, 5, 700), 1),
    ((4, 6, 5), -1),
    ((5, 4, 3, 2), 0),
    ((8, 20, 300), 1),
]


def _run(engine, x, dy, axis, in_place=False):
    backend.set_cpu_engine(engine)
    device = "gpu" if engine == "cupy" else "cpu"
    xp = backend.get_array_module(device)
    data = netlite.Blob(x.shape, dtype=x.dtype, device=device)
    data.data = xp.asarray(x)
    top = data if in_place else netlite.Blob(dtype=x.dtype, device=device)
    layer = SoftmaxLayer(f"softmax_param {{ axis: {axis} }}", device=device)
    layer.setup([data], [top])
    layer.forward([data], [top])
    y = backend.to_numpy(top.data).copy()
    top.diff = xp.asarray(dy)
    layer.backward([top], [True], [data])
    return y, backend.to_numpy(data.diff).copy()


def _inputs(shape, dtype):
    gen = netlite.rng.get_rng()
    x = (gen.standard_normal(shape) * 5).astype(dtype)
    return x, gen.standard_normal(shape).astype(dtype)


def _assert_parity(a, b, dtype):
    tol = PARITY_TOL[np.dtype(dtype)]
    np.testing.assert_allclose(b[0], a[0], **tol)
    np.testing.assert_allclose(b[1], a[1], **tol)


@requires_numba()
@pytest.mark.parametrize("shape, axis", PARITY_CASES)
@pytest.mark.parametrize("in_place", [False, True])
def test_numba_matches_numpy(dtype, shape, axis, in_place):
    x, dy = _inputs(shape, dtype)
    _assert_parity(_run("numpy", x, dy, axis, in_place),
                   _run("numba", x, dy, axis, in_place), dtype)


@requires_numba()
@pytest.mark.parametrize("pattern", ["rising", "falling", "neg_inf_blocks"])
def test_numba_online_blocks(dtype, pattern):
    # Rows longer than one block: the running max grows in every block
    # (rescaling), never grows, or whole blocks are -inf (skipped).
    from netlite.layers.softmax_numba import BLOCK

    n = 3 * BLOCK + 77
    x = np.linspace(-20, 20, n)
    if pattern == "falling":
        x = x[::-1]
    x = np.stack([x, np.sin(np.arange(n)) * 30]).astype(dtype)
    if pattern == "neg_inf_blocks":
        x[:, : 2 * BLOCK + 5] = -np.inf
    dy = netlite.rng.get_rng().standard_normal(x.shape).astype(dtype)
    ref = _run("numpy", x, dy, 1)
    _assert_parity(ref, _run("numba", x, dy, 1), dtype)
    np.testing.assert_allclose(ref[0], _softmax64(x, 1), **PARITY_TOL[np.dtype(dtype)])


@requires_numba()
def test_numba_non_finite(dtype):
    backend.set_cpu_engine("numba")
    test_non_finite_scores(dtype)
    x = np.zeros((2, 2000), dtype=dtype)
    x[0, 1500] = np.nan
    x[1, 10] = np.inf
    y, _ = _run("numba", x, np.zeros_like(x), 1)
    assert np.all(np.isnan(y))


@requires_numba()
def test_numba_exp_accuracy():
    # The vectorisable float32 exp against float64 NumPy: within one ulp
    # (relative 1.2e-7) where the result is normal, 0 or denormal below.
    import numba

    from netlite.layers.softmax_numba import exp_nonpos

    @numba.njit
    def apply(d, out):
        for j in range(d.size):
            out[j] = exp_nonpos(d[j])

    d = np.concatenate([-np.logspace(-8, 2.05, 200001), [0.0, -0.0]])
    d = d.astype(np.float32)
    out = np.empty_like(d)
    apply(d, out)
    exact = np.exp(d.astype(np.float64))
    normal = exact >= np.finfo(np.float32).tiny
    rel = np.abs(out[normal] - exact[normal]) / exact[normal]
    assert rel.max() <= 1.2e-7
    assert np.all(np.abs(out[~normal] - exact[~normal]) <= 1.2e-38)
    special = np.array([-np.inf, np.nan, -1e30], dtype=np.float32)
    out = np.empty_like(special)
    apply(special, out)
    assert out[0] == 0 and np.isnan(out[1]) and out[2] == 0


@requires_numba()
def test_numba_compiles_without_warnings(dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for shape, axis in PARITY_CASES[:3]:
            x, dy = _inputs(shape, dtype)
            _run("numba", x, dy, axis)


@requires_gpu()
@pytest.mark.parametrize("shape, axis", PARITY_CASES)
@pytest.mark.parametrize("in_place", [False, True])
def test_cupy_matches_numpy(dtype, shape, axis, in_place):
    x, dy = _inputs(shape, dtype)
    _assert_parity(_run("numpy", x, dy, axis, in_place),
                   _run("cupy", x, dy, axis, in_place), dtype)
