"""CuPy engine for LabelSpecificMargin: the adapter
:class:`LabelSpecificMarginCuPy`.

The forward is label_specific_add_cupy's: one element-wise pass copies the
cosines and flags a NaN or infinity, then the layer's own
``target_margin(c, cols)`` (array-module generic: psi and its slope on
CuPy arrays, O(N)) gives the target logits, gathered and scattered by
fancy indexing.  The adapter keeps the rows, classes and slopes of the
last forward; the backward is a device copy ``dx = dz`` (nothing in place)
and ``dx[rows, cols] *= factor`` (the product in float64, rounded to the
dtype, as in the reference).  See docs/layers/label_specific_margin.md,
appendix "The CuPy kernels".
"""

import cupy

from netlite.layer import EngineAdapter
from netlite.layers.label_specific_add_cupy import apply_target_margin


class LabelSpecificMarginCuPy(EngineAdapter):
    """LabelSpecificMargin on the GPU; keeps the margin rows, their classes
    and the backward's factors (device arrays) of the last forward."""

    def __init__(self, layer):
        super().__init__(layer)
        self.rows = self.cols = self.factor = None

    def forward(self, bottom, top):
        self.rows = self.cols = self.factor = None
        self.rows, self.cols, self.factor = apply_target_margin(
            self.layer, bottom, top)

    def backward(self, top, propagate_down, bottom):
        layer = self.layer
        layer.check_no_label_backward(propagate_down)
        if not propagate_down[0]:
            return
        if top[0] is not bottom[0]:
            cupy.copyto(bottom[0].diff, top[0].diff)
        dx = bottom[0].diff.reshape(layer.num, layer.channels)
        rows, cols = self.rows, self.cols
        dx[rows, cols] = (dx[rows, cols] * self.factor).astype(layer.dtype)
