"""Accuracy: top-k classification accuracy (a metric; no backward).

See docs/layers/accuracy.md.
"""

from netlite.errors import LayerSetupError, NonFiniteError, ShapeError
from netlite.layer import Layer
from netlite.layers._labels import label_codes
from netlite.registry import register_layer


@register_layer("Accuracy")
class AccuracyLayer(Layer):
    r"""Fraction of samples whose true class is among the ``top_k`` scores.

    Type ``"Accuracy"``.  With ``bottom[0]`` viewed as ``(outer, C, inner)``
    around ``axis`` and ``l`` the label of position ``(n, i)``, a position
    is correct when

    .. math:: \#\{c : x_{n,c,i} \ge x_{n,l,i}\} \le k

    (ties count against the true class); with ``min_is_better``
    (happynear) the smallest scores win: ``x_{n,c,i} <= x_{n,l,i}``.
    Positions whose label equals
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
        allowed), ``ignore_label`` (unset), ``min_is_better`` (false).

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
        self.min_is_better = bool(p.min_is_better)

    def reshape(self, bottom, top):
        self.axis = self.canonical_axis(bottom[0],
                                        self.layer_param.accuracy_param.axis)
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
        labels = label_codes(self, bottom[1], self.num_classes, self.ignore_label,
                             self.axis).reshape(self.outer, 1, self.inner)
        valid = labels >= 0
        # Ignored positions are coded -1; gather at class 0 and mask.
        true_score = xp.take_along_axis(x, xp.where(valid, labels, 0), axis=1)
        # The classes that beat or tie the true one (itself included).
        better = x <= true_score if self.min_is_better else x >= true_score
        rank = better.sum(axis=1, keepdims=True)
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
