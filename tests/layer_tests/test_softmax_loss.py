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
    f32,
    filler,
    make_blob,
    random_labels,
    requires_gpu,
    requires_numba,
)
from softmax_loss_testing import loss_param_fields, run_loss, scores_and_labels

import netlite
from netlite import ShapeError, backend
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


# =============================================================== extensions
# netlite's loss_param extensions (docs §8): class weights and WEIGHTED
# normalisation, label smoothing, temperature, target probabilities,
# per-position losses.  Hyper-parameters are float32-exact or widened with
# float(np.float32(v)) in the oracles.
def probabilities(axis=1):
    """A bottom filler for target probabilities: Dirichlet rows along
    ``axis`` (computed in float64, then normalised in the dtype)."""

    def fill(shape, dtype):
        gen = netlite.rng.get_rng()
        t = np.moveaxis(gen.gamma(1.0, size=shape), axis, -1)
        t = (t / t.sum(axis=-1, keepdims=True)).astype(dtype)
        return np.moveaxis(t, -1, axis)

    return fill


class TestSoftmaxWithLossExtensions(LayerTestCase):
    """The standard tests with every extension, alone and combined, on both
    CPU engines (Numba runs the reference for them)."""

    shape, axis, ignore, mode, soft, tops = (6, 5, 2), 1, None, "VALID", False, 1
    weight, weighted, eps, temp, per_position = None, False, 0.0, 1.0, False
    cases = {
        "weights": {"weight": (0.5, 2.0, 1.0, 3.0, 0.25), "ignore": 2},
        "weighted": {"weight": (0.5, 2.0, 1.0, 3.0, 0.25), "weighted": True,
                     "ignore": -1, "shape": (8, 5)},
        "smooth": {"eps": 0.1, "ignore": 255},
        "smooth_weighted": {"eps": 0.2, "weight": (0.5, 2.0, 1.0, 3.0, 0.25),
                            "weighted": True, "ignore": -100},
        "temperature": {"temp": 2.5, "ignore": 7, "shape": (4, 5, 3)},
        "soft": {"soft": True, "temp": 3.0, "weight": (1.0, 2.0, 0.5, 1.5, 1.0)},
        "soft_smooth_weighted": {"soft": True, "eps": 0.1, "weighted": True,
                                 "weight": (1.0, 2.0, 0.5, 1.5, 1.0),
                                 "shape": (3, 5, 2, 2)},
        "per_position": {"per_position": True, "eps": 0.1, "ignore": -1,
                         "weight": (0.5, 2.0, 1.0, 3.0, 0.25), "shape": (4, 5, 3)},
        "per_position_rows": {"per_position": True, "temp": 2.0, "shape": (7, 5)},
        "prob_top": {"tops": 2, "temp": 2.0, "eps": 0.1, "ignore": 0,
                     "mode": "FULL"},
        "axis_last": {"shape": (3, 4, 5), "axis": -1, "soft": True,
                      "temp": 0.5, "mode": "BATCH_SIZE"},
    }

    @property
    def layer(self):
        fields = loss_param_fields(self)
        if self.eps:
            fields.append(f"label_smoothing: {self.eps}")
        if self.temp != 1:
            fields.append(f"temperature: {self.temp}")
        return (f'type: "SoftmaxWithLoss" softmax_param {{ axis: {self.axis} }} '
                f'loss_param {{ {" ".join(fields)} }}')

    @property
    def bottoms(self):
        if self.soft:
            axis = self.axis % len(self.shape)
            return [(self.shape, filler("gaussian", std=2)),
                    (self.shape, probabilities(axis))]
        return scores_and_labels(self.shape, self.axis, self.ignore)

    def oracle(self, bottoms, blobs):
        loss, _ = naive.softmax_loss_ext(
            bottoms[0], bottoms[1], self.axis, self.ignore,
            "VALID" if self.weighted else self.mode, self.weight, self.weighted,
            f32(self.eps), f32(self.temp), self.per_position)
        tops = [np.asarray(loss)]
        if self.tops > 1:
            tops.append(naive.softmax(bottoms[0] / f32(self.temp), self.axis))
        return tops


