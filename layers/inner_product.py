"""InnerProduct: the fully connected layer, y = x W^T + b.

See docs/layers/inner_product.md.
"""

from netlite.errors import LayerSetupError, ShapeError
from netlite.layer import Layer
from netlite.proto import netlite_pb2
from netlite.registry import register_layer

RENORM_INPLACE = netlite_pb2.InnerProductParameter.RENORM_INPLACE
TRUE_GRADIENT = netlite_pb2.InnerProductParameter.TRUE_GRADIENT

#: The epsilon of the weight normalisation (happynear's CPU code).
WEIGHT_NORM_EPS = 1e-6


@register_layer("InnerProduct")
class InnerProductLayer(Layer):
    r"""Fully connected layer.

    Type ``"InnerProduct"``.  The axes of ``bottom[0]`` from ``axis`` on are
    flattened into ``K`` features, the axes before it into ``M`` rows:

    .. math:: Y = X W^\top + \mathbf{1} b^\top
       \qquad (X: M \times K,\; W: N \times K,\; Y: M \times N)

    (``Y = X W + 1 b^T`` with ``W: K x N`` when ``transpose`` is set).

    With ``normalize`` (happynear) every row ``w_n`` of the N x K matrix
    (a column of the stored blob when transposed) is replaced by
    ``w_n / sqrt(|w_n|^2 + 1e-6)`` before the product.  ``weight_norm_mode``
    RENORM_INPLACE (default) writes the normalised rows into the blob and
    gives the plain gradient w.r.t. them; TRUE_GRADIENT keeps the raw blob
    and gives the exact gradient ``(dW_hat - W_hat (W_hat . dW_hat)) / n``
    row by row.

    Bottoms
        ``bottom[0]`` : x, shape ``(d_0, ..., d_{axis-1}, ...)`` with
        ``count(axis) == K`` fixed at setup.
    Tops
        ``top[0]`` : y, shape ``(d_0, ..., d_{axis-1}, N)``.

    Parameters (``inner_product_param``)
        ``num_output`` N (required), ``bias_term`` (true), ``weight_filler``
        and ``bias_filler`` (constant 0 when absent: an unfilled layer starts
        at zero), ``axis`` (1, negative allowed), ``transpose`` (false),
        ``normalize`` (false), ``weight_norm_mode`` (RENORM_INPLACE; netlite
        extension, only with ``normalize``).

    Parameter blobs: ``blobs[0]`` = W, shape ``(N, K)`` (``(K, N)`` when
    transposed); ``blobs[1]`` = b, shape ``(N,)``.  Weights loaded from a
    model must have those shapes (Caffe's legacy ``(1, 1, N, K)`` is
    accepted and reshaped).  See docs/layers/inner_product.md.
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.inner_product_param
        if p.num_output <= 0:
            raise LayerSetupError(
                f"{self.describe()}: inner_product_param.num_output must be set "
                f"to a positive number of outputs, got {p.num_output}"
            )
        self.N = int(p.num_output)
        self.bias_term = bool(p.bias_term)
        self.transpose = bool(p.transpose)
        self.normalize = bool(p.normalize)
        if p.HasField("weight_norm_mode") and not self.normalize:
            raise LayerSetupError(
                f"{self.describe()}: inner_product_param.weight_norm_mode only "
                "applies with normalize: true"
            )
        self.true_gradient = self.normalize and p.weight_norm_mode == TRUE_GRADIENT
        # The axis of the stored blob that a row of W runs along.
        self.k_axis = 0 if self.transpose else 1
        self._w_hat = self._w_norm = None
        axis = self._axis(bottom[0])
        self.K = bottom[0].count_range(axis)
        weight_shape = (self.K, self.N) if self.transpose else (self.N, self.K)
        shapes = [weight_shape] + ([(self.N,)] if self.bias_term else [])
        if not self.blobs:
            self.blobs = [self.make_blob(shape) for shape in shapes]
            self.fill_blob(self.blobs[0], p.weight_filler)
            if self.bias_term:
                self.fill_blob(self.blobs[1], p.bias_filler)
            return
        # Weights given in LayerParameter.blobs (a model file) or kept from an
        # earlier setup: they must fit this bottom, or forward would be wrong.
        self.check_param_blobs(
            shapes, ["weight", "bias"][:len(shapes)],
            f" (bottom[0] (shape {bottom[0].shape}) with axis {axis} has K = "
            f"{self.K} inputs and num_output N = {self.N})",
        )

    def _axis(self, bottom):
        return self.canonical_axis(bottom, self.layer_param.inner_product_param.axis)

    def reshape(self, bottom, top):
        if top[0] is bottom[0]:
            raise LayerSetupError(
                f"{self.describe()} does not allow in-place computation"
            )
        axis = self._axis(bottom[0])
        k = bottom[0].count_range(axis)
        if k != self.K:
            raise ShapeError(
                f"{self.describe()}: input size incompatible with the weights: "
                f"bottom[0] has shape {bottom[0].shape}, i.e. {k} inputs per row "
                f"from axis {axis}, but the layer was set up for K = {self.K} "
                f"(weights {self.blobs[0].shape})"
            )
        self.M = bottom[0].count_range(0, axis)
        top[0].reshape(bottom[0].shape[:axis] + (self.N,))

    def _weights(self):
        """The weights the product uses: the blob, renormalised in place
        (RENORM_INPLACE) or normalised into ``self._w_hat`` (TRUE_GRADIENT,
        which also keeps the row norms ``self._w_norm``)."""
        w = self.blobs[0].data
        if not self.normalize:
            return w
        xp = self.xp
        n = xp.sqrt((w * w).sum(axis=self.k_axis, keepdims=True) + WEIGHT_NORM_EPS)
        if self.true_gradient:
            self._w_hat, self._w_norm = w / n, n
            return self._w_hat
        w /= n
        return w

    def forward_cpu(self, bottom, top):
        x = bottom[0].data.reshape(self.M, self.K)
        w = self._weights()
        y = top[0].data.reshape(self.M, self.N)
        self.xp.matmul(x, w if self.transpose else w.T, out=y)
        if self.bias_term:
            y += self.blobs[1].data

    def backward_cpu(self, top, propagate_down, bottom):
        dy = top[0].diff.reshape(self.M, self.N)
        x = bottom[0].data.reshape(self.M, self.K)
        w = self.blobs[0]
        # The matrix the forward multiplied by: W_hat in TRUE_GRADIENT mode.
        if self.true_gradient and self._w_hat is None:
            self._weights()
        w_used = self._w_hat if self.true_gradient else w.data
        if self.propagates_param(0):
            gw = x.T @ dy if self.transpose else dy.T @ x
            if self.true_gradient:
                dot = (self._w_hat * gw).sum(axis=self.k_axis, keepdims=True)
                gw = (gw - self._w_hat * dot) / self._w_norm
            w.diff += gw
        if self.bias_term and self.propagates_param(1):
            self.blobs[1].diff += dy.sum(axis=0)
        if propagate_down[0]:
            dx = bottom[0].diff.reshape(self.M, self.K)
            self.xp.matmul(dy, w_used.T if self.transpose else w_used, out=dx)

    def forward_numba(self, bottom, top):
        self.adapter("numba").forward(bottom, top)

    def backward_numba(self, top, propagate_down, bottom):
        self.adapter("numba").backward(top, propagate_down, bottom)
