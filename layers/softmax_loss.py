"""SoftmaxWithLoss: softmax followed by the multinomial logistic loss.

See docs/layers/softmax_loss.md.
"""

import math

import numpy as np

from netlite import backend
from netlite.errors import LabelError, NonFiniteError, ShapeError
from netlite.layer import LossLayer
from netlite.layers.softmax import PARALLEL_MIN_ELEMENTS, softmax_dims
from netlite.proto import netlite_pb2
from netlite.registry import create_layer, register_layer

#: Caffe clamps probabilities at FLT_MIN before the log, in every dtype.
FLT_MIN = float(np.finfo(np.float32).tiny)  # 1.1754943508222875e-38

FULL = netlite_pb2.LossParameter.FULL
VALID = netlite_pb2.LossParameter.VALID
BATCH_SIZE = netlite_pb2.LossParameter.BATCH_SIZE
NONE = netlite_pb2.LossParameter.NONE

#: The Numba engine keeps the probabilities (instead of recomputing them
#: in backward) when they take at most this many bytes: about what stays
#: in a last-level cache.
KEEP_PROB_BYTES = 1 << 24

#: Label codes shared by the three engines (``>= 0`` is the class).
IGNORED, NOT_INTEGER, OUT_OF_RANGE = -1, -2, -3


