r"""FusedMarginHead: a normalised margin head run as one computation.

See docs/layers/fused_margin_head.md.
"""

import logging

import numpy as np

from netlite import fusion
from netlite.errors import LayerSetupError
from netlite.layer import EngineAdapter, Layer
from netlite.layers._additive_margin import margin_rows
from netlite.layers._labels import FLT_MIN
from netlite.layers.inner_product import WEIGHT_NORM_EPS, InnerProductLayer
from netlite.layers.label_specific_add import LabelSpecificAddLayer
from netlite.layers.label_specific_margin import LabelSpecificMarginLayer
from netlite.layers.scale import ScaleLayer
from netlite.layers.softmax_loss import SoftmaxWithLossLayer
from netlite.proto import netlite_pb2
from netlite.registry import register_layer

__all__ = ["FusedHeadAdapter", "FusedMarginHeadLayer", "HeadState", "find_margin_heads",
           "loss_and_readers_problem"]

logger = logging.getLogger("netlite")

MARGIN_LAYERS = (LabelSpecificAddLayer, LabelSpecificMarginLayer)
#: The roles of a chain's layers, in order; margin and scale are optional.
ROLES = ("fc", "margin", "scale", "loss")
ROLE_CLASSES = {"fc": InnerProductLayer, "margin": MARGIN_LAYERS,
                "scale": ScaleLayer, "loss": SoftmaxWithLossLayer}


