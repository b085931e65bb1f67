"""Tests for the ReLU layer (port of test_neuron_layer.cpp, ReLU part)."""

import naive
import numpy as np
import pytest
from layer_test_case import LayerTestCase
from layer_testing import filler, make_blob

import netlite
from netlite.layers.relu import ReLULayer

SHAPE = (2, 3, 4, 5)


class TestReLULayer(LayerTestCase):
    """The standard tests (forward against the oracle, exhaustive float64
    gradient with the kink at 0 skipped, propagate_down, overwritten bottom
    diffs) for ReLU and leaky ReLU."""

    bottoms = [(SHAPE, filler("gaussian"))]
    kink_range = 1e-3  # at least the step, 1e-4
    slope = 0.0
    cases = {"relu": {}, "leaky": {"slope": 0.01}, "negative": {"slope": -0.5},
             "steep": {"slope": 2.0}}

    @property
    def layer(self):
        return f'type: "ReLU" relu_param {{ negative_slope: {self.slope} }}'

    def oracle(self, bottoms, blobs):
        # The slope is a float in the prototxt: float32 in every dtype.
        return [naive.relu(bottoms[0], float(np.float32(self.slope)))]


@pytest.fixture
def bottom(dtype):
    # Caffe's NeuronLayerTest fixture: (2, 3, 4, 5), Gaussian, seed 1701.
    return make_blob(SHAPE, dtype, filler("gaussian"))


def _layer(slope=None):
    text = "" if slope is None else f"relu_param {{ negative_slope: {slope} }}"
    return ReLULayer(text)


def _reference(x, slope):
    """Caffe's loop body, vectorised: max(x, 0) + slope * min(x, 0)."""
    slope = x.dtype.type(np.float32(slope))
    return np.maximum(x, 0) + slope * np.minimum(x, 0)


# ----------------------------------------------------------- Caffe's tests
def test_relu(bottom, dtype):
    layer, top = _layer(), netlite.Blob(dtype=dtype)
    layer.setup([bottom], [top])
    layer.forward([bottom], [top])
    x, y = bottom.data, top.data
    assert y.dtype == dtype and y.shape == SHAPE
    assert np.all(y >= 0)
    assert np.all((y == 0) | (y == x))
    # Non-vacuous: both branches occur.
    assert np.any(y == 0) and np.any(y > 0)


def test_relu_gradient(bottom, dtype):
    checker = netlite.GradientChecker(1e-2, 1e-3, 1701, 0.0, 0.01)
    checker.check_gradient_eltwise(_layer(), [bottom], [netlite.Blob(dtype=dtype)])


def test_relu_with_negative_slope(bottom, dtype):
    layer, top = _layer(0.01), netlite.Blob(dtype=dtype)
    layer.setup([bottom], [top])
    layer.forward([bottom], [top])
    x, y = bottom.data, top.data
    pos = y >= 0
    np.testing.assert_allclose(y[pos], x[pos], rtol=1e-6)
    np.testing.assert_allclose(y[~pos], 0.01 * x[~pos], rtol=1e-6)
    assert pos.any() and (~pos).any()


def test_relu_gradient_with_negative_slope(bottom, dtype):
    checker = netlite.GradientChecker(1e-2, 1e-3, 1701, 0.0, 0.01)
    checker.check_gradient_eltwise(
        _layer(0.01), [bottom], [netlite.Blob(dtype=dtype)]
    )


# ------------------------------------------------------------ beyond Caffe
@pytest.mark.parametrize("slope", [None, 0.01, 0.25, -0.5, 2.0])
def test_forward_is_bitwise_caffe(bottom, dtype, slope):
    layer, top = _layer(slope), netlite.Blob(dtype=dtype)
    layer.setup([bottom], [top])
    layer.forward([bottom], [top])
    np.testing.assert_array_equal(top.data, _reference(bottom.data, slope or 0))


