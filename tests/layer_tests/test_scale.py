"""Scale: the standard tests (LayerTestCase) for a learned scale in every
shape regime, a scale from bottom[1] and the bias term; ports of Caffe's
test_scale_layer.cpp; then in-place use, the internal Bias layer, stored
blobs and shape errors."""

import naive
import numpy as np
import pytest
from layer_test_case import LayerTestCase
from layer_testing import filler, make_blob

import netlite
from netlite import Blob, GradientChecker, LayerSetupError, ShapeError
from netlite.layers.scale import ScaleLayer


class TestScaleLayer(LayerTestCase):
    """The standard tests: forward against ``naive.scale``, the exhaustive
    float64 gradient (x, the scale from bottom[1] or the learned one, the
    bias), propagate_down, accumulated parameter diffs (the learned scale's
    diff accumulates in the element-wise and outer = 1 regimes too, where
    Caffe overwrites it), overwritten bottom diffs.  The layer is bilinear:
    no kink.

    ``operand`` is None for a learned scale (``num_axes`` from ``axis``),
    else the shape of bottom[1]."""

    shape, axis, num_axes, operand, bias_term = (2, 3, 2, 2), 1, 1, None, False
    cases = {
        "learned": {},
        "learned_eltwise": {"axis": 0, "num_axes": -1},
        "learned_outer_1": {"axis": 0, "num_axes": 2},
        "learned_middle": {"axis": 1, "num_axes": 2},
        "learned_end": {"axis": -2, "num_axes": 2},
        "learned_scalar": {"axis": 2, "num_axes": 0},
        "learned_bias": {"axis": 1, "num_axes": 2, "bias_term": True},
        "learned_scalar_bias": {"num_axes": 0, "bias_term": True},
        "bottom_eltwise": {"axis": 0, "operand": (2, 3, 2, 2)},
        "bottom_begin": {"axis": 0, "operand": (2, 3)},
        "bottom_middle": {"axis": 1, "operand": (3, 2)},
        "bottom_end": {"axis": 2, "operand": (2, 2)},
        "bottom_scalar": {"axis": 2, "operand": ()},
        "bottom_bias": {"axis": 1, "operand": (3, 2), "bias_term": True},
    }

    @property
    def layer(self):
        return (
            f'type: "Scale" scale_param {{ axis: {self.axis} '
            f"num_axes: {self.num_axes} bias_term: {str(self.bias_term).lower()} "
            'filler { type: "gaussian" } bias_filler { type: "gaussian" } }'
        )

    @property
    def bottoms(self):
        x = [(self.shape, filler("gaussian"))]
        if self.operand is None:
            return x
        return x + [(self.operand, filler("gaussian"))]

    def oracle(self, bottoms, blobs):
        # Section 1's blob order: [s, b] learned, [b] with bottom[1].
        if self.operand is None:
            s, *rest = blobs
            axis = self.axis % len(self.shape)
            end = len(self.shape) if self.num_axes == -1 else axis + self.num_axes
            assert s.shape == self.shape[axis:end]
        else:
            s, rest = bottoms[1], blobs
        b = rest[0] if self.bias_term else None
        assert len(rest) == int(self.bias_term)
        assert b is None or b.shape == s.shape
        return [naive.scale(bottoms[0], s, b, self.axis)]


class Fixture:
    """Caffe's ScaleLayerTest fixture: seed 1701, every blob U[1, 10]."""

    def __init__(self, dtype):
        netlite.set_random_seed(1701)
        fill = filler("uniform", min=1, max=10)
        self.dtype = dtype
        self.bottom = make_blob((2, 3, 4, 5), dtype, fill)
        self.eltwise = make_blob((2, 3, 4, 5), dtype, fill)
        self.broadcast_0 = make_blob((2, 3), dtype, fill)
        self.broadcast_1 = make_blob((3, 4), dtype, fill)
        self.broadcast_2 = make_blob((4, 5), dtype, fill)
        self.scale = make_blob((), dtype, fill)  # a 0-axis scalar
        self.top = Blob(dtype=dtype)


@pytest.fixture
def f(dtype):
    return Fixture(dtype)


