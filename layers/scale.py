"""Scale: multiply by a learned or given scale, broadcast; optional bias.

Also the two scale bounds of the normalised softmax losses (L2-softmax's
alpha_low, NormFace's loss bound), as small pure functions.

See docs/layers/scale.md.
"""

import math

from netlite.errors import LayerSetupError
from netlite.layer import Layer
from netlite.layers.bias import BiasLayer, broadcast_dims, learned_param_shape
from netlite.proto import netlite_pb2
from netlite.registry import register_layer


@register_layer("Scale")
class ScaleLayer(Layer):
    r"""Multiply ``bottom[0]`` by a scale ``s`` broadcast along the other axes.

    Type ``"Scale"``.  With ``bottom[0]`` viewed as ``(outer, D, inner)``
    where ``D`` spans axes ``axis .. axis + s.num_axes - 1``,

    .. math:: y_{n,d,i} = x_{n,d,i} \, s_d \; (+\, b_d) .

    Bottoms
        ``bottom[0]`` : x, any shape;
        ``bottom[1]`` (optional) : s, shape ``x.shape[axis:axis + k]``.
    Tops
        ``top[0]`` : y, shaped like x (in-place allowed).

    Parameters (``scale_param``)
        ``axis`` (1, negative allowed), ``num_axes`` (1; -1 = to the end,
        0 = scalar), ``filler`` (constant **1** when absent), ``bias_term``
        (false), ``bias_filler`` (constant 0).  ``num_axes`` and ``filler``
        apply only to a learned scale (a single bottom); a scalar s forces
        ``axis = 0``.  ``min_value`` / ``max_value`` (happynear, unset):
        every forward clamps the learned scale *in place* to
        ``[min_value, max_value]`` before using it (learned scale only).

    Parameter blobs are ``[s]`` (learned scale), then the bias ``b`` when
    ``bias_term`` is set; the bias is added by an internal Bias layer, as in
    Caffe.  The scale gradient ``sum_{n,i} dy * x`` always accumulates into a
    learned scale (Caffe overwrites it in some shape cases) and overwrites
    ``bottom[1].diff``.  See docs/layers/scale.md.
    """

    min_bottom_blobs = 1
    max_bottom_blobs = 2
    exact_num_top_blobs = 1

    def __init__(self, layer_param=None, **kwargs):
        super().__init__(layer_param, **kwargs)
        self.bias_layer = None
        # In-place forward overwrites x, which the scale gradient needs.
        self._x_saved = None

    def layer_setup(self, bottom, top):
        p = self.layer_param.scale_param
        learned = len(bottom) == 1
        self._setup_clamp(p, learned)
        expected = int(learned) + int(p.bias_term)
        if len(self.blobs) > expected:
            raise LayerSetupError(
                f"{self.describe()} has {expected} parameter blob(s) "
                f"({'scale' if learned else 'no scale'}"
                f"{', bias' if p.bias_term else ''}); got {len(self.blobs)}"
            )
        if learned and not self.blobs:
            shape = learned_param_shape(self, bottom[0], p.axis, p.num_axes, "scale")
            scale = self.make_blob(shape)
            if p.HasField("filler"):
                self.fill_blob(scale, p.filler)
            else:
                scale.data[...] = 1  # identity by default (Caffe)
            self.blobs = [scale]
        if p.bias_term:
            self._setup_bias(bottom, top, have_bias=len(self.blobs) == expected)

    def _setup_clamp(self, p, learned):
        self.min_value = float(p.min_value) if p.HasField("min_value") else None
        self.max_value = float(p.max_value) if p.HasField("max_value") else None
        bounds = [v for v in (self.min_value, self.max_value) if v is not None]
        if not bounds:
            return
        if not learned:
            raise LayerSetupError(
                f"{self.describe()}: scale_param.min_value / max_value clamp a "
                "learned scale; with the scale given as bottom[1] they would "
                "overwrite another layer's top (happynear does), so netlite "
                "refuses them"
            )
        if not all(math.isfinite(v) for v in bounds):
            raise LayerSetupError(
                f"{self.describe()}: scale_param.min_value / max_value must be "
                f"finite, got min_value {self.min_value}, max_value "
                f"{self.max_value}"
            )
        if len(bounds) == 2 and self.min_value > self.max_value:
            raise LayerSetupError(
                f"{self.describe()}: scale_param.min_value ({self.min_value}) "
                f"is larger than max_value ({self.max_value})"
            )

    def _setup_bias(self, bottom, top, have_bias):
        p = self.layer_param.scale_param
        bias_param = netlite_pb2.LayerParameter()
        bias_param.CopyFrom(self.layer_param)
        bias_param.type = "Bias"
        # The internal layer must not inherit our loss weights, stored blobs or
        # param specs (Caffe copies them; they belong to this layer).
        del bias_param.loss_weight[:]
        del bias_param.blobs[:]
        del bias_param.param[:]
        bias_param.bias_param.axis = p.axis
        bias_param.bias_param.num_axes = (
            bottom[1].num_axes if len(bottom) > 1 else p.num_axes
        )
        bias_param.bias_param.filler.CopyFrom(p.bias_filler)
        self.bias_layer = BiasLayer(bias_param, dtype=self.dtype, device=self.device)
        if have_bias:
            # Loaded (or from an earlier setup): share it, draw nothing.
            self.bias_layer.blobs = [self.blobs[-1]]
        self.bias_layer.setup([bottom[0]], top)
        if not have_bias:
            self.blobs.append(self.bias_layer.blobs[0])

    def reshape(self, bottom, top):
        scale = bottom[1] if len(bottom) > 1 else self.blobs[0]
        self.axis, self.outer, self.scale_dim, self.inner = broadcast_dims(
            self, bottom[0], scale, self.layer_param.scale_param.axis, "scale"
        )
        if top[0] is bottom[0]:
            if self._x_saved is None:
                self._x_saved = self.make_blob()
            self._x_saved.reshape_like(bottom[0])
        else:
            top[0].reshape_like(bottom[0])
        if self.bias_layer is not None:
            self.bias_layer.reshape([top[0]], top)

    def _view(self, array):
        return array.reshape(self.outer, self.scale_dim, self.inner)

    def _scale_blob(self, bottom):
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def clamp_learned_scale(self):
        """happynear: clamp the stored learned scale in place to
        ``[min_value, max_value]`` (the gradient is then taken at the clamped
        value); nothing when neither is set."""
        if self.min_value is not None:
            self.xp.maximum(self.blobs[0].data, self.min_value, out=self.blobs[0].data)
        if self.max_value is not None:
            self.xp.minimum(self.blobs[0].data, self.max_value, out=self.blobs[0].data)

    def forward_cpu(self, bottom, top):
        if top[0] is bottom[0]:
            self._x_saved.data[...] = bottom[0].data
        self.clamp_learned_scale()
        s = self._scale_blob(bottom).data.reshape(1, self.scale_dim, 1)
        self.xp.multiply(self._view(bottom[0].data), s, out=self._view(top[0].data))
        if self.bias_layer is not None:
            self.bias_layer.forward([top[0]], top)

    def backward_cpu(self, top, propagate_down, bottom):
        if self.bias_layer is not None and self.propagates_param(len(self.blobs) - 1):
            self.bias_layer.backward(top, [False], [top[0]])
        scale = self._scale_blob(bottom)
        learned = len(bottom) == 1
        dy = self._view(top[0].diff)
        # The scale gradient reads dy before an in-place bottom diff
        # overwrites it below.
        if (learned and self.propagates_param(0)) or (
            not learned and propagate_down[1]
        ):
            x = self._x_saved if top[0] is bottom[0] else bottom[0]
            grad = (dy * self._view(x.data)).sum(axis=(0, 2)).reshape(scale.shape)
            if learned:
                scale.diff += grad
            else:
                scale.diff[...] = grad
        if propagate_down[0]:
            s = scale.data.reshape(1, self.scale_dim, 1)
            self.xp.multiply(dy, s, out=self._view(bottom[0].diff))

    def forward_numba(self, bottom, top):
        self.adapter("numba").forward(bottom, top)

    def backward_numba(self, top, propagate_down, bottom):
        self.adapter("numba").backward(top, propagate_down, bottom)

    def forward_gpu(self, bottom, top):
        self.adapter("cupy").forward(bottom, top)

    def backward_gpu(self, top, propagate_down, bottom):
        self.adapter("cupy").backward(top, propagate_down, bottom)


