"""Numba engine for InnerProduct with ``normalize: true``: the adapter
:class:`InnerProductNumba` and its kernels (column scale, in-place row
renormalisation).

The weight normalisation's memory-bound work runs in kernels instead of
NumPy temporaries; the GEMMs stay NumPy's (BLAS).  Pure kernels on flat,
C-contiguous arrays (an (M, N) array ``a`` addressed as ``a[i * N + j]``).
See docs/layers/inner_product.md, appendix "The Numba kernels".

* **TRUE_GRADIENT** keeps the raw blob ``W`` (N x K).  Forward: the norms
  ``nu_n = sqrt(|w_n|^2 + 1e-6)`` (:func:`weight_norms`,
  one pass over W), ``inv = 1 / nu``, the GEMM ``Y = X W^T`` into the top,
  then one pass ``y_mn = y_mn * inv_n (+ b_n)`` over the top
  (:func:`_scale_columns`): no N x K ``W_hat``.  Backward: ``G = dy * inv``
  (columns, one pass into an M x N workspace), ``dX = G W`` (GEMM), and
  ``dW += T - (w . T / nu^2) w`` with ``T = G^T X`` formed block by block
  of weight rows into a block of at most ``WEIGHT_BLOCK_BYTES``
  (:func:`weight_rows`, ``fold=True``): no N x K
  gradient temporaries.
* **RENORM_INPLACE** renormalises the blob in place (:func:`renorm_rows`,
  one pass: each row's norm, then the division while the row is in
  cache), then the plain GEMM; the backward is the plain one, ``dW += dy^T X``
  block by block (``weight_rows`` with ``fold=False``, no N x K
  temporary), ``dX = dy W_hat``.
* Everything else -- ``normalize: false`` (BLAS is the floor there),
  ``transpose`` (the norms run over the blob's columns), an empty bottom --
  runs the reference (``forward_cpu`` / ``backward_cpu``).
* Every pass sits between GEMMs, so none is multi-threaded
  (:func:`softmax_numba.parallel_for` with ``between_gemms``;
  docs/engine/backends.md, "Threads": within OpenBLAS's spin window a
  parallel region shares its cores with BLAS's workers) unless
  ``NETLITE_PARALLEL_MIN_ELEMENTS`` asks for it (the tests do).
"""

import numpy as np
from numba import prange

from netlite.jit import build
from netlite.layer import EngineAdapter
from netlite.layers.inner_product import WEIGHT_NORM_EPS
from netlite.layers.normalize_numba import norm_from_sum
from netlite.layers.softmax_numba import (
    BLOCK,
    cast_like,
    num_chunks,
    parallel_for,
    row_dot,
    scratch,
)

#: The weight gradient's GEMM runs over blocks of weight rows whose product
#: takes at most this many bytes (the only workspace beyond O(N + C)).
WEIGHT_BLOCK_BYTES = 1 << 20


