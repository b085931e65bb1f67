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

    def target_margin(self, c, cols):
        """The target logits and their slopes for the rows that get a margin.

        Parameters
        ----------
        c : array of float64, shape (R,)
            The target cosines ``x[i, y_i]`` of the margin rows.
        cols : array of int64, shape (R,)
            Their classes ``y_i``.

        Returns
        -------
        value, factor : arrays of float64, shape (R,)
            ``c + b_{y_i}`` (``c`` where the bias does not apply: TEST
            without ``transform_test``, or a target at or below ``-b`` with
            ``only_above_margin``) and the backward's factor, 1 (the bias
            does not depend on ``c``).  The forward and the fused margin
            heads (margin_head.py) both use it.
        """
        xp = self.xp
        factor = xp.ones(c.shape)
        if not self.applies():
            return c, factor
        biases = self.top_values(cols)
        b = biases[cols] if self.class_bias else biases[xp.zeros_like(cols)]
        value = c + b
        if self.only_above_margin:
            value = xp.where(c > -b, value, c)
        return value, factor

    def top_values(self, cols):
        """What ``top[1]`` holds (float64): the bias per class, or the one
        bias at this iteration."""
        xp = self.xp
        if self.class_bias:
            return xp.asarray(self.class_bias, dtype=xp.float64)
        return xp.full((1,), self.current_bias(), dtype=xp.float64)

    # --------------------------------------------------------- reference
    def forward_cpu(self, bottom, top):
        check_finite(self, bottom[0])
        rows, cols = margin_rows(self, bottom[1], self.channels, self.ignore_label)
        if len(top) > 1:
            top[1].data[...] = self.top_values(cols).astype(self.dtype)
        if top[0] is not bottom[0]:
            top[0].data[...] = bottom[0].data
        z = top[0].data.reshape(self.num, self.channels)
        value, _ = self.target_margin(z[rows, cols].astype(self.xp.float64), cols)
        z[rows, cols] = value.astype(self.dtype)

    def backward_cpu(self, top, propagate_down, bottom):
        self.check_no_label_backward(propagate_down)
        if propagate_down[0] and top[0] is not bottom[0]:
            bottom[0].diff[...] = top[0].diff

    def forward_numba(self, bottom, top):
        self.adapter("numba").forward(bottom, top)

    def backward_numba(self, top, propagate_down, bottom):
        self.adapter("numba").backward(top, propagate_down, bottom)

    def forward_gpu(self, bottom, top):
        self.adapter("cupy").forward(bottom, top)

    def backward_gpu(self, top, propagate_down, bottom):
        self.adapter("cupy").backward(top, propagate_down, bottom)