@register_layer("FusedMarginHead")
class FusedMarginHeadLayer(Layer):
    r"""The chain ``InnerProduct{normalize} → [margin] → [Scale] →
    SoftmaxWithLoss`` as one computation on the fast engines.

    Type ``"FusedMarginHead"``, made by :class:`netlite.Net` (never written
    in a prototxt) for each such chain it finds (:func:`find_margin_heads`);
    the net's layers stay as written, and this head runs in their place
    when :meth:`fuses_now`.  With features ``x`` (N, K), weights ``W``
    (C, K), ``nu_c = sqrt(|w_c|^2 + eps)``, labels ``y`` and scale ``s``:

    .. math::
        A = x W^\top, \quad \cos_{nc} = A_{nc} / \nu_c, \quad
        z_{nc} = \cos_{nc} \text{ except } z_{n y_n} = \psi(\cos_{n y_n}),
        \quad \ell = s z, \quad
        E = \frac{w_E}{Z} \sum_{n \,\text{valid}}
            \bigl(\operatorname{lse}_n - \ell_{n y_n}\bigr)

    with the margin ``psi`` and its slope ``f`` from the margin layer
    (``target_margin``), ``Z`` the loss layer's normaliser and ``w_E`` its
    loss weight.  Backward, with ``g_n = w_E / Z`` on valid rows (else 0)
    and ``p = exp(l - lse)``:

    .. math::
        \delta\ell = g (p - \text{onehot}), \quad
        \delta\!\cos = s\,\delta\ell \text{ (times } f_n \text{ at }
        y_n\text{)}, \quad G_{nc} = \delta\!\cos_{nc} / \nu_c, \\
        \delta x = G W, \quad
        \delta W \mathrel{+}= T - \operatorname{diag}(w \cdot T / \nu^2) W,
        \quad T = G^\top x, \quad
        \delta s \mathrel{+}= \sum_{nc} \delta\ell_{nc} z_{nc}

    (TRUE_GRADIENT; RENORM_INPLACE renormalises ``W`` in place and takes
    ``nu = 1``, ``dW += T``).  The forward's one pass over the cosines also
    writes ``E = exp(s cos - max) / nu``; the backward's GEMMs take ``G =
    diag(alpha) E + S`` (``S``: at most two entries per row) and make no
    pass of their own.  The N x C arrays are ``cos`` and ``E``.

    Bottoms: ``x`` (the InnerProduct's bottom), the loss's labels, the
    margin's labels (when there is a margin layer).  Top: the loss.
    Intermediate blobs (``cos``, ``z``, ``l`` and their diffs) are deferred
    (:meth:`netlite.Blob.defer`): computed, as the layers would have, only
    when read.
    """

    exact_num_top_blobs = 1
    #: Made by the Net from a chain, never written in a prototxt.
    made_by_net = True
    #: Role -> the layer classes that may fill it, in chain order.
    role_classes = ROLE_CLASSES

    def __init__(self, layer_param=None, **kwargs):
        super().__init__(layer_param, **kwargs)
        self.links = {}
        self.first = self.last = -1
        self.bottom_vec, self.top_vec, self.propagate_down = [], [], []
        self.ran_fused = False
        self.needs_backward = True
        self.backward_flags = {}

    @classmethod
    def from_chain(cls, net, ids):
        """The head for the net's layers ``ids`` (one per role present)."""
        layers = [net.layers[i] for i in ids]
        roles = [next(r for r, kind in cls.role_classes.items()
                      if isinstance(layer, kind)) for layer in layers]
        param = netlite_pb2.LayerParameter(
            name="+".join(layer.name for layer in layers), type=cls.type)
        fc = layers[0]
        head = cls(param, dtype=fc.dtype, device=fc.device)
        head.first, head.last = ids[0], ids[-1]
        head.links = {role: (layer, net.bottom_vecs[i], net.top_vecs[i])
                      for role, layer, i in zip(roles, layers, ids)}
        loss = head.links["loss"]
        head.bottom_vec = [net.bottom_vecs[ids[0]][0], loss[1][1]]
        if "margin" in head.links:
            head.bottom_vec.append(head.links["margin"][1][1])
        head.top_vec = list(loss[2])
        head.propagate_down = ([net.bottom_need_backward[ids[0]][0]]
                               + [False] * (len(head.bottom_vec) - 1))
        head.loss_weights = list(loss[0].loss_weights)
        head.needs_backward = any(net.layer_need_backward[i] for i in ids)
        # Each layer's (need_backward, propagate_down), for the layers' own
        # backward (backward_cpu).
        head.backward_flags = {role: (net.layer_need_backward[i],
                                      net.bottom_need_backward[i])
                               for role, i in zip(roles, ids)}
        for layer in layers:
            layer.fused_head = head  # (its own backward unfuses first)
        # The N x C blobs the fused computation does without.
        for blob, _, _ in head.intermediates():
            blob.release()
        loss[0].prob.release()
        return head

    def layer(self, role):
        """The chain's layer in ``role`` (``"fc"``, ``"margin"``, ``"scale"``,
        ``"loss"``), or None."""
        link = self.links.get(role)
        return link[0] if link else None

    def intermediates(self):
        """``[(blob, data_role, diff_role)]``: every top of the chain but the
        loss's, once each.  A blob that layers update in place holds the
        last one's top after the forward (``data_role``) and the first
        one's top diff after the backward (``diff_role``)."""
        roles = {}
        for role, link in self.links.items():
            if role != "loss":
                roles.setdefault(id(link[2][0]), (link[2][0], []))[1].append(role)
        return [(blob, found[-1], found[0]) for blob, found in roles.values()]

    def describe_chain(self):
        """One line for the log: the layers, their types, the engines."""
        parts = [f"{layer.name} ({layer.type})"
                 for layer, _, _ in self.links.values()]
        return ("layers " + " -> ".join(parts) + f" into one {self.type} "
                "(numba or cupy engine; netlite.set_fusion(False) or NETLITE_FUSION=0 "
                "runs them one by one)")

    # ------------------------------------------------------------ contract
    def layer_setup(self, bottom, top):
        raise LayerSetupError(
            f"{self.describe()}: a {self.type} is made by the Net from a chain "
            "of layers (docs/engine/fusion.md); write the chain")

    def reshape(self, bottom, top):
        for layer, b, t in self.links.values():
            layer.reshape(b, t)

    def select_engine(self):
        """``"numba"`` (``"cupy"``) when every layer of the chain would run on
        Numba (CuPy) now, else ``"numpy"`` (the layers one by one)."""
        engines = {layer.select_engine() for layer, _, _ in self.links.values()}
        return engines.pop() if engines in ({"numba"}, {"cupy"}) else "numpy"

    def fuses_now(self):
        """Whether a forward now runs the fused computation: fusion on, an
        engine that has it, and one scale for every class."""
        return (fusion.fusion_enabled() and self.select_engine() != "numpy"
                and self.uniform_scale())

    def uniform_scale(self):
        """Whether the Scale (if any) multiplies every class by one value:
        a scalar, or a fixed per-class scale whose values are all equal
        (AM-Softmax's prototxt: ``num_axes`` 1, ``lr_mult: 0``, constant)."""
        scale = self.layer("scale")
        if scale is None or scale.blobs[0].count == 1:
            return True
        s = scale.blobs[0].data.reshape(-1)
        return bool((s == s[0]).all())

    def unfuse(self):
        """Rerun the chain's forwards one by one, so that each layer holds
        its own state for its own backward (after a fused forward)."""
        for layer, b, t in self.links.values():
            layer.forward(b, t)
        self.ran_fused = False
        self.engine = "numpy"

    # --------------------------------------------------------- reference
    def forward_cpu(self, bottom, top):
        for layer, b, t in self.links.values():
            layer.forward(b, t)

    def backward_cpu(self, top, propagate_down, bottom):
        for role in reversed(list(self.links)):
            layer, b, t = self.links[role]
            need, flags = self.backward_flags[role]
            if need:
                layer.backward(t, flags, b)

    # ------------------------------------------------- shared engine maths
    def scale_value(self):
        """The scale ``s`` (clamped first as the Scale layer does), in the
        blobs' dtype; 1 without a Scale layer."""
        scale = self.layer("scale")
        if scale is None:
            return self.dtype.type(1)
        scale.clamp_learned_scale()
        return self.dtype.type(float(scale.blobs[0].data.reshape(-1)[0]))

    def columns(self, xp):
        """``(lcol, mrows, mcols, mcol)``: the loss's class per row (-1 when
        ignored), the margin rows and classes, and the margin class per row
        (-1 when none).  Bad labels raise the layers' own LabelError."""
        loss, lb, _ = self.links["loss"]
        mrows, mcols = self.margin_columns(xp, loss.channels)  # first, as in the chain
        mcol = xp.full(loss.outer, -1, dtype=xp.int64)
        mcol[mrows] = mcols
        lcol = loss.label_codes(lb[1]).reshape(-1).astype(xp.int64)
        return lcol, mrows, mcols, mcol

    def margin_columns(self, xp, c):
        """The rows that get a margin and their classes (the margin layer's
        labels and ignore_label; none without a margin layer)."""
        margin = self.layer("margin")
        if margin is None:
            return xp.zeros(0, xp.int64), xp.zeros(0, xp.int64)
        mb = self.links["margin"][1]
        return margin_rows(margin, mb[1], c, margin.ignore_label)

    def target_values(self, state):
        """``(v, factor)`` (float64) at the margin rows: the margin layer's
        ``target_margin`` of their cosines."""
        c = state.z[state.mrows, state.mcols].astype(self.xp.float64)
        return self.layer("margin").target_margin(c, state.mcols)

    def weight_mode(self):
        """How the weights enter: ``("fold", eps, floor)`` -- ``nu =
        max(sqrt(|w|^2 + eps), floor)`` folded into the cosines, with the
        projected gradient; ``("renorm", eps, 0)`` -- the blob renormalised
        in place, ``nu = 1``; ``("raw", 0, 0)`` -- ``nu = 1``."""
        if self.layer("fc").true_gradient:
            return "fold", WEIGHT_NORM_EPS, 0.0
        return "renorm", WEIGHT_NORM_EPS, 0.0

    def extra_terms(self, state, x, w, inv_nu):
        """Gradient terms outside ``G``: ``(rows, coef_x, cols, coef_w)`` for
        ``dx_rows += coef_x x_rows`` and ``dW_cols += coef_w w_cols``, or
        None (none for the cosine heads)."""
        return None

    def finish_forward(self, state, rmax, rsum, top):
        """From the kernel's per-row statistics of the non-margin logits
        (``rmax``, ``rsum = sum exp(l - rmax)``, float64): apply the margin
        to the target cosines, form ``lse``, write the loss to ``top[0]``.
        Returns False when the loss is not finite (the caller reruns the
        layers, which raise the reference's error)."""
        xp, z, dt = self.xp, state.z, self.dtype
        state.v, state.factor = xp.zeros(0), xp.zeros(0)
        state.margin_logit = xp.zeros(0)
        with np.errstate(divide="ignore"):  # a row with no other column
            lse = rmax + xp.log(rsum)
        if state.mrows.size:
            state.v, state.factor = self.target_values(state)
            lt = state.margin_logit = (state.v.astype(dt) * state.s).astype(xp.float64)
            with np.errstate(invalid="ignore"):  # NaN: checked below
                lse[state.mrows] = xp.logaddexp(lse[state.mrows], lt)
        state.lse = lse
        valid = state.lcol >= 0
        rows = xp.nonzero(valid)[0]
        picked = z[rows, state.lcol[rows]].astype(xp.float64)
        hit = state.mcol[rows] == state.lcol[rows]
        if state.mrows.size:
            slot = xp.zeros(z.shape[0], dtype=xp.int64)
            slot[state.mrows] = xp.arange(state.mrows.size)
            picked = xp.where(hit, state.v[slot[rows]], picked)
        state.label_rows, state.label_z = rows, picked  # (the scale's gradient)
        logit = (picked.astype(dt) * state.s).astype(xp.float64)
        # The reference's -log(max(p, FLT_MIN)) with p rounded to the dtype.
        p = xp.exp(logit - lse[rows]).astype(dt)
        total = float(-xp.log(xp.maximum(p, dt.type(FLT_MIN))).sum())
        loss = self.layer("loss")
        loss.valid_count = int(rows.size)
        top[0].data[...] = total / loss.normalizer(loss.valid_count)
        state.g = None
        return bool(xp.isfinite(total)) and bool(xp.isfinite(lse).all())

    def row_gradient_scale(self, state, top):
        """``g`` (N,): ``dE/dloss / Z`` on the loss's valid rows, else 0."""
        xp, dt = self.xp, self.dtype
        loss = self.layer("loss")
        g = top[0].diff.reshape(()) / dt.type(loss.normalizer(loss.valid_count))
        state.g = xp.where(state.lcol >= 0, g, dt.type(0)).astype(dt)
        return state.g

    def gradient_terms(self, state, rmax, inv_nu, u=None):
        """The backward's O(N) terms, with ``G = diag(alpha) E + S``.

        ``E = exp(s cos - rmax) / nu`` off the margin's column (0 on it), as
        the forward kernels leave it; ``S`` holds the loss's column (``-g s /
        nu``) and the margin's (``s g (p - [y = m]) f / nu``) of each row.

        Returns ``(alpha, rows, cols, sigma, ds)``: ``alpha`` (N,) and
        ``sigma`` in the dtype, ``S``'s entries at ``(rows, cols)``, and the
        scale's gradient ``sum dl z`` (float) when ``u`` (N,), ``sum exp(s
        cos - rmax) cos`` off the margin's column, is given (else None).
        """
        xp, dt = self.xp, self.dtype
        s, g, lse = float(state.s), state.g.astype(xp.float64), state.lse
        with np.errstate(invalid="ignore"):  # rmax = lse = -inf: no column
            shift = xp.where(xp.isfinite(rmax), xp.exp(rmax - lse), 0.0)
        alpha = g * s * shift
        lcol, mcol, mrows, mcols = state.lcol, state.mcol, state.mrows, state.mcols
        rows_l = xp.nonzero((lcol >= 0) & (lcol != mcol))[0]
        cols_l = lcol[rows_l]
        sig_l = -g[rows_l] * s * inv_nu[cols_l]
        p_t = xp.exp(state.margin_logit - lse[mrows])
        hit = lcol[mrows] == mcols
        dl = state.dl_margin = g[mrows] * (p_t - hit)
        sig_m = (s * dl * state.factor) * inv_nu[mcols]
        rows = xp.concatenate([rows_l, mrows])
        cols = xp.concatenate([cols_l, mcols])
        sigma = xp.concatenate([sig_l, sig_m]).astype(dt)
        ds = None
        if u is not None:
            # sum_c dl z = g (sum_c p z - z at the label), per row.
            valid = state.label_rows
            total = g * shift * u
            total[mrows] += g[mrows] * p_t * state.v
            total[valid] -= g[valid] * state.label_z
            ds = float(total.sum())
        return alpha.astype(dt), rows, cols, sigma, ds

    def producers(self):
        """Role -> ``(data, diff)`` producers of that layer's top."""
        return {"fc": (cosine_data, cosine_diff), "margin": (margin_data, margin_diff),
                "scale": (logit_data, logit_diff)}

    def defer_forward(self, state):
        """Defer the data of every intermediate blob to ``state``."""
        producers = self.producers()
        for blob, role, _ in self.intermediates():
            blob.release()
            blob.defer(data=_bind(producers[role][0], self, state))

    def defer_backward(self, state):
        """Defer the diff of every intermediate blob to ``state``."""
        producers = self.producers()
        for blob, _, role in self.intermediates():
            blob.defer(diff=_bind(producers[role][1], self, state))

    # ----------------------------------------------------------- engines
    def forward_numba(self, bottom, top):
        self.adapter("numba").forward(bottom, top)

    def backward_numba(self, top, propagate_down, bottom):
        self.adapter("numba").backward(top, propagate_down, bottom)

    def forward_gpu(self, bottom, top):
        self.adapter("cupy").forward(bottom, top)

    def backward_gpu(self, top, propagate_down, bottom):
        self.adapter("cupy").backward(top, propagate_down, bottom)


