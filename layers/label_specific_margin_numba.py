"""Numba engine for LabelSpecificMargin: the adapter
:class:`LabelSpecificMarginNumba`.

The N x C work (copy the cosines, check them, copy the diff) is done by the
kernels of :mod:`netlite.layers.label_specific_add_numba`; the target logit
``psi(c)`` and its factor come from the layer's own ``target_margin`` (O(N),
NumPy), so the margin maths exists once.  The adapter keeps the margin rows,
their classes and the factors between forward and backward.  See
docs/layers/label_specific_margin.md, appendix "The Numba kernels".
"""

from netlite.layers.label_specific_add_numba import TargetLogitNumba


class LabelSpecificMarginNumba(TargetLogitNumba):
    """LabelSpecificMargin on the Numba engine: ``dx = dz`` (a copy, nothing
    in place), then each target's diff times its factor."""

    uses_factor = True
