"""CuPy engine for FusedMarginHead: the element-wise passes of a margin
head around its three cuBLAS GEMMs, and the adapter
:class:`FusedMarginHeadCuPy`.

The same computation as the Numba engine (layers/fused_margin_head_numba.py)
on device arrays.  The GEMMs are ``cupy.matmul`` (cuBLAS); every O(N)
step is the head's own array-generic maths on CuPy arrays.  See
docs/layers/fused_margin_head.md, appendix "The CuPy engine".

* weight norms -- normalize_cupy's ``ReductionKernel`` (float64 sums) and
  finishing kernel: ``nu_c = sqrt(|w_c|^2 + eps)`` as the InnerProduct
  reference rounds it, per the head's ``weight_mode()`` (folded, with its
  floor; or normalize_cupy's in-place division for "renorm"; or 1).
* ``fused_margin_head_rows`` -- one ``RawKernel`` block per row of the
  (N, C) GEMM output: ``cos = A / nu`` in place and the row's max and sum of
  ``exp(s cos - max)`` over every column but the margin's (per-thread online
  max/sum in float64, combined in shared memory); then
  ``E = exp(s cos - max) / nu`` (0 on the margin's column) and, for a
  learned scale, ``u = sum exp(s cos - max) cos`` (float64).
* ``fused_margin_head_add_rows`` -- ``dx = alpha dx + S W`` after the GEMM
  ``dx = E W``: one thread per element, adding the (at most two) sparse
  entries of its row in order; also the head's ``extra_terms`` (rows of
  ``dx`` and ``dW``), one thread per element of the rows they touch.
* ``fused_margin_head_weight_rows`` -- one block per weight row of a block
  of ``T = E^T (alpha x)`` (a GEMM): adds the sparse entries ``S^T x`` of
  that class in order, then ``dW += T - (w . T / nu^2) w`` (float64 dot in
  shared memory), or ``dW += T`` for RENORM_INPLACE.

Products that meet an addition go through ``__fmul_rn`` / ``__dmul_rn``,
so NVRTC never contracts them into a fused multiply-add: the element-wise
arithmetic rounds as the reference's does.  Kernel factories are memoised
by dtype and build nothing at import time.
"""

import functools

import cupy
import numpy as np

from netlite.layers.fused_margin_head import FusedHeadAdapter
from netlite.layers.normalize_cupy import normalize_divide, normalize_norm

#: The weight gradient's GEMM runs over blocks of weight rows whose product
#: ``T`` (and the copy of ``E``'s columns it reads) takes at most this many
#: bytes.  Larger than the Numba engine's 1 MiB: each block costs a few
#: kernel launches, and a GPU wants GEMMs of thousands of rows.
WEIGHT_BLOCK_BYTES = 1 << 25

#: Threads per block of the row and weight-row kernels (a power of two).
THREADS = 256

_CTYPE = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

#: Products never contracted into a fused multiply-add.
_MUL = """
#define NEG_INF __longlong_as_double(0xfff0000000000000ULL)
__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float expo(float a) { return expf(a); }
__device__ __forceinline__ double expo(double a) { return exp(a); }
"""

_REDUCE = """
__device__ __forceinline__ void block_sum(double* sm, double v) {
    const int t = threadIdx.x;
    __syncthreads();  /* earlier reads of sm are done */
    sm[t] = v;
    __syncthreads();
    for (int h = THREADS / 2; h > 0; h >>= 1) {
        if (t < h) {
            sm[t] += sm[t + h];
        }
        __syncthreads();
    }
}
"""

