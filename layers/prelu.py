"""PReLU: ReLU with a learned negative slope per channel (or one shared).

See docs/layers/prelu.md.
"""

import math

from netlite.errors import LayerSetupError, ShapeError
from netlite.layer import NeuronLayer
from netlite.proto import netlite_pb2
from netlite.registry import register_layer


@register_layer("PReLU")
class PReLULayer(NeuronLayer):
    r"""Parametric ReLU (He et al., 2015).

    Type ``"PReLU"``.  With x viewed as ``(N, C, D)``, ``D = count(2)``,

    .. math:: y_{n,c,d} = \max(x_{n,c,d}, 0) + a_c \min(x_{n,c,d}, 0) ,

    where :math:`a` has one entry per channel, or a single entry shared by
    all channels.

    Bottoms
        ``bottom[0]`` : x, shape ``(N, C, ...)`` with at least 2 axes.
    Tops
        ``top[0]`` : y, shaped like x.  In-place is allowed (forward keeps a
        copy of x for backward).

    Parameters (``prelu_param``)
        ``filler`` (default: constant 0.25, as Caffe), ``channel_shared``
        (default false).

    Parameter blobs
        ``blobs[0]`` : a, shape ``(C,)``, or ``()`` when ``channel_shared``.

    Backward accumulates :math:`\partial E/\partial a_c = \sum_{n,d} dy \,
    x \, [x \le 0]` into ``blobs[0].diff`` and writes
    :math:`dx = dy\,([x > 0] + a_c [x \le 0])`.  See docs/layers/prelu.md.
    """

    def __init__(self, layer_param=None, **kwargs):
        super().__init__(layer_param, **kwargs)
        self.channel_shared = bool(self.layer_param.prelu_param.channel_shared)
        # Copy of x for in-place use (forward overwrites bottom.data with y).
        self._bottom_memory = None

    def layer_setup(self, bottom, top):
        x = bottom[0]
        self._check_axes(x)
        channels = x.shape[1]
        expected = 1 if self.channel_shared else channels
        if not self.blobs:
            p = self.layer_param.prelu_param
            if p.HasField("filler"):
                filler = p.filler
            else:
                filler = netlite_pb2.FillerParameter(type="constant", value=0.25)
            slope = self.make_blob(() if self.channel_shared else (channels,))
            self.fill_blob(slope, filler)
            self.blobs = [slope]
        if len(self.blobs) != 1 or self.blobs[0].count != expected:
            got = [b.shape for b in self.blobs]
            mode = "channel_shared" if self.channel_shared else "one per channel"
            raise LayerSetupError(
                f"{self.describe()}: expected one slope blob with {expected} "
                f"element(s) ({mode}), got blobs of shapes {got}"
            )

    def reshape(self, bottom, top):
        x = bottom[0]
        self._check_axes(x)
        if not self.channel_shared and x.shape[1] != self.blobs[0].count:
            raise ShapeError(
                f"{self.describe()}: bottom[0] has {x.shape[1]} channels "
                f"(shape {x.shape}) but the slope blob has {self.blobs[0].count}"
            )
        top[0].reshape_like(x)
        if top[0] is x:
            if self._bottom_memory is None or self._bottom_memory.shape != x.shape:
                self._bottom_memory = self.xp.empty(x.shape, dtype=x.dtype)
        else:
            self._bottom_memory = None

    def _check_axes(self, x):
        if x.num_axes < 2:
            raise ShapeError(
                f"{self.describe()}: bottom[0] needs at least 2 axes (N, C, ...), "
                f"got shape {x.shape}"
            )

    def _slopes(self):
        """The slopes shaped to broadcast against x viewed as (N, C, D)."""
        a = self.blobs[0].data
        return a.reshape(1, -1, 1) if not self.channel_shared else a.reshape(1, 1, 1)

    @staticmethod
    def _as_ncd(array):
        n, c = array.shape[:2]
        return array.reshape(n, c, math.prod(array.shape[2:]))

    def forward_cpu(self, bottom, top):
        xp = self.xp
        x = self._as_ncd(bottom[0].data)
        if top[0] is bottom[0]:
            self._bottom_memory[...] = bottom[0].data
        positive = x > 0
        # x * 1 == x, and x * a rounds exactly as Caffe's a * min(x, 0), so
        # this equals max(x, 0) + a * min(x, 0) bit for bit.
        factor = xp.where(positive, self.dtype.type(1), self._slopes())
        xp.multiply(x, factor, out=self._as_ncd(top[0].data))

    def backward_cpu(self, top, propagate_down, bottom):
        xp = self.xp
        if top[0] is bottom[0]:
            x = self._as_ncd(self._bottom_memory)
        else:
            x = self._as_ncd(bottom[0].data)
        dy = self._as_ncd(top[0].diff)
        positive = x > 0
        # In place, dy and dx share a buffer: the slope gradient reads dy
        # before dx overwrites it.
        if self.propagates_param(0):
            g = dy * x
            g[positive] = 0
            if self.channel_shared:
                self.blobs[0].diff[...] += g.sum()
            else:
                self.blobs[0].diff[...] += g.sum(axis=(0, 2))
        if propagate_down[0]:
            factor = xp.where(positive, self.dtype.type(1), self._slopes())
            xp.multiply(dy, factor, out=self._as_ncd(bottom[0].diff))
