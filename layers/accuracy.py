"""Accuracy: top-k classification accuracy (a metric; no backward).

See docs/layers/accuracy.md.
"""

import numpy as np

from netlite.errors import LabelError, LayerSetupError, NonFiniteError, ShapeError
from netlite.layer import Layer
from netlite.registry import register_layer


def check_labels(layer, label_blob, num_classes, ignore_label=None):
    """Validate class labels stored as floats; return them as int64.

    Every label must be a finite integer value; those not equal to
    ``ignore_label`` must lie in ``[0, num_classes)``.  (Caffe truncates the
    float and reads out of bounds instead.)

    Parameters
    ----------
    layer : Layer
        For error messages.
    label_blob : Blob
        ``bottom[1]``.
    num_classes : int
    ignore_label : int or None

    Returns
    -------
    labels : int64 array, shape ``(label_blob.count,)``

    Raises
    ------
    LabelError
        Naming the layer, the first offending position and its value.
    """
    xp = label_blob.xp
    labels = label_blob.flat_data
    not_int = ~xp.isfinite(labels) | (labels != xp.floor(labels))
    outside = (labels < 0) | (labels >= num_classes)
    if ignore_label is not None:
        outside &= labels != ignore_label
    bad = not_int | outside
    if bool(bad.any()):
        pos = int(xp.flatnonzero(bad)[0])
        index = tuple(int(i) for i in np.unravel_index(pos, label_blob.shape or (1,)))
        value = float(labels[pos])
        why = (
            "is not an integer class index" if bool(not_int[pos])
            else f"is outside [0, {num_classes})"
        )
        ignored = (
            "" if ignore_label is None else f" and is not ignore_label {ignore_label}"
        )
        raise LabelError(
            f"{layer.describe()}: label {value!r} at position {pos} (index {index}) of "
            f"bottom[1] (shape {label_blob.shape}) {why}{ignored}"
        )
    return labels.astype(xp.int64)


@register_layer("Accuracy")
class AccuracyLayer(Layer):
    r"""Fraction of samples whose true class is among the ``top_k`` scores.

    Type ``"Accuracy"``.  With ``bottom[0]`` viewed as ``(outer, C, inner)``
    around ``axis`` and ``l`` the label of position ``(n, i)``, a position
    is correct when

    .. math:: \#\{c : x_{n,c,i} \ge x_{n,l,i}\} \le k

    (ties count against the true class).  Positions whose label equals
    ``ignore_label`` are skipped; accuracy = correct / valid, or 0 when no
    position is valid.

    Bottoms
        ``bottom[0]`` : scores, shape ``(..., C, ...)`` with C at ``axis``;
        ``bottom[1]`` : labels, ``outer * inner`` integer values (any shape).
    Tops
        ``top[0]`` : accuracy, a scalar (0 axes);
        ``top[1]`` (optional) : per-class accuracy, shape ``(C,)``; 0 for
        classes without a valid sample.

    Parameters (``accuracy_param``)
        ``top_k`` (1; must be in ``[1, C]``), ``axis`` (1, negative
        allowed), ``ignore_label`` (unset).

    There is no gradient: backward raises when asked to propagate, and
    ``force_backward`` does not reach the bottoms.  See
    docs/layers/accuracy.md.
    """

    exact_num_bottom_blobs = 2
    min_top_blobs = 1
    max_top_blobs = 2

    def allow_force_backward(self, bottom_index):
        # A metric has no gradient; Caffe would abort under force_backward.
        return False

    def layer_setup(self, bottom, top):
        p = self.layer_param.accuracy_param
        self.top_k = int(p.top_k)
        if self.top_k < 1:
            raise LayerSetupError(
                f"{self.describe()}: top_k must be at least 1, got {self.top_k}"
            )
        self.ignore_label = int(p.ignore_label) if p.HasField("ignore_label") else None

    def reshape(self, bottom, top):
        try:
            self.axis = bottom[0].canonical_axis_index(
                self.layer_param.accuracy_param.axis
            )
        except IndexError as exc:
            raise LayerSetupError(f"{self.describe()}: axis: {exc}") from None
        self.outer = bottom[0].count_range(0, self.axis)
        self.num_classes = bottom[0].shape[self.axis]
        self.inner = bottom[0].count_range(self.axis + 1)
        if self.top_k > self.num_classes:
            raise LayerSetupError(
                f"{self.describe()}: top_k ({self.top_k}) must be less than or "
                f"equal to the number of classes ({self.num_classes}, axis "
                f"{self.axis} of bottom[0] shape {bottom[0].shape})"
            )
        if bottom[1].count != self.outer * self.inner:
            raise ShapeError(
                f"{self.describe()}: bottom[1] (labels, shape {bottom[1].shape}) "
                f"has {bottom[1].count} labels, but bottom[0] (shape "
                f"{bottom[0].shape}) with axis {self.axis} makes "
                f"{self.outer} x {self.inner} = {self.outer * self.inner} "
                "predictions"
            )
        top[0].reshape(())
        if len(top) > 1:
            top[1].reshape((self.num_classes,))

    def forward_cpu(self, bottom, top):
        xp = self.xp
        x = bottom[0].data.reshape(self.outer, self.num_classes, self.inner)
        if bool(xp.isnan(x).any()):
            # NaN compares false with everything, so it would rank first and
            # count as correct: a diverged net would report accuracy 1.
            raise NonFiniteError(
                f"{self.describe()}: bottom[0] (scores, shape {bottom[0].shape}) "
                "contains NaN"
            )
        labels = check_labels(self, bottom[1], self.num_classes, self.ignore_label)
        labels = labels.reshape(self.outer, 1, self.inner)
        if self.ignore_label is None:
            valid = xp.ones(labels.shape, dtype=bool)
        else:
            valid = labels != self.ignore_label
        # Ignored labels may be any integer; gather at class 0 and mask.
        true_score = xp.take_along_axis(x, xp.where(valid, labels, 0), axis=1)
        rank = (x >= true_score).sum(axis=1, keepdims=True)
        correct = valid & (rank <= self.top_k)
        num_valid = int(valid.sum())
        num_correct = int(correct.sum())
        top[0].data[...] = num_correct / num_valid if num_valid else 0.0
        if len(top) > 1:
            c = self.num_classes
            seen = xp.bincount(labels[valid], minlength=c)[:c]
            hits = xp.bincount(labels[correct], minlength=c)[:c]
            per_class = hits / xp.maximum(seen, 1)
            top[1].data[...] = xp.where(seen > 0, per_class, 0.0)

    def backward_cpu(self, top, propagate_down, bottom):
        if any(propagate_down):
            raise NotImplementedError(
                f"{self.describe()} has no gradient (it is a metric); do not "
                "give it a loss_weight or ask it to propagate_down"
            )
