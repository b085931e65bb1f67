r"""FusedMultiplicativeHead: L-Softmax or SphereFace and their softmax loss
run as one computation.

See docs/layers/fused_multiplicative_head.md.
"""

import logging

from netlite import fusion
from netlite.layers._labels import label_codes
from netlite.layers._multiplicative_margin import EPS, margin_target, schedule_lambda
from netlite.layers.fused_margin_head import (
    FusedMarginHeadLayer,
    logit_data,
    logit_diff,
    loss_and_readers_problem,
)
from netlite.layers.large_margin_inner_product import LargeMarginInnerProductLayer
from netlite.layers.margin_inner_product import EXACT, MarginInnerProductLayer
from netlite.layers.softmax_loss import SoftmaxWithLossLayer
from netlite.registry import register_layer

__all__ = ["FusedMultiplicativeHeadLayer", "find_multiplicative_heads"]

logger = logging.getLogger("netlite")

FC_LAYERS = (LargeMarginInnerProductLayer, MarginInnerProductLayer)


@register_layer("FusedMultiplicativeHead")
class FusedMultiplicativeHeadLayer(FusedMarginHeadLayer):
    r"""``LargeMarginInnerProduct`` (L-Softmax) or ``MarginInnerProduct``
    (SphereFace, ``grad_mode: EXACT``) followed by ``SoftmaxWithLoss``, as
    one computation on the fast engines.

    Type ``"FusedMultiplicativeHead"``, made by :class:`netlite.Net`
    (:func:`find_multiplicative_heads`), never written in a prototxt.  The
    computation is :class:`FusedMarginHeadLayer`'s with ``s = 1``, no
    margin layer, and the margin inside the inner product: with
    ``z = x W^T`` (L-Softmax) or ``z = x W^T / max(|w|, eps)`` (SphereFace),
    the target logit of each labelled row becomes

    .. math:: z_{n y_n} \leftarrow \frac{\lambda z_{n y_n} + L_n \psi_m(c_n)}
              {1 + \lambda}, \qquad c_n = z_{n y_n} / D_n

    (``margin_target``; ``L_n = |x_n| |w_y|`` and ``D_n`` the clamped
    product for L-Softmax, ``|x_n|`` and its clamp for SphereFace), and the
    backward adds the layers' two terms: ``G``'s target entry ``dE/dz_t
    (lambda + psi') / (1 + lambda)`` and, with ``q_n = dE/dz_t (psi - c psi')
    / (1 + lambda)``, ``dx_n += q_n |w_y| x_n / |x_n|`` and ``dW_y += q_n
    |x_n| w_y / |w_y|`` (L-Softmax; SphereFace: ``dx_n += q_n x_n / |x_n|``
    and the weight gradient projected as for a normalised InnerProduct).
    """

    role_classes = {"fc": FC_LAYERS, "loss": SoftmaxWithLossLayer}

    def margin_columns(self, xp, c):
        """The inner product's labelled rows and their classes (none for
        ``m = 1``); bad labels raise its LabelError."""
        fc, fb, ft = self.links["fc"]
        fc.lam = schedule_lambda(fc.params, fc.iteration)
        if len(ft) > 1:  # the lambda top
            ft[1].data[...] = fc.lam
        label = label_codes(fc, fb[1], fc.N, fc.ignore_label, fc.axis)
        if fc.m == 1:
            return xp.zeros(0, xp.int64), xp.zeros(0, xp.int64)
        rows = xp.nonzero(label >= 0)[0]
        return rows, label[rows].astype(xp.int64)

    def weight_mode(self):
        """L-Softmax: the raw weights; SphereFace: ``nu = max(|w|, eps)``
        folded into the cosines, the gradient projected (none below eps)."""
        if isinstance(self.layer("fc"), MarginInnerProductLayer):
            return "fold", 0.0, EPS
        return "raw", 0.0, 0.0

    def target_values(self, state):
        """The margined target logits (float64) and ``(lambda + psi') / (1 +
        lambda)``; keeps ``(psi - c psi') / (1 + lambda)`` and the norms for
        :meth:`extra_terms`."""
        xp = self.xp
        fc, fb, _ = self.links["fc"]
        lam = fc.lam
        rows, cols = state.mrows, state.mcols
        x = fb[0].data.reshape(fc.M, fc.K)[rows]
        state.x_norm = xp.sqrt(xp.einsum("ik,ik->i", x, x))
        length, denom = state.x_norm, xp.maximum(state.x_norm, EPS)
        if isinstance(fc, LargeMarginInnerProductLayer):
            w = fc.blobs[0].data[cols]
            state.w_norm = xp.sqrt(xp.einsum("ik,ik->i", w, w))
            length = length * state.w_norm
            denom = denom * xp.maximum(state.w_norm, EPS)
        logit, c, value, slope = margin_target(xp, fc.m, lam, state.z[rows, cols],
                                               length, denom)
        state.q_factor = ((value - c * slope) / (1 + lam)).astype(xp.float64)
        return logit.astype(xp.float64), ((lam + slope) / (1 + lam)).astype(xp.float64)

    def extra_terms(self, state, x, w, inv_nu):
        """``(rows, coef_x, cols, coef_w)``: the layers' ``q`` terms."""
        if not state.mrows.size:
            return None
        xp, dt = self.xp, self.dtype
        q = state.dl_margin * state.q_factor
        coef_x = q / xp.maximum(state.x_norm, EPS)
        cols = state.mcols
        if isinstance(self.layer("fc"), LargeMarginInnerProductLayer):
            coef_x = coef_x * state.w_norm
            coef_w = q * state.x_norm / xp.maximum(state.w_norm, EPS)
        else:
            cols, coef_w = cols[:0], q[:0]
        return state.mrows, coef_x.astype(dt), cols, coef_w.astype(dt)

    def producers(self):
        """The inner product's top holds the margined logits."""
        return {"fc": (logit_data, logit_diff)}


@fusion.register_fuser
def find_multiplicative_heads(net):
    """The FusedMultiplicativeHeads of ``net``: every LargeMarginInnerProduct,
    and every MarginInnerProduct with ``grad_mode: EXACT``, whose top (and
    optional lambda top) is read only by the SoftmaxWithLoss that follows it
    (logged otherwise)."""
    heads = []
    for i, layer in enumerate(net.layers):
        if not isinstance(layer, FC_LAYERS):
            continue
        reason = _why_not(net, i)
        if reason:
            logger.info("Not fusing the head from layer %s: %s", layer.name, reason)
            continue
        heads.append(FusedMultiplicativeHeadLayer.from_chain(net, [i, i + 1]))
    return heads


def _why_not(net, i):
    fc, top = net.layers[i], net.top_vecs[i]
    if isinstance(fc, MarginInnerProductLayer) and fc.grad_mode != EXACT:
        return "grad_mode SPHEREFACE is not the gradient of the forward"
    if len(top[0].shape) != 2:
        return "its top is not (N, C)"
    loss = net.layers[i + 1] if i + 1 < len(net.layers) else None
    if (not isinstance(loss, SoftmaxWithLossLayer)
            or net.bottom_vecs[i + 1][0] is not top[0]):
        return "no SoftmaxWithLoss reads its top next"
    return loss_and_readers_problem(net, [i, i + 1])
