r"""The multiplicative angular margin of L-Softmax and A-Softmax (SphereFace).

Shared by ``large_margin_inner_product.py`` (``LargeMarginInnerProduct``)
and ``margin_inner_product.py`` (``MarginInnerProduct``); the derivation is
on docs/layers/large_margin_inner_product.md (§2 and §3).

For the cosine ``c = cos(theta)`` between a feature and its class's
weight row and the margin ``m`` in 1..4,

.. math::

   \psi_m(c) = (-1)^k\, T_m(c) - 2k, \qquad
   \psi_m'(c) = (-1)^k\, T_m'(c) = (-1)^k\, m\, U_{m-1}(c),

``T_m`` and ``U_m`` the Chebyshev polynomials of the first and second
kind (``T_m(cos theta) = cos(m theta)``) and ``k`` the number of
thresholds ``cos(j pi / m)``, ``j = 1..m-1``, that ``c`` lies below
(``k = floor(m theta / pi)`` computed from ``c`` alone, no ``acos``).  The
target logit is blended with the plain one by ``lambda``:

.. math::

   \varphi(c) = \frac{\lambda c + \psi_m(c)}{1 + \lambda}, \qquad
   \varphi'(c) = \frac{\lambda + \psi_m'(c)}{1 + \lambda},

with ``lambda = max(lambda_min, base * (1 + gamma * it)^(-power))`` and
``it = iteration + solver_iteration + 1``.
"""

import math

import numpy as np

from netlite import backend
from netlite.errors import LayerSetupError, NonFiniteError, ShapeError
from netlite.layers._labels import label_codes

#: Floor of every norm used as a divisor: ``x / max(|x|, EPS)``, as
#: PyTorch's ``F.normalize`` (the forks divide by the bare norm and give
#: NaN for a zero vector).
EPS = 1e-12

#: ``cos(j pi / m)`` for ``j = 1..m-1``, exact where representable.
THRESHOLDS = {
    1: (),
    2: (0.0,),
    3: (0.5, -0.5),
    4: (math.sqrt(0.5), 0.0, -math.sqrt(0.5)),
}

_SCHEDULE_FIELDS = ("base", "gamma", "power", "lambda_min")


def margin_params(layer, p):
    """Read and check the fields both layers share.

    Parameters
    ----------
    layer : Layer
        Named in error messages.
    p : LargeMarginInnerProductParameter or MarginInnerProductParameter

    Returns
    -------
    dict
        ``m`` (1..4), ``N``, and the schedule's ``base``, ``gamma``,
        ``power``, ``lambda_min`` (float32 values widened exactly) and
        ``iteration`` (int).

    Raises
    ------
    LayerSetupError
        ``num_output`` not positive; a schedule field negative or NaN (or
        infinite); ``iteration`` negative.
    """
    field = type(p).__name__
    if p.num_output <= 0:
        raise LayerSetupError(
            f"{layer.describe()}: {field}.num_output must be set to a positive "
            f"number of classes, got {p.num_output}"
        )
    out = {"m": int(p.type) + 1, "N": int(p.num_output),
           "iteration": int(p.iteration)}
    for name in _SCHEDULE_FIELDS:
        value = float(getattr(p, name))
        if not (math.isfinite(value) and value >= 0):
            raise LayerSetupError(
                f"{layer.describe()}: {field}.{name} must be a finite number "
                f">= 0 (lambda = max(lambda_min, base * (1 + gamma * it)^"
                f"(-power))), got {value!r}"
            )
        out[name] = value
    if out["iteration"] < 0:
        raise LayerSetupError(
            f"{layer.describe()}: {field}.iteration (the start of the lambda "
            f"schedule) must be >= 0, got {out['iteration']}"
        )
    return out


def schedule_lambda(params, solver_iteration):
    """``lambda = max(lambda_min, base * (1 + gamma * it)^(-power))`` with
    ``it = params["iteration"] + solver_iteration + 1`` (a Python float)."""
    it = params["iteration"] + int(solver_iteration) + 1
    value = params["base"] * (1.0 + params["gamma"] * it) ** (-params["power"])
    return max(params["lambda_min"], value)


