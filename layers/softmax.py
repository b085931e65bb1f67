"""Softmax: normalised exponentials along one axis.

See docs/layers/softmax.md.
"""

import numpy as np

from netlite.errors import LayerSetupError
from netlite.layer import Layer
from netlite.registry import register_layer

#: Problems with fewer elements than this run the single-threaded Numba
#: kernels: waking the thread pool costs more than the work saves.
PARALLEL_MIN_ELEMENTS = 1 << 15


def softmax_dims(layer, blob, axis):
    """Canonicalise ``axis`` for ``blob``; return ``(axis, outer, C, inner)``.

    Raises
    ------
    LayerSetupError
        When ``axis`` is out of range for the blob (message names ``layer``).
    """
    try:
        axis = blob.canonical_axis_index(axis)
    except IndexError as exc:
        raise LayerSetupError(
            f"{layer.describe()}: softmax_param.axis: {exc}"
        ) from None
    return (
        axis,
        blob.count_range(0, axis),
        blob.shape[axis],
        blob.count_range(axis + 1),
    )


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

    #: Scratch rows reused by the Numba kernels (see softmax_numba.scratch).
    _buffers = None

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
        # dot is computed before dx is written: dx may alias dy (in-place).
        dot = (dy * y).sum(axis=1, keepdims=True)
        self.xp.subtract(dy, dot, out=dx)
        dx *= y

    # ------------------------------------------------------------- numba
    def forward_numba(self, bottom, top):
        if bottom[0].count == 0:
            return
        from netlite.layers import softmax_numba as kernels

        self._buffers = kernels.softmax_fwd(
            bottom[0].flat_data, top[0].flat_data, self.outer, self.channels,
            self.inner, bottom[0].count >= PARALLEL_MIN_ELEMENTS, self._buffers,
        )

    def backward_numba(self, top, propagate_down, bottom):
        if not propagate_down[0] or bottom[0].count == 0:
            return
        from netlite.layers import softmax_numba as kernels

        self._buffers = kernels.softmax_bwd(
            top[0].flat_data, top[0].flat_diff, bottom[0].flat_diff,
            self.outer, self.channels, self.inner, False,
            bottom[0].count >= PARALLEL_MIN_ELEMENTS, self._buffers,
        )

    # -------------------------------------------------------------- cupy
    def forward_gpu(self, bottom, top):
        if bottom[0].count == 0:
            return
        from netlite.layers import softmax_cupy as kernels

        kernels.softmax_fwd(
            bottom[0].flat_data, top[0].flat_data, self.outer, self.channels,
            self.inner,
        )

    def backward_gpu(self, top, propagate_down, bottom):
        if not propagate_down[0] or bottom[0].count == 0:
            return
        from netlite.layers import softmax_cupy as kernels

        kernels.softmax_bwd(
            top[0].flat_data, top[0].flat_diff, bottom[0].flat_diff,
            self.outer, self.channels, self.inner, False,
        )
