"""Tests for the PReLU layer: the standard tests (LayerTestCase), the port
of test_neuron_layer.cpp (PReLU part), then in-place use, the closed-form
backward, the gradient at 0, fillers, stored blobs and shape errors."""

import naive
import numpy as np
import pytest
from layer_test_case import LayerTestCase
from layer_testing import filler, make_blob

import netlite
from netlite import fillers
from netlite.layers.prelu import PReLULayer
from netlite.layers.relu import ReLULayer

SHAPE = (2, 3, 4, 5)


class TestPReLULayer(LayerTestCase):
    """The standard tests: forward against ``naive.prelu``, the exhaustive
    float64 gradient (x and the slopes) with the kink at x = 0 skipped,
    propagate_down, accumulated slope diffs, overwritten bottom diff; per
    channel and shared, for 2- to 5-axis bottoms."""

    shape, shared, fill = SHAPE, False, 'filler { type: "gaussian" }'
    kink_range = 1e-3  # at least the step, 1e-4
    cases = {
        "channels": {},
        "shared": {"shared": True},
        "default_filler": {"fill": ""},
        "rank_2": {"shape": (4, 3)},
        "rank_3_shared": {"shape": (2, 3, 4), "shared": True},
        "rank_5": {"shape": (2, 3, 2, 1, 2)},
    }

    @property
    def layer(self):
        return (f'type: "PReLU" prelu_param {{ {self.fill} '
                f"channel_shared: {str(self.shared).lower()} }}")

    @property
    def bottoms(self):
        return [(self.shape, filler("gaussian"))]

    def oracle(self, bottoms, blobs):
        (a,) = blobs
        assert a.shape == (() if self.shared else self.shape[1:2])
        return [naive.prelu(bottoms[0], a, self.shared)]


@pytest.fixture
def bottom(dtype):
    # Caffe's NeuronLayerTest fixture: (2, 3, 4, 5), Gaussian, seed 1701.
    return make_blob(SHAPE, dtype, filler("gaussian"))


def _fill_gaussian(blob):
    fillers.get_filler(filler("gaussian")).fill(blob)


def _reference(x, slopes, channel_shared):
    """Caffe's loop: max(x, 0) + a_c * min(x, 0), c = (i / hw) % channels."""
    a = slopes if channel_shared else slopes.reshape((1, -1) + (1,) * (x.ndim - 2))
    return np.maximum(x, 0) + a * np.minimum(x, 0)


def _check_forward(layer, bottom, top):
    """Caffe's TestPReLU helper: exact equality with the reference."""
    layer.forward([bottom], [top])
    expected = _reference(
        bottom.data, layer.blobs[0].data,
        layer.layer_param.prelu_param.channel_shared,
    )
    np.testing.assert_array_equal(top.data, expected)


# ----------------------------------------------------------- Caffe's tests
def test_prelu_param(bottom, dtype):
    layer = PReLULayer()
    layer.setup([bottom], [netlite.Blob(dtype=dtype)])
    slopes = layer.blobs[0]
    assert slopes.shape == (3,) and slopes.dtype == dtype
    assert np.all(slopes.data == 0.25)


def test_prelu_forward(bottom, dtype):
    layer, top = PReLULayer(), netlite.Blob(dtype=dtype)
    layer.setup([bottom], [top])
    _fill_gaussian(layer.blobs[0])
    assert len(np.unique(layer.blobs[0].data)) == 3
    _check_forward(layer, bottom, top)


def test_prelu_forward_channel_shared(bottom, dtype):
    layer, top = PReLULayer("prelu_param { channel_shared: true }"), netlite.Blob(
        dtype=dtype
    )
    layer.setup([bottom], [top])
    assert layer.blobs[0].shape == () and layer.blobs[0].count == 1
    _check_forward(layer, bottom, top)


def test_prelu_gradient(bottom, dtype):
    layer, top = PReLULayer(), netlite.Blob(dtype=dtype)
    layer.setup([bottom], [top])
    _fill_gaussian(layer.blobs[0])
    checker = netlite.GradientChecker(1e-2, 1e-3, 1701, 0.0, 0.01)
    checker.check_gradient_exhaustive(layer, [bottom], [top])


