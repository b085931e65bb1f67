"""CuPy kernels for SoftmaxWithLoss.

Forward: one CUDA thread per position ``p = i * inner + k`` computes the
softmax column (written to ``prob``, which the GPU path always keeps),
classifies the label and writes the position's loss.  CuPy reductions
then sum the losses and count the valid positions, and a single
device-to-host check of the "bad label" flags decides whether to raise.
Backward: one thread per element, ``dx = scale * (prob - onehot)``, 0 at
ignored positions.  Factories are memoised by dtype; nothing is built at
import time.  See docs/layers/softmax_loss.md, "CuPy engine".

Label codes match :mod:`netlite.layers.softmax_loss_numba`: ``>= 0`` the
class, -1 ignored, -2 not an integer, -3 out of range.
"""

import functools

import cupy
import numpy as np

import netlite.layers.softmax_cupy

_FWD_SOURCE = netlite.layers.softmax_cupy.SOFTMAX_COLUMN_SOURCE.replace(
    "OUT", "prob"
) + """    const L value = label[i];
    long long cd;
    if (!(value == floor(value))) {
        cd = -2;                                   /* also NaN */
    } else if (has_ignore && (double)value == (double)ignore_label) {
        cd = -1;
    } else if ((double)value < 0 || (double)value >= (double)C) {
        cd = -3;
    } else {
        cd = (long long)value;
    }
    code[i] = cd;
    double l = 0;
    if (cd >= 0) {
        T p = prob[base + cd * inner];
        const T flt_min = (T)1.1754943508222875e-38;
        p = p < flt_min ? flt_min : p;             /* NaN stays NaN */
        l = -log((double)p);
    }
    loss[i] = l;
"""

_BWD_SOURCE = """
    const ptrdiff_t plane = (ptrdiff_t)C * inner;
    const ptrdiff_t o = i / plane;
    const ptrdiff_t c = (i % plane) / inner;
    const ptrdiff_t k = i % inner;
    const long long cd = code[o * inner + k];
    dx = cd < 0 ? (T)0 : (prob[i] - (c == cd ? (T)1 : (T)0)) * scale[0];
"""


@functools.cache
def softmax_loss_fwd_kernel(dtype):
    """ElementwiseKernel ``softmax_loss_fwd`` for ``dtype`` (one thread per
    position)."""
    del dtype  # generic in T; the key keeps one kernel per dtype
    return cupy.ElementwiseKernel(
        "raw T x, raw L label, int32 C, int32 inner, bool has_ignore, "
        "int32 ignore_label",
        "raw T prob, raw int64 code, raw float64 loss",
        _FWD_SOURCE,
        name="softmax_loss_fwd",
    )


@functools.cache
def softmax_loss_bwd_kernel(dtype):
    """ElementwiseKernel ``softmax_loss_bwd`` for ``dtype`` (one thread per
    element)."""
    del dtype
    return cupy.ElementwiseKernel(
        "raw T prob, raw int64 code, int32 C, int32 inner, raw T scale",
        "T dx",
        _BWD_SOURCE,
        name="softmax_loss_bwd",
    )


def softmax_loss_fwd(x, label, outer, n, inner, has_ignore, ignore_label,
                     prob):
    """Fused forward on the GPU.

    Returns ``(loss_sum, valid_count, first_bad, code)``: the float64 sum
    of the valid positions' losses (a host float), their count, the flat
    index of the first bad label (-1 when none) and the device array of
    label codes the backward needs.
    """
    npos = outer * inner
    code = cupy.empty(npos, dtype=cupy.int64)
    loss = cupy.empty(npos, dtype=cupy.float64)
    softmax_loss_fwd_kernel(np.dtype(x.dtype))(
        x, label, np.int32(n), np.int32(inner), bool(has_ignore),
        np.int32(ignore_label), prob, code, loss, size=npos,
    )
    bad = code < -1
    # One device-to-host transfer decides whether any label is invalid.
    first_bad = int(cupy.argmax(bad)) if bool(bad.any()) else -1
    valid = int(cupy.count_nonzero(code >= 0))
    return float(loss.sum()), valid, first_bad, code


def softmax_loss_bwd(prob, code, outer, n, inner, scale, dx):
    """``dx = scale * (prob - onehot)``, 0 at ignored positions.

    ``scale`` is a one-element device array (``loss_weight /
    normalizer``), so the backward never waits for the host.
    """
    softmax_loss_bwd_kernel(np.dtype(prob.dtype))(
        prob, code, np.int32(n), np.int32(inner), scale.reshape(1), dx
    )
