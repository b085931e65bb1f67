"""InnerProduct: the standard tests (LayerTestCase) for every axis, with and
without transpose and bias; ports of Caffe's test_inner_product_layer.cpp;
then the closed-form backward, shape-mismatch errors, stored weights and a
PyTorch cross-check."""

import naive
import numpy as np
import pytest
from layer_test_case import LayerTestCase
from layer_testing import assert_close, filler, make_blob

import netlite
from netlite import Blob, GradientChecker, LayerSetupError, ShapeError
from netlite.errors import WeightsFileError
from netlite.layers.inner_product import InnerProductLayer


class TestInnerProductLayer(LayerTestCase):
    """The standard tests: forward against ``naive.inner_product`` and the
    exhaustive float64 gradient (bottom, weights and bias), propagate_down,
    accumulated parameter diffs, overwritten bottom diff.  The layer is
    linear in each input: no kink."""

    shape, axis, num_output, transpose, bias_term = (2, 3, 2, 2), 1, 3, False, True
    cases = {
        "default": {},
        "transpose": {"transpose": True},
        "no_bias": {"bias_term": False},
        "no_bias_transpose": {"bias_term": False, "transpose": True},
        "axis_2": {"axis": 2},
        "axis_2_transpose": {"axis": 2, "transpose": True},
        "axis_last": {"axis": -1},
        "axis_0": {"axis": 0, "num_output": 2},
        "axis_neg_3": {"axis": -3, "transpose": True},
    }

    @property
    def layer(self):
        return (
            'type: "InnerProduct" inner_product_param { '
            f"num_output: {self.num_output} axis: {self.axis} "
            f"transpose: {str(self.transpose).lower()} "
            f"bias_term: {str(self.bias_term).lower()} "
            'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }'
        )

    @property
    def bottoms(self):
        return [(self.shape, filler("gaussian"))]

    def oracle(self, bottoms, blobs):
        # The blob layout of section 1: [W] or [W, b], W (N, K) or (K, N).
        w, b = blobs if self.bias_term else (*blobs, None)
        axis = self.axis % len(self.shape)
        k = int(np.prod(self.shape[axis:]))
        n = self.num_output
        assert w.shape == ((k, n) if self.transpose else (n, k))
        return [naive.inner_product(bottoms[0], w, b, axis, self.transpose)]


def ip_layer(num_output=10, transpose=None, weight=None, bias=None, **fields):
    """An InnerProduct layer; ``weight``/``bias`` are filler type strings or
    FillerParameters."""
    param = netlite.io.LayerParameter(name="ip", type="InnerProduct")
    ipp = param.inner_product_param
    ipp.num_output = num_output
    if transpose is not None:
        ipp.transpose = transpose
    for name, value in fields.items():
        setattr(ipp, name, value)
    for target, spec in ((ipp.weight_filler, weight), (ipp.bias_filler, bias)):
        if isinstance(spec, str):
            target.type = spec
        elif spec is not None:
            target.CopyFrom(spec)
    return InnerProductLayer(param)


def uniform_fillers():
    # Caffe's tests: weights U[0, 1], bias U[1, 2].
    return {"weight": "uniform", "bias": filler("uniform", min=1, max=2)}


def gaussian_fillers():
    # Caffe sets min/max on the gaussian bias filler too; they are unused.
    return {"weight": "gaussian", "bias": filler("gaussian", min=1, max=2)}


@pytest.fixture
def bottom(dtype):
    """Caffe's fixture: (2, 3, 4, 5) filled U[0, 1]."""
    return make_blob((2, 3, 4, 5), dtype, filler("uniform"))


@pytest.fixture
def bottom_nobatch(dtype):
    """Caffe's (1, 2, 3, 4) "no batch" bottom, which upstream never fills:
    it stays zero, so TestForwardNoBatch only sees the bias.  Kept as is."""
    return make_blob((1, 2, 3, 4), dtype)


def assert_float_eq(a, b):
    """gtest's EXPECT_FLOAT_EQ: within 4 ulps, compared as float32."""
    np.testing.assert_array_max_ulp(
        np.asarray(a, np.float32), np.asarray(b, np.float32), maxulp=4
    )


def transposed_copy(layer, bottom, top):
    """A transpose=True layer holding ``layer``'s weights transposed."""
    ip_t = ip_layer(transpose=True, **uniform_fillers())
    ip_t.setup([bottom], [top])
    assert ip_t.blobs[0].count == layer.blobs[0].count
    ip_t.blobs[0].data[...] = layer.blobs[0].data.T
    assert ip_t.blobs[1].count == layer.blobs[1].count
    ip_t.blobs[1].data[...] = layer.blobs[1].data
    return ip_t


