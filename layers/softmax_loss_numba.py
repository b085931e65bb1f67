"""Numba engine for SoftmaxWithLoss: fused softmax, label pick and loss
kernels, and the adapter :class:`SoftmaxWithLossNumba` that drives them.

Pure functions on flat, C-contiguous arrays (``(outer, C, inner)`` view
addressed as ``x[(i * C + c) * inner + k]``; positions ``p = i * inner +
k``).  Imported by :meth:`netlite.layer.Layer.adapter` when the layer
first runs on the Numba engine.  See docs/layers/softmax_loss.md,
appendix "Numba engine".

Two strategies, chosen by the adapter:

* **prob kept** (the second top exists, or the probabilities fit in the
  cache): the forward writes ``prob`` (max; exp and sum; scale, one
  exponential per element -- without the final scaling when ``prob`` is
  not a top, the backward folding ``1 / s`` into its own scale) and the
  backward is ``dx = scale * (prob - onehot)`` with no exponential at all;
* **statistics only** (large inputs): the forward keeps, per position, the
  max ``m_p`` and ``s_p = sum_c exp(x - m_p)`` (float64), computed online in
  one pass, and the backward recomputes ``prob = exp(x - m_p) / s_p`` on the
  fly.  That is one read of the scores in the forward and one read plus one
  write in the backward: the fewest memory passes possible.

Either way the checked label of every position is kept.  The exponential, the pairwise
block reductions come from :mod:`netlite.layers.softmax_numba`, the
parallel/serial builds from :func:`netlite.jit.build`.

Label codes (``pos_label``) follow :mod:`netlite.layers._labels`:
``>= 0`` the class; ``IGNORED``; ``NOT_INTEGER``; ``OUT_OF_RANGE``.
"""

import math

import numpy as np
from numba import prange

from netlite.jit import build, njit
from netlite.layer import EngineAdapter
from netlite.layers._labels import FLT_MIN, IGNORED, NOT_INTEGER, OUT_OF_RANGE
from netlite.layers.softmax_numba import (
    BLOCK,
    cast_like,
    exp_nonpos,
    num_chunks,
    parallel_for,
    row_exp_sum,
    row_max,
    row_max_sumexp,
    softmax_bwd,
    tile_span,
    tile_width,
)

#: Keep the probabilities (instead of recomputing them in backward) when
#: they take at most this many bytes: about what stays in a last-level
#: cache.
KEEP_PROB_BYTES = 1 << 24


@njit
def label_code(value, n, has_ignore, ignore_label):
    """Classify one float label: its class, or a negative code (the rule of
    :func:`netlite.layers._labels.label_codes`)."""
    if not value == np.floor(value) or np.isinf(value):  # NaN: first test
        return NOT_INTEGER
    v = np.float64(value)
    if has_ignore and v == np.float64(ignore_label):
        return IGNORED
    if v < 0 or v >= n:
        return OUT_OF_RANGE
    return np.int64(v)


@njit
def _position_loss(p, like):
    # -log(max(p, FLT_MIN)), p rounded to the blob's dtype first as the
    # reference does; the log itself is taken in float64.
    pd = cast_like(p, like)
    floor = cast_like(FLT_MIN, like)  # float32's FLT_MIN in any dtype
    if pd < floor:
        pd = floor
    return -math.log(np.float64(pd))


@njit
def _tally(pos_label, pos_loss):
    # Serial: sum of the valid positions' losses, their count and the first
    # invalid label (-1 when none).
    total = 0.0
    valid = 0
    first_bad = -1
    for p in range(pos_label.size):
        code = pos_label[p]
        if code >= 0:
            total += pos_loss[p]
            valid += 1
        elif code < IGNORED and first_bad < 0:
            first_bad = p
    return total, valid, first_bad