class FusedHeadAdapter(EngineAdapter):
    """What the engines of a fused head share: the order of the steps and
    the weight modes.  An engine's adapter (``FusedMarginHeadNumba``,
    ``FusedMarginHeadCuPy``) sets :attr:`xp` and supplies its workspaces and
    kernels: ``engine_workspace(n, c, k, dtype)`` (what it needs beyond the
    arrays :meth:`_workspace` makes), ``norms`` and ``renorm``
    (``nu`` of the weight rows; ``renorm`` also divides them in place),
    ``row_pass`` (the forward's pass over the cosines),
    ``feature_gradient`` and ``weight_gradient`` (the backward's GEMMs and
    sparse rows)."""

    xp = np

    def __init__(self, layer):
        super().__init__(layer)
        self.z = self.e = self.nu = self.inv_nu = self.nu_q = self.xs = None
        self.rmax = self.rsum = self.u = None
        self.state = None

    def _workspace(self, n, c, k, dtype):
        # The two N x C arrays, the weight norms, the row statistics
        # (float64) and the row-scaled features; then the engine's own.
        if self.z is not None and self.z.shape == (n, c) and self.z.dtype == dtype:
            return
        xp = self.xp
        self.z = self.e = None  # the old pair goes first
        self.z = xp.empty((n, c), dtype=dtype)
        self.e = xp.empty((n, c), dtype=dtype)
        self.nu = xp.empty(c, dtype=dtype)
        self.inv_nu = xp.empty(c, dtype=dtype)
        self.rmax, self.rsum = xp.empty(n), xp.empty(n)
        self.u = xp.zeros(n)
        self.xs = xp.empty((n, k), dtype=dtype)
        self.engine_workspace(n, c, k, dtype)

    def forward(self, bottom, top):
        head, xp = self.layer, self.xp
        fc, scale = head.layer("fc"), head.layer("scale")
        w = fc.blobs[0].data
        c, k = w.shape
        x = bottom[0].data.reshape(-1, k)
        self._workspace(x.shape[0], c, k, np.dtype(x.dtype))
        self._weights(head.weight_mode(), w.reshape(-1), c, k)
        xp.matmul(x, w.T, out=self.z)
        state = HeadState(self.z, head.scale_value(), head.columns(xp))
        self.row_pass(state, scale is not None and scale.propagates_param(0))
        if not head.finish_forward(state, self.rmax, self.rsum, top):
            head.forward_cpu(bottom, top)  # the layers raise the reference's error
            head.ran_fused = False
            return
        head.defer_forward(state)
        head.ran_fused = True
        self.state = state

    def _weights(self, weight_mode, flat, c, k):
        # nu, 1 / nu and nu_q (the norms the projection divides by) for the
        # head's weight mode (FusedMarginHeadLayer.weight_mode).
        mode, eps, floor = weight_mode
        xp, one = self.xp, self.nu.dtype.type(1)
        if mode == "fold":
            self.norms(flat, c, k, eps)
            # A row below the floor gets no projection (nu_q = inf: q = 0).
            self.nu_q = xp.where(self.nu >= floor, self.nu, np.inf).astype(
                self.nu.dtype) if floor > 0 else self.nu
            xp.maximum(self.nu, self.nu.dtype.type(floor), out=self.nu)
            xp.divide(one, self.nu, out=self.inv_nu)
            return
        if mode == "renorm":  # the blob itself becomes W / nu
            self.renorm(flat, c, k, eps)
        self.nu.fill(one)
        self.inv_nu.fill(one)
        self.nu_q = self.nu

    def backward(self, top, propagate_down, bottom):
        head, st = self.layer, self.state
        fc, scale = head.layer("fc"), head.layer("scale")
        want_s = scale is not None and scale.propagates_param(0)
        w = fc.blobs[0].data
        x = bottom[0].data.reshape(-1, w.shape[1])
        head.row_gradient_scale(st, top)
        alpha, rows, cols, sigma, ds = head.gradient_terms(
            st, self.rmax, self.inv_nu, self.u if want_s else None)
        extra = head.extra_terms(st, x, w, self.inv_nu)
        if propagate_down[0]:
            # dx = G W with G = diag(alpha) E + S (+ the extra terms).
            self.feature_gradient(bottom[0].diff.reshape(x.shape), x, w, alpha,
                                  rows, cols, sigma, extra)
        if fc.propagates_param(0):
            self.xp.multiply(x, alpha[:, None], out=self.xs)
            self.weight_gradient(head, x, rows, cols, sigma, extra)
        if want_s:
            sd = scale.blobs[0].diff
            sd += sd.dtype.type(ds)
        head.defer_backward(st)


