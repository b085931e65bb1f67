"""Tests for the Eltwise layer: the standard tests (LayerTestCase), the port
of test_eltwise_layer.cpp, then the closed-form backward, MAX ties, errors
and a Net."""

import naive
import numpy as np
import pytest
from layer_test_case import LayerTestCase
from layer_testing import assert_close, filler, make_blob, tolerance

import netlite
from netlite.layers.eltwise import EltwiseLayer

SHAPE = (2, 3, 4, 5)


def _tie_free(k, shape):
    """``k`` arrays of ``shape`` whose values are all distinct, 0.05 apart:
    a MAX winner then stays the winner under a step of 1e-4, so the
    finite differences never straddle a kink."""
    n = int(np.prod(shape))
    order = np.random.default_rng(1701).permutation(k * n)
    values = (order - k * n / 2) * 0.05
    return [values[j * n:(j + 1) * n].reshape(shape) for j in range(k)]


class TestEltwiseLayer(LayerTestCase):
    """The standard tests: forward against ``naive.eltwise``, the exhaustive
    float64 gradient of every bottom, propagate_down, overwritten bottom
    diffs; for SUM (with coefficients), both PROD gradients and MAX, with
    two and three bottoms.  MAX is fed tie-free values (``_tie_free``)."""

    shape, k, operation, coeffs, stable = (2, 3, 2, 2), 3, "SUM", (), True
    cases = {
        "sum": {},
        "sum_coeff": {"coeffs": (1, -0.5, 2)},
        "sum_2": {"k": 2, "coeffs": (0.25, 3)},
        "prod": {"operation": "PROD"},
        "prod_unstable": {"operation": "PROD", "stable": False},
        "prod_2": {"operation": "PROD", "k": 2},
        "max": {"operation": "MAX"},
        "max_2": {"operation": "MAX", "k": 2},
        "max_4": {"operation": "MAX", "k": 4, "shape": (3, 4)},
    }

    @property
    def layer(self):
        coeffs = "".join(f" coeff: {c}" for c in self.coeffs)
        return (f'type: "Eltwise" eltwise_param {{ operation: {self.operation}'
                f"{coeffs} stable_prod_grad: {str(self.stable).lower()} }}")

    @property
    def bottoms(self):
        if self.operation == "MAX":
            return [(self.shape, x) for x in _tie_free(self.k, self.shape)]
        # Caffe's fixture: uniform [0, 1].
        return [(self.shape, filler("uniform"))] * self.k

    def oracle(self, bottoms, blobs):
        # The coefficients are floats in the prototxt: float32 in every dtype.
        coeffs = [float(np.float32(c)) for c in self.coeffs] or None
        return [naive.eltwise(bottoms, self.operation, coeffs)]


@pytest.fixture
def bottoms(dtype):
    # Caffe's EltwiseLayerTest fixture: three (2, 3, 4, 5) blobs, uniform
    # [0, 1], seed 1701.
    return [make_blob(SHAPE, dtype, filler("uniform")) for _ in range(3)]


def _layer(op, coeffs=(), stable=None):
    text = f"eltwise_param {{ operation: {op}"
    text += "".join(f" coeff: {c}" for c in coeffs)
    if stable is not None:
        text += f" stable_prod_grad: {str(stable).lower()}"
    return EltwiseLayer(text + " }")


def _run(layer, bottoms):
    top = netlite.Blob(dtype=bottoms[0].dtype)
    layer.setup(bottoms, [top])
    layer.forward(bottoms, [top])
    return top


# ----------------------------------------------------------- Caffe's tests
def test_setup(bottoms, dtype):
    top = netlite.Blob(dtype=dtype)
    _layer("PROD").setup(bottoms, [top])
    assert top.shape == SHAPE


def test_prod(bottoms):
    top = _run(_layer("PROD"), bottoms)
    a, b, c = (x.data for x in bottoms)
    np.testing.assert_allclose(top.data, a * b * c, rtol=0, atol=1e-4)