def scale_layer(axis=None, num_axes=None, filler_type=None, bias_filler=None,
                name="scale"):
    """A Scale layer; ``bias_filler`` (a filler type) turns on bias_term."""
    param = netlite.io.LayerParameter(name=name, type="Scale")
    sp = param.scale_param
    if axis is not None:
        sp.axis = axis
    if num_axes is not None:
        sp.num_axes = num_axes
    if filler_type is not None:
        sp.filler.type = filler_type
    if bias_filler is not None:
        sp.bias_term = True
        sp.bias_filler.type = bias_filler
    return ScaleLayer(param)


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


def checker():
    return GradientChecker(1e-2, 1e-3)


# ---------------------------------------------------------------- Caffe ports
def test_forward_eltwise(f):
    data = forward(scale_layer(axis=0), [f.bottom, f.eltwise], f.top)
    expect_near(data, f.bottom.data * f.eltwise.data)


def test_forward_eltwise_in_place(f):
    orig = f.bottom.data.copy()
    layer = scale_layer(axis=0)
    layer.setup([f.bottom, f.eltwise], [f.bottom])
    layer.forward([f.bottom, f.eltwise], [f.bottom])
    expect_near(f.bottom.data, orig * f.eltwise.data)


def _backward_in_place_matches(f, operand, axis):
    layer = scale_layer(axis=axis)
    top_diff = gaussian_top_diff(f.bottom.shape, f.dtype)
    bottom = [f.bottom, operand]
    layer.setup(bottom, [f.top])
    layer.forward(bottom, [f.top])
    f.top.diff[...] = top_diff
    layer.backward([f.top], [True, True], bottom)
    orig_bottom_diff = f.bottom.diff.copy()
    orig_scale_diff = operand.diff.copy()
    # Again in place: the top diff goes into the bottom's diff, and the
    # layer must use its saved copy of x for the scale gradient.
    layer.forward(bottom, [f.bottom])
    f.bottom.diff[...] = top_diff
    layer.backward([f.bottom], [True, True], bottom)
    expect_near(f.bottom.diff, orig_bottom_diff)
    expect_near(operand.diff, orig_scale_diff)
    assert np.any(orig_scale_diff != 0)


def test_backward_eltwise_in_place(f):
    _backward_in_place_matches(f, f.eltwise, axis=0)


def test_forward_eltwise_with_param(f):
    layer = scale_layer(axis=0, num_axes=-1, filler_type="gaussian")
    data = forward(layer, [f.bottom], f.top)
    assert layer.blobs[0].shape == (2, 3, 4, 5)
    expect_near(data, f.bottom.data * layer.blobs[0].data)


def test_forward_broadcast_begin(f):
    data = forward(scale_layer(axis=0), [f.bottom, f.broadcast_0], f.top)
    expect_near(data, f.bottom.data * f.broadcast_0.data[:, :, None, None])


def test_forward_broadcast_middle(f):
    data = forward(scale_layer(axis=1), [f.bottom, f.broadcast_1], f.top)
    expect_near(data, f.bottom.data * f.broadcast_1.data[None, :, :, None])


def test_forward_broadcast_middle_in_place(f):
    orig = f.bottom.data.copy()
    layer = scale_layer(axis=1)
    layer.setup([f.bottom, f.broadcast_1], [f.bottom])
    layer.forward([f.bottom, f.broadcast_1], [f.bottom])
    expect_near(f.bottom.data, orig * f.broadcast_1.data[None, :, :, None])


def test_backward_broadcast_middle_in_place(f):
    _backward_in_place_matches(f, f.broadcast_1, axis=1)


def test_forward_broadcast_middle_with_param(f):
    layer = scale_layer(axis=1, num_axes=2, filler_type="gaussian")
    data = forward(layer, [f.bottom], f.top)
    assert layer.blobs[0].shape == (3, 4)
    expect_near(data, f.bottom.data * layer.blobs[0].data[None, :, :, None])


def test_forward_broadcast_middle_with_param_and_bias(f):
    layer = scale_layer(axis=1, num_axes=2, filler_type="gaussian",
                        bias_filler="gaussian")
    data = forward(layer, [f.bottom], f.top)
    assert [b.shape for b in layer.blobs] == [(3, 4), (3, 4)]
    s = layer.blobs[0].data[None, :, :, None]
    b = layer.blobs[1].data[None, :, :, None]
    expect_near(data, f.bottom.data * s + b)