_ROWS_SOURCE = """
/* One block per row n of the (N, C) GEMM output z. */
extern "C" __global__ void fused_margin_head_rows(
        T* z, const T* inv_nu, const long long* mcol, const T s,
        double* rmax, double* rsum, T* e, double* u,
        const int want_e, const int want_u, const long long c) {
    __shared__ double sm_m[THREADS];
    __shared__ double sm_s[THREADS];
    const int t = threadIdx.x;
    const long long n = blockIdx.x;
    T* zr = z + n * c;
    const long long mc = mcol[n];
    /* cos = A / nu in place; online max and sum of exp(s cos - max) over
       every column but the margin's (added later, in O(N)). */
    double m = NEG_INF;
    double total = 0.0;
    for (long long j = t; j < c; j += THREADS) {
        const T v = zr[j] * inv_nu[j];
        zr[j] = v;
        if (j == mc) {
            continue;
        }
        const T l = mul(s, v);
        if ((double)l > m) {  /* NaN never enters here */
            total = total * exp(m - (double)l) + 1.0;
            m = (double)l;
        } else if ((double)l != NEG_INF) {
            total += (double)expo((T)(l - (T)m));
        }
    }
    sm_m[t] = m;
    sm_s[t] = total;
    __syncthreads();
    for (int h = THREADS / 2; h > 0; h >>= 1) {
        if (t < h) {
            const double m1 = sm_m[t], m2 = sm_m[t + h];
            const double mm = m1 > m2 ? m1 : m2;
            const double s1 = sm_s[t], s2 = sm_s[t + h];
            sm_s[t] = (m1 == mm ? s1 : s1 * exp(m1 - mm))
                      + (m2 == mm ? s2 : s2 * exp(m2 - mm));
            sm_m[t] = mm;
        }
        __syncthreads();
    }
    const double rm = sm_m[0];
    if (t == 0) {
        rmax[n] = rm;
        rsum[n] = sm_s[0];
    }
    if (!want_e) {
        return;
    }
    /* E = exp(s cos - max) / nu (0 on the margin's column); u = sum
       exp(s cos - max) cos over the same columns. */
    T* er = e + n * c;
    const bool none = rm == NEG_INF;  /* no column but the margin's */
    const T mt = (T)rm;  /* exact: the max of values in the dtype */
    double acc = 0.0;
    for (long long j = t; j < c; j += THREADS) {
        const T v = zr[j];
        const T ex = none ? (T)0 : expo((T)(mul(s, v) - mt));
        er[j] = j == mc ? (T)0 : ex * inv_nu[j];
        if (j != mc) {
            acc += (double)mul(ex, v);
        }
    }
    if (want_u) {
        block_sum(sm_m, acc);
        if (t == 0) {
            u[n] = sm_m[0];
        }
    }
}
"""

_WEIGHT_SOURCE = """
/* One block per weight row c0 + i of the block tmp = E^T (alpha x). */
extern "C" __global__ void fused_margin_head_weight_rows(
        T* wd, const T* w, T* tmp, const T* nu, const long long c0,
        const long long k, const long long* starts, const long long* take,
        const T* coef, const T* x, const int fold) {
    __shared__ double sm[THREADS];
    const int t = threadIdx.x;
    const long long c = c0 + blockIdx.x;
    T* tr = tmp + (long long)blockIdx.x * k;
    const T* wr = w + c * k;
    T* dr = wd + c * k;
    const long long lo = starts[c], hi = starts[c + 1];
    double dot = 0.0;
    for (long long j = t; j < k; j += THREADS) {
        T v = tr[j];
        for (long long q = lo; q < hi; ++q) {  /* S^T x, in order */
            v = v + mul(coef[q], x[take[q] * k + j]);
        }
        if (fold) {
            tr[j] = v;
            dot += (double)mul(wr[j], v);
        } else {
            dr[j] = dr[j] + v;
        }
    }
    if (!fold) {
        return;
    }
    /* dW_c += T_c - (w_c . T_c / nu_c^2) w_c (TRUE_GRADIENT). */
    block_sum(sm, dot);
    const double nv = (double)nu[c];
    const T qv = (T)(sm[0] / (nv * nv));
    for (long long j = t; j < k; j += THREADS) {
        dr[j] = dr[j] + (tr[j] - mul(qv, wr[j]));
    }
}
"""

