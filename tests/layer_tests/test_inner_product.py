"""InnerProduct: the standard tests (LayerTestCase) for every axis, with and
without transpose and bias; ports of Caffe's test_inner_product_layer.cpp;
then the closed-form backward, shape-mismatch errors, stored weights and a
PyTorch cross-check.  Last, ``normalize: true`` (happynear) in both weight
norm modes: standard tests, the RENORM_INPLACE blob and diff, the
TRUE_GRADIENT projection, weight decay, and a PyTorch cross-check."""

import naive
import numpy as np
import pytest
from layer_test_case import LayerTestCase
from layer_testing import (
    assert_close,
    assert_numba_falls_back,
    filler,
    make_blob,
    requires_numba,
)

import netlite
from netlite import Blob, GradientChecker, LayerSetupError, ShapeError
from netlite.errors import WeightsFileError
from netlite.layers.inner_product import WEIGHT_NORM_EPS, InnerProductLayer


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


# ------------------------------------------------------ normalize: true
def _weights_text(shape, transpose, seed=13):
    """A ``blobs { }`` entry (stored weights, as a model gives them) of
    shape (N, K), or (K, N) with ``transpose``, whose row 1 of W is zero."""
    w = np.random.default_rng(seed).standard_normal(shape)
    if transpose:
        w[:, 1] = 0
    else:
        w[1] = 0
    values = " ".join(f"data: {float(v)!r}" for v in w.ravel())
    dims = " ".join(f"dim: {d}" for d in shape)
    return f"blobs {{ shape {{ {dims} }} {values} }}"


class TestInnerProductNormalizeLayer(LayerTestCase):
    """``normalize: true`` in both modes.  TRUE_GRADIENT: forward against
    ``naive.inner_product_normalized`` on the raw blob and the exhaustive
    float64 gradient of bottom, raw weights and bias (a zero weight row
    needs a step far below sqrt(1e-6), where w / sqrt(|w|^2 + 1e-6) bends).
    RENORM_INPLACE: the blob holds W_hat after forward, so the oracle uses
    it as is (checking its rows are unit to 1e-6), and the finite-difference
    check covers the bottom and the bias only: the weight diff is the
    plain gradient w.r.t. W_hat by design (see the dedicated tests)."""

    shape, axis, num_output, transpose, bias_term = (2, 3, 2, 2), 1, 3, False, True
    mode, zero_row = "TRUE_GRADIENT", False
    cases = {
        "true": {},
        "true_transpose": {"transpose": True},
        "true_no_bias": {"bias_term": False},
        "true_axis_2": {"axis": 2, "num_output": 4},
        "true_zero_row": {"zero_row": True, "bias_term": False, "stepsize": 1e-7},
        "true_zero_row_transpose": {"zero_row": True, "bias_term": False,
                                    "transpose": True, "stepsize": 1e-7},
        "renorm": {"mode": "RENORM_INPLACE"},
        "renorm_transpose": {"mode": "RENORM_INPLACE", "transpose": True},
        "renorm_no_bias_axis_2": {"mode": "RENORM_INPLACE", "bias_term": False,
                                  "axis": 2},
        # Above the tests' PARALLEL_MIN_ELEMENTS (2**15) on both the (M, N)
        # top and the (N, K) weights: the Numba kernels' threaded builds, and
        # two weight-gradient blocks (1 MiB = 512 rows of K = 512 float32).
        # Parity only.
        "large_true": {"shape": (64, 512), "num_output": 600},
        "large_true_no_bias": {"shape": (64, 512), "num_output": 600,
                               "bias_term": False},
        "large_renorm": {"shape": (64, 512), "num_output": 600,
                         "mode": "RENORM_INPLACE"},
    }

    def applies(self, test_name, case):
        if case.startswith("large") and not test_name.startswith("test_engine_parity"):
            return False
        return super().applies(test_name, case)

    @property
    def layer(self):
        k = int(np.prod(self.shape[self.axis:]))
        shape = (k, self.num_output) if self.transpose else (self.num_output, k)
        blobs = _weights_text(shape, self.transpose) if self.zero_row else ""
        return (
            'type: "InnerProduct" inner_product_param { '
            f"num_output: {self.num_output} axis: {self.axis} "
            f"transpose: {str(self.transpose).lower()} "
            f"bias_term: {str(self.bias_term).lower()} normalize: true "
            f"weight_norm_mode: {self.mode} "
            'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } } '
            + blobs
        )

    @property
    def bottoms(self):
        return [(self.shape, filler("gaussian"))]

    def oracle(self, bottoms, blobs):
        w, b = blobs if self.bias_term else (*blobs, None)
        if self.mode == "TRUE_GRADIENT":
            return [naive.inner_product_normalized(
                bottoms[0], w, b, self.axis, self.transpose, WEIGHT_NORM_EPS)]
        rows = w.T if self.transpose else w
        norms = np.sqrt((rows ** 2).sum(axis=1))
        np.testing.assert_allclose(norms, 1.0, atol=1e-6)
        return [naive.inner_product(bottoms[0], w, b, self.axis, self.transpose)]

    @property
    def grad_params(self):
        # RENORM_INPLACE: the bias (param 1) only; see the docstring.
        if self.mode == "TRUE_GRADIENT":
            return None
        return [1] if self.bias_term else []


