"""Class labels: one check, one message and one set of codes for every layer
and engine.

Caffe stores labels in float blobs and truncates them with a cast, so 2.5
silently becomes class 2 and 7 reads past the end of a 5-class row.
netlite validates them instead.  A label is valid when it is a finite
integer value in ``[0, C)``, or equals ``ignore_label``.  Every comparison
is made in float64, which holds float32 and float64 labels and any int32
``ignore_label`` exactly, so the reference, the Numba kernels and the CUDA
kernels (which follow the same rule) agree on every value.

The kernels cannot raise, so they classify each label into a code, which
this module also defines: ``>= 0`` the class; :data:`IGNORED`;
:data:`NOT_INTEGER` (NaN, infinities, fractions); :data:`OUT_OF_RANGE`.
The layer then raises :func:`label_error` for the first bad one in flat
order, which is the error the reference raises.
"""

import math

import numpy as np

from netlite import backend
from netlite.errors import LabelError

IGNORED = -1
NOT_INTEGER = -2
OUT_OF_RANGE = -3

#: The floor of a probability before its log (Caffe's ``FLT_MIN``, the
#: float32 value in every dtype): caps one position's loss at 87.3365.
FLT_MIN = float(np.finfo(np.float32).tiny)  # 1.1754943508222875e-38


def label_codes(layer, label, num_classes, ignore_label=None, axis=None):
    """Check every label; return their codes.

    Parameters
    ----------
    layer : Layer
        Named in the error message.
    label : Blob
        The labels (usually ``bottom[1]``), class indices stored as floats.
    num_classes : int
        ``C``.
    ignore_label : int or None
        Labels equal to it are :data:`IGNORED`.
    axis : int or None
        The class axis of the scores, for the message.

    Returns
    -------
    codes : int64 array, shape (label.count,)
        The class of each label, or :data:`IGNORED`.

    Raises
    ------
    LabelError
        For the first bad label in flat order (:func:`label_error`).
    """
    xp = label.xp
    lab = label.flat_data.astype(xp.float64)
    not_integer = ~xp.isfinite(lab) | (lab != xp.floor(lab))
    if ignore_label is None:
        ignored = xp.zeros(lab.shape, dtype=bool)
    else:
        ignored = lab == float(ignore_label)
    out_of_range = ~ignored & ((lab < 0) | (lab >= num_classes))
    bad = not_integer | out_of_range
    if bool(bad.any()):
        index = int(xp.argmax(bad))
        raise label_error(layer, label, index, num_classes, ignore_label, axis)
    return xp.where(ignored, IGNORED, lab).astype(xp.int64)


def label_error(layer, label, index, num_classes, ignore_label=None, axis=None):
    """The :class:`LabelError` for the bad label at flat position ``index``.

    The message names the layer, the label's value, its index in the label
    blob and what is wrong with it, e.g. ``SoftmaxWithLoss layer 'loss':
    label 7.0 at index (3, 0) (flat position 6) of bottom[1] (the labels,
    shape (5, 2)) is outside [0, 5) (no ignore_label is set); labels are
    class indices along axis 1 (C = 5)``.
    """
    value = float(backend.to_numpy(label.flat_data[index:index + 1])[0])
    where = tuple(int(i) for i in np.unravel_index(index, label.shape or (1,)))
    outside = f"outside [0, {num_classes})"
    if math.isnan(value):
        problem = "is not an integer"
    elif not math.isfinite(value) or value != math.floor(value):
        inside = 0 <= value < num_classes
        problem = "is not an integer" + ("" if inside else f" and lies {outside}")
    elif ignore_label is None:
        problem = f"is {outside} (no ignore_label is set)"
    else:
        problem = f"is {outside} and is not ignore_label ({ignore_label})"
    along = "" if axis is None else f" along axis {axis}"
    return LabelError(
        f"{layer.describe()}: label {value!r} at index {where} (flat position "
        f"{index}) of bottom[1] (the labels, shape {label.shape}) {problem}; "
        f"labels are class indices{along} (C = {num_classes})"
    )
