"""Convolution: ports of Caffe's test_convolution_layer.cpp (the 15
non-cuDNN tests), with the dilated tests' unfilled (all-zero) bottoms
fixed; the standard tests of the harness over the layer's parameters
(groups, padding, strides, dilation, rectangular kernels, 0-D to 3-D,
the channel axis, several bottoms, no bias); then the Numba engine's
column reuse, the loss weight, parameter errors and reshapes."""

import naive
import numpy as np
import pytest
from layer_test_case import LayerTestCase
from layer_testing import (
    assert_close,
    filler,
    make_blob,
    requires_numba,
    run_engine,
    tolerance,
)

import netlite
from netlite import Blob, GradientChecker, LayerSetupError, ShapeError
from netlite.layers.convolution import ConvolutionLayer


class TestConvolutionLayer(LayerTestCase):
    """The standard tests, with Gaussian weights and bias, for every
    geometry the layer supports; the Numba engine's parity runs on each
    (2-D kernels; 0-D and 1-D through unit axes; 3-D and
    ``force_nd_im2col`` through the reference).  ``weights_only`` asks for
    no bottom diff (``grad_bottoms = []``): the parity then covers the
    Numba backward that computes the parameter diffs alone.  The forward
    and contract tests run on both engines."""

    shape, num_output, kernel = (2, 3, 5, 4), 2, (3, 3)
    stride = pad = dilation = None
    group, bias, axis, hw, extra = 1, True, 1, False, ""
    cases = {
        "default": {"stride": (2, 2)},
        "two_bottoms": {"shape": (1, 2, 4, 3), "kernel": (2, 2), "tops": 2},
        "no_bias": {"shape": (2, 3, 4, 4), "bias": False},
        "rect_dilated_group": {"shape": (1, 2, 5, 4), "group": 2,
                               "kernel": (3, 2), "stride": (2, 1), "pad": (2, 1),
                               "dilation": (2, 3), "hw": True},
        "group": {"shape": (1, 3, 4, 3), "num_output": 3, "group": 3,
                  "kernel": (2, 2), "stride": (2, 2), "pad": (1, 1)},
        "1x1": {"shape": (2, 3, 3, 2), "kernel": (1, 1)},
        "pad_exceeds_kernel": {"shape": (1, 2, 3, 4), "kernel": (2, 2),
                               "stride": (2, 2), "pad": (3, 3)},
        "0d": {"shape": (2, 3, 4), "num_output": 3, "kernel": (), "axis": 2},
        "1d": {"shape": (2, 3, 9), "kernel": (3,), "stride": (2,), "pad": (1,),
               "dilation": (2,)},
        "3d": {"shape": (1, 2, 4, 3, 3), "kernel": (2, 2, 2), "stride": (2, 2, 2),
               "pad": (1, 1, 1)},
        "axis2": {"shape": (1, 2, 2, 4, 3), "axis": 2, "stride": (2, 2),
                  "pad": (1, 1)},
        "axis_neg": {"shape": (2, 2, 3, 5), "axis": -2, "kernel": (2,)},
        "force_nd": {"shape": (1, 2, 4, 4), "extra": "force_nd_im2col: true"},
        "weights_only": {"stride": (2, 2), "tops": 2, "grad_bottoms": []},
    }

    @property
    def layer(self):
        fields = [f"num_output: {self.num_output}", f"group: {self.group}",
                  f"axis: {self.axis}", f"bias_term: {str(self.bias).lower()}",
                  self.extra]
        for name, values in (("kernel", self.kernel), ("stride", self.stride),
                             ("pad", self.pad), ("dilation", self.dilation)):
            if values is None:
                continue
            if self.hw and name != "dilation":
                fields.append(f"{name}_h: {values[0]} {name}_w: {values[1]}")
            else:
                key = "kernel_size" if name == "kernel" else name
                fields.extend(f"{key}: {v}" for v in values)
        return ('type: "Convolution" convolution_param { ' + " ".join(fields)
                + ' weight_filler { type: "gaussian" }'
                ' bias_filler { type: "gaussian" } }')

    @property
    def bottoms(self):
        return [(self.shape, filler("gaussian"))] * self.tops

    def oracle(self, bottoms, blobs):
        bias = blobs[1] if self.bias else None
        return [naive.convolution(x, blobs[0], bias, self.stride, self.pad,
                                  self.dilation, self.group, self.axis)
                for x in bottoms]

