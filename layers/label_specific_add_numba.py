"""Numba engine for LabelSpecificAdd: the N x C kernels of the target-logit
margin layers and the adapter :class:`LabelSpecificAddNumba`.

The layer changes one logit per row; everything else is a copy.  So the
engine's work over the ``N x C`` cosines is memory traffic only, and that
is what the kernels here do, on flat C-contiguous arrays:

* :func:`copy_check` -- ``z = x`` (skipped in place) and the finiteness of
  every cosine, in one pass;
* :func:`copy_flat` -- ``dx = dz`` (the backward; skipped in place).

The target maths is O(N) and stays the layer's own: the adapter gathers
the target cosines (float64), calls ``layer.target_margin`` and writes the
values, exactly as ``forward_cpu`` does, so no margin formula is written
twice.  LabelSpecificMargin's adapter
(:mod:`netlite.layers.label_specific_margin_numba`) reuses the kernels and
the base :class:`TargetLogitNumba`.  See docs/layers/label_specific_add.md,
appendix "The Numba kernels".

Design
------
* **Finiteness without a branch.**  ``v - v`` is 0 for a finite ``v`` and
  NaN for an infinity or a NaN; the kernel adds it into a scratch block
  element by element (independent iterations, so LLVM vectorises the loop
  without fastmath) and tests the block's sum once per chunk.  A chunk that
  saw a non-finite value reports it; the adapter then runs the reference's
  check (:func:`netlite.layers._additive_margin.check_finite`), which
  raises its NonFiniteError naming the first bad index.  Nothing of the
  target logits has been written by then, so in place ``x`` is intact.
* Work is split into ``nchunks`` contiguous element ranges, one per thread;
  blobs under ``PARALLEL_MIN_ELEMENTS`` use the serial build.
"""

import numpy as np
from numba import prange

from netlite.jit import build
from netlite.layer import EngineAdapter
from netlite.layers._additive_margin import check_finite, margin_rows
from netlite.layers.softmax_numba import BLOCK, num_chunks, parallel_for


# ------------------------------------------------------------------ kernels
def _copy_check(x, z, copy, buf, bad):
    nchunks, width = buf.shape
    n = x.size
    for t in prange(nchunks):
        b = buf[t]
        for j in range(width):
            b[j] = 0
        lo = t * n // nchunks
        hi = (t + 1) * n // nchunks
        for start in range(lo, hi, width):
            nb = min(width, hi - start)
            xs = x[start:start + nb]
            if copy:
                zs = z[start:start + nb]
                for j in range(nb):
                    v = xs[j]
                    zs[j] = v
                    b[j] += v - v  # 0, or NaN for a NaN or an infinity
            else:
                for j in range(nb):
                    v = xs[j]
                    b[j] += v - v
        s = b[0]
        for j in range(1, width):
            s += b[j]
        bad[t] = s != s


def _copy_flat(src, dst, nchunks):
    n = src.size
    for t in prange(nchunks):
        lo = t * n // nchunks
        hi = (t + 1) * n // nchunks
        # Slices keep the index a counter from 0 (no negative-index
        # wraparound in the loop), so LLVM vectorises it.
        s = src[lo:hi]
        d = dst[lo:hi]
        for j in range(hi - lo):
            d[j] = s[j]


# ---------------------------------------------------------------------- API
def chunks_for(count):
    """``(parallel, nchunks)`` for a pass over ``count`` elements."""
    parallel = parallel_for(count, between_gemms=True)
    return parallel, num_chunks(parallel, max(1, count // BLOCK))


def copy_check(x, z, copy, buffers=None):
    """``z = x`` (when ``copy``) and whether every element of flat ``x`` is
    finite, in one pass.

    ``buffers`` is ``(buf, bad)`` from an earlier call (reallocated when
    missing or of the wrong shape or dtype).  Returns ``(finite,
    buffers)``.
    """
    parallel, nchunks = chunks_for(x.size)
    if (buffers is None or buffers[0].shape[0] != nchunks
            or buffers[0].dtype != x.dtype):
        buffers = (np.empty((nchunks, BLOCK), dtype=x.dtype),
                   np.empty(nchunks, dtype=np.bool_))
    buf, bad = buffers
    build(_copy_check, parallel)(x, z, bool(copy), buf, bad)
    return not bool(bad.any()), buffers


def copy_flat(src, dst):
    """``dst = src`` for flat arrays of one size (threads above
    ``PARALLEL_MIN_ELEMENTS``)."""
    parallel, nchunks = chunks_for(src.size)
    build(_copy_flat, parallel)(src, dst, nchunks)


# ------------------------------------------------------------------ adapters
class TargetLogitNumba(EngineAdapter):
    """The shared adapter of the target-logit margin layers.

    ``forward`` copies and checks the cosines with :func:`copy_check`, then
    does the layer's own O(N) part (labels by ``margin_rows``, ``top[1]``
    by ``layer.top_values``, the target logits by ``layer.target_margin``);
    it keeps the margin rows, their classes and the backward's factors.
    ``backward`` copies the diff with :func:`copy_flat` and, when
    :attr:`uses_factor`, multiplies each target's diff by its factor.
    """

    #: Whether the backward multiplies the target diffs by the factor
    #: ``target_margin`` returned (LabelSpecificAdd's is always 1).
    uses_factor = True

    def __init__(self, layer):
        super().__init__(layer)
        self.buffers = None
        self.rows = self.cols = self.factor = None

    def forward(self, bottom, top):
        layer = self.layer
        x, z = bottom[0].flat_data, top[0].flat_data
        finite, self.buffers = copy_check(x, z, top[0] is not bottom[0],
                                          self.buffers)
        if not finite:
            check_finite(layer, bottom[0])  # raises the reference's error
        rows, cols = margin_rows(layer, bottom[1], layer.channels, layer.ignore_label)
        if len(top) > 1:
            top[1].data[...] = layer.top_values(cols).astype(layer.dtype)
        z2 = z.reshape(layer.num, layer.channels)
        value, factor = layer.target_margin(z2[rows, cols].astype(np.float64), cols)
        z2[rows, cols] = value.astype(layer.dtype)
        self.rows, self.cols, self.factor = rows, cols, factor

    def backward(self, top, propagate_down, bottom):
        layer = self.layer
        layer.check_no_label_backward(propagate_down)
        if not propagate_down[0]:
            return
        if top[0] is not bottom[0]:
            copy_flat(top[0].flat_diff, bottom[0].flat_diff)
        if self.uses_factor:
            dx = bottom[0].diff.reshape(layer.num, layer.channels)
            rows, cols = self.rows, self.cols
            dx[rows, cols] = (dx[rows, cols] * self.factor).astype(layer.dtype)


class LabelSpecificAddNumba(TargetLogitNumba):
    """LabelSpecificAdd on the Numba engine: the backward is the identity
    (a copy, nothing in place)."""

    uses_factor = False
