"""Numba engine for Scale: kernels and the adapter :class:`ScaleNumba`.

Pure functions on flat, C-contiguous arrays: the ``(outer, D, inner)`` view
of ``x`` is addressed as ``x[(i * D + d) * inner + k]`` and the scale as
``s[d]``.  Imported by :meth:`netlite.layer.Layer.adapter` when a Scale first
runs on the Numba engine.  See docs/layers/scale.md, appendix "The Numba
kernels".

Design
------
* **Rows** (``inner == 1``: a scale over the trailing axes, e.g. ``(N, D)``
  with ``axis: 1``): ``y[i, :] = x[i, :] * s`` row by row; the backward
  accumulates ``sum_i dy[i, :] * x[i, :]`` into a float64 row per thread
  (element-wise, so it vectorises) and writes ``dx = dy * s`` in the same
  pass.
* **Runs** (``inner > 1``, the scalar scale included: ``D = 1``,
  ``inner = count``): the flat range is cut into one contiguous chunk per
  thread, whatever the shape, and each chunk walks the runs of ``inner``
  elements that share one ``s[d]``.  The backward's dot of a run is reduced
  pairwise in float64 blocks, then added to the thread's ``acc[d]``.
* The adapter sums the threads' float64 rows, rounds to the blob's dtype
  and adds (learned scale: the diff accumulates) or assigns
  (``bottom[1]``); ``y = x * s`` and ``dx = dy * s`` are the reference's
  products, bit for bit.  No fastmath.
* **In place** the forward also writes ``x`` to the adapter's own copy, in
  the same pass, and the backward reads ``dy`` and that copy before it
  overwrites ``dy`` with ``dx`` element by element.
* The clamp (``min_value`` / ``max_value``) and the bias (the internal Bias
  layer, on its own engine) are the reference's calls, done by the adapter.
"""

import numpy as np
from numba import prange

from netlite.jit import build
from netlite.layer import EngineAdapter
from netlite.layers.softmax_numba import BLOCK, num_chunks, parallel_for, tree_sum

# ------------------------------------------------------------------ kernels
# In place (``y is x``, ``dx is dy``) the loops read and write through one
# slice: LLVM cannot prove two distinct slices of one buffer apart and would
# run its scalar fallback.

