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
* ``_gradient_rows`` -- ``G = dcos / nu`` over the cosines, with the column
  sums ``r_c = sum_n dcos cos`` (one float64 row per thread) and the scale's
  ``sum dl z``; the loss's class and the margin's class of each row are
  handled one element each, outside the vectorised spans.
* ``_weight_rows`` -- ``dW += T - q W`` for one block of weight rows, ``T``
  the block of ``G^T x``.
"""

import math

import numpy as np
from numba import prange

from netlite.jit import build, njit
from netlite.layer import EngineAdapter
from netlite.layers.fused_margin_head import HeadState
from netlite.layers.inner_product import WEIGHT_NORM_EPS
from netlite.layers.normalize_numba import norm_from_sum, normalize_fwd
from netlite.layers.softmax_numba import (
    BLOCK,
    PARALLEL_MIN_ELEMENTS,
    cast_like,
    exp_nonpos,
    num_chunks,
    row_dot,
    scratch,
    tree_max,
    tree_sum,
)

#: The weight gradient's GEMM runs over blocks of weight rows whose product
#: takes at most this many bytes (the only workspace beyond O(N + C)).
WEIGHT_BLOCK_BYTES = 1 << 20
#: The kernels' build: single-threaded (see FusedMarginHeadNumba).
PARALLEL = False


# ------------------------------------------------------------------ kernels
def _weight_norm_rows(w, nu, rows, k, eps, buf):
    nchunks = buf.shape[0]
    for t in prange(nchunks):
        b = buf[t]
        for i in range(t * rows // nchunks, (t + 1) * rows // nchunks):
            wr = w[i * k:(i + 1) * k]
            nu[i] = norm_from_sum(row_dot(wr, wr, b), eps, True, b[0])


def _cosine_rows(z, inv_nu, mcol, s, rmax, rsum, n, c, buf):
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


@njit(inline="always")
def _gradient_span(zr, gr, inv_nu, a, e, s, lse, gi):
    # Columns a .. e-1, none of them the row's loss or margin class:
    # dl = g p, dcos = s dl, G = dcos / nu; lse in the blobs' dtype (float32
    # arithmetic vectorises; its rounding moves p by < 1e-5 relative).
    for j in range(a, e):
        dc = s * (gi * exp_nonpos(s * zr[j] - lse))
        gr[j] = dc * inv_nu[j]


@njit
def _scale_gradient(zr, gr, inv_nu, s, b):
    # sum_j dl_j z_j over the row with dl = G nu / s (the scale's gradient;
    # the caller corrects the loss's and the margin's columns).
    width = b.size
    total = 0.0
    for start in range(0, zr.size, width):
        nb = min(width, zr.size - start)
        zs = zr[start:start + nb]
        gs = gr[start:start + nb]
        ns = inv_nu[start:start + nb]
        for j in range(nb):
            b[j] = gs[j] / ns[j] * zs[j]
        total += np.float64(tree_sum(b, nb))
    return total / np.float64(s)


@njit(inline="always")
def _scaled(gj, inv_j, zj, s):
    return np.float64(gj / inv_j * zj) / np.float64(s)


def _gradient_rows(z, grad, inv_nu, mcol, lcol, s, lse, g, vrow, frow, ds,
                   want_ds, n, c, buf):
    nchunks = buf.shape[0]
    for t in prange(nchunks):
        b = buf[t]
        acc = 0.0
        for i in range(t * n // nchunks, (t + 1) * n // nchunks):
            zr = z[i * c:(i + 1) * c]
            gr = grad[i * c:(i + 1) * c]
            mc, lc, gi, li = mcol[i], lcol[i], g[i], lse[i]
            lt = cast_like(li, gi)
            lo = min(mc, lc)
            hi = max(mc, lc)
            # Spans between the special columns (-1 means none).
            if lo < 0:
                lo = hi
                hi = -1
            if lo < 0:
                _gradient_span(zr, gr, inv_nu, 0, c, s, lt, gi)
            elif hi < 0 or hi == lo:
                _gradient_span(zr, gr, inv_nu, 0, lo, s, lt, gi)
                _gradient_span(zr, gr, inv_nu, lo + 1, c, s, lt, gi)
            else:
                _gradient_span(zr, gr, inv_nu, 0, lo, s, lt, gi)
                _gradient_span(zr, gr, inv_nu, lo + 1, hi, s, lt, gi)
                _gradient_span(zr, gr, inv_nu, hi + 1, c, s, lt, gi)
            one = cast_like(1.0, gi)
            # The special columns: their G now, their dl z for the scale.
            special = 0.0
            if lc >= 0 and lc != mc:  # the loss's class, no margin on it
                zj = zr[lc]
                p = exp_nonpos(cast_like(np.float64(s * zj) - li, zj))
                dl = (p - one) * gi
                gr[lc] = (s * dl) * inv_nu[lc]
                special += np.float64(dl) * np.float64(zj)
            if mc >= 0:  # the margin's class: z = psi(cos), slope f
                zv = cast_like(vrow[i], gi)
                p = exp_nonpos(cast_like(np.float64(s * zv) - li, zv))
                dl = (p - one) * gi if lc == mc else p * gi
                dcos = cast_like(np.float64(s * dl) * frow[i], gi)
                gr[mc] = dcos * inv_nu[mc]
                special += np.float64(dl) * np.float64(zv)
            if want_ds:
                # Every column as _scale_gradient reads it, less the special
                # ones (whose G is not s dl / nu), plus their true dl z.
                total = _scale_gradient(zr, gr, inv_nu, s, b)
                if lc >= 0:
                    total -= _scaled(gr[lc], inv_nu[lc], zr[lc], s)
                if mc >= 0 and mc != lc:
                    total -= _scaled(gr[mc], inv_nu[mc], zr[mc], s)
                acc += total + special
        ds[t] = acc


def _weight_rows(wd, w, tmp, nu, c0, nb, k, fold, buf):
    # dW_c += T_c - (w_c . T_c / nu_c^2) w_c: the TRUE_GRADIENT projection,
    # with w_c . T_c = w_hat_c . dE/dw_hat_c (T_c = sum_n G_nc x_n).
    nchunks = buf.shape[0]
    for t in prange(nchunks):
        b = buf[t]
        for i in range(t * nb // nchunks, (t + 1) * nb // nchunks):
            row = (c0 + i) * k
            tr = tmp[i * k:(i + 1) * k]
            dr = wd[row:row + k]
            if fold:
                wr = w[row:row + k]
                nv = np.float64(nu[c0 + i])
                q = cast_like(row_dot(wr, tr, b) / (nv * nv), tr[0])
                for j in range(k):
                    dr[j] += tr[j] - q * wr[j]
            else:
                for j in range(k):
                    dr[j] += tr[j]


# --------------------------------------------------------------------- API
def weight_norms(w, nu, eps, parallel, buf):
    """``nu_c = sqrt(sum_k w_ck^2 + eps)`` for the rows of flat ``w``
    ((C, K), C = ``nu.size``), the sum rounded to the dtype first as the
    InnerProduct reference holds it."""
    rows = nu.size
    build(_weight_norm_rows, parallel)(w, nu, rows, w.size // rows, eps, buf)


# ----------------------------------------------------------------- adapter
class FusedMarginHeadNumba(EngineAdapter):
    """A FusedMarginHead on the Numba engine: owns the cosines ``z`` and the
    GEMM-ready gradient ``grad`` (the two N x C arrays), the weight norms
    and their inverses, the kernels' scratch and the weight GEMM's block.

    The kernels run on one thread (:data:`PARALLEL`): between BLAS calls a
    second thread would share its core with OpenBLAS's spinning worker
    (appendix "Threads")."""

    def __init__(self, layer):
        super().__init__(layer)
        self.z = self.grad = self.nu = self.inv_nu = self.tmp = None
        self.buf = self.ds = None
        self.rmax = self.rsum = None
        self.state = None

    def _workspace(self, n, c, k, dtype):
        if self.z is None or self.z.shape != (n, c) or self.z.dtype != dtype:
            self.z = np.empty((n, c), dtype=dtype)
            self.grad = np.empty((n, c), dtype=dtype)
            self.nu = np.empty(c, dtype=dtype)
            self.inv_nu = np.empty(c, dtype=dtype)
            self.rmax, self.rsum = np.empty(n), np.empty(n)
            rows = max(1, min(c, WEIGHT_BLOCK_BYTES // (k * dtype.itemsize)))
            self.tmp = np.empty((rows, k), dtype=dtype)
        nchunks = num_chunks(PARALLEL, n)
        if self.buf is None or self.buf.shape[0] != nchunks or self.buf.dtype != dtype:
            self.buf = scratch(dtype, nchunks, BLOCK)[0]
            self.ds = np.empty(nchunks)

    def forward(self, bottom, top):
        head = self.layer
        fc = head.layer("fc")
        w = fc.blobs[0].data
        c, k = w.shape
        x = bottom[0].data.reshape(-1, k)
        n = x.shape[0]
        self._workspace(n, c, k, x.dtype)
        flat = w.reshape(-1)
        if fc.true_gradient:
            weight_norms(flat, self.nu, WEIGHT_NORM_EPS, PARALLEL, self.buf)
            np.divide(1, self.nu, out=self.inv_nu)
        else:  # RENORM_INPLACE: the blob itself becomes W / nu
            normalize_fwd(flat, flat, self.nu, c, k, 1, WEIGHT_NORM_EPS, True,
                          PARALLEL)
            self.inv_nu[...] = 1
        np.matmul(x, w.T, out=self.z)
        state = HeadState(self.z, head.scale_value(), head.columns(np))
        build(_cosine_rows, PARALLEL)(self.z.reshape(-1), self.inv_nu, state.mcol,
                                      state.s, self.rmax, self.rsum, n, c, self.buf)
        if not head.finish_forward(state, self.rmax, self.rsum, top):
            head.forward_cpu(bottom, top)  # the layers raise the reference's error
            head.ran_fused = False
            return
        head.defer_forward(state)
        head.ran_fused = True
        self.state = state

    def backward(self, top, propagate_down, bottom):
        head, st = self.layer, self.state
        fc, scale = head.layer("fc"), head.layer("scale")
        want_s = scale is not None and scale.propagates_param(0)
        w = fc.blobs[0].data
        c, k = w.shape
        x = bottom[0].data.reshape(-1, k)
        n = x.shape[0]
        g = head.row_gradient_scale(st, top)
        vrow, frow = np.zeros(n), np.ones(n)
        vrow[st.mrows], frow[st.mrows] = st.v, st.factor
        build(_gradient_rows, PARALLEL)(
            self.z.reshape(-1), self.grad.reshape(-1), self.inv_nu, st.mcol,
            st.lcol, st.s, st.lse, g, vrow, frow, self.ds, want_s, n, c, self.buf)
        if propagate_down[0]:
            np.matmul(self.grad, w, out=bottom[0].diff.reshape(n, k))
        if fc.propagates_param(0):
            self._weight_gradient(fc, x)
        if want_s:
            sd = scale.blobs[0].diff
            sd += sd.dtype.type(self.ds.sum())
        head.defer_backward(st)

    def _weight_gradient(self, fc, x):
        # dW += T - diag(w . T / nu^2) W with T = G^T x, block by block.
        w, wd = fc.blobs[0].data, fc.blobs[0].diff
        c, k = w.shape
        rows = self.tmp.shape[0]
        kernel = build(_weight_rows, PARALLEL)
        for c0 in range(0, c, rows):
            nb = min(rows, c - c0)
            tmp = self.tmp[:nb]
            np.matmul(self.grad[:, c0:c0 + nb].T, x, out=tmp)
            kernel(wd.reshape(-1), w.reshape(-1), tmp.reshape(-1), self.nu, c0, nb,
                   k, fc.true_gradient, self.buf)