def _ext_layer(fields, axis=None):
    axis_text = f"softmax_param {{ axis: {axis} }} " if axis is not None else ""
    return _layer(f"{axis_text}loss_param {{ {fields} }}")


def test_class_weights_exact_values(dtype):
    # All-zero scores: -log q = log 4 at every position.  Labels 0, 0, 1,
    # 3 and one ignored (-1); weights w = (2, 0.5, 1, 4).
    x = np.zeros((5, 4))
    lab = np.array([0, 0, 1, 3, -1])
    w = (2.0, 0.5, 1.0, 4.0)
    text = "ignore_label: -1 class_weight: [2, 0.5, 1, 4]"
    num = (2 + 2 + 0.5 + 4) * math.log(4)
    for extra, z in (("", 4), (" weight_normalization: WEIGHTED", 8.5),
                     (" normalization: NONE", 1)):
        loss, top, dx = run_loss(_ext_layer(text + extra), x, lab, dtype)
        np.testing.assert_allclose(float(top), num / z, rtol=1e-6)
        expected = np.full((5, 4), 0.25)
        expected[np.arange(4), lab[:4]] -= 1
        expected *= np.array([w[c] for c in lab[:4]] + [0])[:, None] / z
        np.testing.assert_allclose(dx, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fields, labels", [
    ("class_weight: [1, 2, 3, 4, 5]", [9, 9, 9, 9, 9, 9]),
    ("class_weight: [0, 0, 0, 4, 5]", [0, 1, 2, 0, 9, 1]),
    ("class_weight: [0, 0, 0, 4, 5] label_smoothing: 0.1", [9, 9, 9, 9, 9, 9]),
    ("class_weight: [0, 0, 0, 0, 0] label_smoothing: 0.1", [0, 1, 2, 3, 9, 4]),
])
def test_weighted_zero_sum_gives_zero_loss_and_gradient(dtype, fields, labels):
    # All labels ignored, or every target weighted 0: Z = 0, and netlite
    # divides by max(Z, FLT_MIN), so the loss and gradient are 0 (PyTorch
    # returns NaN: test_torch_zero_weight_sum_is_nan).
    x = netlite.rng.get_rng().standard_normal((6, 5))
    layer = _ext_layer(f"ignore_label: 9 weight_normalization: WEIGHTED {fields}")
    loss, top, dx = run_loss(layer, x, np.array(labels, float), dtype)
    assert layer.z == FLT_MIN
    assert loss == 0.0 and float(top) == 0.0
    assert np.all(dx == 0)


@pytest.mark.parametrize("fields, match", [
    ("class_weight: [1, -1, 1]", r"class_weight\[1\] is -1.0"),
    ("class_weight: [1, nan, 1]", r"class_weight\[1\] is nan"),
    ("class_weight: [1, inf, 1]", r"class_weight\[1\] is inf"),
    ("label_smoothing: 1", r"label_smoothing is 1.0; it must lie in \[0, 1\)"),
    ("label_smoothing: -0.1", "label_smoothing is -0.1"),
    ("label_smoothing: nan", "label_smoothing is nan"),
    ("temperature: 0", "temperature is 0.0"),
    ("temperature: -2", "temperature is -2.0"),
    ("temperature: nan", "temperature is nan"),
    ("temperature: inf", "temperature is inf"),
    ("weight_normalization: WEIGHTED normalization: FULL",
     "cannot be combined with normalization FULL"),
    ("weight_normalization: WEIGHTED normalize: false",
     "cannot be combined with normalization BATCH_SIZE"),
])
def test_bad_extension_parameters(fields, match):
    data, label = make_blob((4, 3), np.float64), make_blob((4,), np.float64)
    with pytest.raises(netlite.LayerSetupError, match=match) as info:
        _ext_layer(fields).setup([data, label], [netlite.Blob()])
    assert "SoftmaxWithLoss layer 'loss'" in str(info.value)