def normalized_ip(mode="RENORM_INPLACE", transpose=False, bias_term=True,
                  num_output=4, weight="gaussian"):
    param = netlite.io.LayerParameter(name="cos", type="InnerProduct")
    ipp = param.inner_product_param
    ipp.num_output = num_output
    ipp.transpose = transpose
    ipp.bias_term = bias_term
    ipp.normalize = True
    ipp.weight_norm_mode = getattr(ipp, mode)
    ipp.weight_filler.type = weight
    ipp.bias_filler.type = "gaussian"
    return InnerProductLayer(param)


def _forward_backward(layer, x, dtype, dy_seed=7, forwards=1):
    netlite.set_random_seed(1701)
    bottom = make_blob(x.shape, dtype, x)
    top = Blob(dtype=dtype)
    layer.setup([bottom], [top])
    for _ in range(forwards):
        layer.forward([bottom], [top])
    top.diff[...] = np.random.default_rng(dy_seed).standard_normal(top.shape)
    layer.backward([top], [True], [bottom])
    return bottom, top


def _rows(w, transpose):
    return w.T if transpose else w


@pytest.mark.parametrize("transpose", [False, True])
def test_renorm_blob_is_unit_norm_after_forward(dtype, transpose):
    # RENORM_INPLACE overwrites the blob with W_hat = W / sqrt(|W|^2 + 1e-6)
    # row by row (columns of the stored (K, N) blob with transpose): unit
    # rows to 1e-6.  The second forward moves them to the fixed point
    # |w|^2 = 1 - 1e-6 (|w|^2 -> |w|^2 / (|w|^2 + 1e-6)), which later
    # forwards keep.
    layer = normalized_ip(transpose=transpose)
    x = np.random.default_rng(1).standard_normal((3, 5))
    bottom = make_blob(x.shape, dtype, x)
    top = Blob(dtype=dtype)
    layer.setup([bottom], [top])
    raw = layer.blobs[0].data.astype(np.float64)
    layer.forward([bottom], [top])
    w_hat = naive.normalize_rows(_rows(raw, transpose), WEIGHT_NORM_EPS)
    assert_close(_rows(layer.blobs[0].data, transpose), w_hat, "oracle", dtype)
    def norms():
        rows = _rows(layer.blobs[0].data.astype(np.float64), transpose)
        return np.sqrt((rows ** 2).sum(axis=1))
    np.testing.assert_allclose(norms(), 1.0, atol=1e-6)
    layer.forward([bottom], [top])
    np.testing.assert_allclose(norms(), np.sqrt(1 - WEIGHT_NORM_EPS),
                               rtol=1e-6 if dtype == np.float32 else 1e-11)
    twice = layer.blobs[0].data.copy()
    layer.forward([bottom], [top])
    assert_close(layer.blobs[0].data, twice, "oracle", dtype)


@pytest.mark.parametrize("transpose", [False, True])
def test_renorm_diff_is_the_plain_gradient(dtype, transpose):
    # The weight diff (and the bottom diff) are those of a plain
    # InnerProduct that holds the renormalised weights.
    x = np.random.default_rng(1).standard_normal((3, 5))
    layer = normalized_ip(transpose=transpose)
    bottom, top = _forward_backward(layer, x, dtype)
    plain = ip_layer(num_output=4, transpose=transpose)
    plain_bottom = make_blob(x.shape, dtype, x)
    plain_top = Blob(dtype=dtype)
    plain.setup([plain_bottom], [plain_top])
    plain.blobs[0].data[...] = layer.blobs[0].data
    plain.blobs[1].data[...] = layer.blobs[1].data
    plain.forward([plain_bottom], [plain_top])
    np.testing.assert_array_equal(plain_top.data, top.data)
    plain_top.diff[...] = top.diff
    plain.backward([plain_top], [True], [plain_bottom])
    np.testing.assert_array_equal(plain.blobs[0].diff, layer.blobs[0].diff)
    np.testing.assert_array_equal(plain.blobs[1].diff, layer.blobs[1].diff)
    np.testing.assert_array_equal(plain_bottom.diff, bottom.diff)


