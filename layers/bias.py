"""Bias: add a learned or given bias, broadcast over leading and trailing axes.

See docs/layers/bias.md.
"""

from netlite.errors import LayerSetupError, ShapeError
from netlite.layer import Layer
from netlite.registry import register_layer


def learned_param_shape(layer, bottom, axis, num_axes, what):
    """Shape of a learned Bias/Scale parameter: ``bottom.shape[axis:axis+n]``.

    Parameters
    ----------
    layer : Layer
        For error messages.
    bottom : Blob
        ``bottom[0]``.
    axis : int
        First axis the parameter covers (negative counts from the end).
    num_axes : int
        Number of axes covered; -1 means "to the end", 0 a scalar.
    what : str
        ``"bias"`` or ``"scale"``, for messages.

    Raises
    ------
    LayerSetupError
        When ``num_axes < -1`` or the parameter would extend past bottom[0].
    """
    axis = layer.canonical_axis(bottom, axis, f"{what} axis")
    if num_axes < -1:
        raise LayerSetupError(
            f"{layer.describe()}: num_axes must be non-negative, or -1 to extend "
            f"to the end of bottom[0]; got {num_axes}"
        )
    if num_axes >= 0 and bottom.num_axes < axis + num_axes:
        raise LayerSetupError(
            f"{layer.describe()}: the {what} blob would cover axes {axis}.."
            f"{axis + num_axes - 1} of bottom[0], which has shape {bottom.shape}"
        )
    end = bottom.num_axes if num_axes == -1 else axis + num_axes
    return bottom.shape[axis:end]


def broadcast_dims(layer, bottom, operand, axis, what):
    """Caffe's Bias/Scale Reshape rule: ``(axis, outer, dim, inner)``.

    ``operand`` (the bias or scale blob) must match ``bottom.shape`` starting
    at ``axis``; a scalar operand forces ``axis = 0`` (any axis gives the
    same result, and 0 makes ``outer`` 1).

    Raises
    ------
    ShapeError
        When the operand's shape does not fit bottom[0] at ``axis``.
    """
    if operand.num_axes == 0:
        axis = 0
    else:
        axis = layer.canonical_axis(bottom, axis, f"{what} axis")
    span = bottom.shape[axis:axis + operand.num_axes]
    if tuple(span) != tuple(operand.shape):
        raise ShapeError(
            f"{layer.describe()}: the {what} blob has shape {operand.shape}, but "
            f"bottom[0] (shape {bottom.shape}) has {tuple(span)} at axes "
            f"{axis}..{axis + operand.num_axes - 1}; they must be equal"
        )
    outer = bottom.count_range(0, axis)
    inner = bottom.count_range(axis + operand.num_axes)
    return axis, outer, operand.count, inner


@register_layer("Bias")
class BiasLayer(Layer):
    r"""Add a bias ``b`` broadcast along ``bottom[0]``'s leading and trailing axes.

    Type ``"Bias"``.  With ``bottom[0]`` viewed as ``(outer, D, inner)`` where
    ``D`` spans axes ``axis .. axis + b.num_axes - 1``,

    .. math:: y_{n,d,i} = x_{n,d,i} + b_d .

    Bottoms
        ``bottom[0]`` : x, any shape;
        ``bottom[1]`` (optional) : b, shape ``x.shape[axis:axis + k]``.
    Tops
        ``top[0]`` : y, shaped like x (in-place allowed).

    Parameters (``bias_param``)
        ``axis`` (1, negative allowed), ``num_axes`` (1; -1 = to the end,
        0 = scalar), ``filler`` (constant 0).  ``num_axes`` and ``filler``
        apply only when b is a learned parameter (a single bottom); a scalar
        b forces ``axis = 0``.

    The bias gradient ``sum_{n,i} dy`` accumulates into a learned parameter
    and overwrites ``bottom[1].diff``.  See docs/layers/bias.md.
    """

    min_bottom_blobs = 1
    max_bottom_blobs = 2
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.bias_param
        if len(bottom) == 2:
            if self.blobs:
                raise LayerSetupError(
                    f"{self.describe()} takes its bias from bottom[1], so it has no "
                    f"parameter blobs; got {len(self.blobs)}"
                )
            return
        if self.blobs:
            if len(self.blobs) != 1:
                raise LayerSetupError(
                    f"{self.describe()} has one parameter blob (the bias); got "
                    f"{len(self.blobs)}"
                )
            return  # loaded or set up before; reshape checks its shape
        shape = learned_param_shape(self, bottom[0], p.axis, p.num_axes, "bias")
        bias = self.make_blob(shape)
        self.fill_blob(bias, p.filler)  # unset filler = constant 0
        self.blobs = [bias]

    def reshape(self, bottom, top):
        bias = bottom[1] if len(bottom) > 1 else self.blobs[0]
        self.axis, self.outer, self.bias_dim, self.inner = broadcast_dims(
            self, bottom[0], bias, self.layer_param.bias_param.axis, "bias"
        )
        if top[0] is not bottom[0]:
            top[0].reshape_like(bottom[0])

    def _views(self, blob, attr):
        return getattr(blob, attr).reshape(self.outer, self.bias_dim, self.inner)

    def forward_cpu(self, bottom, top):
        bias = (bottom[1] if len(bottom) > 1 else self.blobs[0]).data
        b = bias.reshape(1, self.bias_dim, 1)
        y = self._views(top[0], "data")
        if top[0] is bottom[0]:
            y += b
        else:
            self.xp.add(self._views(bottom[0], "data"), b, out=y)

    def backward_cpu(self, top, propagate_down, bottom):
        dy = self._views(top[0], "diff")
        # In place, bottom[0].diff *is* top[0].diff: dx = dy needs no copy.
        if propagate_down[0] and bottom[0] is not top[0]:
            bottom[0].diff[...] = top[0].diff
        if len(bottom) == 1:
            if self.propagates_param(0):
                grad = dy.sum(axis=(0, 2))
                self.blobs[0].diff += grad.reshape(self.blobs[0].shape)
        elif propagate_down[1]:
            grad = dy.sum(axis=(0, 2))
            bottom[1].diff[...] = grad.reshape(bottom[1].shape)
