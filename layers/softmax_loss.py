"""SoftmaxWithLoss: softmax followed by the multinomial logistic loss.

See docs/layers/softmax_loss.md.
"""

import math

from netlite.errors import NonFiniteError, ShapeError
from netlite.layer import LossLayer, cached_reshape
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
    loss_weight : float, default 1 for top[0] and 0 for top[1]

    Raises
    ------
    ShapeError
        When the label count differs from ``outer * inner``, or ``C = 0``.
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
        if bottom[1].count != self.outer * self.inner:
            raise ShapeError(
                f"{self.describe()}: the label blob must have outer * inner = "
                f"{self.outer} * {self.inner} = {self.outer * self.inner} "
                f"elements (one label per position of the scores, softmax "
                f"axis {self.axis}); scores {bottom[0].shape}, labels "
                f"{bottom[1].shape}"
            )
        self.softmax_bottom[0] = bottom[0]
        self.softmax_layer.reshape(self.softmax_bottom, self.softmax_top)
        if len(top) > 1:
            top[1].reshape_like(bottom[0])
            top[1].share_data(self.prob)

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
    def forward_numba(self, bottom, top):
        self.adapter("numba").forward(bottom, top)

    def backward_numba(self, top, propagate_down, bottom):
        self.adapter("numba").backward(top, propagate_down, bottom)

    def forward_gpu(self, bottom, top):
        self.adapter("cupy").forward(bottom, top)

    def backward_gpu(self, top, propagate_down, bottom):
        self.adapter("cupy").backward(top, propagate_down, bottom)
