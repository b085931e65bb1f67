"""The netlite extensions of the softmax losses: class weights, label
smoothing, temperature, soft targets and per-position losses.

SoftmaxWithLoss (and FocalLoss, its subclass) keep Caffe's plain
cross-entropy in ``layers/softmax_loss.py``; the maths of the extensions
lives here so that page stays one page.  See docs/layers/softmax_loss.md
§8 for the derivation.  Everything is written with the layer's array
module ``xp`` on ``(outer, C, inner)`` views.

With ``T`` the temperature, ``q = softmax(x / T)``, ``t`` the target
distribution of a position (one-hot, smoothed, or given) and ``w`` the
class weights, one position contributes

    l = -T^2 * sum_c w_c t_c log max(q_c, FLT_MIN),
    dl/dx_c = T * (wbar q_c - w_c t_c),      wbar = sum_c w_c t_c,

and ``wbar`` is also what WEIGHTED normalisation sums.
"""

import math

import numpy as np

from netlite import backend
from netlite.errors import LabelError, LayerSetupError, ShapeError
from netlite.layers._labels import FLT_MIN
from netlite.proto import netlite_pb2

VALID = netlite_pb2.LossParameter.VALID
WEIGHTED = netlite_pb2.LossParameter.WEIGHTED
LABEL_WEIGHTED = netlite_pb2.LossParameter.LABEL_WEIGHTED

#: ``log(FLT_MIN)`` = -87.3365...: the floor of every log-probability.
LOG_FLT_MIN = math.log(FLT_MIN)

#: How far a row of target probabilities may sum from 1: ``sqrt(eps)`` of
#: float32 (3.5e-4) in every dtype, so float32 targets (a teacher's
#: softmax) may feed a float64 net; unnormalised scores are far outside.
TARGET_SUM_TOLERANCE = math.sqrt(np.finfo(np.float32).eps)


class LossExtensions:
    """The netlite fields of ``loss_param``, checked at setup.

    Attributes
    ----------
    class_weight : tuple of float or None
        ``w``, one weight per class (its length is checked against ``C`` at
        reshape by :func:`class_weights`).
    weighted : bool
        ``weight_normalization: WEIGHTED`` or ``LABEL_WEIGHTED``.
    label_weighted : bool
        ``weight_normalization: LABEL_WEIGHTED`` (PyTorch's divisor).
    smoothing : float
        ``label_smoothing`` ε in ``[0, 1)``.
    temperature : float
        ``T > 0``.
    per_position : bool
        ``per_position``.
    """

    def __init__(self, layer, loss_param):
        where = f"{layer.describe()}: loss_param"
        weights = tuple(float(v) for v in loss_param.class_weight)
        for c, v in enumerate(weights):
            if not (math.isfinite(v) and v >= 0):
                raise LayerSetupError(
                    f"{where}.class_weight[{c}] is {v}; class weights must be "
                    "finite and >= 0")
        self.class_weight = weights or None
        self.label_weighted = loss_param.weight_normalization == LABEL_WEIGHTED
        self.weighted = (loss_param.weight_normalization == WEIGHTED
                         or self.label_weighted)
        if self.weighted and layer.normalization != VALID:
            mode = netlite_pb2.LossParameter.NormalizationMode.Name(
                layer.normalization)
            weighting = netlite_pb2.LossParameter.WeightNormalization.Name(
                loss_param.weight_normalization)
            raise LayerSetupError(
                f"{where}: weight_normalization: {weighting} sets the divisor "
                "itself (a sum of class weights); it cannot be combined "
                f"with normalization {mode} (or normalize: false)")
        self.smoothing = float(loss_param.label_smoothing)
        if not 0 <= self.smoothing < 1:
            raise LayerSetupError(
                f"{where}.label_smoothing is {self.smoothing}; it must lie in "
                "[0, 1)")
        self.temperature = float(loss_param.temperature)
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise LayerSetupError(
                f"{where}.temperature is {self.temperature}; it must be finite "
                "and > 0")
        self.per_position = bool(loss_param.per_position)

    @property
    def active(self):
        """Whether any extension is set (the plain kernels do not apply)."""
        return (self.class_weight is not None or self.weighted
                or self.smoothing != 0 or self.temperature != 1
                or self.per_position)


def class_weights(layer, num_classes):
    """``w`` as an array of the layer's dtype (ones without class_weight).

    Raises ShapeError when the prototxt gives a length other than ``C``.
    """
    weights = layer.ext.class_weight
    if weights is None:
        return layer.xp.ones(num_classes, dtype=layer.dtype)
    if len(weights) != num_classes:
        raise ShapeError(
            f"{layer.describe()}: loss_param.class_weight has {len(weights)} "
            f"values; the scores have C = {num_classes} classes along axis "
            f"{layer.axis}")
    return layer.xp.asarray(np.asarray(weights, dtype=layer.dtype))


