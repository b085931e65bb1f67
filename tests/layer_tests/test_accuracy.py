"""Accuracy: the standard tests (LayerTestCase: forward only, the layer has
no backward); ports of Caffe's test_accuracy_layer.cpp; then ties, empty
batches, label validation, NaN scores and the no-backward contract; and
happynear's min_is_better."""

import re

import naive
import numpy as np
import pytest
from layer_test_case import LayerTestCase, labels
from layer_testing import filler, make_blob

import netlite
from netlite import Blob, LabelError, LayerSetupError, NonFiniteError, ShapeError
from netlite.layers.accuracy import AccuracyLayer

TOP_K = 3  # Caffe's fixture member top_k_


class TestAccuracyLayer(LayerTestCase):
    """Forward against ``naive.accuracy`` in both dtypes (accuracy and the
    per-class top), for top-1 and top-k, ignore_label, spatial positions
    and the class axis last.  Gaussian scores have no ties; the tie rule
    has its own test.  There is no backward, so the gradient,
    propagate_down and diff tests do not apply."""

    has_backward = False
    shape, axis, top_k, ignore, tops = (12, 5), 1, 1, None, 1
    min_is_better = False
    cases = {
        "top_1": {},
        "top_3": {"top_k": 3},
        "top_c": {"top_k": 5},
        "per_class": {"tops": 2},
        "ignore": {"ignore": 2, "tops": 2},
        "ignore_out_of_range": {"ignore": 255},
        "spatial": {"shape": (2, 5, 2, 3), "top_k": 2, "tops": 2},
        "axis_last": {"shape": (3, 4, 5), "axis": -1, "ignore": 0, "tops": 2},
        "min_top_1": {"min_is_better": True, "tops": 2},
        "min_top_3": {"min_is_better": True, "top_k": 3},
        "min_spatial_ignore": {"min_is_better": True, "shape": (2, 5, 2, 3),
                               "top_k": 2, "ignore": 1, "tops": 2},
    }

    @property
    def layer(self):
        ignore = "" if self.ignore is None else f" ignore_label: {self.ignore}"
        return (f'type: "Accuracy" accuracy_param {{ top_k: {self.top_k} '
                f"axis: {self.axis}{ignore} "
                f"min_is_better: {str(self.min_is_better).lower()} }}")

    @property
    def bottoms(self):
        axis = self.axis % len(self.shape)
        label_shape = self.shape[:axis] + self.shape[axis + 1:]
        classes = self.shape[axis]
        return [(self.shape, filler("gaussian")),
                (label_shape, labels(classes, self.ignore, 4))]

    def oracle(self, bottoms, blobs):
        rule = naive.accuracy_min_is_better if self.min_is_better else naive.accuracy
        acc, per_class = rule(bottoms[0], bottoms[1], self.top_k, self.axis,
                              self.ignore)
        return [np.array(acc), per_class][:self.tops]


class Fixture:
    """Caffe's AccuracyLayerTest: scores (100, 10) Gaussian; labels (100,)
    uniform in 0..9 from a generator seeded by the global one."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.data = Blob((100, 10), dtype=dtype)
        self.label = Blob((100,), dtype=dtype)
        self.top = Blob(dtype=dtype)
        self.per_class = Blob(dtype=dtype)
        self.fill_bottoms()

    def fill_bottoms(self):
        netlite.fillers.get_filler(filler("gaussian")).fill(self.data)
        seed = int(netlite.rng.get_rng().integers(2**32))
        labels = np.random.default_rng(seed).integers(0, 10, size=self.label.shape)
        self.label.data[...] = labels

    @property
    def bottom(self):
        return [self.data, self.label]


@pytest.fixture
def f(dtype):
    return Fixture(dtype)


def accuracy_layer(top_k=None, axis=None, ignore_label=None, name="acc",
                   min_is_better=None):
    param = netlite.io.LayerParameter(name=name, type="Accuracy")
    ap = param.accuracy_param
    if min_is_better is not None:
        ap.min_is_better = min_is_better
    if top_k is not None:
        ap.top_k = top_k
    if axis is not None:
        ap.axis = axis
    if ignore_label is not None:
        ap.ignore_label = ignore_label
    return AccuracyLayer(param)


def argmax_first(scores):
    """Caffe's reference: scan classes from 0, keep a strictly greater one."""
    best, best_id = -np.inf, 0
    for j, v in enumerate(scores):
        if v > best:
            best, best_id = v, j
    return best_id