def test_class_weight_length_must_match_classes():
    data, label = make_blob((4, 3), np.float64), make_blob((4,), np.float64)
    with pytest.raises(netlite.ShapeError, match="class_weight has 2 values; "
                       r"the scores have C = 3 classes along axis 1"):
        _ext_layer("class_weight: [1, 2]").setup([data, label], [netlite.Blob()])


@pytest.mark.parametrize("row, problem", [
    ([0.5, 0.6, -0.1], "negative or non-finite"),
    ([0.5, np.nan, 0.5], "negative or non-finite"),
    ([0.5, np.inf, 0.5], "negative or non-finite"),
    ([0.3, 0.3, 0.3], "sums to 0.9"),
    ([0.0, 0.0, 0.0], "sums to 0.0,"),
])
def test_bad_target_probabilities_raise(dtype, row, problem):
    t = np.full((4, 3), 1 / 3)
    t[2] = row
    with pytest.raises(netlite.LabelError) as info:
        run_loss(_layer(), np.zeros((4, 3)), t, dtype)
    message = str(info.value)
    assert "SoftmaxWithLoss layer 'loss'" in message
    assert "position (outer 2, inner 0)" in message
    assert problem in message.replace("0.8999999999999999", "0.9")


def test_target_probability_tolerance(dtype):
    # Rows may miss 1 by up to sqrt(eps) of float32 in every dtype (the
    # rounding of a float32 teacher's softmax), not by more.
    tol = math.sqrt(np.finfo(np.float32).eps)
    x = np.zeros((2, 4))
    for off, ok in ((0.5 * tol, True), (4 * tol, False)):
        t = np.full((2, 4), 0.25)
        t[1, 0] += off
        if ok:
            run_loss(_layer(), x, t, dtype)
        else:
            with pytest.raises(netlite.LabelError, match="sums to"):
                run_loss(_layer(), x, t, dtype)


@pytest.mark.parametrize("fields", [
    "", "class_weight: [1, 2, 0.5, 3]",
    "class_weight: [1, 2, 0.5, 3] weight_normalization: WEIGHTED",
    "normalization: FULL temperature: 2 label_smoothing: 0.1",
    "class_weight: [1, 2, 0.5, 3] per_position: true",
])
def test_one_hot_probabilities_equal_hard_labels(fields):
    # A hard label and its one-hot probability row are the same target in
    # every mode (PyTorch's mean differs between the two with weights).
    gen = netlite.rng.get_rng()
    x = gen.standard_normal((6, 4, 2)) * 2
    lab = gen.integers(0, 4, size=(6, 2))
    onehot = np.moveaxis(np.eye(4)[lab], -1, 1)
    hard = run_loss(_ext_layer(fields), x, lab)
    soft = run_loss(_ext_layer(fields), x, onehot)
    for a, b in zip(hard, soft):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


def test_soft_targets_ignore_nothing():
    # ignore_label has no effect on target probabilities: every position
    # counts (there is no label to compare).
    gen = netlite.rng.get_rng()
    x = gen.standard_normal((5, 3))
    t = np.full((5, 3), 1 / 3)
    layer = _ext_layer("ignore_label: 0")
    run_loss(layer, x, t)
    assert layer.soft_targets and layer.valid_count == 5


def test_soft_targets_need_more_than_one_class():
    # With C = 1 a label blob of the scores' shape is read as labels.
    layer = _layer()
    run_loss(layer, np.zeros((4, 1)), np.zeros((4, 1)))
    assert not layer.soft_targets