@pytest.mark.parametrize("slope", [None, 0.01, -0.5, 2.0])
def test_backward_matches_closed_form(bottom, dtype, slope):
    layer, top = _layer(slope), netlite.Blob(dtype=dtype)
    layer.setup([bottom], [top])
    layer.forward([bottom], [top])
    dy = netlite.rng.get_rng().standard_normal(SHAPE).astype(dtype)
    top.diff = dy
    layer.backward([top], [True], [bottom])
    ns = dtype.type(np.float32(slope or 0))
    expected = dy * np.where(bottom.data > 0, dtype.type(1), ns)
    np.testing.assert_array_equal(bottom.diff, expected)


@pytest.mark.parametrize("slope", [None, 0.01])
def test_gradient_at_zero_uses_the_slope(dtype, slope):
    # Caffe: dx = dy * ([x > 0] + slope * [x <= 0]), so x == 0 takes the slope.
    x = make_blob((2, 3), dtype, [[0.0, 1.0, -1.0], [0.0, 2.0, 0.0]])
    layer, top = _layer(slope), netlite.Blob(dtype=dtype)
    layer.setup([x], [top])
    layer.forward([x], [top])
    top.diff[...] = 3.0
    layer.backward([top], [True], [x])
    ns = float(np.float32(slope or 0))
    expected = 3.0 * np.array([[ns, 1.0, ns], [ns, 1.0, ns]])
    np.testing.assert_allclose(x.diff, expected, rtol=1e-7)


@pytest.mark.parametrize("slope", [None, 0.01, 2.0, -0.5])
def test_in_place_matches_out_of_place(bottom, dtype, slope):
    dy = netlite.rng.get_rng().standard_normal(SHAPE).astype(dtype)
    # Out of place.
    layer, top = _layer(slope), netlite.Blob(dtype=dtype)
    layer.setup([bottom], [top])
    layer.forward([bottom], [top])
    top.diff = dy
    layer.backward([top], [True], [bottom])
    y, dx = top.data.copy(), bottom.diff.copy()
    # In place: the blob holds x, then y; its diff holds dy, then dx.
    blob = make_blob(SHAPE, dtype, bottom.data)
    layer = _layer(slope)
    layer.setup([blob], [blob])
    layer.forward([blob], [blob])
    np.testing.assert_array_equal(blob.data, y)
    blob.diff = dy
    layer.backward([blob], [True], [blob])
    # A negative slope flips the sign of y for x < 0; the layer keeps the
    # mask itself (Caffe would use the wrong branch here).
    np.testing.assert_array_equal(blob.diff, dx)


def test_follows_bottom_reshape(dtype):
    layer = _layer()
    x, top = make_blob((2, 3), dtype, filler("gaussian")), netlite.Blob(dtype=dtype)
    layer.setup([x], [top])
    x.reshape((4, 5, 6))
    netlite.fillers.get_filler(filler("gaussian")).fill(x)
    layer.forward([x], [top])
    assert top.shape == (4, 5, 6)
    np.testing.assert_array_equal(top.data, np.maximum(x.data, 0))


def test_blob_counts(dtype):
    a, b = make_blob((2,), dtype), make_blob((2,), dtype)
    with pytest.raises(netlite.LayerSetupError, match="ReLU"):
        _layer().setup([a, b], [netlite.Blob(dtype=dtype)])
    with pytest.raises(netlite.LayerSetupError, match="ReLU"):
        _layer().setup([a], [])


def test_in_a_net_in_place(dtype):
    net = netlite.Net(
        """
        force_backward: true
        layer { name: "in" type: "Input" top: "x" top: "t"
                input_param { shape { dim: 4 dim: 3 } } }
        layer { name: "relu" type: "ReLU" bottom: "x" top: "x" }
        layer { name: "loss" type: "EuclideanLoss" bottom: "x" bottom: "t"
                top: "loss" }
        """,
        dtype=dtype,
    )
    gen = netlite.rng.get_rng()
    x, t = gen.standard_normal((4, 3)), gen.standard_normal((4, 3))
    net.forward(x=x, t=t)
    expected = 0.5 * np.sum((np.maximum(x, 0) - t) ** 2) / 4
    assert net.loss == pytest.approx(expected, rel=1e-5)
    net.backward()
    dx = net.blobs["x"].diff
    np.testing.assert_allclose(
        dx, (x > 0) * (np.maximum(x, 0) - t) / 4, rtol=1e-5, atol=1e-7
    )
