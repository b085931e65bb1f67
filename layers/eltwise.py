"""Eltwise: element-wise sum (with coefficients), product or maximum.

See docs/layers/eltwise.md.
"""

import numpy as np

from netlite.errors import LayerSetupError, ShapeError
from netlite.layer import Layer
from netlite.proto import netlite_pb2
from netlite.registry import register_layer

PROD = netlite_pb2.EltwiseParameter.PROD
SUM = netlite_pb2.EltwiseParameter.SUM
MAX = netlite_pb2.EltwiseParameter.MAX


@register_layer("Eltwise")
class EltwiseLayer(Layer):
    r"""Combine K >= 2 equally shaped bottoms element by element.

    Type ``"Eltwise"``.  For bottoms :math:`x_1, \dots, x_K`:

    * ``SUM`` (default): :math:`y = \sum_k c_k x_k`;
    * ``PROD``: :math:`y = \prod_k x_k`;
    * ``MAX``: :math:`y = \max_k x_k`, remembering which bottom won.

    Bottoms
        ``bottom[k]`` : x_k, all of the same shape.
    Tops
        ``top[0]`` : y, the same shape.  In-place is an error.

    Parameters (``eltwise_param``)
        ``operation`` (SUM), ``coeff`` (repeated float; none = all 1, else
        exactly one per bottom; SUM only), ``stable_prod_grad`` (true).

    Backward: SUM :math:`dx_k = c_k\,dy`; PROD :math:`dx_k = dy
    \prod_{j \ne k} x_j` (stable) or :math:`dy\,y / x_k` (unstable); MAX
    :math:`dx_k = dy` where bottom k won, 0 elsewhere.  MAX ties go to
    ``bottom[1]`` in the first pair and then stay with the earlier bottom,
    as in Caffe.  See docs/layers/eltwise.md.
    """

    min_bottom_blobs = 2
    exact_num_top_blobs = 1

    def __init__(self, layer_param=None, **kwargs):
        super().__init__(layer_param, **kwargs)
        # MAX: index of the winning bottom per element (Caffe's max_idx_).
        self.max_idx = None

    def layer_setup(self, bottom, top):
        p = self.layer_param.eltwise_param
        self.operation = p.operation
        if self.operation not in (PROD, SUM, MAX):
            raise LayerSetupError(
                f"{self.describe()}: unknown eltwise operation {self.operation}"
            )
        if p.coeff and self.operation != SUM:
            name = netlite_pb2.EltwiseParameter.EltwiseOp.Name(self.operation)
            raise LayerSetupError(
                f"{self.describe()}: coeff is only allowed with operation SUM, "
                f"got {len(p.coeff)} coeff(s) with {name}"
            )
        if p.coeff and len(p.coeff) != len(bottom):
            raise LayerSetupError(
                f"{self.describe()}: eltwise_param.coeff must be given once per "
                f"bottom blob ({len(bottom)}), got {len(p.coeff)}"
            )
        coeffs = list(p.coeff) or [1.0] * len(bottom)
        self.coeffs = [self.dtype.type(c) for c in coeffs]
        self.stable_prod_grad = bool(p.stable_prod_grad)

    def reshape(self, bottom, top):
        for i, b in enumerate(bottom):
            if b is top[0]:
                # The forward writes y before it has read every x.
                raise LayerSetupError(
                    f"{self.describe()} does not allow in-place computation "
                    f"(top[0] is bottom[{i}])"
                )
            if i and b.shape != bottom[0].shape:
                raise ShapeError(
                    f"{self.describe()}: all bottoms must have the same shape; "
                    f"bottom[0] is {bottom[0].shape_string()}, bottom[{i}] is "
                    f"{b.shape_string()}"
                )
        top[0].reshape_like(bottom[0])
        if self.operation == MAX:
            shape = bottom[0].shape
            if self.max_idx is None or self.max_idx.shape != shape:
                self.max_idx = self.xp.empty(shape, dtype=np.int32)

    def forward_cpu(self, bottom, top):
        xp = self.xp
        y = top[0].data
        if self.operation == SUM:
            self._scaled_copy(bottom[0].data, self.coeffs[0], y)
            for b, c in zip(bottom[1:], self.coeffs[1:]):
                if c == 1:
                    y += b.data
                else:
                    y += c * b.data
        elif self.operation == PROD:
            xp.multiply(bottom[0].data, bottom[1].data, out=y)
            for b in bottom[2:]:
                y *= b.data
        else:
            a, b = bottom[0].data, bottom[1].data
            first = a > b  # strict: a tie goes to bottom[1], as in Caffe
            y[...] = xp.where(first, a, b)
            self.max_idx[...] = ~first
            for k in range(2, len(bottom)):
                x = bottom[k].data
                wins = x > y  # strict: the earlier bottom keeps a tie
                y[...] = xp.where(wins, x, y)
                self.max_idx[...] = xp.where(wins, np.int32(k), self.max_idx)

    def backward_cpu(self, top, propagate_down, bottom):
        xp = self.xp
        dy = top[0].diff
        for i, b in enumerate(bottom):
            if not propagate_down[i]:
                continue
            dx = b.diff
            if self.operation == SUM:
                self._scaled_copy(dy, self.coeffs[i], dx)
            elif self.operation == PROD:
                if self.stable_prod_grad:
                    others = [o for j, o in enumerate(bottom) if j != i]
                    dx[...] = others[0].data
                    for o in others[1:]:
                        dx *= o.data
                else:
                    xp.divide(top[0].data, b.data, out=dx)
                dx *= dy
            else:
                dx[...] = xp.where(self.max_idx == i, dy, self.dtype.type(0))

    def _scaled_copy(self, src, c, dst):
        """``dst = c * src`` (a plain copy when c is 1)."""
        if c == 1:
            dst[...] = src
        else:
            self.xp.multiply(src, c, out=dst)
