"""SoftmaxWithLoss: softmax followed by the multinomial logistic loss.

See docs/layers/softmax_loss.md.
"""

import math

from netlite.errors import NonFiniteError, ShapeError
from netlite.layer import LossLayer, cached_reshape
from netlite.layers import _targets
from netlite.layers._labels import FLT_MIN, label_codes, label_error
from netlite.layers._nonfinite import undefined_softmax_message
from netlite.layers.softmax import softmax_backward, softmax_dims
from netlite.proto import netlite_pb2
from netlite.registry import create_layer, register_layer

__all__ = ["FLT_MIN", "SoftmaxWithLossLayer"]

FULL = netlite_pb2.LossParameter.FULL
VALID = netlite_pb2.LossParameter.VALID
BATCH_SIZE = netlite_pb2.LossParameter.BATCH_SIZE
NONE = netlite_pb2.LossParameter.NONE


@register_layer("SoftmaxWithLoss")
class SoftmaxWithLossLayer(LossLayer):
    r"""Softmax over ``axis`` and the cross-entropy with integer labels.

    Type string ``"SoftmaxWithLoss"``.

    Bottoms: ``bottom[0]`` the scores ``x``, any shape, viewed as
    ``(outer, C, inner)`` around ``axis``; ``bottom[1]`` the labels ``l``,
    any shape with ``outer * inner`` elements, class indices stored as
    floats.  Tops: ``top[0]`` the scalar loss ``L``; optional ``top[1]``
    the probabilities ``p``, shaped like ``x`` and sharing the data of the
    internal softmax output.

    .. math:: L = -\frac{1}{Z} \sum_{(i, k) \in V}
              \log \max\left(p_{i, l_{ik}, k},\ \mathrm{FLT\_MIN}\right),
              \qquad p = \mathrm{softmax}(x)

    with ``V`` the positions whose label is not ``ignore_label``.

    Parameters
    ----------
    softmax_param.axis : int, default 1
        The class axis (negative counts from the end).
    loss_param.ignore_label : int, optional
        Positions with this label add nothing to the loss or gradient.
    loss_param.normalization : {FULL, VALID, BATCH_SIZE, NONE}, default VALID
        ``Z`` = ``outer * inner``, ``|V|``, ``outer``, or 1; always at
        least 1.
    loss_param.normalize : bool, optional
        Legacy: true means VALID and false BATCH_SIZE, used only when
        ``normalization`` is not set.
    loss_param.class_weight, weight_normalization, label_smoothing,
    temperature, per_position :
        netlite extensions (docs/layers/softmax_loss.md §8, maths in
        ``layers/_targets.py``); with any of them set, or with target
        probabilities in ``bottom[1]`` (the scores' shape, ``C > 1``), the
        layer runs that reference path on every engine.
    loss_weight : float, default 1 for top[0] and 0 for top[1]

    Raises
    ------
    LayerSetupError
        For a bad extension parameter (docs §8.1).
    ShapeError
        When the label count differs from ``outer * inner``, or ``C = 0``,
        or ``class_weight`` does not have ``C`` values.
    LabelError
        For a label that is not an integer, or that lies outside
        ``[0, C)`` and is not ``ignore_label``.
    NonFiniteError
        When the loss is not finite: some position in ``V`` has a NaN or
        +inf score, or only -inf scores.

    Notes
    -----
    The Softmax is an internal layer built through the registry from a copy
    of this layer's parameters with type "Softmax" and no loss weights
    (Caffe bug #2968 otherwise makes the two-top form unbuildable).  The
    diff of a second top is back-propagated through the softmax and added
    to ``bottom[0].diff`` (Caffe ignores it).
    """

    exact_num_top_blobs = -1
    min_top_blobs = 1
    max_top_blobs = 2
    #: Whether ``bottom[1]`` may hold target probabilities (FocalLoss: no).
    accepts_soft_targets = True
    #: Whether the loss without extensions is the plain cross-entropy that
    #: the Numba and CuPy kernels compute (FocalLoss: no).
    plain_cross_entropy = True

    def layer_setup(self, bottom, top):
        super().layer_setup(bottom, top)
        # Validate the axis here so that the error names this layer.
        softmax_dims(self, bottom[0], self.layer_param.softmax_param.axis)
        param = netlite_pb2.LayerParameter()
        param.CopyFrom(self.layer_param)
        param.type = "Softmax"
        del param.loss_weight[:]
        self.softmax_layer = create_layer(param, dtype=self.dtype, device=self.device)
        self.prob = self.make_blob()
        self.softmax_bottom, self.softmax_top = [bottom[0]], [self.prob]
        self.softmax_layer.setup(self.softmax_bottom, self.softmax_top)

        loss_param = self.layer_param.loss_param
        self.ignore_label = (int(loss_param.ignore_label)
                             if loss_param.HasField("ignore_label") else None)
        if (not loss_param.HasField("normalization")
                and loss_param.HasField("normalize")):
            self.normalization = VALID if loss_param.normalize else BATCH_SIZE
        else:
            self.normalization = loss_param.normalization
        self.valid_count = 0
        self.z = 1.0  # the divisor of the last extended forward
        self.ext = _targets.LossExtensions(self, loss_param)
        self.soft_targets = False
        #: Any extension in use: the plain kernels do not apply (reshape
        #: adds target probabilities, which only the data's shape tells).
        self.extended = not self.plain_cross_entropy or self.ext.active

    @cached_reshape
    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        self.axis, self.outer, self.channels, self.inner = softmax_dims(
            self, bottom[0], self.layer_param.softmax_param.axis
        )
        if self.channels == 0:
            raise ShapeError(
                f"{self.describe()}: the scores {bottom[0].shape} have no "
                f"classes along softmax axis {self.axis}"
            )
        self.soft_targets = (self.accepts_soft_targets and self.channels > 1
                             and bottom[1].shape == bottom[0].shape)
        self.extended = (not self.plain_cross_entropy or self.ext.active
                         or self.soft_targets)
        if self.soft_targets and self.ext.label_weighted:
            raise ShapeError(
                f"{self.describe()}: weight_normalization: LABEL_WEIGHTED sums "
                "the weights of hard labels, but bottom[1] "
                f"{bottom[1].shape} holds target probabilities; use WEIGHTED")
        if not self.soft_targets and bottom[1].count != self.outer * self.inner:
            raise ShapeError(
                f"{self.describe()}: the label blob must have outer * inner = "
                f"{self.outer} * {self.inner} = {self.outer * self.inner} "
                f"elements (one label per position of the scores, softmax "
                f"axis {self.axis}); scores {bottom[0].shape}, labels "
                f"{bottom[1].shape}"
            )
        if self.ext.class_weight is not None:
            _targets.class_weights(self, self.channels)  # checks the length
        self.softmax_bottom[0] = bottom[0]
        self.softmax_layer.reshape(self.softmax_bottom, self.softmax_top)
        if len(top) > 1:
            top[1].reshape_like(bottom[0])
            top[1].share_data(self.prob)
        if self.ext.per_position:
            # One loss per position: the scores' shape without the class axis.
            shape = bottom[0].shape
            top[0].reshape(shape[:self.axis] + shape[self.axis + 1:])
            if self.loss(0):
                top[0].diff[...] = self.loss(0)  # a grown top lost its weight

    def normalizer(self, valid_count):
        """Caffe's ``get_normalizer``: the divisor ``Z``, at least 1."""
        if self.normalization == FULL:
            z = self.outer * self.inner
        elif self.normalization == VALID:
            z = valid_count
        elif self.normalization == BATCH_SIZE:
            z = self.outer
        else:  # NONE
            z = 1
        return float(max(1, z))

    # --------------------------------------------------------- reference
    def forward_cpu(self, bottom, top):
        if self.extended:
            self.forward_extended(bottom, top)
            return
        xp = self.xp
        self.softmax_layer.forward_cpu(self.softmax_bottom, self.softmax_top)
        p = self.prob.data.reshape(self.outer, self.channels, self.inner)
        label = self.label_codes(bottom[1])  # l, or IGNORED
        valid = label >= 0  # V
        p_l = xp.take_along_axis(p, xp.maximum(label, 0)[:, None, :], axis=1)[:, 0]
        log_p = xp.log(xp.maximum(p_l, self.dtype.type(FLT_MIN)))
        self.valid_count = int(xp.count_nonzero(valid))
        loss = -xp.where(valid, log_p, 0).sum()
        top[0].data[...] = loss / self.normalizer(self.valid_count)
        self.check_finite(float(top[0].data), bottom[0], label)

    def backward_cpu(self, top, propagate_down, bottom):
        self.check_no_label_backward(propagate_down)
        if not propagate_down[0]:
            return
        if self.extended:
            self.backward_extended(top, bottom)
            return
        xp = self.xp
        shape3 = (self.outer, self.channels, self.inner)
        p = self.prob.data.reshape(shape3)
        dx = bottom[0].diff.reshape(shape3)
        label = self.label_codes(bottom[1])
        valid = label >= 0
        dx[...] = p
        i, k = xp.nonzero(valid)
        dx[i, label[i, k], k] -= 1
        # where(), not a multiplication: ignored scores may be NaN.
        dx[...] = xp.where(valid[:, None, :], dx, 0)
        dx *= top[0].diff.reshape(()) / self.dtype.type(
            self.normalizer(self.valid_count)
        )
        if len(top) > 1:
            softmax_backward(xp, p, top[1].diff.reshape(shape3), dx, accumulate=True)

    # -------------------------------------------------------- extensions
    def forward_extended(self, bottom, top):
        """The forward with a netlite extension (§8): per-position losses
        from :meth:`position_losses`, kept (per_position) or summed and
        divided by :meth:`extended_normalizer`."""
        prob = self.prob.data.reshape(self.outer, self.channels, self.inner)
        loss, wbar, codes = self.position_losses(bottom, prob)
        self.valid_count = int(self.xp.count_nonzero(codes >= 0))
        total = float(loss.sum())
        if self.ext.per_position:
            top[0].data[...] = loss.reshape(top[0].shape)
        else:
            self.z = self.extended_normalizer(wbar, codes)
            top[0].data[...] = total / self.z
        self.check_finite(total, bottom[0], codes)

    def backward_extended(self, top, bottom):
        """``dx = g * dy`` per position (per_position) or ``g * w / Z``,
        ``g`` from :meth:`position_gradients`; plus top[1]'s diff through
        ``q = softmax(x / T)``."""
        shape3 = (self.outer, self.channels, self.inner)
        q = self.prob.data.reshape(shape3)
        if self.ext.per_position:
            scale = top[0].diff.reshape(self.outer, 1, self.inner)
        else:
            scale = top[0].diff.reshape(()) / self.dtype.type(self.z)
        dx = bottom[0].diff.reshape(shape3)
        dx[...] = self.position_gradients(q) * scale
        if len(top) > 1:
            dq = self.xp.empty_like(dx)
            softmax_backward(self.xp, q, top[1].diff.reshape(shape3), dq)
            dx += dq / self.dtype.type(self.ext.temperature)

    def position_losses(self, bottom, prob):
        """``(loss, wbar, codes)`` per position; writes ``q`` into ``prob``
        (``_targets.cross_entropy``; FocalLoss overrides)."""
        return _targets.cross_entropy(self, bottom, prob)

    def position_gradients(self, prob):
        """``d loss / dx`` per position, ``(outer, C, inner)``."""
        return _targets.cross_entropy_gradient(self, prob)

    def extended_normalizer(self, wbar, codes):
        """``Z``: ``max(sum of wbar, FLT_MIN)`` for WEIGHTED, the labels'
        weights summed (floored likewise) for LABEL_WEIGHTED, else
        :meth:`normalizer` of the valid count."""
        if self.ext.label_weighted:
            w = _targets.class_weights(self, self.channels)
            return max(float(w[codes[codes >= 0]].sum()), FLT_MIN)
        if self.ext.weighted:
            return max(float(wbar.sum()), FLT_MIN)
        return self.normalizer(self.valid_count)

    # ------------------------------------------------------------ checks
    def label_codes(self, label):
        """The labels as codes, shape ``(outer, inner)``: the class, or
        ``_labels.IGNORED``.  Raises LabelError for the first bad label."""
        return label_codes(self, label, self.channels, self.ignore_label,
                           self.axis).reshape(self.outer, self.inner)

    def label_error(self, label, index):
        """The LabelError for the bad label at flat ``index`` (for engines
        whose kernels classify the labels themselves)."""
        return label_error(self, label, index, self.channels, self.ignore_label,
                           self.axis)

    def check_finite(self, loss, scores, codes):
        """Raise NonFiniteError when the loss (a float) is not finite; the
        label codes (any array module, at least ``outer * inner``) let the
        message find the culprit."""
        if not math.isfinite(loss):
            raise NonFiniteError(
                undefined_softmax_message(self, loss, scores, codes, self.axis)
            )

    # ----------------------------------------------------------- engines
    def select_engine(self):
        """The reference (``"numpy"``: array-generic, so on CuPy arrays too)
        while an extension is in use, which the kernels do not compute
        (§8.6); otherwise Layer's choice."""
        return "numpy" if self.extended else super().select_engine()

    def forward_numba(self, bottom, top):
        self.adapter("numba").forward(bottom, top)

    def backward_numba(self, top, propagate_down, bottom):
        self.adapter("numba").backward(top, propagate_down, bottom)

    def forward_gpu(self, bottom, top):
        self.adapter("cupy").forward(bottom, top)

    def backward_gpu(self, top, propagate_down, bottom):
        self.adapter("cupy").backward(top, propagate_down, bottom)