def test_sum(bottoms):
    top = _run(_layer("SUM"), bottoms)
    a, b, c = (x.data for x in bottoms)
    np.testing.assert_allclose(top.data, a + b + c, rtol=0, atol=1e-4)


def test_sum_coeff(bottoms):
    top = _run(_layer("SUM", (1, -0.5, 2)), bottoms)
    a, b, c = (x.data for x in bottoms)
    np.testing.assert_allclose(top.data, a - 0.5 * b + 2 * c, rtol=0, atol=1e-4)


@pytest.mark.parametrize("stable", [True, False])
def test_prod_gradient(bottoms, dtype, stable):
    checker = netlite.GradientChecker(1e-2, 1e-3)
    checker.check_gradient_eltwise(
        _layer("PROD", stable=stable), bottoms, [netlite.Blob(dtype=dtype)]
    )


def test_sum_gradient(bottoms, dtype):
    checker = netlite.GradientChecker(1e-2, 1e-3)
    checker.check_gradient_eltwise(_layer("SUM"), bottoms, [netlite.Blob(dtype=dtype)])


def test_sum_coeff_gradient(bottoms, dtype):
    checker = netlite.GradientChecker(1e-2, 1e-3)
    checker.check_gradient_eltwise(
        _layer("SUM", (1, -0.5, 2)), bottoms, [netlite.Blob(dtype=dtype)]
    )


def test_max(bottoms):
    top = _run(_layer("MAX"), bottoms)
    a, b, c = (x.data for x in bottoms)
    np.testing.assert_array_equal(top.data, np.maximum(a, np.maximum(b, c)))


def test_max_gradient(bottoms, dtype):
    checker = netlite.GradientChecker(1e-4, 1e-3)
    checker.check_gradient_eltwise(_layer("MAX"), bottoms, [netlite.Blob(dtype=dtype)])


# ------------------------------------------------------------ beyond Caffe
def _random_dy(top):
    dy = netlite.rng.get_rng().standard_normal(top.shape).astype(top.dtype)
    top.diff = dy
    return dy


def test_backward_closed_forms(bottoms, dtype):
    # Section 3's products of the other bottoms, in float64.
    a, b, c = (x.data.astype(np.float64) for x in bottoms)
    for layer, expected in (
        (_layer("SUM", (1, -0.5, 2)), (1.0, -0.5, 2.0)),
        (_layer("PROD", stable=True), (b * c, a * c, a * b)),
        (_layer("PROD", stable=False), (b * c, a * c, a * b)),
    ):
        top = _run(layer, bottoms)
        dy = _random_dy(top)
        layer.backward([top], [True] * 3, bottoms)
        for blob, factor in zip(bottoms, expected):
            assert_close(blob.diff, dy.astype(np.float64) * factor, "oracle", dtype)


def test_max_ties_follow_caffe(dtype):
    # First pair: a > b ? a : b, so a tie goes to bottom[1].  Later bottoms
    # must be strictly greater to take over, so ties stay with the earlier.
    a = make_blob((4,), dtype, [1.0, 2.0, 5.0, 0.0])
    b = make_blob((4,), dtype, [1.0, 3.0, 5.0, 0.0])
    c = make_blob((4,), dtype, [0.0, 3.0, 6.0, 0.0])
    layer = _layer("MAX")
    top = _run(layer, [a, b, c])
    np.testing.assert_array_equal(top.data, [1.0, 3.0, 6.0, 0.0])
    np.testing.assert_array_equal(layer.max_idx, [1, 1, 2, 1])
    top.diff = [10.0, 20.0, 30.0, 40.0]
    layer.backward([top], [True, True, True], [a, b, c])
    np.testing.assert_array_equal(a.diff, [0, 0, 0, 0])
    np.testing.assert_array_equal(b.diff, [10, 20, 0, 40])
    np.testing.assert_array_equal(c.diff, [0, 0, 30, 0])


