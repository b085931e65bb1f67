"""Scale: ports of Caffe's test_scale_layer.cpp, plus a real "with param"
broadcast gradient check, the always-accumulate rule for the learned scale's
diff (a deliberate deviation from Caffe), the internal Bias layer and shape
errors."""

import numpy as np
import pytest
from layer_testing import filler, make_blob

import netlite
from netlite import Blob, GradientChecker, LayerSetupError, ShapeError
from netlite.layers.scale import ScaleLayer


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


def test_gradient_broadcast_middle_with_param(f):
    layer = scale_layer(axis=1, num_axes=2, filler_type="gaussian")
    checker().check_gradient_exhaustive(layer, [f.bottom], [f.top])
    assert layer.blobs[0].shape == (3, 4)


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
def test_gradient_broadcast_middle_with_param_and_bias(f):
    layer = scale_layer(axis=1, num_axes=2, filler_type="gaussian",
                        bias_filler="gaussian")
    checker().check_gradient_exhaustive(layer, [f.bottom], [f.top])


def test_gradient_learned_scalar(f):
    layer = scale_layer(axis=2, num_axes=0, filler_type="gaussian")
    checker().check_gradient_exhaustive(layer, [f.bottom], [f.top])
    assert layer.blobs[0].shape == ()


def test_default_filler_is_one(f):
    layer = scale_layer()
    data = forward(layer, [f.bottom], f.top)
    assert layer.blobs[0].shape == (3,)
    np.testing.assert_array_equal(layer.blobs[0].data, np.ones(3))
    np.testing.assert_array_equal(data, f.bottom.data)


@pytest.mark.parametrize(
    "axis, num_axes, shape, case",
    [
        (0, -1, (2, 3, 4, 5), "element-wise (Caffe overwrites)"),
        (0, 2, (2, 3), "outer_dim == 1 (Caffe overwrites)"),
        (1, 2, (3, 4), "outer_dim > 1"),
        (2, 0, (), "scalar"),
    ],
)
def test_learned_scale_diff_accumulates(f, axis, num_axes, shape, case):
    layer = scale_layer(axis=axis, num_axes=num_axes, filler_type="gaussian")
    forward(layer, [f.bottom], f.top)
    assert layer.blobs[0].shape == shape
    dy = gaussian_top_diff(f.bottom.shape, f.dtype)
    f.top.diff[...] = dy
    prior = np.linspace(-1, 1, layer.blobs[0].count).reshape(shape)
    layer.blobs[0].diff[...] = prior
    layer.backward([f.top], [True], [f.bottom])
    keep = tuple(range(axis, axis + len(shape))) if shape else ()
    reduce_axes = tuple(a for a in range(4) if a not in keep)
    grad = (dy.astype(np.float64) * f.bottom.data).sum(axis=reduce_axes)
    tol = {"rtol": 1e-5, "atol": 1e-4}
    np.testing.assert_allclose(layer.blobs[0].diff, prior + grad.reshape(shape),
                               **tol, err_msg=case)
    layer.backward([f.top], [True], [f.bottom])
    np.testing.assert_allclose(layer.blobs[0].diff,
                               prior + 2 * grad.reshape(shape), **tol, err_msg=case)


def test_bottom_scale_diff_is_overwritten(f):
    layer = scale_layer(axis=0)
    bottom = [f.bottom, f.eltwise]
    forward(layer, bottom, f.top)
    f.top.diff[...] = gaussian_top_diff(f.bottom.shape, f.dtype)
    f.eltwise.diff[...] = 100.0
    f.bottom.diff[...] = 100.0
    layer.backward([f.top], [True, True], bottom)
    expect_near(f.eltwise.diff, f.top.diff * f.bottom.data, tol=1e-4)
    expect_near(f.bottom.diff, f.top.diff * f.eltwise.data, tol=1e-4)


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
    expect_near(f.bottom.data, expected_top)
    f.bottom.diff[...] = dy
    layer.backward([f.bottom], [True], [f.bottom])
    for actual, wanted in zip([f.bottom.diff] + [b.diff for b in layer.blobs],
                              expected):
        expect_near(actual, wanted, tol=1e-4)


def test_bias_with_two_bottoms(f):
    layer = scale_layer(axis=1, bias_filler="gaussian")
    data = forward(layer, [f.bottom, f.broadcast_1], f.top)
    assert [b.shape for b in layer.blobs] == [(3, 4)]
    expected = (f.bottom.data * f.broadcast_1.data[None, :, :, None]
                + layer.blobs[0].data[None, :, :, None])
    expect_near(data, expected, tol=1e-4)
    checker().check_gradient_exhaustive(layer, [f.bottom, f.broadcast_1], [f.top])


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
    s = np.array([2.0, 3.0, 4.0])[None, :, None, None]
    b = np.array([-1.0, 0.0, 1.0])[None, :, None, None]
    expect_near(data, f.bottom.data * s + b, tol=1e-4)


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
