"""Flatten: merge a range of axes into one, without copying.

See docs/layers/flatten.md.
"""

from netlite.errors import LayerSetupError
from netlite.layer import Layer
from netlite.registry import register_layer


@register_layer("Flatten")
class FlattenLayer(Layer):
    r"""Merge axes ``axis .. end_axis`` of the bottom into a single axis.

    Type ``"Flatten"``.  For a bottom of shape :math:`(d_0, \dots, d_{k-1})`
    the top has shape

    .. math:: (d_0, \dots, d_{a-1},\ \textstyle\prod_{i=a}^{e} d_i,\
              d_{e+1}, \dots, d_{k-1})

    with :math:`a` = ``axis`` and :math:`e` = ``end_axis`` (both may be
    negative).  The values are the bottom's, in the same (C) order.

    Bottoms
        ``bottom[0]`` : x, any shape with at least one axis.
    Tops
        ``top[0]`` : y, the flattened shape.  In-place is an error.

    Parameters (``flatten_param``)
        ``axis`` (default 1), ``end_axis`` (default -1).

    As in Caffe, nothing is copied: the top's data and diff are views of
    the bottom's buffers, so ``y`` is ``x`` and ``dx`` is ``dy`` by
    aliasing.  Unlike Caffe, the diff is aliased in ``reshape`` (top shares
    the bottom's diff) rather than in ``backward`` (bottom shares the top's
    diff), which keeps chains of aliasing layers connected.
    See docs/layers/flatten.md.
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def reshape(self, bottom, top):
        x = bottom[0]
        if top[0] is x:
            raise LayerSetupError(
                f"{self.describe()} does not allow in-place computation"
            )
        p = self.layer_param.flatten_param
        start = self.canonical_axis(x, p.axis, "flatten_param.axis")
        end = self.canonical_axis(x, p.end_axis, "flatten_param.end_axis")
        if end + 1 < start:
            # end == start - 1 is allowed, as in Caffe: it inserts an axis of 1.
            raise LayerSetupError(
                f"{self.describe()}: end_axis {p.end_axis} (axis {end}) comes "
                f"before axis {p.axis} (axis {start}) for bottom shape {x.shape}"
            )
        shape = x.shape[:start] + (x.count_range(start, end + 1),) + x.shape[end + 1:]
        top[0].reshape(shape)
        # The top aliases the bottom's buffers, renewed at every reshape
        # (forward reshapes first).  Caffe instead makes the *bottom* share
        # the top's diff in Backward, which silently disconnects a Reshape
        # layer feeding this one; see docs/layers/flatten.md.
        top[0].share_data(x)
        top[0].share_diff(x)

    def forward_cpu(self, bottom, top):
        # top[0].data is bottom[0].data (shared in reshape).
        pass

    def backward_cpu(self, top, propagate_down, bottom):
        # top[0].diff is bottom[0].diff (shared in reshape): dx = dy already.
        pass
