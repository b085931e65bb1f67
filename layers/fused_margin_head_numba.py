"""Numba engine for FusedMarginHead: the element-wise passes of a margin
head around its three GEMMs, and the adapter :class:`FusedMarginHeadNumba`.

Pure kernels on flat, C-contiguous arrays (an (N, C) array ``a`` addressed
as ``a[i * C + j]``).  The GEMMs are NumPy's (BLAS); everything else is one
pass over the N x C cosines in the forward and one in the backward, each
row processed in blocks of :data:`BLOCK` that stay in the L1 cache.  See
docs/layers/fused_margin_head.md, appendix "The Numba kernels".

* :func:`weight_norms` -- ``nu_c = sqrt(|w_c|^2 + eps)`` per weight row.
* ``_cosine_rows`` -- ``cos = A / nu`` in place over the GEMM's output, and
  per row the max and the sum of ``exp(s cos - max)`` over every column but
  the margin's (online, block by block), float64.
  Then, while the row is in the L2 cache, ``E = exp(s cos - max) / nu``
  (0 on the margin's column), from which the backward's GEMMs take
  ``G = diag(alpha) E + S`` (``S``: the loss's and the margin's columns, at
  most two per row) without another pass.
* ``weight_rows`` -- ``dW += T - (w . T / nu^2) W`` for one block of weight
  rows, ``T`` the block of ``G^T x``.
"""

import math

import numpy as np
from numba import prange

from netlite.jit import build, njit
from netlite.layers.fused_margin_head import FusedHeadAdapter
from netlite.layers.inner_product_numba import (
    WEIGHT_BLOCK_BYTES,
    renorm_rows,
    weight_norms,
    weight_rows,
)
from netlite.layers.softmax_numba import (
    BLOCK,
    cast_like,
    exp_nonpos,
    num_chunks,
    parallel_for,
    scratch,
    tree_max,
    tree_sum,
)


