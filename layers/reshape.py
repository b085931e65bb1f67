"""Reshape: give the bottom's values a new shape, without copying.

See docs/layers/reshape.md.
"""

import math

from netlite.errors import LayerSetupError, ShapeError
from netlite.layer import Layer
from netlite.registry import register_layer


@register_layer("Reshape")
class ReshapeLayer(Layer):
    """Replace axes ``[axis, axis + num_axes)`` of the bottom by a new shape.

    Type ``"Reshape"``.  The top holds the bottom's values in the same (C)
    order; only the shape changes.

    Bottoms
        ``bottom[0]`` : x, any shape.
    Tops
        ``top[0]`` : y, with ``y.count == x.count``.  In-place is an error.

    Parameters (``reshape_param``)
        ``shape`` (BlobShape; each dim is a size, ``0`` = copy the bottom's
        dim at that position, or ``-1`` = infer from the count, at most
        once), ``axis`` (default 0; negative counts from the end, -1 meaning
        *after* the last axis), ``num_axes`` (default -1 = all axes from
        ``axis`` on; 0 inserts axes).

    As in Caffe, the top's data and diff are views of the bottom's buffers
    (shared in ``reshape``), so forward and backward do nothing.
    See docs/layers/reshape.md.
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        if top[0] is bottom[0]:
            raise LayerSetupError(
                f"{self.describe()} does not allow in-place computation"
            )
        dims = list(self.layer_param.reshape_param.shape.dim)
        self._copy_axes, self._inferred_axis, self._constant_count = [], -1, 1
        for i, d in enumerate(dims):
            if d == 0:
                self._copy_axes.append(i)
            elif d == -1:
                if self._inferred_axis >= 0:
                    raise LayerSetupError(
                        f"{self.describe()}: reshape_param.shape {dims} contains "
                        "more than one -1; at most one dimension can be inferred"
                    )
                self._inferred_axis = i
            elif d < -1:
                raise LayerSetupError(
                    f"{self.describe()}: reshape_param.shape {dims} has dim {d}; "
                    "dims must be positive, 0 (copy) or -1 (infer)"
                )
            else:
                self._constant_count *= d
        self._dims = dims

    def reshape(self, bottom, top):
        x = bottom[0]
        p = self.layer_param.reshape_param
        n = x.num_axes
        start = p.axis if p.axis >= 0 else n + p.axis + 1
        if not 0 <= start <= n:
            raise LayerSetupError(
                f"{self.describe()}: reshape_param.axis {p.axis} is out of range "
                f"for a {n}-axis bottom (shape {x.shape})"
            )
        if p.num_axes < -1:
            raise LayerSetupError(
                f"{self.describe()}: reshape_param.num_axes must be >= 0, or -1 "
                f"for all; got {p.num_axes}"
            )
        end = n if p.num_axes == -1 else start + p.num_axes
        if end > n:
            raise LayerSetupError(
                f"{self.describe()}: axis + num_axes = {start} + {p.num_axes} is "
                f"out of range for a {n}-axis bottom (shape {x.shape})"
            )
        shape = list(x.shape[:start]) + list(self._dims) + list(x.shape[end:])
        for i in self._copy_axes:
            if start + i >= n:
                raise LayerSetupError(
                    f"{self.describe()}: reshape_param.shape has a 0 at position "
                    f"{i}, but bottom[0] (shape {x.shape}) has no axis {start + i} "
                    "to copy"
                )
            shape[start + i] = x.shape[start + i]
        if self._inferred_axis >= 0:
            known = self._constant_count * x.count_range(0, start) * x.count_range(end)
            for i in self._copy_axes:
                known *= shape[start + i]
            if known == 0 or x.count % known:
                raise ShapeError(
                    f"{self.describe()}: cannot infer the -1 dimension: bottom[0] "
                    f"count {x.count} (shape {x.shape}) is not a multiple of the "
                    f"product {known} of the other dimensions"
                )
            shape[start + self._inferred_axis] = x.count // known
        count = math.prod(shape)
        if count != x.count:
            raise ShapeError(
                f"{self.describe()}: the new shape {tuple(shape)} has {count} "
                f"elements but bottom[0] (shape {x.shape}) has {x.count}"
            )
        top[0].reshape(shape)
        top[0].share_data(x)
        top[0].share_diff(x)

    def forward_cpu(self, bottom, top):
        # top[0].data is bottom[0].data (shared in reshape).
        pass

    def backward_cpu(self, top, propagate_down, bottom):
        # top[0].diff is bottom[0].diff (shared in reshape): dx = dy already.
        pass