def test_renorm_finite_differences_see_only_the_tangent_part():
    # Perturbing the stored W_hat and renormalising again removes the
    # radial part: the numeric gradient of the blob is (I - w w^T) G / n
    # of the plain diff G, i.e. TRUE_GRADIENT's formula.
    x = np.random.default_rng(1).standard_normal((3, 5))
    layer = normalized_ip(bias_term=False)
    # Two forwards: the blob at the fixed point, which renormalising keeps.
    bottom, top = _forward_backward(layer, x, np.float64, forwards=2)
    r = top.diff.copy()
    w_hat = layer.blobs[0].data.copy()
    g = layer.blobs[0].diff.copy()
    n = np.sqrt((w_hat ** 2).sum(axis=1, keepdims=True) + WEIGHT_NORM_EPS)
    expected = (g - w_hat * (w_hat * g).sum(axis=1, keepdims=True)) / n
    numeric = np.empty_like(w_hat)
    h = 1e-6
    for idx in np.ndindex(w_hat.shape):
        values = []
        for step in (h, -h):
            layer.blobs[0].data[...] = w_hat
            layer.blobs[0].data[idx] += step
            layer.forward([bottom], [top])
            values.append(float((top.data * r).sum()))
        numeric[idx] = (values[0] - values[1]) / (2 * h)
    np.testing.assert_allclose(numeric, expected, rtol=1e-6, atol=1e-8)
    assert np.abs(g - expected).max() > 1e-2  # the plain diff is not it


def test_zero_weight_row(dtype):
    # A zero row stays zero under RENORM_INPLACE (0 / sqrt(1e-6)); in
    # TRUE_GRADIENT mode its gradient is the plain one over sqrt(1e-6):
    # finite, no NaN.
    x = np.random.default_rng(1).standard_normal((3, 5))
    for mode in ("RENORM_INPLACE", "TRUE_GRADIENT"):
        layer = normalized_ip(mode, bias_term=False)
        bottom = make_blob(x.shape, dtype, x)
        top = Blob(dtype=dtype)
        layer.setup([bottom], [top])
        layer.blobs[0].data[2] = 0
        layer.forward([bottom], [top])
        top.diff[...] = np.random.default_rng(7).standard_normal(top.shape)
        layer.backward([top], [True], [bottom])
        assert not layer.blobs[0].data[2].any() if mode == "RENORM_INPLACE" else True
        assert not top.data[:, 2].any()
        for array in (top.data, bottom.diff, layer.blobs[0].diff):
            assert np.all(np.isfinite(array))
        plain = top.diff.astype(np.float64).T @ x
        scale = 1.0 if mode == "RENORM_INPLACE" else 1 / np.sqrt(WEIGHT_NORM_EPS)
        assert_close(layer.blobs[0].diff[2], plain[2] * scale, "oracle", dtype)


@pytest.mark.parametrize("transpose", [False, True])
def test_true_gradient_closed_form(dtype, transpose):
    # Section 9: dW = (G_hat - W_hat (W_hat . G_hat)) / n row by row, with
    # G_hat = dy^T x the plain gradient w.r.t. W_hat; dx = dy W_hat; the
    # raw blob is left unchanged.
    x = np.random.default_rng(1).standard_normal((3, 5))
    layer = normalized_ip("TRUE_GRADIENT", transpose=transpose)
    bottom = make_blob(x.shape, dtype, x)
    top = Blob(dtype=dtype)
    layer.setup([bottom], [top])
    raw = layer.blobs[0].data.copy()
    layer.forward([bottom], [top])
    np.testing.assert_array_equal(layer.blobs[0].data, raw)
    top.diff[...] = np.random.default_rng(7).standard_normal(top.shape)
    layer.backward([top], [True], [bottom])
    w = _rows(raw.astype(np.float64), transpose)
    n = np.sqrt((w ** 2).sum(axis=1, keepdims=True) + WEIGHT_NORM_EPS)
    w_hat = w / n
    dy = top.diff.astype(np.float64)
    g_hat = dy.T @ x
    dw = (g_hat - w_hat * (w_hat * g_hat).sum(axis=1, keepdims=True)) / n
    assert_close(_rows(layer.blobs[0].diff, transpose), dw, "oracle", dtype)
    assert_close(bottom.diff, dy @ w_hat, "oracle", dtype)
    assert_close(top.data, x @ w_hat.T + layer.blobs[1].data, "oracle", dtype)


