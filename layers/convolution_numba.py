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
* :func:`conv_bwd_top_diff` -- ``(N, O, P)`` top diff -> ``(O, N*P)`` GEMM
  operand, summing the bias gradient on the way.

Every ``prange`` iteration writes a disjoint part of the output, so the
parallel loops are race-free.  No kernel allocates.
"""

import numba
from numba import prange


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


@numba.njit(cache=False, parallel=True)
def conv_im2col(x, col, kh, kw, sh, sw, ph, pw, dh, dw, oh_n, ow_n):
    """Gather every kernel tap of every output position into ``col``.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    col : ndarray, shape (C * kh * kw, N * oh_n * ow_n), written
    kh, kw, sh, sw, ph, pw, dh, dw : int
        Kernel, stride, pad and dilation per axis.
    oh_n, ow_n : int
        Output height and width.
    """
    n_img, channels, height, width = x.shape
    plane = oh_n * ow_n
    rows = channels * kh * kw
    for task in prange(rows * n_img):
        r = task // n_img
        n = task - r * n_img
        c = r // (kh * kw)
        i = (r // kw) % kh
        j = r % kw
        w_off = j * dw - pw
        lo, hi = _valid_range(ow_n, sw, w_off, width)
        for oh in range(oh_n):
            ih = oh * sh - ph + i * dh
            dst = n * plane + oh * ow_n
            if ih < 0 or ih >= height:
                for ow in range(ow_n):
                    col[r, dst + ow] = 0
                continue
            for ow in range(lo):
                col[r, dst + ow] = 0
            for ow in range(lo, hi):
                col[r, dst + ow] = x[n, c, ih, ow * sw + w_off]
            for ow in range(hi, ow_n):
                col[r, dst + ow] = 0


@numba.njit(cache=False, parallel=True)
def conv_col2im(dcol, dx, kh, kw, sh, sw, ph, pw, dh, dw, oh_n, ow_n):
    """Overwrite ``dx`` with the adjoint of :func:`conv_im2col` of ``dcol``.

    One task per ``(n, c)`` plane, so overlapping windows accumulate
    without races.
    """
    n_img, channels, height, width = dx.shape
    plane = oh_n * ow_n
    for task in prange(n_img * channels):
        n = task // channels
        c = task - n * channels
        for ih in range(height):
            for iw in range(width):
                dx[n, c, ih, iw] = 0
        for i in range(kh):
            for oh in range(oh_n):
                ih = oh * sh - ph + i * dh
                if ih < 0 or ih >= height:
                    continue
                src = n * plane + oh * ow_n
                for j in range(kw):
                    r = (c * kh + i) * kw + j
                    w_off = j * dw - pw
                    lo, hi = _valid_range(ow_n, sw, w_off, width)
                    for ow in range(lo, hi):
                        dx[n, c, ih, ow * sw + w_off] += dcol[r, src + ow]


@numba.njit(cache=False, parallel=True)
def conv_fwd_output(ybuf, bias, y):
    """``y[n, o, p] = ybuf[o, n * P + p] + bias[o]``.

    Parameters
    ----------
    ybuf : ndarray, shape (O, N * P)
        The GEMM result ``W @ col``.
    bias : ndarray, shape (O,)
        Zeros when the layer has no bias.
    y : ndarray, shape (N, O, P), written
    """
    n_img, n_out, plane = y.shape
    for task in prange(n_img * n_out):
        n = task // n_out
        o = task - n * n_out
        b = bias[o]
        src = n * plane
        for q in range(plane):
            y[n, o, q] = ybuf[o, src + q] + b


@numba.njit(cache=False, parallel=True)
def conv_bwd_top_diff(dy, dybuf, bias_diff, with_bias):
    """``dybuf[o, n * P + p] = dy[n, o, p]``; if ``with_bias``,
    ``bias_diff[o] += sum_{n, p} dy[n, o, p]``.

    The bias sum runs in float64 on purpose (it adds up ``N * P`` terms,
    36,864 per image batch for LeNet's conv1) and is rounded once.
    """
    n_img, n_out, plane = dy.shape
    for o in prange(n_out):
        acc = 0.0
        for n in range(n_img):
            dst = n * plane
            for q in range(plane):
                v = dy[n, o, q]
                dybuf[o, dst + q] = v
                acc += v
        if with_bias:
            bias_diff[o] += acc
