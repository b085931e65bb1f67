"""Tests for SoftmaxWithLoss (port of test_softmax_with_loss_layer.cpp, then
what Caffe's tests miss: every normalization, the second top, other axes,
the FLT_MIN clamp, bad labels, non-finite scores, the engines, PyTorch)."""

import math
import re
import warnings

import naive
import numpy as np
import pytest
from layer_test_case import LayerTestCase, labels
from layer_testing import (
    PARITY_TOL,
    filler,
    make_blob,
    random_labels,
    requires_gpu,
    requires_numba,
)

import netlite
from netlite import backend
from netlite.layers.softmax import SoftmaxLayer
from netlite.layers.softmax_loss import FLT_MIN, SoftmaxWithLossLayer

DATA_SHAPE = (10, 5, 2, 3)
LABEL_SHAPE = (10, 1, 2, 3)
NORMALIZATIONS = ("FULL", "VALID", "BATCH_SIZE", "NONE")


@pytest.fixture
def bottoms(dtype):
    # Caffe's fixture: scores Gaussian with std 10, labels rand() % 5.
    data = make_blob(DATA_SHAPE, dtype, filler("gaussian", std=10))
    label = make_blob(LABEL_SHAPE, dtype, random_labels(LABEL_SHAPE, 5, dtype))
    return [data, label]


def _layer(text=""):
    return SoftmaxWithLossLayer('name: "loss" ' + text)


def _softmax64(x, axis):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _naive(x, labels, axis=1, ignore=None, normalization="VALID", weight=1.0):
    """The float64 oracle (naive.softmax_with_loss) with a loss weight."""
    loss, grad = naive.softmax_with_loss(np.asarray(x, np.float64), labels, axis,
                                         ignore, normalization)
    return loss, weight * grad


class TestSoftmaxWithLossLayer(LayerTestCase):
    """The standard tests for every normalization, ignore_label, the
    probability top, spatial positions and the class axis last."""

    shape, axis, text, ignore, mode = (6, 5, 2, 3), 1, "", None, "VALID"
    tops = 1
    cases = {
        "valid": {},
        "ignore": {"text": "loss_param { ignore_label: 2 }", "ignore": 2},
        "full": {"text": "loss_param { normalization: FULL }", "mode": "FULL"},
        "batch": {"text": "loss_param { normalization: BATCH_SIZE "
                  "ignore_label: 0 }", "mode": "BATCH_SIZE", "ignore": 0},
        "none": {"text": "loss_param { normalization: NONE }", "mode": "NONE"},
        "prob_top": {"tops": 2, "shape": (4, 6, 3)},
        "rows": {"shape": (8, 10)},
        "axis_last": {"shape": (3, 4, 5), "axis": -1,
                      "text": "softmax_param { axis: -1 }"},
    }

    @property
    def layer(self):
        return f'type: "SoftmaxWithLoss" {self.text}'

    @property
    def bottoms(self):
        axis = self.axis % len(self.shape)
        label_shape = self.shape[:axis] + self.shape[axis + 1:]
        n = self.shape[axis]
        return [(self.shape, filler("gaussian", std=2)),
                (label_shape, labels(n, self.ignore, 4))]

    def oracle(self, bottoms, blobs):
        loss, _ = naive.softmax_with_loss(bottoms[0], bottoms[1], self.axis,
                                          self.ignore, self.mode)
        tops = [np.array(loss)]
        if self.tops > 1:
            tops.append(naive.softmax(bottoms[0], self.axis))
        return tops


def _tol(dtype):
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == np.float32 else {
        "rtol": 1e-12, "atol": 1e-13}


def _checker():
    return netlite.GradientChecker(1e-2, 1e-2, 1701)


# ----------------------------------------------------------- Caffe's tests
def test_gradient(bottoms, dtype):
    layer, top = _layer("loss_weight: 3"), [netlite.Blob(dtype=dtype)]
    _checker().check_gradient_exhaustive(layer, bottoms, top, check_bottom=0)


def test_forward_ignore_label(bottoms, dtype):
    top = [netlite.Blob(dtype=dtype)]
    layer = _layer("loss_param { normalize: false }")
    layer.setup(bottoms, top)
    layer.forward(bottoms, top)
    full_loss = float(top[0].data)
    accum_loss = 0.0
    for label in range(5):
        layer = _layer(f"loss_param {{ normalize: false ignore_label: {label} }}")
        layer.setup(bottoms, top)
        layer.forward(bottoms, top)
        accum_loss += float(top[0].data)
    # Each position is left out exactly once.
    assert abs(4 * full_loss - accum_loss) <= 1e-4
    assert full_loss > 1  # not vacuous