def reference(data, labels, ignore_label=None, num_classes=10):
    """(accuracy, per-class accuracy) as Caffe's tests compute them."""
    correct, count = 0, 0
    seen = np.zeros(num_classes, int)
    hits = np.zeros(num_classes, int)
    for scores, label in zip(data, labels):
        if ignore_label is not None and label == ignore_label:
            continue
        count += 1
        seen[int(label)] += 1
        if argmax_first(scores) == label:
            correct += 1
            hits[int(label)] += 1
    per_class = np.where(seen > 0, hits / np.maximum(seen, 1), 0.0)
    return correct / count, per_class, count


def legacy_shape(blob):
    return (blob.num, blob.channels, blob.height, blob.width)


# ---------------------------------------------------------------- Caffe ports
def test_setup(f):
    accuracy_layer().setup(f.bottom, [f.top])
    assert legacy_shape(f.top) == (1, 1, 1, 1)
    assert f.top.shape == ()


def test_setup_top_k(f):
    accuracy_layer(top_k=5).setup(f.bottom, [f.top])
    assert legacy_shape(f.top) == (1, 1, 1, 1)


def test_setup_output_per_class(f):
    accuracy_layer().setup(f.bottom, [f.top, f.per_class])
    assert legacy_shape(f.top) == (1, 1, 1, 1)
    assert legacy_shape(f.per_class) == (10, 1, 1, 1)


def test_forward(f):
    layer = accuracy_layer()
    layer.setup(f.bottom, [f.top])
    for _ in range(3):
        layer.forward(f.bottom, [f.top])
        expected, _, _ = reference(f.data.data, f.label.data)
        assert abs(float(f.top.data) - expected) <= 1e-4


def test_forward_with_spatial_axes(f):
    f.data.reshape(2, 10, 4, 5)
    f.label.reshape(2, 4, 5)
    f.fill_bottoms()
    layer = accuracy_layer(axis=1)
    layer.setup(f.bottom, [f.top])
    for _ in range(3):
        layer.forward(f.bottom, [f.top])
        correct = 0
        for n in range(2):
            for h in range(4):
                for w in range(5):
                    pred = argmax_first(f.data.data[n, :, h, w])
                    correct += pred == int(f.label.data[n, h, w])
        assert abs(float(f.top.data) - correct / f.label.count) <= 1e-4


def _ignore_three(f):
    f.label.data[[2, 5, 32]] = -1


def test_forward_ignore_label(f):
    layer = accuracy_layer(ignore_label=-1)
    _ignore_three(f)
    layer.setup(f.bottom, [f.top])
    for _ in range(3):
        layer.forward(f.bottom, [f.top])
        expected, _, count = reference(f.data.data, f.label.data, ignore_label=-1)
        assert count == 97
        assert abs(float(f.top.data) - expected) <= 1e-4


def test_forward_top_k(f):
    layer = accuracy_layer(top_k=TOP_K)
    layer.setup(f.bottom, [f.top])
    for _ in range(3):
        layer.forward(f.bottom, [f.top])
        correct = 0
        for scores, label in zip(f.data.data, f.label.data):
            for j in range(10):
                rank = int(np.sum(scores > scores[j]))
                if rank < TOP_K and j == label:
                    correct += 1
        assert abs(float(f.top.data) - correct / 100) <= 1e-4


def test_forward_per_class(f):
    layer = accuracy_layer()
    layer.setup(f.bottom, [f.top, f.per_class])
    for _ in range(3):
        layer.forward(f.bottom, [f.top, f.per_class])
        expected, per_class, _ = reference(f.data.data, f.label.data)
        assert abs(float(f.top.data) - expected) <= 1e-4
        np.testing.assert_allclose(f.per_class.data, per_class, rtol=0, atol=1e-4)


