"""Naive oracles: slow, obviously correct float64 versions of the layers.

Each function computes a layer's forward from its definition on the docs
page, with explicit loops where the layer vectorises, so that a test can
hold the layer to it (the STUMPY habit).  Inputs and outputs are float64
NumPy arrays; hyper-parameters are keyword arguments with the layer's
defaults.  Nothing here imports the layer under test.
"""

import math

import numpy as np

#: Caffe's probability floor (float32's FLT_MIN, in every dtype).
FLT_MIN = float(np.finfo(np.float32).tiny)


def _columns(shape, axis):
    """``(outer, C, inner)`` of ``shape`` around ``axis``."""
    axis %= len(shape)
    return (int(np.prod(shape[:axis])), shape[axis],
            int(np.prod(shape[axis + 1:])))


def relu(x, negative_slope=0.0):
    """``y = x`` for ``x > 0``, else ``negative_slope * x``."""
    y = np.empty_like(x)
    for i, v in enumerate(x.flat):
        y.flat[i] = v if v > 0 else negative_slope * v
    return y


def softmax(x, axis=1):
    """Softmax over ``axis``, column by column, max-subtracted."""
    outer, c, inner = _columns(x.shape, axis)
    xv = x.reshape(outer, c, inner)
    y = np.empty_like(xv)
    for i in range(outer):
        for k in range(inner):
            col = xv[i, :, k]
            e = np.array([math.exp(v - max(col)) for v in col])
            y[i, :, k] = e / e.sum()
    return y.reshape(x.shape)


def softmax_with_loss(x, labels, axis=1, ignore_label=None,
                      normalization="VALID"):
    """Caffe's SoftmaxWithLoss: ``(loss, dL/dx)`` for loss weight 1.

    ``normalization`` is one of FULL, VALID, BATCH_SIZE, NONE; the divisor
    is at least 1.
    """
    outer, c, inner = _columns(x.shape, axis)
    p = softmax(x, axis).reshape(outer, c, inner)
    lab = np.asarray(labels).reshape(outer, inner)
    loss, valid = 0.0, 0
    grad = np.zeros_like(p)
    for i in range(outer):
        for k in range(inner):
            label = int(lab[i, k])
            if ignore_label is not None and label == ignore_label:
                continue
            loss -= math.log(max(p[i, label, k], FLT_MIN))
            valid += 1
            grad[i, :, k] = p[i, :, k]
            grad[i, label, k] -= 1
    z = {"FULL": outer * inner, "VALID": valid, "BATCH_SIZE": outer,
         "NONE": 1}[normalization]
    z = max(1, z)
    return loss / z, grad.reshape(x.shape) / z


def inner_product(x, w, b=None, axis=1, transpose=False):
    """``y[m, n] = sum_k x[m, k] W[n, k] + b[n]`` (``W[k, n]`` transposed),
    the axes of ``x`` from ``axis`` on flattened into ``k``."""
    rows = int(np.prod(x.shape[:axis]))
    xm = x.reshape(rows, -1)
    wm = w.T if transpose else w
    n_out = wm.shape[0]
    y = np.zeros((rows, n_out))
    for m in range(rows):
        for n in range(n_out):
            y[m, n] = sum(xm[m, k] * wm[n, k] for k in range(xm.shape[1]))
            if b is not None:
                y[m, n] += b[n]
    return y.reshape(x.shape[:axis] + (n_out,))
