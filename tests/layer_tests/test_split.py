"""Tests for the Split layer (test_split_layer.cpp, layer part; the
InsertSplits tests live with the Net tests)."""

import naive
import numpy as np
import pytest
from layer_test_case import LayerTestCase
from layer_testing import assert_close, filler, make_blob

import netlite
from netlite.layers.split import SplitLayer

SHAPE = (2, 3, 6, 5)


class TestSplitLayer(LayerTestCase):
    """The standard tests for one, two and three tops: every top equals the
    bottom, and the exhaustive float64 gradient check, whose objective
    reads every top, checks the fan-out sum."""

    layer = 'type: "Split"'
    bottoms = [((2, 3, 4, 2), filler("gaussian"))]
    tops = 2
    cases = {"two": {}, "one": {"tops": 1}, "three": {"tops": 3}}

    def oracle(self, bottoms, blobs):
        return naive.split(bottoms[0], self.tops)


@pytest.fixture
def bottom(dtype):
    # Caffe's SplitLayerTest fixture: (2, 3, 6, 5), Gaussian; two tops.
    return make_blob(SHAPE, dtype, filler("gaussian"))


def _tops(dtype, n=2):
    return [netlite.Blob(dtype=dtype) for _ in range(n)]


# ----------------------------------------------------------- Caffe's tests
def test_setup(bottom, dtype):
    tops = _tops(dtype)
    SplitLayer().setup([bottom], tops)
    assert [t.shape for t in tops] == [SHAPE, SHAPE]


def test_forward(bottom, dtype):
    layer, tops = SplitLayer(), _tops(dtype)
    layer.setup([bottom], tops)
    layer.forward([bottom], tops)
    for t in tops:
        np.testing.assert_array_equal(t.data, bottom.data)


def test_gradient(bottom, dtype):
    checker = netlite.GradientChecker(1e-2, 1e-2)
    checker.check_gradient_eltwise(SplitLayer(), [bottom], _tops(dtype))


# ------------------------------------------------------------ beyond Caffe
def test_tops_alias_the_bottom_data(bottom, dtype):
    layer, tops = SplitLayer(), _tops(dtype)
    layer.setup([bottom], tops)
    layer.forward([bottom], tops)
    bottom.data[0, 0, 0, 0] = 123.0
    assert all(t.data[0, 0, 0, 0] == 123.0 for t in tops)
    # ... but not the diff: each consumer writes its own.
    assert not any(t.shares_diff_with(bottom) for t in tops)


def test_follows_a_bottom_reshape(bottom, dtype):
    layer, tops = SplitLayer(), _tops(dtype)
    layer.setup([bottom], tops)
    bottom.reshape((4, 7))
    bottom.data = np.arange(28.0).reshape(4, 7)
    layer.forward([bottom], tops)
    for t in tops:
        np.testing.assert_array_equal(t.data, np.arange(28.0).reshape(4, 7))
    tops[0].diff[...] = 1.0
    tops[1].diff[...] = 2.0
    layer.backward(tops, [True], [bottom])
    assert bottom.diff.shape == (4, 7) and np.all(bottom.diff == 3.0)


def test_in_place_is_refused(bottom, dtype):
    with pytest.raises(netlite.LayerSetupError, match=r"Split.*in-place.*top\[1\]"):
        SplitLayer().setup([bottom], [netlite.Blob(dtype=dtype), bottom])


def test_blob_counts(bottom, dtype):
    with pytest.raises(netlite.LayerSetupError, match="at least 1 top"):
        SplitLayer().setup([bottom], [])
    with pytest.raises(netlite.LayerSetupError, match="exactly 1 bottom"):
        SplitLayer().setup([bottom, bottom], _tops(dtype))


def test_inserted_split_sums_gradients_in_a_net(dtype):
    # x feeds two losses: the Net inserts a Split whose backward adds the
    # two gradients into x's diff.
    net = netlite.Net(
        """
        force_backward: true
        layer { name: "in" type: "Input" top: "x" top: "t" top: "u"
                input_param { shape { dim: 2 dim: 3 } } }
        layer { name: "l1" type: "EuclideanLoss" bottom: "x" bottom: "t"
                top: "l1" }
        layer { name: "l2" type: "EuclideanLoss" bottom: "x" bottom: "u"
                top: "l2" loss_weight: 3 }
        """,
        dtype=dtype,
    )
    assert any(isinstance(layer, SplitLayer) for layer in net.layers)
    gen = netlite.rng.get_rng()
    x, t, u = (gen.standard_normal((2, 3)) for _ in range(3))
    net.forward(x=x, t=t, u=u)
    net.backward()
    expected = (x - t) / 2 + 3 * (x - u) / 2
    assert_close(net.blobs["x"].diff, expected, "oracle", dtype)
