"""Numba engine for Softmax: kernels (and the row statistics
SoftmaxWithLoss reuses) and the adapter :class:`SoftmaxNumba`.

Pure functions on flat, C-contiguous arrays: the ``(outer, C, inner)``
view of a blob is addressed as ``x[(i * C + c) * inner + k]``.  Imported
by :meth:`netlite.layer.Layer.adapter` when a Softmax first runs on the
Numba engine (``import netlite`` does not import Numba).  See
docs/layers/softmax.md, appendix "Numba engine".

Design
------
* **Rows** (``inner == 1``, the classifier case): the softmax is three
  passes over a row (max; ``y = exp(x - m)`` and its sum; ``y /= s``), one
  exponential per element.  When only the statistics are wanted
  (SoftmaxWithLoss on large inputs), :func:`row_max_sumexp` computes the
  max ``m`` and ``s = sum_c exp(x_c - m)`` together in one pass (online
  max / sum-exp, block by block), so a row is read once however long it
  is.
* **Strided** (``inner > 1``): positions ``k`` are processed in tiles of
  ``W`` neighbours, so every inner loop runs over contiguous ``k`` and
  vectorises; the tile's statistics live in a scratch row.
* **Vectorisation without fastmath.**  LLVM only vectorises loops whose
  iterations are independent unless it may reassociate floating-point
  sums (fastmath), which netlite does not allow.  Reductions are therefore
  written as element-wise loops into a scratch block followed by a
  pairwise (tree) reduction, each level of which is again element-wise.
  The pairwise sum is also more accurate than a running sum.
* **Exponential.**  Numba has no vector ``exp`` without Intel SVML, and a
  scalar libm call per element would dominate the run time.  In float32
  the kernels use :func:`exp_nonpos`, a Cephes-style ``expf`` (range
  reduction by ``ln 2`` and a degree-6 polynomial; max relative error
  about 1e-7, i.e. within one ulp of NumPy's) written in plain arithmetic
  so that LLVM vectorises it.  Arguments are always ``x - max <= 0``.  In
  float64 the kernels call ``math.exp``.
* Work is split into ``nchunks`` contiguous ranges of rows (or tiles), one
  per thread, each with its own scratch row: iterations are independent.
  Every kernel comes in a parallel and a serial build; small problems use
  the serial one because waking the thread pool costs microseconds.
"""

import math
import os

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, overload

from netlite.jit import build, njit
from netlite.layer import EngineAdapter

_ENV_THRESHOLD = os.environ.get("NETLITE_PARALLEL_MIN_ELEMENTS", "").strip()

#: Problems with fewer elements than this run the single-threaded kernels:
#: waking the thread pool costs more than the work saves
#: (``NETLITE_PARALLEL_MIN_ELEMENTS`` overrides it).
PARALLEL_MIN_ELEMENTS = int(_ENV_THRESHOLD) if _ENV_THRESHOLD else 1 << 15

#: The same for a pass that sits between two GEMMs (a normalised
#: InnerProduct's, a margin layer's or a Scale's in a margin head, a fused
#: head's): never multi-threaded, unless ``NETLITE_PARALLEL_MIN_ELEMENTS`` is
#: set.  After a BLAS call OpenBLAS's workers spin for up to ~0.1 s, and a
#: parallel region started then shares its cores with them: on the 2-core
#: machine a CosFace head's chain of layers took 128 ms per step with its
#: passes threaded and 62 ms single-threaded, and a fused head gains nothing
#: from threads at any size (docs/engine/backends.md, "Threads").
BETWEEN_GEMMS_MIN_ELEMENTS = int(_ENV_THRESHOLD) if _ENV_THRESHOLD else 1 << 62


def parallel_for(count, between_gemms=False):
    """Whether a pass over ``count`` elements takes the multi-threaded
    build (the thresholds above, read at call time)."""
    if between_gemms:
        return count >= BETWEEN_GEMMS_MIN_ELEMENTS
    return count >= PARALLEL_MIN_ELEMENTS


