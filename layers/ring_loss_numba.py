"""Numba engine for RingLoss: kernels and the adapter :class:`RingLossNumba`.

Pure functions on the flat, C-contiguous ``(M, D)`` view of the features
(sample ``i`` is ``x[i * D:(i + 1) * D]``).  Imported by
:meth:`netlite.layer.Layer.adapter` when a RingLoss first runs on the Numba
engine.  See docs/layers/ring_loss.md, appendix "The Numba kernels".

Design
------
* The ``M x D`` work is two passes: the row norms ``n_i`` (forward: the
  products in the blob's dtype, reduced pairwise per 1024-element block
  and in float64 across blocks -- Softmax's ``row_dot`` -- then rounded to
  the dtype before the square root, as the reference holds the sum) and
  the gradient ``dx_i = c_i (x_i / max(n_i, tau))`` (the reference's
  operations in its order and dtype, so bit for bit given the same ``n_i``
  and ``c_i``).
* The O(M) rest -- ``d_i``, ``l_i``, the mean, the slopes ``s_i``, the
  coefficients ``c_i`` and the radius diff ``-sum_i c_i`` (accumulated) --
  is the reference's NumPy expressions on M-vectors, in the adapter.
* The reference runs instead for the forwards that need its own state or
  messages: an empty batch, the forward that sets R from the first batch,
  a negative R (its warn-once), and a loss that is not finite (its
  NonFiniteError naming the first bad feature); the adapter then takes
  ``n``, ``d`` and ``l`` from the layer's public ``norm``, ``gap`` and
  ``sample_loss``.
* Work is split into one contiguous range of rows per thread; blobs under
  ``PARALLEL_MIN_ELEMENTS`` use the serial build.
"""

import math

import numpy as np
from numba import prange

from netlite.jit import build
from netlite.layer import TRAIN, EngineAdapter
from netlite.layers.ring_loss import CHARBONNIER
from netlite.layers.softmax_numba import (
    BLOCK,
    cast_like,
    num_chunks,
    parallel_for,
    row_dot,
)


# ------------------------------------------------------------------ kernels
def _ring_norms(x, norm, num, dim, buf):
    nchunks = buf.shape[0]
    for t in prange(nchunks):
        b = buf[t]
        for i in range(t * num // nchunks, (t + 1) * num // nchunks):
            xr = x[i * dim:(i + 1) * dim]
            norm[i] = math.sqrt(cast_like(row_dot(xr, xr, b), b[0]))


def _ring_bwd(x, norm, coef, dx, num, dim, tiny, nchunks):
    for t in prange(nchunks):
        for i in range(t * num // nchunks, (t + 1) * num // nchunks):
            nv = norm[i]
            nd = nv if nv > tiny else tiny
            c = coef[i]
            xr = x[i * dim:(i + 1) * dim]
            dxr = dx[i * dim:(i + 1) * dim]
            for k in range(dim):
                dxr[k] = c * (xr[k] / nd)


# ---------------------------------------------------------------------- API
def ring_norms(x, norm, num, dim, buf=None):
    """``norm[i] = sqrt(sum_k x[i, k]^2)`` over the ``(num, dim)`` view of
    flat ``x`` (``norm`` of ``x``'s dtype).  ``buf`` is the scratch from an
    earlier call (reallocated when missing or of the wrong shape or dtype);
    returns it."""
    parallel = parallel_for(x.size)
    nchunks = num_chunks(parallel, num)
    if buf is None or buf.shape[0] != nchunks or buf.dtype != x.dtype:
        buf = np.empty((nchunks, BLOCK), dtype=x.dtype)
    build(_ring_norms, parallel)(x, norm, num, dim, buf)
    return buf


def ring_bwd(x, norm, coef, dx, num, dim, tiny):
    """``dx[i, :] = coef[i] * (x[i, :] / max(norm[i], tiny))``."""
    parallel = parallel_for(x.size)
    nchunks = num_chunks(parallel, num)
    build(_ring_bwd, parallel)(x, norm, coef, dx, num, dim, tiny, nchunks)


# ------------------------------------------------------------------ adapter
class RingLossNumba(EngineAdapter):
    """RingLoss on the Numba engine; keeps ``n``, ``d`` and ``l`` (the
    reference's ``norm``, ``gap``, ``sample_loss``) for its backward."""

    def __init__(self, layer):
        super().__init__(layer)
        self.buf = None
        self.norm = self.gap = self.sample_loss = None

    def _reference_forward(self, bottom, top):
        layer = self.layer
        layer.forward_cpu(bottom, top)
        self.norm, self.gap, self.sample_loss = layer.norm, layer.gap, layer.sample_loss

    def forward(self, bottom, top):
        layer = self.layer
        num, dim = layer.num, layer.dim
        radius = layer.blobs[0].data
        first_batch = (layer.from_first_batch and not layer.radius_initialised
                       and layer.phase == TRAIN)
        if num == 0 or dim == 0 or first_batch or not float(radius[0]) >= 0:
            self._reference_forward(bottom, top)
            return
        dt = layer.dtype.type
        norm = np.empty(num, dtype=layer.dtype)
        self.buf = ring_norms(bottom[0].flat_data, norm, num, dim, self.buf)
        # The reference's O(M) expressions.
        if layer.ring_type == CHARBONNIER:
            diff = norm + dt(layer.eps) - radius
            loss = np.sqrt(diff * diff + dt(layer.eps))
        else:
            diff = norm - radius
            loss = dt(0.5) * diff * diff
        if layer.per_position:
            top[0].data[...] = loss
        else:
            top[0].data[...] = loss.sum() / dt(max(num, 1))
        if not bool(np.isfinite(top[0].data).all()):
            self._reference_forward(bottom, top)  # raises its NonFiniteError
            return
        self.norm, self.gap, self.sample_loss = norm, diff, loss

    def backward(self, top, propagate_down, bottom):
        layer = self.layer
        dt = layer.dtype.type
        num, dim = layer.num, layer.dim
        tiny = dt(np.finfo(layer.dtype).tiny)
        # The reference's O(M) expressions.
        if layer.ring_type == CHARBONNIER:
            slope = self.gap / np.maximum(self.sample_loss, tiny)
        else:
            slope = self.gap
        if layer.per_position:
            coef = top[0].diff * slope
        else:
            coef = top[0].diff.reshape(()) / dt(max(num, 1)) * slope
        if layer.propagates_param(0):
            layer.blobs[0].diff -= coef.sum()
        if propagate_down[0] and num * dim > 0:
            coef = np.ascontiguousarray(np.broadcast_to(coef, (num,)),
                                        dtype=layer.dtype)
            ring_bwd(bottom[0].flat_data, self.norm, coef, bottom[0].flat_diff,
                     num, dim, tiny)
