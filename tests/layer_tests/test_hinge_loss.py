"""HingeLoss: ports of Caffe's test_hinge_loss_layer.cpp, plus the forward
values, loss_weight != 1, the private margin buffer and label checks."""

import numpy as np
import pytest
from layer_testing import filler, make_blob

import netlite
from netlite import Blob, GradientChecker, LabelError, LayerSetupError, ShapeError
from netlite.layers.hinge_loss import HingeLossLayer


class Fixture:
    """Caffe's HingeLossLayerTest: seed 1701; data (10, 5, 1, 1) Gaussian
    std 10; labels (10, 1, 1, 1) = rand() % 5."""

    def __init__(self, dtype):
        netlite.set_random_seed(1701)
        self.dtype = dtype
        self.data = make_blob((10, 5, 1, 1), dtype, filler("gaussian", std=10))
        labels = netlite.rng.get_rng().integers(0, 5, size=(10, 1, 1, 1))
        self.label = make_blob((10, 1, 1, 1), dtype, labels)
        self.top = Blob(dtype=dtype)

    @property
    def bottom(self):
        return [self.data, self.label]


@pytest.fixture
def f(dtype):
    return Fixture(dtype)


def hinge_layer(norm=None, loss_weight=None, name="hinge"):
    param = netlite.io.LayerParameter(name=name, type="HingeLoss")
    if norm is not None:
        param.hinge_loss_param.norm = getattr(
            netlite.io.netlite_pb2.HingeLossParameter, norm
        )
    if loss_weight is not None:
        param.loss_weight.append(loss_weight)
    return HingeLossLayer(param)


def naive(x, labels, norm):
    """Loop-level loss and gradient (weight 1) straight from the definition."""
    x = np.asarray(x, np.float64).reshape(len(labels), -1)
    loss, grad = 0.0, np.zeros_like(x)
    for n, label in enumerate(np.asarray(labels).ravel().astype(int)):
        for k in range(x.shape[1]):
            t = 1.0 if k == label else -1.0
            m = max(0.0, 1.0 - t * x[n, k])
            loss += m if norm == "L1" else m * m
            dm = (1.0 if m > 0 else 0.0) if norm == "L1" else 2.0 * m
            grad[n, k] = -t * dm
    return loss / len(x), grad / len(x)


# ---------------------------------------------------------------- Caffe ports
def test_gradient_l1(f):
    checker = GradientChecker(1e-2, 2e-3, 1701, kink=1, kink_range=0.01)
    checker.check_gradient_exhaustive(hinge_layer(), f.bottom, [f.top], check_bottom=0)


def test_gradient_l2(f):
    checker = GradientChecker(1e-2, 1e-2, 1701)
    checker.check_gradient_exhaustive(hinge_layer("L2"), f.bottom, [f.top],
                                      check_bottom=0)


# ------------------------------------------------------------ netlite extras
@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_forward_and_backward_match_definition(f, norm):
    layer = hinge_layer(None if norm == "L1" else norm)
    layer.setup(f.bottom, [f.top])
    assert f.top.shape == ()
    loss = layer.forward(f.bottom, [f.top])
    expected_loss, expected_grad = naive(f.data.data, f.label.data, norm)
    rtol = 1e-6 if f.dtype == np.float32 else 1e-12
    np.testing.assert_allclose(loss, expected_loss, rtol=rtol)
    np.testing.assert_allclose(float(f.top.data), expected_loss, rtol=rtol)
    layer.backward([f.top], [True, False], f.bottom)
    np.testing.assert_allclose(f.data.diff.reshape(10, 5), expected_grad, rtol=rtol,
                               atol=rtol)