REPEATED = ("kernel_size", "stride", "pad", "dilation")


def conv_layer(num_output=4, weight=None, bias=None, name="conv", **fields):
    """A Convolution layer; ``weight``/``bias`` are filler type strings or
    FillerParameters; repeated fields accept an int or a list."""
    param = netlite.io.LayerParameter(name=name, type="Convolution")
    cp = param.convolution_param
    cp.num_output = num_output
    for key, value in fields.items():
        if key in REPEATED:
            getattr(cp, key).extend([value] if np.isscalar(value) else value)
        else:
            setattr(cp, key, value)
    for target, spec in ((cp.weight_filler, weight), (cp.bias_filler, bias)):
        if isinstance(spec, str):
            target.type = spec
        elif spec is not None:
            target.CopyFrom(spec)
    return ConvolutionLayer(param)


def spatial(layer, name, default):
    """The per-axis value of a repeated field (Caffe's reference reads it
    the same way: once for every axis)."""
    cp = layer.layer_param.convolution_param
    values = list(getattr(cp, name))
    n = layer.num_spatial_axes
    return tuple(values) if len(values) == n else ((values or [default])[0],) * n


def reference_top(layer, bottom):
    """Caffe's ``caffe_conv`` (``naive.convolution``, float64) with
    ``layer``'s parameters and weights."""
    bias = layer.blobs[1].data if layer.bias_term else None
    return naive.convolution(bottom.data.astype(np.float64),
                             layer.blobs[0].data.astype(np.float64), bias,
                             spatial(layer, "stride", 1), spatial(layer, "pad", 0),
                             spatial(layer, "dilation", 1), layer.group)


def assert_near(actual, expected, tol=1e-4):
    """gtest's EXPECT_NEAR with Caffe's 1e-4."""
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol)


def assert_parity(actual, desired, dtype):
    """Engine agreement within the parity tolerance, its absolute part
    scaled by the largest magnitude (``assert_close``): a sum of K products
    cancels to values near 0 whose rounding error still scales with the
    size of the terms (~eps * sqrt(K) times their magnitude), not with the
    result."""
    assert_close(actual, desired, "parity", dtype)


@pytest.fixture
def bottoms(dtype):
    """Caffe's fixture: two (2, 3, 6, 4) Gaussian bottoms."""
    return [make_blob((2, 3, 6, 4), dtype, filler("gaussian")) for _ in range(2)]


def tops_for(bottoms, dtype):
    return [Blob(dtype=dtype) for _ in bottoms]


def refill(blobs, shape):
    """Reshape and refill with a Gaussian.  Upstream's dilated tests only
    reshape, so their bottoms grow into fresh, all-zero memory."""
    for b in blobs:
        b.reshape(shape)
        netlite.fillers.get_filler(filler("gaussian")).fill(b)


def check_against_reference(layer, bottoms, tops):
    layer.setup(bottoms, tops)
    layer.forward(bottoms, tops)
    for b, t in zip(bottoms, tops):
        assert np.abs(b.data).max() > 0  # the inputs are not all zero
        assert_near(t.data, reference_top(layer, b))


# ---------------------------------------------------------------- Caffe ports
def test_setup(bottoms, dtype):
    tops = tops_for(bottoms, dtype)
    conv_layer(4, kernel_size=3, stride=2).setup(bottoms, tops)
    assert [t.shape for t in tops] == [(2, 4, 2, 1)] * 2
    # Groups do not change the shape.
    conv_layer(3, kernel_size=3, stride=2, group=3).setup(bottoms, tops)
    assert [t.shape for t in tops] == [(2, 3, 2, 1)] * 2


def test_simple_convolution(bottoms, dtype):
    layer = conv_layer(4, "gaussian", filler("constant", value=0.1),
                       kernel_size=3, stride=2)
    check_against_reference(layer, bottoms, tops_for(bottoms, dtype))


def test_dilated_convolution(bottoms, dtype):
    refill(bottoms, (2, 3, 8, 7))
    layer = conv_layer(4, "gaussian", filler("constant", value=0.1),
                       kernel_size=3, dilation=2)
    check_against_reference(layer, bottoms, tops_for(bottoms, dtype))