class HeadState:
    """What a fused forward leaves for its backward and for the deferred
    blobs: ``z`` (N, C) the cosines (``cos``; the margin column holds the
    cosine before the margin), ``s``, ``lcol``, ``mrows``, ``mcols``,
    ``mcol``, ``v`` and ``factor`` (the margin's value and slope per margin
    row, float64), ``margin_logit`` (``s v`` in the dtype, widened), ``lse``
    (N,) float64, ``label_rows`` and ``label_z`` (the valid rows and their
    ``z`` at the label, float64), and after the backward ``g`` and
    ``dl_margin`` (``dE/dl`` at the margin rows' margin column)."""

    def __init__(self, z, s, columns):
        self.z, self.s = z, s
        self.lcol, self.mrows, self.mcols, self.mcol = columns
        self.v = self.factor = self.margin_logit = self.lse = None
        self.label_rows = self.label_z = self.g = self.dl_margin = None


def _bind(producer, head, state):
    def fill(out):
        producer(head, state, out.reshape(state.z.shape))
    return fill


# ------------------------------------------------ the deferred blobs' values
def cosine_data(head, state, out):
    """``cos``: the InnerProduct's top."""
    out[...] = state.z


def margin_data(head, state, out):
    """``z``: the cosines with the margin on the target."""
    out[...] = state.z
    out[state.mrows, state.mcols] = state.v.astype(head.dtype)