def l2_softmax_alpha_low(num_classes, p):
    r"""The L2-softmax lower bound on the feature scale alpha.

    .. math:: \alpha_{low} = \log\frac{p\,(C - 2)}{1 - p}

    (Ranjan et al. 2017): with unit class weights, one class at cos = 1,
    one at cos = -1 and C - 2 orthogonal, the true class reaches softmax
    probability ``p`` only when alpha exceeds it (the e^{-alpha} term
    dropped).  Needs C >= 3 and 0 < p < 1.  See docs/layers/scale.md.
    """
    c, p = int(num_classes), float(p)
    if c < 3 or not 0.0 < p < 1.0:
        raise ValueError(
            f"l2_softmax_alpha_low needs num_classes >= 3 and 0 < p < 1, got "
            f"num_classes {num_classes}, p {p}"
        )
    return math.log(p * (c - 2) / (1.0 - p))


def normface_loss_bound(num_classes, s):
    r"""NormFace's lower bound of the normalised softmax loss at scale s.

    .. math:: L \ge \log\bigl(1 + (C - 1)\,e^{-C s / (C - 1)}\bigr)

    reached when the C class vectors form a regular simplex (K >= C - 1)
    and every feature sits on its class vector.  See docs/layers/scale.md.
    """
    c, s = int(num_classes), float(s)
    if c < 2 or not s >= 0.0:
        raise ValueError(
            f"normface_loss_bound needs num_classes >= 2 and s >= 0, got "
            f"num_classes {num_classes}, s {s}"
        )
    return math.log1p((c - 1) * math.exp(-c * s / (c - 1)))


def normface_min_scale(num_classes, loss):
    r"""The smallest scale s whose NormFace bound allows ``loss``:
    :func:`normface_loss_bound` solved for s,

    .. math:: s = \frac{C - 1}{C}\,\log\frac{C - 1}{e^{L} - 1} .
    """
    c, loss = int(num_classes), float(loss)
    if c < 2 or not 0.0 < loss < math.log(c):
        raise ValueError(
            f"normface_min_scale needs num_classes >= 2 and 0 < loss < log C, "
            f"got num_classes {num_classes}, loss {loss}"
        )
    return (c - 1) / c * math.log((c - 1) / math.expm1(loss))
