"""InnerProduct: the fully connected layer, y = x W^T + b.

See docs/layers/inner_product.md.
"""

from netlite.errors import LayerSetupError, ShapeError
from netlite.layer import Layer
from netlite.registry import register_layer


@register_layer("InnerProduct")
class InnerProductLayer(Layer):
    r"""Fully connected layer.

    Type ``"InnerProduct"``.  The axes of ``bottom[0]`` from ``axis`` on are
    flattened into ``K`` features, the axes before it into ``M`` rows:

    .. math:: Y = X W^\top + \mathbf{1} b^\top
       \qquad (X: M \times K,\; W: N \times K,\; Y: M \times N)

    (``Y = X W + 1 b^T`` with ``W: K x N`` when ``transpose`` is set).

    Bottoms
        ``bottom[0]`` : x, shape ``(d_0, ..., d_{axis-1}, ...)`` with
        ``count(axis) == K`` fixed at setup.
    Tops
        ``top[0]`` : y, shape ``(d_0, ..., d_{axis-1}, N)``.

    Parameters (``inner_product_param``)
        ``num_output`` N (required), ``bias_term`` (true), ``weight_filler``
        and ``bias_filler`` (constant 0 when absent: an unfilled layer starts
        at zero), ``axis`` (1, negative allowed), ``transpose`` (false).

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

    def forward_cpu(self, bottom, top):
        x = bottom[0].data.reshape(self.M, self.K)
        w = self.blobs[0].data
        y = top[0].data.reshape(self.M, self.N)
        self.xp.matmul(x, w if self.transpose else w.T, out=y)
        if self.bias_term:
            y += self.blobs[1].data

    def backward_cpu(self, top, propagate_down, bottom):
        dy = top[0].diff.reshape(self.M, self.N)
        x = bottom[0].data.reshape(self.M, self.K)
        w = self.blobs[0]
        if self.propagates_param(0):
            if self.transpose:
                w.diff += x.T @ dy
            else:
                w.diff += dy.T @ x
        if self.bias_term and self.propagates_param(1):
            self.blobs[1].diff += dy.sum(axis=0)
        if propagate_down[0]:
            dx = bottom[0].diff.reshape(self.M, self.K)
            self.xp.matmul(dy, w.data.T if self.transpose else w.data, out=dx)