def test_gradient_ignore_label(bottoms, dtype):
    layer, top = _layer("loss_param { ignore_label: 0 }"), [netlite.Blob(dtype=dtype)]
    _checker().check_gradient_exhaustive(layer, bottoms, top, check_bottom=0)


def test_gradient_unnormalized(bottoms, dtype):
    layer = _layer("loss_param { normalize: false }")
    top = [netlite.Blob(dtype=dtype)]
    _checker().check_gradient_exhaustive(layer, bottoms, top, check_bottom=0)


# ------------------------------------------------------------ beyond Caffe
@pytest.mark.parametrize("mode", NORMALIZATIONS)
def test_normalization_exact_values(mode, dtype):
    # All-zero scores: every probability is 1/4, every position's loss is
    # log 4.  6 positions (outer 2, inner 3), 2 of them ignored.
    x = make_blob((2, 4, 3), dtype, np.zeros((2, 4, 3)))
    labels = np.array([[0, 7, 3], [1, 2, 7]])
    label = make_blob((2, 3), dtype, labels)
    layer = _layer(f"loss_weight: 2 loss_param {{ ignore_label: 7 "
                   f"normalization: {mode} }}")
    top = [netlite.Blob(dtype=dtype)]
    layer.setup([x, label], top)
    loss = layer.forward([x, label], top)
    z = {"FULL": 6, "VALID": 4, "BATCH_SIZE": 2, "NONE": 1}[mode]
    assert layer.normalizer(layer.valid_count) == z
    assert layer.valid_count == 4
    np.testing.assert_allclose(float(top[0].data), 4 * math.log(4) / z, rtol=1e-6)
    assert loss == pytest.approx(2 * 4 * math.log(4) / z, rel=1e-6)
    layer.backward(top, [True, False], [x, label])
    expected = np.full((2, 4, 3), 0.25)
    for i in range(2):
        for k in range(3):
            if labels[i, k] == 7:
                expected[i, :, k] = 0
            else:
                expected[i, labels[i, k], k] -= 1
    np.testing.assert_allclose(x.diff, 2 * expected / z, rtol=1e-6)


@pytest.mark.parametrize("mode", NORMALIZATIONS)
def test_normalization_modes_match_oracle(bottoms, dtype, mode):
    layer = _layer(f"loss_param {{ ignore_label: 2 normalization: {mode} }}")
    top = [netlite.Blob(dtype=dtype)]
    layer.setup(bottoms, top)
    layer.forward(bottoms, top)
    layer.backward(top, [True, False], bottoms)
    expected, grad = _naive(bottoms[0].data, bottoms[1].data, ignore=2,
                            normalization=mode)
    np.testing.assert_allclose(float(top[0].data), expected, **_tol(dtype))
    np.testing.assert_allclose(bottoms[0].diff, grad, **_tol(dtype))


@pytest.mark.parametrize("text, mode", [
    ("", "VALID"),
    ("loss_param { normalize: true }", "VALID"),
    ("loss_param { normalize: false }", "BATCH_SIZE"),
    ("loss_param { normalization: NONE normalize: true }", "NONE"),
    ("loss_param { normalization: FULL normalize: false }", "FULL"),
    ("loss_param { normalization: VALID normalize: false }", "VALID"),
])
def test_legacy_normalize_flag(bottoms, dtype, text, mode):
    layer, top = _layer(text), [netlite.Blob(dtype=dtype)]
    layer.setup(bottoms, top)
    layer.forward(bottoms, top)
    value = getattr(netlite.proto.netlite_pb2.LossParameter, mode)
    assert layer.normalization == value
    expected, _ = _naive(bottoms[0].data, bottoms[1].data, normalization=mode)
    np.testing.assert_allclose(float(top[0].data), expected, **_tol(dtype))


@pytest.mark.parametrize("mode", NORMALIZATIONS)
def test_all_ignored_gives_zero_loss_and_gradient(bottoms, dtype, mode):
    bottoms[1].data[...] = 4
    layer = _layer(f"loss_param {{ ignore_label: 4 normalization: {mode} }}")
    top = [netlite.Blob(dtype=dtype)]
    layer.setup(bottoms, top)
    assert layer.forward(bottoms, top) == 0.0
    assert float(top[0].data) == 0.0 and layer.valid_count == 0
    bottoms[0].diff[...] = 7
    layer.backward(top, [True, False], bottoms)
    assert np.all(bottoms[0].diff == 0)


