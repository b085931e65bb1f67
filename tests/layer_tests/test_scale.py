"""Scale: the standard tests (LayerTestCase) for a learned scale in every
shape regime, a scale from bottom[1] and the bias term; ports of Caffe's
test_scale_layer.cpp; then in-place use, the internal Bias layer, stored
blobs and shape errors; happynear's min_value / max_value clamp, a fixed
scale through lr_mult 0, and the L2-softmax / NormFace scale bounds."""

import math

import naive
import numpy as np
import pytest
from layer_test_case import LayerTestCase
from layer_testing import assert_close, filler, make_blob, requires_numba

import netlite
from netlite import Blob, GradientChecker, LayerSetupError, ShapeError
from netlite.layers.scale import (
    ScaleLayer,
    l2_softmax_alpha_low,
    normface_loss_bound,
    normface_min_scale,
)


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
    clamp = ""
    cases = {
        "learned": {},
        "learned_eltwise": {"axis": 0, "num_axes": -1},
        "learned_outer_1": {"axis": 0, "num_axes": 2},
        "learned_middle": {"axis": 1, "num_axes": 2},
        "learned_end": {"axis": -2, "num_axes": 2},
        "learned_scalar": {"axis": 2, "num_axes": 0},
        "learned_bias": {"axis": 1, "num_axes": 2, "bias_term": True},
        "learned_scalar_bias": {"num_axes": 0, "bias_term": True},
        # The clamp runs but no value reaches a bound (an active bound
        # makes the finite differences one-sided; see the clamp tests).
        "learned_clamp_inactive": {"clamp": "min_value: -50 max_value: 50"},
        "bottom_eltwise": {"axis": 0, "operand": (2, 3, 2, 2)},
        "bottom_begin": {"axis": 0, "operand": (2, 3)},
        "bottom_middle": {"axis": 1, "operand": (3, 2)},
        "bottom_end": {"axis": 2, "operand": (2, 2)},
        "bottom_scalar": {"axis": 2, "operand": ()},
        "bottom_bias": {"axis": 1, "operand": (3, 2), "bias_term": True},
        # Above PARALLEL_MIN_ELEMENTS (the threaded kernels); parity only.
        "large_scalar": {"shape": (64, 1000), "axis": 0, "num_axes": 0},
        "large_rows_bias": {"shape": (64, 1000), "axis": 1, "bias_term": True},
        "large_rows_clamp": {"shape": (64, 1000), "axis": 1,
                             "clamp": "min_value: -0.5 max_value: 0.5"},
        "large_runs": {"shape": (64, 8, 128), "axis": 1},
        "large_bottom_scalar": {"shape": (64, 1000), "axis": 0, "operand": ()},
        "large_bottom_runs": {"shape": (64, 8, 128), "axis": 0, "operand": (64,)},
        "large_bottom_eltwise": {"shape": (64, 1000), "axis": 0,
                                 "operand": (64, 1000)},
    }

    def applies(self, test_name, case):
        if case.startswith("large") and not test_name.startswith("test_engine_parity"):
            return False
        return super().applies(test_name, case)

    @property
    def layer(self):
        return (
            f'type: "Scale" scale_param {{ axis: {self.axis} '
            f"num_axes: {self.num_axes} bias_term: {str(self.bias_term).lower()} "
            f"{self.clamp} "
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


# ------------------------------------------- happynear: min_value / max_value
def clamped_scale(min_value=None, max_value=None, num_axes=0, value=10.0):
    """NormFace's cosine scale: a learned scalar, filler value 10."""
    param = netlite.io.LayerParameter(name="cosine_scale", type="Scale")
    sp = param.scale_param
    sp.num_axes = num_axes
    sp.filler.value = value
    if min_value is not None:
        sp.min_value = min_value
    if max_value is not None:
        sp.max_value = max_value
    return ScaleLayer(param)


def test_min_value_clamps_the_stored_scale_in_place(f):
    # NormFace: min_value 0.01.  A scale driven below it by an update is
    # raised to 0.01 in the blob itself on the next forward.
    layer = clamped_scale(min_value=0.01)
    layer.setup([f.bottom], [f.top])
    np.testing.assert_array_equal(layer.blobs[0].data, 10)
    layer.blobs[0].data[...] = -3
    layer.forward([f.bottom], [f.top])
    lo = float(np.float32(0.01))
    np.testing.assert_array_equal(layer.blobs[0].data, np.asarray(lo, f.dtype))
    expect_near(f.top.data, f.bottom.data * np.asarray(lo, f.dtype))


def test_max_value_and_both_bounds(f):
    layer = clamped_scale(min_value=0.5, max_value=2.0, num_axes=1)
    layer.setup([f.bottom], [f.top])
    layer.blobs[0].data[...] = [-1.0, 1.5, 7.0]
    layer.forward([f.bottom], [f.top])
    np.testing.assert_array_equal(layer.blobs[0].data, [0.5, 1.5, 2.0])
    expect_near(f.top.data,
                f.bottom.data * np.array([0.5, 1.5, 2.0]).reshape(1, 3, 1, 1))


def test_clamped_scale_diff_is_the_plain_gradient(f):
    # The gradient is taken at the clamped value, like any scale: ds =
    # sum g x, dx = g s_clamped (the clamp itself is a projection step,
    # not differentiated: happynear's backward is the plain Scale one).
    layer = clamped_scale(max_value=2.0)
    layer.setup([f.bottom], [f.top])
    layer.forward([f.bottom], [f.top])
    dy = gaussian_top_diff(f.bottom.shape, f.dtype)
    f.top.diff[...] = dy
    layer.backward([f.top], [True], [f.bottom])
    g = dy.astype(np.float64)
    assert_close(layer.blobs[0].diff, (g * f.bottom.data).sum(), "oracle", f.dtype)
    assert_close(f.bottom.diff, 2.0 * g, "oracle", f.dtype)


@pytest.mark.parametrize("bounds, match", [
    ({"min_value": 2.0, "max_value": 1.0}, r"min_value \(2.0\) is larger"),
    ({"min_value": float("nan")}, "must be finite"),
    ({"max_value": float("inf")}, "must be finite"),
])
def test_bad_clamp_bounds(f, bounds, match):
    with pytest.raises(LayerSetupError, match="Scale layer 'cosine_scale'.*" + match):
        clamped_scale(**bounds).setup([f.bottom], [f.top])


def test_clamp_refused_with_a_bottom_scale(f):
    param = netlite.io.LayerParameter(name="s", type="Scale")
    param.scale_param.axis = 0
    param.scale_param.min_value = 0.01
    with pytest.raises(LayerSetupError, match="Scale layer 's'.*learned scale"):
        ScaleLayer(param).setup([f.bottom, f.eltwise], [f.top])


# --------------------------------------------- L2-softmax: a fixed alpha
FIXED_SCALE_SOLVER = """
type: 'SGD' base_lr: 0.1 momentum: 0.9 weight_decay: 0.1 lr_policy: 'fixed'
max_iter: 3 random_seed: 3
net_param {
  layer { name: 'data' type: 'DummyData' top: 'x' top: 't'
          dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 }
                             data_filler { type: 'gaussian' } } }
  layer { name: 'norm' type: 'Normalize' bottom: 'x' top: 'xn' }
  layer { name: 'alpha' type: 'Scale' bottom: 'xn' top: 'f'
          %s
          scale_param { num_axes: 0 filler { value: 16 } } }
  layer { name: 'fc' type: 'InnerProduct' bottom: 'f' top: 'y'
          inner_product_param { num_output: 2 weight_filler { type: 'gaussian' } } }
  layer { name: 'loss' type: 'EuclideanLoss' bottom: 'y' bottom: 't' top: 'loss' }
}
"""


@pytest.mark.parametrize("fixed", [True, False])
def test_lr_mult_zero_keeps_alpha_fixed_under_solver_steps(dtype, fixed):
    # L2-softmax's fixed alpha: param { lr_mult: 0 decay_mult: 0 } leaves
    # the scale at its filler value through SGD steps with momentum and
    # weight decay, while the other weights learn; without it alpha moves.
    spec = "param { lr_mult: 0 decay_mult: 0 }" if fixed else ""
    solver = netlite.get_solver(FIXED_SCALE_SOLVER % spec, dtype=dtype)
    before = {name: [p.data.copy() for p in params]
              for name, params in solver.net.params.items()}
    solver.step(3)
    alpha = solver.net.params["alpha"][0].data
    assert (np.all(alpha == 16)) == fixed
    assert not np.array_equal(solver.net.params["fc"][0].data, before["fc"][0])


# ------------------------------------------------- the scale bounds
@pytest.mark.parametrize("num_classes, p, expected", [
    (10, 0.9, 4.28), (10, 0.99, 6.67), (10, 0.999, 8.99),
    (10575, 0.9, 11.46), (10575, 0.99, 13.86), (10575, 0.999, 16.17),
    (58207, 0.9, 13.17), (58207, 0.99, 15.57), (58207, 0.999, 17.88),
])
def test_l2_softmax_alpha_low_table(num_classes, p, expected):
    # The table of docs/layers/scale.md section 9 (margin-losses.md 5.3).
    assert round(l2_softmax_alpha_low(num_classes, p), 2) == expected


def test_l2_softmax_alpha_low_is_where_p_is_reached():
    # At alpha_low the true-class probability, with the e^{-alpha} term
    # kept, is just below p; dropping it gives exactly p.
    c, p = 10, 0.9
    a = l2_softmax_alpha_low(c, p)
    exact = math.exp(a) / (math.exp(a) + (c - 2) + math.exp(-a))
    dropped = math.exp(a) / (math.exp(a) + (c - 2))
    assert exact < p and dropped == pytest.approx(p, rel=1e-12)


@pytest.mark.parametrize("s, expected", [
    (1, 1.377), (2, 0.681), (4, 0.100), (5, 0.034), (8, 1.2e-3), (10, 1.3e-4),
])
def test_normface_loss_bound_table(s, expected):
    # The simplex row of docs/layers/scale.md section 9 (C = 10).
    assert normface_loss_bound(10, s) == pytest.approx(expected, rel=5e-3, abs=5e-4)


def test_normface_bound_is_reached_by_a_simplex():
    # C = 4 class vectors of a regular simplex in R^3, features on them:
    # the softmax loss at scale s equals the bound.
    w = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) / math.sqrt(3)
    for s in (1.0, 3.0, 8.0):
        z = s * w @ w.T
        loss = np.mean(np.log(np.exp(z).sum(axis=1)) - np.diag(z))
        assert loss == pytest.approx(normface_loss_bound(4, s), rel=1e-12)
        assert normface_min_scale(4, normface_loss_bound(4, s)) == pytest.approx(s)


