"""Softmax: normalised exponentials along one axis.

See docs/layers/softmax.md.
"""

import numpy as np

from netlite.layer import Layer, cached_reshape
from netlite.registry import register_layer


def softmax_dims(layer, blob, axis):
    """Canonicalise ``axis`` for ``blob``; return ``(axis, outer, C, inner)``.

    Raises
    ------
    LayerSetupError
        When ``axis`` is out of range for the blob (message names ``layer``).
    """
    axis = layer.canonical_axis(blob, axis, "softmax_param.axis")
    return (
        axis,
        blob.count_range(0, axis),
        blob.shape[axis],
        blob.count_range(axis + 1),
    )


def softmax_backward(xp, y, dy, dx, accumulate=False):
    """``dx = (dy - sum_c(dy * y)) * y`` over axis 1 of ``(outer, C, inner)``
    views (``dx +=`` with ``accumulate``).

    The softmax backward of docs/layers/softmax.md §3, shared by Softmax
    and SoftmaxWithLoss (for its probability top).  ``dot`` is complete
    before ``dx`` is written, so ``dx`` may alias ``dy`` (in place) when
    overwriting.
    """
    dot = (dy * y).sum(axis=1, keepdims=True)
    if accumulate:
        dx += (dy - dot) * y
    else:
        xp.subtract(dy, dot, out=dx)
        dx *= y


@register_layer("Softmax")
class SoftmaxLayer(Layer):
    r"""Softmax over the channels of ``softmax_param.axis``.

    Type string ``"Softmax"``.  One bottom ``x`` of any shape with at least
    ``axis + 1`` axes; one top ``y`` of the same shape (in-place allowed).
    With ``outer`` = product of the dimensions before ``axis``, ``C`` =
    ``shape[axis]`` and ``inner`` = product of those after it, every
    ``(i, k)`` of the ``(outer, C, inner)`` view is normalised
    independently:

    .. math:: y_{ick} = \frac{\exp(x_{ick} - m_{ik})}
                             {\sum_{c'} \exp(x_{ic'k} - m_{ik})},
              \qquad m_{ik} = \max_{c'} x_{ic'k}.

    Parameters
    ----------
    softmax_param.axis : int, default 1
        The softmax axis; negative values count from the end.

    Notes
    -----
    Backward uses only the top's data and diff,
    ``dx = (dy - sum_c(dy * y)) * y``, so in-place use is safe.  See
    docs/layers/softmax.md for the derivation.
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    @cached_reshape
    def reshape(self, bottom, top):
        self.axis, self.outer, self.channels, self.inner = softmax_dims(
            self, bottom[0], self.layer_param.softmax_param.axis
        )
        top[0].reshape_like(bottom[0])

    def _view(self, array):
        return array.reshape(self.outer, self.channels, self.inner)

    # --------------------------------------------------------- reference
    def forward_cpu(self, bottom, top):
        if bottom[0].count == 0:
            return
        xp = self.xp
        x = self._view(bottom[0].data)
        y = self._view(top[0].data)
        m = x.max(axis=1, keepdims=True)
        # inf - inf (a +inf score, or a column of -inf) gives NaN, which is
        # the honest answer; do not let NumPy turn it into a warning.
        with np.errstate(invalid="ignore"):
            xp.subtract(x, m, out=y)
        xp.exp(y, out=y)
        y /= y.sum(axis=1, keepdims=True)

    def backward_cpu(self, top, propagate_down, bottom):
        if not propagate_down[0] or bottom[0].count == 0:
            return
        y = self._view(top[0].data)
        dy = self._view(top[0].diff)
        dx = self._view(bottom[0].diff)
        softmax_backward(self.xp, y, dy, dx)

    # ---------------------------------------------------------- engines
    def forward_numba(self, bottom, top):
        self.adapter("numba").forward(bottom, top)

    def backward_numba(self, top, propagate_down, bottom):
        self.adapter("numba").backward(top, propagate_down, bottom)

    def forward_gpu(self, bottom, top):
        self.adapter("cupy").forward(bottom, top)

    def backward_gpu(self, top, propagate_down, bottom):
        self.adapter("cupy").backward(top, propagate_down, bottom)