def test_temperature_gradient_is_T_times_q_minus_t():
    # Hinton et al.: L = T^2 H(t, softmax(x / T)), dL/dx = T (q - t) / Z.
    gen = netlite.rng.get_rng()
    x = gen.standard_normal((4, 6)) * 5
    t = gen.dirichlet(np.ones(6), size=4)
    for temp in (0.5, 1.0, 4.0, 20.0):
        _, loss, dx = run_loss(_ext_layer(f"temperature: {temp}"), x, t)
        q = _softmax64(x / temp, 1)
        expected = temp ** 2 * -(t * np.log(q)).sum() / 4
        np.testing.assert_allclose(float(loss), expected, rtol=1e-13)
        np.testing.assert_allclose(dx, temp * (q - t) / 4, rtol=1e-12, atol=1e-16)


def test_high_temperature_is_logit_matching():
    # Hinton et al. §2.1: for large T and zero-mean logits, the T^2-scaled
    # soft gradient tends to (x - v) / C, v the teacher's logits.
    gen = netlite.rng.get_rng()
    x = gen.standard_normal((3, 5))
    v = gen.standard_normal((3, 5))
    x -= x.mean(axis=1, keepdims=True)
    v -= v.mean(axis=1, keepdims=True)
    temp = 1e5  # the error of the expansion is O(x^2 / T)
    t = _softmax64(v / temp, 1)
    _, _, dx = run_loss(_ext_layer(f"temperature: {temp} normalization: NONE"),
                        x, t)
    np.testing.assert_allclose(dx, (x - v) / 5, rtol=0, atol=1e-4)
    assert np.abs(dx - (x - v) / 5).max() < 1e-3 * np.abs(dx).max()


def test_temperature_on_hard_labels_and_prob_top(dtype):
    # The same T^2 rule with labels; top[1] is q = softmax(x / T).
    gen = netlite.rng.get_rng()
    x = gen.standard_normal((5, 4)) * 3
    lab = np.array([0, 3, 1, 1, 2])
    layer = _ext_layer("temperature: 2")
    data, label = make_blob((5, 4), dtype, x), make_blob((5,), dtype, lab)
    top = [netlite.Blob(dtype=dtype), netlite.Blob(dtype=dtype)]
    layer.setup([data, label], top)
    layer.forward([data, label], top)
    q = _softmax64(x / 2, 1)
    np.testing.assert_allclose(top[1].data, q, **_tol(dtype))
    expected = -4 * np.log(q[np.arange(5), lab]).mean()
    np.testing.assert_allclose(float(top[0].data), expected, **_tol(dtype))


def test_smoothing_with_ignored_labels_drops_those_rows(dtype):
    # PyTorch #73205: the uniform part of smoothing must skip ignored rows
    # too.  The loss of a batch with ignored rows equals the loss of the
    # batch without them, in every normalisation that counts labels.
    gen = netlite.rng.get_rng()
    x = gen.standard_normal((8, 5)) * 2
    lab = gen.integers(0, 5, size=8).astype(float)
    lab[[1, 4, 5]] = -7
    keep = lab != -7
    base = "label_smoothing: 0.3 class_weight: [1, 2, 0.5, 1, 3] "
    for mode in ("normalization: VALID", "normalization: NONE",
                 "weight_normalization: WEIGHTED"):
        _, full, dx = run_loss(_ext_layer(base + "ignore_label: -7 " + mode), x,
                               lab, dtype)
        _, kept, dx_kept = run_loss(_ext_layer(base + mode), x[keep],
                                    lab[keep], dtype)
        np.testing.assert_allclose(float(full), float(kept), **_tol(dtype))
        np.testing.assert_allclose(dx[keep], dx_kept, **_tol(dtype))
        assert np.all(dx[~keep] == 0)