def test_prelu_gradient_channel_shared(bottom, dtype):
    layer, top = PReLULayer("prelu_param { channel_shared: true }"), netlite.Blob(
        dtype=dtype
    )
    layer.setup([bottom], [top])
    checker = netlite.GradientChecker(1e-2, 1e-3, 1701, 0.0, 0.01)
    checker.check_gradient_exhaustive(layer, [bottom], [top])


def test_prelu_consistency_relu(bottom, dtype):
    prelu, relu = PReLULayer(), ReLULayer("relu_param { negative_slope: 0.25 }")
    top, top2 = netlite.Blob(dtype=dtype), netlite.Blob(dtype=dtype)
    bottom2 = netlite.Blob(dtype=dtype)
    bottom2.copy_from(bottom, reshape=True)
    prelu.setup([bottom], [top])
    relu.setup([bottom2], [top2])
    prelu.forward([bottom], [top])
    relu.forward([bottom], [top2])
    np.testing.assert_array_equal(top.data, top2.data)
    dy = make_blob(SHAPE, dtype, filler("gaussian")).data
    top.diff, top2.diff = dy, dy
    prelu.backward([top], [True], [bottom])
    relu.backward([top2], [True], [bottom2])
    np.testing.assert_array_equal(bottom.diff, bottom2.diff)


@pytest.mark.skipif(
    "InnerProduct" not in netlite.layer_types(), reason="no InnerProduct layer"
)
def test_prelu_in_place(bottom, dtype):
    # InnerProduct (3 outputs) -> PReLU, once in place and once not.
    ip_text = "inner_product_param { num_output: 3 weight_filler { type: 'gaussian' } }"
    ip = netlite.create_layer("type: 'InnerProduct' " + ip_text, dtype=dtype)
    ip2 = netlite.create_layer("type: 'InnerProduct' " + ip_text, dtype=dtype)
    prelu, prelu2 = PReLULayer(), PReLULayer()
    top = netlite.Blob(dtype=dtype)
    bottom2, middle2, top2 = (netlite.Blob(dtype=dtype) for _ in range(3))
    bottom2.copy_from(bottom, reshape=True)
    ip.setup([bottom], [top])
    prelu.setup([top], [top])
    ip2.setup([bottom2], [middle2])
    prelu2.setup([middle2], [top2])
    ip2.blobs[0].data = ip.blobs[0].data
    # In place, then not.
    ip.forward([bottom], [top])
    prelu.forward([top], [top])
    ip2.forward([bottom2], [middle2])
    prelu2.forward([middle2], [top2])
    np.testing.assert_array_equal(top.data, top2.data)
    assert np.any(top2.data < 0)  # the slope branch is exercised
    dy = make_blob(top2.shape, dtype, filler("gaussian")).data
    top.diff, top2.diff = dy, dy
    prelu.backward([top], [True], [top])
    ip.backward([top], [True], [bottom])
    prelu2.backward([top2], [True], [middle2])
    ip2.backward([middle2], [True], [bottom2])
    tol = {"rtol": 1e-6} if dtype == np.float32 else {"rtol": 1e-12}
    np.testing.assert_allclose(bottom.diff, bottom2.diff, **tol)
    for a, b in zip(ip.blobs + prelu.blobs, ip2.blobs + prelu2.blobs):
        np.testing.assert_allclose(a.diff, b.diff, **tol)


# ------------------------------------------------------------ beyond Caffe
@pytest.mark.parametrize("shared", [False, True])
def test_in_place_matches_out_of_place(bottom, dtype, shared):
    text = f"prelu_param {{ channel_shared: {str(shared).lower()} }}"
    dy = make_blob(SHAPE, dtype, filler("gaussian")).data
    layer, top = PReLULayer(text), netlite.Blob(dtype=dtype)
    layer.setup([bottom], [top])
    _fill_gaussian(layer.blobs[0])
    slopes = layer.blobs[0].data.copy()
    layer.forward([bottom], [top])
    top.diff = dy
    layer.backward([top], [True], [bottom])
    blob = make_blob(SHAPE, dtype, bottom.data)
    layer2 = PReLULayer(text)
    layer2.setup([blob], [blob])
    layer2.blobs[0].data = slopes
    layer2.forward([blob], [blob])
    np.testing.assert_array_equal(blob.data, top.data)
    blob.diff = dy
    layer2.backward([blob], [True], [blob])
    np.testing.assert_array_equal(blob.diff, bottom.diff)
    np.testing.assert_array_equal(layer2.blobs[0].diff, layer.blobs[0].diff)


