"""LabelSpecificMargin: the angular (ArcFace / combined) margin on the
target logit.

See docs/layers/label_specific_margin.md.
"""

import math

from netlite.errors import LayerSetupError
from netlite.layer import TEST, LabelledLayer
from netlite.layers._additive_margin import (
    anneal,
    check_field,
    check_finite,
    ignore_label_of,
    margin_rows,
    reshape_margin_layer,
    warn_once,
)
from netlite.proto import netlite_pb2
from netlite.registry import register_layer

__all__ = ["DELTA_MAX", "LabelSpecificMarginLayer", "psi", "psi_prime"]

P = netlite_pb2.LabelSpecificMarginParameter
#: Clamp of c in the exact derivative: |c| <= 1 - EPS[dtype].
EPS = {"float32": 1e-4, "float64": 1e-7}
#: Clamp of c in happynear's CLAMPED gradient (its value, every dtype).
CLAMPED_EPS = 1e-4
#: The largest angular margin delta at the th/mm threshold for which the
#: fallback stays below the margin branch: the root of
#: cos(delta) + delta sin(delta) = 1 in (pi/2, pi) (133.56 degrees).
DELTA_MAX = 2.3311223704144224


def psi(xp, c, m1, m2, m3, boundary):
    """The target logit psi(c) and the mask of rows past the margin branch.

    ``c`` float64; ``m1``, ``m2`` (radians), ``m3`` float64 arrays or
    scalars.  Returns ``(psi, fallback)``: ``fallback`` marks the rows where
    the th/mm fallback (THMM) or the unchanged cosine (EASY) is used.
    """
    cbar = xp.clip(c, -1.0, 1.0)
    theta = xp.arccos(cbar)
    a = m1 * theta + m2
    out = xp.cos(a) - m3
    if boundary == P.THMM:
        fallback = a > math.pi  # theta > theta* = (pi - m2) / m1
        delta = math.pi - (math.pi - m2) / m1  # the angular margin at theta*
        mm = delta * xp.sin(delta)
        out = xp.where(fallback, cbar - mm - m3, out)
    elif boundary == P.EASY:
        fallback = ~(cbar > 0)
        out = xp.where(fallback, c, out)
    else:
        fallback = xp.zeros(c.shape, dtype=bool)
    return out, fallback


def psi_prime(xp, c, m1, m2, eps):
    r"""d psi / dc of the margin branch, finite for every c.

    .. math:: \psi'(c) = m_1 \Big[\cos m_2\,\frac{\sin m_1\theta}{\sin\theta}
              + \sin m_2\,\frac{\cos m_1\theta}{\sin\theta}\Big]

    The first ratio tends to ``m1`` at theta = 0 and is evaluated as a
    ratio of sinc functions (exact there; 1 when m1 = 1); where it or the
    second term diverge (theta -> pi, and theta -> 0 when m2 != 0), c is
    held at ``+-(1 - eps)``.
    """
    ce = xp.clip(c, -1.0 + eps, 1.0 - eps)
    te = xp.arccos(ce)
    sin_te = xp.sqrt((1.0 - ce) * (1.0 + ce))
    theta = xp.where(c > 0, xp.arccos(xp.clip(c, -1.0, 1.0)), te)
    ratio = xp.where(m1 == 1, 1.0,
                     m1 * xp.sinc(m1 * theta / math.pi) / xp.sinc(theta / math.pi))
    return m1 * (xp.cos(m2) * ratio + xp.sin(m2) * xp.cos(m1 * te) / sin_te)


