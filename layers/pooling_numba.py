"""Numba engine for Pooling: kernels and the adapter :class:`PoolingNumba`.

Each kernel handles one ``(n, c)`` channel plane at a time (overlapping
windows inside a plane are summed while it is in cache).  The window
rules are Caffe's (docs/layers/pooling.md): window ``(i, j)`` starts at
``(i * sh - ph, j * sw - pw)``; MAX clips it to the image, AVE clips its
divisor to the padded image and its sum to the image.  No kernel
allocates; float scalars come in with the arrays' dtype, so float32
kernels stay float32.  The kernels are serial for the reason given in
convolution_numba (BLAS owns the cores).

As in convolution_numba, the kernels index flat views of C-contiguous
arrays with unsigned indices (:func:`_u`), which spares Numba's negative
wrap-around test on every access.
"""

import numpy as np

from netlite.jit import njit
from netlite.layer import EngineAdapter
from netlite.layers.pooling import FLT_MAX, MAX


@njit(inline="always")
def _u(i):
    """An array index that cannot be negative (no wrap-around test)."""
    return np.uint64(i)


@njit
def pool_max_fwd(x, y, argmax, kh, kw, sh, sw, ph, pw, lowest):
    """Max pooling with Caffe's tie and padding rules.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), C-contiguous
    y : ndarray, shape (N, C, PH, PW), C-contiguous, written
    argmax : ndarray of int32, shape (N, C, PH, PW), C-contiguous, written
        Flat in-plane index ``h * W + w`` of each maximum; -1 when no
        element beats ``lowest``.
    kh, kw, sh, sw, ph, pw : int
        Kernel, stride and pad.
    lowest : scalar of x's dtype
        The running maximum's start, -FLT_MAX; the test is strict, so the
        first maximum in raster order wins ties and NaN never wins.
    """
    n_img, channels, height, width = x.shape
    out_h, out_w = y.shape[2], y.shape[3]
    xf = x.reshape(-1)
    yf = y.reshape(-1)
    af = argmax.reshape(-1)
    for plane in range(n_img * channels):
        src = plane * height * width
        dst = plane * out_h * out_w
        for i in range(out_h):
            h0 = i * sh - ph
            h1 = min(h0 + kh, height)
            h0 = max(h0, 0)
            for j in range(out_w):
                w0 = j * sw - pw
                w1 = min(w0 + kw, width)
                w0 = max(w0, 0)
                best = lowest
                where = -1
                for h in range(h0, h1):
                    for w in range(w0, w1):
                        v = xf[_u(src + h * width + w)]
                        if v > best:
                            best = v
                            where = h * width + w
                yf[_u(dst + i * out_w + j)] = best
                af[_u(dst + i * out_w + j)] = where


@njit
def pool_max_fwd_2x2(x, y, argmax, sh, sw, lowest):
    """:func:`pool_max_fwd` for 2x2 windows that all lie inside the image
    (no padding, no overhang): the four taps unrolled in raster order,
    about 3x faster than the general loops for LeNet's pooling layers."""
    n_img, channels, height, width = x.shape
    out_h, out_w = y.shape[2], y.shape[3]
    xf = x.reshape(-1)
    yf = y.reshape(-1)
    af = argmax.reshape(-1)
    for plane in range(n_img * channels):
        src = plane * height * width
        dst = plane * out_h * out_w
        for i in range(out_h):
            r0 = i * sh * width
            r1 = r0 + width
            for j in range(out_w):
                c0 = j * sw
                best = lowest
                where = -1
                v = xf[_u(src + r0 + c0)]
                if v > best:
                    best = v
                    where = r0 + c0
                v = xf[_u(src + r0 + c0 + 1)]
                if v > best:
                    best = v
                    where = r0 + c0 + 1
                v = xf[_u(src + r1 + c0)]
                if v > best:
                    best = v
                    where = r1 + c0
                v = xf[_u(src + r1 + c0 + 1)]
                if v > best:
                    best = v
                    where = r1 + c0 + 1
                yf[_u(dst)] = best
                af[_u(dst)] = where
                dst += 1


