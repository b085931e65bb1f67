"""Per-channel batch statistics shared by BatchNorm and BN.

Both layers view their bottom as ``(N, C, S)``: the batch, the channels
(``shape[1]``, or 1 for a 1-D blob) and every further axis flattened into
``S``.  Statistics run over the ``m = N * S`` values of each channel.  See
docs/layers/batch_norm.md §2-3 (the derivation of the backward below) and
docs/layers/bn.md.
"""

import math

from netlite import backend
from netlite.errors import LayerSetupError, NonFiniteError, ShapeError


def channel_dims(layer, blob):
    """``(N, C, S)`` of ``blob``; ``C = shape[1]`` (1 for a 1-D blob).

    Raises
    ------
    ShapeError
        For a 0-axis blob (no batch axis).
    """
    if blob.num_axes == 0:
        raise ShapeError(
            f"{layer.describe()}: bottom[0] must have a batch axis (shape "
            f"(N,), (N, C) or (N, C, ...)); got a scalar"
        )
    n = blob.shape[0]
    c = blob.shape[1] if blob.num_axes >= 2 else 1
    s = blob.count_range(2) if blob.num_axes >= 2 else 1
    return n, c, s


def reshape_channels(layer, bottom, top):
    """The shared ``reshape``: set ``layer.num`` and ``layer.spatial`` from
    ``bottom[0]`` (:func:`channel_dims`) and shape ``top[0]`` as
    ``bottom[0]`` (unless in place).

    Raises
    ------
    ShapeError
        When ``bottom[0]`` has another channel count than the
        ``layer.channels`` it was set up for.
    """
    layer.num, channels, layer.spatial = channel_dims(layer, bottom[0])
    if channels != layer.channels:
        raise ShapeError(
            f"{layer.describe()}: bottom[0] {bottom[0].shape} has {channels} "
            f"channel(s) along axis 1; the layer was set up for "
            f"{layer.channels}"
        )
    if top[0] is not bottom[0]:
        top[0].reshape_like(bottom[0])


def check_fraction(layer, value, field):
    """A momentum-like field: finite and in [0, 1]."""
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise LayerSetupError(
            f"{layer.describe()}: {field} must lie in [0, 1]; got {value}"
        )


def check_eps(layer, value, field="eps"):
    """The epsilon under the square root: finite and >= 0."""
    if not (math.isfinite(value) and value >= 0.0):
        raise LayerSetupError(
            f"{layer.describe()}: {field} must be finite and >= 0; got {value}"
        )


def batch_moments(layer, x3):
    """Per-channel mean and **biased** variance of ``x3`` (shape (N, C, S)),
    by two passes: ``mu = mean(x)``, ``var = mean((x - mu)^2)``.

    Raises
    ------
    ShapeError
        When a channel has no values (``N * S = 0``).
    NonFiniteError
        When a statistic is not finite (a NaN or infinite input, or an
        overflow), before anything is stored from it.
    """
    n, c, s = x3.shape
    if n * s == 0:
        raise ShapeError(
            f"{layer.describe()}: batch statistics need at least one value per "
            f"channel; bottom[0] has N = {n}, spatial size {s}"
        )
    mean = x3.mean(axis=(0, 2))
    _check_finite(layer, mean, "mean")
    centered = x3 - mean[None, :, None]
    var = (centered * centered).mean(axis=(0, 2))
    _check_finite(layer, var, "variance")
    return mean, var


def _check_finite(layer, values, what):
    if not bool(layer.xp.isfinite(values).all()):
        channel = int(backend.to_numpy(~layer.xp.isfinite(values)).argmax())
        raise NonFiniteError(
            f"{layer.describe()}: the batch {what} of channel {channel} is "
            f"{float(values[channel])}: bottom[0] holds a NaN or an infinity in "
            "that channel, or its squares overflow; the running statistics "
            "were left unchanged"
        )


def normalize(x3, mean, inv_std):
    """``xhat = (x - mu) * inv_std``, broadcast per channel (a new array)."""
    return (x3 - mean[None, :, None]) * inv_std[None, :, None]


def normalize_backward(dy3, xhat3, inv_std):
    """The gradient through ``xhat = (x - mu) / sqrt(var + eps)`` with the
    batch's own ``mu`` and biased ``var``:

    ``dx = inv_std * (g - mean(g) - xhat * mean(g * xhat))``,

    means per channel over ``(N, S)``; ``g = dE/dxhat`` (shape (N, C, S)).
    Returns a new array (``dy3`` may alias the bottom diff).
    """
    mean_g = dy3.mean(axis=(0, 2), keepdims=True)
    mean_gx = (dy3 * xhat3).mean(axis=(0, 2), keepdims=True)
    return (dy3 - mean_g - xhat3 * mean_gx) * inv_std[None, :, None]


def pin_statistics(layer, indices, what):
    """Caffe's BatchNorm rule: the statistic blobs ``indices`` get a ParamSpec
    with ``lr_mult: 0`` (added when absent), so no solver moves them; a
    given spec must already say ``lr_mult: 0``.

    Raises
    ------
    LayerSetupError
        When a given spec for a statistic blob has ``lr_mult != 0``
        (including an unset one, whose default is 1).
    """
    specs = layer.layer_param.param
    for i in indices:
        if len(specs) == i:
            specs.add().lr_mult = 0.0
        elif len(specs) > i and specs[i].lr_mult != 0:
            raise LayerSetupError(
                f"{layer.describe()}: param {i} ({what[i]}) is a running "
                f"statistic, which the solver must not update; its param spec "
                f"must say lr_mult: 0 or be left out (got lr_mult "
                f"{specs[i].lr_mult})"
            )
        elif len(specs) < i:
            # Earlier learned blobs without a spec get the default one.
            while len(specs) < i:
                specs.add()
            specs.add().lr_mult = 0.0