def test_forward_per_class_with_ignore_label(f):
    layer = accuracy_layer(ignore_label=-1)
    _ignore_three(f)
    layer.setup(f.bottom, [f.top, f.per_class])
    for _ in range(3):
        layer.forward(f.bottom, [f.top, f.per_class])
        expected, per_class, count = reference(
            f.data.data, f.label.data, ignore_label=-1
        )
        assert count == 97
        assert abs(float(f.top.data) - expected) <= 1e-4
        np.testing.assert_allclose(f.per_class.data, per_class, rtol=0, atol=1e-4)


# ------------------------------------------------------------ netlite extras
def _run(layer, scores, labels, dtype, per_class=False):
    bottom = [make_blob(np.shape(scores), dtype, scores),
              make_blob(np.shape(labels), dtype, labels)]
    top = [Blob(dtype=dtype)] + ([Blob(dtype=dtype)] if per_class else [])
    layer.setup(bottom, top)
    layer.forward(bottom, top)
    return [t.data.copy() for t in top]


def test_ties_count_against_the_true_class(dtype):
    scores = [[1.0, 1.0, 0.0], [2.0, 2.0, 2.0], [0.0, 3.0, 3.0], [5.0, 1.0, 1.0]]
    labels = [0, 2, 1, 0]
    # argmax-first would call rows 0 and 3 correct; with ties against the
    # true class only row 3 is (row 0: two classes >= the true score).
    (acc,) = _run(accuracy_layer(), scores, labels, dtype)
    assert float(acc) == 0.25
    (acc,) = _run(accuracy_layer(top_k=2), scores, labels, dtype)
    assert float(acc) == 0.75  # rows 0, 2 and 3
    (acc,) = _run(accuracy_layer(top_k=3), scores, labels, dtype)
    assert float(acc) == 1.0


def test_top_k_equal_to_num_classes_is_always_right(f):
    layer = accuracy_layer(top_k=10)
    layer.setup(f.bottom, [f.top])
    layer.forward(f.bottom, [f.top])
    assert float(f.top.data) == 1.0


def test_no_valid_label_gives_zero(dtype):
    acc, per_class = _run(accuracy_layer(ignore_label=7), [[1.0, 2.0], [3.0, 0.0]],
                          [7, 7], dtype, per_class=True)
    assert float(acc) == 0.0
    np.testing.assert_array_equal(per_class, [0.0, 0.0])


