"""Scale: multiply by a learned or given scale, broadcast; optional bias.

See docs/layers/scale.md.
"""

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
        ``axis = 0``.

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

    def forward_cpu(self, bottom, top):
        if top[0] is bottom[0]:
            self._x_saved.data[...] = bottom[0].data
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
