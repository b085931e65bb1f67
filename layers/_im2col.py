"""Windows over N-D planes: the table of where every tap reads, the
gather (im2col) and its adjoint, the scatter-add (col2im).

Shared by Convolution and Pooling (the reference engine; their Numba
kernels do the same in loops).  Array-module generic: ``xp`` is NumPy or
CuPy.  See docs/layers/convolution.md §2 (im2col) and §3 (col2im).
"""

import numpy as np


def window_table(in_shape, kernel, stride, pad, dilation, out_shape):
    """Where every kernel tap of every output position reads its input.

    Parameters
    ----------
    in_shape, kernel, stride, pad, dilation, out_shape : tuple of int
        One entry per spatial axis (all of the same length ``d >= 0``).

    Returns
    -------
    index : ndarray of int64, shape (prod(kernel), prod(out_shape))
        ``index[k, p]`` is the flat (row-major) position inside one input
        plane read by kernel tap ``k`` at output position ``p``; both are
        raster-order indices.  Taps that fall into the padding read 0.
    valid : ndarray of bool, same shape
        False where the tap falls into the zero padding.

    Notes
    -----
    Along axis ``i`` the tap ``k_i`` of output ``o_i`` reads input
    ``o_i * stride_i - pad_i + k_i * dilation_i``, which is valid when it
    lies in ``[0, in_shape_i)``.
    """
    d = len(in_shape)
    index = np.zeros((1,) * (2 * d), dtype=np.int64)
    valid = np.ones((1,) * (2 * d), dtype=bool)
    for i in range(d):
        taps = np.arange(kernel[i])[:, None]
        outs = np.arange(out_shape[i])[None, :]
        pos = outs * stride[i] - pad[i] + taps * dilation[i]
        shape = [1] * (2 * d)
        shape[i], shape[d + i] = kernel[i], out_shape[i]
        pos = pos.reshape(shape)
        valid = valid & (pos >= 0) & (pos < in_shape[i])
        index = index * in_shape[i] + pos
    index = np.where(valid, index, 0)
    taps, outs = int(np.prod(kernel)), int(np.prod(out_shape))
    return index.reshape(taps, outs), valid.reshape(taps, outs)


def im2col(planes, index, outside=None):
    """Gather every window: ``col[..., k, p] = planes[..., index[k, p]]``.

    Parameters
    ----------
    planes : array, shape (..., plane)
        Flattened input planes.
    index : int array, shape (K, P)
        From :func:`window_table`.
    outside : bool array, shape (K, P), optional
        Taps in the padding; their entries are set to 0.

    Returns
    -------
    col : array, shape (..., K, P)
    """
    col = planes[..., index]
    if outside is not None:
        col[..., outside] = 0
    return col


def col2im(xp, values, index, num_planes, plane, keep=None):
    """Adjoint of :func:`im2col`: add every value onto the input element it
    was read from, summing overlaps.

    Parameters
    ----------
    xp : module
        numpy or cupy.
    values : array, shape (num_planes, ...)
        One value per (plane, tap, position); broadcast against ``index``.
    index : int array
        In-plane positions, broadcastable with ``values`` after its first
        axis: ``(K, P)`` from :func:`window_table` for every plane, or
        ``(num_planes, P)`` for a per-plane choice (max pooling's argmax).
    num_planes, plane : int
        Number and size of the planes written.
    keep : bool array, optional
        Where False the value is dropped (padding taps, empty windows).

    Returns
    -------
    array, shape (num_planes, plane)
        The sums (``bincount`` accumulates in float64 and rounds once).
    """
    offsets = xp.arange(num_planes, dtype=np.int64) * plane
    target = offsets.reshape((num_planes,) + (1,) * (values.ndim - 1)) + index
    values = xp.broadcast_to(values, target.shape)
    if keep is not None:
        values = xp.where(keep, values, values.dtype.type(0))
        target = xp.where(keep, target, 0)
    out = xp.bincount(target.ravel(), weights=values.ravel(),
                      minlength=num_planes * plane)
    return out.reshape(num_planes, plane)