def logit_data(head, state, out):
    """``l = s z``: the Scale's top (Scale multiplies in the blobs' dtype)."""
    margin_data(head, state, out)
    out *= state.s


def logit_diff(head, state, out):
    """``dE/dl = g (p - onehot)``, ``p = exp(l - lse)``."""
    xp = head.xp
    logit_data(head, state, out)
    p = xp.exp(out.astype(xp.float64) - state.lse[:, None])
    rows = xp.nonzero(state.lcol >= 0)[0]
    p[rows, state.lcol[rows]] -= 1
    out[...] = (p * state.g[:, None].astype(xp.float64)).astype(head.dtype)


def margin_diff(head, state, out):
    """``dE/dz = s dE/dl`` (the Scale's bottom diff)."""
    logit_diff(head, state, out)
    out *= state.s


def cosine_diff(head, state, out):
    """``dE/dcos``: ``dE/dz`` times the margin's slope on the target."""
    margin_diff(head, state, out)
    target = out[state.mrows, state.mcols].astype(head.xp.float64)
    out[state.mrows, state.mcols] = (target * state.factor).astype(head.dtype)


# ------------------------------------------------------------- the planner
@fusion.register_fuser
def find_margin_heads(net):
    """The FusedMarginHeads of ``net``: every InnerProduct with
    ``normalize`` followed, layer after layer, by an optional
    LabelSpecificAdd / LabelSpecificMargin, an optional Scale and a
    SoftmaxWithLoss, each reading the previous one's top (in place or not),
    which no layer outside the chain reads.  A chain that does not qualify
    is logged with the reason."""
    heads = []
    for i, layer in enumerate(net.layers):
        if not isinstance(layer, InnerProductLayer) or not layer.normalize:
            continue
        ids = _chain(net, i)
        reason = _why_not(net, ids)
        if reason:
            logger.info("Not fusing the head from layer %s: %s", layer.name, reason)
            continue
        heads.append(FusedMarginHeadLayer.from_chain(net, ids))
    return heads