def test_max_routes_the_gradient_to_the_winner(bottoms, dtype):
    layer = _layer("MAX")
    top = _run(layer, bottoms)
    dy = _random_dy(top)
    layer.backward([top], [True] * 3, bottoms)
    stacked = np.stack([x.data for x in bottoms])
    winner = stacked.argmax(axis=0)
    assert set(np.unique(winner)) == {0, 1, 2}
    for k, blob in enumerate(bottoms):
        np.testing.assert_array_equal(blob.diff, np.where(winner == k, dy, 0))


def test_shape_mismatch(bottoms, dtype):
    bottoms[2] = make_blob((2, 3, 5, 4), dtype)
    with pytest.raises(netlite.ShapeError, match=r"Eltwise.*bottom\[2\]"):
        _layer("SUM").setup(bottoms, [netlite.Blob(dtype=dtype)])


def test_shape_change_after_setup(bottoms, dtype):
    layer, top = _layer("MAX"), netlite.Blob(dtype=dtype)
    layer.setup(bottoms, [top])
    for x in bottoms:
        x.reshape((3, 2))
        x.data = netlite.rng.get_rng().standard_normal((3, 2))
    layer.forward(bottoms, [top])
    assert top.shape == (3, 2) and layer.max_idx.shape == (3, 2)
    bottoms[0].reshape((6,))
    with pytest.raises(netlite.ShapeError):
        layer.forward(bottoms, [top])


@pytest.mark.parametrize(
    "text, match",
    [
        ("operation: SUM coeff: 1 coeff: 2", "once per bottom"),
        ("operation: PROD coeff: 1 coeff: 2 coeff: 3", "only allowed with"),
        ("operation: MAX coeff: 1 coeff: 2 coeff: 3", "only allowed with"),
    ],
)
def test_parameter_errors(bottoms, dtype, text, match):
    layer = EltwiseLayer(f"eltwise_param {{ {text} }}")
    with pytest.raises(netlite.LayerSetupError, match="Eltwise.*" + match):
        layer.setup(bottoms, [netlite.Blob(dtype=dtype)])


def test_blob_counts_and_in_place(bottoms, dtype):
    with pytest.raises(netlite.LayerSetupError, match="at least 2"):
        _layer("SUM").setup(bottoms[:1], [netlite.Blob(dtype=dtype)])
    with pytest.raises(netlite.LayerSetupError, match="in-place"):
        _layer("SUM").setup(bottoms, [bottoms[1]])


def test_in_a_net_residual_sum(dtype):
    # y = x + relu(x): x fans out (a Split is inserted), Eltwise joins.
    net = netlite.Net(
        """
        force_backward: true
        layer { name: "in" type: "Input" top: "x" top: "t"
                input_param { shape { dim: 3 dim: 4 } } }
        layer { name: "relu" type: "ReLU" bottom: "x" top: "r" }
        layer { name: "sum" type: "Eltwise" bottom: "x" bottom: "r" top: "y" }
        layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t"
                top: "loss" }
        """,
        dtype=dtype,
    )
    gen = netlite.rng.get_rng()
    x, t = gen.standard_normal((3, 4)), gen.standard_normal((3, 4))
    net.forward(x=x, t=t)
    # The inputs are rounded to float32 in a float32 net (relative 6e-8) and
    # a handful of operations follow: 1e-6 / 1e-5 leave a margin of ~10;
    # a float64 net is held to the oracle tolerance.
    y = x + np.maximum(x, 0)
    f32 = dtype == np.float32
    tol = {"rtol": 1e-6, "atol": 0} if f32 else tolerance("oracle", dtype)
    np.testing.assert_allclose(net.blobs["y"].data, y, **tol)
    net.backward()
    expected = (y - t) / 3 * (1 + (x > 0))
    tol = {"rtol": 1e-5, "atol": 1e-6} if f32 else tolerance("oracle", dtype)
    np.testing.assert_allclose(net.blobs["x"].diff, expected, **tol)