def test_ignore_label_outside_class_range(bottoms, dtype):
    # The usual -1 / 255 "void" labels are fine when they are ignore_label.
    bottoms[1].data[0, 0, 0, :] = -1
    layer, top = _layer("loss_param { ignore_label: -1 }"), [netlite.Blob(dtype=dtype)]
    layer.setup(bottoms, top)
    layer.forward(bottoms, top)
    assert layer.valid_count == 60 - 3
    expected, _ = _naive(bottoms[0].data, bottoms[1].data, ignore=-1)
    np.testing.assert_allclose(float(top[0].data), expected, **_tol(dtype))


def test_second_top_is_prob(bottoms, dtype):
    top = [netlite.Blob(dtype=dtype), netlite.Blob(dtype=dtype)]
    layer = _layer()
    layer.setup(bottoms, top)
    assert layer.loss_weights == [1.0, 0.0]
    loss = layer.forward(bottoms, top)
    assert top[1].shape == DATA_SHAPE
    assert top[1].shares_data_with(layer.prob)
    np.testing.assert_allclose(top[1].data, _softmax64(bottoms[0].data, 1),
                               **_tol(dtype))
    expected, _ = _naive(bottoms[0].data, bottoms[1].data)
    assert loss == pytest.approx(expected, rel=1e-5)


def test_second_top_with_explicit_loss_weights(bottoms, dtype):
    # Caffe bug #2968: two loss weights reach the internal Softmax, whose
    # setup aborts.  netlite builds the Softmax without loss weights.
    top = [netlite.Blob(dtype=dtype), netlite.Blob(dtype=dtype)]
    layer = _layer("loss_weight: 1 loss_weight: 0")
    layer.setup(bottoms, top)
    softmax = layer.softmax_layer
    assert isinstance(softmax, SoftmaxLayer)
    assert softmax.layer_param.type == "Softmax"
    assert list(softmax.layer_param.loss_weight) == []
    assert softmax.loss_weights == [0.0]
    layer.forward(bottoms, top)
    np.testing.assert_allclose(top[1].data.sum(axis=1), 1, rtol=1e-5)


def test_gradient_through_second_top(dtype):
    # netlite back-propagates top[1]'s diff through the softmax (Caffe
    # drops it); check the whole Jacobian of both tops.
    data = make_blob((3, 4, 2), dtype, filler("gaussian"))
    label = make_blob((3, 2), dtype, random_labels((3, 2), 4, dtype))
    top = [netlite.Blob(dtype=dtype), netlite.Blob(dtype=dtype)]
    layer = _layer("loss_weight: 2 loss_weight: 0 loss_param { ignore_label: 1 }")
    _checker().check_gradient_exhaustive(layer, [data, label], top, check_bottom=0)


def test_second_top_diff_zero_gives_loss_gradient(bottoms, dtype):
    top = [netlite.Blob(dtype=dtype), netlite.Blob(dtype=dtype)]
    layer = _layer()
    layer.setup(bottoms, top)
    layer.forward(bottoms, top)
    layer.backward(top, [True, False], bottoms)
    _, grad = _naive(bottoms[0].data, bottoms[1].data)
    np.testing.assert_allclose(bottoms[0].diff, grad, **_tol(dtype))


@pytest.mark.parametrize("axis", [2, -1])
def test_other_axis(dtype, axis):
    # Scores (N, T, C) with the classes last; labels (N, T).
    data = make_blob((4, 3, 6), dtype, filler("gaussian", std=3))
    label = make_blob((4, 3), dtype, random_labels((4, 3), 6, dtype))
    layer = _layer(f"softmax_param {{ axis: {axis} }} loss_param {{ ignore_label: 5 }}")
    top = [netlite.Blob(dtype=dtype)]
    layer.setup([data, label], top)
    assert (layer.axis, layer.outer, layer.channels, layer.inner) == (2, 12, 6, 1)
    layer.forward([data, label], top)
    layer.backward(top, [True, False], [data, label])
    expected, grad = _naive(data.data, label.data, axis=2, ignore=5)
    np.testing.assert_allclose(float(top[0].data), expected, **_tol(dtype))
    np.testing.assert_allclose(data.diff, grad, **_tol(dtype))
    _checker().check_gradient_exhaustive(layer, [data, label], top, check_bottom=0)


