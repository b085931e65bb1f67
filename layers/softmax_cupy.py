"""CuPy engine for Softmax: kernels and the adapter :class:`SoftmaxCuPy`.

One CUDA thread per ``(i, k)`` position of the ``(outer, C, inner)`` view
loops over the ``C`` channels (stride ``inner``): simple, obviously
correct, and fast enough for the channel counts of classifiers.  Kernel
factories are memoised by dtype and build nothing at import time.  See
docs/layers/softmax.md, appendix "CuPy engine".
"""

import functools

import cupy
import numpy as np

from netlite.layer import EngineAdapter

#: The softmax of one (i, k) column of the (outer, C, inner) view, written
#: to ``OUT``; shared with softmax_loss_cupy, which names its output ``prob``.
SOFTMAX_COLUMN_SOURCE = """
    const ptrdiff_t base = (ptrdiff_t)(i / inner) * C * inner + i % inner;
    T m = x[base];
    for (int c = 1; c < C; ++c) {
        const T v = x[base + (ptrdiff_t)c * inner];
        m = v > m ? v : m;
    }
    T s = 0;
    for (int c = 0; c < C; ++c) {
        s += exp(x[base + (ptrdiff_t)c * inner] - m);
    }
    for (int c = 0; c < C; ++c) {
        const ptrdiff_t j = base + (ptrdiff_t)c * inner;
        OUT[j] = exp(x[j] - m) / s;
    }
"""

_FWD_SOURCE = SOFTMAX_COLUMN_SOURCE.replace("OUT", "y")

_BWD_SOURCE = """
    const ptrdiff_t base = (ptrdiff_t)(i / inner) * C * inner + i % inner;
    T dot = 0;
    for (int c = 0; c < C; ++c) {
        const ptrdiff_t j = base + (ptrdiff_t)c * inner;
        dot += dy[j] * y[j];
    }
    for (int c = 0; c < C; ++c) {
        const ptrdiff_t j = base + (ptrdiff_t)c * inner;
        const T g = (dy[j] - dot) * y[j];
        dx[j] = accumulate ? dx[j] + g : g;
    }
"""


@functools.cache
def softmax_fwd_kernel(dtype):
    """ElementwiseKernel ``softmax_fwd`` for ``dtype`` (one thread per
    position; ``y`` may be ``x``)."""
    del dtype  # the kernel is generic in T; the key keeps one per dtype
    return cupy.ElementwiseKernel(
        "raw T x, int32 C, int32 inner", "raw T y", _FWD_SOURCE,
        name="softmax_fwd",
    )


@functools.cache
def softmax_bwd_kernel(dtype):
    """ElementwiseKernel ``softmax_bwd`` for ``dtype``."""
    del dtype
    return cupy.ElementwiseKernel(
        "raw T y, raw T dy, int32 C, int32 inner, bool accumulate", "raw T dx",
        _BWD_SOURCE, name="softmax_bwd",
    )


def softmax_fwd(x, y, outer, n, inner):
    """Softmax of the ``(outer, n, inner)`` view of flat ``x`` into ``y``."""
    softmax_fwd_kernel(np.dtype(x.dtype))(
        x, np.int32(n), np.int32(inner), y, size=outer * inner
    )


def softmax_bwd(y, dy, dx, outer, n, inner, accumulate):
    """``dx (+)= (dy - sum_c(dy * y)) * y`` over the ``(outer, n, inner)``
    view."""
    softmax_bwd_kernel(np.dtype(y.dtype))(
        y, dy, np.int32(n), np.int32(inner), bool(accumulate), dx,
        size=outer * inner,
    )


class SoftmaxCuPy(EngineAdapter):
    """Softmax on the GPU (the kernels keep no state)."""

    def forward(self, bottom, top):
        layer = self.layer
        if bottom[0].count == 0:
            return
        softmax_fwd(bottom[0].flat_data, top[0].flat_data, layer.outer,
                    layer.channels, layer.inner)

    def backward(self, top, propagate_down, bottom):
        layer = self.layer
        if not propagate_down[0] or bottom[0].count == 0:
            return
        softmax_bwd(top[0].flat_data, top[0].flat_diff, bottom[0].flat_diff,
                    layer.outer, layer.channels, layer.inner, False)