def test_renorm_weight_decay_only_rescales_the_step():
    # Section 9: with the blob renormalised every forward, an SGD step with
    # weight decay lambda, W - eta (G + lambda W), lands on the direction
    # of a step eta / (1 - eta lambda) without decay (up to the 1e-6).
    x = np.random.default_rng(1).standard_normal((3, 5))
    eta, lam = 0.1, 0.05
    finals = []
    for decay, lr in ((lam, eta), (0.0, eta / (1 - eta * lam))):
        layer = normalized_ip(bias_term=False)
        bottom, top = _forward_backward(layer, x, np.float64)
        w = layer.blobs[0]
        w.data[...] -= lr * (w.diff + decay * w.data)
        layer.forward([bottom], [top])
        finals.append(w.data.copy())
    np.testing.assert_allclose(finals[0], finals[1], rtol=1e-8, atol=1e-10)


def test_true_gradient_is_orthogonal_so_the_norm_grows():
    # Section 9: the TRUE_GRADIENT diff is orthogonal to each raw row (up
    # to eps / |w|^2), so a plain SGD step lengthens every row; weight
    # decay shrinks it.
    x = np.random.default_rng(1).standard_normal((3, 5))
    layer = normalized_ip("TRUE_GRADIENT", bias_term=False)
    _forward_backward(layer, x, np.float64)
    w, dw = layer.blobs[0].data.copy(), layer.blobs[0].diff.copy()
    cos = (w * dw).sum(axis=1) / np.linalg.norm(w, axis=1) / np.linalg.norm(dw, axis=1)
    assert np.abs(cos).max() < 1e-6
    before = np.linalg.norm(w, axis=1)
    assert np.all(np.linalg.norm(w - 0.5 * dw, axis=1) > before)
    assert np.all(np.linalg.norm(w - 0.5 * (dw + 0.5 * w), axis=1) < before)


def test_weight_norm_mode_needs_normalize():
    param = netlite.io.LayerParameter(name="ip", type="InnerProduct")
    param.inner_product_param.num_output = 3
    param.inner_product_param.weight_norm_mode = (
        param.inner_product_param.TRUE_GRADIENT)
    with pytest.raises(LayerSetupError,
                       match=r"InnerProduct layer 'ip'.*weight_norm_mode.*normalize"):
        InnerProductLayer(param).setup([Blob((2, 4))], [Blob()])


def test_normalize_default_mode_is_renorm_inplace():
    layer = ip_layer(num_output=3, weight="gaussian", normalize=True)
    layer.setup([make_blob((2, 4), np.float64, filler("gaussian"))], [Blob()])
    assert layer.normalize and not layer.true_gradient