@register_layer("SoftmaxWithLoss")
class SoftmaxWithLossLayer(LossLayer):
    r"""Softmax over ``axis`` and the cross-entropy with integer labels.

    Type string ``"SoftmaxWithLoss"``.

    Bottoms: ``bottom[0]`` the scores ``x``, any shape, viewed as
    ``(outer, C, inner)`` around ``axis``; ``bottom[1]`` the labels, any
    shape with ``outer * inner`` elements, class indices stored as floats.
    Tops: ``top[0]`` the scalar loss; optional ``top[1]`` the
    probabilities, shaped like ``x`` and sharing the data of the internal
    softmax output.

    .. math:: L = -\frac{1}{Z} \sum_{(i, k)\ \mathrm{valid}}
              \log \max\left(\mathrm{softmax}(x)_{i, l_{ik}, k},
              \ \mathrm{FLT\_MIN}\right)

    Parameters
    ----------
    softmax_param.axis : int, default 1
        The class axis (negative counts from the end).
    loss_param.ignore_label : int, optional
        Positions with this label add nothing to the loss or gradient.
    loss_param.normalization : {FULL, VALID, BATCH_SIZE, NONE}, default VALID
        ``Z`` = ``outer * inner``, the number of non-ignored positions,
        ``outer``, or 1; always at least 1.
    loss_param.normalize : bool, optional
        Legacy: true means VALID and false BATCH_SIZE, used only when
        ``normalization`` is not set.
    loss_weight : float, default 1 for top[0] and 0 for top[1]

    Raises
    ------
    ShapeError
        When the label count differs from ``outer * inner``.
    LabelError
        For a label that is not an integer, or that lies outside
        ``[0, C)`` and is not ``ignore_label``.
    NonFiniteError
        When the loss is not finite: some non-ignored position has a NaN or
        +inf score, or only -inf scores.  (A single -inf score is fine:
        its probability is 0.)

    Notes
    -----
    The Softmax is an internal layer built through the registry from a copy
    of this layer's parameters with type "Softmax" and no loss weights
    (Caffe bug #2968 otherwise makes the two-top form unbuildable).  When
    there is a second top, its diff is back-propagated through the softmax
    and added to ``bottom[0].diff`` (Caffe ignores it).
    """

    exact_num_top_blobs = -1
    min_top_blobs = 1
    max_top_blobs = 2

    def layer_setup(self, bottom, top):
        super().layer_setup(bottom, top)
        # Validate the axis here so that the error names this layer.
        softmax_dims(self, bottom[0], self.layer_param.softmax_param.axis)
        param = netlite_pb2.LayerParameter()
        param.CopyFrom(self.layer_param)
        param.type = "Softmax"
        del param.loss_weight[:]
        self.softmax_layer = create_layer(param, dtype=self.dtype, device=self.device)
        self.prob = self.make_blob()
        self.softmax_bottom = [bottom[0]]
        self.softmax_top = [self.prob]
        self.softmax_layer.setup(self.softmax_bottom, self.softmax_top)

        loss_param = self.layer_param.loss_param
        self.has_ignore_label = loss_param.HasField("ignore_label")
        self.ignore_label = int(loss_param.ignore_label)
        if (not loss_param.HasField("normalization")
                and loss_param.HasField("normalize")):
            self.normalization = VALID if loss_param.normalize else BATCH_SIZE
        else:
            self.normalization = loss_param.normalization
        self.valid_count = 0
        self._state = None  # which engine's forward the backward can use
        self._code = None  # label codes of the last reference/GPU forward
        self._workspace = None  # Numba per-position statistics
        self._numba_prob = None
        self._reshape_key = None

    def reshape(self, bottom, top):
        # Fast path: Caffe reshapes before every forward, but nothing has to
        # change when the blobs and their shapes are those of the last call.
        key = (bottom[0], bottom[0].shape, bottom[1], bottom[1].shape, top[0],
               top[1] if len(top) > 1 else None)
        if key == self._reshape_key and (
                len(top) < 2 or top[1].shares_data_with(self.prob)):
            return
        self._reshape_key = None
        super().reshape(bottom, top)
        self.axis, self.outer, self.channels, self.inner = softmax_dims(
            self, bottom[0], self.layer_param.softmax_param.axis
        )
        if self.channels == 0:
            raise ShapeError(
                f"{self.describe()}: the scores {bottom[0].shape} have no "
                f"classes along softmax axis {self.axis}"
            )
        if bottom[1].count != self.outer * self.inner:
            raise ShapeError(
                f"{self.describe()}: the label blob must have outer * inner = "
                f"{self.outer} * {self.inner} = {self.outer * self.inner} "
                f"elements (one label per position of the scores, softmax "
                f"axis {self.axis}); scores {bottom[0].shape}, labels "
                f"{bottom[1].shape}"
            )
        self.softmax_bottom[0] = bottom[0]
        self.softmax_layer.reshape(self.softmax_bottom, self.softmax_top)
        if len(top) > 1:
            top[1].reshape_like(bottom[0])
            top[1].share_data(self.prob)
        self._reshape_key = key

    def normalizer(self, valid_count):
        """Caffe's ``get_normalizer``: the divisor ``Z``, at least 1."""
        if self.normalization == FULL:
            z = self.outer * self.inner
        elif self.normalization == VALID:
            z = valid_count
        elif self.normalization == BATCH_SIZE:
            z = self.outer
        else:  # NONE
            z = 1
        return float(max(1, z))

    # --------------------------------------------------------- reference
    def label_codes(self, label):
        """Check the labels; return their codes, shape ``(outer, inner)``.

        A code is the class index, or :data:`IGNORED`.  Raises
        :class:`LabelError` for the first bad label.
        """
        xp = self.xp
        lab = label.data.reshape(self.outer, self.inner)
        not_integer = lab != xp.floor(lab)  # NaN included
        lab64 = lab.astype(xp.float64)  # exact for float32 and int32 values
        if self.has_ignore_label:
            ignored = lab64 == float(self.ignore_label)
        else:
            ignored = xp.zeros(lab.shape, dtype=bool)
        out_of_range = ~ignored & ((lab64 < 0) | (lab64 >= self.channels))
        bad = not_integer | out_of_range
        if bool(bad.any()):
            index = int(xp.argmax(bad.ravel()))
            raise self._label_error(label, index)
        return xp.where(ignored, IGNORED, lab64).astype(xp.int64)

    def _label_error(self, label, index):
        value = float(backend.to_numpy(label.flat_data[index : index + 1])[0])
        where = tuple(int(i) for i in np.unravel_index(index, label.shape))
        ignore = (f", and it is not ignore_label ({self.ignore_label})"
                  if self.has_ignore_label else " (no ignore_label is set)")
        if math.isnan(value) or (math.isfinite(value)
                                 and value != math.floor(value)):
            problem = "is not an integer"
        else:
            problem = f"is outside [0, {self.channels}){ignore}"
        return LabelError(
            f"{self.describe()}: label {value!r} at index {where} of the label "
            f"blob {label.shape} {problem}; labels are class indices along "
            f"softmax axis {self.axis} (C = {self.channels})"
        )

    def forward_cpu(self, bottom, top):
        xp = self.xp
        self._state = None
        self.softmax_layer.forward_cpu(self.softmax_bottom, self.softmax_top)
        code = self.label_codes(bottom[1])
        valid = code >= 0
        prob = self.prob.data.reshape(self.outer, self.channels, self.inner)
        picked = xp.take_along_axis(
            prob, xp.maximum(code, 0)[:, None, :], axis=1
        )[:, 0, :]
        log_p = xp.log(xp.maximum(picked, self.dtype.type(FLT_MIN)))
        loss = -xp.where(valid, log_p, 0).sum()
        self.valid_count = int(xp.count_nonzero(valid))
        top[0].data[...] = loss / self.normalizer(self.valid_count)
        self._code, self._state = code, "reference"
        self._check_finite(top[0], bottom[0])

    def backward_cpu(self, top, propagate_down, bottom):
        self.check_no_label_backward(propagate_down)
        if not propagate_down[0]:
            return
        self._ensure_reference_state(bottom)
        xp = self.xp
        shape3 = (self.outer, self.channels, self.inner)
        prob = self.prob.data.reshape(shape3)
        dx = bottom[0].diff.reshape(shape3)
        code = self._code
        valid = code >= 0
        dx[...] = prob
        i, k = xp.nonzero(valid)
        dx[i, code[i, k], k] -= 1
        # where(), not a multiplication: ignored scores may be NaN.
        dx[...] = xp.where(valid[:, None, :], dx, 0)
        dx *= top[0].diff.reshape(()) / self.dtype.type(
            self.normalizer(self.valid_count)
        )
        if len(top) > 1:
            dy = top[1].diff.reshape(shape3)
            dx += (dy - (dy * prob).sum(axis=1, keepdims=True)) * prob

    def _ensure_reference_state(self, bottom):
        # The reference backward needs prob and the label codes; a Numba
        # forward may have left neither (it keeps per-position statistics).
        if self._state == "reference":
            return
        if self._state == "numba":
            ws = self._workspace
            self._code = ws.pos_label[: self.outer * self.inner].reshape(
                self.outer, self.inner
            ).copy()
            if self._numba_prob != "prob":
                self.softmax_layer.forward_cpu(self.softmax_bottom, self.softmax_top)
            self._state = "reference"
            return
        raise RuntimeError(f"{self.describe()}: backward called before forward")

    def _check_finite(self, loss_blob, scores):
        # Cheap detection: one scalar.  Only on failure is the input scanned.
        loss = float(loss_blob.data)
        if math.isfinite(loss):
            return
        raise NonFiniteError(self._non_finite_message(loss, scores))

    def _non_finite_message(self, loss, scores):
        x = backend.to_numpy(scores.data).reshape(
            self.outer, self.channels, self.inner
        )
        if self._state == "numba":
            code = self._workspace.pos_label[: self.outer * self.inner]
        else:
            code = backend.to_numpy(self._code)
        valid = code.reshape(self.outer, self.inner)[:, None, :] >= 0
        head = f"{self.describe()}: the loss is {loss}"
        offending = (np.isnan(x) | (x == np.inf)) & valid
        if offending.any():
            flat = int(np.argmax(offending.ravel()))
            where = tuple(int(i) for i in np.unravel_index(flat, scores.shape))
            return (
                f"{head}: bottom[0] (the scores, shape {scores.shape}) holds "
                f"{x.ravel()[flat]} at index {where}, the first NaN or +inf "
                "score at a non-ignored position; the softmax of such a "
                "column is undefined"
            )
        all_neg_inf = (x == -np.inf).all(axis=1) & valid[:, 0, :]
        if all_neg_inf.any():
            i, k = (int(v) for v in np.unravel_index(
                int(np.argmax(all_neg_inf.ravel())), all_neg_inf.shape))
            return (
                f"{head}: every score of position (outer {i}, inner {k}) of "
                f"bottom[0] (the scores, shape {scores.shape}) along axis "
                f"{self.axis} is -inf, so its softmax is undefined"
            )
        return (f"{head}, although bottom[0] (the scores) holds no NaN or +inf "
                "at a non-ignored position")

    # ------------------------------------------------------------- numba
    def forward_numba(self, bottom, top):
        ws = self._workspace
        if ws is None:
            from netlite.layers import softmax_loss_numba

            ws = self._workspace = softmax_loss_numba.Workspace(self.dtype)
        ws.prepare(self.outer, self.channels, self.inner,
                   bottom[0].count >= PARALLEL_MIN_ELEMENTS)
        # Keeping prob costs a write and a read of it but saves the backward
        # an exponential per element: worth it while prob stays in cache.
        write_prob = len(top) > 1 or (
            self.inner == 1
            and bottom[0].count * self.dtype.itemsize <= KEEP_PROB_BYTES
        )
        normalise = len(top) > 1 or self.inner > 1
        self._state = None
        loss, valid, first_bad = ws.forward(
            bottom[0].flat_data, bottom[1].flat_data, self.has_ignore_label,
            self.ignore_label, self.prob.flat_data if write_prob else None,
            normalise,
        )
        if first_bad >= 0:
            raise self._label_error(bottom[1], first_bad)
        self._state = "numba"
        # What self.prob holds: "prob", "exp" (exp(x - m), not divided by s;
        # internal only) or None (stale).
        self._numba_prob = ("prob" if normalise else "exp") if write_prob else None
        self.valid_count = valid
        dtype = self.dtype.type
        value = dtype(loss) / dtype(self.normalizer(valid))
        top[0].flat_data[0] = value
        if not math.isfinite(value):
            raise NonFiniteError(self._non_finite_message(value, bottom[0]))

    def backward_numba(self, top, propagate_down, bottom):
        self.check_no_label_backward(propagate_down)
        if not propagate_down[0]:
            return
        if self._state != "numba":
            self.backward_cpu(top, propagate_down, bottom)
            return
        ws = self._workspace
        scale = top[0].flat_diff[0] / self.dtype.type(
            self.normalizer(self.valid_count)
        )
        ws.prepare(self.outer, self.channels, self.inner,
                   bottom[0].count >= PARALLEL_MIN_ELEMENTS)
        ws.backward(bottom[0].flat_data, scale, bottom[0].flat_diff,
                    self.prob.flat_data if self._numba_prob else None,
                    self._numba_prob == "prob")
        if len(top) > 1:
            from netlite.layers import softmax_numba

            self.softmax_layer._buffers = softmax_numba.softmax_bwd(
                self.prob.flat_data, top[1].flat_diff, bottom[0].flat_diff,
                self.outer, self.channels, self.inner, True,
                bottom[0].count >= PARALLEL_MIN_ELEMENTS,
                self.softmax_layer._buffers,
            )

    # -------------------------------------------------------------- cupy
    def forward_gpu(self, bottom, top):
        from netlite.layers import softmax_loss_cupy as kernels

        loss, valid, first_bad, code = kernels.softmax_loss_fwd(
            bottom[0].flat_data, bottom[1].flat_data, self.outer,
            self.channels, self.inner, self.has_ignore_label, self.ignore_label,
            self.prob.flat_data,
        )
        self._state = None
        if first_bad >= 0:
            raise self._label_error(bottom[1], first_bad)
        self.valid_count = valid
        self._code = code.reshape(self.outer, self.inner)
        self._state = "gpu"
        top[0].data[...] = self.dtype.type(loss) / self.dtype.type(
            self.normalizer(valid)
        )
        self._check_finite(top[0], bottom[0])

    def backward_gpu(self, top, propagate_down, bottom):
        self.check_no_label_backward(propagate_down)
        if not propagate_down[0]:
            return
        if self._state != "gpu":
            raise RuntimeError(f"{self.describe()}: backward called before forward")
        from netlite.layers import softmax_cupy, softmax_loss_cupy

        scale = top[0].diff.reshape(1) / self.dtype.type(
            self.normalizer(self.valid_count)
        )
        softmax_loss_cupy.softmax_loss_bwd(
            self.prob.flat_data, self._code, self.outer, self.channels,
            self.inner, scale, bottom[0].flat_diff,
        )
        if len(top) > 1:
            softmax_cupy.softmax_bwd(
                self.prob.flat_data, top[1].flat_diff, bottom[0].flat_diff,
                self.outer, self.channels, self.inner, True,
            )