def chebyshev(m, c):
    """``(T_m(c), T_m'(c))`` by the three-term recurrences
    ``T_{n+1} = 2c T_n - T_{n-1}`` and ``U_{n+1} = 2c U_n - U_{n-1}``,
    with ``T_m' = m U_{m-1}``."""
    t_prev, t = 1.0, c  # T_0, T_1
    u_prev, u = 0.0, 1.0  # U_{-1}, U_0
    for _ in range(m - 1):
        t_prev, t = t, 2 * c * t - t_prev
        u_prev, u = u, 2 * c * u - u_prev
    return t, m * u


def sign_index(xp, m, c):
    """``k``: how many thresholds ``cos(j pi / m)`` lie above ``c`` (an
    int array shaped like ``c``)."""
    k = xp.zeros(c.shape, dtype=xp.int64)
    for threshold in THRESHOLDS[m]:
        k += c < threshold
    return k


def psi(xp, m, c):
    r"""``(psi_m(c), psi_m'(c))`` for an array ``c`` of cosines.

    ``psi`` is continuous and C^1 in ``c`` (both one-sided derivatives
    vanish at each threshold), so the side ``k`` takes exactly at a
    threshold changes nothing; ``|c| > 1`` from rounding needs no clamp
    (the polynomial extends smoothly).
    """
    k = sign_index(xp, m, c)
    sign = (1 - 2 * (k % 2)).astype(c.dtype)
    t, dt = chebyshev(m, c)
    return sign * t - 2 * k.astype(c.dtype), sign * dt


def margin_target(xp, m, lam, z_t, length, denom):
    """The target logits with the margin, and what the backward needs.

    ``c = z_t / denom``, ``psi_m(c)`` and its slope, and the blended logit
    ``(lam z_t + length psi_m(c)) / (1 + lam)``: L-Softmax passes ``length
    = |x_i| |w_y|`` and the product of the clamped norms as ``denom``,
    SphereFace ``|x_i|`` and its clamp.  The layers' forwards and the fused
    head (fused_multiplicative_head.py) share it.

    Returns
    -------
    logit, c, value, slope : arrays (R,)
    """
    c = z_t / denom
    value, slope = psi(xp, m, c)
    return (lam * z_t + length * value) / (1 + lam), c, value, slope


def blend(lam, c, value, slope):
    """``(phi, phi')`` of the lambda blend ``(lam c + psi) / (1 + lam)``."""
    return (lam * c + value) / (1 + lam), (lam + slope) / (1 + lam)


def logit_coefficients(xp, g, rows, cols, lam, c, value, slope):
    r"""The coefficient matrices of the exact backward of
    ``z_ij = s_ij phi_ij(c_ij)`` (``phi = c`` off target).

    Parameters
    ----------
    g : array (M, N)
        ``dE/dz``, the top diff.
    rows, cols : int arrays (R,)
        The target entries ``(i, y_i)`` that carry the margin.
    lam : float
    c, value, slope : arrays (R,)
        ``c``, ``psi_m(c)`` and ``psi_m'(c)`` at those entries.

    Returns
    -------
    p : array (M, N)
        ``g * phi'``: ``g`` off target, ``g (lam + psi') / (1 + lam)`` on it.
    q : array (M, N)
        ``g * (phi - c phi')``: zero off target,
        ``g (psi - c psi') / (1 + lam)`` on it (the lambda terms cancel).
    """
    gt = g[rows, cols]
    p = g.copy()
    p[rows, cols] = gt * (lam + slope) / (1 + lam)
    q = xp.zeros_like(g)
    q[rows, cols] = gt * (value - c * slope) / (1 + lam)
    return p, q


def layer_coefficients(layer, g):
    """:func:`logit_coefficients` at the target entries of the layer's last
    forward; ``(g, None)`` for ``m = 1`` (the plain inner product)."""
    if layer.m == 1:
        return g, None
    return logit_coefficients(layer.xp, g, layer.rows, layer.cols, layer.lam,
                              layer.c, layer.value, layer.slope)