def test_label_shape_is_free_when_the_count_matches(dtype):
    # As in Caffe: only the count (and LossLayer's first dimension) matter.
    data = make_blob((6, 5), dtype, filler("gaussian", std=3))
    for shape in [(6,), (6, 1), (6, 1, 1)]:
        label = make_blob(shape, dtype, random_labels(shape, 5, dtype))
        layer, top = _layer(), [netlite.Blob(dtype=dtype)]
        layer.setup([data, label], top)
        layer.forward([data, label], top)
        expected, _ = _naive(data.data, label.data)
        np.testing.assert_allclose(float(top[0].data), expected, **_tol(dtype))


def test_bad_axis_names_layer(bottoms):
    with pytest.raises(netlite.LayerSetupError, match="SoftmaxWithLoss layer 'loss'"):
        _layer("softmax_param { axis: 4 }").setup(bottoms, [netlite.Blob()])


def test_flt_min_clamp_with_minus_inf_logit(dtype):
    # The labelled class has score -inf: its probability is exactly 0 and
    # the loss is clamped at -log(FLT_MIN) = 87.3365... in every dtype.
    x = np.array([[-np.inf, 0.0, 1.0], [2.0, -1.0, 0.5]])
    data = make_blob((2, 3), dtype, x)
    label = make_blob((2,), dtype, [0, 2])
    layer = _layer("loss_param { normalization: NONE }")
    top = [netlite.Blob(dtype=dtype)]
    layer.setup([data, label], top)
    loss = layer.forward([data, label], top)
    clamp = -math.log(FLT_MIN)
    assert clamp == pytest.approx(87.33654475055310898657)
    p1 = _softmax64(x[1], 0)
    expected = clamp - math.log(p1[2])
    assert math.isfinite(loss)
    np.testing.assert_allclose(float(top[0].data), expected, rtol=1e-6)
    layer.backward(top, [True, False], [data, label])
    p0 = _softmax64(x[0], 0)
    np.testing.assert_allclose(data.diff[0], p0 - [1, 0, 0], rtol=1e-6, atol=1e-7)
    assert data.diff[0, 0] == -1
    assert np.all(np.isfinite(data.diff))


def test_flt_min_clamp_with_very_negative_logit(dtype):
    data = make_blob((1, 2), dtype, [[-1e4, 0.0]])
    label = make_blob((1,), dtype, [0])
    layer, top = _layer(), [netlite.Blob(dtype=dtype)]
    layer.setup([data, label], top)
    layer.forward([data, label], top)
    np.testing.assert_allclose(float(top[0].data), -math.log(FLT_MIN), rtol=1e-6)


def test_loss_weight_read_from_top_diff(bottoms, dtype):
    layer, top = _layer(), [netlite.Blob(dtype=dtype)]
    layer.setup(bottoms, top)
    layer.forward(bottoms, top)
    layer.backward(top, [True, False], bottoms)
    g1 = bottoms[0].diff.copy()
    top[0].diff[...] = -2
    layer.backward(top, [True, False], bottoms)
    np.testing.assert_allclose(bottoms[0].diff, -2 * g1, rtol=1e-6)


# ------------------------------------------------------------- bad labels
@pytest.mark.parametrize("value, problem", [
    (5, r"outside \[0, 5\)"),
    (-1, r"outside \[0, 5\)"),
    (1e30, r"outside \[0, 5\)"),
    (np.inf, r"outside \[0, 5\)"),
    (2.5, "not an integer"),
    (np.nan, "not an integer"),
])
def test_bad_label_raises(bottoms, dtype, value, problem):
    bottoms[1].data[3, 0, 1, 2] = value
    layer, top = _layer("loss_param { ignore_label: 7 }"), [netlite.Blob(dtype=dtype)]
    layer.setup(bottoms, top)
    with pytest.raises(netlite.LabelError) as info:
        layer.forward(bottoms, top)
    message = str(info.value)
    assert "SoftmaxWithLoss layer 'loss'" in message
    assert "(3, 0, 1, 2)" in message
    assert repr(float(np.asarray(value, dtype=dtype))) in message
    assert re.search(problem, message)


def test_first_bad_label_is_reported(bottoms, dtype):
    bottoms[1].data[2, 0, 0, 1] = 9
    bottoms[1].data[5, 0, 1, 0] = 0.5
    layer, top = _layer(), [netlite.Blob(dtype=dtype)]
    layer.setup(bottoms, top)
    with pytest.raises(netlite.LabelError, match=r"label 9\.0 at index \(2, 0, 0, 1\)"):
        layer.forward(bottoms, top)


