"""MarginInnerProduct: the A-Softmax (SphereFace) classifier layer
(Liu et al. 2017).

See docs/layers/margin_inner_product.md.
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
from netlite.proto import netlite_pb2
from netlite.registry import register_layer

EXACT = netlite_pb2.MarginInnerProductParameter.EXACT
SPHEREFACE = netlite_pb2.MarginInnerProductParameter.SPHEREFACE


@register_layer("MarginInnerProduct")
class MarginInnerProductLayer(LabelledLayer):
    r"""Inner product with unit-norm weight rows whose target logit carries
    a multiplicative angular margin (wy1iu/sphereface).

    Type ``"MarginInnerProduct"``.  With features ``x_i`` (``K`` values from
    ``axis`` on), unit weight rows ``w_hat_j = w_j / max(|w_j|, EPS)``,
    labels ``y_i`` and ``c_ij = x_i . w_hat_j / |x_i|``:

    .. math::

       z_{ij} = \|x_i\|\, c_{ij} \;(j \ne y_i), \qquad
       z_{i y_i} = \frac{\lambda\, \|x_i\|\, c_{i y_i}
                   + \|x_i\|\,\psi_m(c_{i y_i})}{1 + \lambda}

    with ``psi_m`` and the lambda schedule of ``_multiplicative_margin``.

    Bottoms, tops and parameters are those of ``LargeMarginInnerProduct``
    (``margin_inner_product_param``, same fields and defaults), plus
    ``grad_mode`` (netlite):

    ``EXACT`` (default)
        The weight blob is left as stored; the backward is the gradient of
        the forward, through the normalisation of the rows.
    ``SPHEREFACE``
        The fork: every forward renormalises the weight blob in place, and
        the backward is the fork's (the target's input coefficients
        rescaled to unit length, the weight gradient ``g^T x`` ignoring
        margin and normalisation) -- **not** the gradient of the forward.

    Parameter blobs: ``blobs[0]`` = W, shape ``(N, K)``; no bias.

    Raises
    ------
    As ``LargeMarginInnerProduct``: LayerSetupError / ShapeError for bad
    parameters and shapes, LabelError for bad labels, NonFiniteError for
    non-finite features, ValueError for ``propagate_down[1]``.
    """

    min_top_blobs = 1
    max_top_blobs = 2

    def layer_setup(self, bottom, top):
        p = self.layer_param.margin_inner_product_param
        setup_layer(self, p, bottom)
        self.grad_mode = p.grad_mode

    def reshape(self, bottom, top):
        reshape_layer(self, self.layer_param.margin_inner_product_param, bottom, top)

    # --------------------------------------------------------- reference
    def forward_cpu(self, bottom, top):
        xp = self.xp
        x, w, lam, label = begin_forward(self, bottom, top)
        self.w_norm = xp.sqrt(xp.einsum("jk,jk->j", w, w))
        self.w_hat = w / xp.maximum(self.w_norm, EPS)[:, None]
        if self.grad_mode == SPHEREFACE:
            w[...] = self.w_hat  # the fork's in-place renormalisation
        z = top[0].data.reshape(self.M, self.N)
        xp.matmul(x, self.w_hat.T, out=z)  # |x_i| c_ij
        self.x_norm = xp.sqrt(xp.einsum("ik,ik->i", x, x))
        if self.m == 1:
            return  # psi_1(c) = c: the plain inner product (lambda unused)
        rows = self.rows = xp.nonzero(label >= 0)[0]
        cols = self.cols = label[rows]
        xn = self.x_norm[rows]
        z[rows, cols], self.c, self.value, self.slope = margin_target(
            xp, self.m, lam, z[rows, cols], xn, xp.maximum(xn, EPS))

    def backward_cpu(self, top, propagate_down, bottom):
        self.check_no_label_backward(propagate_down)
        if self.grad_mode == SPHEREFACE:
            self._backward_sphereface(top, propagate_down, bottom)
            return
        xp = self.xp
        g = top[0].diff.reshape(self.M, self.N)
        x = bottom[0].data.reshape(self.M, self.K)
        w_hat = self.w_hat
        p, q = layer_coefficients(self, g)  # (g, None) for m = 1
        if self.propagates_param(0):
            d_hat = p.T @ x  # dE/dw_hat_j = sum_i phi' x_i
            # Through w_hat = w / max(|w|, EPS): project, divide by the norm.
            radial = xp.einsum("jk,jk->j", w_hat, d_hat)
            radial = xp.where(self.w_norm >= EPS, radial, 0)
            self.blobs[0].diff += ((d_hat - radial[:, None] * w_hat)
                                   / xp.maximum(self.w_norm, EPS)[:, None])
        if propagate_down[0]:
            dx = bottom[0].diff.reshape(self.M, self.K)
            xp.matmul(p, w_hat, out=dx)  # phi' w_hat_j
            if q is not None:  # + (phi - c phi') x_hat_i
                x_hat = x / xp.maximum(self.x_norm, EPS)[:, None]
                dx += q.sum(axis=1)[:, None] * x_hat

    def _backward_sphereface(self, top, propagate_down, bottom):
        """The fork's backward (not the gradient of the forward)."""
        xp = self.xp
        g = top[0].diff.reshape(self.M, self.N)
        x = bottom[0].data.reshape(self.M, self.K)
        if self.propagates_param(0):
            self.blobs[0].diff += g.T @ x  # ignores margin and normalisation
        if not propagate_down[0]:
            return
        dx = bottom[0].diff.reshape(self.M, self.K)
        if self.m == 1:
            xp.matmul(g, self.w_hat, out=dx)
            return
        rows, cols, lam = self.rows, self.cols, self.lam
        # The true pair (psi' on w_hat, -(c psi' - psi) / |x| on x), scaled
        # to unit length: a |x| / d and -b / d with d = sqrt(a^2 |x|^2 + b^2).
        a = self.slope
        b = self.c * self.slope - self.value
        xn = self.x_norm[rows]
        d = xp.sqrt(a * a * xn * xn + b * b)
        gt = g[rows, cols]
        p = g.copy()
        p[rows, cols] = gt * (lam + a * xn / d) / (1 + lam)
        r = xp.zeros(self.M, dtype=g.dtype)
        r[rows] = -gt * b / d / (1 + lam)
        xp.matmul(p, self.w_hat, out=dx)
        dx += r[:, None] * x
