"""Tests for the Flatten layer (port of test_flatten_layer.cpp)."""

import naive
import numpy as np
import pytest
from layer_test_case import LayerTestCase
from layer_testing import assert_close, filler, make_blob

import netlite
from netlite import fillers
from netlite.layers.flatten import FlattenLayer
from netlite.layers.reshape import ReshapeLayer

SHAPE = (2, 3, 6, 5)


class TestFlattenLayer(LayerTestCase):
    """The standard tests for Caffe's axis ranges and the inserted unit
    axis (``end_axis = axis - 1``).  The top's diff is an alias of the
    bottom's, so ``propagate_down`` cannot be honoured (as in Caffe): the
    harness checks the alias instead (``aliases_diff``)."""

    aliases_diff = True
    bottoms = [((2, 3, 4, 2), filler("gaussian"))]
    axis, end_axis = 1, -1
    cases = {"default": {}, "axis": {"axis": 2}, "end_axis": {"end_axis": -2},
             "start_and_end": {"axis": 0, "end_axis": -2},
             "unit_axis": {"axis": 2, "end_axis": 1}}

    @property
    def layer(self):
        return (f'type: "Flatten" flatten_param {{ axis: {self.axis} '
                f'end_axis: {self.end_axis} }}')

    def oracle(self, bottoms, blobs):
        return [naive.flatten(bottoms[0], self.axis, self.end_axis)]



@pytest.fixture
def bottom(dtype):
    # Caffe's FlattenLayerTest fixture: (2, 3, 6, 5), Gaussian, seed 1701.
    return make_blob(SHAPE, dtype, filler("gaussian"))


def _setup(bottom, text=""):
    layer, top = FlattenLayer(text), netlite.Blob(dtype=bottom.dtype)
    layer.setup([bottom], [top])
    return layer, top


# ----------------------------------------------------------- Caffe's tests
def test_setup(bottom):
    _, top = _setup(bottom)
    assert top.shape == (2, 3 * 6 * 5)


def test_setup_with_axis(bottom):
    _, top = _setup(bottom, "flatten_param { axis: 2 }")
    assert top.shape == (2, 3, 6 * 5)


def test_setup_with_end_axis(bottom):
    _, top = _setup(bottom, "flatten_param { end_axis: -2 }")
    assert top.shape == (2, 3 * 6, 5)


def test_setup_with_start_and_end_axis(bottom):
    _, top = _setup(bottom, "flatten_param { axis: 0 end_axis: -2 }")
    assert top.shape == (2 * 3 * 6, 5)