def _scale_fwd_rows(x, s, y, saved, outer, d, in_place, nchunks):
    for t in prange(nchunks):
        for i in range(t * outer // nchunks, (t + 1) * outer // nchunks):
            xr = x[i * d:(i + 1) * d]
            if in_place:  # y is x; saved receives x first
                sr = saved[i * d:(i + 1) * d]
                for k in range(d):
                    v = xr[k]
                    sr[k] = v
                    xr[k] = v * s[k]
            else:
                yr = y[i * d:(i + 1) * d]
                for k in range(d):
                    yr[k] = xr[k] * s[k]


def _scale_fwd_runs(x, s, y, saved, d, inner, in_place, nchunks):
    n = x.size
    for t in prange(nchunks):
        p = t * n // nchunks
        hi = (t + 1) * n // nchunks
        while p < hi:
            r = p // inner
            end = min(hi, (r + 1) * inner)
            sv = s[r % d]
            xs = x[p:end]
            if in_place:  # y is x; saved receives x first
                ss = saved[p:end]
                for j in range(end - p):
                    v = xs[j]
                    ss[j] = v
                    xs[j] = v * sv
            else:
                ys = y[p:end]
                for j in range(end - p):
                    ys[j] = xs[j] * sv
            p = end


def _scale_bwd_rows(x, s, dy, dx, acc, outer, d, want_ds, want_dx, in_place):
    nchunks = acc.shape[0]
    for t in prange(nchunks):
        a = acc[t]
        for k in range(d):
            a[k] = 0.0
        for i in range(t * outer // nchunks, (t + 1) * outer // nchunks):
            xr = x[i * d:(i + 1) * d]
            gr = dy[i * d:(i + 1) * d]
            dxr = dx[i * d:(i + 1) * d]
            # Each g is read before dx (maybe dy itself) is written.
            if want_ds and want_dx and in_place:
                for k in range(d):
                    g = gr[k]
                    a[k] += g * xr[k]
                    gr[k] = g * s[k]
            elif want_ds and want_dx:
                for k in range(d):
                    g = gr[k]
                    a[k] += g * xr[k]
                    dxr[k] = g * s[k]
            elif want_ds:
                for k in range(d):
                    a[k] += gr[k] * xr[k]
            elif in_place:
                for k in range(d):
                    gr[k] = gr[k] * s[k]
            else:
                for k in range(d):
                    dxr[k] = gr[k] * s[k]


def _scale_bwd_runs(x, s, dy, dx, acc, buf, d, inner, want_ds, want_dx, in_place):
    nchunks, width = buf.shape
    n = x.size
    for t in prange(nchunks):
        a = acc[t]
        b = buf[t]
        for k in range(d):
            a[k] = 0.0
        p = t * n // nchunks
        hi = (t + 1) * n // nchunks
        while p < hi:
            r = p // inner
            end = min(hi, (r + 1) * inner)
            dd = r % d
            sv = s[dd]
            if want_ds:
                # Lane j of b sums the products j, j + width, ... of the
                # run (float64, element-wise: vectorised); one pairwise
                # sum of the lanes per run.
                lanes = min(width, end - p)
                for j in range(lanes):
                    b[j] = 0.0
                for start in range(p, end, width):
                    nb = min(width, end - start)
                    xs = x[start:start + nb]
                    gs = dy[start:start + nb]
                    dxs = dx[start:start + nb]
                    if want_dx and in_place:
                        for j in range(nb):
                            g = gs[j]
                            b[j] += g * xs[j]
                            gs[j] = g * sv
                    elif want_dx:
                        for j in range(nb):
                            g = gs[j]
                            b[j] += g * xs[j]
                            dxs[j] = g * sv
                    else:
                        for j in range(nb):
                            b[j] += gs[j] * xs[j]
                a[dd] += tree_sum(b, lanes)
            elif in_place:
                gs = dy[p:end]
                for j in range(end - p):
                    gs[j] = gs[j] * sv
            else:
                gs = dy[p:end]
                dxs = dx[p:end]
                for j in range(end - p):
                    dxs[j] = gs[j] * sv
            p = end


# ---------------------------------------------------------------------- API
def scale_fwd(x, s, y, saved, outer, d, inner, in_place):
    """``y = x * s`` over the ``(outer, d, inner)`` view of flat ``x``.

    ``in_place``: ``y`` is a view of ``x``'s memory; then ``saved`` receives
    ``x`` before it is overwritten (out of place ``saved`` is ignored and
    may be None).
    """
    count = x.size
    parallel = parallel_for(count, between_gemms=True)
    if saved is None:
        saved = y
    if inner == 1:
        nchunks = num_chunks(parallel, outer)
        build(_scale_fwd_rows, parallel)(x, s, y, saved, outer, d, in_place,
                                         nchunks)
    else:
        nchunks = num_chunks(parallel, max(1, count // BLOCK))
        build(_scale_fwd_runs, parallel)(x, s, y, saved, d, inner, in_place,
                                         nchunks)


def scale_bwd(x, s, dy, dx, outer, d, inner, want_ds, want_dx, in_place,
              buffers=None):
    """``dx = dy * s`` (``want_dx``; ``in_place``: ``dx`` is ``dy``) and, with
    ``want_ds``, the per-thread float64 partial sums of ``sum dy * x`` over
    ``outer`` and ``inner``, in the rows of ``buffers[0]``.

    ``buffers`` is ``(acc, buf)``: float64 rows of ``d`` partial sums and
    of ``BLOCK`` scratch, one of each per thread (reallocated when missing
    or too small).  Returns the buffers; ``acc.sum(axis=0)`` is the scale
    gradient.
    """
    count = x.size
    parallel = parallel_for(count, between_gemms=True)
    work = outer if inner == 1 else max(1, count // BLOCK)
    nchunks = num_chunks(parallel, work)
    if buffers is None or buffers[0].shape != (nchunks, d):
        buffers = (np.empty((nchunks, d), dtype=np.float64),
                   np.empty((nchunks, BLOCK), dtype=np.float64))
    acc, buf = buffers
    if inner == 1:
        build(_scale_bwd_rows, parallel)(x, s, dy, dx, acc, outer, d,
                                         want_ds, want_dx, in_place)
    else:
        build(_scale_bwd_runs, parallel)(x, s, dy, dx, acc, buf, d, inner,
                                         want_ds, want_dx, in_place)
    return buffers


# ------------------------------------------------------------------ adapter
class ScaleNumba(EngineAdapter):
    """Scale on the Numba engine; owns the copy of ``x`` an in-place forward
    keeps for the backward, and the backward's float64 partial sums.

    Every configuration runs on the kernels but empty blobs (``x`` or the
    scale with no element), which take the reference (``forward_cpu`` /
    ``backward_cpu``, which keep their own state).
    """

    def __init__(self, layer):
        super().__init__(layer)
        self.saved = None
        self.buffers = None
        self.reference = False

    def _scale_blob(self, bottom):
        return bottom[1] if len(bottom) > 1 else self.layer.blobs[0]

    def forward(self, bottom, top):
        layer = self.layer
        scale = self._scale_blob(bottom)
        self.reference = bottom[0].count == 0 or scale.count == 0
        if self.reference:
            layer.forward_cpu(bottom, top)
            return
        # happynear: clamp the stored learned scale in place (the reference's
        # calls).
        if layer.min_value is not None:
            np.maximum(layer.blobs[0].data, layer.min_value, out=layer.blobs[0].data)
        if layer.max_value is not None:
            np.minimum(layer.blobs[0].data, layer.max_value, out=layer.blobs[0].data)
        x = bottom[0].flat_data
        saved = None
        if top[0] is bottom[0]:
            if self.saved is None or self.saved.shape != x.shape \
                    or self.saved.dtype != x.dtype:
                self.saved = np.empty_like(x)
            saved = self.saved
        scale_fwd(x, scale.flat_data, top[0].flat_data, saved, layer.outer,
                  layer.scale_dim, layer.inner, saved is not None)
        if layer.bias_layer is not None:
            layer.bias_layer.forward([top[0]], top)

    def backward(self, top, propagate_down, bottom):
        layer = self.layer
        in_place = top[0] is bottom[0]
        if self.reference or (in_place and self.saved is None):
            layer.backward_cpu(top, propagate_down, bottom)
            return
        bias = len(layer.blobs) - 1
        if layer.bias_layer is not None and layer.propagates_param(bias):
            layer.bias_layer.backward(top, [False], [top[0]])
        scale = self._scale_blob(bottom)
        learned = len(bottom) == 1
        want_ds = layer.propagates_param(0) if learned else bool(propagate_down[1])
        want_dx = bool(propagate_down[0])
        if not (want_ds or want_dx):
            return
        x = self.saved if in_place else bottom[0].flat_data
        self.buffers = scale_bwd(
            x, scale.flat_data, top[0].flat_diff, bottom[0].flat_diff, layer.outer,
            layer.scale_dim, layer.inner, want_ds, want_dx, in_place, self.buffers)
        if want_ds:
            grad = self.buffers[0].sum(axis=0).astype(layer.dtype)
            if learned:
                scale.diff += grad.reshape(scale.shape)
            else:
                scale.diff[...] = grad.reshape(scale.shape)