def test_0d_convolution(bottoms, dtype):
    bottom, top = bottoms[0], Blob(dtype=dtype)
    layer = conv_layer(3, "gaussian", "gaussian", axis=3)
    layer.setup([bottom], [top])
    assert top.shape == (2, 3, 6, 3)
    layer.forward([bottom], [top])
    weight, bias = layer.blobs[0].data, layer.blobs[1].data
    assert weight.shape == (3, 4)
    x = bottom.data.reshape(-1, 4).astype(np.float64)
    expected = x @ weight.T.astype(np.float64) + bias
    assert_near(top.data.reshape(-1, 3), expected)


def test_simple_3d_convolution(bottoms, dtype):
    refill(bottoms, (2, 3, 5, 6, 4))
    layer = conv_layer(4, "gaussian", "gaussian", kernel_size=3, stride=2)
    check_against_reference(layer, bottoms, tops_for(bottoms, dtype))


def test_dilated_3d_convolution(bottoms, dtype):
    refill(bottoms, (2, 3, 6, 7, 8))
    layer = conv_layer(4, "gaussian", "gaussian", kernel_size=3, dilation=2)
    check_against_reference(layer, bottoms, tops_for(bottoms, dtype))


def test_1x1_convolution(bottoms, dtype):
    layer = conv_layer(4, "gaussian", filler("constant", value=0.1),
                       kernel_size=1, stride=1)
    check_against_reference(layer, bottoms[:1], [Blob(dtype=dtype)])


def test_simple_convolution_group(bottoms, dtype):
    layer = conv_layer(3, "gaussian", filler("constant", value=0.1),
                       kernel_size=3, stride=2, group=3)
    check_against_reference(layer, bottoms[:1], [Blob(dtype=dtype)])


def preset_weights(layer, shape, values, dtype):
    blob = Blob(shape, dtype=dtype)
    blob.data[...] = np.broadcast_to(values, shape)
    layer.blobs = [blob]


def test_sobel_convolution(bottoms, dtype):
    """The Sobel x-gradient as one 3x3 filter equals a [1 2 1]^T column
    filter (stride_h 2) followed by a [-1 0 1] row filter (stride_w 2)."""
    bottom, bottom_2 = bottoms
    bottom_2.copy_from(bottom)
    top, top_2 = Blob(dtype=dtype), Blob(dtype=dtype)
    sobel = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    layer = conv_layer(1, kernel_size=3, stride=2, bias_term=False)
    preset_weights(layer, (1, 3, 3, 3), sobel, dtype)
    layer.setup([bottom], [top])
    layer.forward([bottom], [top])

    layer = conv_layer(1, kernel_h=3, kernel_w=1, stride_h=2, stride_w=1,
                       bias_term=False)
    preset_weights(layer, (1, 3, 3, 1), np.array([1, 2, 1])[:, None], dtype)
    layer.setup([bottom_2], [top_2])
    layer.forward([bottom_2], [top_2])
    blob_sep = Blob(dtype=dtype)
    blob_sep.copy_from(top_2, reshape=True)

    layer = conv_layer(1, kernel_h=1, kernel_w=3, stride_h=1, stride_w=2,
                       bias_term=False)
    preset_weights(layer, (1, 1, 1, 3), [-1, 0, 1], dtype)
    layer.setup([blob_sep], [top_2])
    layer.forward([blob_sep], [top_2])
    assert top.shape == top_2.shape == (2, 1, 2, 1)
    assert_near(top.data, top_2.data)


@requires_numba()
def test_nd_against_2d(dtype):
    """The numba engine's 2-D kernels against the N-D reference path that
    ``force_nd_im2col`` selects: forward, bottom and weight diffs.  Caffe
    asks for bit equality; the two paths group their sums differently
    (one GEMM over the batch vs one per image), so they agree to
    PARITY_TOL."""
    shape = (15, 18, 22, 26)
    x = make_blob(shape, dtype, filler("gaussian")).data.copy()
    factory = lambda force: lambda: conv_layer(  # noqa: E731
        12, "gaussian", bias_term=False, group=6, kernel_h=11, kernel_w=13,
        force_nd_im2col=force)
    gen = np.random.default_rng(1701)
    dy = [gen.standard_normal((15, 12, 12, 14))]
    res_2d = run_engine("numba", factory(False), [x], dy, dtype=dtype)
    res_nd = run_engine("numba", factory(True), [x], dy, dtype=dtype)
    for a, b in zip(sum(res_2d, []), sum(res_nd, [])):
        assert_parity(b, a, dtype)


