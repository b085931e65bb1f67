"""ReLU: rectified linear unit, optionally leaky.

See docs/layers/relu.md.
"""

from netlite.layer import NeuronLayer
from netlite.registry import register_layer


@register_layer("ReLU")
class ReLULayer(NeuronLayer):
    r"""Rectified linear unit with an optional negative slope.

    Type ``"ReLU"``.  With :math:`\nu` = ``negative_slope``,

    .. math:: y = \max(x, 0) + \nu \min(x, 0) .

    Bottoms
        ``bottom[0]`` : x, any shape.
    Tops
        ``top[0]`` : y, shaped like x.  In-place (top is bottom) is allowed.

    Parameters (``relu_param``)
        ``negative_slope`` (float, default 0).  ``engine`` is accepted and
        ignored.

    The derivative at :math:`x = 0` is taken as :math:`\nu` (0 for a plain
    ReLU), as in Caffe.  In place, backward decides the branch from the
    rectified output, whose sign equals the input's when
    :math:`\nu \ge 0`; for a negative slope the forward keeps the mask
    :math:`x > 0` instead.  See docs/layers/relu.md.
    """

    def __init__(self, layer_param=None, **kwargs):
        super().__init__(layer_param, **kwargs)
        self.negative_slope = float(self.layer_param.relu_param.negative_slope)
        # Only set when running in place with a negative slope (see backward).
        self._positive = None

    def forward_cpu(self, bottom, top):
        x, y = bottom[0].data, top[0].data
        xp = self.xp
        if self.negative_slope == 0:
            # The hot path (LeNet): one pass, no temporary, safe in place.
            xp.maximum(x, 0, out=y)
            return
        positive = x > 0
        if self.negative_slope < 0 and top[0] is bottom[0]:
            self._positive = positive
        else:
            self._positive = None
        # x * 1 == x, and x * slope rounds exactly as Caffe's
        # slope * min(x, 0), so this equals max(x, 0) + slope * min(x, 0)
        # bit for bit.
        xp.multiply(x, self._slope_factor(positive), out=y)

    def backward_cpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp = self.xp
        dy, dx = top[0].diff, bottom[0].diff
        # In place, bottom.data already holds y; y > 0 iff x > 0 unless the
        # slope is negative, in which case forward saved the mask.
        if self._positive is not None and top[0] is bottom[0]:
            positive = self._positive
        else:
            positive = bottom[0].data > 0
        if self.negative_slope == 0:
            xp.multiply(dy, positive, out=dx)
        else:
            xp.multiply(dy, self._slope_factor(positive), out=dx)

    def _slope_factor(self, positive):
        """``1`` where ``positive``, ``negative_slope`` elsewhere (blob dtype)."""
        one = self.dtype.type(1)
        return self.xp.where(positive, one, self.dtype.type(self.negative_slope))
