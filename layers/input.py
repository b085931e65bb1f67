"""Input: tops that the caller fills (``net.forward(data=...)``).

See docs/layers/input.md.
"""

from netlite.errors import LayerSetupError
from netlite.layer import Layer
from netlite.registry import register_layer


@register_layer("Input")
class InputLayer(Layer):
    """Provide net inputs of a declared shape.

    ``input_param { shape { dim: ... } }`` is given once (every top gets
    that shape), once per top, or not at all (tops stay empty until the
    caller reshapes them).  Forward and backward do nothing: the caller
    writes the data, and the diffs are the net's input gradients.
    """

    exact_num_bottom_blobs = 0
    min_top_blobs = 1

    def layer_setup(self, bottom, top):
        shapes = self.layer_param.input_param.shape
        if len(shapes) not in (0, 1, len(top)):
            raise LayerSetupError(
                f"{self.describe()}: input_param.shape must be given 0, 1 or "
                f"{len(top)} (once per top) times, got {len(shapes)}"
            )
        for i, blob in enumerate(top):
            if shapes:
                shape = shapes[i if len(shapes) > 1 else 0]
                try:
                    blob.reshape(shape)
                except ValueError as exc:
                    raise LayerSetupError(
                        f"{self.describe()}: bad input_param.shape for top[{i}]: "
                        f"{exc}"
                    ) from None

    def reshape(self, bottom, top):
        # The caller owns the input shapes (Caffe's Input does the same).
        pass

    def forward_cpu(self, bottom, top):
        pass

    def backward_cpu(self, top, propagate_down, bottom):
        pass