# -------------------------------------------------------------- row kernels
def _loss_fwd_rows(x, label, outer, n, has_ignore, ignore_label, pos_max,
                   pos_sum, pos_label, pos_loss, prob, write_prob, normalise,
                   buf):
    nchunks = buf.shape[0]
    for t in prange(nchunks):
        b = buf[t]
        for i in range(t * outer // nchunks, (t + 1) * outer // nchunks):
            code = label_code(label[i], n, has_ignore, ignore_label)
            pos_label[i] = code
            pos_loss[i] = 0.0
            if code < 0 and not write_prob:
                continue  # an ignored row contributes nothing anywhere
            xr = x[i * n:(i + 1) * n]
            if write_prob:
                # The softmax proper: max; exp and sum; scale (the scaling
                # is left to the backward unless prob is a top).
                pr = prob[i * n:(i + 1) * n]
                m = row_max(xr, b)
                s = row_exp_sum(xr, m, pr, b)
                sd = cast_like(s, m)
                if normalise:
                    for c in range(n):
                        pr[c] = pr[c] / sd
                    if code >= 0:
                        pos_loss[i] = _position_loss(pr[code], m)
                elif code >= 0:
                    pos_loss[i] = _position_loss(pr[code] / sd, m)
            else:
                # Statistics only, in one pass; backward recomputes prob.
                m, s = row_max_sumexp(xr, b)
                if code >= 0:
                    p = exp_nonpos(xr[code] - m) / cast_like(s, m)
                    pos_loss[i] = _position_loss(p, m)
            pos_max[i] = m
            pos_sum[i] = s
    return _tally(pos_label[:outer], pos_loss[:outer])


def _loss_bwd_rows(x, outer, n, pos_max, pos_sum, pos_label, scale, dx, prob,
                   from_prob, normalised, nchunks):
    one = cast_like(1.0, scale)
    for t in prange(nchunks):
        for i in range(t * outer // nchunks, (t + 1) * outer // nchunks):
            dxr = dx[i * n:(i + 1) * n]
            code = pos_label[i]
            if code < 0:
                for c in range(n):
                    dxr[c] = 0
                continue
            if from_prob:
                pr = prob[i * n:(i + 1) * n]
                if normalised:
                    for c in range(n):
                        dxr[c] = pr[c] * scale
                    dxr[code] = (pr[code] - one) * scale
                else:  # pr = exp(x - m), not yet divided by s
                    sd = cast_like(pos_sum[i], scale)
                    a = scale / sd
                    for c in range(n):
                        dxr[c] = pr[c] * a
                    dxr[code] = (pr[code] / sd - one) * scale
                continue
            xr = x[i * n:(i + 1) * n]
            m = pos_max[i]
            sd = cast_like(pos_sum[i], m)
            a = scale / sd
            for c in range(n):
                dxr[c] = exp_nonpos(xr[c] - m) * a
            # (p - 1) * scale rather than p * scale - scale: no cancellation.
            dxr[code] = (exp_nonpos(xr[code] - m) / sd - one) * scale


# ---------------------------------------------------------- strided kernels
def _loss_fwd_strided(x, label, outer, n, inner, has_ignore, ignore_label,
                      pos_max, pos_sum, pos_label, pos_loss, prob, write_prob,
                      width, nchunks):
    tiles_per_outer = (inner + width - 1) // width
    ntiles = outer * tiles_per_outer
    for t in prange(nchunks):
        for tile in range(t * ntiles // nchunks, (t + 1) * ntiles // nchunks):
            i, k0, nk = tile_span(tile, tiles_per_outer, width, inner)
            p0 = i * inner + k0
            mk = pos_max[p0:p0 + nk]
            sk = pos_sum[p0:p0 + nk]
            base0 = i * n * inner + k0
            for k in range(nk):
                mk[k] = -np.inf
                sk[k] = 0.0
            for c in range(n):
                xs = x[base0 + c * inner:base0 + c * inner + nk]
                for k in range(nk):
                    if xs[k] > mk[k]:
                        mk[k] = xs[k]
            for c in range(n):
                xs = x[base0 + c * inner:base0 + c * inner + nk]
                for k in range(nk):
                    sk[k] += exp_nonpos(xs[k] - mk[k])
            if write_prob:
                for c in range(n):
                    xs = x[base0 + c * inner:base0 + c * inner + nk]
                    ps = prob[base0 + c * inner:base0 + c * inner + nk]
                    for k in range(nk):
                        ps[k] = exp_nonpos(xs[k] - mk[k]) / cast_like(sk[k], mk[k])
            for k in range(nk):
                p = p0 + k
                code = label_code(label[p], n, has_ignore, ignore_label)
                pos_label[p] = code
                pos_loss[p] = 0.0
                if code >= 0:
                    m = mk[k]
                    e = exp_nonpos(x[base0 + code * inner + k] - m)
                    pos_loss[p] = _position_loss(e / cast_like(sk[k], m), m)
    npos = outer * inner
    return _tally(pos_label[:npos], pos_loss[:npos])


def _loss_bwd_strided(x, outer, n, inner, pos_max, pos_sum, pos_label, scale,
                      dx, buf):
    nchunks, width = buf.shape
    tiles_per_outer = (inner + width - 1) // width
    ntiles = outer * tiles_per_outer
    for t in prange(nchunks):
        ak = buf[t]
        for tile in range(t * ntiles // nchunks, (t + 1) * ntiles // nchunks):
            i, k0, nk = tile_span(tile, tiles_per_outer, width, inner)
            p0 = i * inner + k0
            mk = pos_max[p0:p0 + nk]
            sk = pos_sum[p0:p0 + nk]
            lk = pos_label[p0:p0 + nk]
            base0 = i * n * inner + k0
            zero = cast_like(0.0, scale)
            for k in range(nk):
                ak[k] = scale / cast_like(sk[k], scale) if lk[k] >= 0 else zero
            for c in range(n):
                xs = x[base0 + c * inner:base0 + c * inner + nk]
                ds = dx[base0 + c * inner:base0 + c * inner + nk]
                for k in range(nk):
                    ds[k] = exp_nonpos(xs[k] - mk[k]) * ak[k]
            for k in range(nk):
                code = lk[k]
                if code >= 0:
                    j = base0 + code * inner + k
                    p = exp_nonpos(x[j] - mk[k]) / cast_like(sk[k], scale)
                    dx[j] = (p - cast_like(1.0, scale)) * scale
                else:
                    # Ignored: exactly 0 even where the scores are not finite.
                    for c in range(n):
                        dx[base0 + c * inner + k] = 0


# ------------------------------------------------------------------- API
class Workspace:
    """The kernels a layer's shape needs and the buffers they share.

    Per position ``p`` of the ``(outer, inner)`` grid: ``pos_max`` (dtype)
    and ``pos_sum`` (float64), the softmax statistics; ``pos_label``
    (int64), the label codes; ``pos_loss`` (float64), the losses.  Plus
    scratch rows ``buf``.  :meth:`prepare` picks the builds and sizes the
    buffers once per shape, so a call costs one Numba dispatch.

    Parameters
    ----------
    dtype : numpy dtype
        The scores' dtype.
    """

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self.key = None
        self.pos_max = np.empty(0, self.dtype)
        self.pos_sum = np.empty(0, np.float64)
        self.pos_label = np.empty(0, np.int64)
        self.pos_loss = np.empty(0, np.float64)
        self.empty = np.empty(0, self.dtype)

    def prepare(self, outer, n, inner, parallel):
        """Choose the kernels and size the buffers for this shape."""
        key = (outer, n, inner, parallel)
        if key == self.key:
            return
        npos = outer * inner
        if self.pos_max.size < npos:
            self.pos_max = np.empty(npos, self.dtype)
            self.pos_sum = np.empty(npos, np.float64)
            self.pos_label = np.empty(npos, np.int64)
            self.pos_loss = np.empty(npos, np.float64)
        if inner == 1:
            self.width = BLOCK
            self.nchunks = num_chunks(parallel, outer)
            self._fwd = build(_loss_fwd_rows, parallel)
            self._bwd = build(_loss_bwd_rows, parallel)
        else:
            self.width = tile_width(n, inner)
            tiles = outer * ((inner + self.width - 1) // self.width)
            self.nchunks = num_chunks(parallel, tiles)
            self._fwd = build(_loss_fwd_strided, parallel)
            self._bwd = build(_loss_bwd_strided, parallel)
        self.buf = np.empty((self.nchunks, self.width), self.dtype)
        self.outer, self.n, self.inner = outer, n, inner
        self.key = key

    def forward(self, x, label, has_ignore, ignore_label, prob,
                normalise=True):
        """Fused forward.  Returns ``(loss_sum, valid_count, first_bad)``.

        Parameters
        ----------
        x : ndarray, shape (outer * n * inner,)
            The scores, flat.
        label : ndarray, shape (outer * inner,)
            Labels stored as floats.
        has_ignore, ignore_label : bool, int
            ``loss_param.ignore_label`` and whether it is set.
        prob : ndarray or None
            When given (shape of ``x``), the probabilities are written to it.
        normalise : bool
            Rows only: with False, ``prob`` receives ``exp(x - m)`` without
            the division by ``s`` (the backward applies it), saving a pass
            when nobody else reads ``prob``.

        Returns
        -------
        loss_sum : float
            Sum over valid positions of ``-log(max(prob, FLT_MIN))``
            (float64 accumulation); NaN when a valid position's scores are
            not finite.
        valid_count : int
        first_bad : int
            Flat index of the first label that is neither a class in ``[0,
            n)`` nor ``ignore_label`` (-1 when all are fine); its code is
            ``pos_label[first_bad]``.
        """
        write_prob = prob is not None
        if not write_prob:
            prob = self.empty
        if self.inner == 1:
            return self._fwd(
                x, label, self.outer, self.n, has_ignore, ignore_label,
                self.pos_max, self.pos_sum, self.pos_label, self.pos_loss, prob,
                write_prob, normalise, self.buf,
            )
        return self._fwd(
            x, label, self.outer, self.n, self.inner, has_ignore, ignore_label,
            self.pos_max, self.pos_sum, self.pos_label, self.pos_loss, prob,
            write_prob, self.width, self.nchunks,
        )

    def backward(self, x, scale, dx, prob=None, normalised=True):
        """``dx = scale * (prob - onehot)``, 0 at ignored positions (``scale``
        = ``loss_weight / normalizer``, a scalar of ``x``'s dtype).

        ``prob``: what the last :meth:`forward` wrote there (``normalised``
        as it was told), read instead of recomputed when given (rows only;
        the strided kernel always recomputes from the statistics).
        """
        if self.inner == 1:
            from_prob = prob is not None
            self._bwd(x, self.outer, self.n, self.pos_max, self.pos_sum,
                      self.pos_label, scale, dx,
                      prob if from_prob else self.empty, from_prob, normalised,
                      self.nchunks)
        else:
            self._bwd(x, self.outer, self.n, self.inner, self.pos_max,
                      self.pos_sum, self.pos_label, scale, dx, self.buf)


# --------------------------------------------------------------- adapter
class SoftmaxWithLossNumba(EngineAdapter):
    """SoftmaxWithLoss on the Numba engine.

    Owns the :class:`Workspace` (statistics, label codes, scratch), the
    choice of strategy, what ``layer.prob`` holds after the last forward
    (:attr:`prob_state`) and the scratch rows of the probability top's
    softmax backward.
    """

    def __init__(self, layer):
        super().__init__(layer)
        self.workspace = Workspace(layer.dtype)
        #: What ``layer.prob`` holds: ``"prob"``, ``"exp"`` (``exp(x - m)``
        #: not yet divided by ``s``; internal only) or None (stale).
        self.prob_state = None
        self.softmax_buffers = None

    def forward(self, bottom, top):
        layer, ws, x = self.layer, self.workspace, bottom[0]
        self.parallel = parallel_for(x.count)
        ws.prepare(layer.outer, layer.channels, layer.inner, self.parallel)
        # Keeping prob costs a write and a read of it but saves the backward
        # an exponential per element: worth it while prob stays in cache.
        write_prob = len(top) > 1 or (
            layer.inner == 1 and x.count * x.dtype.itemsize <= KEEP_PROB_BYTES
        )
        normalise = len(top) > 1 or layer.inner > 1
        self.prob_state = None
        has_ignore = layer.ignore_label is not None
        loss, valid, first_bad = ws.forward(
            x.flat_data, bottom[1].flat_data, has_ignore,
            layer.ignore_label if has_ignore else 0,
            layer.prob.flat_data if write_prob else None, normalise,
        )
        if first_bad >= 0:
            raise layer.label_error(bottom[1], first_bad)
        if write_prob:
            self.prob_state = "prob" if normalise else "exp"
        layer.valid_count = valid
        dtype = layer.dtype.type
        value = dtype(loss) / dtype(layer.normalizer(valid))
        top[0].flat_data[0] = value
        layer.check_finite(float(value), x, ws.pos_label)

    def backward(self, top, propagate_down, bottom):
        layer, x = self.layer, bottom[0]
        layer.check_no_label_backward(propagate_down)
        if not propagate_down[0]:
            return
        scale = top[0].flat_diff[0] / layer.dtype.type(
            layer.normalizer(layer.valid_count)
        )
        prob = layer.prob.flat_data if self.prob_state else None
        self.workspace.backward(x.flat_data, scale, x.flat_diff, prob,
                                self.prob_state == "prob")
        if len(top) > 1:
            self.softmax_buffers = softmax_bwd(
                layer.prob.flat_data, top[1].flat_diff, x.flat_diff, layer.outer,
                layer.channels, layer.inner, True, self.parallel,
                self.softmax_buffers,
            )
