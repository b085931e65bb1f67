"""HingeLoss: one-vs-all hinge (L1) or squared hinge (L2) loss.

See docs/layers/hinge_loss.md.
"""

from netlite.errors import LayerSetupError, ShapeError
from netlite.layer import LossLayer
from netlite.layers._labels import label_codes
from netlite.proto import netlite_pb2
from netlite.registry import register_layer

L1 = netlite_pb2.HingeLossParameter.L1
L2 = netlite_pb2.HingeLossParameter.L2


@register_layer("HingeLoss")
class HingeLossLayer(LossLayer):
    r"""One-vs-all hinge loss over ``D`` classes.

    Type ``"HingeLoss"``.  With ``t_{nk} = +1`` for the true class
    ``k = l_n`` and ``-1`` otherwise, and margins
    ``m_{nk} = max(0, 1 - t_{nk} x_{nk})``,

    .. math:: E = \frac{1}{N} \sum_{n,k} m_{nk}
       \quad\text{(L1)}, \qquad
       E = \frac{1}{N} \sum_{n,k} m_{nk}^2 \quad\text{(L2, no 1/2)} .

    Bottoms
        ``bottom[0]`` : x, shape ``(N, ...)``; the ``D = count / N`` values
        of a sample are its class scores;
        ``bottom[1]`` : labels, N integer values in ``[0, D)``.
    Tops
        ``top[0]`` : E, a scalar (0 axes).

    Parameters (``hinge_loss_param``)
        ``norm``: ``L1`` (default) or ``L2``.

    Unlike Caffe, forward keeps the margins in a private buffer rather than
    in ``bottom[0].diff``.  See docs/layers/hinge_loss.md.
    """

    def __init__(self, layer_param=None, **kwargs):
        super().__init__(layer_param, **kwargs)
        self._margin = None  # m = max(0, 1 - t * x), shape (N, D), from forward
        self._labels = None  # int64 labels of the last forward

    def layer_setup(self, bottom, top):
        super().layer_setup(bottom, top)
        self.norm = self.layer_param.hinge_loss_param.norm
        if self.norm not in (L1, L2):
            raise LayerSetupError(f"{self.describe()}: unknown norm {self.norm}")

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        if bottom[0].num_axes < 1 or bottom[0].shape[0] == 0:
            raise ShapeError(
                f"{self.describe()}: bottom[0] must have a non-empty first axis "
                f"(samples); got shape {bottom[0].shape}"
            )
        self.num = bottom[0].shape[0]
        self.dim = bottom[0].count // self.num
        if bottom[1].count != self.num:
            raise ShapeError(
                f"{self.describe()}: bottom[1] (labels, shape {bottom[1].shape}) "
                f"must hold one label per sample ({self.num}), got "
                f"{bottom[1].count}"
            )

    def forward_cpu(self, bottom, top):
        xp = self.xp
        labels = label_codes(self, bottom[1], self.dim)
        x = bottom[0].data.reshape(self.num, self.dim)
        rows = xp.arange(self.num)
        # m = 1 - t x: 1 + x off the label, 1 - x on it.
        margin = 1 + x
        margin[rows, labels] = 1 - x[rows, labels]
        xp.maximum(margin, 0, out=margin)
        self._margin, self._labels = margin, labels
        if self.norm == L1:
            loss = margin.sum()
        else:
            loss = xp.vdot(margin, margin)
        top[0].data[...] = loss / self.num

    def backward_cpu(self, top, propagate_down, bottom):
        self.check_no_label_backward(propagate_down)
        if not propagate_down[0]:
            return
        if self._margin is None:
            raise RuntimeError(f"{self.describe()}: backward before forward")
        xp = self.xp
        rows = xp.arange(self.num)
        m = self._margin
        # dE/dx = -t * dE/dm; dE/dm = 1[m > 0] (L1) or 2m (L2), times w / N.
        if self.norm == L1:
            g = (m > 0).astype(m.dtype)
        else:
            g = 2 * m
        g[rows, self._labels] *= -1
        g *= top[0].diff / self.num  # the loss weight lives in the top diff
        bottom[0].diff[...] = g.reshape(bottom[0].shape)
