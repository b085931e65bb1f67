"""SubCenterMax: the max over each class's K sub-center cosines
(sub-center ArcFace).

See docs/layers/sub_center_max.md.
"""

from netlite.errors import LayerSetupError, ShapeError
from netlite.layer import Layer
from netlite.layers._additive_margin import check_finite
from netlite.registry import register_layer

__all__ = ["SubCenterMaxLayer"]


@register_layer("SubCenterMax")
class SubCenterMaxLayer(Layer):
    r"""``y[n, c, i] = max_k x[n, c K + k, i]`` along ``axis``.

    Type string ``"SubCenterMax"`` (netlite extension).  ``bottom[0]`` is
    viewed as ``(outer, C K, inner)`` around ``axis``; class ``c``'s
    sub-centers are columns ``c K .. c K + K - 1`` (pytorch-metric-learning's
    layout).  ``top[0]`` has ``C`` along ``axis``.  The backward routes
    each top diff to the sub-center that gave the max (the first one on a
    tie) and writes 0 elsewhere.

    Parameters (``sub_center_param``)
        ``num_subcenters`` K (1; at least 1), ``axis`` (1; negative counts
        from the end).

    Raises
    ------
    LayerSetupError
        K = 0 or a bad axis.
    ShapeError
        The axis length is not a multiple of K.
    NonFiniteError
        A NaN or infinite input.
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.sub_center_param
        self.k = int(p.num_subcenters)
        if self.k < 1:
            raise LayerSetupError(
                f"{self.describe()}: num_subcenters must be at least 1, got {self.k}")
        if top[0] is bottom[0]:
            raise LayerSetupError(
                f"{self.describe()} cannot run in place (the top has fewer columns)")

    def reshape(self, bottom, top):
        p = self.layer_param.sub_center_param
        self.axis = self.canonical_axis(bottom[0], p.axis)
        width = bottom[0].shape[self.axis]
        if width == 0 or width % self.k:
            raise ShapeError(
                f"{self.describe()}: bottom[0] {bottom[0].shape} has {width} "
                f"columns along axis {self.axis}, not a positive multiple of "
                f"num_subcenters = {self.k}")
        self.classes = width // self.k
        self.outer = bottom[0].count_range(0, self.axis)
        self.inner = bottom[0].count_range(self.axis + 1)
        shape = list(bottom[0].shape)
        shape[self.axis] = self.classes
        top[0].reshape(tuple(shape))

    def _view4(self, array):
        return array.reshape(self.outer, self.classes, self.k, self.inner)

    # --------------------------------------------------------- reference
    def forward_cpu(self, bottom, top):
        xp = self.xp
        check_finite(self, bottom[0])
        x = self._view4(bottom[0].data)
        self.argmax = xp.argmax(x, axis=2)  # the first maximum on a tie
        y = xp.take_along_axis(x, self.argmax[:, :, None, :], axis=2)
        top[0].data[...] = y.reshape(top[0].shape)

    def backward_cpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp = self.xp
        dy = top[0].diff.reshape(self.outer, self.classes, 1, self.inner)
        k = xp.arange(self.k).reshape(1, 1, self.k, 1)
        winner = k == self.argmax[:, :, None, :]
        self._view4(bottom[0].diff)[...] = xp.where(winner, dy, 0)