# ---------------------------------------------------------------- Caffe ports
def test_setup(bottom, dtype):
    top = Blob(dtype=dtype)
    ip_layer().setup([bottom], [top])
    assert (top.num, top.channels, top.height, top.width) == (2, 10, 1, 1)


def test_setup_transpose_false(bottom, dtype):
    top = Blob(dtype=dtype)
    layer = ip_layer(transpose=False)
    layer.setup([bottom], [top])
    assert (top.num, top.channels, top.height, top.width) == (2, 10, 1, 1)
    assert layer.blobs[0].shape == (10, 60)


def test_setup_transpose_true(bottom, dtype):
    top = Blob(dtype=dtype)
    layer = ip_layer(transpose=True)
    layer.setup([bottom], [top])
    assert (top.num, top.channels, top.height, top.width) == (2, 10, 1, 1)
    assert layer.blobs[0].shape == (60, 10)


def test_forward(bottom, dtype):
    top = Blob(dtype=dtype)
    layer = ip_layer(**uniform_fillers())
    layer.setup([bottom], [top])
    layer.forward([bottom], [top])
    assert top.count == 20
    assert np.all(top.data >= 1.0)


def test_forward_transpose(bottom, dtype):
    top = Blob(dtype=dtype)
    layer = ip_layer(transpose=False, **uniform_fillers())
    layer.setup([bottom], [top])
    layer.forward([bottom], [top])
    expected = top.data.copy()
    top_t = Blob(dtype=dtype)
    ip_t = transposed_copy(layer, bottom, top_t)
    ip_t.forward([bottom], [top_t])
    assert top_t.count == expected.size
    assert_float_eq(top_t.data, expected)


def test_forward_no_batch(bottom_nobatch, dtype):
    top = Blob(dtype=dtype)
    layer = ip_layer(**uniform_fillers())
    layer.setup([bottom_nobatch], [top])
    layer.forward([bottom_nobatch], [top])
    assert top.shape == (1, 10)
    assert np.all(top.data >= 1.0)
    # The bottom is zero (see the fixture), so the output is exactly the bias.
    np.testing.assert_array_equal(top.data[0], layer.blobs[1].data)


def test_gradient(bottom, dtype):
    layer = ip_layer(**gaussian_fillers())
    checker = GradientChecker(1e-2, 1e-3)
    checker.check_gradient_exhaustive(layer, [bottom], [Blob(dtype=dtype)])


def test_gradient_transpose(bottom, dtype):
    layer = ip_layer(num_output=11, transpose=True, **gaussian_fillers())
    checker = GradientChecker(1e-2, 1e-3)
    checker.check_gradient_exhaustive(layer, [bottom], [Blob(dtype=dtype)])


def test_backward_transpose(bottom, dtype):
    top = Blob(dtype=dtype)
    layer = ip_layer(transpose=False, **uniform_fillers())
    layer.setup([bottom], [top])
    layer.forward([bottom], [top])
    top_diff = make_blob(top.shape, dtype, filler("uniform"))
    top.diff[...] = top_diff.data
    layer.backward([top], [True], [bottom])
    w_diff = layer.blobs[0].diff.copy()
    bottom_diff = bottom.diff.copy()

    top_t = Blob(dtype=dtype)
    ip_t = transposed_copy(layer, bottom, top_t)
    ip_t.forward([bottom], [top_t])
    top_t.diff[...] = top_diff.data
    ip_t.backward([top_t], [True], [bottom])
    assert np.all(w_diff != 0)
    assert_float_eq(w_diff, ip_t.blobs[0].diff.T)
    assert np.all(bottom_diff != 0)
    assert_float_eq(bottom_diff, bottom.diff)


# ------------------------------------------------------------ netlite extras
@pytest.mark.parametrize("num_output", [None, 0])
def test_num_output_required(bottom, dtype, num_output):
    param = netlite.io.LayerParameter(name="fc", type="InnerProduct")
    if num_output is not None:
        param.inner_product_param.num_output = num_output
    with pytest.raises(LayerSetupError, match="InnerProduct layer 'fc'.*num_output"):
        InnerProductLayer(param).setup([bottom], [Blob(dtype=dtype)])


def test_missing_fillers_start_at_zero(bottom, dtype):
    top = Blob(dtype=dtype)
    layer = ip_layer()
    layer.setup([bottom], [top])
    assert not layer.blobs[0].data.any() and not layer.blobs[1].data.any()


