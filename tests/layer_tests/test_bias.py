"""Bias: the standard tests (LayerTestCase) for a learned bias in every
shape regime and a bias from bottom[1]; ports of Caffe's
test_bias_layer.cpp; then the default filler, stored blobs and shape
errors."""

import naive
import numpy as np
import pytest
from layer_test_case import LayerTestCase
from layer_testing import filler, make_blob

import netlite
from netlite import Blob, GradientChecker, LayerSetupError, ShapeError
from netlite.layers.bias import BiasLayer


class TestBiasLayer(LayerTestCase):
    """The standard tests: forward against ``naive.bias``, the exhaustive
    float64 gradient (x, and the bias from bottom[1] or the learned one),
    propagate_down, accumulated parameter diffs, overwritten bottom diffs.
    The layer is linear: no kink.

    ``operand`` is None for a learned bias (``num_axes`` from ``axis``),
    else the shape of bottom[1]."""

    shape, axis, num_axes, operand = (2, 3, 2, 2), 1, 1, None
    cases = {
        "learned": {},
        "learned_eltwise": {"axis": 0, "num_axes": -1},
        "learned_outer_1": {"axis": 0, "num_axes": 2},
        "learned_middle": {"axis": 1, "num_axes": 2},
        "learned_end": {"axis": -2, "num_axes": 2},
        "learned_scalar": {"axis": 3, "num_axes": 0},
        "bottom_eltwise": {"axis": 0, "operand": (2, 3, 2, 2)},
        "bottom_begin": {"axis": 0, "operand": (2, 3)},
        "bottom_middle": {"axis": 1, "operand": (3, 2)},
        "bottom_end": {"axis": 2, "operand": (2, 2)},
        "bottom_scalar": {"axis": 2, "operand": ()},
    }

    @property
    def layer(self):
        return (
            f'type: "Bias" bias_param {{ axis: {self.axis} '
            f'num_axes: {self.num_axes} filler {{ type: "gaussian" }} }}'
        )

    @property
    def bottoms(self):
        x = [(self.shape, filler("gaussian"))]
        if self.operand is None:
            return x
        return x + [(self.operand, filler("gaussian"))]

    def oracle(self, bottoms, blobs):
        if self.operand is None:
            (b,) = blobs
            axis = self.axis % len(self.shape)
            end = len(self.shape) if self.num_axes == -1 else axis + self.num_axes
            assert b.shape == self.shape[axis:end]
        else:
            assert not blobs  # the bias is bottom[1]: no parameter blob
            b = bottoms[1]
        return [naive.bias(bottoms[0], b, self.axis)]


class Fixture:
    """Caffe's BiasLayerTest fixture: seed 1701, every blob U[1, 10]."""

    def __init__(self, dtype):
        netlite.set_random_seed(1701)
        fill = filler("uniform", min=1, max=10)
        self.dtype = dtype
        self.bottom = make_blob((2, 3, 4, 5), dtype, fill)
        self.eltwise = make_blob((2, 3, 4, 5), dtype, fill)
        self.broadcast_0 = make_blob((2, 3), dtype, fill)
        self.broadcast_1 = make_blob((3, 4), dtype, fill)
        self.broadcast_2 = make_blob((4, 5), dtype, fill)
        self.bias = make_blob((), dtype, fill)  # a 0-axis scalar
        self.top = Blob(dtype=dtype)


@pytest.fixture
def f(dtype):
    return Fixture(dtype)


def bias_layer(axis=None, num_axes=None, filler_type=None, name="bias"):
    param = netlite.io.LayerParameter(name=name, type="Bias")
    bp = param.bias_param
    if axis is not None:
        bp.axis = axis
    if num_axes is not None:
        bp.num_axes = num_axes
    if filler_type is not None:
        bp.filler.type = filler_type
    return BiasLayer(param)


def expect_near(actual, expected, tol=1e-5):
    """gtest's EXPECT_NEAR, element-wise."""
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol)


def gaussian_top_diff(shape, dtype):
    return make_blob(shape, dtype, filler("gaussian", std=1)).data.copy()


def forward(layer, bottom, top):
    layer.setup(bottom, [top])
    assert top.shape == bottom[0].shape
    layer.forward(bottom, [top])
    return top.data