def test_per_class_zero_for_unseen_class(dtype):
    scores = [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    _, per_class = _run(accuracy_layer(), scores, [1, 2, 0], dtype, per_class=True)
    np.testing.assert_array_equal(per_class, [1.0, 1.0, 0.0])


def test_ignored_label_may_be_out_of_range(dtype):
    (acc,) = _run(accuracy_layer(ignore_label=255), [[0.0, 1.0], [1.0, 0.0]],
                  [1, 255], dtype)
    assert float(acc) == 1.0


@pytest.mark.parametrize(
    "bad, why",
    [(2.5, "not an integer"), (10, r"outside \[0, 10\)"), (-1, r"outside \[0, 10\)"),
     (np.nan, "not an integer"), (np.inf, "not an integer")],
)
def test_bad_labels(f, bad, why):
    f.label.data[17] = bad
    layer = accuracy_layer(name="top1")
    layer.setup(f.bottom, [f.top])
    # The message every label-checking layer shares (layers/_labels.py).
    value = re.escape(repr(float(f.label.data[17])))
    with pytest.raises(LabelError, match=(
            rf"^Accuracy layer 'top1': label {value} at index \(17,\) "
            r"\(flat position 17\) of bottom\[1\] \(the labels, shape "
            rf"\(100,\)\) is {why}.* along axis 1 \(C = 10\)$")):
        layer.forward(f.bottom, [f.top])


def test_bad_label_next_to_ignored(f):
    f.label.data[3] = -1
    f.label.data[4] = -2
    layer = accuracy_layer(ignore_label=-1)
    layer.setup(f.bottom, [f.top])
    with pytest.raises(LabelError, match=r"-2\.0 at index \(4,\)"):
        layer.forward(f.bottom, [f.top])


def test_nan_score_is_an_error(f):
    f.data.data[4, 2] = np.nan
    layer = accuracy_layer()
    layer.setup(f.bottom, [f.top])
    with pytest.raises(NonFiniteError, match="Accuracy layer 'acc'.*NaN"):
        layer.forward(f.bottom, [f.top])


@pytest.mark.parametrize("top_k", [11, 0])
def test_bad_top_k(f, top_k):
    with pytest.raises(LayerSetupError, match="top_k"):
        accuracy_layer(top_k=top_k).setup(f.bottom, [f.top])


def test_label_count_mismatch(f):
    f.label.reshape(99)
    with pytest.raises(ShapeError, match=r"99 labels.*100 x 1 = 100"):
        accuracy_layer().setup(f.bottom, [f.top])


def test_no_backward(f):
    layer = accuracy_layer()
    layer.setup(f.bottom, [f.top])
    layer.forward(f.bottom, [f.top])
    layer.backward([f.top], [False, False], f.bottom)  # nothing asked: fine
    with pytest.raises(NotImplementedError, match="Accuracy layer 'acc'"):
        layer.backward([f.top], [True, False], f.bottom)
    assert not layer.allow_force_backward(0)
    assert not layer.allow_force_backward(1)


def test_force_backward_net_skips_accuracy(dtype):
    net = netlite.Net(
        """
        force_backward: true
        layer { name: "in" type: "Input" top: "data" top: "label"
                input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }
        layer { name: "acc" type: "Accuracy" bottom: "data" bottom: "label"
                top: "accuracy" }
        layer { name: "loss" type: "HingeLoss" bottom: "data" bottom: "label"
                top: "loss" }
        """,
        netlite.TRAIN, dtype=dtype,
    )
    net.blobs["data"].data[...] = [[3, 0, 0], [0, 3, 0], [0, 0, 3], [3, 0, 0]]
    net.blobs["label"].data[...] = [0, 1, 2, 1]
    net.forward()
    assert float(net.blobs["accuracy"].data) == 0.75
    net.backward()  # Caffe aborts here (Accuracy has no backward)
    assert np.any(net.blobs["data"].diff != 0)


# ------------------------------------------------ happynear: min_is_better
def test_min_is_better_picks_the_smallest_score(dtype):
    # Distances: the smallest is the prediction.  Ties count against the
    # true class, as for the largest (happynear's <=).
    scores = [[0.1, 0.5, 0.9], [2.0, 2.0, 3.0], [3.0, 1.0, 1.0], [0.0, 1.0, 2.0]]
    labels = [0, 1, 2, 2]
    (acc,) = _run(accuracy_layer(min_is_better=True), scores, labels, dtype)
    assert float(acc) == 0.25  # row 0 only; rows 1, 2 tie, row 3 is wrong
    (acc,) = _run(accuracy_layer(min_is_better=True, top_k=2), scores, labels,
                  dtype)
    assert float(acc) == 0.75  # rows 0, 1 and 2
    (acc,) = _run(accuracy_layer(min_is_better=False), scores, labels, dtype)
    assert float(acc) == 0.25  # row 3 only


def test_min_is_better_equals_max_rule_on_negated_scores(f):
    # The rule is the default one on -x, ties included.
    scores = np.round(f.data.data * 4) / 4  # many ties
    labels = f.label.data
    for top_k in (1, 3):
        (a,) = _run(accuracy_layer(min_is_better=True, top_k=top_k), scores,
                    labels, f.dtype)
        (b,) = _run(accuracy_layer(top_k=top_k), -scores, labels, f.dtype)
        assert float(a) == float(b)


def test_min_is_better_false_is_the_default():
    assert accuracy_layer().layer_param.accuracy_param.min_is_better is False