@pytest.mark.parametrize("call", [
    lambda: l2_softmax_alpha_low(2, 0.9), lambda: l2_softmax_alpha_low(10, 1.0),
    lambda: normface_loss_bound(1, 3.0), lambda: normface_loss_bound(10, -1.0),
    lambda: normface_min_scale(10, 0.0), lambda: normface_min_scale(10, 3.0),
])
def test_bound_arguments_checked(call):
    with pytest.raises(ValueError, match="needs num_classes"):
        call()


# ------------------------------------------------------------ Numba engine
def _in_place_run(engine, text, x, operand, dy, dtype):
    """Forward and backward in place on ``engine``: y, dx and the scale's
    (and bias's) diffs; a learned scale's diff starts at 0.5 (it must
    accumulate)."""
    netlite.set_cpu_engine(engine)
    netlite.set_random_seed(1701)
    layer = netlite.create_layer(f'name: "s" type: "Scale" {text}', dtype=dtype)
    xb = make_blob(x.shape, dtype, x)
    bottom = [xb] if operand is None else [xb, make_blob(operand.shape, dtype, operand)]
    layer.setup(bottom, [xb])
    layer.forward(bottom, [xb])
    y = xb.data.copy()
    for p in layer.blobs:
        p.diff[...] = 0.5
    xb.diff[...] = dy
    layer.backward([xb], [True] * len(bottom), bottom)
    return [y, xb.diff.copy()] + [b.diff.copy() for b in bottom[1:]] + [
        p.diff.copy() for p in layer.blobs]


