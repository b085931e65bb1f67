"""Tests for the Reshape layer (port of test_reshape_layer.cpp)."""

import naive
import numpy as np
import pytest
from layer_test_case import LayerTestCase
from layer_testing import assert_close, filler, make_blob

import netlite
from netlite import fillers
from netlite.layers.reshape import ReshapeLayer

SHAPE = (2, 3, 6, 5)


class TestReshapeLayer(LayerTestCase):
    """The standard tests for Caffe's configurations (copied, inferred,
    literal dims; a start axis; inserted singleton axes at the start, in
    the middle and at the end; a flattened middle range).  The top's diff
    is an alias of the bottom's, so ``propagate_down`` cannot be honoured
    (as in Caffe): the harness checks the alias instead
    (``aliases_diff``)."""

    aliases_diff = True
    bottoms = [((2, 3, 4, 2), filler("gaussian"))]
    dims, axis, num_axes = [0, -1, 1, 1], 0, -1
    cases = {
        "flatten": {},
        "copy": {"dims": [0, 0, 0, 0]},
        "infer": {"dims": [0, 4, -1]},
        "literal": {"dims": [6, 2, 4]},
        "start_axis": {"dims": [4, -1], "axis": 1},
        "insert_start": {"dims": [1, 1], "num_axes": 0},
        "insert_middle": {"dims": [1, 1], "axis": 2, "num_axes": 0},
        "insert_end": {"dims": [1, 1], "axis": -1, "num_axes": 0},
        "flatten_middle": {"dims": [-1], "axis": 1, "num_axes": 2},
    }

    @property
    def layer(self):
        return f'type: "Reshape" {_param(self.dims, self.axis, self.num_axes)}'

    def oracle(self, bottoms, blobs):
        return [naive.reshape(bottoms[0], self.dims, self.axis, self.num_axes)]



@pytest.fixture
def bottom(dtype):
    # Caffe's ReshapeLayerTest fixture: (2, 3, 6, 5), Gaussian.
    return make_blob(SHAPE, dtype, filler("gaussian"))


def _param(dims, axis=None, num_axes=None):
    text = "reshape_param { shape { " + " ".join(f"dim: {d}" for d in dims) + " }"
    if axis is not None:
        text += f" axis: {axis}"
    if num_axes is not None:
        text += f" num_axes: {num_axes}"
    return text + " }"


def _setup(bottom, dims, axis=None, num_axes=None):
    layer = ReshapeLayer(_param(dims, axis, num_axes))
    top = netlite.Blob(dtype=bottom.dtype)
    layer.setup([bottom], [top])
    return layer, top


# ----------------------------------------------------------- Caffe's tests
def test_flatten_output_sizes(bottom):
    _, top = _setup(bottom, [0, -1, 1, 1])
    assert top.shape == (2, 3 * 6 * 5, 1, 1)


