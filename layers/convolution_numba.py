"""Numba kernels for the Convolution layer's CPU engine (2-D geometry).

The layer keeps the im2col matrix batch-wide, ``col`` of shape
``(C * kh * kw, N * OH * OW)``: row ``(c * kh + i) * kw + j`` (Caffe's
order, matching the weight layout), column ``n * OH * OW + oh * OW + ow``.
One GEMM per group then covers the whole batch (done by NumPy's BLAS);
these kernels do the memory-bound parts around it:

* :func:`conv_im2col` / :func:`conv_col2im` -- gather the patches / add
  them back (col2im zeroes its output first: bottom diffs are overwritten);
* :func:`conv_fwd_output` -- ``(O, N*P)`` GEMM result -> ``(N, O, P)`` top,
  plus the bias;
* :func:`conv_bwd_top_diff` / :func:`conv_bwd_top_diff_t` -- ``(N, O, P)``
  top diff -> ``(O, N*P)`` / ``(N*P, O)`` GEMM operands.

The kernels are serial on purpose: NumPy's BLAS already runs the GEMMs on
all cores, and a second thread pool (Numba's) next to it makes both spin
against each other between calls -- measured on the 2-core target, LeNet's
convolution and pooling layers took 4x longer with ``parallel=True``.
No kernel allocates.

The kernels index flat (1-D) views of C-contiguous arrays with unsigned
indices (:func:`_u`): Numba checks every signed index for Python's
negative wrap-around, and that test keeps LLVM from vectorising the copy
loops (a 3-7x slowdown measured on im2col).
"""

import numba
import numpy as np


@numba.njit(cache=False, inline="always")
def _u(i):
    """An array index that cannot be negative (no wrap-around test)."""
    return np.uint64(i)


@numba.njit(cache=False, inline="always")
def _valid_range(n_out, stride, offset, size):
    """Outputs ``o`` in ``[lo, hi)`` whose input ``o * stride + offset``
    lies in ``[0, size)``."""
    lo = 0
    if offset < 0:
        lo = (-offset + stride - 1) // stride
    hi = 0
    if size - 1 - offset >= 0:
        hi = (size - 1 - offset) // stride + 1
    lo = min(lo, n_out)
    hi = max(min(hi, n_out), lo)
    return lo, hi


@numba.njit(cache=False)
def conv_im2col(x, col, kh, kw, sh, sw, ph, pw, dh, dw, oh_n, ow_n):
    """Gather every kernel tap of every output position into ``col``.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), C-contiguous
    col : ndarray, shape (C * kh * kw, N * oh_n * ow_n), C-contiguous, written
    kh, kw, sh, sw, ph, pw, dh, dw : int
        Kernel, stride, pad and dilation per axis.
    oh_n, ow_n : int
        Output height and width.

    Notes
    -----
    One pass per input plane ``(n, c)``: it reads that plane (which stays
    in cache) and writes its ``kh * kw`` rows' segment of image ``n``.
    Taps in the padding read 0.
    """
    n_img, channels, height, width = x.shape
    xf = x.reshape(-1)
    cf = col.reshape(-1)
    n_cols = col.shape[1]
    plane = oh_n * ow_n
    for task in range(n_img * channels):
        n = task // channels
        c = task - n * channels
        src0 = task * height * width
        for i in range(kh):
            h_off = i * dh - ph
            oh_lo, oh_hi = _valid_range(oh_n, sh, h_off, height)
            for j in range(kw):
                w_off = j * dw - pw
                lo, hi = _valid_range(ow_n, sw, w_off, width)
                row = ((c * kh + i) * kw + j) * n_cols + n * plane
                for q in range(row, row + oh_lo * ow_n):
                    cf[_u(q)] = 0
                for q in range(row + oh_hi * ow_n, row + plane):
                    cf[_u(q)] = 0
                for oh in range(oh_lo, oh_hi):
                    dst = row + oh * ow_n
                    src = src0 + (oh * sh + h_off) * width + w_off
                    for ow in range(lo):
                        cf[_u(dst + ow)] = 0
                    if sw == 1:
                        for ow in range(lo, hi):
                            cf[_u(dst + ow)] = xf[_u(src + ow)]
                    else:
                        for ow in range(lo, hi):
                            cf[_u(dst + ow)] = xf[_u(src + ow * sw)]
                    for ow in range(hi, ow_n):
                        cf[_u(dst + ow)] = 0