@register_layer("LabelSpecificMargin")
class LabelSpecificMarginLayer(LabelledLayer):
    r"""Replace each row's target cosine ``c`` by ``psi(c)``.

    Type string ``"LabelSpecificMargin"`` (happynear/caffe-windows,
    experiment branch).  With ``bottom[0]`` read as ``(N, C)`` and labels
    ``y``, ``z_ij = x_ij`` except at ``j = y_i`` for rows not carrying
    ``loss_param.ignore_label``:

    .. math:: \psi(c) = \cos(m_1 \theta + m_2) - m_3, \qquad \theta = \arccos c

    (InsightFace's combined margin), with the ``boundary`` handling past
    ``m_1 \theta + m_2 = \pi``.  The backward multiplies the target's top
    diff by ``psi'(c)`` (``grad_mode`` EXACT), by 1 (STRAIGHT_THROUGH) or
    by happynear's clamped factor (CLAMPED).

    Bottoms: ``bottom[0]`` cosines ``(N, ...)``; ``bottom[1]`` labels.
    Tops: ``top[0]`` like ``bottom[0]`` (in place allowed); optional
    ``top[1]`` the current margin in ``unit`` (SOFT: the multiplier),
    shape ``(1,)`` (``(C,)`` with ``class_margin``).

    Parameters (``label_specific_margin_param``)
        ``type`` HARD (``m2`` = the margin) | SOFT (``m1`` = the margin);
        ``margin_base`` (annealed when set: ``margin_base + (1 + gamma
        t)^power - 1``, capped by ``margin_max`` when that is set),
        ``gamma``, ``power``, ``iteration``, ``margin_on_test``,
        ``pass_bp`` (= STRAIGHT_THROUGH); netlite: ``m1``, ``m3``, ``unit``
        (DEGREE), ``boundary`` (THMM), ``grad_mode`` (EXACT),
        ``class_margin``.  ``auto_tune`` and ``reset_margin`` are rejected.
    """

    min_top_blobs = 1
    max_top_blobs = 2

    def layer_setup(self, bottom, top):
        p = self.layer_param.label_specific_margin_param
        for field, why in (
                ("auto_tune", "the fork's statistics-driven margin (a 3-value "
                 "blob, an EMA started at its iteration 1, unclamped acos) is "
                 "not implemented"),
                ("reset_margin", "the fork declares it but its code never "
                 "reads it")):
            if getattr(p, field):
                raise LayerSetupError(
                    f"{self.describe()}: {field}: true is not supported: {why}")
        self.ignore_label = ignore_label_of(self)
        self.soft = p.type == P.SOFT
        self.to_radians = 1.0 if p.unit == P.RADIAN else math.pi / 180.0
        self.boundary = p.boundary
        self.grad_mode = p.grad_mode
        if p.pass_bp:
            if p.HasField("grad_mode") and p.grad_mode != P.STRAIGHT_THROUGH:
                raise LayerSetupError(
                    f"{self.describe()}: pass_bp: true is grad_mode: "
                    f"STRAIGHT_THROUGH; it contradicts grad_mode: "
                    f"{P.GradMode.Name(p.grad_mode)}")
            self.grad_mode = P.STRAIGHT_THROUGH
        if self.soft and p.HasField("m1"):
            raise LayerSetupError(
                f"{self.describe()}: type: SOFT takes its multiplicative margin "
                "m1 from margin_base / class_margin; do not also set m1")
        self.m1 = float(p.m1)
        check_field(self, "m1", self.m1, low=0.0, low_open=True)
        self.m3 = float(p.m3)
        check_field(self, "m3", self.m3, low=0.0,
                    why="m3 is subtracted from the target cosine")
        self.margin_on_test = bool(p.margin_on_test)
        self.anneal = p.HasField("margin_base")
        self.has_max = p.HasField("margin_max")
        self.offset = int(p.iteration)
        self.class_margin = [float(v) for v in p.class_margin]
        if self.class_margin:
            if self.anneal:
                raise LayerSetupError(
                    f"{self.describe()}: class_margin gives the per-class "
                    "margins; do not also set margin_base")
            for j, v in enumerate(self.class_margin):
                self.check_margin(v, f"class_margin[{j}]")
        if self.anneal:
            for name in ("margin_base", "gamma", "power"):
                check_field(self, name, float(getattr(p, name)))
            if self.has_max:
                check_field(self, "margin_max", float(p.margin_max), low=0.0)
            elif p.gamma * p.power > 0:
                warn_once(self, "unbounded", (
                    f"the margin margin_base + (1 + gamma t)^power - 1 grows "
                    f"without bound (gamma {p.gamma:g}, power {p.power:g}; "
                    "with the defaults gamma 1, power 1 it is margin_base + t); "
                    "set gamma: 0 for a fixed margin or margin_max to cap it"))

    def check_margin(self, value, what):
        """LayerSetupError unless ``value`` (in the layer's unit; SOFT: the
        multiplier) is a valid margin."""
        if self.soft:
            check_field(self, what, value, low=0.0,
                        why="the SOFT margin multiplies theta; 0 means none")
        else:
            half_turn = math.pi / self.to_radians
            check_field(self, what, value, low=0.0, why="a negative margin")
            if value >= half_turn:
                raise LayerSetupError(
                    f"{self.describe()}: {what} = {value!r} must be below "
                    f"{half_turn:g} (pi in the layer's unit)")

    def reshape(self, bottom, top):
        reshape_margin_layer(self, bottom, top, "class_margin", self.class_margin)

    def current_margin(self):
        """The scalar margin at ``self.iteration`` in the layer's unit
        (SOFT: the multiplier), float64; 0 unless ``margin_base`` is set."""
        p = self.layer_param.label_specific_margin_param
        if not self.anneal:
            return 0.0
        t = self.offset + self.iteration
        m = anneal(self, float(p.margin_base), float(p.gamma), float(p.power),
                   t, "")
        if self.has_max:
            m = min(m, float(p.margin_max))
        self.check_margin(m, f"the annealed margin at t = {t}")
        return m

    def applies(self):
        """Whether the margin is applied in this phase (TEST: margin_on_test)."""
        return self.phase != TEST or self.margin_on_test

    def margins(self, cols):
        """Per-row ``(m1, m2)`` (m2 in radians) and the margins (unit) for
        top[1]."""
        xp = self.xp
        if self.class_margin:
            values = xp.asarray(self.class_margin, dtype=xp.float64)
            m = values[cols]
        else:
            values = xp.full((1,), self.current_margin(), dtype=xp.float64)
            m = xp.broadcast_to(values, cols.shape)
        if self.soft:
            m1, m2 = xp.where(m == 0, 1.0, m), xp.zeros(cols.shape)
        else:
            m1, m2 = xp.full(cols.shape, self.m1), m * self.to_radians
        return m1, m2, values

    def warn_if_not_monotonic(self, m1, m2):
        """Warn once when psi is not monotonic for some row's margins."""
        if m1.size == 0:
            return
        xp = self.xp
        if self.boundary == P.THMM:
            theta_star = (math.pi - m2) / m1
            delta = xp.where(theta_star < math.pi, math.pi - theta_star, 0.0)
            worst = float(delta.max())
            if worst > DELTA_MAX:
                warn_once(self, "monotonic", (
                    f"psi is not monotonic: at th = cos(theta*) the th/mm "
                    f"fallback c - mm - m3 (mm = delta sin delta) jumps above "
                    f"the margin branch, with the angular margin at the "
                    f"threshold delta = {math.degrees(worst):.4g} deg; it stays "
                    f"monotonic for delta <= {math.degrees(DELTA_MAX):.4f} deg "
                    f"({DELTA_MAX:.6f} rad)"))
            return
        end = math.pi if self.boundary == P.NONE else math.pi / 2
        reach = m1 * end + m2
        worst = float(reach.max())
        if worst > math.pi:
            i = int(xp.argmax(reach))
            turn = (math.pi - float(m2[i])) / float(m1[i])
            warn_once(self, "monotonic", (
                f"psi(theta) = cos(m1 theta + m2) - m3 rises again for theta > "
                f"(pi - m2) / m1 = {math.degrees(turn):.4g} deg (m1 = "
                f"{float(m1[i]):g}, m2 = {float(m2[i]):.6g} rad); with boundary "
                f"{P.Boundary.Name(self.boundary)} it stays monotonic for "
                f"m1 * {math.degrees(end):g} deg + m2 <= 180 deg"))

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
            ``z_{i y_i}`` (``psi(c)``, the fallback past the branch, ``c``
            with no margin or when the margin does not apply) and the factor
            the backward multiplies ``dz`` by (the slope of ``grad_mode``,
            1 where ``z = c`` or on the fallback).  The forward and the
            fused margin heads (margin_head.py) both use it.
        """
        xp = self.xp
        if not self.applies():
            return c, xp.ones(c.shape)
        m1, m2, _ = self.margins(cols)
        self.warn_if_not_monotonic(m1, m2)
        none = (m1 == 1) & (m2 == 0) & (self.m3 == 0)  # no margin: z = c
        value, fallback = psi(xp, c, m1, m2, self.m3, self.boundary)
        value = xp.where(none, c, value)
        keep = ~(fallback | none)  # rows whose factor is psi'(c)
        if self.grad_mode == P.EXACT:
            slope = psi_prime(xp, c, m1, m2, EPS[self.dtype.name])
        elif self.grad_mode == P.CLAMPED:
            slope = xp.clip(psi_prime(xp, c, m1, m2, CLAMPED_EPS), 0.0, 2.0)
        else:  # STRAIGHT_THROUGH
            slope = xp.ones(c.shape)
        return value, xp.where(keep, slope, 1.0)

    def top_values(self, cols):
        """What ``top[1]`` holds: the margin per class, or the one margin."""
        return self.margins(cols)[2]

    # --------------------------------------------------------- reference
    def forward_cpu(self, bottom, top):
        xp = self.xp
        check_finite(self, bottom[0])
        rows, cols = margin_rows(self, bottom[1], self.channels, self.ignore_label)
        if len(top) > 1:
            top[1].data[...] = self.top_values(cols).astype(self.dtype)
        x = bottom[0].data.reshape(self.num, self.channels)
        c = x[rows, cols].astype(xp.float64)
        if top[0] is not bottom[0]:
            top[0].data[...] = bottom[0].data
        self._rows, self._cols = rows, cols
        value, self._factor = self.target_margin(c, cols)
        z = top[0].data.reshape(self.num, self.channels)
        z[rows, cols] = value.astype(self.dtype)

    def backward_cpu(self, top, propagate_down, bottom):
        self.check_no_label_backward(propagate_down)
        if not propagate_down[0]:
            return
        if top[0] is not bottom[0]:
            bottom[0].diff[...] = top[0].diff
        dx = bottom[0].diff.reshape(self.num, self.channels)
        rows, cols = self._rows, self._cols
        dx[rows, cols] = (dx[rows, cols] * self._factor).astype(self.dtype)

    def forward_numba(self, bottom, top):
        self.adapter("numba").forward(bottom, top)

    def backward_numba(self, top, propagate_down, bottom):
        self.adapter("numba").backward(top, propagate_down, bottom)

    def forward_gpu(self, bottom, top):
        self.adapter("cupy").forward(bottom, top)

    def backward_gpu(self, top, propagate_down, bottom):
        self.adapter("cupy").backward(top, propagate_down, bottom)