def check_features(layer, blob):
    """Raise NonFiniteError naming the first NaN or infinite feature of
    ``blob`` (``bottom[0]``)."""
    xp = blob.xp
    bad = ~xp.isfinite(blob.flat_data)
    if bool(bad.any()):
        index = int(xp.argmax(bad))
        value = float(backend.to_numpy(blob.flat_data[index:index + 1])[0])
        where = tuple(int(i) for i in np.unravel_index(index, blob.shape))
        raise NonFiniteError(
            f"{layer.describe()}: bottom[0] (the features, shape {blob.shape}) "
            f"holds {value!r} at index {where}; the features must be finite"
        )


def setup_layer(layer, p, bottom):
    """The ``layer_setup`` both layers share: read ``p`` (sets
    ``layer.params``, ``m``, ``N``, ``K``, ``ignore_label``), create and fill
    the weight blob ``(N, K)`` or check a loaded one."""
    layer.params = margin_params(layer, p)
    layer.m, layer.N = layer.params["m"], layer.params["N"]
    loss_param = layer.layer_param.loss_param
    layer.ignore_label = (int(loss_param.ignore_label)
                          if loss_param.HasField("ignore_label") else None)
    axis = layer.canonical_axis(bottom[0], p.axis)
    layer.K = bottom[0].count_range(axis)
    if not layer.blobs:
        layer.blobs = [layer.make_blob((layer.N, layer.K))]
        layer.fill_blob(layer.blobs[0], p.weight_filler)
        return
    layer.check_param_blobs(
        [(layer.N, layer.K)], ["weight"],
        f" (bottom[0] (shape {bottom[0].shape}) with axis {axis} has K = "
        f"{layer.K} features and num_output N = {layer.N})",
    )


def reshape_layer(layer, p, bottom, top):
    """The ``reshape`` both layers share (sets ``layer.axis`` and ``M``)."""
    if top[0] is bottom[0]:
        raise LayerSetupError(
            f"{layer.describe()} does not allow in-place computation"
        )
    layer.axis = layer.canonical_axis(bottom[0], p.axis)
    k = bottom[0].count_range(layer.axis)
    if k != layer.K:
        raise ShapeError(
            f"{layer.describe()}: input size incompatible with the weights: "
            f"bottom[0] has shape {bottom[0].shape}, i.e. {k} features per "
            f"row from axis {layer.axis}, but the layer was set up for K = "
            f"{layer.K} (weights {layer.blobs[0].shape})"
        )
    layer.M = bottom[0].count_range(0, layer.axis)
    if bottom[1].count != layer.M:
        raise ShapeError(
            f"{layer.describe()}: bottom[1] (the labels, shape "
            f"{bottom[1].shape}) must hold one label per feature row, "
            f"M = {layer.M} (bottom[0] shape {bottom[0].shape}, axis "
            f"{layer.axis})"
        )
    top[0].reshape(bottom[0].shape[:layer.axis] + (layer.N,))
    if len(top) > 1:
        top[1].reshape(())


def begin_forward(layer, bottom, top):
    """The first steps of both layers' forward: check the features, set
    ``layer.lam`` (lambda at the layer's iteration, written to the optional
    ``top[1]``) and read the labels.

    Returns
    -------
    x : array (M, K)
        The features.
    w : array (N, K)
        The weights (``blobs[0].data``).
    lam : float
    label : int array (M,)
        The label codes (-1 for an ignored row; :func:`label_codes`).
    """
    check_features(layer, bottom[0])
    lam = layer.lam = schedule_lambda(layer.params, layer.iteration)
    if len(top) > 1:
        top[1].data[...] = lam
    label = label_codes(layer, bottom[1], layer.N, layer.ignore_label, layer.axis)
    return (bottom[0].data.reshape(layer.M, layer.K), layer.blobs[0].data, lam,
            label)
