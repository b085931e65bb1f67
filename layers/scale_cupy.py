"""CuPy engine for Scale: kernels and the adapter :class:`ScaleCuPy`.

The ``(outer, D, inner)`` view of a blob is addressed as
``x[(o * D + d) * inner + k]``; the scale ``s`` (learned, or ``bottom[1]``;
a scalar is ``D = 1``, ``outer = 1``) as ``s[d]``, ``d = (j / inner) % D``.

* **Forward / bottom diff**: one thread per element, ``y = x * s[d]``
  (the same kernel gives ``dx = dy * s[d]``; ``y`` may be ``x``, ``dx``
  may be ``dy``), in the blob's dtype as in the reference.
* **Scale diff**: a CuPy ``ReductionKernel`` over axes 0 and 2 of the
  view sums ``dy * x`` (the product in the dtype) in a float64
  accumulator; the sum, rounded to the dtype, is added to a learned
  scale's diff (``+=``) or written to ``bottom[1].diff``.
* In place, the adapter saves ``x`` (a device copy) before the forward
  overwrites it, for the scale gradient.
* The clamp (``min_value`` / ``max_value``) and the bias term run as in the
  reference: the clamp is a CuPy ``maximum`` / ``minimum`` on the scale
  (O(D)), the bias the internal Bias layer's own forward / backward.  An
  empty bottom runs the reference.

Kernel factories are memoised by dtype and build nothing at import time.
See docs/layers/scale.md, appendix "The CuPy kernels".
"""

import functools

import cupy
import numpy as np

from netlite.layer import EngineAdapter

_MUL_SOURCE = """
    const ptrdiff_t j = i;
    y[j] = x[j] * s[(j / inner) % D];
"""


@functools.cache
def broadcast_mul_kernel(dtype):
    """ElementwiseKernel ``scale_mul``: ``y = x * s[d]`` (one thread per
    element; ``y`` may be ``x``)."""
    del dtype  # generic in T; the key keeps one kernel per dtype
    return cupy.ElementwiseKernel(
        "raw T x, raw T s, int32 D, int32 inner", "raw T y", _MUL_SOURCE,
        name="scale_mul",
    )


@functools.cache
def scale_grad_kernel(dtype):
    """ReductionKernel ``scale_grad``: ``sum(dy * x)`` over the reduced
    axes in float64 (the products in ``dtype``)."""
    del dtype
    return cupy.ReductionKernel(
        "T dy, T x", "float64 g", "(double)(dy * x)", "a + b", "g = a", "0",
        name="scale_grad", reduce_type="float64",
    )


# ------------------------------------------------------------------- API
def scale_mul(x, s, y, outer, d, inner):
    """``y = x * s`` broadcast over the ``(outer, d, inner)`` view of flat
    ``x`` (``s`` flat, ``d`` long; ``y`` may be ``x``)."""
    broadcast_mul_kernel(np.dtype(x.dtype))(
        x, s, np.int32(d), np.int32(inner), y, size=outer * d * inner)


def scale_grad(dy, x, outer, d, inner):
    """``sum_{o,k} dy * x`` per ``d`` (a float64 device array of ``d``)."""
    return scale_grad_kernel(np.dtype(x.dtype))(
        dy.reshape(outer, d, inner), x.reshape(outer, d, inner), axis=(0, 2))


# --------------------------------------------------------------- adapter
class ScaleCuPy(EngineAdapter):
    """Scale on the GPU; keeps a copy of ``x`` when the layer runs in
    place (the scale gradient needs it)."""

    def __init__(self, layer):
        super().__init__(layer)
        self.x_saved = None

    def forward(self, bottom, top):
        layer = self.layer
        if bottom[0].count == 0:
            layer.forward_cpu(bottom, top)
            return
        x = bottom[0].flat_data
        if top[0] is bottom[0]:
            self.x_saved = x.copy()
        if layer.min_value is not None:
            cupy.maximum(layer.blobs[0].data, layer.min_value, out=layer.blobs[0].data)
        if layer.max_value is not None:
            cupy.minimum(layer.blobs[0].data, layer.max_value, out=layer.blobs[0].data)
        s = (bottom[1] if len(bottom) > 1 else layer.blobs[0]).flat_data
        scale_mul(x, s, top[0].flat_data, layer.outer, layer.scale_dim, layer.inner)
        if layer.bias_layer is not None:
            layer.bias_layer.forward([top[0]], top)

    def backward(self, top, propagate_down, bottom):
        layer = self.layer
        if bottom[0].count == 0:
            layer.backward_cpu(top, propagate_down, bottom)
            return
        bias = layer.bias_layer
        if bias is not None and layer.propagates_param(len(layer.blobs) - 1):
            bias.backward(top, [False], [top[0]])
        learned = len(bottom) == 1
        scale = layer.blobs[0] if learned else bottom[1]
        dy = top[0].flat_diff
        outer, d, inner = layer.outer, layer.scale_dim, layer.inner
        # The scale gradient reads dy before an in-place bottom diff
        # overwrites it below.
        if (learned and layer.propagates_param(0)) or (
                not learned and propagate_down[1]):
            x = self.x_saved if top[0] is bottom[0] else bottom[0].flat_data
            grad = scale_grad(dy, x, outer, d, inner).astype(layer.dtype)
            diff = scale.flat_diff
            if learned:
                diff += grad
            else:
                diff[...] = grad
        if propagate_down[0]:
            scale_mul(dy, scale.flat_data, bottom[0].flat_diff, outer, d, inner)