def test_smoothing_closed_form():
    # Zero scores: q = 1/C, so every class term is log C and the smoothed
    # loss is sum_c w_c t_c log C per position.
    w = np.array([1.0, 2.0, 4.0])
    eps = f32(0.3)
    t = (1 - eps) * np.eye(3)[[0, 2]] + eps / 3
    _, loss, dx = run_loss(_ext_layer(
        "label_smoothing: 0.3 class_weight: [1, 2, 4] normalization: NONE"),
        np.zeros((2, 3)), np.array([0, 2]))
    np.testing.assert_allclose(float(loss), (w * t).sum() * math.log(3), rtol=1e-14)
    wbar = (w * t).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(dx, wbar / 3 - w * t, rtol=1e-14, atol=1e-16)


def test_flt_min_clamp_with_extensions(dtype):
    # Every class term is floored at log FLT_MIN: a -inf score on a class
    # with t_c > 0 adds -T^2 w_c t_c log FLT_MIN, finite; the gradient
    # ignores the floor, as in plain CE.
    x = np.array([[-np.inf, 0.0, 1.0]])
    clamp = -math.log(FLT_MIN)
    eps = f32(0.3)
    _, loss, dx = run_loss(_ext_layer(
        "label_smoothing: 0.3 class_weight: [2, 1, 1] normalization: NONE"),
        x, np.array([2]), dtype)
    q = _softmax64(x, 1)[0]
    t = np.array([eps / 3, eps / 3, 1 - eps + eps / 3])
    w = np.array([2.0, 1.0, 1.0])
    expected = w[0] * t[0] * clamp - (w[1:] * t[1:] * np.log(q[1:])).sum()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    np.testing.assert_allclose(dx[0], (w * t).sum() * q - w * t, rtol=1e-6,
                               atol=1e-7)


def test_per_position_shape_values_and_top_diff(dtype):
    gen = netlite.rng.get_rng()
    x = gen.standard_normal((3, 4, 2, 5)) * 2
    lab = gen.integers(0, 4, size=(3, 2, 5)).astype(float)
    lab[0, 1, :] = 255
    fields = "per_position: true ignore_label: 255 class_weight: [1, 2, 3, 4]"
    dy = gen.standard_normal((3, 2, 5))
    loss, top, dx = run_loss(_ext_layer(fields), x, lab, dtype, top_diff=dy)
    assert top.shape == (3, 2, 5)  # PyTorch's reduction="none" shape
    expected, grad = naive.softmax_loss_ext(x, lab, ignore_label=255,
                                            class_weight=(1, 2, 3, 4),
                                            per_position=True)
    np.testing.assert_allclose(top, expected, **_tol(dtype))
    assert np.all(top[0, 1, :] == 0)
    np.testing.assert_allclose(loss, expected.sum(), rtol=1e-5)  # weight 1
    np.testing.assert_allclose(dx, grad * dy[:, None], **_tol(dtype))


def test_per_position_batch_size_change_keeps_loss_weight():
    layer = _layer("loss_weight: 2 loss_param { per_position: true }")
    data, label = make_blob((2, 3), np.float64), make_blob((2,), np.float64)
    top = [netlite.Blob(dtype=np.float64)]
    layer.setup([data, label], top)
    for n in (2, 5, 3):
        data.reshape((n, 3))
        label.reshape((n,))
        data.data = netlite.rng.get_rng().standard_normal((n, 3))
        label.data = random_labels((n,), 3, np.float64)
        loss = layer.forward([data, label], top)
        assert top[0].shape == (n,) and np.all(top[0].diff == 2)
        assert loss == pytest.approx(2 * top[0].data.sum(), rel=1e-14)


def test_per_position_in_a_net():
    net = netlite.Net(
        """
        force_backward: true
        layer { name: "in" type: "Input" top: "x" top: "label"
                input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }
        layer { name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "label"
                top: "loss" loss_weight: 0.5
                loss_param { per_position: true label_smoothing: 0.1 } }
        """, dtype=np.float64)
    gen = netlite.rng.get_rng()
    x = gen.standard_normal((4, 3))
    lab = np.array([0, 2, 1, 2])
    out = net.forward(x=x, label=lab)
    expected, grad = naive.softmax_loss_ext(x, lab, smoothing=f32(0.1),
                                            per_position=True)
    np.testing.assert_allclose(out["loss"], expected, rtol=1e-13)
    assert net.loss == pytest.approx(0.5 * expected.sum(), rel=1e-13)
    net.backward()
    np.testing.assert_allclose(net.blobs["x"].diff, 0.5 * grad, rtol=1e-12)


