"""Helpers of the tests of the SoftmaxWithLoss family (SoftmaxWithLoss's
extensions, FocalLoss): the shared ``loss_param`` fields of a test case,
its (scores, labels) bottoms, and a set-up / forward / backward run.
"""

import numpy as np
from layer_test_case import labels
from layer_testing import filler, make_blob

import netlite


def loss_param_fields(case):
    """The ``loss_param`` fields a case declares, as prototxt strings:
    ``normalization`` (``case.mode``), and ``ignore_label``,
    ``class_weight``, ``weight_normalization: WEIGHTED`` and
    ``per_position`` when set."""
    fields = [f"normalization: {case.mode}"]
    if case.ignore is not None:
        fields.append(f"ignore_label: {case.ignore}")
    if case.weight is not None:
        fields.append("class_weight: [" + ", ".join(map(str, case.weight)) + "]")
    if case.weighted:
        fields.append("weight_normalization: WEIGHTED")
    if case.per_position:
        fields.append("per_position: true")
    return fields


def scores_and_labels(shape, axis, ignore):
    """Bottoms: gaussian scores (std 2) of ``shape`` and integer labels over
    the other axes (every third one ``ignore`` when given)."""
    axis = axis % len(shape)
    label_shape = shape[:axis] + shape[axis + 1:]
    return [(shape, filler("gaussian", std=2)),
            (label_shape, labels(shape[axis], ignore, 3))]


def run_loss(layer, x, target, dtype=np.float64, top_diff=None):
    """Set up, forward and backward (from ``top_diff``, else the loss
    weight) ``layer`` on blobs of ``x`` and ``target``; return ``(loss,
    top data, bottom[0] diff)``."""
    data = make_blob(np.shape(x), dtype, x)
    label = make_blob(np.shape(target), dtype, target)
    top = [netlite.Blob(dtype=dtype)]
    layer.setup([data, label], top)
    loss = layer.forward([data, label], top)
    if top_diff is not None:
        top[0].diff[...] = top_diff
    layer.backward(top, [True, False], [data, label])
    return loss, top[0].data.copy(), data.diff.copy()
