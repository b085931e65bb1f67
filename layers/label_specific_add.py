"""LabelSpecificAdd: add a bias to the target logit (AM-Softmax / CosFace).

See docs/layers/label_specific_add.md.
"""

from netlite.errors import LayerSetupError
from netlite.layer import TEST, LabelledLayer
from netlite.layers._additive_margin import (
    anneal,
    check_field,
    check_finite,
    ignore_label_of,
    margin_rows,
    reshape_margin_layer,
)
from netlite.registry import register_layer

__all__ = ["LabelSpecificAddLayer"]


@register_layer("LabelSpecificAdd")
class LabelSpecificAddLayer(LabelledLayer):
    r"""Add ``b = -m`` to each row's target cosine.

    Type string ``"LabelSpecificAdd"`` (happynear/caffe-windows).  With
    ``bottom[0]`` read as ``(N, C)`` (Caffe's ``num x count/num``) and
    labels ``y``,

    .. math:: z_{ij} = x_{ij} + [j = y_i]\,[i \in R]\,b_{y_i},
              \qquad \partial E/\partial x = \partial E/\partial z

    where ``R`` are the rows whose label is not ``loss_param.ignore_label``
    (and, with ``only_above_margin``, whose target exceeds ``-b``).

    Bottoms: ``bottom[0]`` cosines ``(N, ...)``; ``bottom[1]`` labels,
    ``N`` of them.  Tops: ``top[0]`` like ``bottom[0]`` (in place allowed);
    optional ``top[1]`` the current bias, shape ``(1,)`` (``(C,)`` with
    ``class_bias``).

    Parameters (``label_specific_add_param``)
        ``bias`` (0; must be <= 0: a positive bias is a negative margin),
        ``transform_test`` (false: no bias in TEST), annealing
        ``bias_base`` (active when set), ``bias_gamma``, ``bias_power``,
        ``bias_min``, ``bias_max``, ``iteration`` (offset added to the
        solver's iteration), and the netlite extensions
        ``only_above_margin`` (happynear's rule) and ``class_bias``.

    Raises
    ------
    LayerSetupError
        For a bad parameter (non-finite, positive bias, bias_min >
        bias_max, class_bias with bias or bias_base).
    ShapeError
        Label count not ``N``; class_bias length not ``C``.
    LabelError
        A label outside ``[0, C)`` that is not ``ignore_label``.
    NonFiniteError
        A NaN or infinite cosine.
    """

    min_top_blobs = 1
    max_top_blobs = 2

    def layer_setup(self, bottom, top):
        p = self.layer_param.label_specific_add_param
        self.ignore_label = ignore_label_of(self)
        self.only_above_margin = bool(p.only_above_margin)
        self.transform_test = bool(p.transform_test)
        self.anneal = p.HasField("bias_base")
        self.class_bias = [float(v) for v in p.class_bias]
        self.offset = int(p.iteration)
        why = "the bias is -m; a positive bias is a negative margin"
        if self.class_bias:
            if p.HasField("bias") or self.anneal:
                raise LayerSetupError(
                    f"{self.describe()}: class_bias gives the per-class biases; "
                    "do not also set bias or bias_base")
            for j, v in enumerate(self.class_bias):
                check_field(self, f"class_bias[{j}]", v, high=0.0, why=why)
        elif self.anneal:
            for name in ("bias_base", "bias_gamma", "bias_power", "bias_min"):
                check_field(self, name, float(getattr(p, name)))
            check_field(self, "bias_max", float(p.bias_max), high=0.0, why=why)
            if p.bias_min > p.bias_max:
                raise LayerSetupError(
                    f"{self.describe()}: bias_min = {p.bias_min!r} exceeds "
                    f"bias_max = {p.bias_max!r}; the annealed bias is clipped "
                    "to [bias_min, bias_max]")
        else:
            check_field(self, "bias", float(p.bias), high=0.0, why=why)

    def reshape(self, bottom, top):
        reshape_margin_layer(self, bottom, top, "class_bias", self.class_bias)

    def current_bias(self):
        """The scalar bias ``b`` at ``self.iteration`` (float64).

        The annealed bias is happynear's
        ``clip(bias_base + (1 + bias_gamma t)^bias_power - 1, bias_min,
        bias_max)`` with ``t = iteration + self.iteration``.
        """
        p = self.layer_param.label_specific_add_param
        if not self.anneal:
            return float(p.bias)
        t = self.offset + self.iteration
        b = anneal(self, float(p.bias_base), float(p.bias_gamma),
                   float(p.bias_power), t, "bias_")
        return min(max(b, float(p.bias_min)), float(p.bias_max))

    def applies(self):
        """Whether the bias is added in this phase (TEST: ``transform_test``)."""
        return self.phase != TEST or self.transform_test

    # --------------------------------------------------------- reference
    def forward_cpu(self, bottom, top):
        xp = self.xp
        check_finite(self, bottom[0])
        rows, cols = margin_rows(self, bottom[1], self.channels, self.ignore_label)
        if self.class_bias:
            biases = xp.asarray(self.class_bias, dtype=xp.float64)
        else:
            b = self.current_bias()
            biases = xp.full((1,), b, dtype=xp.float64)
        if len(top) > 1:
            top[1].data[...] = biases.astype(self.dtype)
        if top[0] is not bottom[0]:
            top[0].data[...] = bottom[0].data
        if not self.applies():
            return
        z = top[0].data.reshape(self.num, self.channels)
        b = biases[cols] if self.class_bias else biases[xp.zeros_like(cols)]
        target = z[rows, cols]
        if self.only_above_margin:
            keep = target.astype(xp.float64) > -b
            rows, cols, b, target = rows[keep], cols[keep], b[keep], target[keep]
        z[rows, cols] = (target.astype(xp.float64) + b).astype(self.dtype)

    def backward_cpu(self, top, propagate_down, bottom):
        self.check_no_label_backward(propagate_down)
        if propagate_down[0] and top[0] is not bottom[0]:
            bottom[0].diff[...] = top[0].diff
