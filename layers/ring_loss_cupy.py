"""CuPy engine for RingLoss: kernels and the adapter :class:`RingLossCuPy`.

Features are the rows of the ``(M, D)`` view, ``x[r * D + j]``.

* **Norms**: a CuPy ``ReductionKernel`` over axis 1 sums ``x * x`` (the
  product in the blob's dtype) in a float64 accumulator and rounds the sum
  to the dtype before the square root, as the reference holds it.
* **Per-sample loss**: one thread per sample, ``d = n - R`` (Charbonnier:
  ``n + eps - R``) and ``l = 0.5 d d`` (``sqrt(d d + eps)``) in the
  reference's order and dtype, copied to ``top[0]`` with
  ``per_position``; otherwise their float64 sum, rounded, over ``max(M,
  1)``.  The radius from the first batch is the float64 mean of the norms.
* **Backward**: one thread per sample gives ``coef = g * slope`` (scalar
  top: ``(g / max(M, 1)) * slope``; ``slope = d / max(l, tiny)`` for
  Charbonnier, ``d`` squared); R's diff gets ``-= sum(coef)`` (float64
  sum, rounded); one thread per element ``dx = coef * (x / max(n,
  tiny))``.
* **Checks**: one device-to-host read decides whether the top is finite and
  R non-negative; if not, the adapter runs the reference's forward (and
  then its backward), which raises the reference's NonFiniteError or warns
  about a negative radius.  An empty bottom runs the reference.

Kernel factories are memoised by dtype and build nothing at import time.
See docs/layers/ring_loss.md, appendix "The CuPy kernels".
"""

import functools

import cupy
import numpy as np

from netlite.layer import TRAIN, EngineAdapter
from netlite.layers.ring_loss import CHARBONNIER

_LOSS_SOURCE = """
    const T d = charb ? n + eps - r[0] : n - r[0];
    gap = d;
    loss = charb ? (T)sqrt(d * d + eps) : (T)0.5 * d * d;
"""

_COEF_SOURCE = """
    const T slope = charb ? gap / (loss > tiny ? loss : tiny) : gap;
    coef = per_position ? g[i] * slope : (g[0] / denom) * slope;
"""

_DX_SOURCE = """
    const ptrdiff_t j = i;
    const ptrdiff_t r = j / D;
    const T m = n[r] > tiny ? n[r] : tiny;
    dx[j] = coef[r] * (x[j] / m);
"""


@functools.cache
def row_norm_kernel(dtype):
    """ReductionKernel ``ring_norm``: ``sqrt((T) sum(x * x))`` over the
    reduced axis, float64 accumulator."""
    del dtype  # generic in T; the key keeps one kernel per dtype
    return cupy.ReductionKernel(
        "T x", "T n", "(double)(x * x)", "a + b", "n = (T)sqrt((T)a)", "0",
        name="ring_norm", reduce_type="float64",
    )


@functools.cache
def loss_kernel(dtype):
    """ElementwiseKernel ``ring_loss``: per-sample gap and loss."""
    del dtype
    return cupy.ElementwiseKernel(
        "T n, raw T r, T eps, bool charb", "T gap, T loss", _LOSS_SOURCE,
        name="ring_loss",
    )


@functools.cache
def coef_kernel(dtype):
    """ElementwiseKernel ``ring_coef``: per-sample ``dE/dn``."""
    del dtype
    return cupy.ElementwiseKernel(
        "T gap, T loss, raw T g, T denom, T tiny, bool per_position, bool charb",
        "T coef", _COEF_SOURCE, name="ring_coef",
    )


@functools.cache
def dx_kernel(dtype):
    """ElementwiseKernel ``ring_dx``: ``dx = coef * x / max(n, tiny)`` (one
    thread per element)."""
    del dtype
    return cupy.ElementwiseKernel(
        "raw T x, raw T n, raw T coef, int32 D, T tiny", "raw T dx", _DX_SOURCE,
        name="ring_dx",
    )