_ADD_ROWS_SOURCE = """
    const long long r = at[i / k];
    const long long j = i % k;
    T d = dst[r * k + j];
    if (scaled) {
        d = mul(alpha[r], d);
    }
    for (long long q = starts[i / k]; q < starts[i / k + 1]; ++q) {
        d = d + mul(coef[q], src[take[q] * k + j]);
    }
    dst[r * k + j] = d;
"""


def _header(dtype):
    return (f"typedef {_CTYPE[np.dtype(dtype)]} T;\n#define THREADS {THREADS}\n"
            + _MUL + _REDUCE)


@functools.cache
def rows_kernel(dtype):
    """RawKernel ``fused_margin_head_rows`` for ``dtype`` (one block of
    :data:`THREADS` threads per row)."""
    return cupy.RawKernel(_header(dtype) + _ROWS_SOURCE, "fused_margin_head_rows")


@functools.cache
def weight_rows_kernel(dtype):
    """RawKernel ``fused_margin_head_weight_rows`` for ``dtype`` (one block
    per weight row)."""
    return cupy.RawKernel(_header(dtype) + _WEIGHT_SOURCE,
                          "fused_margin_head_weight_rows")


@functools.cache
def add_rows_kernel(dtype):
    """ElementwiseKernel ``fused_margin_head_add_rows`` (one thread per
    element of the rows written, in place)."""
    del dtype  # generic in T; the key keeps one kernel per dtype
    return cupy.ElementwiseKernel(
        "raw int64 at, raw int64 starts, raw int64 take, raw T coef, raw T src, "
        "raw T alpha, int64 k, bool scaled", "raw T dst", _ADD_ROWS_SOURCE,
        name="fused_margin_head_add_rows", preamble=_MUL)


