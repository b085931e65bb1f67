"""FocalLoss: the softmax focal loss of happynear's caffe-windows, built on
SoftmaxWithLoss.

See docs/layers/focal_loss.md.
"""

import math

import numpy as np

from netlite.errors import LayerSetupError
from netlite.layers import _targets
from netlite.layers.softmax_loss import SoftmaxWithLossLayer
from netlite.proto import netlite_pb2
from netlite.registry import register_layer

ORIGIN = netlite_pb2.FocalLossParameter.ORIGIN
LINEAR = netlite_pb2.FocalLossParameter.LINEAR
ONEADDP = netlite_pb2.FocalLossParameter.ONEADDP


@register_layer("FocalLoss")
class FocalLossLayer(SoftmaxWithLossLayer):
    r"""Softmax focal loss (Lin et al., ICCV 2017) over ``axis``.

    Type string ``"FocalLoss"``.  Bottoms, tops, ``softmax_param``,
    ``loss_param`` (ignore_label, normalization, class_weight,
    weight_normalization, per_position) as SoftmaxWithLoss, whose
    machinery it reuses; it only replaces the per-position loss and its
    gradient.  With ``p = softmax(x)``, ``p_t`` the probability of the
    label and ``alpha_t = alpha * w_label``:

    .. math:: \ell = -\alpha_t\,(1 - p_t)^\gamma\,\log\max(p_t, \mathrm{FLT\_MIN})
              \quad\text{(ORIGIN)}, \qquad
              \ell = -\alpha_t\,(1 + p_t)^\gamma\,\log\max(p_t, \mathrm{FLT\_MIN})
              \quad\text{(ONEADDP)},

    summed over the non-ignored positions and divided by ``Z`` as in
    SoftmaxWithLoss.

    Parameters
    ----------
    focal_loss_param.type : {ORIGIN, ONEADDP}, default ORIGIN
        LINEAR is rejected (a sigmoid loss, see the page).
    focal_loss_param.gamma : float, default 2
        ``gamma >= 0``; 0 gives the (alpha-weighted) cross-entropy.
    focal_loss_param.alpha : float, default 1
        The global ``alpha > 0``, a factor of the loss.
    focal_loss_param.beta : float
        Unused (happynear's LINEAR only).
    loss_param.class_weight : list of float, optional
        Per-class ``alpha``: ``alpha_t = alpha * class_weight[label]``.

    Raises
    ------
    LayerSetupError
        For LINEAR, a negative or NaN ``gamma``, a non-positive or
        non-finite ``alpha``, ``label_smoothing`` or ``temperature`` set.
    ShapeError, LabelError, NonFiniteError
        As SoftmaxWithLoss (no target probabilities: labels only).
    """

    accepts_soft_targets = False
    plain_cross_entropy = False

    def layer_setup(self, bottom, top):
        super().layer_setup(bottom, top)
        param = self.layer_param.focal_loss_param
        where = f"{self.describe()}: focal_loss_param"
        if param.type == LINEAR:
            raise LayerSetupError(
                f"{where}.type LINEAR is not supported: happynear's proto "
                "describes it as FL* = -log(sigmoid(gamma * x_t + beta)) / gamma, "
                "a sigmoid (binary) loss with no softmax form, and its code "
                "computes ORIGIN for it; use type: ORIGIN")
        self.sign = -1.0 if param.type == ORIGIN else 1.0  # 1 - p or 1 + p
        self.gamma, self.alpha = float(param.gamma), float(param.alpha)
        if not (math.isfinite(self.gamma) and self.gamma >= 0):
            raise LayerSetupError(
                f"{where}.gamma is {self.gamma}; it must be finite and >= 0")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise LayerSetupError(
                f"{where}.alpha is {self.alpha}; it must be finite and > 0")
        if self.ext.smoothing or self.ext.temperature != 1:
            raise LayerSetupError(
                f"{self.describe()}: loss_param.label_smoothing and "
                "loss_param.temperature are SoftmaxWithLoss options; FocalLoss "
                "takes hard labels at temperature 1")

    def position_losses(self, bottom, prob):
        """``(loss, w_label, codes)`` per position; writes ``p`` into
        ``prob`` and keeps ``alpha_t``, ``log p_t`` and the codes for
        :meth:`position_gradients`."""
        xp, dtype = self.xp, self.dtype.type
        log_p = _targets.log_softmax(xp, bottom[0].data.reshape(prob.shape))
        prob[...] = xp.exp(log_p)
        codes = self.label_codes(bottom[1])
        valid = codes >= 0
        label = xp.maximum(codes, 0)
        w_t = xp.where(valid, _targets.class_weights(self, self.channels)[label], 0)
        log_pt = xp.take_along_axis(log_p, label[:, None, :], axis=1)[:, 0]
        self.focal_state = (dtype(self.alpha) * w_t, log_pt, codes)
        v = self.modulated(log_pt)  # 1 - p_t (ORIGIN) or 1 + p_t (ONEADDP)
        log_pt = xp.maximum(log_pt, dtype(_targets.LOG_FLT_MIN))
        loss = -dtype(self.alpha) * w_t * v ** dtype(self.gamma) * log_pt
        # where(), not a product: an ignored position's scores may be NaN.
        return xp.where(valid, loss, 0), w_t, codes

    def modulated(self, log_pt):
        """``v = 1 + sign * p_t``; for ORIGIN ``-expm1(log p_t)``, exact as
        ``p_t -> 1``."""
        if self.sign < 0:
            return -self.xp.expm1(log_pt)
        return 1 + self.xp.exp(log_pt)

    def position_gradients(self, prob):
        r"""``alpha_t f (p - onehot)`` per position, ``f = v^gamma (1 + sign
        * gamma * p_t log p_t / v)``; ``p_t log p_t / v`` is -1 at ``v = 0``
        (ORIGIN, ``p_t = 1``)."""
        xp, dtype = self.xp, self.dtype.type
        alpha_t, log_pt, codes = self.focal_state
        valid = codes >= 0
        v = self.modulated(log_pt)
        p_t = xp.exp(log_pt)
        with np.errstate(invalid="ignore"):  # 0 * -inf, NaN: masked below
            plogp = xp.where(p_t > 0, p_t * log_pt, 0)  # 0 at log p_t = -inf
            ratio = xp.where(v > 0, plogp / xp.where(v > 0, v, 1), -1)
        gamma = dtype(self.gamma)
        f = alpha_t * v ** gamma * (1 + dtype(self.sign) * gamma * ratio)
        onehot = (xp.arange(self.channels).reshape(1, -1, 1)
                  == codes[:, None, :])
        # p - onehot, with p_t - 1 = expm1(log p_t): exact as p_t -> 1.
        d = xp.where(onehot, xp.expm1(log_pt)[:, None, :], prob)
        return xp.where(valid[:, None, :], f[:, None, :] * d, 0)