def test_reshape_input_size_mismatch(bottom, dtype):
    top = Blob(dtype=dtype)
    layer = ip_layer(**gaussian_fillers())
    layer.setup([bottom], [top])
    # A different batch size is fine: only K is fixed.
    bottom.reshape(4, 3, 4, 5)
    layer.forward([bottom], [top])
    assert top.shape == (4, 10)
    bottom.reshape(2, 3, 4, 6)
    with pytest.raises(ShapeError) as info:
        layer.forward([bottom], [top])
    message = str(info.value)
    for needle in ("InnerProduct layer 'ip'", "bottom[0]", "(2, 3, 4, 6)", "72",
                   "K = 60"):
        assert needle in message


def _param_with_blobs(shapes, dtype, bias_term=True, transpose=False):
    """A LayerParameter carrying weights, as a model file would (4-D shapes
    use the legacy num/channels/height/width fields)."""
    param = netlite.io.LayerParameter(name="ip", type="InnerProduct")
    param.inner_product_param.num_output = 10
    param.inner_product_param.bias_term = bias_term
    param.inner_product_param.transpose = transpose
    param.inner_product_param.weight_filler.type = "gaussian"
    gen = np.random.default_rng(3)
    values = []
    for shape in shapes:
        value = gen.normal(size=shape).astype(dtype)
        proto = param.blobs.add()
        if len(shape) == 4:
            proto.num, proto.channels, proto.height, proto.width = shape
        else:
            proto.shape.dim.extend(shape)
        proto.double_data.extend(value.ravel().tolist())
        values.append(value)
    return param, values


@pytest.mark.parametrize("transpose", [False, True])
def test_weights_from_layer_param_are_used(bottom, dtype, transpose):
    wshape = (60, 10) if transpose else (10, 60)
    param, (w, b) = _param_with_blobs([wshape, (10,)], dtype, transpose=transpose)
    layer = InnerProductLayer(param)
    top = Blob(dtype=dtype)
    layer.setup([bottom], [top])
    np.testing.assert_array_equal(layer.blobs[0].data, w)
    np.testing.assert_array_equal(layer.blobs[1].data, b)
    layer.forward([bottom], [top])
    wt = (w if transpose else w.T).astype(np.float64)
    x = bottom.data.reshape(2, 60).astype(np.float64)
    assert_close(top.data, x @ wt + b, "oracle", dtype)


def test_weights_from_layer_param_legacy_4d_shape(bottom, dtype):
    param, (w, b) = _param_with_blobs([(1, 1, 10, 60), (1, 1, 1, 10)], dtype)
    layer = InnerProductLayer(param)
    layer.setup([bottom], [Blob(dtype=dtype)])
    assert layer.blobs[0].shape == (10, 60)
    assert layer.blobs[1].shape == (10,)
    np.testing.assert_array_equal(layer.blobs[0].data, w.reshape(10, 60))


@pytest.mark.parametrize(
    "shapes, match",
    [
        ([(10, 72), (10,)], r"weight blob 0 has shape \(10, 72\).*\(10, 60\)"),
        ([(60, 10), (10,)], r"weight blob 0 has shape \(60, 10\)"),
        ([(10, 60), (11,)], r"bias blob 1 has shape \(11,\)"),
        ([(10, 60)], r"expected 2 parameter blob\(s\)"),
    ],
)
def test_weights_from_layer_param_shape_mismatch(bottom, dtype, shapes, match):
    param, _ = _param_with_blobs(shapes, dtype)
    layer = InnerProductLayer(param)
    with pytest.raises(ShapeError, match="InnerProduct layer 'ip': " + match):
        layer.setup([bottom], [Blob(dtype=dtype)])


NET = """
name: "ipnet"
layer {{ name: "data" type: "Input" top: "data"
        input_param {{ shape {{ dim: 2 dim: 3 dim: 4 dim: {w} }} }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param {{ num_output: 10 weight_filler {{ type: "gaussian" }} }} }}
"""


