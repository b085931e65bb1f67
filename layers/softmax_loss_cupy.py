"""CuPy engine for SoftmaxWithLoss: kernels and the adapter
:class:`SoftmaxWithLossCuPy`.

Forward: one CUDA thread per position ``p = i * inner + k`` computes the
softmax column (written to ``prob``, which the GPU path always keeps),
classifies the label and writes the position's loss.  CuPy reductions
then sum the losses and count the valid positions, and a single
device-to-host check of the "bad label" flags decides whether to raise.
Backward: one thread per element, ``dx = scale * (prob - onehot)``, 0 at
ignored positions.  Factories are memoised by dtype; nothing is built at
import time.  See docs/layers/softmax_loss.md, appendix "CuPy engine".

Label codes and FLT_MIN are formatted into the source from
:mod:`netlite.layers._labels`, whose rule the kernel follows.
"""

import functools
import string

import cupy
import numpy as np

from netlite.layer import EngineAdapter
from netlite.layers import _labels
from netlite.layers.softmax_cupy import SOFTMAX_COLUMN_SOURCE, softmax_bwd

_FWD_SOURCE = SOFTMAX_COLUMN_SOURCE.replace("OUT", "prob") + string.Template("""\
    const L value = label[i];
    long long cd;
    if (!(value == floor(value)) || isinf((double)value)) {
        cd = $NOT_INTEGER;                         /* NaN too */
    } else if (has_ignore && (double)value == (double)ignore_label) {
        cd = $IGNORED;
    } else if ((double)value < 0 || (double)value >= (double)C) {
        cd = $OUT_OF_RANGE;
    } else {
        cd = (long long)value;
    }
    code[i] = cd;
    double l = 0;
    if (cd >= 0) {
        T p = prob[base + cd * inner];
        const T flt_min = (T)$FLT_MIN;
        p = p < flt_min ? flt_min : p;             /* NaN stays NaN */
        l = -log((double)p);
    }
    loss[i] = l;
""").substitute(
    NOT_INTEGER=_labels.NOT_INTEGER, IGNORED=_labels.IGNORED,
    OUT_OF_RANGE=_labels.OUT_OF_RANGE, FLT_MIN=repr(_labels.FLT_MIN),
)

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
    bad = code < _labels.IGNORED
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


# --------------------------------------------------------------- adapter
class SoftmaxWithLossCuPy(EngineAdapter):
    """SoftmaxWithLoss on the GPU; keeps the label codes of the last
    forward (a device array) for the backward."""

    def __init__(self, layer):
        super().__init__(layer)
        self.code = None

    def forward(self, bottom, top):
        layer = self.layer
        has_ignore = layer.ignore_label is not None
        self.code = None
        loss, valid, first_bad, code = softmax_loss_fwd(
            bottom[0].flat_data, bottom[1].flat_data, layer.outer,
            layer.channels, layer.inner, has_ignore,
            layer.ignore_label if has_ignore else 0, layer.prob.flat_data,
        )
        if first_bad >= 0:
            raise layer.label_error(bottom[1], first_bad)
        self.code = code
        layer.valid_count = valid
        dtype = layer.dtype.type
        value = dtype(loss) / dtype(layer.normalizer(valid))
        top[0].data[...] = value
        layer.check_finite(float(value), bottom[0], code)

    def backward(self, top, propagate_down, bottom):
        layer = self.layer
        layer.check_no_label_backward(propagate_down)
        if not propagate_down[0]:
            return
        scale = top[0].diff.reshape(1) / layer.dtype.type(
            layer.normalizer(layer.valid_count)
        )
        softmax_loss_bwd(layer.prob.flat_data, self.code, layer.outer,
                         layer.channels, layer.inner, scale, bottom[0].flat_diff)
        if len(top) > 1:
            softmax_bwd(layer.prob.flat_data, top[1].flat_diff,
                        bottom[0].flat_diff, layer.outer, layer.channels,
                        layer.inner, True)