GRADIENT_CASES = {
    # name: (bottom shape or None for the fixture, number of bottoms, fields)
    "gradient": (None, 2, {"kernel_size": 3, "stride": 2}),
    "dilated_gradient": ((2, 3, 5, 6), 1, {"kernel_size": 3, "dilation": 2}),
    "gradient_3d": ((2, 3, 5, 6, 4), 1, {"kernel_size": 3, "stride": 2}),
    "1x1_gradient": (None, 2, {"kernel_size": 1, "stride": 1}),
    "gradient_group": (None, 1, {"kernel_size": 3, "stride": 2, "group": 3}),
}


@pytest.mark.parametrize("case", list(GRADIENT_CASES))
def test_gradient(case, bottoms, dtype):
    shape, count, fields = GRADIENT_CASES[case]
    bottoms = bottoms[:count]
    if shape is not None:
        refill(bottoms, shape)
    num_output = 3 if "group" in fields else 2
    layer = conv_layer(num_output, "gaussian", "gaussian", **fields)
    checker = GradientChecker(1e-2, 1e-3)
    checker.check_gradient_exhaustive(layer, bottoms, tops_for(bottoms, dtype))


# ------------------------------------------------------ beyond Caffe's tests
ENGINES = ["numpy", pytest.param("numba", marks=requires_numba())]


@pytest.mark.parametrize("engine", ENGINES)
def test_propagate_down_flags(bottoms, dtype, engine):
    netlite.set_cpu_engine(engine)
    layer = conv_layer(2, "gaussian", "gaussian", kernel_size=3)
    tops = tops_for(bottoms, dtype)
    layer.setup(bottoms, tops)
    layer.forward(bottoms, tops)
    for t in tops:
        t.diff[...] = 1
    layer.set_param_propagate_down(0, False)
    layer.blobs[0].diff[...] = 5
    layer.blobs[1].diff[...] = 0
    bottoms[0].diff[...] = 7
    layer.backward(tops, [False, True], bottoms)
    np.testing.assert_array_equal(layer.blobs[0].diff, 5)
    # A sum of ones, N * OH * OW per top times 2 tops: exact in both dtypes.
    np.testing.assert_array_equal(layer.blobs[1].diff, 2 * 2 * 4 * 2)
    np.testing.assert_array_equal(bottoms[0].diff, 7)
    assert np.abs(bottoms[1].diff).max() > 0


def test_second_setup_keeps_blobs(bottoms, dtype):
    layer = conv_layer(4, "gaussian", "gaussian", kernel_size=3)
    layer.setup(bottoms[:1], [Blob(dtype=dtype)])
    weights = layer.blobs[0]
    before = weights.data.copy()
    layer.setup(bottoms[:1], [Blob(dtype=dtype)])
    assert layer.blobs[0] is weights
    np.testing.assert_array_equal(weights.data, before)


def test_default_fillers_are_zero(bottoms, dtype):
    layer = conv_layer(4, kernel_size=3)
    layer.setup(bottoms[:1], [Blob(dtype=dtype)])
    assert not layer.blobs[0].data.any() and not layer.blobs[1].data.any()


def test_loss_weight_returns_weighted_sum(bottoms, dtype):
    param = conv_layer(2, "gaussian", kernel_size=3).layer_param
    param.loss_weight.append(2.0)
    layer = ConvolutionLayer(param)
    top = Blob(dtype=dtype)
    layer.setup(bottoms[:1], [top])
    loss = layer.forward(bottoms[:1], [top])
    # The layer's dot product runs in its dtype; the sum here in float64.
    expected = 2 * float(np.sum(top.data, dtype=np.float64))
    tol = tolerance("oracle", dtype)
    assert loss == pytest.approx(expected, rel=tol["rtol"], abs=tol["atol"])


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({}, LayerSetupError, "kernel_size or kernel_h"),
        ({"kernel_size": [3, 3, 3]}, LayerSetupError, "once per spatial"),
        ({"kernel_size": 3, "kernel_h": 3, "kernel_w": 3}, LayerSetupError,
         "not both"),
        ({"kernel_h": 3}, LayerSetupError, "both kernel_h and kernel_w"),
        ({"kernel_size": 0}, LayerSetupError, "kernel dimensions"),
        ({"kernel_size": 3, "stride": 0}, LayerSetupError, "stride dimensions"),
        ({"kernel_size": 3, "stride_h": 1}, LayerSetupError, "stride dimensions"),
        ({"kernel_size": 3, "dilation": [1, 1, 1]}, LayerSetupError,
         "once per spatial"),
        ({"kernel_size": 3, "group": 2}, LayerSetupError, "groups"),
        ({"kernel_size": 3, "num_output": 0}, LayerSetupError, "num_output"),
        ({"kernel_size": 3, "num_output": 5, "group": 3}, LayerSetupError,
         "multiple of group"),
        ({"kernel_size": 3, "axis": 4}, LayerSetupError, "axis"),
        ({"kernel_size": 7}, ShapeError, "kernel extent"),
        ({"kernel_size": 3, "dilation": 3}, ShapeError, "kernel extent"),
    ],
)
def test_bad_parameters(bottoms, dtype, fields, error, message):
    fields = dict(fields)
    num_output = fields.pop("num_output", 3)
    with pytest.raises(error, match=message) as info:
        conv_layer(num_output, **fields).setup(bottoms[:1], [Blob(dtype=dtype)])
    assert "Convolution layer 'conv'" in str(info.value)