def _chain(net, first):
    ids, top = [first], net.top_vecs[first][0]
    j = first + 1
    for role in ROLES[1:]:
        if j >= len(net.layers):
            break
        layer = net.layers[j]
        if isinstance(layer, ROLE_CLASSES[role]) and net.bottom_vecs[j][:1] == [top]:
            ids.append(j)
            top = net.top_vecs[j][0] if net.top_vecs[j] else None
            j += 1
    return ids


def _why_not(net, ids):
    """Why the layers ``ids`` cannot be fused ('' when they can)."""
    layers = [net.layers[i] for i in ids]
    fc, loss = layers[0], layers[-1]
    if not isinstance(loss, SoftmaxWithLossLayer):
        nxt = ids[-1] + 1
        after = (f"{net.layers[nxt].name} ({net.layers[nxt].type})"
                 if nxt < len(net.layers) else "the end of the net")
        return (f"the chain stops at {after}; a SoftmaxWithLoss must read the "
                f"top of {loss.name}, and nothing else")
    if fc.bias_term or fc.transpose:
        return "the InnerProduct has a bias or is transposed"
    if len(net.top_vecs[ids[0]][0].shape) != 2:
        return "the InnerProduct's top is not (N, C)"
    classes = net.top_vecs[ids[0]][0].shape[1]
    for layer, i in zip(layers[1:-1], ids[1:-1]):
        if len(net.top_vecs[i]) != 1:
            return f"{layer.name} has a second top"
        if isinstance(layer, ScaleLayer) and (
                len(net.bottom_vecs[i]) != 1 or layer.bias_layer is not None
                or layer.blobs[0].count not in (1, classes)
                or (layer.blobs[0].count > 1 and layer.propagates_param(0))):
            return (f"{layer.name} is neither a scalar scale nor a fixed per-class "
                    "one, without bias")
    return loss_and_readers_problem(net, ids)


def loss_and_readers_problem(net, ids):
    """What stops the chain ``ids``, whose last layer is a SoftmaxWithLoss,
    at its loss or at its blobs: a second loss top, a softmax axis other
    than 1, a top of the chain read outside it ('' when nothing does).
    Shared by the fusers of the fused heads."""
    loss = net.layers[ids[-1]]
    if len(net.top_vecs[ids[-1]]) != 1 or loss.layer_param.softmax_param.axis != 1:
        return "the SoftmaxWithLoss has a second top or a softmax axis other than 1"
    for i in ids[:-1]:
        blob = net.top_vecs[i][0]
        readers = {j for j, vec in enumerate(net.bottom_vecs)
                   if any(b is blob for b in vec)}
        if not readers <= set(ids):
            return f"the top of {net.layers[i].name} has another reader"
    return ""