def test_l2_has_no_half_factor(dtype):
    # One sample, true class 0 with x = 0 (m = 1), others at -1 (m = 0):
    # E = 1 for both norms; with a 1/2 factor L2 would give 0.5.
    x, labels = [[0.0, -1.0, -1.0]], [0]
    for norm in ("L1", "L2"):
        layer = hinge_layer(norm)
        bottom = [make_blob((1, 3), dtype, x), make_blob((1,), dtype, labels)]
        top = Blob(dtype=dtype)
        layer.setup(bottom, [top])
        assert layer.forward(bottom, [top]) == 1.0
        layer.backward([top], [True, False], bottom)
        # Inactive margins (m = 0, sign(0) = 0) get no gradient.
        expected = [-1.0, 0.0, 0.0] if norm == "L1" else [-2.0, 0.0, 0.0]
        np.testing.assert_array_equal(bottom[0].diff[0], expected)


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_loss_weight(f, norm):
    plain = hinge_layer(norm)
    plain.setup(f.bottom, [f.top])
    loss = plain.forward(f.bottom, [f.top])
    plain.backward([f.top], [True, False], f.bottom)
    grad = f.data.diff.copy()

    weighted = hinge_layer(norm, loss_weight=3.0)
    top = Blob(dtype=f.dtype)
    weighted.setup(f.bottom, [top])
    assert float(top.diff) == 3.0  # the weight lives in the top diff
    weighted_loss = weighted.forward(f.bottom, [top])
    np.testing.assert_allclose(weighted_loss, 3 * loss, rtol=1e-6)
    np.testing.assert_allclose(float(top.data), loss, rtol=1e-6)
    weighted.backward([top], [True, False], f.bottom)
    np.testing.assert_allclose(f.data.diff, 3 * grad, rtol=1e-6)
    assert np.any(grad != 0)


def test_bottom_diff_is_not_scratch(f):
    layer = hinge_layer()
    layer.setup(f.bottom, [f.top])
    f.data.diff[...] = 42.0
    layer.forward(f.bottom, [f.top])
    assert np.all(f.data.diff == 42.0)  # Caffe leaves the margins here
    _, expected_grad = naive(f.data.data, f.label.data, "L1")
    f.data.diff[...] = -7.0  # e.g. another reader scribbled on it
    layer.backward([f.top], [True, False], f.bottom)
    np.testing.assert_allclose(f.data.diff.reshape(10, 5), expected_grad, rtol=1e-6)


def test_propagate_down_false_leaves_bottom_diff(f):
    layer = hinge_layer()
    layer.setup(f.bottom, [f.top])
    layer.forward(f.bottom, [f.top])
    f.data.diff[...] = 5.0
    layer.backward([f.top], [False, False], f.bottom)
    assert np.all(f.data.diff == 5.0)


def test_no_backward_to_labels(f):
    layer = hinge_layer()
    layer.setup(f.bottom, [f.top])
    layer.forward(f.bottom, [f.top])
    assert not layer.allow_force_backward(1)
    with pytest.raises(ValueError, match="HingeLoss layer 'hinge'.*label"):
        layer.backward([f.top], [True, True], f.bottom)


def test_spatial_bottom_uses_count_over_num(dtype):
    netlite.set_random_seed(3)
    data = make_blob((4, 2, 3), dtype, filler("gaussian", std=2))
    labels = make_blob((4,), dtype, [0, 5, 3, 1])
    layer = hinge_layer("L2")
    top = Blob(dtype=dtype)
    layer.setup([data, labels], [top])
    loss = layer.forward([data, labels], [top])
    expected, _ = naive(data.data, labels.data, "L2")
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    GradientChecker(1e-2, 1e-2).check_gradient_exhaustive(
        layer, [data, labels], [top], check_bottom=0
    )


@pytest.mark.parametrize(
    "bad, why", [(1.5, "not an integer"), (5, r"outside \[0, 5\)"),
                 (-1, r"outside \[0, 5\)"), (np.nan, "not an integer")]
)
def test_bad_labels(f, bad, why):
    f.label.data[6] = bad
    layer = hinge_layer(name="svm")
    layer.setup(f.bottom, [f.top])
    with pytest.raises(LabelError, match=rf"HingeLoss layer 'svm'.*position 6.*{why}"):
        layer.forward(f.bottom, [f.top])


def test_label_count_must_be_one_per_sample(f):
    label = make_blob((10, 2), f.dtype, np.zeros((10, 2)))
    with pytest.raises(ShapeError, match=r"one label per sample \(10\), got 20"):
        hinge_layer().setup([f.data, label], [f.top])


def test_batch_size_mismatch(f):
    label = make_blob((9,), f.dtype, np.zeros(9))
    with pytest.raises(LayerSetupError, match="same first dimension"):
        hinge_layer().setup([f.data, label], [f.top])