def test_forward_broadcast_end(f):
    data = forward(scale_layer(axis=2), [f.bottom, f.broadcast_2], f.top)
    expect_near(data, f.bottom.data * f.broadcast_2.data[None, None])


def test_forward_scale(f):
    data = forward(scale_layer(), [f.bottom, f.scale], f.top)
    expect_near(data, f.bottom.data * f.scale.data)


def test_forward_scale_axis_2(f):
    data = forward(scale_layer(axis=2), [f.bottom, f.scale], f.top)
    expect_near(data, f.bottom.data * f.scale.data)


def test_gradient_eltwise(f):
    checker().check_gradient_eltwise(scale_layer(axis=0), [f.bottom, f.eltwise],
                                     [f.top])


def test_gradient_eltwise_with_param(f):
    layer = scale_layer(axis=0, num_axes=-1, filler_type="gaussian")
    checker().check_gradient_exhaustive(layer, [f.bottom], [f.top])


def test_gradient_broadcast_begin(f):
    checker().check_gradient_exhaustive(
        scale_layer(axis=0), [f.bottom, f.broadcast_0], [f.top]
    )


def test_gradient_broadcast_middle(f):
    checker().check_gradient_exhaustive(
        scale_layer(axis=1), [f.bottom, f.broadcast_1], [f.top]
    )


def test_gradient_broadcast_middle_with_param_upstream(f):
    # Caffe's TestGradientBroadcastMiddleWithParam also passes bottom[1], so
    # num_axes and the filler are ignored and no parameter exists: it repeats
    # TestGradientBroadcastMiddle.  Ported as written; see the next test.
    layer = scale_layer(axis=1, num_axes=2, filler_type="gaussian")
    checker().check_gradient_exhaustive(layer, [f.bottom, f.broadcast_1], [f.top])
    assert layer.blobs == []


def test_gradient_broadcast_end(f):
    checker().check_gradient_exhaustive(
        scale_layer(axis=2), [f.bottom, f.broadcast_2], [f.top]
    )


def test_gradient_scale(f):
    checker().check_gradient_exhaustive(scale_layer(), [f.bottom, f.scale], [f.top])


def test_gradient_scale_and_bias(f):
    layer = scale_layer(bias_filler="gaussian")
    checker().check_gradient_exhaustive(layer, [f.bottom, f.scale], [f.top])
    # num_axes of the bias = bottom[1].num_axes = 0: a scalar parameter.
    assert [b.shape for b in layer.blobs] == [()]


def test_gradient_scale_axis_2(f):
    checker().check_gradient_exhaustive(
        scale_layer(axis=2), [f.bottom, f.scale], [f.top]
    )


# ------------------------------------------------------------ netlite extras
def test_default_filler_is_one(f):
    layer = scale_layer()
    data = forward(layer, [f.bottom], f.top)
    assert layer.blobs[0].shape == (3,)
    np.testing.assert_array_equal(layer.blobs[0].data, np.ones(3))
    np.testing.assert_array_equal(data, f.bottom.data)


def test_in_place_with_param_and_bias_matches_out_of_place(f):
    layer = scale_layer(axis=1, num_axes=2, filler_type="gaussian",
                        bias_filler="gaussian")
    dy = gaussian_top_diff(f.bottom.shape, f.dtype)
    forward(layer, [f.bottom], f.top)
    f.top.diff[...] = dy
    layer.backward([f.top], [True], [f.bottom])
    expected_top = f.top.data.copy()
    expected = [f.bottom.diff.copy()] + [b.diff.copy() for b in layer.blobs]
    for blob in layer.blobs:
        blob.diff[...] = 0
    layer.forward([f.bottom], [f.bottom])
    # The same operations on the same values in the same order, in either
    # dtype: in place must equal out of place bit for bit.
    np.testing.assert_array_equal(f.bottom.data, expected_top)
    f.bottom.diff[...] = dy
    layer.backward([f.bottom], [True], [f.bottom])
    for actual, wanted in zip([f.bottom.diff] + [b.diff for b in layer.blobs],
                              expected):
        np.testing.assert_array_equal(actual, wanted)


