"""HingeLoss: the standard tests (LayerTestCase) for both norms; ports of
Caffe's test_hinge_loss_layer.cpp; then the backward against the
definition, the missing 1/2 of L2, the private margin buffer and label
checks."""

import re

import naive
import numpy as np
import pytest
from layer_test_case import LayerTestCase, labels
from layer_testing import filler, make_blob

import netlite
from netlite import Blob, GradientChecker, LabelError, LayerSetupError, ShapeError
from netlite.layers.hinge_loss import HingeLossLayer


class TestHingeLossLayer(LayerTestCase):
    """The standard tests: forward against ``naive.hinge_loss``, the
    exhaustive float64 gradient of the scores, propagate_down, overwritten
    bottom diff, the loss weight; L1 and L2, rows and a spatial bottom
    (``D = count / N``).  Scores are Gaussian with std 2, so both active
    and inactive margins occur; the kink of m = max(0, 1 - t x) lies at
    |x| = 1 (L1 jumps there, L2's second derivative does), so |x| within
    1e-3 of 1 is skipped."""

    shape, label_shape, norm = (6, 5), (6,), "L1"
    kink, kink_range = 1.0, 1e-3  # at least the step, 1e-4
    cases = {
        "l1": {},
        "l2": {"norm": "L2"},
        "l1_caffe_shapes": {"shape": (6, 5, 1, 1), "label_shape": (6, 1, 1, 1)},
        "l2_spatial": {"norm": "L2", "shape": (4, 2, 3), "label_shape": (4,)},
    }

    @property
    def layer(self):
        return f'type: "HingeLoss" hinge_loss_param {{ norm: {self.norm} }}'

    @property
    def bottoms(self):
        classes = int(np.prod(self.shape[1:]))
        return [(self.shape, filler("gaussian", std=2)),
                (self.label_shape, labels(classes))]

    def oracle(self, bottoms, blobs):
        loss, _ = naive.hinge_loss(bottoms[0], bottoms[1], self.norm)
        return [np.array(loss)]


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


def hinge_layer(norm=None, name="hinge"):
    param = netlite.io.LayerParameter(name=name, type="HingeLoss")
    if norm is not None:
        param.hinge_loss_param.norm = getattr(
            netlite.io.netlite_pb2.HingeLossParameter, norm
        )
    return HingeLossLayer(param)


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
def test_backward_matches_definition(f, norm):
    # Section 3's -t [m > 0] w / N (L1) and -t 2 m w / N (L2), from the loop
    # of naive.hinge_loss.  L1 is one rounding of w / N; L2 adds the few
    # roundings of m = 1 - t x: 1e-6 (float32) and 1e-12 (float64) relative
    # hold, and the same absolute bound covers the zeros of inactive margins.
    layer = hinge_layer(None if norm == "L1" else norm)
    layer.setup(f.bottom, [f.top])
    layer.forward(f.bottom, [f.top])
    layer.backward([f.top], [True, False], f.bottom)
    _, expected_grad = naive.hinge_loss(f.data.data.astype(np.float64),
                                        f.label.data, norm)
    rtol = 1e-6 if f.dtype == np.float32 else 1e-12
    np.testing.assert_allclose(f.data.diff, expected_grad, rtol=rtol, atol=rtol)


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


def test_bottom_diff_is_not_scratch(f):
    layer = hinge_layer()
    layer.setup(f.bottom, [f.top])
    f.data.diff[...] = 42.0
    layer.forward(f.bottom, [f.top])
    assert np.all(f.data.diff == 42.0)  # Caffe leaves the margins here
    _, expected_grad = naive.hinge_loss(f.data.data.astype(np.float64),
                                        f.label.data, "L1")
    f.data.diff[...] = -7.0  # e.g. another reader scribbled on it
    layer.backward([f.top], [True, False], f.bottom)
    # L1: every entry is 0 or +-1 / N, one rounding in the blob's dtype.
    np.testing.assert_allclose(f.data.diff, expected_grad,
                               rtol=np.finfo(f.dtype).eps, atol=0)


def test_no_backward_to_labels(f):
    layer = hinge_layer()
    layer.setup(f.bottom, [f.top])
    layer.forward(f.bottom, [f.top])
    assert not layer.allow_force_backward(1)
    with pytest.raises(ValueError, match="HingeLoss layer 'hinge'.*label"):
        layer.backward([f.top], [True, True], f.bottom)


@pytest.mark.parametrize(
    "bad, why", [(1.5, "not an integer"), (5, r"outside \[0, 5\)"),
                 (-1, r"outside \[0, 5\)"), (np.nan, "not an integer")]
)
def test_bad_labels(f, bad, why):
    f.label.data[6] = bad
    layer = hinge_layer(name="svm")
    layer.setup(f.bottom, [f.top])
    # The message every label-checking layer shares (layers/_labels.py).
    value = re.escape(repr(float(f.label.data[6, 0, 0, 0])))
    with pytest.raises(LabelError, match=(
            rf"^HingeLoss layer 'svm': label {value} at index \(6, 0, 0, 0\) "
            r"\(flat position 6\) of bottom\[1\] \(the labels, shape "
            rf"\(10, 1, 1, 1\)\) is {why}.*\(C = 5\)$")):
        layer.forward(f.bottom, [f.top])


def test_label_count_must_be_one_per_sample(f):
    label = make_blob((10, 2), f.dtype, np.zeros((10, 2)))
    with pytest.raises(ShapeError, match=r"one label per sample \(10\), got 20"):
        hinge_layer().setup([f.data, label], [f.top])


def test_batch_size_mismatch(f):
    label = make_blob((9,), f.dtype, np.zeros(9))
    with pytest.raises(LayerSetupError, match="same first dimension"):
        hinge_layer().setup([f.data, label], [f.top])
