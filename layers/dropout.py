"""Dropout: inverted dropout in TRAIN, identity in TEST.

See docs/layers/dropout.md.
"""

from netlite import rng
from netlite.errors import LayerSetupError
from netlite.layer import TRAIN, NeuronLayer
from netlite.registry import register_layer


@register_layer("Dropout")
class DropoutLayer(NeuronLayer):
    r"""Zero each element with probability ``p`` and rescale the survivors.

    Type ``"Dropout"``.  Bottom and top: any shape, the same (in-place
    allowed).  Parameter: ``dropout_param.dropout_ratio`` ``p`` (default
    0.5, in ``[0, 1)``).

    In the TRAIN phase a fresh mask :math:`m_i \sim \mathrm{Bernoulli}(1 - p)`
    is drawn from the global generator (:func:`netlite.rng.get_rng`) at
    every forward, and

    .. math:: y_i = x_i \, m_i / (1 - p) , \qquad
              \partial E / \partial x_i = \partial E / \partial y_i \, m_i / (1 - p)

    with the mask of the last forward.  In the TEST phase both directions
    copy.  The mask is drawn on the host (also on the GPU engine, then
    copied), so a seed gives the same mask everywhere, and the gradient
    checker's reseeding before each forward reproduces it.  See
    docs/layers/dropout.md.
    """

    def layer_setup(self, bottom, top):
        ratio = float(self.layer_param.dropout_param.dropout_ratio)
        if not 0.0 <= ratio < 1.0:
            raise LayerSetupError(
                f"{self.describe()}: dropout_ratio must be in [0, 1), got {ratio}"
            )
        self.ratio = ratio
        self.scale = 1.0 / (1.0 - ratio)
        self._mask = None

    def forward_cpu(self, bottom, top):
        x = bottom[0].data
        if self.phase != TRAIN:
            if top[0] is not bottom[0]:
                top[0].data[...] = x
            return
        # u >= p has probability 1 - p; the kept entries carry the scale
        # so that forward and backward are one multiplication each.
        keep = rng.get_rng().random(x.shape) >= self.ratio
        mask = keep * self.dtype.type(self.scale)
        self._mask = self.xp.asarray(mask.astype(self.dtype, copy=False))
        top[0].data[...] = x * self._mask

    def backward_cpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = top[0].diff
        if self.phase != TRAIN:
            if top[0] is not bottom[0]:
                bottom[0].diff[...] = dy
            return
        if self._mask is None or self._mask.shape != dy.shape:
            raise RuntimeError(
                f"{self.describe()}: backward in the TRAIN phase needs the mask "
                "of a forward pass on blobs of this shape"
            )
        bottom[0].diff[...] = dy * self._mask