# ------------------------------------------------------------------- API
def ring_norms(x, m, d):
    """The ``m`` row norms of the ``(m, d)`` view of flat ``x``."""
    return row_norm_kernel(np.dtype(x.dtype))(x.reshape(m, d), axis=1)


def ring_loss(norm, radius, eps, charbonnier, loss):
    """Per-sample gap (returned) and loss (written to ``loss``)."""
    dtype = np.dtype(norm.dtype)
    gap = cupy.empty_like(norm)
    loss_kernel(dtype)(norm, radius, dtype.type(eps), bool(charbonnier), gap, loss)
    return gap


def ring_coef(gap, loss, g, denom, per_position, charbonnier):
    """Per-sample ``g * slope`` (``per_position``) or ``(g / denom) *
    slope`` (``g`` one element)."""
    dtype = np.dtype(gap.dtype)
    tiny = dtype.type(np.finfo(dtype).tiny)
    return coef_kernel(dtype)(gap, loss, g, dtype.type(denom), tiny,
                              bool(per_position), bool(charbonnier))


def ring_dx(x, norm, coef, dx, m, d):
    """``dx = coef * (x / max(norm, tiny))`` over the ``(m, d)`` view."""
    dtype = np.dtype(x.dtype)
    tiny = dtype.type(np.finfo(dtype).tiny)
    dx_kernel(dtype)(x, norm, coef, np.int32(d), tiny, dx, size=m * d)


# --------------------------------------------------------------- adapter
class RingLossCuPy(EngineAdapter):
    """RingLoss on the GPU; keeps the norms, gaps and per-sample losses of
    the last forward (device arrays) for the backward."""

    def __init__(self, layer):
        super().__init__(layer)
        self.norm = self.gap = self.loss = None
        self.reference = False

    def forward(self, bottom, top):
        layer = self.layer
        self.norm = self.gap = self.loss = None
        self.reference = bottom[0].count == 0
        if self.reference:
            layer.forward_cpu(bottom, top)
            return
        dtype = layer.dtype
        m, d = layer.num, layer.dim
        norm = ring_norms(bottom[0].flat_data, m, d)
        radius = layer.blobs[0].data
        if (layer.from_first_batch and not layer.radius_initialised
                and layer.phase == TRAIN):
            radius[...] = (norm.sum(dtype=cupy.float64) / m).astype(dtype)
            layer.radius_initialised = True
        charb = layer.ring_type == CHARBONNIER
        loss = cupy.empty_like(norm)
        gap = ring_loss(norm, radius, layer.eps, charb, loss)
        if layer.per_position:
            cupy.copyto(top[0].data, loss)
        else:
            total = loss.sum(dtype=cupy.float64).astype(dtype)
            top[0].data[...] = total / dtype.type(max(m, 1))
        # One device-to-host read: a finite top and R >= 0, or the reference.
        suspect = cupy.logical_or(~cupy.isfinite(top[0].data).all(), radius[0] < 0)
        if bool(suspect):
            self.reference = True
            layer.forward_cpu(bottom, top)  # raises, or warns and computes
            return
        self.norm, self.gap, self.loss = norm, gap, loss

    def backward(self, top, propagate_down, bottom):
        layer = self.layer
        if self.reference:
            layer.backward_cpu(top, propagate_down, bottom)
            return
        grad_r = layer.propagates_param(0)
        if not (grad_r or propagate_down[0]):
            return
        m, d = layer.num, layer.dim
        coef = ring_coef(self.gap, self.loss, top[0].flat_diff, max(m, 1),
                         layer.per_position, layer.ring_type == CHARBONNIER)
        if grad_r:
            diff = layer.blobs[0].diff
            diff -= coef.sum(dtype=cupy.float64).astype(layer.dtype)
        if propagate_down[0]:
            ring_dx(bottom[0].flat_data, self.norm, coef, bottom[0].flat_diff, m, d)
