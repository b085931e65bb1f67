"""Numba engine for Convolution (2-D geometry): kernels and the adapter
:class:`ConvolutionNumba`.

The adapter keeps the im2col matrix batch-wide, ``col`` of shape
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

import numpy as np

from netlite.jit import njit
from netlite.layer import EngineAdapter


@njit(inline="always")
def _u(i):
    """An array index that cannot be negative (no wrap-around test)."""
    return np.uint64(i)


@njit(inline="always")
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


@njit
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


@njit
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


@njit
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


@njit
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


@njit
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


# --------------------------------------------------------------- adapter
class ConvolutionNumba(EngineAdapter):
    """Convolution on the Numba engine (0-, 1- and 2-D; 3-D and more, or
    ``force_nd_im2col``, run the N-D reference).

    Owns grow-only scratch buffers (so steady-state passes allocate
    nothing) and, per bottom, whether its ``col`` buffer still holds the
    columns of the last forward: the backward reuses them for the weight
    gradient, then overwrites them with the columns' gradient.
    """

    def __init__(self, layer):
        super().__init__(layer)
        self.scratch = {}
        self.col_valid = []

    def geometry(self):
        """The 2-D view the kernels work on, or None for the reference.

        0-D and 1-D convolutions are 2-D ones with unit leading axes.
        """
        layer = self.layer
        n = layer.num_spatial_axes
        if n > 2 or layer.force_nd_im2col:
            return None

        def as_2d(values, one):
            return (one,) * (2 - n) + tuple(values)

        return (as_2d(layer.in_shape, 1), as_2d(layer.kernel_shape, 1),
                as_2d(layer.stride, 1), as_2d(layer.pad, 0),
                as_2d(layer.dilation, 1), as_2d(layer.out_shape, 1))

    def buffer(self, name, shape):
        """A grow-only scratch array of the layer's dtype."""
        size = int(np.prod(shape, dtype=np.int64))
        buf = self.scratch.get(name)
        if buf is None or buf.size < size or buf.dtype != self.layer.dtype:
            buf = np.empty(max(size, 1), dtype=self.layer.dtype)
            self.scratch[name] = buf
        return buf[:size].reshape(shape)

    def group_rows(self):
        """Per group, its rows of the weight matrix ``(O, kg)`` and of the
        column matrix ``(C * prod(k), N * P)``; ``kg = C/G * prod(k)``."""
        layer = self.layer
        og = layer.num_output // layer.group
        kg = layer.blobs[0].count // layer.num_output
        return [(slice(g * og, (g + 1) * og), slice(g * kg, (g + 1) * kg))
                for g in range(layer.group)]

    def forward(self, bottom, top):
        layer, geo = self.layer, self.geometry()
        if geo is None:
            layer.forward_cpu(bottom, top)
            return
        (h, w), k, s, p, d, (oh, ow) = geo
        n, c, o = layer.num, layer.channels, layer.num_output
        wmat = layer.blobs[0].data.reshape(o, -1)
        if layer.bias_term:
            bias = layer.blobs[1].data
        else:
            bias = self.buffer("zero_bias", (o,))
            bias[...] = 0
        ybuf = self.buffer("y", (o, n * oh * ow))
        self.col_valid = [False] * len(bottom)
        for i, (x, y) in enumerate(zip(bottom, top)):
            col = self.buffer(f"col{i}", (c * k[0] * k[1], n * oh * ow))
            conv_im2col(x.data.reshape(n, c, h, w), col, *k, *s, *p, *d, oh, ow)
            self.col_valid[i] = True
            for o_rows, k_rows in self.group_rows():
                np.matmul(wmat[o_rows], col[k_rows], out=ybuf[o_rows])
            conv_fwd_output(ybuf, bias, y.data.reshape(n, o, oh * ow))

    def backward(self, top, propagate_down, bottom):
        layer, geo = self.layer, self.geometry()
        if geo is None:
            layer.backward_cpu(top, propagate_down, bottom)
            return
        (h, w), k, s, p, d, (oh, ow) = geo
        n, c, o = layer.num, layer.channels, layer.num_output
        wmat = layer.blobs[0].data.reshape(o, -1)
        want_w = layer.propagates_param(0)
        want_b = layer.bias_term and layer.propagates_param(1)
        groups = self.group_rows()
        for i, (x, y) in enumerate(zip(bottom, top)):
            if not (want_w or want_b or propagate_down[i]):
                continue
            dy3 = y.diff.reshape(n, o, oh * ow)
            if propagate_down[i]:
                dybuf = self.buffer("dy", (o, n * oh * ow))
                conv_bwd_top_diff(dy3, dybuf)
            if want_b:
                db = self.buffer("db", (o,))
                # Sum the (O, N*P) copy's contiguous rows when there is one.
                np.sum(dybuf if propagate_down[i] else dy3,
                       axis=1 if propagate_down[i] else (0, 2), out=db)
                layer.blobs[1].diff += db
            if want_w:
                col = self.buffer(f"col{i}", (c * k[0] * k[1], n * oh * ow))
                if i >= len(self.col_valid) or not self.col_valid[i]:
                    # An earlier backward of this forward spent them.
                    conv_im2col(x.data.reshape(n, c, h, w), col, *k, *s, *p, *d,
                                oh, ow)
                dyt = self.buffer("dyt", (n * oh * ow, o))
                conv_bwd_top_diff_t(dy3, dyt)
                # dW^T = col @ dy^T per group, (kg, N*P) @ (N*P, og): two
                # row-major operands, faster in BLAS than dy @ col.T.
                dwt = self.buffer("dwt", (wmat.shape[1], o))
                for o_rows, k_rows in groups:
                    np.matmul(col[k_rows], dyt[:, o_rows], out=dwt[:, o_rows])
                layer.blobs[0].diff.reshape(wmat.shape)[...] += dwt.T
            if propagate_down[i]:
                # The columns are spent: their gradient reuses the buffer,
                # which keeps the working set (and cache misses) smaller.
                dcol = self.buffer(f"col{i}", (c * k[0] * k[1], n * oh * ow))
                if i < len(self.col_valid):
                    self.col_valid[i] = False
                for o_rows, k_rows in groups:
                    np.matmul(wmat[o_rows].T, dybuf[o_rows], out=dcol[k_rows])
                conv_col2im(dcol, x.diff.reshape(n, c, h, w), *k, *s, *p, *d,
                            oh, ow)
