"""Tests for the Split layer (test_split_layer.cpp, layer part; the
InsertSplits tests live with the Net tests)."""

import numpy as np
import pytest
from layer_testing import filler, make_blob

import netlite
from netlite.layers.split import SplitLayer

SHAPE = (2, 3, 6, 5)


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
@pytest.mark.parametrize("k", [1, 3])
def test_backward_sums_the_fan_out(bottom, dtype, k):
    layer, tops = SplitLayer(), _tops(dtype, k)
    layer.setup([bottom], tops)
    layer.forward([bottom], tops)
    gen = netlite.rng.get_rng()
    diffs = [gen.standard_normal(SHAPE).astype(dtype) for _ in range(k)]
    for t, d in zip(tops, diffs):
        t.diff = d
    bottom.diff[...] = 100.0  # overwritten, not accumulated
    layer.backward(tops, [True], [bottom])
    np.testing.assert_allclose(bottom.diff, sum(diffs), rtol=1e-6, atol=1e-6)


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


def test_propagate_down_false(bottom, dtype):
    layer, tops = SplitLayer(), _tops(dtype)
    layer.setup([bottom], tops)
    layer.forward([bottom], tops)
    for t in tops:
        t.diff[...] = 1.0
    bottom.diff[...] = 8.0
    layer.backward(tops, [False], [bottom])
    assert np.all(bottom.diff == 8.0)


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
    np.testing.assert_allclose(net.blobs["x"].diff, expected, rtol=1e-5, atol=1e-6)