#: Length of the scratch block used by the row kernels (fits in L1).
BLOCK = 1024

#: Rows up to this length use plain scalar loops: for a handful of
#: elements the block machinery costs more than it saves.
SMALL_ROW = 48

#: Target number of elements in one strided tile (``C * W``): small enough
#: that the tile's second pass hits the L2 cache.
TILE_ELEMENTS = 1 << 16

#: Largest float32 whose exp is still a normal number: log(FLT_MIN).
_LOG_FLT_MIN = -87.33654


# ------------------------------------------------------------- scalar helpers
@intrinsic
def _float32_from_bits(typingctx, bits):
    """Reinterpret an int32 bit pattern as a float32 (free in registers)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit
def _expf_nonpos(d):
    # Cephes expf: d = n ln2 + r with |r| <= ln2 / 2, exp(r) by a minimax
    # polynomial, 2**n built directly in the exponent bits.  The split of
    # ln2 into a short high part and a correction keeps n * ln2 exact.
    # Domain: d <= 88 (callers pass x - max <= 0); NaN and d below
    # log(FLT_MIN) are clamped for the arithmetic and fixed up at the end.
    lo = np.float32(_LOG_FLT_MIN)
    dc = d if d > lo else lo
    nf = np.floor(dc * np.float32(1.4426950408889634) + np.float32(0.5))
    r = dc - nf * np.float32(0.693359375)
    r = r - nf * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * (r * r) + r + np.float32(1.0)
    two_n = _float32_from_bits(np.int32((np.int32(nf) + np.int32(127)) << 23))
    res = p * two_n
    # Below log(FLT_MIN) NumPy returns denormals; 0 differs by < 1.2e-38.
    if d < lo:
        res = np.float32(0.0)
    if d != d:
        res = d
    return res


def exp_nonpos(d):
    """``exp(d)`` for ``d <= 0`` (or NaN, or -inf), in the dtype of ``d``.

    Jitted code only (a Numba overload): float32 uses the vectorisable
    ``_expf_nonpos``; float64 uses ``math.exp``.
    """
    raise NotImplementedError("exp_nonpos is only callable from jitted code")


@overload(exp_nonpos)
def _exp_nonpos_overload(d):
    if d == types.float32:
        return lambda d: _expf_nonpos(d)
    return lambda d: math.exp(d)


def cast_like(value, ref):
    """``value`` converted to the type of the scalar ``ref`` (jitted only)."""
    raise NotImplementedError("cast_like is only callable from jitted code")


@overload(cast_like)
def _cast_like_overload(value, ref):
    if ref == types.float32:
        return lambda value, ref: np.float32(value)
    return lambda value, ref: np.float64(value)


@njit
def _pow2_at_least(n):
    p = 1
    while p < n:
        p *= 2
    return p


@njit
def tree_max(b, n):
    # Max of b[:n] by halving; b is padded with -inf up to a power of two.
    # A NaN may or may not win, which is fine: the caller's sum of
    # exp(x - max) turns any NaN in the row into a NaN sum either way.
    p = _pow2_at_least(n)
    for j in range(n, p):
        b[j] = -np.inf
    h = p // 2
    while h > 0:
        for j in range(h):
            u = b[j]
            v = b[j + h]
            b[j] = u if u > v else v
        h //= 2
    return b[0]


@njit
def tree_sum(b, n):
    # Pairwise sum of b[:n]; every level is an independent element-wise loop.
    p = _pow2_at_least(n)
    for j in range(n, p):
        b[j] = 0
    h = p // 2
    while h > 0:
        for j in range(h):
            b[j] += b[j + h]
        h //= 2
    return b[0]


@njit
def row_max_sumexp(xr, b):
    """Return ``(m, s)`` for the row ``xr``: ``m = max``, ``s = sum
    exp(xr - m)`` (``s`` in float64).

    One pass, block by block (online softmax): each block of ``len(b)``
    elements gets its own max ``mb`` and sum ``sb`` relative to it, and the
    running pair is rescaled whenever the max grows.  Rows of at most
    :data:`SMALL_ROW` elements take two plain loops instead.  NaN anywhere,
    or a +inf, makes ``s`` NaN; a row that is entirely -inf gives ``m =
    -inf`` and ``s`` 0 or NaN, so ``exp(x - m) / s`` is NaN, as in the
    reference.
    """
    n = xr.size
    if n <= SMALL_ROW:
        # Like the reference: a NaN or a column of -inf reaches s as NaN.
        m = xr[0]
        for j in range(1, n):
            if xr[j] > m:
                m = xr[j]
        s = 0.0
        for j in range(n):
            s += exp_nonpos(xr[j] - m)
        return m, s
    width = b.size
    m = cast_like(-np.inf, b[0])
    s = 0.0
    for start in range(0, n, width):
        nb = min(width, n - start)
        # Slices keep every index a non-negative loop counter, so Numba's
        # negative-index wraparound does not block vectorisation.
        seg = xr[start:start + nb]
        for j in range(nb):
            b[j] = seg[j]
        mb = tree_max(b, nb)
        if mb == -np.inf:
            continue  # every element contributes exp(-inf) = 0
        for j in range(nb):
            b[j] = exp_nonpos(seg[j] - mb)
        sb = np.float64(tree_sum(b, nb))
        if mb > m:
            s = s * math.exp(np.float64(m) - np.float64(mb)) + sb
            m = mb
        else:
            s += sb * math.exp(np.float64(mb) - np.float64(m))
    return m, s


@njit
def row_max(xr, b):
    """Max of the row ``xr`` (pairwise per block of ``len(b)``).

    A NaN may or may not win; either way the caller's ``exp(x - m)`` turns
    it into a NaN sum, as in the reference.
    """
    n = xr.size
    if n <= SMALL_ROW:
        m = xr[0]
        for j in range(1, n):
            if xr[j] > m:
                m = xr[j]
        return m
    width = b.size
    m = cast_like(-np.inf, b[0])
    for start in range(0, n, width):
        nb = min(width, n - start)
        seg = xr[start:start + nb]
        for j in range(nb):
            b[j] = seg[j]
        mb = tree_max(b, nb)
        if mb > m:
            m = mb
    return m


@njit
def row_exp_sum(xr, m, yr, b):
    """Write ``yr = exp(xr - m)`` and return its sum (float64; pairwise per
    block).  ``yr`` may be ``xr``."""
    n = xr.size
    s = 0.0
    if n <= SMALL_ROW:
        for j in range(n):
            e = exp_nonpos(xr[j] - m)
            yr[j] = e
            s += e
        return s
    width = b.size
    for start in range(0, n, width):
        nb = min(width, n - start)
        seg = xr[start:start + nb]
        ys = yr[start:start + nb]
        for j in range(nb):
            e = exp_nonpos(seg[j] - m)
            ys[j] = e
            b[j] = e
        s += np.float64(tree_sum(b, nb))
    return s


@njit
def row_dot(u, v, b):
    """``sum(u * v)`` over two rows (pairwise per block, float64 across
    blocks)."""
    n = u.size
    width = b.size
    total = 0.0
    for start in range(0, n, width):
        nb = min(width, n - start)
        us = u[start:start + nb]
        vs = v[start:start + nb]
        for j in range(nb):
            b[j] = us[j] * vs[j]
        total += np.float64(tree_sum(b, nb))
    return total


# -------------------------------------------------------------- row kernels
def _softmax_fwd_rows(x, y, outer, n, buf):
    nchunks = buf.shape[0]
    for t in prange(nchunks):
        b = buf[t]
        for i in range(t * outer // nchunks, (t + 1) * outer // nchunks):
            xr = x[i * n:(i + 1) * n]
            yr = y[i * n:(i + 1) * n]
            # Three passes (max; exp and sum; scale), one exp per element.
            # yr may alias xr (in place): each element is read before written.
            m = row_max(xr, b)
            sd = cast_like(row_exp_sum(xr, m, yr, b), m)
            for c in range(n):
                yr[c] = yr[c] / sd


def _softmax_bwd_rows(y, dy, dx, outer, n, accumulate, buf):
    nchunks = buf.shape[0]
    for t in prange(nchunks):
        b = buf[t]
        for i in range(t * outer // nchunks, (t + 1) * outer // nchunks):
            yr = y[i * n:(i + 1) * n]
            dyr = dy[i * n:(i + 1) * n]
            dxr = dx[i * n:(i + 1) * n]
            dot = cast_like(row_dot(dyr, yr, b), b[0])
            # dxr may alias dyr (in place): dot is complete before any write.
            if accumulate:
                for c in range(n):
                    dxr[c] += (dyr[c] - dot) * yr[c]
            else:
                for c in range(n):
                    dxr[c] = (dyr[c] - dot) * yr[c]


@njit(inline="always")
def tile_span(tile, tiles_per_outer, width, inner):
    """A strided kernel's tile: its outer index ``i``, first position
    ``k0`` and number of positions ``nk`` (the last tile of a row may be
    narrower than ``width``)."""
    k0 = (tile % tiles_per_outer) * width
    return tile // tiles_per_outer, k0, min(width, inner - k0)


@njit(inline="always")
def strided_dot(u, v, base0, n, inner, nk, out):
    """``out[k] = sum_c u[j] * v[j]``, ``j = base0 + c * inner + k``, for
    ``k < nk``: the per-position dot product over ``n`` channels of a tile,
    accumulated in ``out``'s dtype."""
    for k in range(nk):
        out[k] = 0.0
    for c in range(n):
        base = base0 + c * inner
        for k in range(nk):
            out[k] += u[base + k] * v[base + k]