@pytest.mark.torch
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("zero_row", [False, True])
def test_true_gradient_matches_torch_autograd(transpose, zero_row):
    """TRUE_GRADIENT against autograd of w / sqrt(sum w^2 + 1e-6), float64."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).standard_normal((4, 6))
    layer = normalized_ip("TRUE_GRADIENT", transpose=transpose, num_output=5)
    bottom = make_blob(x.shape, np.float64, x)
    top = Blob(dtype=np.float64)
    layer.setup([bottom], [top])
    if zero_row:
        _rows(layer.blobs[0].data, transpose)[3] = 0
    raw = _rows(layer.blobs[0].data, transpose).copy()
    layer.forward([bottom], [top])
    dy = np.random.default_rng(7).standard_normal(top.shape)
    top.diff[...] = dy
    layer.backward([top], [True], [bottom])

    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(raw, requires_grad=True)
    bt = torch.tensor(layer.blobs[1].data, requires_grad=True)
    w_hat = wt / torch.sqrt((wt * wt).sum(dim=1, keepdim=True) + WEIGHT_NORM_EPS)
    yt = torch.nn.functional.linear(xt, w_hat, bt)
    yt.backward(torch.tensor(dy))
    worst = 0.0
    for ours, theirs in ((top.data, yt.detach().numpy()),
                         (_rows(layer.blobs[0].diff, transpose), wt.grad.numpy()),
                         (layer.blobs[1].diff, bt.grad.numpy()),
                         (bottom.diff, xt.grad.numpy())):
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
        nz = np.abs(theirs) > 0
        rel = np.abs(ours - theirs)[nz] / np.abs(theirs)[nz]
        worst = max(worst, float(rel.max()))
    print(f"InnerProduct TRUE_GRADIENT transpose={transpose} zero_row={zero_row} "
          f"vs torch autograd: worst rel err {worst:.2e}")


# ------------------------------------------- normalize: true on Numba
def _run_with_diffs(engine, mode, dtype, x, dy, w0, b0, d0):
    """Forward and backward on ``engine`` with parameter diffs that start at
    ``d0`` (not zero); return the weights after forward, the top, the
    bottom diff and the parameter diffs."""
    netlite.set_cpu_engine(engine)
    layer = normalized_ip(mode, num_output=w0.shape[0])
    bottom = make_blob(x.shape, dtype, x)
    top = Blob(dtype=dtype)
    layer.setup([bottom], [top])
    layer.blobs[0].data[...] = w0
    layer.blobs[1].data[...] = b0
    for p, d in zip(layer.blobs, d0):
        p.diff[...] = d
    layer.forward([bottom], [top])
    top.diff[...] = dy
    layer.backward([top], [True], [bottom])
    return (layer.blobs[0].data.copy(), top.data.copy(), bottom.diff.copy(),
            [p.diff.copy() for p in layer.blobs])


@requires_numba()
@pytest.mark.parametrize("mode", ["TRUE_GRADIENT", "RENORM_INPLACE"])
def test_numba_normalize_param_diffs_accumulate(dtype, mode, monkeypatch):
    # The Numba adapter adds to parameter diffs that already hold values
    # (the harness's parity test starts them at zero), at a size that takes
    # the threaded builds, with the weight gradient in uneven blocks of 7
    # rows; the blob after forward (raw in TRUE_GRADIENT, W_hat in
    # RENORM_INPLACE) matches the reference's.
    from netlite.layers import inner_product_numba

    m, k, c = 64, 512, 600
    monkeypatch.setattr(inner_product_numba, "WEIGHT_BLOCK_BYTES",
                        7 * k * np.dtype(dtype).itemsize + 1)
    gen = np.random.default_rng(5)
    x, dy = gen.standard_normal((m, k)), gen.standard_normal((m, c))
    w0, b0 = gen.standard_normal((c, k)), gen.standard_normal(c)
    d0 = [gen.standard_normal((c, k)), gen.standard_normal(c)]
    ref = _run_with_diffs("numpy", mode, dtype, x, dy, w0, b0, d0)
    got = _run_with_diffs("numba", mode, dtype, x, dy, w0, b0, d0)
    if mode == "TRUE_GRADIENT":
        np.testing.assert_array_equal(got[0], w0.astype(dtype))
    for what, a, b in zip(("weights", "top", "bottom diff"), ref[:3], got[:3]):
        assert_close(b, a, "parity", dtype, what)
    for j, (a, b) in enumerate(zip(ref[3], got[3])):
        assert_close(b, a, "parity", dtype, f"param[{j}] diff")


@requires_numba()
@pytest.mark.parametrize("text, shape", [
    ("num_output: 5", (3, 4)),
    ("num_output: 5 transpose: true normalize: true "
     "weight_norm_mode: TRUE_GRADIENT", (3, 4)),
    ("num_output: 5 transpose: true normalize: true", (3, 4)),
    ("num_output: 5 normalize: true weight_norm_mode: TRUE_GRADIENT", (0, 4)),
], ids=["plain", "transpose_true", "transpose_renorm", "empty"])
def test_numba_falls_back_where_not_covered(dtype, text, shape):
    # Plain InnerProduct (BLAS is the floor), transposed weights and an
    # empty bottom run the reference on the Numba engine: identical results.
    gen = np.random.default_rng(3)
    layer = (f'name: "ip" type: "InnerProduct" inner_product_param {{ {text} '
             'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }')
    assert_numba_falls_back(layer, [gen.standard_normal(shape)],
                            [gen.standard_normal((shape[0], 5))], [True], dtype)