# ---------------------------------------------------------------- Caffe ports
def test_forward_eltwise(f):
    data = forward(bias_layer(axis=0), [f.bottom, f.eltwise], f.top)
    expect_near(data, f.bottom.data + f.eltwise.data)


def test_forward_eltwise_in_place(f):
    orig = f.bottom.data.copy()
    layer = bias_layer(axis=0)
    layer.setup([f.bottom, f.eltwise], [f.bottom])
    layer.forward([f.bottom, f.eltwise], [f.bottom])
    expect_near(f.bottom.data, orig + f.eltwise.data)


def _backward_in_place_matches(f, operand, axis):
    layer = bias_layer(axis=axis)
    top_diff = gaussian_top_diff(f.bottom.shape, f.dtype)
    bottom = [f.bottom, operand]
    layer.setup(bottom, [f.top])
    layer.forward(bottom, [f.top])
    f.top.diff[...] = top_diff
    layer.backward([f.top], [True, True], bottom)
    orig_bottom_diff = f.bottom.diff.copy()
    orig_bias_diff = operand.diff.copy()
    # Again in place: the top diff goes into the bottom's diff.
    layer.forward(bottom, [f.bottom])
    f.bottom.diff[...] = top_diff
    layer.backward([f.bottom], [True, True], bottom)
    expect_near(f.bottom.diff, orig_bottom_diff)
    expect_near(operand.diff, orig_bias_diff)
    assert np.any(orig_bias_diff != 0)


def test_backward_eltwise_in_place(f):
    _backward_in_place_matches(f, f.eltwise, axis=0)


def test_forward_eltwise_with_param(f):
    layer = bias_layer(axis=0, num_axes=-1, filler_type="gaussian")
    data = forward(layer, [f.bottom], f.top)
    assert layer.blobs[0].shape == (2, 3, 4, 5)
    expect_near(data, f.bottom.data + layer.blobs[0].data)


def test_forward_broadcast_begin(f):
    data = forward(bias_layer(axis=0), [f.bottom, f.broadcast_0], f.top)
    expect_near(data, f.bottom.data + f.broadcast_0.data[:, :, None, None])


def test_forward_broadcast_middle(f):
    data = forward(bias_layer(axis=1), [f.bottom, f.broadcast_1], f.top)
    expect_near(data, f.bottom.data + f.broadcast_1.data[None, :, :, None])


def test_forward_broadcast_middle_in_place(f):
    orig = f.bottom.data.copy()
    layer = bias_layer(axis=1)
    layer.setup([f.bottom, f.broadcast_1], [f.bottom])
    layer.forward([f.bottom, f.broadcast_1], [f.bottom])
    expect_near(f.bottom.data, orig + f.broadcast_1.data[None, :, :, None])


def test_backward_broadcast_middle_in_place(f):
    _backward_in_place_matches(f, f.broadcast_1, axis=1)


def test_forward_broadcast_middle_with_param(f):
    layer = bias_layer(axis=1, num_axes=2, filler_type="gaussian")
    data = forward(layer, [f.bottom], f.top)
    assert layer.blobs[0].shape == (3, 4)
    expect_near(data, f.bottom.data + layer.blobs[0].data[None, :, :, None])


def test_forward_broadcast_end(f):
    data = forward(bias_layer(axis=2), [f.bottom, f.broadcast_2], f.top)
    expect_near(data, f.bottom.data + f.broadcast_2.data[None, None])


def test_forward_bias(f):
    data = forward(bias_layer(), [f.bottom, f.bias], f.top)
    expect_near(data, f.bottom.data + f.bias.data)


def test_forward_bias_axis_2(f):
    data = forward(bias_layer(axis=2), [f.bottom, f.bias], f.top)
    expect_near(data, f.bottom.data + f.bias.data)


def test_gradient_eltwise(f):
    GradientChecker(1e-2, 1e-3).check_gradient_eltwise(
        bias_layer(axis=0), [f.bottom, f.eltwise], [f.top]
    )


def test_gradient_eltwise_with_param(f):
    layer = bias_layer(axis=0, num_axes=-1, filler_type="gaussian")
    GradientChecker(1e-2, 1e-3).check_gradient_exhaustive(layer, [f.bottom], [f.top])


def test_gradient_broadcast_begin(f):
    GradientChecker(1e-2, 1e-3).check_gradient_exhaustive(
        bias_layer(axis=0), [f.bottom, f.broadcast_0], [f.top]
    )