def log_softmax(xp, s):
    """``log softmax(s)`` over axis 1 of an ``(outer, C, inner)`` array.

    ``s - m - log1p(r)``, ``m`` the column max and ``r`` the sum of
    ``exp(s - m)`` over every class but one argmax: accurate to a few ulps
    also where one class holds almost all the mass (there ``log p`` is
    ``-r``, which ``log(1 + r)`` would round to 0).  NaN where the column's
    softmax is undefined (a NaN or +inf score, or only -inf).
    """
    m = s.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, the honest answer
        d = s - m
    e = xp.exp(d)
    top = xp.argmax(s, axis=1)[:, None, :]
    classes = xp.arange(s.shape[1]).reshape(1, -1, 1)
    rest = xp.where(classes == top, 0, e).sum(axis=1, keepdims=True)
    return d - xp.log1p(rest)


def soft_targets(layer, blob):
    """``bottom[1]`` read as target probabilities, ``(outer, C, inner)``.

    Every row (the ``C`` values of one position) must be finite, ``>= 0``
    and sum to 1 within :data:`TARGET_SUM_TOLERANCE`.  Raises LabelError
    naming the first bad row.
    """
    xp = layer.xp
    t = blob.data.reshape(layer.outer, layer.channels, layer.inner)
    tol = TARGET_SUM_TOLERANCE
    with np.errstate(invalid="ignore"):
        total = t.astype(xp.float64).sum(axis=1)
        bad_value = ~(xp.isfinite(t) & (t >= 0)).all(axis=1)
        bad = bad_value | ~(xp.abs(total - 1) <= tol)
    if bool(bad.any()):
        i, k = (int(v) for v in np.unravel_index(int(xp.argmax(bad)), bad.shape))
        row = backend.to_numpy(t[i, :, k])
        problem = ("holds a negative or non-finite value"
                   if bool(bad_value[i, k]) else
                   f"sums to {float(total[i, k])!r}, not 1 (tolerance {tol:.2g})")
        raise LabelError(
            f"{layer.describe()}: bottom[1] has the shape of the scores "
            f"{blob.shape}, so it holds target probabilities; the row of "
            f"position (outer {i}, inner {k}) along axis {layer.axis} "
            f"{problem}: {row.tolist()}")
    return t


def weighted_targets(layer, bottom):
    """The weighted targets ``w_c t_c`` of every position and its codes.

    Returns ``(wt, codes)``: ``wt`` of shape ``(outer, C, inner)`` (0 at
    ignored positions), ``codes`` of shape ``(outer, inner)``: the label
    (or 0 for soft targets), or ``_labels.IGNORED``.
    """
    xp, eps, n = layer.xp, layer.ext.smoothing, layer.channels
    w = class_weights(layer, n).reshape(1, n, 1)
    if layer.soft_targets:
        t = soft_targets(layer, bottom[1])
        codes = xp.zeros((layer.outer, layer.inner), dtype=xp.int64)
    else:
        codes = layer.label_codes(bottom[1])
        classes = xp.arange(n).reshape(1, -1, 1)
        t = (classes == codes[:, None, :]).astype(layer.dtype)
    if eps:
        t = (1 - eps) * t + eps / n
    valid = (codes >= 0)[:, None, :]
    return xp.where(valid, w * t, 0), codes


def cross_entropy(layer, bottom, prob):
    """Forward of the weighted, smoothed, tempered cross-entropy.

    Writes ``q = softmax(x / T)`` into ``prob`` (``(outer, C, inner)``);
    returns ``(loss, wbar, codes)`` per position, ``(outer, inner)`` each:
    ``loss = -T^2 sum_c w_c t_c max(log q_c, log FLT_MIN)``, 0 at ignored
    positions; ``wbar = sum_c w_c t_c``.  Keeps ``wt`` on the layer for
    :func:`cross_entropy_gradient`.
    """
    xp, temp = layer.xp, layer.dtype.type(layer.ext.temperature)
    x = bottom[0].data.reshape(prob.shape)
    log_q = log_softmax(xp, x / temp if temp != 1 else x)
    prob[...] = xp.exp(log_q)
    wt, codes = weighted_targets(layer, bottom)
    layer.weighted_target = wt
    log_q = xp.maximum(log_q, layer.dtype.type(LOG_FLT_MIN))
    valid = (codes >= 0)[:, None, :]
    # where(), not a product: an ignored position's scores may be NaN.
    terms = xp.where(valid, wt * log_q, 0)
    loss = -(temp * temp) * terms.sum(axis=1)
    return loss, wt.sum(axis=1), codes


def cross_entropy_gradient(layer, prob):
    """``d loss / dx = T (wbar q - w t)`` per position, ``(outer, C, inner)``
    (0 at ignored positions, whose ``wt`` and hence ``wbar`` are 0)."""
    wt = layer.weighted_target
    wbar = wt.sum(axis=1, keepdims=True)
    valid = wbar != 0
    grad = layer.dtype.type(layer.ext.temperature) * (wbar * prob - wt)
    return layer.xp.where(valid, grad, 0)