def test_flatten_values(bottom):
    layer, top = _setup(bottom, [0, -1, 1, 1])
    layer.forward([bottom], [top])
    for c in range(3 * 6 * 5):
        for n in range(2):
            assert top.data[n, c, 0, 0] == bottom.data[n, c // 30, (c // 5) % 6, c % 5]


def test_copy_dimensions(bottom):
    _, top = _setup(bottom, [0, 0, 0, 0])
    assert top.shape == SHAPE


def test_inference_of_unspecified(bottom):
    # Count 180, so the -1 becomes 180 / (2 * 3 * 10) = 3.
    _, top = _setup(bottom, [0, 3, 10, -1])
    assert top.shape == (2, 3, 10, 3)


def test_inference_of_unspecified_with_start_axis(bottom):
    _, top = _setup(bottom, [3, 10, -1], axis=1)
    assert top.shape == (2, 3, 10, 3)


def test_insert_singleton_axes_start(bottom):
    _, top = _setup(bottom, [1, 1, 1], axis=0, num_axes=0)
    assert top.shape == (1, 1, 1, 2, 3, 6, 5)


def test_insert_singleton_axes_middle(bottom):
    _, top = _setup(bottom, [1, 1, 1], axis=2, num_axes=0)
    assert top.shape == (2, 3, 1, 1, 1, 6, 5)


def test_insert_singleton_axes_end(bottom):
    _, top = _setup(bottom, [1, 1, 1], axis=-1, num_axes=0)
    assert top.shape == (2, 3, 6, 5, 1, 1, 1)


def test_flatten_middle(bottom):
    _, top = _setup(bottom, [-1], axis=1, num_axes=2)
    assert top.shape == (2, 3 * 6, 5)


def test_forward(bottom):
    layer, top = _setup(bottom, [6, 2, 3, 5])
    layer.forward([bottom], [top])
    np.testing.assert_array_equal(top.data.ravel(), bottom.data.ravel())


def test_forward_after_reshape(bottom):
    layer, top = _setup(bottom, [6, 2, 3, 5])
    layer.forward([bottom], [top])
    bottom.reshape((2 * 3 * 6 * 5,))
    layer.reshape([bottom], [top])
    fillers.get_filler(filler("gaussian")).fill(bottom)
    layer.forward([bottom], [top])
    assert top.shape == (6, 2, 3, 5)
    np.testing.assert_array_equal(top.data.ravel(), bottom.data)


def test_gradient(bottom, dtype):
    checker = netlite.GradientChecker(1e-2, 1e-2)
    layer = ReshapeLayer(_param([6, 2, 3, 5]))
    checker.check_gradient_eltwise(layer, [bottom], [netlite.Blob(dtype=dtype)])


# ------------------------------------------------------------ beyond Caffe
def test_aliases_data_and_diff(bottom, dtype):
    layer, top = _setup(bottom, [0, -1])
    assert top.shares_data_with(bottom) and top.shares_diff_with(bottom)
    bottom.data[1, 2, 3, 4] = 42.0
    assert top.data[1, 2 * 30 + 3 * 5 + 4] == 42.0
    dy = make_blob(top.shape, dtype, filler("gaussian")).data.copy()
    top.diff = dy
    layer.backward([top], [True], [bottom])
    np.testing.assert_array_equal(bottom.diff, dy.reshape(SHAPE))


def test_batch_change_keeps_the_alias(dtype):
    bottom = make_blob((2, 12), dtype, filler("gaussian"))
    layer, top = _setup(bottom, [0, 3, -1])
    gaussian = fillers.get_filler(filler("gaussian"))
    for n in (2, 7, 1, 9):
        bottom.reshape((n, 12))
        gaussian.fill(bottom)
        layer.forward([bottom], [top])
        assert top.shape == (n, 3, 4)
        np.testing.assert_array_equal(top.data, bottom.data.reshape(n, 3, 4))
        top.diff = np.full((n, 3, 4), float(n))
        layer.backward([top], [True], [bottom])
        assert np.all(bottom.diff == n)


def test_scalar_bottom(dtype):
    x = make_blob((), dtype, 3.0)
    _, top = _setup(x, [1, 1])
    assert top.shape == (1, 1) and top.data[0, 0] == 3.0


@pytest.mark.parametrize(
    "dims, axis, num_axes, error, match",
    [
        ([-1, -1], None, None, netlite.LayerSetupError, "more than one -1"),
        ([2, -2, 3], None, None, netlite.LayerSetupError, "dim -2"),
        ([7, -1], None, None, netlite.ShapeError, "not a multiple"),
        ([7, 3], None, None, netlite.ShapeError, "21 elements"),
        ([0, 0, 0, 0, 0], None, None, netlite.LayerSetupError, "no axis 4"),
        ([1], 5, 0, netlite.LayerSetupError, "axis 5 is out of range"),
        ([1], -6, 0, netlite.LayerSetupError, "axis -6 is out of range"),
        ([-1], 1, -2, netlite.LayerSetupError, "num_axes must be >= 0"),
        ([-1], 2, 3, netlite.LayerSetupError, "out of range"),
    ],
)
def test_errors(bottom, dims, axis, num_axes, error, match):
    with pytest.raises(error, match="Reshape.*" + match):
        _setup(bottom, dims, axis, num_axes)


def test_cannot_infer_next_to_a_zero_dim(dtype):
    x = make_blob((0, 4), dtype)
    with pytest.raises(netlite.ShapeError, match="infer"):
        _setup(x, [0, -1])
    _, top = _setup(x, [0, 2, 2])
    assert top.shape == (0, 2, 2)


def test_in_place_is_an_error(bottom):
    with pytest.raises(netlite.LayerSetupError, match="Reshape.*in-place"):
        ReshapeLayer(_param([-1])).setup([bottom], [bottom])


def test_in_a_net(dtype):
    net = netlite.Net(
        """
        force_backward: true
        layer { name: "in" type: "Input" top: "x" top: "t"
                input_param { shape { dim: 2 dim: 6 } shape { dim: 2 dim: 3 dim: 2 } } }
        layer { name: "r" type: "Reshape" bottom: "x" top: "r"
                reshape_param { shape { dim: 0 dim: -1 dim: 2 } } }
        layer { name: "loss" type: "EuclideanLoss" bottom: "r" bottom: "t"
                top: "loss" }
        """,
        dtype=dtype,
    )
    gen = netlite.rng.get_rng()
    for n in (2, 5):
        x, t = gen.standard_normal((n, 6)), gen.standard_normal((n, 3, 2))
        net.forward(x=x, t=t)
        assert net.blobs["r"].shape == (n, 3, 2)
        net.backward()
        assert_close(net.blobs["x"].diff, (x - t.reshape(n, 6)) / n, "oracle",
                     dtype)