def test_caffemodel_with_other_input_size_is_rejected(tmp_path, dtype):
    path = tmp_path / "ip.caffemodel"
    netlite.Net(NET.format(w=5), netlite.TEST, dtype=dtype).save(path)
    loaded = netlite.Net(NET.format(w=5), netlite.TEST, weights=path, dtype=dtype)
    assert loaded.params["ip"][0].shape == (10, 60)
    with pytest.raises(WeightsFileError, match="layer 'ip'"):
        netlite.Net(NET.format(w=6), netlite.TEST, weights=path, dtype=dtype)
    # Weights embedded in the prototxt (LayerParameter.blobs) are checked too.
    embedded = netlite.Net(NET.format(w=5), netlite.TEST, dtype=dtype).to_proto()
    embedded.layer[0].input_param.shape[0].dim[3] = 6
    with pytest.raises(ShapeError, match="InnerProduct layer 'ip'.*K = 72"):
        netlite.Net(embedded, netlite.TEST, dtype=dtype)


def test_second_setup_keeps_weights(bottom, dtype):
    top = Blob(dtype=dtype)
    layer = ip_layer(**gaussian_fillers())
    layer.setup([bottom], [top])
    weights = [blob for blob in layer.blobs]
    values = [blob.data.copy() for blob in layer.blobs]
    layer.setup([bottom], [top])
    assert all(a is b for a, b in zip(layer.blobs, weights))
    for blob, value in zip(layer.blobs, values):
        np.testing.assert_array_equal(blob.data, value)


def test_in_place_is_rejected(dtype):
    blob = make_blob((2, 10), dtype, filler("gaussian"))
    with pytest.raises(LayerSetupError, match="in-place"):
        ip_layer().setup([blob], [blob])


@pytest.mark.parametrize("transpose", [False, True])
def test_backward_closed_form(bottom, dtype, transpose):
    # Section 3: dW = G^T X (transpose: X^T G), db = G^T 1, dX = G W
    # (transpose: G W^T), against float64 products of the same values.
    top = Blob(dtype=dtype)
    layer = ip_layer(transpose=transpose, **gaussian_fillers())
    layer.setup([bottom], [top])
    layer.forward([bottom], [top])
    top.diff[...] = make_blob(top.shape, dtype, filler("gaussian")).data
    layer.backward([top], [True], [bottom])
    dy = top.diff.astype(np.float64)
    x = bottom.data.reshape(2, 60).astype(np.float64)
    w = layer.blobs[0].data.astype(np.float64)
    dw = dy.T @ x
    assert_close(layer.blobs[0].diff, dw.T if transpose else dw, "oracle", dtype)
    assert_close(layer.blobs[1].diff, dy.sum(0), "oracle", dtype)
    assert_close(bottom.diff.reshape(2, 60), dy @ (w.T if transpose else w),
                 "oracle", dtype)


def test_propagate_down_flags(bottom, dtype):
    top = Blob(dtype=dtype)
    layer = ip_layer(**gaussian_fillers())
    layer.setup([bottom], [top])
    layer.forward([bottom], [top])
    top.diff[...] = 1.0
    bottom.diff[...] = 7.0
    layer.param_propagate_down = [False, True]
    layer.backward([top], [False], [bottom])
    assert np.all(bottom.diff == 7.0)
    assert not layer.blobs[0].diff.any()
    np.testing.assert_array_equal(layer.blobs[1].diff, np.full(10, 2.0))


@pytest.mark.torch
@pytest.mark.parametrize("transpose", [False, True])
def test_matches_torch_linear(transpose):
    torch = pytest.importorskip("torch")
    dtype = np.float64
    bottom = make_blob((2, 3, 4, 5), dtype, filler("gaussian"))
    top = Blob(dtype=dtype)
    layer = ip_layer(transpose=transpose, **gaussian_fillers())
    layer.setup([bottom], [top])
    layer.forward([bottom], [top])
    top.diff[...] = make_blob(top.shape, dtype, filler("gaussian")).data
    layer.backward([top], [True], [bottom])

    x = torch.tensor(bottom.data.reshape(2, 60), requires_grad=True)
    w_np = layer.blobs[0].data.T if transpose else layer.blobs[0].data
    w = torch.tensor(np.ascontiguousarray(w_np), requires_grad=True)
    b = torch.tensor(layer.blobs[1].data, requires_grad=True)
    y = torch.nn.functional.linear(x, w, b)
    y.backward(torch.tensor(top.diff))
    np.testing.assert_allclose(top.data, y.detach().numpy(), rtol=1e-12, atol=1e-12)
    dw = w.grad.numpy().T if transpose else w.grad.numpy()
    np.testing.assert_allclose(layer.blobs[0].diff, dw, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.blobs[1].diff, b.grad.numpy(), rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(bottom.diff.reshape(2, 60), x.grad.numpy(),
                               rtol=1e-12, atol=1e-12)