@pytest.mark.parametrize("ignore", [-100, -1, 5, 255])
@pytest.mark.parametrize("fields", ["", "class_weight: [1, 2, 3, 4, 5]",
                                    "label_smoothing: 0.1 per_position: true"])
def test_ignore_label_outside_range_with_extensions(dtype, ignore, fields):
    gen = netlite.rng.get_rng()
    x = gen.standard_normal((6, 5))
    lab = gen.integers(0, 5, size=6).astype(float)
    lab[[0, 3]] = ignore
    _, top, dx = run_loss(_ext_layer(f"ignore_label: {ignore} {fields}"), x, lab,
                          dtype)
    weight = (1, 2, 3, 4, 5) if "class_weight" in fields else None
    expected, grad = naive.softmax_loss_ext(
        x, lab, ignore_label=ignore, class_weight=weight,
        smoothing=f32(0.1) if "smoothing" in fields else 0.0,
        per_position="per_position" in fields)
    np.testing.assert_allclose(top, expected, **_tol(dtype))
    if "per_position" not in fields:
        np.testing.assert_allclose(dx, grad, **_tol(dtype))
    assert np.all(dx[[0, 3]] == 0)


@pytest.mark.parametrize("fields", ["class_weight: [1, 2, 3]",
                                    "label_smoothing: 0.1", "temperature: 2",
                                    "per_position: true",
                                    "weight_normalization: WEIGHTED"])
def test_extensions_run_the_reference_on_numba(dtype, fields):
    # The Numba kernels compute plain CE only: any extension (or target
    # probabilities) sends the layer to the reference, decided once per
    # setup / reshape; the plain layer still uses its kernels.
    pytest.importorskip("numba")
    gen = netlite.rng.get_rng()
    x = gen.standard_normal((5, 3))
    lab = np.array([0, 1, 2, 1, 0])
    runs = {}
    for engine in ("numpy", "numba"):
        backend.set_cpu_engine(engine)
        layer = _ext_layer(fields)
        runs[engine] = run_loss(layer, x, lab, dtype, top_diff=1.5)
        assert layer.extended and layer.engine == "numpy"
        assert layer._adapters == {}  # no kernel was used
    for a, b in zip(runs["numpy"], runs["numba"]):
        np.testing.assert_array_equal(a, b)
    plain = _layer()
    run_loss(plain, x, lab, dtype)
    assert not plain.extended and plain.engine == "numba"
    assert "numba" in plain._adapters
    run_loss(plain, x, _softmax64(x, 1), dtype)  # target probabilities
    assert plain.extended and plain.soft_targets and plain._adapters == {}


# ------------------------------------------------------- extensions: torch
TORCH_WEIGHT = (0.5, 2.0, 1.0, 3.0, 0.25)


def _torch_run(F, torch, x, target, **kwargs):
    xt = torch.tensor(x, requires_grad=True)
    temp = kwargs.pop("temperature", 1.0)
    out = temp * temp * F.cross_entropy(xt / temp, target, **kwargs)
    return xt, out


def _netlite_run(fields, x, target, top_diff=None):
    _, top, dx = run_loss(_ext_layer(fields), x, target, np.float64, top_diff)
    return top, dx