# ------------------------------------------------------------------ kernels
def _cosine_rows(z, inv_nu, mcol, s, rmax, rsum, e, u, want_e, want_u, n, c,
                 buf):
    nchunks = buf.shape[0]
    for t in prange(nchunks):
        b = buf[t]
        width = b.size
        for i in range(t * n // nchunks, (t + 1) * n // nchunks):
            zr = z[i * c:(i + 1) * c]
            mc = mcol[i]
            m = -np.inf
            total = 0.0
            for start in range(0, c, width):
                nb = min(width, c - start)
                seg = zr[start:start + nb]
                ns = inv_nu[start:start + nb]
                for j in range(nb):
                    v = seg[j] * ns[j]  # (a multiplication vectorises)
                    seg[j] = v
                    b[j] = s * v
                inside = start <= mc < start + nb
                if inside:
                    b[mc - start] = -np.inf  # the margin column: added later
                mb = tree_max(b, nb)  # (which overwrites b)
                if mb == -np.inf:
                    continue
                for j in range(nb):
                    b[j] = exp_nonpos(s * seg[j] - mb)
                if inside:
                    b[mc - start] = 0
                sb = np.float64(tree_sum(b, nb))
                mb64 = np.float64(mb)
                if mb64 > m:
                    total = total * math.exp(m - mb64) + sb
                    m = mb64
                else:
                    total += sb * math.exp(mb64 - m)
            rmax[i] = m
            rsum[i] = total
            if want_e:  # the row is still in the L2 cache
                _exponentials(zr, e[i * c:(i + 1) * c], inv_nu, mc, s, m, b, u,
                              i, want_u)


@njit
def _exponentials(zr, er, inv_nu, mc, s, m, b, u, i, want_u):
    # E = exp(s z - m) / nu off the margin column (0 on it), and with want_u
    # u_i = sum exp(s z - m) z over the same columns (the scale's gradient).
    if m == -np.inf:  # no column but the margin's
        er[:] = 0
        u[i] = 0.0
        return
    mt = cast_like(m, s)  # exact: m is the max of values in the dtype
    for j in range(zr.size):
        er[j] = exp_nonpos(s * zr[j] - mt) * inv_nu[j]
    if mc >= 0:
        er[mc] = 0
    if not want_u:
        return
    width = b.size
    total = 0.0
    for start in range(0, zr.size, width):
        nb = min(width, zr.size - start)
        seg = zr[start:start + nb]
        for j in range(nb):
            b[j] = exp_nonpos(s * seg[j] - mt) * seg[j]
        if start <= mc < start + nb:
            b[mc - start] = 0
        total += np.float64(tree_sum(b, nb))
    u[i] = total


@njit
def _add_rows(dst, at, src, take, coef, offset):
    """``dst[at[i] - offset] += coef[i] * src[take[i]]`` row by row (the
    sparse part ``S`` of the gradient; a few rows per call)."""
    for i in range(at.size):
        d = dst[at[i] - offset]
        v = src[take[i]]
        ci = coef[i]
        for j in range(d.size):
            d[j] += ci * v[j]


# --------------------------------------------------------------------- API
# ----------------------------------------------------------------- adapter
class FusedMarginHeadNumba(FusedHeadAdapter):
    """A FusedMarginHead on the Numba engine (the steps are
    :class:`~netlite.layers.fused_margin_head.FusedHeadAdapter`'s): owns the
    cosines ``z`` and the exponentials ``e`` (the two N x C arrays), the
    weight norms and their inverses, the row statistics, the kernels'
    scratch, the row-scaled features and the weight GEMM's block.

    Every pass sits between two GEMMs, so the kernels run single-threaded
    (:func:`parallel_for` with ``between_gemms``): within OpenBLAS's spin
    window a parallel region shares its cores with BLAS's workers."""

    def __init__(self, layer):
        super().__init__(layer)
        self.tmp = self.buf = None
        self.parallel = False

    def engine_workspace(self, n, c, k, dtype):
        rows = max(1, min(c, WEIGHT_BLOCK_BYTES // (k * dtype.itemsize)))
        self.tmp = np.empty((rows, k), dtype=dtype)
        self.parallel = parallel_for(n * c, between_gemms=True)
        self.buf = scratch(dtype, num_chunks(self.parallel, n), BLOCK)[0]

    def norms(self, flat, c, k, eps):
        weight_norms(flat, self.nu, eps, self.parallel, self.buf)

    def renorm(self, flat, c, k, eps):
        build(renorm_rows, self.parallel)(flat, self.nu, c, k, eps, self.buf)

    def row_pass(self, state, want_u):
        n, c = self.z.shape
        build(_cosine_rows, self.parallel)(
            self.z.reshape(-1), self.inv_nu, state.mcol, state.s, self.rmax,
            self.rsum, self.e.reshape(-1), self.u, self.layer.needs_backward,
            want_u, n, c, self.buf)

    def feature_gradient(self, dx, x, w, alpha, rows, cols, sigma, extra):
        np.matmul(self.e, w, out=dx)
        dx *= alpha[:, None]
        _add_rows(dx, rows, w, cols, sigma, 0)
        if extra is not None:
            _add_rows(dx, extra[0], x, extra[0], extra[1], 0)

    def weight_gradient(self, head, x, rows, cols, sigma, extra):
        # T = G^T x = E^T (alpha x) + S^T x, block by block of weight rows;
        # then dW += T - diag(w . T / nu^2) W ("fold"), or dW += T; then the
        # extra terms' rows.
        blob = head.layer("fc").blobs[0]
        w, wd = blob.data, blob.diff
        fold = head.weight_mode()[0] == "fold"
        c, k = w.shape
        order = np.argsort(cols, kind="stable")
        rows, cols, sigma = rows[order], cols[order], sigma[order]
        size = self.tmp.shape[0]
        # Keyed on the block's own size: a threaded pass after each block's
        # GEMM would share its cores with BLAS's spinning workers.
        kernel = build(weight_rows, parallel_for(size * k, between_gemms=True))
        for c0 in range(0, c, size):
            nb = min(size, c - c0)
            tmp = self.tmp[:nb]
            np.matmul(self.e[:, c0:c0 + nb].T, self.xs, out=tmp)
            lo, hi = np.searchsorted(cols, (c0, c0 + nb))
            _add_rows(tmp, cols[lo:hi], x, rows[lo:hi], sigma[lo:hi], c0)
            kernel(wd.reshape(-1), w.reshape(-1), tmp.reshape(-1), self.nu_q, c0,
                   nb, k, fold, self.buf)
        if extra is not None and extra[2].size:
            _add_rows(wd, extra[2], w, extra[2], extra[3], 0)