@numba.njit(cache=False)
def conv_col2im(col, dx, kh, kw, sh, sw, ph, pw, dh, dw, oh_n, ow_n):
    """Overwrite ``dx`` with the adjoint of :func:`conv_im2col` of ``col``.

    One pass per ``(n, c)`` plane of ``dx``, which stays in cache while
    the overlapping windows accumulate; taps in the padding are dropped.
    """
    n_img, channels, height, width = dx.shape
    df = dx.reshape(-1)
    cf = col.reshape(-1)
    n_cols = col.shape[1]
    plane = oh_n * ow_n
    for task in range(n_img * channels):
        n = task // channels
        c = task - n * channels
        dst0 = task * height * width
        for q in range(dst0, dst0 + height * width):
            df[_u(q)] = 0
        for i in range(kh):
            h_off = i * dh - ph
            oh_lo, oh_hi = _valid_range(oh_n, sh, h_off, height)
            for j in range(kw):
                w_off = j * dw - pw
                lo, hi = _valid_range(ow_n, sw, w_off, width)
                row = ((c * kh + i) * kw + j) * n_cols + n * plane
                for oh in range(oh_lo, oh_hi):
                    src = row + oh * ow_n
                    dst = dst0 + (oh * sh + h_off) * width + w_off
                    if sw == 1:
                        for ow in range(lo, hi):
                            df[_u(dst + ow)] += cf[_u(src + ow)]
                    else:
                        for ow in range(lo, hi):
                            df[_u(dst + ow * sw)] += cf[_u(src + ow)]


@numba.njit(cache=False)
def conv_fwd_output(ybuf, bias, y):
    """``y[n, o, p] = ybuf[o, n * P + p] + bias[o]``.

    Parameters
    ----------
    ybuf : ndarray, shape (O, N * P), C-contiguous
        The GEMM result ``W @ col``.
    bias : ndarray, shape (O,)
        Zeros when the layer has no bias.
    y : ndarray, shape (N, O, P), C-contiguous, written
    """
    n_img, n_out, plane = y.shape
    yf = y.reshape(-1)
    bf = ybuf.reshape(-1)
    n_cols = ybuf.shape[1]
    for task in range(n_img * n_out):
        n = task // n_out
        o = task - n * n_out
        b = bias[o]
        src = o * n_cols + n * plane
        dst = task * plane
        for q in range(plane):
            yf[_u(dst + q)] = bf[_u(src + q)] + b


@numba.njit(cache=False)
def conv_bwd_top_diff(dy, dybuf):
    """``dybuf[o, n * P + p] = dy[n, o, p]`` (the transpose of
    :func:`conv_fwd_output`, without the bias)."""
    n_img, n_out, plane = dy.shape
    df = dy.reshape(-1)
    bf = dybuf.reshape(-1)
    n_cols = dybuf.shape[1]
    for task in range(n_img * n_out):
        n = task // n_out
        o = task - n * n_out
        src = task * plane
        dst = o * n_cols + n * plane
        for q in range(plane):
            bf[_u(dst + q)] = df[_u(src + q)]


@numba.njit(cache=False)
def conv_bwd_top_diff_t(dy, dyt):
    """``dyt[n * P + p, o] = dy[n, o, p]`` (the weight gradient's operand:
    ``col @ dyt`` multiplies two row-major matrices, which BLAS does
    faster than ``dybuf @ col.T``)."""
    n_img, n_out, plane = dy.shape
    df = dy.reshape(-1)
    tf = dyt.reshape(-1)
    for n in range(n_img):
        for q in range(plane):
            dst = (n * plane + q) * n_out
            src = n * n_out * plane + q
            for o in range(n_out):
                tf[_u(dst + o)] = df[_u(src + o * plane)]
