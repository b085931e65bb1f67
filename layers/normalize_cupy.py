"""CuPy engine for Normalize: kernels and the adapter :class:`NormalizeCuPy`.

The ``(outer, C, inner)`` view of a blob is addressed as
``x[(o * C + c) * inner + k]`` and the norm as ``n[o * inner + k]``.

* **Norms**: a CuPy ``ReductionKernel`` over axis 1 of the ``(outer, C,
  inner)`` view sums ``x * x`` (L2) or ``|x|`` (L1) per position in a
  float64 accumulator (the product in the blob's dtype, as in the
  reference); one small element-wise kernel then rounds the sum to the
  dtype and forms ``sqrt(s + eps)`` (L2) or ``s + eps`` (L1), as the
  reference holds it.  The reduction serves rows (``inner == 1``) and
  strided positions (``inner > 1``) alike.
* **Divide**: one thread per element, ``y = x / n`` (``y`` may be ``x``).
* **Backward**: the same reduction gives ``dot = sum_c y g`` per position
  (rounded to the dtype), then one thread per element forms
  ``dx = (g - t dot) [/ n] [+ t h]`` in the reference's order and dtype
  (``t = y`` for L2, ``sign(y)`` for L1; ``dx`` may be ``g``).
* **Non-finite input**: before anything is written the adapter checks that
  every norm is finite (one device-to-host flag); if not, it runs the
  reference, which raises the reference's NonFiniteError or, for finite
  input whose sum of squares overflowed, divides as the reference does.

Kernel factories are memoised by dtype and build nothing at import time.
See docs/layers/normalize.md, appendix "The CuPy kernels".
"""

import functools

import cupy
import numpy as np

from netlite.layer import EngineAdapter

_NORM_SUM_MAP = {True: "(double)(x * x)", False: "(double)fabs(x)"}

_NORM_FINISH_SOURCE = """
    const T v = (T)s + eps;
    n = l2 ? (T)sqrt(v) : v;
"""

_DIVIDE_SOURCE = """
    const ptrdiff_t j = i;
    const ptrdiff_t p = (j / ((ptrdiff_t)C * inner)) * inner + j % inner;
    y[j] = x[j] / n[p];
"""

_BWD_SOURCE = """
    const ptrdiff_t j = i;
    const ptrdiff_t p = (j / ((ptrdiff_t)C * inner)) * inner + j % inner;
    const T yv = y[j];
    const T t = l2 ? yv : (yv > (T)0 ? (T)1 : (yv < (T)0 ? (T)-1 : (T)0));
    T d = g[j] - t * dot[p];
    if (!fix) {
        d = d / n[p];
    }
    if (bp) {
        d = d + t * h[p];
    }
    dx[j] = d;
"""


@functools.cache
def norm_sum_kernel(dtype, l2):
    """ReductionKernel: the float64 sum of ``x * x`` (L2) or ``|x|`` (L1)
    over the reduced axes (the products in ``dtype``)."""
    del dtype  # generic in T; the key keeps one kernel per dtype
    return cupy.ReductionKernel(
        "T x", "float64 s", _NORM_SUM_MAP[bool(l2)], "a + b", "s = a", "0",
        name="normalize_sum_l2" if l2 else "normalize_sum_l1",
        reduce_type="float64",
    )


@functools.cache
def norm_finish_kernel(dtype):
    """ElementwiseKernel: ``n = sqrt((T)s + eps)`` (L2) or ``(T)s + eps``."""
    del dtype
    return cupy.ElementwiseKernel(
        "float64 s, T eps, bool l2", "T n", _NORM_FINISH_SOURCE,
        name="normalize_norm",
    )


@functools.cache
def dot_kernel(dtype):
    """ReductionKernel: ``sum(y * g)`` over the reduced axes, float64
    accumulator, rounded to the dtype."""
    del dtype
    return cupy.ReductionKernel(
        "T y, T g", "T d", "(double)(y * g)", "a + b", "d = (T)a", "0",
        name="normalize_dot", reduce_type="float64",
    )


@functools.cache
def divide_kernel(dtype):
    """ElementwiseKernel: ``y = x / n`` over the ``(outer, C, inner)``
    view (one thread per element; ``y`` may be ``x``)."""
    del dtype
    return cupy.ElementwiseKernel(
        "raw T x, raw T n, int32 C, int32 inner", "raw T y", _DIVIDE_SOURCE,
        name="normalize_divide",
    )


