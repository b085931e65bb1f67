"""Normalize: divide each feature vector by its L2 (or L1) norm (happynear).

See docs/layers/normalize.md.
"""

import math

import numpy as np

from netlite.errors import LayerSetupError, NonFiniteError, ShapeError
from netlite.layer import Layer
from netlite.registry import register_layer

NORM_TYPES = ("L2", "L1")


@register_layer("Normalize")
class NormalizeLayer(Layer):
    r"""Normalise every sample across channels (axis 1), per spatial position.

    Type ``"Normalize"`` (happynear/caffe-windows).  With ``bottom[0]``
    viewed as ``(N, C, S)`` (``S`` = the product of the axes after 1) and
    the column ``x = x_{n,:,s}``:

    .. math:: n = \sqrt{\textstyle\sum_c x_c^2 + \epsilon}\ \ (\mathrm{L2}),
              \qquad n = \textstyle\sum_c |x_c| + \epsilon\ \ (\mathrm{L1}),
              \qquad y = x / n .

    Backward (exact): ``dx = (g - t (y.g)) / n + h t`` with ``t = y`` (L2)
    or ``sign(x)`` (L1), ``g`` the diff of ``top[0]`` and ``h`` the diff of
    the norm top when ``bp_norm`` is set.  ``fix_gradient`` drops the
    division by ``n`` (happynear's GPU code; not the gradient of the
    forward).

    Bottoms
        ``bottom[0]`` : x, at least 2 axes.
    Tops
        ``top[0]`` : y, shaped like x (in-place allowed);
        ``top[1]`` (optional) : the norm n, x's shape with axis 1 set to 1.

    Parameters (``normalize_param``)
        ``normalize_type`` ("L2" | "L1"), ``fix_gradient`` (false),
        ``bp_norm`` (false; needs the second top), ``eps`` (1e-6, netlite
        extension; positive and finite).
    """

    exact_num_bottom_blobs = 1
    min_top_blobs = 1
    max_top_blobs = 2

    def layer_setup(self, bottom, top):
        p = self.layer_param.normalize_param
        if p.normalize_type not in NORM_TYPES:
            raise LayerSetupError(
                f"{self.describe()}: normalize_param.normalize_type must be "
                f"\"L2\" or \"L1\", got {p.normalize_type!r}"
            )
        self.l2 = p.normalize_type == "L2"
        self.eps = float(p.eps)
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise LayerSetupError(
                f"{self.describe()}: normalize_param.eps must be positive and "
                f"finite (it keeps a zero vector finite), got {self.eps}"
            )
        self.fix_gradient = bool(p.fix_gradient)
        # happynear: bp_norm only acts when the norm is a top.
        self.bp_norm = bool(p.bp_norm) and len(top) == 2
        self._norm = None

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) < 2:
            raise ShapeError(
                f"{self.describe()}: bottom[0] must have at least 2 axes "
                f"(samples, channels, ...), got shape {shape}"
            )
        self.outer, self.channels = shape[0], shape[1]
        self.inner = bottom[0].count_range(2)
        if top[0] is not bottom[0]:
            top[0].reshape_like(bottom[0])
        norm_shape = (shape[0], 1) + tuple(shape[2:])
        if len(top) > 1:
            top[1].reshape(norm_shape)
        elif self._norm is None or self._norm.shape != norm_shape:
            self._norm = self.make_blob(norm_shape)

    def _view(self, array):
        return array.reshape(self.outer, self.channels, self.inner)

    def _norm_blob(self, top):
        return top[1] if len(top) > 1 else self._norm

    def forward_cpu(self, bottom, top):
        xp = self.xp
        x = self._view(bottom[0].data)
        finite = xp.isfinite(x)
        if not bool(finite.all()):
            flat = int(xp.argmin(finite.reshape(-1)))
            where = tuple(int(i) for i in np.unravel_index(flat, bottom[0].shape))
            raise NonFiniteError(
                f"{self.describe()}: bottom[0] (shape {bottom[0].shape}) holds "
                f"{x.reshape(-1)[flat].item()} at index {where}; its norm "
                "would be undefined"
            )
        if self.l2:
            n = xp.sqrt((x * x).sum(axis=1, keepdims=True) + self.eps)
        else:
            n = xp.abs(x).sum(axis=1, keepdims=True) + self.eps
        self._norm_blob(top).data[...] = n.reshape(self._norm_blob(top).shape)
        xp.divide(x, n, out=self._view(top[0].data))

    def backward_cpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp = self.xp
        y = self._view(top[0].data)
        g = self._view(top[0].diff)
        n = self._norm_blob(top).data.reshape(self.outer, 1, self.inner)
        # The direction of dn/dx: x/n = y (L2), sign(x) = sign(y) (L1; the
        # same sign, and y is all that is left in place).
        t = y if self.l2 else xp.sign(y)
        dot = (y * g).sum(axis=1, keepdims=True)
        dx = g - t * dot
        if not self.fix_gradient:
            dx /= n
        if self.bp_norm:
            dx += t * top[1].diff.reshape(self.outer, 1, self.inner)
        self._view(bottom[0].diff)[...] = dx


    def forward_numba(self, bottom, top):
        self.adapter("numba").forward(bottom, top)

    def backward_numba(self, top, propagate_down, bottom):
        self.adapter("numba").backward(top, propagate_down, bottom)

    def forward_gpu(self, bottom, top):
        self.adapter("cupy").forward(bottom, top)

    def backward_gpu(self, top, propagate_down, bottom):
        self.adapter("cupy").backward(top, propagate_down, bottom)