def test_label_count_mismatch(dtype):
    data = make_blob(DATA_SHAPE, dtype)
    label = make_blob((10, 1, 2, 2), dtype)
    with pytest.raises(netlite.ShapeError) as info:
        _layer().setup([data, label], [netlite.Blob()])
    message = str(info.value)
    assert "SoftmaxWithLoss layer 'loss'" in message
    assert str(DATA_SHAPE) in message and "(10, 1, 2, 2)" in message
    layer, top = _layer(), [netlite.Blob(dtype=dtype)]
    label.reshape(LABEL_SHAPE)
    layer.setup([data, label], top)
    label.reshape((10, 7))
    with pytest.raises(netlite.ShapeError, match=r"\(10, 7\)"):
        layer.forward([data, label], top)


def test_no_classes_is_an_error(dtype):
    with pytest.raises(netlite.ShapeError, match="no classes"):
        _layer().setup([make_blob((3, 0), dtype), make_blob((3,), dtype)],
                       [netlite.Blob()])


def test_labels_cannot_be_backpropagated(bottoms, dtype):
    layer, top = _layer(), [netlite.Blob(dtype=dtype)]
    layer.setup(bottoms, top)
    layer.forward(bottoms, top)
    assert not layer.allow_force_backward(1) and layer.allow_force_backward(0)
    with pytest.raises(ValueError, match="cannot backpropagate to label inputs"):
        layer.backward(top, [True, True], bottoms)
    with pytest.raises(ValueError, match="label"):
        layer.backward(top, [False, True], bottoms)


# ---------------------------------------------------------- non-finite input
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_score_raises(bottoms, dtype, bad):
    bottoms[0].data[4, 2, 1, 0] = bad
    layer, top = _layer(), [netlite.Blob(dtype=dtype)]
    layer.setup(bottoms, top)
    with pytest.raises(netlite.NonFiniteError) as info:
        layer.forward(bottoms, top)
    message = str(info.value)
    assert "SoftmaxWithLoss layer 'loss'" in message
    assert "bottom[0]" in message
    assert "(4, 2, 1, 0)" in message and str(float(bad)) in message


def test_first_non_finite_score_is_reported(bottoms, dtype):
    bottoms[0].data[6, 0, 0, 0] = np.nan
    bottoms[0].data[1, 4, 1, 1] = np.inf
    layer, top = _layer(), [netlite.Blob(dtype=dtype)]
    layer.setup(bottoms, top)
    with pytest.raises(netlite.NonFiniteError, match=r"inf at index \(1, 4, 1, 1\)"):
        layer.forward(bottoms, top)


def test_all_minus_inf_position_raises(bottoms, dtype):
    bottoms[0].data[2, :, 0, 1] = -np.inf
    layer, top = _layer(), [netlite.Blob(dtype=dtype)]
    layer.setup(bottoms, top)
    with pytest.raises(netlite.NonFiniteError, match="every score .* is -inf"):
        layer.forward(bottoms, top)


def test_non_finite_scores_at_ignored_positions_are_harmless(bottoms, dtype):
    # An ignored position enters neither the loss nor the gradient, so its
    # scores may be anything: the loss is the exact loss of the others.
    bottoms[1].data[3, 0, 0, 0] = 1
    bottoms[1].data[8, 0, 1, 2] = 1
    bottoms[0].data[3, 0, 0, 0] = np.nan
    bottoms[0].data[8, 2, 1, 2] = np.inf
    layer = _layer("loss_param { ignore_label: 1 }")
    top = [netlite.Blob(dtype=dtype)]
    layer.setup(bottoms, top)
    layer.forward(bottoms, top)
    layer.backward(top, [True, False], bottoms)
    expected, grad = _naive(np.nan_to_num(bottoms[0].data, posinf=0, nan=0),
                            bottoms[1].data, ignore=1)
    np.testing.assert_allclose(float(top[0].data), expected, **_tol(dtype))
    np.testing.assert_allclose(bottoms[0].diff, grad, **_tol(dtype))
    assert bottoms[0].diff[3, 0, 0, 0] == 0 and bottoms[0].diff[8, 2, 1, 2] == 0


# ----------------------------------------------------------- shapes, nets
def test_batch_size_change(dtype):
    layer, top = _layer(), [netlite.Blob(dtype=dtype)]
    data, label = make_blob((4, 3), dtype), make_blob((4,), dtype)
    layer.setup([data, label], top)
    for n in (4, 9, 2):
        data.reshape((n, 3))
        label.reshape((n,))
        data.data = netlite.rng.get_rng().standard_normal((n, 3))
        label.data = random_labels((n,), 3, dtype)
        layer.forward([data, label], top)
        layer.backward(top, [True, False], [data, label])
        expected, grad = _naive(data.data, label.data)
        np.testing.assert_allclose(float(top[0].data), expected, **_tol(dtype))
        np.testing.assert_allclose(data.diff, grad, **_tol(dtype))


