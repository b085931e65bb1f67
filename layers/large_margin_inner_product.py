"""LargeMarginInnerProduct: the L-Softmax classifier layer (Liu et al. 2016).

See docs/layers/large_margin_inner_product.md.
"""

from netlite.layer import LabelledLayer
from netlite.layers._multiplicative_margin import (
    EPS,
    begin_forward,
    layer_coefficients,
    margin_target,
    reshape_layer,
    setup_layer,
)
from netlite.registry import register_layer


@register_layer("LargeMarginInnerProduct")
class LargeMarginInnerProductLayer(LabelledLayer):
    r"""Inner product whose target logit carries a multiplicative angular
    margin (wy1iu/LargeMargin_Softmax_Loss).

    Type ``"LargeMarginInnerProduct"``.  With features ``x_i`` (the axes of
    ``bottom[0]`` from ``axis`` on, ``K`` values), weight rows ``w_j``,
    labels ``y_i`` and ``c_ij = cos(theta_ij)``:

    .. math::

       z_{ij} = w_j \cdot x_i \;(j \ne y_i), \qquad
       z_{i y_i} = \frac{\lambda\, w_{y_i}\cdot x_i
                   + \|w_{y_i}\|\,\|x_i\|\,\psi_m(c_{i y_i})}{1 + \lambda}

    with ``psi_m`` and the lambda schedule of ``_multiplicative_margin``.

    Bottoms
        ``bottom[0]`` : x, shape ``(d_0, ..., d_{axis-1}, ...)``, ``K`` fixed
        at setup; ``bottom[1]`` : labels, ``M = d_0 ... d_{axis-1}`` values
        (any shape), class indices stored as floats.
    Tops
        ``top[0]`` : z, shape ``(d_0, ..., d_{axis-1}, N)``;
        ``top[1]`` (optional) : lambda, shape ``()``.

    Parameters (``largemargin_inner_product_param``)
        ``num_output`` N (required), ``type`` SINGLE / DOUBLE / TRIPLE /
        QUADRUPLE (m = 1..4, default SINGLE), ``base`` (1), ``gamma`` (0),
        ``power`` (1), ``lambda_min`` (0), ``iteration`` (0),
        ``weight_filler`` (constant 0 when absent), ``axis`` (1).
        ``loss_param.ignore_label`` (netlite): rows with that label get no
        margin.  **The defaults give lambda = 1, a 50/50 blend**; ``base:
        0`` gives the pure margin.

    Parameter blobs: ``blobs[0]`` = W, shape ``(N, K)``; no bias.

    Raises
    ------
    LayerSetupError
        Bad ``num_output`` or schedule field (negative, NaN), weights of
        the wrong shape (``ShapeError``), a label count other than ``M``
        (``ShapeError``), ``propagate_down[1]`` (``ValueError``).
    LabelError
        A label that is not an integer in ``[0, N)`` (nor ``ignore_label``).
    NonFiniteError
        A NaN or infinite feature.
    """

    min_top_blobs = 1
    max_top_blobs = 2

    def layer_setup(self, bottom, top):
        p = self.layer_param.largemargin_inner_product_param
        setup_layer(self, p, bottom)

    def reshape(self, bottom, top):
        p = self.layer_param.largemargin_inner_product_param
        reshape_layer(self, p, bottom, top)

    # --------------------------------------------------------- reference
    def forward_cpu(self, bottom, top):
        xp = self.xp
        x, w, lam, label = begin_forward(self, bottom, top)
        z = top[0].data.reshape(self.M, self.N)
        xp.matmul(x, w.T, out=z)  # w_j . x_i
        if self.m == 1:
            return  # psi_1(c) = c: the plain inner product (lambda unused)
        self.x_norm = xp.sqrt(xp.einsum("ik,ik->i", x, x))
        self.w_norm = xp.sqrt(xp.einsum("jk,jk->j", w, w))
        rows = self.rows = xp.nonzero(label >= 0)[0]
        cols = self.cols = label[rows]
        s = self.x_norm[rows] * self.w_norm[cols]  # |x_i| |w_y|
        denom = xp.maximum(self.x_norm[rows], EPS) * xp.maximum(self.w_norm[cols], EPS)
        z[rows, cols], self.c, self.value, self.slope = margin_target(
            xp, self.m, lam, z[rows, cols], s, denom)

    def backward_cpu(self, top, propagate_down, bottom):
        self.check_no_label_backward(propagate_down)
        xp = self.xp
        g = top[0].diff.reshape(self.M, self.N)
        x = bottom[0].data.reshape(self.M, self.K)
        w = self.blobs[0]
        p, q = layer_coefficients(self, g)  # (g, None) for m = 1
        if self.propagates_param(0):
            dw = p.T @ x  # phi' x_i
            if q is not None:  # + |x_i| (phi - c phi') w_hat_j
                w_hat = w.data / xp.maximum(self.w_norm, EPS)[:, None]
                dw += (q.T @ self.x_norm)[:, None] * w_hat
            w.diff += dw
        if propagate_down[0]:
            dx = bottom[0].diff.reshape(self.M, self.K)
            xp.matmul(p, w.data, out=dx)  # phi' |w_j| w_hat_j
            if q is not None:  # + |w_j| (phi - c phi') x_hat_i
                x_hat = x / xp.maximum(self.x_norm, EPS)[:, None]
                dx += (q @ self.w_norm)[:, None] * x_hat

