"""Tests for the EuclideanLoss layer: the standard tests (LayerTestCase),
the port of test_euclidean_loss_layer.cpp, then the closed-form backward,
shapes, batch sizes and a Net."""

import naive
import numpy as np
import pytest
from layer_test_case import LayerTestCase
from layer_testing import filler, make_blob, tolerance

import netlite
from netlite.layers.euclidean_loss import EuclideanLossLayer

SHAPE = (10, 5, 1, 1)


class TestEuclideanLossLayer(LayerTestCase):
    """The standard tests: forward against ``naive.euclidean_loss``, the
    exhaustive float64 gradient of both bottoms (the target may be learned),
    propagate_down, overwritten bottom diffs, the loss weight; also for
    bottoms whose shapes differ but whose counts match."""

    layer = 'type: "EuclideanLoss"'
    shapes = ((4, 3, 1, 1), (4, 3, 1, 1))
    cases = {
        "default": {},
        "shapes_differ": {"shapes": ((4, 3, 1, 1), (4, 3))},
        "spatial": {"shapes": ((2, 3, 2), (2, 6))},
        "batch_1": {"shapes": ((1, 5), (1, 5))},
    }

    @property
    def bottoms(self):
        return [(shape, filler("gaussian")) for shape in self.shapes]

    def oracle(self, bottoms, blobs):
        return [np.array(naive.euclidean_loss(bottoms[0], bottoms[1]))]


@pytest.fixture
def bottoms(dtype):
    # Caffe's fixture: data and "label" (10, 5, 1, 1), both Gaussian.
    return [make_blob(SHAPE, dtype, filler("gaussian")) for _ in range(2)]


def _expected(a, b):
    d = a.astype(np.float64) - b.astype(np.float64)
    return float(np.sum(d * d)) / a.shape[0] / 2


# ----------------------------------------------------------- Caffe's tests
def test_forward(bottoms, dtype):
    top = netlite.Blob(dtype=dtype)
    layer_1 = EuclideanLossLayer()
    layer_1.setup(bottoms, [top])
    loss_1 = layer_1.forward(bottoms, [top])
    layer_2 = EuclideanLossLayer("loss_weight: 3.7")
    layer_2.setup(bottoms, [top])
    loss_2 = layer_2.forward(bottoms, [top])
    assert abs(loss_1 * 3.7 - loss_2) <= 1e-5
    assert abs(loss_1) >= 1e-1


def test_gradient(bottoms, dtype):
    layer, top = EuclideanLossLayer("loss_weight: 3.7"), netlite.Blob(dtype=dtype)
    layer.setup(bottoms, [top])
    checker = netlite.GradientChecker(1e-2, 1e-2, 1701)
    checker.check_gradient_exhaustive(layer, bottoms, [top])


# ------------------------------------------------------------ beyond Caffe
def test_backward_closed_form_with_loss_weight(bottoms, dtype):
    layer, top = EuclideanLossLayer("loss_weight: 3.7"), netlite.Blob(dtype=dtype)
    layer.setup(bottoms, [top])
    layer.forward(bottoms, [top])
    assert float(top.diff) == float(np.float32(3.7))  # a proto float
    layer.backward([top], [True, True], bottoms)
    d = bottoms[0].data.astype(np.float64) - bottoms[1].data
    w = float(np.float32(3.7))  # loss_weight is a float field
    # Each diff is (a - b) * (w / N): two roundings in the blob's dtype.
    tol = {"rtol": 1e-6, "atol": 1e-7} if dtype == np.float32 else {"rtol": 1e-12}
    np.testing.assert_allclose(bottoms[0].diff, w * d / 10, **tol)
    np.testing.assert_allclose(bottoms[1].diff, -w * d / 10, **tol)


def test_both_bottoms_allow_force_backward():
    layer = EuclideanLossLayer()
    assert layer.allow_force_backward(0) and layer.allow_force_backward(1)


def test_shape_errors(dtype):
    a = make_blob((10, 5), dtype)
    with pytest.raises(netlite.ShapeError, match="EuclideanLoss.*same count"):
        EuclideanLossLayer().setup([a, make_blob((10, 4), dtype)], [netlite.Blob()])
    with pytest.raises(netlite.LayerSetupError, match="EuclideanLoss.*first dim"):
        EuclideanLossLayer().setup([a, make_blob((5, 10), dtype)], [netlite.Blob()])
    layer, top = EuclideanLossLayer(), netlite.Blob(dtype=dtype)
    b = make_blob((10, 5), dtype)
    layer.setup([a, b], [top])
    b.reshape((10, 6))
    with pytest.raises(netlite.ShapeError):
        layer.forward([a, b], [top])


def test_batch_size_change(dtype):
    layer, top = EuclideanLossLayer(), netlite.Blob(dtype=dtype)
    a, b = make_blob((4, 3), dtype), make_blob((4, 3), dtype)
    layer.setup([a, b], [top])
    for n in (4, 9, 2):
        a.reshape((n, 3))
        b.reshape((n, 3))
        a.data, b.data = np.ones((n, 3)), np.zeros((n, 3))
        layer.forward([a, b], [top])
        # 3n / 2n is exactly 1.5 in any dtype; the diff 1 * (1 / n) is one
        # rounding of 1 / n: at most one eps relative.
        assert float(top.data) == 1.5
        layer.backward([top], [True, True], [a, b])
        np.testing.assert_allclose(a.diff, np.full((n, 3), 1.0 / n),
                                   rtol=np.finfo(dtype).eps, atol=0)


def test_empty_batch_is_zero_loss(dtype):
    a, b = make_blob((0, 3), dtype), make_blob((0, 3), dtype)
    layer, top = EuclideanLossLayer(), netlite.Blob(dtype=dtype)
    layer.setup([a, b], [top])
    assert layer.forward([a, b], [top]) == 0.0
    layer.backward([top], [True, True], [a, b])
    assert a.diff.shape == (0, 3)


def test_in_a_net_target_gets_gradient_with_force_backward(dtype):
    net = netlite.Net(
        """
        force_backward: true
        layer { name: "in" type: "Input" top: "x" top: "t"
                input_param { shape { dim: 3 dim: 2 } } }
        layer { name: "loss" type: "EuclideanLoss" bottom: "x" bottom: "t"
                top: "loss" loss_weight: 2 }
        """,
        dtype=dtype,
    )
    gen = netlite.rng.get_rng()
    x, t = gen.standard_normal((3, 2)), gen.standard_normal((3, 2))
    net.forward(x=x, t=t)
    # A float32 net rounds the inputs (relative 6e-8) and a few operations
    # follow: 1e-5 leaves a wide margin; a float64 net gets the oracle's.
    rtol = 1e-5 if dtype == np.float32 else tolerance("oracle", dtype)["rtol"]
    assert net.loss == pytest.approx(2 * np.sum((x - t) ** 2) / 6, rel=rtol)
    net.backward()
    np.testing.assert_allclose(net.blobs["t"].diff, -2 * (x - t) / 3, rtol=rtol)
