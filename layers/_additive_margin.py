"""Shared pieces of the target-logit margin layers (LabelSpecificAdd,
LabelSpecificMargin): the ``(N, C)`` view of the cosines and the shared
reshape, the rows that get a margin, the happynear annealing schedule, the
non-finite check and a warn-once helper.

See docs/layers/label_specific_add.md and label_specific_margin.md.
"""

import math
import warnings

import numpy as np

from netlite import backend
from netlite.errors import LayerSetupError, NetliteWarning, NonFiniteError, ShapeError
from netlite.layers._labels import label_codes


def cosine_dims(layer, cosine, label):
    """``(N, C)`` of ``bottom[0]`` read as Caffe's ``num x (count / num)``.

    Raises ShapeError when ``bottom[0]`` has no axis or no element, or when
    the label count is not ``N``.
    """
    if cosine.num_axes < 1 or cosine.count == 0:
        raise ShapeError(
            f"{layer.describe()}: bottom[0] (the cosines, shape {cosine.shape}) "
            "must have a batch axis and at least one class")
    n = cosine.shape[0]
    c = cosine.count // n
    if label.count != n:
        raise ShapeError(
            f"{layer.describe()}: bottom[1] (the labels, shape {label.shape}) "
            f"must hold one label per row of bottom[0] (N = {n}, shape "
            f"{cosine.shape})")
    return n, c


def reshape_margin_layer(layer, bottom, top, field, per_class):
    """The shared ``reshape``: set ``layer.num``, ``layer.channels``
    (:func:`cosine_dims`), shape ``top[0]`` as ``bottom[0]`` (unless in
    place) and the optional ``top[1]`` (the value in use) as ``(C,)`` with
    per-class values, else ``(1,)``.

    Raises ShapeError when ``per_class`` (the ``field`` values) is given
    but does not hold one value per class.
    """
    layer.num, layer.channels = cosine_dims(layer, bottom[0], bottom[1])
    if per_class and len(per_class) != layer.channels:
        raise ShapeError(
            f"{layer.describe()}: {field} has {len(per_class)} "
            f"values for C = {layer.channels} classes (bottom[0] "
            f"{bottom[0].shape})")
    if top[0] is not bottom[0]:
        top[0].reshape_like(bottom[0])
    if len(top) > 1:
        top[1].reshape((len(per_class) or 1,))


def ignore_label_of(layer):
    """``loss_param.ignore_label`` when set, else None."""
    lp = layer.layer_param.loss_param
    return int(lp.ignore_label) if lp.HasField("ignore_label") else None


def margin_rows(layer, label, num_classes, ignore_label):
    """The rows that get a margin and their classes, as int64 arrays.

    Every label must be an integer in ``[0, C)`` or ``ignore_label``
    (LabelError otherwise); rows with ``ignore_label`` get no margin.
    """
    xp = label.xp
    codes = label_codes(layer, label, num_classes, ignore_label)
    rows = xp.nonzero(codes >= 0)[0]
    return rows, codes[rows]


def check_finite(layer, cosine):
    """NonFiniteError naming the first NaN or infinity of ``bottom[0]``."""
    x = cosine.data
    if bool(cosine.xp.isfinite(x).all()):
        return
    flat = backend.to_numpy(x).reshape(-1)
    index = int(np.argmax(~np.isfinite(flat)))
    where = tuple(int(i) for i in np.unravel_index(index, cosine.shape))
    raise NonFiniteError(
        f"{layer.describe()}: bottom[0] (the cosines, shape {cosine.shape}) "
        f"holds {flat[index]} at index {where}; a cosine must be finite")


def check_field(layer, field, value, low=None, high=None, low_open=False,
                why=""):
    """LayerSetupError unless ``value`` is finite and within the bounds."""
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            bounds.append(f"<= {high:g}")
        need = " and ".join(["finite", *bounds])
        raise LayerSetupError(
            f"{layer.describe()}: {field} = {value!r} must be {need}"
            + (f" ({why})" if why else ""))


def anneal(layer, base, gamma, power, t, prefix):
    """happynear's schedule ``base + (1 + gamma t)^power - 1`` in float64.

    Raises LayerSetupError when it is undefined (a negative base to a
    non-integer power) or not finite.
    """
    try:
        value = base + math.pow(1.0 + gamma * t, power) - 1.0
    except (ValueError, OverflowError):
        value = math.nan
    if not math.isfinite(value):
        raise LayerSetupError(
            f"{layer.describe()}: the annealed value {prefix}base + (1 + "
            f"{prefix}gamma * t)^{prefix}power - 1 is undefined at t = {t} "
            f"(base {base!r}, gamma {gamma!r}, power {power!r})")
    return value


def warn_once(layer, key, message):
    """Warn (NetliteWarning) the first time ``key`` is seen on ``layer``."""
    seen = layer.__dict__.setdefault("_margin_warned", set())
    if key in seen:
        return
    seen.add(key)
    warnings.warn(f"{layer.describe()}: {message}", NetliteWarning, stacklevel=4)


def float64_column(xp, x2d, rows, cols):
    """``x2d[rows, cols]`` widened to float64 (the target cosines)."""
    return x2d[rows, cols].astype(xp.float64)