def test_kernel_h_needs_2d(dtype):
    bottom = make_blob((2, 3, 5, 6, 4), dtype, filler("gaussian"))
    with pytest.raises(LayerSetupError, match="2-D"):
        conv_layer(2, kernel_h=3, kernel_w=3).setup([bottom], [Blob(dtype=dtype)])


def test_given_blobs_must_fit(bottoms, dtype):
    layer = conv_layer(4, kernel_size=3)
    layer.blobs = [Blob((4, 3, 3, 2), dtype=dtype), Blob((4,), dtype=dtype)]
    with pytest.raises(ShapeError, match="incorrect weight shape"):
        layer.setup(bottoms[:1], [Blob(dtype=dtype)])
    layer = conv_layer(4, kernel_size=3)
    layer.blobs = [Blob((4, 3, 3, 3), dtype=dtype)]
    with pytest.raises(LayerSetupError, match="expected 2 parameter blob"):
        layer.setup(bottoms[:1], [Blob(dtype=dtype)])


def test_reshape_checks(bottoms, dtype):
    layer = conv_layer(2, kernel_size=3)
    tops = tops_for(bottoms, dtype)
    bottoms[1].reshape(2, 3, 6, 5)
    with pytest.raises(ShapeError, match="bottom\\[1\\]"):
        layer.setup(bottoms, tops)
    layer = conv_layer(2, kernel_size=3)
    layer.setup(bottoms[:1], tops[:1])
    bottoms[0].reshape(2, 4, 6, 4)
    with pytest.raises(ShapeError, match="channels"):
        layer.forward(bottoms[:1], tops[:1])
    bottoms[0].reshape(2, 3, 6, 4, 1)
    with pytest.raises(ShapeError, match="axes"):
        layer.forward(bottoms[:1], tops[:1])


def test_forward_follows_bottom_reshape(bottoms, dtype):
    layer = conv_layer(2, "gaussian", "gaussian", kernel_size=3, pad=1)
    top = Blob(dtype=dtype)
    layer.setup(bottoms[:1], [top])
    refill(bottoms[:1], (3, 3, 5, 7))
    layer.forward(bottoms[:1], [top])
    assert top.shape == (3, 2, 5, 7)
    assert_close(top.data, reference_top(layer, bottoms[0]), "oracle", dtype)


# -------------------------------------------------------------- numba


@requires_numba()
def test_numba_backward_twice_after_one_forward(bottoms, dtype):
    """The numba backward reuses the forward's im2col columns for the weight
    gradient and then overwrites them with the columns' gradient; a second
    backward of the same forward must rebuild them, and then gives exactly
    twice the parameter diffs (they accumulate)."""
    netlite.set_cpu_engine("numba")
    layer = conv_layer(2, "gaussian", "gaussian", kernel_size=3)
    top = Blob(dtype=dtype)
    layer.setup(bottoms[:1], [top])
    layer.forward(bottoms[:1], [top])
    top.diff[...] = 1
    for p in layer.blobs:
        p.diff[...] = 0
    layer.backward([top], [True], bottoms[:1])
    once = [p.diff.copy() for p in layer.blobs]
    layer.backward([top], [True], bottoms[:1])
    for p, first in zip(layer.blobs, once):
        assert np.any(first != 0)
        np.testing.assert_array_equal(p.diff, 2 * first)