@pytest.mark.parametrize("shared", [False, True])
def test_backward_closed_form(bottom, dtype, shared):
    text = f"prelu_param {{ channel_shared: {str(shared).lower()} }}"
    layer, top = PReLULayer(text), netlite.Blob(dtype=dtype)
    layer.setup([bottom], [top])
    _fill_gaussian(layer.blobs[0])
    layer.forward([bottom], [top])
    dy = make_blob(SHAPE, dtype, filler("gaussian")).data
    top.diff = dy
    x = bottom.data.astype(np.float64)
    a = layer.blobs[0].data.astype(np.float64)
    a_b = a if shared else a.reshape(1, 3, 1, 1)
    g = dy * x * (x <= 0)
    da = g.sum() if shared else g.sum(axis=(0, 2, 3))
    # dx is one product per element; da sums 40 products per channel (120
    # shared), a few ulps each: 1e-5 / 1e-12 leave a margin of ~100.
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-12}
    layer.backward([top], [True], [bottom])
    np.testing.assert_allclose(bottom.diff, dy * np.where(x > 0, 1, a_b), **tol)
    np.testing.assert_allclose(layer.blobs[0].diff, da, **tol)


def test_gradient_at_zero_uses_the_slope(dtype):
    x = make_blob((1, 2, 2), dtype, [[[0.0, 1.0], [0.0, -2.0]]])
    layer, top = PReLULayer(), netlite.Blob(dtype=dtype)
    layer.setup([x], [top])
    layer.blobs[0].data = [0.5, 0.25]
    layer.forward([x], [top])
    top.diff[...] = 2.0
    layer.backward([top], [True], [x])
    np.testing.assert_array_equal(x.diff, [[[1.0, 2.0], [0.5, 0.5]]])
    # x == 0 contributes x * dy = 0 to the slope gradient.
    np.testing.assert_array_equal(layer.blobs[0].diff, [0.0, -4.0])


def test_explicit_filler(bottom, dtype):
    layer = PReLULayer("prelu_param { filler { type: 'constant' value: -0.5 } }")
    layer.setup([bottom], [netlite.Blob(dtype=dtype)])
    assert np.all(layer.blobs[0].data == -0.5)


def test_setup_keeps_existing_blobs(bottom, dtype):
    layer, top = PReLULayer(), netlite.Blob(dtype=dtype)
    layer.setup([bottom], [top])
    layer.blobs[0].data = [1.0, 2.0, 3.0]
    blob = layer.blobs[0]
    layer.setup([bottom], [top])
    assert layer.blobs[0] is blob
    np.testing.assert_array_equal(blob.data, [1.0, 2.0, 3.0])


def test_blobs_from_layer_param(bottom, dtype):
    text = "blobs { shape { dim: 3 } data: 0.1 data: 0.2 data: 0.3 }"
    layer = PReLULayer(text)
    layer.setup([bottom], [netlite.Blob(dtype=dtype)])
    # BlobProto.data is a repeated float: the values are float32 in every
    # dtype, and widening them is exact.
    np.testing.assert_array_equal(layer.blobs[0].data,
                                  np.array([0.1, 0.2, 0.3], np.float32))
    bad = PReLULayer("blobs { shape { dim: 2 } data: 0.1 data: 0.2 }")
    with pytest.raises(netlite.LayerSetupError, match="PReLU.*3 element"):
        bad.setup([bottom], [netlite.Blob(dtype=dtype)])


def test_shape_errors(dtype):
    with pytest.raises(netlite.ShapeError, match="PReLU.*2 axes"):
        PReLULayer().setup([make_blob((5,), dtype)], [netlite.Blob(dtype=dtype)])
    x, top = make_blob((2, 3, 4), dtype), netlite.Blob(dtype=dtype)
    layer = PReLULayer()
    layer.setup([x], [top])
    x.reshape((2, 4, 4))
    with pytest.raises(netlite.ShapeError, match="4 channels"):
        layer.forward([x], [top])
    # A shared slope does not care about the channel count.
    shared = PReLULayer("prelu_param { channel_shared: true }")
    x.reshape((2, 3, 4))
    shared.setup([x], [top])
    x.reshape((2, 7, 4))
    shared.forward([x], [top])
    assert top.shape == (2, 7, 4)
