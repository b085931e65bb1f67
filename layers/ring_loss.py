"""RingLoss: pull every feature norm towards a learned radius R.

See docs/layers/ring_loss.md.
"""

import math
import warnings

import numpy as np

from netlite import backend
from netlite.errors import LayerSetupError, NetliteWarning, NonFiniteError, ShapeError
from netlite.layer import TRAIN, Layer
from netlite.proto import netlite_pb2
from netlite.registry import register_layer

SQUARED = netlite_pb2.RingLossParameter.SQUARED
CHARBONNIER = netlite_pb2.RingLossParameter.CHARBONNIER


@register_layer("RingLoss")
class RingLossLayer(Layer):
    r"""Ring loss (Zheng, Pal, Savvides, CVPR 2018) with a learned radius.

    Type ``"RingLoss"``.  ``bottom[0]`` holds M samples; sample i's feature
    :math:`x_i` is everything after axis 0 (an ``N x D`` blob, or
    ``N x C x H x W`` flattened per sample), :math:`n_i = \|x_i\|_2`.

    SQUARED (the paper): :math:`\ell_i = \tfrac12 (n_i - R)^2`;
    CHARBONNIER (the seed study): :math:`\ell_i =
    \sqrt{(n_i + \epsilon - R)^2 + \epsilon}`.  ``top[0]`` is
    :math:`L = \frac1M \sum_i \ell_i` (a scalar), or with
    ``loss_param { per_position: true }`` the vector :math:`(\ell_i)`,
    shape ``(M,)``, neither summed nor normalised.  The weight
    :math:`\lambda` is the layer's ``loss_weight`` (default 1).

    Parameters (``ring_loss_param``)
        ``type`` (SQUARED), ``radius`` (initial R, 1; finite, >= 0),
        ``radius_from_first_batch`` (false: when true, the first TRAIN
        forward sets R to the batch's mean feature norm), ``eps`` (1e-6,
        finite, >= 0; the Charbonnier constant).

    One parameter blob: R, shape ``(1,)``; its diff accumulates.  The
    direction of a feature is :math:`x_i / \max(n_i, \tau)` with
    :math:`\tau` the dtype's smallest normal number, so a zero feature has
    a finite loss and a zero gradient.  :meth:`state_dict` keeps whether R
    was already set from a batch, so a resumed run does not set it again.
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1
    auto_top_blobs = True

    def __init__(self, layer_param=None, **kwargs):
        super().__init__(layer_param, **kwargs)
        self._default_loss_weights = not self.layer_param.loss_weight
        self.from_first_batch = bool(
            self.layer_param.ring_loss_param.radius_from_first_batch)
        self.radius_initialised = False
        self._warned_negative = False

    def layer_setup(self, bottom, top):
        if self._default_loss_weights:  # a loss layer: weight 1 by default
            del self.layer_param.loss_weight[:]
            self.layer_param.loss_weight.append(1.0)
        p = self.layer_param.ring_loss_param
        self.ring_type = p.type
        self.eps = float(p.eps)
        self.per_position = bool(self.layer_param.loss_param.per_position)
        for field, value in (("radius", float(p.radius)), ("eps", self.eps)):
            if not (math.isfinite(value) and value >= 0):
                raise LayerSetupError(
                    f"{self.describe()}: ring_loss_param.{field} must be finite "
                    f"and >= 0; got {value}"
                )
        if self.blobs:
            self.check_param_blobs([(1,)], ["radius"])
        else:
            self.blobs = [self.make_blob((1,))]
            self.blobs[0].data[...] = p.radius

    def reshape(self, bottom, top):
        if bottom[0].num_axes == 0:
            raise ShapeError(
                f"{self.describe()}: bottom[0] must have a sample axis (shape "
                f"(M, D) or (M, ...)); got a scalar"
            )
        self.num = bottom[0].shape[0]
        self.dim = bottom[0].count_range(1)
        top[0].reshape((self.num,) if self.per_position else ())

    # ------------------------------------------------------------ snapshots
    def state_dict(self):
        """``{"radius_initialised": bool}`` with ``radius_from_first_batch``
        (the radius itself is the parameter blob); ``{}`` otherwise."""
        if not self.from_first_batch:
            return {}
        return {"radius_initialised": bool(self.radius_initialised)}

    def load_state_dict(self, state):
        """Restore what :meth:`state_dict` saved."""
        value = state.get("radius_initialised") if isinstance(state, dict) else None
        if not isinstance(value, (bool, np.bool_)):
            raise LayerSetupError(
                f"{self.describe()}: bad saved state {state!r}: expected "
                "{'radius_initialised': bool}"
            )
        self.radius_initialised = bool(value)

    # ------------------------------------------------------------ reference
    def forward_cpu(self, bottom, top):
        xp, dt = self.xp, self.dtype.type
        x = bottom[0].data.reshape(self.num, self.dim)
        norm = xp.sqrt((x * x).sum(axis=1))  # n_i
        radius = self.blobs[0].data
        if (self.from_first_batch and not self.radius_initialised
                and self.phase == TRAIN and self.num > 0):
            radius[...] = norm.mean()
            self.radius_initialised = True
        self._check_radius(float(radius[0]))
        if self.ring_type == CHARBONNIER:
            diff = norm + dt(self.eps) - radius  # d_i
            loss = xp.sqrt(diff * diff + dt(self.eps))
        else:
            diff = norm - radius
            loss = dt(0.5) * diff * diff
        self.norm, self.gap, self.sample_loss = norm, diff, loss
        if self.per_position:
            top[0].data[...] = loss
        else:
            top[0].data[...] = loss.sum() / dt(max(self.num, 1))
        if not bool(xp.isfinite(top[0].data).all()):
            raise NonFiniteError(self._non_finite_message(bottom[0]))

    def backward_cpu(self, top, propagate_down, bottom):
        xp, dt = self.xp, self.dtype.type
        tiny = dt(np.finfo(self.dtype).tiny)
        if self.ring_type == CHARBONNIER:
            slope = self.gap / xp.maximum(self.sample_loss, tiny)  # d l_i / d n_i
        else:
            slope = self.gap
        if self.per_position:
            coef = top[0].diff * slope
        else:
            coef = top[0].diff.reshape(()) / dt(max(self.num, 1)) * slope
        if self.propagates_param(0):
            self.blobs[0].diff -= coef.sum()
        if propagate_down[0]:
            x = bottom[0].data.reshape(self.num, self.dim)
            direction = x / xp.maximum(self.norm, tiny)[:, None]
            bottom[0].diff.reshape(self.num, self.dim)[...] = coef[:, None] * direction

    def forward_numba(self, bottom, top):
        self.adapter("numba").forward(bottom, top)

    def backward_numba(self, top, propagate_down, bottom):
        self.adapter("numba").backward(top, propagate_down, bottom)

    def forward_gpu(self, bottom, top):
        self.adapter("cupy").forward(bottom, top)

    def backward_gpu(self, top, propagate_down, bottom):
        self.adapter("cupy").backward(top, propagate_down, bottom)

    # --------------------------------------------------------------- checks
    def _check_radius(self, radius):
        if radius < 0 and not self._warned_negative:
            self._warned_negative = True
            warnings.warn(
                f"{self.describe()}: the radius R = {radius:g} is negative (the "
                "solver moved it below 0). A norm cannot be negative, so the "
                "loss now pulls every feature towards 0; lower the radius's "
                "learning rate (param { lr_mult }) or fix it with lr_mult: 0.",
                NetliteWarning, stacklevel=4,
            )

    def _non_finite_message(self, blob):
        x = backend.to_numpy(blob.data).reshape(self.num, self.dim)
        head = f"{self.describe()}: the loss is not finite"
        bad = ~np.isfinite(x)
        if bad.any():
            flat = int(np.argmax(bad.ravel()))
            where = tuple(int(i) for i in np.unravel_index(flat, blob.shape))
            return (f"{head}: bottom[0] (the features, shape {blob.shape}) holds "
                    f"{x.ravel()[flat]} at index {where}")
        return (f"{head}: a squared feature norm overflows {self.dtype} "
                f"(largest |x| {float(np.abs(x).max()):g}), or R is not finite")
