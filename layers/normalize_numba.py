"""Numba engine for Normalize: kernels and the adapter :class:`NormalizeNumba`.

Pure functions on flat, C-contiguous arrays: the ``(outer, C, inner)``
view of a blob is addressed as ``x[(i * C + c) * inner + k]`` and the norm
``n`` as ``n[i * inner + k]``.  Imported by :meth:`netlite.layer.Layer.adapter`
when a Normalize first runs on the Numba engine.  See docs/layers/normalize.md,
appendix "The Numba kernels".

Design
------
* **Rows** (``inner == 1``, the embedding case): one pass computes the
  row's sum of squares (L2) or of magnitudes (L1) into a scratch block and
  reduces it pairwise (:func:`netlite.layers.softmax_numba.row_dot`; float64
  across blocks), then ``y = x / n`` while the row is still in cache.  The
  backward is one dot ``y . g`` and one element-wise pass.
* **Strided** (``inner > 1``): positions ``k`` are processed in tiles of
  ``W`` neighbours (the softmax kernels' tiling), the per-position sums
  accumulate in a float64 scratch row, and every inner loop runs over
  contiguous ``k``.
* No fastmath: the reductions are element-wise loops into scratch plus a
  tree reduction (row case) or per-``k`` float64 accumulators (strided);
  products are the reference's (in the blob's dtype), only the sums are
  wider; the sum is rounded to the dtype before ``+ eps`` and ``sqrt``, as
  in the reference (so a float32 sum of squares that overflows gives
  ``n = inf`` on both engines).  The element-wise arithmetic (``x / n``;
  ``g - t dot``, ``/ n``, ``+ t h``) is the reference's, in its order and
  dtype.
* **Non-finite input.**  A row (position) whose norm is not finite is left
  unwritten (its ``x`` intact, even in place) and reported by the norm;
  the adapter then runs the reference's check, which raises the
  reference's NonFiniteError, or -- when the input was finite and only the
  sum of squares overflowed -- divides those positions as the reference
  does.
* Work is split into ``nchunks`` contiguous ranges of rows (or tiles), one
  per thread, each with its own scratch; small problems use the serial
  build (``PARALLEL_MIN_ELEMENTS``, as for Softmax).
"""

import math

import numpy as np
from numba import prange

from netlite.jit import build, njit
from netlite.layer import EngineAdapter
from netlite.layers.softmax_numba import (
    cast_like,
    parallel_for,
    row_dot,
    scratch,
    scratch_shape,
    strided_dot,
    tile_span,
    tree_sum,
)


# ------------------------------------------------------------ scalar helpers
@njit
def row_abs_sum(u, b):
    """``sum(|u|)`` over a row (pairwise per block of ``len(b)``, float64
    across blocks)."""
    n = u.size
    width = b.size
    total = 0.0
    for start in range(0, n, width):
        nb = min(width, n - start)
        us = u[start:start + nb]
        for j in range(nb):
            b[j] = abs(us[j])
        total += np.float64(tree_sum(b, nb))
    return total


@njit
def norm_from_sum(s, eps, l2, ref):
    """``sqrt(s + eps)`` (L2) or ``s + eps`` (L1) in the dtype of ``ref``:
    the sum is rounded first, as the reference holds it, so a sum of
    squares beyond the dtype's range gives ``n = inf`` there too."""
    sd = cast_like(s, ref) + cast_like(eps, ref)
    return np.sqrt(sd) if l2 else sd


@njit
def direction(y, l2):
    """``t``: ``y`` (L2) or ``sign(y)`` (L1)."""
    if l2:
        return y
    one = cast_like(1.0, y)
    zero = cast_like(0.0, y)
    return one if y > zero else (-one if y < zero else zero)


