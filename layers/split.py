"""Split: copy one blob to several consumers and sum their diffs.

See docs/layers/split.md.
"""

from netlite.errors import LayerSetupError
from netlite.layer import Layer
from netlite.registry import register_layer


@register_layer("Split")
class SplitLayer(Layer):
    r"""Fan one bottom out to ``K`` tops.

    Forward makes every top share the bottom's data (no copy).  Backward
    sums the fan-out gradients,

    .. math:: \partial E / \partial x = \sum_k \partial E / \partial y_k ,

    which is how a net honours "bottom diffs are overwritten" while a blob
    feeds several layers.  The Net inserts Split layers automatically;
    in-place use is an error.
    """

    exact_num_bottom_blobs = 1
    min_top_blobs = 1

    def reshape(self, bottom, top):
        for i, t in enumerate(top):
            if t is bottom[0]:
                raise LayerSetupError(
                    f"{self.describe()} does not allow in-place computation "
                    f"(top[{i}] is the bottom)"
                )
            t.reshape_like(bottom[0])
            t.share_data(bottom[0])

    def forward_cpu(self, bottom, top):
        # The tops already alias the bottom's data (set in reshape).
        pass

    def backward_cpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dx = bottom[0].diff
        dx[...] = top[0].diff
        for t in top[1:]:
            dx += t.diff