def test_internal_bias_layer_shares_the_bias_blob(f):
    param = netlite.io.parse_layer_param(
        'name: "sc" type: "Scale" loss_weight: 2 param { lr_mult: 1 } '
        'param { lr_mult: 2 } scale_param { axis: 1 num_axes: 1 bias_term: true '
        'bias_filler { type: "gaussian" } }'
    )
    layer = ScaleLayer(param)
    forward(layer, [f.bottom], f.top)
    assert layer.bias_layer.blobs[0] is layer.blobs[1]
    assert layer.bias_layer.loss(0) == 0.0
    assert not layer.bias_layer.layer_param.param
    # Second setup: same blobs, and the internal layer still shares them.
    blobs = list(layer.blobs)
    layer.setup([f.bottom], [f.top])
    assert all(a is b for a, b in zip(layer.blobs, blobs))
    assert layer.bias_layer.blobs[0] is layer.blobs[1]


def test_bias_param_propagate_down(f):
    layer = scale_layer(axis=1, bias_filler="gaussian")
    forward(layer, [f.bottom], f.top)
    f.top.diff[...] = 1.0
    layer.param_propagate_down = [True, False]
    layer.backward([f.top], [False], [f.bottom])
    assert not layer.blobs[1].diff.any()
    assert layer.blobs[0].diff.any()
    layer.param_propagate_down = [False, True]
    layer.blobs[0].diff[...] = 0
    layer.backward([f.top], [False], [f.bottom])
    assert not layer.blobs[0].diff.any()
    np.testing.assert_array_equal(layer.blobs[1].diff, np.full(3, 40.0))


def test_loaded_blobs_are_used(f):
    param = netlite.io.parse_layer_param(
        'name: "sc" type: "Scale" scale_param { axis: 1 bias_term: true '
        'filler { type: "gaussian" } bias_filler { type: "gaussian" } }'
    )
    for values in ([2.0, 3.0, 4.0], [-1.0, 0.0, 1.0]):
        blob = param.blobs.add()
        blob.shape.dim.append(3)
        blob.data.extend(values)
    state = netlite.rng.get_state()
    layer = ScaleLayer(param)
    data = forward(layer, [f.bottom], f.top)
    assert netlite.rng.get_state() == state  # nothing was drawn
    s = np.array([2.0, 3.0, 4.0], f.dtype)[None, :, None, None]
    b = np.array([-1.0, 0.0, 1.0], f.dtype)[None, :, None, None]
    # One product and one sum per element, rounded in the blob's dtype as
    # here: bit for bit.
    np.testing.assert_array_equal(data, f.bottom.data * s + b)


def test_too_many_loaded_blobs(f):
    param = netlite.io.parse_layer_param('name: "sc" type: "Scale"')
    for _ in range(2):
        param.blobs.add().shape.dim.append(3)
        param.blobs[-1].data.extend([1.0] * 3)
    with pytest.raises(LayerSetupError, match="Scale layer 'sc'.*got 2"):
        ScaleLayer(param).setup([f.bottom], [f.top])


def test_loaded_scale_shape_is_checked(f):
    param = netlite.io.parse_layer_param('name: "sc" type: "Scale"')
    param.blobs.add().shape.dim.append(4)
    param.blobs[0].data.extend([1.0] * 4)
    with pytest.raises(ShapeError, match=r"Scale layer 'sc'.*\(4,\)"):
        ScaleLayer(param).setup([f.bottom], [f.top])


def test_bottom_scale_shape_mismatch(f):
    layer = scale_layer(axis=1, name="s1")
    with pytest.raises(ShapeError, match=r"Scale layer 's1'.*\(2, 3\).*\(3, 4\)"):
        layer.setup([f.bottom, f.broadcast_0], [f.top])


@pytest.mark.parametrize(
    "axis, num_axes, match",
    [(1, -2, "num_axes"), (2, 3, "would cover axes"), (-5, 1, "axis")],
)
def test_bad_learned_shape(f, axis, num_axes, match):
    with pytest.raises(LayerSetupError, match=match):
        scale_layer(axis=axis, num_axes=num_axes).setup([f.bottom], [f.top])