def test_empty_batch_is_zero_loss(dtype):
    data, label = make_blob((0, 3), dtype), make_blob((0,), dtype)
    layer, top = _layer(), [netlite.Blob(dtype=dtype)]
    layer.setup([data, label], top)
    assert layer.forward([data, label], top) == 0.0
    layer.backward(top, [True, False], [data, label])
    assert data.diff.shape == (0, 3)


def test_in_a_net_with_prob_output(dtype):
    net = netlite.Net(
        """
        force_backward: true
        layer { name: "in" type: "Input" top: "x" top: "label"
                input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }
        layer { name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "label"
                top: "loss" top: "prob" loss_weight: 2 loss_weight: 0 }
        """,
        dtype=dtype,
    )
    gen = netlite.rng.get_rng()
    x = gen.standard_normal((4, 3))
    labels = np.array([0, 2, 1, 2])
    out = net.forward(x=x, label=labels)
    expected, grad = _naive(x, labels, weight=2.0)
    assert net.loss == pytest.approx(2 * expected, rel=1e-5)
    np.testing.assert_allclose(out["prob"], _softmax64(x, 1), rtol=1e-5)
    net.backward()
    np.testing.assert_allclose(net.blobs["x"].diff, grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- engines
PARITY_CASES = [
    # (scores shape, layer parameters, number of tops)
    ((10, 5, 2, 3), "loss_param { ignore_label: 0 }", 1),
    ((10, 5, 2, 3), "loss_param { ignore_label: 0 }", 2),
    ((64, 10), "", 1),
    ((64, 10), "loss_param { normalization: FULL ignore_label: 3 }", 2),
    ((37, 3000), "loss_param { normalization: BATCH_SIZE ignore_label: 4 }", 1),
    ((37, 3000), "loss_param { normalization: NONE }", 2),
    ((64, 1000), "loss_param { ignore_label: 1 }", 1),  # parallel build
    ((4, 7, 30), "softmax_param { axis: -1 } loss_param { normalize: false }", 2),
    ((2, 6, 50, 70), "loss_param { normalization: FULL ignore_label: 2 }", 1),
    ((8, 20, 300), "loss_param { ignore_label: 5 }", 2),  # parallel, strided
]


def _label_shape(shape, text):
    axis = (-1 if "axis: -1" in text else 1) % len(shape)
    return shape[:axis] + shape[axis + 1:], shape[axis]


def _run(engine, shape, text, ntops, x, labels, dy1, dtype, weight=2.5):
    backend.set_cpu_engine(engine)
    device = "gpu" if engine == "cupy" else "cpu"
    xp = backend.get_array_module(device)
    data = netlite.Blob(shape, dtype=dtype, device=device)
    data.data = xp.asarray(x)
    label = netlite.Blob(labels.shape, dtype=dtype, device=device)
    label.data = xp.asarray(labels)
    top = [netlite.Blob(dtype=dtype, device=device) for _ in range(ntops)]
    layer = SoftmaxWithLossLayer('name: "loss" ' + text, device=device)
    layer.setup([data, label], top)
    layer.forward([data, label], top)
    top[0].diff[...] = weight
    if ntops > 1:
        top[1].diff = xp.asarray(dy1)
    layer.backward(top, [True, False], [data, label])
    return ([backend.to_numpy(t.data).copy() for t in top],
            backend.to_numpy(data.diff).copy(), layer.valid_count)


def _parity_inputs(shape, text, dtype):
    lshape, n = _label_shape(shape, text)
    gen = netlite.rng.get_rng()
    x = (gen.standard_normal(shape) * 4).astype(dtype)
    labels = gen.integers(0, n, size=lshape).astype(dtype)
    dy1 = gen.standard_normal(shape).astype(dtype)
    return x, labels, dy1


def _assert_parity(a, b, dtype):
    tol = PARITY_TOL[np.dtype(dtype)]
    (tops_a, dx_a, valid_a), (tops_b, dx_b, valid_b) = a, b
    assert valid_a == valid_b
    for ta, tb in zip(tops_a, tops_b, strict=True):
        np.testing.assert_allclose(tb, ta, **tol)
    np.testing.assert_allclose(dx_b, dx_a, **tol)


def _numba_module():
    from netlite.layers import softmax_loss_numba

    return softmax_loss_numba


@pytest.fixture(params=["keep prob", "statistics only"])
def numba_strategy(request, monkeypatch):
    """The Numba engine keeps prob for small inputs and recomputes it from
    per-position statistics for large ones: test both on every case."""
    if request.param == "statistics only" and backend.numba_available():
        monkeypatch.setattr(_numba_module(), "KEEP_PROB_BYTES", 0)
    return request.param


@requires_numba()
@pytest.mark.parametrize("shape, text, ntops", PARITY_CASES)
def test_numba_matches_numpy(dtype, shape, text, ntops, numba_strategy):
    x, labels, dy1 = _parity_inputs(shape, text, dtype)
    ref = _run("numpy", shape, text, ntops, x, labels, dy1, dtype)
    fast = _run("numba", shape, text, ntops, x, labels, dy1, dtype)
    _assert_parity(ref, fast, dtype)


@requires_numba()
@pytest.mark.parametrize("pattern", ["rising", "falling", "neg_inf_blocks"])
def test_numba_online_statistics(dtype, monkeypatch, pattern):
    # Rows longer than one block in the one-pass (online) statistics: the
    # running max grows in every block (rescaling), never grows, or whole
    # blocks are -inf (skipped).
    from netlite.layers.softmax_numba import BLOCK

    monkeypatch.setattr(_numba_module(), "KEEP_PROB_BYTES", 0)
    n = 3 * BLOCK + 77
    ramp = np.linspace(-20, 20, n)
    if pattern == "falling":
        ramp = ramp[::-1]
    x = np.stack([ramp, np.sin(np.arange(n)) * 30, ramp[::-1] * 2]).astype(dtype)
    if pattern == "neg_inf_blocks":
        x[:, : 2 * BLOCK + 5] = -np.inf
    labels = np.array([n - 1, 2 * BLOCK + 7, n - 3], dtype=dtype)
    text = "loss_param { normalization: NONE }"
    ref = _run("numpy", x.shape, text, 1, x, labels, None, dtype)
    fast = _run("numba", x.shape, text, 1, x, labels, None, dtype)
    _assert_parity(ref, fast, dtype)
    expected, grad = _naive(x, labels, normalization="NONE", weight=2.5)
    np.testing.assert_allclose(ref[0][0], expected, **_tol(dtype))


@requires_numba()
@pytest.mark.parametrize("shape, ntops, keep, expected", [
    ((64, 10), 1, None, "exp"),
    ((64, 10), 2, None, "prob"),
    ((64, 10), 1, 0, None),
    ((64, 10), 2, 0, "prob"),
    ((4, 10, 3), 1, None, None),  # strided: always statistics
])
def test_numba_strategy_choice(dtype, monkeypatch, shape, ntops, keep, expected):
    if keep is not None:
        monkeypatch.setattr(_numba_module(), "KEEP_PROB_BYTES", keep)
    backend.set_cpu_engine("numba")
    lshape = (shape[0],) + shape[2:]
    data = make_blob(shape, dtype, filler("gaussian"))
    label = make_blob(lshape, dtype, random_labels(lshape, 10, dtype))
    layer, top = _layer(), [netlite.Blob(dtype=dtype) for _ in range(ntops)]
    layer.setup([data, label], top)
    layer.forward([data, label], top)
    assert layer.adapter("numba").prob_state == expected


@requires_numba()
@pytest.mark.parametrize("shape", [(5, 3000), (3, 4, 5)])
def test_numba_errors_match_numpy(dtype, shape, numba_strategy):
    lshape = (shape[0],) + shape[2:]
    for engine in ("numpy", "numba"):
        backend.set_cpu_engine(engine)
        data = make_blob(shape, dtype, filler("gaussian"))
        label = make_blob(lshape, dtype, random_labels(lshape, shape[1], dtype))
        layer = _layer("loss_param { ignore_label: 0 }")
        top = [netlite.Blob(dtype=dtype)]
        layer.setup([data, label], top)
        label.flat_data[1] = 2.5
        with pytest.raises(netlite.LabelError, match=r"2\.5 at index"):
            layer.forward([data, label], top)
        label.flat_data[1] = shape[1]
        with pytest.raises(netlite.LabelError, match="outside"):
            layer.forward([data, label], top)
        label.flat_data[1] = 1
        # A NaN score at label position 1, i.e. (i, k) = divmod(1, inner).
        inner = int(np.prod(shape[2:]))
        i, k = divmod(1, inner)
        data.flat_data[(i * shape[1] + 3) * inner + k] = np.nan
        with pytest.raises(netlite.NonFiniteError, match="nan at index"):
            layer.forward([data, label], top)
        label.flat_data[1] = 0  # that position is now ignored: fine
        assert math.isfinite(layer.forward([data, label], top))


@requires_numba()
def test_numba_flt_min_clamp(dtype, numba_strategy):
    backend.set_cpu_engine("numba")
    test_flt_min_clamp_with_minus_inf_logit(dtype)
    test_flt_min_clamp_with_very_negative_logit(dtype)


@requires_numba()
@pytest.mark.parametrize("mode", NORMALIZATIONS)
def test_numba_normalization_exact_values(dtype, mode):
    backend.set_cpu_engine("numba")
    test_normalization_exact_values(mode, dtype)


@requires_numba()
def test_numba_all_ignored(bottoms, dtype, numba_strategy):
    backend.set_cpu_engine("numba")
    test_all_ignored_gives_zero_loss_and_gradient(bottoms, dtype, "VALID")
    test_empty_batch_is_zero_loss(dtype)


@requires_numba()
def test_numba_compiles_without_warnings(dtype):
    # Compilation happens on first use; any Numba warning would be raised
    # as an error here (filterwarnings = error) -- make that explicit.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for shape, text, ntops in PARITY_CASES[:4]:
            x, labels, dy1 = _parity_inputs(shape, text, dtype)
            _run("numba", shape, text, ntops, x, labels, dy1, dtype)


@requires_gpu()
@pytest.mark.parametrize("shape, text, ntops", PARITY_CASES)
def test_cupy_matches_numpy(dtype, shape, text, ntops):
    x, labels, dy1 = _parity_inputs(shape, text, dtype)
    ref = _run("numpy", shape, text, ntops, x, labels, dy1, dtype)
    gpu = _run("cupy", shape, text, ntops, x, labels, dy1, dtype)
    _assert_parity(ref, gpu, dtype)


@requires_gpu()
def test_cupy_label_and_nan_errors(dtype):
    import cupy

    data = netlite.Blob((4, 3), dtype=dtype, device="gpu")
    data.data = cupy.zeros((4, 3))
    label = netlite.Blob((4,), dtype=dtype, device="gpu")
    label.data = cupy.asarray([0, 1, 3, 2])
    layer = SoftmaxWithLossLayer('name: "loss"', device="gpu")
    top = [netlite.Blob(dtype=dtype, device="gpu")]
    layer.setup([data, label], top)
    with pytest.raises(netlite.LabelError, match=r"label 3\.0 at index \(2,\)"):
        layer.forward([data, label], top)
    label.data = cupy.asarray([0, 1, 2, 2])
    data.data[1, 1] = cupy.nan
    with pytest.raises(netlite.NonFiniteError, match=r"\(1, 1\)"):
        layer.forward([data, label], top)


# ------------------------------------------------------------------ torch
@pytest.mark.torch
@pytest.mark.parametrize("mode", NORMALIZATIONS)
@pytest.mark.parametrize("shape", [(10, 5), (4, 5, 3, 2)])
@pytest.mark.parametrize("ignore", [None, 2])
def test_matches_torch_cross_entropy(mode, shape, ignore):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    gen = netlite.rng.get_rng()
    x = gen.standard_normal(shape) * 3
    lshape = (shape[0],) + shape[2:]
    labels = gen.integers(0, shape[1], size=lshape)
    labels.flat[::3] = 2  # make sure some positions are ignored
    text = f"loss_param {{ normalization: {mode} "
    text += f"ignore_label: {ignore} }}" if ignore is not None else "}"
    data = make_blob(shape, np.float64, x)
    label = make_blob(lshape, np.float64, labels)
    layer, top = _layer(text), [netlite.Blob(dtype=np.float64)]
    layer.setup([data, label], top)
    layer.forward([data, label], top)
    layer.backward(top, [True, False], [data, label])

    xt = torch.tensor(x, requires_grad=True)
    lt = torch.tensor(labels, dtype=torch.int64)
    ignore_index = -100 if ignore is None else ignore
    total = F.cross_entropy(xt, lt, ignore_index=ignore_index, reduction="sum")
    valid = int((lt != ignore_index).sum())
    outer, positions = shape[0], labels.size
    expected = {
        "VALID": F.cross_entropy(xt, lt, ignore_index=ignore_index)
        if valid else total,
        "FULL": total / positions,
        "BATCH_SIZE": total / outer,
        "NONE": total,
    }[mode]
    expected.backward()
    assert float(top[0].data) == pytest.approx(expected.item(), rel=1e-12)
    np.testing.assert_allclose(data.diff, xt.grad.numpy(), rtol=1e-10, atol=1e-14)