# -------------------------------------------------------------- row kernels
def _normalize_fwd_rows(x, y, norm, outer, c, eps, l2, buf):
    nchunks = buf.shape[0]
    for t in prange(nchunks):
        b = buf[t]
        for i in range(t * outer // nchunks, (t + 1) * outer // nchunks):
            xr = x[i * c:(i + 1) * c]
            yr = y[i * c:(i + 1) * c]
            s = row_dot(xr, xr, b) if l2 else row_abs_sum(xr, b)
            nv = norm_from_sum(s, eps, l2, b[0])
            norm[i] = nv
            if math.isfinite(nv):
                # yr may alias xr (in place): element-wise.
                for j in range(c):
                    yr[j] = xr[j] / nv


def _normalize_bwd_rows(y, g, norm, h, dx, outer, c, l2, fix, bp, buf):
    nchunks = buf.shape[0]
    for t in prange(nchunks):
        b = buf[t]
        for i in range(t * outer // nchunks, (t + 1) * outer // nchunks):
            yr = y[i * c:(i + 1) * c]
            gr = g[i * c:(i + 1) * c]
            dxr = dx[i * c:(i + 1) * c]
            dot = cast_like(row_dot(yr, gr, b), b[0])
            nv = norm[i]
            hv = h[i]
            # dxr may alias gr (in place): dot is complete before any write.
            for j in range(c):
                tj = direction(yr[j], l2)
                d = gr[j] - tj * dot
                if not fix:
                    d = d / nv
                if bp:
                    d = d + tj * hv
                dxr[j] = d


# ---------------------------------------------------------- strided kernels
def _normalize_fwd_strided(x, y, norm, outer, c, inner, eps, l2, acc):
    nchunks, width = acc.shape
    tiles_per_outer = (inner + width - 1) // width
    ntiles = outer * tiles_per_outer
    for t in prange(nchunks):
        sk = acc[t]
        for tile in range(t * ntiles // nchunks, (t + 1) * ntiles // nchunks):
            i, k0, nk = tile_span(tile, tiles_per_outer, width, inner)
            base0 = i * c * inner + k0
            nbase = i * inner + k0
            for k in range(nk):
                sk[k] = 0.0
            for ch in range(c):
                base = base0 + ch * inner
                if l2:
                    for k in range(nk):
                        v = x[base + k]
                        sk[k] += v * v
                else:
                    for k in range(nk):
                        sk[k] += abs(x[base + k])
            finite = True
            for k in range(nk):
                nv = norm_from_sum(sk[k], eps, l2, x[0])
                norm[nbase + k] = nv
                if not math.isfinite(nv):
                    finite = False
            if finite:
                for ch in range(c):
                    base = base0 + ch * inner
                    for k in range(nk):
                        y[base + k] = x[base + k] / norm[nbase + k]
            else:
                # Leave the positions with a non-finite norm unwritten.
                for ch in range(c):
                    base = base0 + ch * inner
                    for k in range(nk):
                        nv = norm[nbase + k]
                        if math.isfinite(nv):
                            y[base + k] = x[base + k] / nv


def _normalize_bwd_strided(y, g, norm, h, dx, outer, c, inner, l2, fix, bp, acc):
    nchunks, width = acc.shape
    tiles_per_outer = (inner + width - 1) // width
    ntiles = outer * tiles_per_outer
    for t in prange(nchunks):
        dk = acc[t]
        for tile in range(t * ntiles // nchunks, (t + 1) * ntiles // nchunks):
            i, k0, nk = tile_span(tile, tiles_per_outer, width, inner)
            base0 = i * c * inner + k0
            nbase = i * inner + k0
            strided_dot(y, g, base0, c, inner, nk, dk)
            for ch in range(c):
                base = base0 + ch * inner
                for k in range(nk):
                    j = base + k
                    tj = direction(y[j], l2)
                    d = g[j] - tj * cast_like(dk[k], y[j])
                    if not fix:
                        d = d / norm[nbase + k]
                    if bp:
                        d = d + tj * h[nbase + k]
                    dx[j] = d


# ------------------------------------------------------------------- API
def normalize_fwd(x, y, norm, outer, c, inner, eps, l2, parallel, buffers=None):
    """``norm = ||x||`` per ``(i, k)`` and ``y = x / norm`` over the
    ``(outer, c, inner)`` view of flat ``x``.

    ``y`` may be ``x``; ``norm`` is flat, ``outer * inner`` long, of ``x``'s
    dtype.  Positions whose norm is not finite are left unwritten in ``y``.
    ``buffers`` are ``(buf, acc)`` from :func:`~netlite.layers.softmax_numba.scratch`
    (allocated when missing or of the wrong shape); returns the buffers used.
    """
    buffers = _buffers(buffers, x.dtype, outer, c, inner, parallel)
    buf, acc = buffers
    if inner == 1:
        build(_normalize_fwd_rows, parallel)(x, y, norm, outer, c, eps, l2, buf)
    else:
        build(_normalize_fwd_strided, parallel)(
            x, y, norm, outer, c, inner, eps, l2, acc)
    return buffers


def normalize_bwd(y, g, norm, h, dx, outer, c, inner, l2, fix, bp, parallel,
                  buffers=None):
    """``dx = (g - t (y . g)) [/ norm] [+ t h]`` over the ``(outer, c,
    inner)`` view (``t = y`` for L2, ``sign(y)`` for L1; ``fix`` drops the
    division, ``bp`` adds the norm diff ``h``).  ``dx`` may be ``g``."""
    buffers = _buffers(buffers, y.dtype, outer, c, inner, parallel)
    buf, acc = buffers
    if inner == 1:
        build(_normalize_bwd_rows, parallel)(
            y, g, norm, h, dx, outer, c, l2, fix, bp, buf)
    else:
        build(_normalize_bwd_strided, parallel)(
            y, g, norm, h, dx, outer, c, inner, l2, fix, bp, acc)
    return buffers


def _buffers(buffers, dtype, outer, c, inner, parallel):
    shape = scratch_shape(outer, c, inner, parallel)
    if buffers is None or buffers[0].shape != shape or buffers[0].dtype != dtype:
        buffers = scratch(dtype, *shape)
    return buffers


# --------------------------------------------------------------- adapter
class NormalizeNumba(EngineAdapter):
    """Normalize on the Numba engine; owns the kernels' scratch and, when
    the layer has no norm top, the norms its backward reads."""

    def __init__(self, layer):
        super().__init__(layer)
        self.buffers = None
        self.norm = None

    def _norm(self, top, dtype, size):
        if len(top) > 1:
            return top[1].flat_data
        if self.norm is None or self.norm.size != size or self.norm.dtype != dtype:
            self.norm = np.empty(size, dtype=dtype)
        return self.norm

    def forward(self, bottom, top):
        layer = self.layer
        if bottom[0].count == 0:
            layer.forward_cpu(bottom, top)
            return
        x, y = bottom[0].flat_data, top[0].flat_data
        outer, c, inner = layer.outer, layer.channels, layer.inner
        norm = self._norm(top, x.dtype, outer * inner)
        self.buffers = normalize_fwd(
            x, y, norm, outer, c, inner, layer.eps, layer.l2,
            parallel_for(bottom[0].count, between_gemms=inner == 1), self.buffers)
        bad = ~np.isfinite(norm)
        if bad.any():
            # The positions with a non-finite norm still hold x.
            if not np.isfinite(x).all():
                layer.forward_cpu(bottom, top)  # raises the reference's error
            # Finite input whose sum overflowed: the reference's x / inf.
            n3 = norm.reshape(outer, 1, inner)
            np.divide(x.reshape(outer, c, inner), n3, out=y.reshape(outer, c, inner),
                      where=bad.reshape(outer, 1, inner))

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
        self.buffers = normalize_bwd(
            y, top[0].flat_diff, norm, h, bottom[0].flat_diff, outer, c, inner,
            layer.l2, layer.fix_gradient, layer.bp_norm,
            parallel_for(bottom[0].count, between_gemms=inner == 1), self.buffers)