@requires_numba()
@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("text, operand", [
    ('scale_param { num_axes: 0 filler { type: "gaussian" } }', None),
    ('scale_param { axis: 1 bias_term: true filler { type: "gaussian" } '
     'bias_filler { type: "gaussian" } }', None),
    ('scale_param { axis: 1 min_value: -0.5 max_value: 0.5 '
     'filler { type: "gaussian" } }', None),
    ("scale_param { axis: 0 }", "scalar"),
    ("scale_param { axis: 0 }", "outer"),
], ids=["learned_scalar", "rows_bias", "rows_clamp", "bottom_scalar", "bottom_runs"])
def test_numba_in_place_matches_numpy(dtype, size, text, operand):
    # In place the adapter keeps its own copy of x for the scale gradient;
    # y and dx are the reference's products bit for bit, the scale diff a
    # float64-accumulated sum (parity tolerance).
    shape = (4, 6, 5) if size == "small" else (64, 8, 128)
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    if operand == "scalar":
        operand = np.array(rng.standard_normal())
    elif operand == "outer":
        operand = rng.standard_normal(shape[:1])
    ref = _in_place_run("numpy", text, x, operand, dy, dtype)
    got = _in_place_run("numba", text, x, operand, dy, dtype)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
    assert len(got) == len(ref) > 2
    for j, (a, b) in enumerate(zip(ref[2:], got[2:])):
        assert_close(b, a, "parity", dtype, f"diff {j}")