def test_gradient_broadcast_middle(f):
    GradientChecker(1e-2, 1e-3).check_gradient_exhaustive(
        bias_layer(axis=1), [f.bottom, f.broadcast_1], [f.top]
    )


def test_gradient_broadcast_middle_with_param_upstream(f):
    # Caffe's TestGradientBroadcastMiddleWithParam also passes bottom[1], so
    # num_axes and the filler are ignored and no parameter exists: it repeats
    # TestGradientBroadcastMiddle.  Ported as written; see the next test.
    layer = bias_layer(axis=1, num_axes=2, filler_type="gaussian")
    GradientChecker(1e-2, 1e-3).check_gradient_exhaustive(
        layer, [f.bottom, f.broadcast_1], [f.top]
    )
    assert layer.blobs == []


def test_gradient_broadcast_end(f):
    GradientChecker(1e-2, 1e-3).check_gradient_exhaustive(
        bias_layer(axis=2), [f.bottom, f.broadcast_2], [f.top]
    )


def test_gradient_bias(f):
    GradientChecker(1e-2, 1e-3).check_gradient_exhaustive(
        bias_layer(), [f.bottom, f.bias], [f.top]
    )


def test_gradient_bias_axis_2(f):
    GradientChecker(1e-2, 1e-3).check_gradient_exhaustive(
        bias_layer(axis=2), [f.bottom, f.bias], [f.top]
    )


# ------------------------------------------------------------ netlite extras
def test_default_filler_is_zero(f):
    layer = bias_layer()
    forward(layer, [f.bottom], f.top)
    assert layer.blobs[0].shape == (3,)
    assert not layer.blobs[0].data.any()
    np.testing.assert_array_equal(f.top.data, f.bottom.data)


def test_second_setup_keeps_param(f):
    layer = bias_layer(axis=1, filler_type="gaussian")
    forward(layer, [f.bottom], f.top)
    blob, value = layer.blobs[0], layer.blobs[0].data.copy()
    layer.setup([f.bottom], [f.top])
    assert layer.blobs[0] is blob
    np.testing.assert_array_equal(blob.data, value)


def test_bottom_bias_shape_mismatch(f):
    layer = bias_layer(axis=2, name="b1")
    with pytest.raises(ShapeError, match=r"Bias layer 'b1'.*\(3, 4\).*\(4, 5\)"):
        layer.setup([f.bottom, f.broadcast_1], [f.top])


def test_bottom_bias_extends_past_bottom(f):
    layer = bias_layer(axis=3)
    with pytest.raises(ShapeError, match="Bias layer 'bias'"):
        layer.setup([f.bottom, f.broadcast_2], [f.top])


@pytest.mark.parametrize(
    "axis, num_axes, match",
    [(1, -2, "num_axes"), (2, 3, "would cover axes"), (4, 1, "axis")],
)
def test_bad_learned_shape(f, axis, num_axes, match):
    with pytest.raises(LayerSetupError, match=match):
        bias_layer(axis=axis, num_axes=num_axes).setup([f.bottom], [f.top])


def test_loaded_param_shape_is_checked(f):
    param = netlite.io.LayerParameter(name="bias", type="Bias")
    param.blobs.add().shape.dim.extend([4])
    param.blobs[0].data.extend([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ShapeError, match=r"Bias layer 'bias'.*\(4,\)"):
        BiasLayer(param).setup([f.bottom], [f.top])
    param.blobs[0].shape.dim[0] = 3
    del param.blobs[0].data[3]
    layer = BiasLayer(param)
    forward(layer, [f.bottom], f.top)
    # One sum per element, rounded in the blob's dtype as here: bit for bit.
    b = np.array([1, 2, 3], f.dtype)[None, :, None, None]
    np.testing.assert_array_equal(f.top.data, f.bottom.data + b)


def test_two_bottoms_and_param_blobs_is_an_error(f):
    param = netlite.io.LayerParameter(name="bias", type="Bias")
    param.blobs.add().shape.dim.extend([3, 4])
    param.blobs[0].data.extend([0.0] * 12)
    with pytest.raises(LayerSetupError, match="from bottom\\[1\\]"):
        BiasLayer(param).setup([f.bottom, f.broadcast_1], [f.top])