# ---------------------------------------------------------- strided kernels
def _softmax_fwd_strided(x, y, outer, n, inner, buf, acc):
    nchunks, width = buf.shape
    tiles_per_outer = (inner + width - 1) // width
    ntiles = outer * tiles_per_outer
    for t in prange(nchunks):
        mk = buf[t]
        sk = acc[t]
        for tile in range(t * ntiles // nchunks, (t + 1) * ntiles // nchunks):
            i, k0, nk = tile_span(tile, tiles_per_outer, width, inner)
            base0 = i * n * inner + k0
            for k in range(nk):
                mk[k] = -np.inf
                sk[k] = 0.0
            for c in range(n):
                base = base0 + c * inner
                for k in range(nk):
                    v = x[base + k]
                    if v > mk[k]:
                        mk[k] = v
            for c in range(n):
                base = base0 + c * inner
                for k in range(nk):
                    sk[k] += exp_nonpos(x[base + k] - mk[k])
            for c in range(n):
                base = base0 + c * inner
                for k in range(nk):
                    y[base + k] = exp_nonpos(x[base + k] - mk[k]) / cast_like(
                        sk[k], mk[k]
                    )


def _softmax_bwd_strided(y, dy, dx, outer, n, inner, accumulate, acc):
    nchunks, width = acc.shape
    tiles_per_outer = (inner + width - 1) // width
    ntiles = outer * tiles_per_outer
    for t in prange(nchunks):
        dk = acc[t]
        for tile in range(t * ntiles // nchunks, (t + 1) * ntiles // nchunks):
            i, k0, nk = tile_span(tile, tiles_per_outer, width, inner)
            base0 = i * n * inner + k0
            strided_dot(dy, y, base0, n, inner, nk, dk)
            for c in range(n):
                base = base0 + c * inner
                for k in range(nk):
                    j = base + k
                    g = (dy[j] - cast_like(dk[k], y[j])) * y[j]
                    if accumulate:
                        dx[j] += g
                    else:
                        dx[j] = g


def num_chunks(parallel, work_items):
    """Number of independent work ranges: one per thread, at most one per
    item."""
    if not parallel:
        return 1
    return max(1, min(numba.get_num_threads(), work_items))


def tile_width(n, inner):
    """Width ``W`` of a strided tile for ``C = n`` channels."""
    width = max(16, TILE_ELEMENTS // max(n, 1))
    return min(inner, 1 << (width.bit_length() - 1))


def scratch(dtype, nchunks, width):
    """Scratch rows for a kernel call: ``(buf, acc)``, dtype and float64."""
    return (np.empty((nchunks, width), dtype=dtype),
            np.empty((nchunks, width), dtype=np.float64))


# ------------------------------------------------------------------- API
def softmax_fwd(x, y, outer, n, inner, parallel, buffers=None):
    """Softmax of the ``(outer, n, inner)`` view of flat ``x`` into ``y``.

    Parameters
    ----------
    x, y : ndarray, shape (outer * n * inner,)
        Flat, contiguous, same dtype; ``y`` may be ``x``.
    outer, n, inner : int
        The view's dimensions (``n`` is Caffe's channel count ``C``).
    parallel : bool
        Use the multi-threaded build.
    buffers : tuple of ndarray, optional
        ``(buf, acc)`` from :func:`scratch` with the shape
        :func:`scratch_shape` gives; allocated when omitted.
    """
    shape = scratch_shape(outer, n, inner, parallel)
    if buffers is None or buffers[0].shape != shape or buffers[0].dtype != x.dtype:
        buffers = scratch(x.dtype, *shape)
    buf, acc = buffers
    if inner == 1:
        build(_softmax_fwd_rows, parallel)(x, y, outer, n, buf)
    else:
        build(_softmax_fwd_strided, parallel)(x, y, outer, n, inner, buf, acc)
    return buffers


def softmax_bwd(y, dy, dx, outer, n, inner, accumulate, parallel, buffers=None):
    """``dx (+)= (dy - sum_c(dy * y)) * y`` over the ``(outer, n, inner)``
    view (``accumulate`` adds instead of overwriting; ``dx`` may be
    ``dy`` when overwriting)."""
    shape = scratch_shape(outer, n, inner, parallel)
    if buffers is None or buffers[0].shape != shape or buffers[0].dtype != y.dtype:
        buffers = scratch(y.dtype, *shape)
    buf, acc = buffers
    if inner == 1:
        build(_softmax_bwd_rows, parallel)(y, dy, dx, outer, n, accumulate, buf)
    else:
        build(_softmax_bwd_strided, parallel)(
            y, dy, dx, outer, n, inner, accumulate, acc
        )
    return buffers


def scratch_shape(outer, n, inner, parallel):
    """``(nchunks, width)`` of the scratch rows a call needs."""
    if inner == 1:
        return num_chunks(parallel, outer), BLOCK
    width = tile_width(n, inner)
    tiles = outer * ((inner + width - 1) // width)
    return num_chunks(parallel, tiles), width


# --------------------------------------------------------------- adapter
class SoftmaxNumba(EngineAdapter):
    """Softmax on the Numba engine; owns the kernels' scratch rows."""

    def __init__(self, layer):
        super().__init__(layer)
        self.buffers = None

    def forward(self, bottom, top):
        layer = self.layer
        if bottom[0].count == 0:
            return
        self.buffers = softmax_fwd(
            bottom[0].flat_data, top[0].flat_data, layer.outer, layer.channels,
            layer.inner, parallel_for(bottom[0].count), self.buffers,
        )

    def backward(self, top, propagate_down, bottom):
        layer = self.layer
        if not propagate_down[0] or bottom[0].count == 0:
            return
        self.buffers = softmax_bwd(
            top[0].flat_data, top[0].flat_diff, bottom[0].flat_diff, layer.outer,
            layer.channels, layer.inner, False,
            parallel_for(bottom[0].count), self.buffers,
        )
