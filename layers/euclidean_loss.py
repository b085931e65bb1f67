"""EuclideanLoss: half the mean (over the batch) squared distance.

See docs/layers/euclidean_loss.md.
"""

from netlite.errors import ShapeError
from netlite.layer import LossLayer
from netlite.registry import register_layer


@register_layer("EuclideanLoss")
class EuclideanLossLayer(LossLayer):
    r"""Sum of squared differences, halved and divided by the batch size.

    Type ``"EuclideanLoss"``.  With :math:`N` = ``bottom[0].shape[0]``,

    .. math:: E = \frac{1}{2N} \sum_i (a_i - b_i)^2 .

    Bottoms
        ``bottom[0]`` : a, shape ``(N, ...)``;
        ``bottom[1]`` : b, shape ``(N, ...)`` with the same count as a
        (the shapes may differ).
    Tops
        ``top[0]`` : E, a scalar (0 axes).

    Both bottoms can receive a gradient (``force_backward`` reaches the
    second one too, unlike other losses): with w the loss weight in the top
    diff, :math:`\partial E/\partial a = w (a - b) / N` and
    :math:`\partial E/\partial b = -w (a - b) / N`.
    See docs/layers/euclidean_loss.md.
    """

    def __init__(self, layer_param=None, **kwargs):
        super().__init__(layer_param, **kwargs)
        # a - b from the last forward; backward scales it.
        self._residual = None

    def allow_force_backward(self, bottom_index):
        # b is a target, not a label: it may well need a gradient.
        return True

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        a, b = bottom
        if a.count != b.count:
            raise ShapeError(
                f"{self.describe()}: the two bottoms must have the same count; "
                f"bottom[0] is {a.shape_string()}, bottom[1] is {b.shape_string()}"
            )
        if self._residual is None or self._residual.size != a.count:
            self._residual = self.xp.empty(a.count, dtype=a.dtype)

    def _batch(self, bottom):
        # A 0-axis bottom counts as one sample; an empty batch has nothing
        # to average, and dividing its zero sum by 1 keeps E = 0.
        return max(bottom[0].shape[0], 1) if bottom[0].num_axes else 1

    def forward_cpu(self, bottom, top):
        r = self._residual
        self.xp.subtract(bottom[0].flat_data, bottom[1].flat_data, out=r)
        top[0].data[...] = self.xp.vdot(r, r) / self.dtype.type(2 * self._batch(bottom))

    def backward_cpu(self, top, propagate_down, bottom):
        n = self.dtype.type(self._batch(bottom))
        w = top[0].flat_diff[0]
        for i, sign in ((0, 1), (1, -1)):
            if propagate_down[i]:
                self.xp.multiply(self._residual, sign * w / n, out=bottom[i].flat_diff)
