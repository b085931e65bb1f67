"""Silence: consume blobs that nothing else uses, so they are not outputs.

See docs/layers/silence.md.
"""

from netlite.layer import Layer
from netlite.registry import register_layer


@register_layer("Silence")
class SilenceLayer(Layer):
    """Swallow any number of bottoms; produce nothing.

    Type ``"Silence"``.  A net reports every blob that no layer consumes as
    an output; a Silence layer consumes unwanted ones (for example a data
    layer's label in a deploy-style net).

    Bottoms
        ``bottom[k]`` : any shapes, at least one.
    Tops
        none.

    Forward does nothing.  Backward writes zeros into the diff of every
    bottom with ``propagate_down[k]`` set: the objective does not depend on
    a silenced blob, so its gradient is 0 (Caffe does the same).
    See docs/layers/silence.md.
    """

    min_bottom_blobs = 1
    exact_num_top_blobs = 0

    def reshape(self, bottom, top):
        pass

    def forward_cpu(self, bottom, top):
        pass

    def backward_cpu(self, top, propagate_down, bottom):
        for b, down in zip(bottom, propagate_down):
            if down:
                b.diff[...] = 0