# ------------------------------------------------------------------ kernels
def _scale_columns(src, dst, inv, bias, rows, cols, add_bias, in_place,
                   nchunks):
    # dst_ij = src_ij * inv_j (+ bias_j), row by row.  A multiplication by
    # the inverse vectorises; a division by nu_j does not (1.6 ms against
    # 0.3 ms at 256 x 10 000 float32).  In place (the forward, on the top)
    # the loop reads dst only: given two names for one array, LLVM's
    # overlap check fails and it runs the scalar loop (0.7 ms, not 0.2).
    for t in prange(nchunks):
        for i in range(t * rows // nchunks, (t + 1) * rows // nchunks):
            d = dst[i * cols:(i + 1) * cols]
            if in_place:
                if add_bias:
                    for j in range(cols):
                        d[j] = d[j] * inv[j] + bias[j]
                else:
                    for j in range(cols):
                        d[j] = d[j] * inv[j]
            else:
                s = src[i * cols:(i + 1) * cols]
                for j in range(cols):
                    d[j] = s[j] * inv[j]


def scale_columns(a, inv, rows, cols, parallel, bias=None, out=None):
    """Over the ``(rows, cols)`` view of flat ``a``: ``a = a * inv (+ bias)``
    in place (``out`` None), or ``out = a * inv`` (no bias); ``inv`` and
    ``bias`` per column."""
    add = bias is not None
    in_place = out is None
    if add and not in_place:
        raise ValueError("scale_columns adds a bias only in place")
    build(_scale_columns, parallel)(
        a, a if in_place else out, inv, bias if add else inv, rows, cols, add,
        in_place, num_chunks(parallel, rows))


def renorm_rows(w, nu, rows, k, eps, buf):
    # nu_i = sqrt(|w_i|^2 + eps), then w_i = w_i / nu_i in place while the
    # row is in cache; one array, so the division vectorises (Normalize's
    # normalize_fwd, called with y = x, has to assume y may overlap x and
    # runs it scalar: 4.4 ms against 1.4 ms at 10 000 x 512 float32).  A
    # non-finite norm divides as the reference's ``w /= n`` does.
    nchunks = buf.shape[0]
    for t in prange(nchunks):
        b = buf[t]
        for i in range(t * rows // nchunks, (t + 1) * rows // nchunks):
            wr = w[i * k:(i + 1) * k]
            nv = norm_from_sum(row_dot(wr, wr, b), eps, True, b[0])
            nu[i] = nv
            for j in range(k):
                wr[j] = wr[j] / nv


def _weight_norm_rows(w, nu, rows, k, eps, buf):
    nchunks = buf.shape[0]
    for t in prange(nchunks):
        b = buf[t]
        for i in range(t * rows // nchunks, (t + 1) * rows // nchunks):
            wr = w[i * k:(i + 1) * k]
            nu[i] = norm_from_sum(row_dot(wr, wr, b), eps, True, b[0])


def weight_rows(wd, w, tmp, nu, c0, nb, k, fold, buf):
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


def weight_norms(w, nu, eps, parallel, buf):
    """``nu_c = sqrt(sum_k w_ck^2 + eps)`` for the rows of flat ``w``
    ((C, K), C = ``nu.size``), the sum rounded to the dtype first as the
    InnerProduct reference holds it."""
    rows = nu.size
    build(_weight_norm_rows, parallel)(w, nu, rows, w.size // rows, eps, buf)


# ----------------------------------------------------------------- adapter
class InnerProductNumba(EngineAdapter):
    """InnerProduct on the Numba engine (``normalize: true``, not
    transposed); owns the weight norms ``nu`` and their inverses, the
    M x N workspace ``g`` (TRUE_GRADIENT's ``dy / nu``), the weight
    gradient's block ``tmp`` and the kernels' scratch."""

    def __init__(self, layer):
        super().__init__(layer)
        self.nu = self.inv = self.g = self.tmp = self.buf = None
        self.fresh = False  # nu / inv hold the norms of the last forward

    def _covered(self, bottom):
        layer = self.layer
        return layer.normalize and not layer.transpose and bottom[0].count > 0

    def _weight_state(self, dtype):
        layer = self.layer
        c, k = layer.N, layer.K
        if self.nu is None or self.nu.size != c or self.nu.dtype != dtype:
            self.nu = np.empty(c, dtype=dtype)
            self.inv = np.empty(c, dtype=dtype)
            rows = max(1, min(c, WEIGHT_BLOCK_BYTES // (k * dtype.itemsize)))
            self.tmp = np.empty((rows, k), dtype=dtype)
            self.fresh = False
        # One scratch row per thread; a serial call takes the first.
        if self.buf is None or self.buf.shape[0] != num_chunks(True, c) \
                or self.buf.dtype != dtype:
            self.buf = scratch(dtype, num_chunks(True, c), BLOCK)[0]
        # Between GEMMs: threads cost the next GEMM more than they save
        # (40 ms against 50 ms per forward + backward at (256, 512, 10 000)
        # with the norms threaded).
        return parallel_for(layer.M * c, between_gemms=True)

    def _scratch(self, parallel, rows):
        return self.buf[:num_chunks(parallel, rows)]

    def _norms(self, w, par):
        weight_norms(w.reshape(-1), self.nu, WEIGHT_NORM_EPS, par,
                     self._scratch(par, self.nu.size))
        np.divide(1, self.nu, out=self.inv)
        self.fresh = True

    def forward(self, bottom, top):
        layer = self.layer
        if not self._covered(bottom):
            layer.forward_cpu(bottom, top)
            return
        m, n, k = layer.M, layer.N, layer.K
        blob = layer.blobs[0]
        w = blob.data
        x = bottom[0].data.reshape(m, k)
        y = top[0].data.reshape(m, n)
        par = self._weight_state(w.dtype)
        bias = layer.blobs[1].data if layer.bias_term else None
        if layer.true_gradient:
            self._norms(w, par)
            np.matmul(x, w.T, out=y)
            scale_columns(y.reshape(-1), self.inv, m, n,
                          parallel_for(m * n, between_gemms=True), bias=bias)
            return
        build(renorm_rows, par)(w.reshape(-1), self.nu, n, k, WEIGHT_NORM_EPS,
                                 self._scratch(par, n))
        np.matmul(x, w.T, out=y)
        if bias is not None:
            y += bias

    def backward(self, top, propagate_down, bottom):
        layer = self.layer
        if not self._covered(bottom):
            layer.backward_cpu(top, propagate_down, bottom)
            return
        m, n, k = layer.M, layer.N, layer.K
        blob = layer.blobs[0]
        w = blob.data
        x = bottom[0].data.reshape(m, k)
        dy = top[0].diff.reshape(m, n)
        par = self._weight_state(w.dtype)
        want_w = layer.propagates_param(0)
        if layer.bias_term and layer.propagates_param(1):
            layer.blobs[1].diff += dy.sum(axis=0)
        if not (want_w or propagate_down[0]):
            return
        g = dy
        if layer.true_gradient:
            if not self.fresh:  # a backward without a forward on this engine
                self._norms(w, par)
            if self.g is None or self.g.shape != (m, n) or self.g.dtype != w.dtype:
                self.g = np.empty((m, n), dtype=w.dtype)
            g = self.g
            scale_columns(dy.reshape(-1), self.inv, m, n,
                          parallel_for(m * n, between_gemms=True), out=g.reshape(-1))
        if propagate_down[0]:
            np.matmul(g, w, out=bottom[0].diff.reshape(m, k))
        if want_w:
            self._weight_gradient(g, x, w, blob.diff, layer.true_gradient)

    def _weight_gradient(self, g, x, w, wd, fold):
        # T = G^T x block by block of weight rows; dW += T - (w . T / nu^2) w
        # (fold, TRUE_GRADIENT) or dW += T (RENORM_INPLACE).
        c, k = w.shape
        size = self.tmp.shape[0]
        for c0 in range(0, c, size):
            nb = min(size, c - c0)
            tmp = self.tmp[:nb]
            np.matmul(g[:, c0:c0 + nb].T, x, out=tmp)
            # The pass covers this block only.
            par = parallel_for(nb * k, between_gemms=True)
            build(weight_rows, par)(wd.reshape(-1), w.reshape(-1), tmp.reshape(-1),
                                    self.nu, c0, nb, k, fold,
                                    self._scratch(par, nb))