# --------------------------------------------------------------------- API
def by_key(keys, arrays, size=None):
    """``(at, starts, arrays)``: the entries sorted by ``keys``, keeping
    their order within a key; key ``at[u]`` owns the entries
    ``starts[u]:starts[u + 1]``.  ``at`` is every key of ``[0, size)`` when
    ``size`` is given, else only the keys present."""
    if keys.size:
        order = cupy.argsort(keys * keys.size + cupy.arange(keys.size))  # unique
        keys = keys[order]
        arrays = tuple(a[order] for a in arrays)
    if size is not None:
        at = cupy.arange(size, dtype=cupy.int64)
        if not keys.size:
            return at, cupy.zeros(size + 1, dtype=cupy.int64), arrays
        starts = cupy.searchsorted(keys, cupy.arange(size + 1))
        return at, starts.astype(cupy.int64), arrays
    first = cupy.ones(keys.size, dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    heads = cupy.nonzero(first)[0].astype(cupy.int64)
    end = cupy.full(1, keys.size, dtype=cupy.int64)
    return keys[heads], cupy.concatenate([heads, end]), arrays


def cosine_rows(z, inv_nu, mcol, s, rmax, rsum, e, u, want_e, want_u):
    """The forward's row pass over the (N, C) ``z`` (see the module)."""
    n, c = z.shape
    if n == 0:
        return
    rows_kernel(np.dtype(z.dtype))(
        (n,), (THREADS,),
        (z, inv_nu, mcol, z.dtype.type(s), rmax, rsum, e, u, np.int32(want_e),
         np.int32(want_u), np.int64(c)))


def add_rows(dst, at, starts, take, coef, src, alpha=None):
    """``dst[at[u]] = [alpha[at[u]] *] dst[at[u]] + sum_q coef[q] *
    src[take[q]]`` over ``q`` in ``starts[u]:starts[u + 1]``, in order, for
    every ``u`` (rows of ``dst`` and ``src`` are K long)."""
    k = dst.shape[-1]
    if at.size == 0:
        return
    add_rows_kernel(np.dtype(dst.dtype))(
        at, starts, take, coef, src, coef if alpha is None else alpha,
        np.int64(k), alpha is not None, dst, size=at.size * k)


def weight_rows(wd, w, tmp, nu, c0, starts, take, coef, x, fold):
    """``dW[c0:c0 + nb] += T - (w . T / nu^2) w`` (``fold``) or ``+= T``,
    with ``T = tmp + S^T x`` (``tmp`` (nb, K), the block's GEMM; class ``c``
    owns the entries ``starts[c]:starts[c + 1]``)."""
    nb, k = tmp.shape
    weight_rows_kernel(np.dtype(w.dtype))(
        (nb,), (THREADS,),
        (wd, w, tmp, nu, np.int64(c0), np.int64(k), starts, take, coef, x,
         np.int32(fold)))


# ----------------------------------------------------------------- adapter
class FusedMarginHeadCuPy(FusedHeadAdapter):
    """A FusedMarginHead on the GPU (the steps are
    :class:`~netlite.layers.fused_margin_head.FusedHeadAdapter`'s): owns the
    cosines ``z`` and the exponentials ``e`` (the two N x C device arrays),
    the weight norms and their inverses, the row statistics (float64), the
    row-scaled features, and the weight GEMM's block (``tmp``, and ``eb``
    for ``E``'s columns when there is more than one block)."""

    xp = cupy

    def __init__(self, layer):
        super().__init__(layer)
        self.tmp = self.eb = None

    def engine_workspace(self, n, c, k, dtype):
        rows = WEIGHT_BLOCK_BYTES // (max(k, n, 1) * dtype.itemsize)
        rows = max(1, min(c, rows))
        self.tmp = cupy.empty((rows, k), dtype=dtype)
        self.eb = cupy.empty(n * rows if rows < c else 0, dtype=dtype)

    def norms(self, flat, c, k, eps):
        normalize_norm(flat, self.nu, c, k, 1, eps, True)

    def renorm(self, flat, c, k, eps):
        normalize_norm(flat, self.nu, c, k, 1, eps, True)
        normalize_divide(flat, self.nu, flat, c, k, 1)

    def row_pass(self, state, want_u):
        cosine_rows(self.z, self.inv_nu, state.mcol, state.s, self.rmax, self.rsum,
                    self.e, self.u, self.layer.needs_backward, want_u)

    def feature_gradient(self, dx, x, w, alpha, rows, cols, sigma, extra):
        cupy.matmul(self.e, w, out=dx)
        at, starts, (take, coef) = by_key(rows, (cols, sigma), x.shape[0])
        add_rows(dx, at, starts, take, coef, w, alpha)
        if extra is not None:
            at, starts, (take, coef) = by_key(extra[0], (extra[0], extra[1]))
            add_rows(dx, at, starts, take, coef, x)

    def weight_gradient(self, head, x, rows, cols, sigma, extra):
        self._weight_gradient(head, x, rows, cols, sigma)
        if extra is not None and extra[2].size:
            blob = head.layer("fc").blobs[0]
            at, starts, (take, coef) = by_key(extra[2], (extra[2], extra[3]))
            add_rows(blob.diff, at, starts, take, coef, blob.data)

    def _weight_gradient(self, head, x, rows, cols, sigma):
        # T = G^T x = E^T (alpha x) + S^T x, block by block of weight rows;
        # then dW += T - diag(w . T / nu^2) W ("fold"), or dW += T.
        blob = head.layer("fc").blobs[0]
        w, wd = blob.data, blob.diff
        fold = head.weight_mode()[0] == "fold"
        c = w.shape[0]
        n = x.shape[0]
        _, starts, (take, coef) = by_key(cols, (rows, sigma), c)
        size = self.tmp.shape[0]
        for c0 in range(0, c, size):
            nb = min(size, c - c0)
            if nb == c:
                eb = self.e
            else:  # E's columns, contiguous, for cuBLAS
                eb = self.eb[:n * nb].reshape(n, nb)
                cupy.copyto(eb, self.e[:, c0:c0 + nb])
            tmp = self.tmp[:nb]
            cupy.matmul(eb.T, self.xs, out=tmp)
            weight_rows(wd, w, tmp, self.nu_q, c0, starts, take, coef, x, fold)
