"""CuPy engine for LabelSpecificAdd: a kernel and the adapter
:class:`LabelSpecificAddCuPy`.

The ``N x C`` work is one pass: one thread per element copies ``x`` into
``z`` (skipped in place) and raises a device flag at a NaN or infinity
(:func:`copy_check`).  One device-to-host read of that flag decides whether
to run the reference's check, which raises its NonFiniteError.  The target
logits are O(N): the layer's own ``target_margin(c, cols)`` /
``top_values(cols)`` (array-module generic) compute them on CuPy arrays,
and fancy indexing gathers ``c = z[rows, cols]`` and scatters the result.
The backward is a device copy ``dx = dz`` (nothing in place).

The factory is memoised by dtype and builds nothing at import time; the
kernel is shared with label_specific_margin_cupy.  See
docs/layers/label_specific_add.md, appendix "The CuPy kernels".
"""

import functools

import cupy
import numpy as np

from netlite.layer import EngineAdapter
from netlite.layers._additive_margin import check_finite, margin_rows

_COPY_CHECK_SOURCE = """
    const T v = x[i];
    if (!isfinite((double)v)) {
        bad[0] = 1;  /* every writer stores the same value */
    }
    if (copy) {
        z[i] = v;
    }
"""


@functools.cache
def copy_check_kernel(dtype):
    """ElementwiseKernel ``margin_copy_check`` for ``dtype`` (one thread
    per element)."""
    del dtype  # generic in T; the key keeps one kernel per dtype
    return cupy.ElementwiseKernel(
        "raw T x, bool copy", "raw T z, raw int32 bad", _COPY_CHECK_SOURCE,
        name="margin_copy_check",
    )


def copy_check(x, z, copy):
    """``z = x`` when ``copy`` (in place: not); True when ``x`` holds a NaN
    or an infinity (one device-to-host transfer)."""
    bad = cupy.zeros(1, dtype=cupy.int32)
    copy_check_kernel(np.dtype(x.dtype))(x, bool(copy), z, bad, size=x.size)
    return bool(bad[0])


def apply_target_margin(layer, bottom, top):
    """The forward shared by both margin layers' adapters: copy and check,
    rows, ``top[1]``, then ``z[rows, cols] = target_margin(c, cols)``.

    Returns ``(rows, cols, factor)`` for the backward.
    """
    if copy_check(bottom[0].flat_data, top[0].flat_data, top[0] is not bottom[0]):
        check_finite(layer, bottom[0])  # raises the reference's error
    rows, cols = margin_rows(layer, bottom[1], layer.channels, layer.ignore_label)
    if len(top) > 1:
        top[1].data[...] = layer.top_values(cols).astype(layer.dtype)
    z = top[0].data.reshape(layer.num, layer.channels)
    value, factor = layer.target_margin(z[rows, cols].astype(cupy.float64), cols)
    z[rows, cols] = value.astype(layer.dtype)
    return rows, cols, factor


class LabelSpecificAddCuPy(EngineAdapter):
    """LabelSpecificAdd on the GPU (the backward needs no state: the bias
    does not depend on the input)."""

    def forward(self, bottom, top):
        apply_target_margin(self.layer, bottom, top)

    def backward(self, top, propagate_down, bottom):
        self.layer.check_no_label_backward(propagate_down)
        if propagate_down[0] and top[0] is not bottom[0]:
            cupy.copyto(bottom[0].diff, top[0].diff)