@functools.cache
def backward_kernel(dtype):
    """ElementwiseKernel: ``dx = (g - t dot) [/ n] [+ t h]`` (one thread
    per element; ``dx`` may be ``g``)."""
    del dtype
    return cupy.ElementwiseKernel(
        "raw T y, raw T g, raw T dot, raw T n, raw T h, int32 C, int32 inner, "
        "bool l2, bool fix, bool bp",
        "raw T dx", _BWD_SOURCE, name="normalize_bwd",
    )


# ------------------------------------------------------------------- API
def normalize_norm(x, norm, outer, c, inner, eps, l2):
    """``norm = ||x||`` per position of the ``(outer, c, inner)`` view of
    flat ``x`` (``norm`` flat, ``outer * inner`` long, of x's dtype)."""
    dtype = np.dtype(x.dtype)
    sums = norm_sum_kernel(dtype, bool(l2))(x.reshape(outer, c, inner), axis=1)
    norm_finish_kernel(dtype)(sums.reshape(-1), dtype.type(eps), bool(l2), norm)


def normalize_divide(x, norm, y, outer, c, inner):
    """``y = x / norm`` over the ``(outer, c, inner)`` view (``y`` may be
    ``x``)."""
    divide_kernel(np.dtype(x.dtype))(
        x, norm, np.int32(c), np.int32(inner), y, size=outer * c * inner)


def normalize_bwd(y, g, norm, h, dx, outer, c, inner, l2, fix, bp):
    """``dx = (g - t (y . g)) [/ norm] [+ t h]`` over the ``(outer, c,
    inner)`` view (``fix`` drops the division, ``bp`` adds the norm diff
    ``h``).  ``dx`` may be ``g``."""
    dtype = np.dtype(y.dtype)
    dot = dot_kernel(dtype)(y.reshape(outer, c, inner), g.reshape(outer, c, inner),
                            axis=1)
    backward_kernel(dtype)(
        y, g, dot.reshape(-1), norm, h, np.int32(c), np.int32(inner), bool(l2),
        bool(fix), bool(bp), dx, size=outer * c * inner)


# --------------------------------------------------------------- adapter
class NormalizeCuPy(EngineAdapter):
    """Normalize on the GPU; owns, when the layer has no norm top, the
    norms its backward reads (a device array)."""

    def __init__(self, layer):
        super().__init__(layer)
        self.norm = None

    def _norm(self, top, dtype, size):
        if len(top) > 1:
            return top[1].flat_data
        if self.norm is None or self.norm.size != size or self.norm.dtype != dtype:
            self.norm = cupy.empty(size, dtype=dtype)
        return self.norm

    def forward(self, bottom, top):
        layer = self.layer
        if bottom[0].count == 0:
            layer.forward_cpu(bottom, top)
            return
        x, y = bottom[0].flat_data, top[0].flat_data
        outer, c, inner = layer.outer, layer.channels, layer.inner
        norm = self._norm(top, x.dtype, outer * inner)
        normalize_norm(x, norm, outer, c, inner, layer.eps, layer.l2)
        # One device-to-host flag; nothing is written to y before it.
        if not bool(cupy.isfinite(norm).all()):
            # Raises the reference's NonFiniteError for non-finite input;
            # for finite input whose sum overflowed, the reference's x / inf
            # (the norms the backward reads are already written).
            layer.forward_cpu(bottom, top)
            return
        normalize_divide(x, norm, y, outer, c, inner)

    def backward(self, top, propagate_down, bottom):
        layer = self.layer
        if not propagate_down[0]:
            return
        if bottom[0].count == 0:
            layer.backward_cpu(top, propagate_down, bottom)
            return
        outer, c, inner = layer.outer, layer.channels, layer.inner
        y = top[0].flat_data
        norm = self._norm(top, y.dtype, outer * inner)
        h = top[1].flat_diff if layer.bp_norm else norm
        normalize_bwd(y, top[0].flat_diff, norm, h, bottom[0].flat_diff, outer,
                      c, inner, layer.l2, layer.fix_gradient, layer.bp_norm)