@njit
def pool_max_bwd(dy, argmax, dx):
    """Overwrite ``dx`` with zeros, then ``dx[argmax] += dy`` per plane."""
    n_img, channels, height, width = dx.shape
    out_h, out_w = dy.shape[2], dy.shape[3]
    in_plane, out_plane = height * width, out_h * out_w
    df = dx.reshape(-1)
    gf = dy.reshape(-1)
    af = argmax.reshape(-1)
    for plane in range(n_img * channels):
        dst = plane * in_plane
        src = plane * out_plane
        for q in range(dst, dst + in_plane):
            df[_u(q)] = 0
        for q in range(src, src + out_plane):
            where = af[_u(q)]
            if where >= 0:
                df[_u(dst + where)] += gf[_u(q)]


@njit
def pool_ave_fwd(x, y, area, kh, kw, sh, sw, ph, pw, zero):
    """Average pooling: in-image sum over ``area[i, j]`` (the window
    clipped to the padded image, precomputed by the layer in x's dtype).
    ``zero`` is 0 in x's dtype (a ``0.0`` literal would make the sum
    float64)."""
    n_img, channels, height, width = x.shape
    out_h, out_w = y.shape[2], y.shape[3]
    xf = x.reshape(-1)
    yf = y.reshape(-1)
    for plane in range(n_img * channels):
        src = plane * height * width
        dst = plane * out_h * out_w
        for i in range(out_h):
            h0 = max(i * sh - ph, 0)
            h1 = min(i * sh - ph + kh, height)
            for j in range(out_w):
                w0 = max(j * sw - pw, 0)
                w1 = min(j * sw - pw + kw, width)
                acc = zero
                for h in range(h0, h1):
                    for w in range(w0, w1):
                        acc += xf[_u(src + h * width + w)]
                yf[_u(dst + i * out_w + j)] = acc / area[i, j]


@njit
def pool_ave_bwd(dy, dx, area, kh, kw, sh, sw, ph, pw):
    """Overwrite ``dx``: every in-image element of window ``(i, j)``
    receives ``dy[i, j] / area[i, j]``."""
    n_img, channels, height, width = dx.shape
    out_h, out_w = dy.shape[2], dy.shape[3]
    df = dx.reshape(-1)
    gf = dy.reshape(-1)
    for plane in range(n_img * channels):
        dst = plane * height * width
        src = plane * out_h * out_w
        for q in range(dst, dst + height * width):
            df[_u(q)] = 0
        for i in range(out_h):
            h0 = max(i * sh - ph, 0)
            h1 = min(i * sh - ph + kh, height)
            for j in range(out_w):
                w0 = max(j * sw - pw, 0)
                w1 = min(j * sw - pw + kw, width)
                share = gf[_u(src + i * out_w + j)] / area[i, j]
                for h in range(h0, h1):
                    for w in range(w0, w1):
                        df[_u(dst + h * width + w)] += share


# --------------------------------------------------------------- adapter
class PoolingNumba(EngineAdapter):
    """Pooling on the Numba engine.  Stateless: it writes the layer's
    ``argmax`` buffer (Caffe's ``max_idx_``) as the reference does."""

    def forward(self, bottom, top):
        layer = self.layer
        x, y = bottom[0].data, top[0].data
        (kh, kw), (sh, sw), (ph, pw) = layer.kernel, layer.stride, layer.pad
        if layer.pool != MAX:
            pool_ave_fwd(x, y, layer.pool_area, kh, kw, sh, sw, ph, pw,
                         x.dtype.type(0))
            return
        lowest = x.dtype.type(-FLT_MAX)
        h, w = x.shape[2:]
        out_h, out_w = layer.out_shape
        # The common 2x2 window, when no window needs clipping, has an
        # unrolled kernel (3x faster).
        if ((kh, kw, ph, pw) == (2, 2, 0, 0) and (out_h - 1) * sh + 2 <= h
                and (out_w - 1) * sw + 2 <= w):
            pool_max_fwd_2x2(x, y, layer.argmax, sh, sw, lowest)
        else:
            pool_max_fwd(x, y, layer.argmax, kh, kw, sh, sw, ph, pw, lowest)
        if len(top) > 1:
            top[1].data[...] = layer.argmax

    def backward(self, top, propagate_down, bottom):
        layer = self.layer
        if not propagate_down[0]:
            return
        dx, dy = bottom[0].diff, top[0].diff
        (kh, kw), (sh, sw), (ph, pw) = layer.kernel, layer.stride, layer.pad
        if layer.pool == MAX:
            pool_max_bwd(dy, layer.argmax, dx)
        else:
            pool_ave_bwd(dy, dx, layer.pool_area, kh, kw, sh, sw, ph, pw)