@pytest.mark.torch
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "label_weighted"])
@pytest.mark.parametrize("shape", [(10, 5), (4, 5, 3, 2)])
@pytest.mark.parametrize("ignore", [None, -100, -1, 5, 255])
@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_torch_hard_labels(reduction, shape, ignore, weight, eps):
    # F.cross_entropy(weight=, ignore_index=, label_smoothing=, reduction=)
    # against: per_position (none), normalization NONE (sum), and for mean
    # VALID (no weights) or WEIGHTED (weights).  Mean with weights *and*
    # smoothing differs on purpose (§8.3): PyTorch divides by sum w_label,
    # netlite's WEIGHTED by sum_c w_c t_c; LABEL_WEIGHTED is PyTorch's.
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    gen = netlite.rng.get_rng()
    x = gen.standard_normal(shape) * 3
    lshape = (shape[0],) + shape[2:]
    lab = gen.integers(0, shape[1], size=lshape)
    lab.flat[::3] = ignore if ignore is not None else 0
    lab.flat[1::7] = 3  # the heavy class shows up
    fields = [f"label_smoothing: {eps}"]
    kwargs = {"label_smoothing": f32(eps)}
    if ignore is not None:
        fields.append(f"ignore_label: {ignore}")
        kwargs["ignore_index"] = ignore
    if weight:
        fields.append(f"class_weight: {list(TORCH_WEIGHT)}")
        kwargs["weight"] = torch.tensor(TORCH_WEIGHT, dtype=torch.float64)
    fields.append({"none": "per_position: true", "sum": "normalization: NONE",
                   "mean": "weight_normalization: WEIGHTED" if weight
                   else "normalization: VALID",
                   "label_weighted": "weight_normalization: LABEL_WEIGHTED"
                   }[reduction])
    torch_reduction = "mean" if reduction == "label_weighted" else reduction
    xt, out = _torch_run(F, torch, x, torch.tensor(lab), reduction=torch_reduction,
                         **kwargs)
    dy = gen.standard_normal(lshape) if reduction == "none" else 1.0
    out.backward(torch.tensor(dy) if reduction == "none" else None)
    top, dx = _netlite_run(" ".join(fields), x, lab.astype(float), dy)
    expected, grad = out.detach().numpy(), xt.grad.numpy()
    if reduction == "mean" and weight and eps:
        t = (1 - f32(eps)) * np.eye(shape[1])[np.where(lab == ignore, 0, lab)]
        t += f32(eps) / shape[1]
        valid = lab != ignore
        w = np.array(TORCH_WEIGHT)
        label_sum = w[np.where(valid, lab, 0)][valid].sum()
        target_sum = (t * w).sum(axis=-1)[valid].sum()
        ratio = label_sum / target_sum  # netlite / PyTorch
        assert abs(ratio - 1) > 1e-3
        expected, grad = expected * ratio, grad * ratio
    np.testing.assert_allclose(top, expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dx, grad, rtol=1e-11, atol=1e-14)


@pytest.mark.torch
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "weighted"])
@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("eps, temp", [(0.0, 1.0), (0.1, 1.0), (0.0, 4.0),
                                       (0.2, 0.5)])
def test_torch_probability_targets(reduction, weight, eps, temp):
    # PyTorch's class-probability targets, with T^2 * CE(x / T, t): none,
    # sum and mean (= FULL) agree; PyTorch has no weighted mean for them
    # (mean divides by N), netlite's WEIGHTED divides the sum by
    # sum_i sum_c w_c t_ic (§8.3).
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    gen = netlite.rng.get_rng()
    shape = (6, 5, 3)
    x = gen.standard_normal(shape) * 3
    t = probabilities(1)(shape, np.float64)
    fields = [f"label_smoothing: {eps} temperature: {temp}"]
    kwargs = {"label_smoothing": f32(eps), "temperature": f32(temp)}
    w = np.array(TORCH_WEIGHT if weight else (1.0,) * 5)
    if weight:
        fields.append(f"class_weight: {list(TORCH_WEIGHT)}")
        kwargs["weight"] = torch.tensor(TORCH_WEIGHT, dtype=torch.float64)
    fields.append({"none": "per_position: true", "sum": "normalization: NONE",
                   "mean": "normalization: FULL",
                   "weighted": "weight_normalization: WEIGHTED"}[reduction])
    torch_reduction = {"weighted": "sum"}.get(reduction, reduction)
    xt, out = _torch_run(F, torch, x, torch.tensor(t), reduction=torch_reduction,
                         **kwargs)
    dy = gen.standard_normal((6, 3)) if reduction == "none" else 1.0
    out.backward(torch.tensor(dy) if reduction == "none" else None)
    top, dx = _netlite_run(" ".join(fields), x, t, dy)
    expected, grad = out.detach().numpy(), xt.grad.numpy()
    if reduction == "weighted":
        ts = (1 - f32(eps)) * t + f32(eps) / 5
        z = (ts * w[None, :, None]).sum()
        expected, grad = expected / z, grad / z
    np.testing.assert_allclose(top, expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dx, grad, rtol=1e-11, atol=1e-14)