def test_forward(bottom):
    layer, top = _setup(bottom)
    layer.forward([bottom], [top])
    for c in range(3 * 6 * 5):
        for n in range(2):
            assert top.data[n, c] == bottom.data[n, c // 30, (c // 5) % 6, c % 5]


def test_gradient(bottom, dtype):
    checker = netlite.GradientChecker(1e-2, 1e-2)
    top = netlite.Blob(dtype=dtype)
    checker.check_gradient_eltwise(FlattenLayer(), [bottom], [top])


# ------------------------------------------------------------ beyond Caffe
def test_end_axis_before_axis_inserts_a_unit_axis(bottom):
    # Caffe computes count(axis, end_axis + 1), which is 1 for an empty range.
    _, top = _setup(bottom, "flatten_param { axis: 2 end_axis: 1 }")
    assert top.shape == (2, 3, 1, 6, 5)
    with pytest.raises(netlite.LayerSetupError, match="Flatten.*end_axis"):
        _setup(bottom, "flatten_param { axis: 3 end_axis: 1 }")


def test_bad_axes(bottom, dtype):
    with pytest.raises(netlite.LayerSetupError, match="Flatten.*axis 4"):
        _setup(bottom, "flatten_param { axis: 4 }")
    with pytest.raises(netlite.LayerSetupError, match="Flatten"):
        _setup(bottom, "flatten_param { end_axis: -5 }")
    # The default axis 1 needs at least two axes.
    with pytest.raises(netlite.LayerSetupError, match="Flatten"):
        _setup(make_blob((7,), dtype))


def test_in_place_is_an_error(bottom):
    with pytest.raises(netlite.LayerSetupError, match="Flatten.*in-place"):
        FlattenLayer().setup([bottom], [bottom])


def test_no_copy_top_aliases_bottom(bottom):
    layer, top = _setup(bottom)
    layer.forward([bottom], [top])
    assert top.shares_data_with(bottom) and top.shares_diff_with(bottom)
    bottom.data[1, 2, 3, 4] = 42.0
    assert top.data[1, 2 * 30 + 3 * 5 + 4] == 42.0
    top.diff[...] = 0
    top.diff[0, 7] = 3.0
    layer.backward([top], [True], [bottom])
    assert bottom.diff[0, 0, 1, 2] == 3.0 and bottom.diff.sum() == 3.0


def test_reshape_cycles_keep_the_alias(dtype):
    # Grow, shrink and grow the batch (forcing reallocations of either
    # blob); after every forward/backward the top must read the bottom's
    # current data and the bottom's diff must be the top's diff.
    bottom = make_blob((2, 3, 4), dtype, filler("gaussian"))
    layer, top = _setup(bottom)
    gaussian = fillers.get_filler(filler("gaussian"))
    for n in (2, 5, 1, 3, 9, 2):
        bottom.reshape((n, 3, 4))
        gaussian.fill(bottom)
        layer.forward([bottom], [top])
        assert top.shape == (n, 12)
        np.testing.assert_array_equal(top.data, bottom.data.reshape(n, 12))
        dy = netlite.rng.get_rng().standard_normal((n, 12)).astype(dtype)
        top.diff = dy
        layer.backward([top], [True], [bottom])
        np.testing.assert_array_equal(bottom.diff, dy.reshape(n, 3, 4))


@pytest.mark.parametrize("first", ["Reshape", "Flatten"])
def test_chained_with_another_aliasing_layer(dtype, first):
    # Caffe's Flatten makes the *bottom* share the top's diff in Backward;
    # after a Reshape layer (whose top aliases its bottom's diff) that cuts
    # the Reshape's bottom off from the gradient.  netlite aliases top to
    # bottom at reshape time, so the chain stays connected.
    x = make_blob((2, 3, 4), dtype, filler("gaussian"))
    mid, y = netlite.Blob(dtype=dtype), netlite.Blob(dtype=dtype)
    if first == "Reshape":
        head = ReshapeLayer("reshape_param { shape { dim: 0 dim: 4 dim: 3 } }")
    else:
        head = FlattenLayer("flatten_param { axis: 1 end_axis: 1 }")
    tail = FlattenLayer()
    head.setup([x], [mid])
    tail.setup([mid], [y])
    for step in range(3):
        head.forward([x], [mid])
        tail.forward([mid], [y])
        np.testing.assert_array_equal(y.data, x.data.reshape(2, 12))
        dy = netlite.rng.get_rng().standard_normal((2, 12)).astype(dtype)
        y.diff = dy
        tail.backward([y], [True], [mid])
        head.backward([mid], [True], [x])
        np.testing.assert_array_equal(x.diff, dy.reshape(2, 3, 4), err_msg=str(step))


def test_in_a_net(dtype):
    net = netlite.Net(
        """
        force_backward: true
        layer { name: "in" type: "Input" top: "x" top: "t"
                input_param { shape { dim: 2 dim: 3 dim: 2 } shape { dim: 2 dim: 6 } } }
        layer { name: "flat" type: "Flatten" bottom: "x" top: "flat" }
        layer { name: "loss" type: "EuclideanLoss" bottom: "flat" bottom: "t"
                top: "loss" }
        """,
        dtype=dtype,
    )
    gen = netlite.rng.get_rng()
    for n in (2, 4, 1):
        x, t = gen.standard_normal((n, 3, 2)), gen.standard_normal((n, 6))
        net.forward(x=x, t=t)
        net.backward()
        expected = (x.reshape(n, 6) - t) / n
        assert_close(net.blobs["x"].diff, expected.reshape(n, 3, 2), "oracle",
                     dtype)