@pytest.mark.torch
def test_torch_one_hot_probabilities_differ_from_labels_with_weights():
    # PyTorch: with weights, a one-hot probability row's mean differs from
    # its hard label's (N vs sum w_label); netlite's WEIGHTED gives both the
    # label's value (test_one_hot_probabilities_equal_hard_labels).
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    gen = netlite.rng.get_rng()
    x = torch.tensor(gen.standard_normal((6, 5)))
    lab = torch.tensor([3, 3, 3, 0, 1, 2])
    w = torch.tensor(TORCH_WEIGHT, dtype=torch.float64)
    hard = F.cross_entropy(x, lab, weight=w).item()
    soft = F.cross_entropy(x, F.one_hot(lab, 5).double(), weight=w).item()
    assert abs(hard / soft - 1) > 0.1
    top, _ = _netlite_run(f"class_weight: {list(TORCH_WEIGHT)} "
                          "weight_normalization: WEIGHTED", x.numpy(),
                          F.one_hot(lab, 5).double().numpy())
    assert float(top) == pytest.approx(hard, rel=1e-13)


@pytest.mark.torch
def test_torch_zero_weight_sum_is_nan():
    # Where the weighted mean has no weight (all ignored, or zero weights)
    # PyTorch returns NaN; netlite returns 0 with a zero gradient
    # (test_weighted_zero_sum_gives_zero_loss_and_gradient).
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = torch.zeros(3, 4, dtype=torch.float64)
    w = torch.tensor([0.0, 1, 1, 1], dtype=torch.float64)
    assert math.isnan(F.cross_entropy(x, torch.tensor([-1, -1, -1]),
                                      ignore_index=-1, weight=w).item())
    assert math.isnan(F.cross_entropy(x, torch.tensor([0, 0, 0]), weight=w).item())
    top, dx = _netlite_run("class_weight: [0, 1, 1, 1] weight_normalization: "
                           "WEIGHTED", x.numpy(), np.zeros(3))
    assert float(top) == 0 and np.all(dx == 0)


def test_empty_batch_with_extensions(dtype):
    for fields in ("class_weight: [1, 2, 3] weight_normalization: WEIGHTED",
                   "label_smoothing: 0.1 temperature: 2", "per_position: true"):
        data, label = make_blob((0, 3), dtype), make_blob((0,), dtype)
        layer, top = _ext_layer(fields), [netlite.Blob(dtype=dtype)]
        layer.setup([data, label], top)
        assert layer.forward([data, label], top) == 0.0
        layer.backward(top, [True, False], [data, label])
        assert data.diff.shape == (0, 3)


def test_label_weighted_refuses_target_probabilities():
    # LABEL_WEIGHTED sums the weights of hard labels; probability rows have
    # none (WEIGHTED is their weighted mean).
    x = np.zeros((3, 4))
    t = np.full((3, 4), 0.25)
    with pytest.raises(ShapeError, match="LABEL_WEIGHTED"):
        _netlite_run("class_weight: [1, 2, 3, 4] "
                     "weight_normalization: LABEL_WEIGHTED", x, t)
