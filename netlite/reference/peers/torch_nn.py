"""``SoftmaxWithLoss`` through ``torch.nn.functional.cross_entropy``
(framework ``torch``; docs/validation.md §1).

The mapping of netlite's ``loss_param`` onto cross_entropy's arguments:

=========================  ===================================================
netlite                    PyTorch
=========================  ===================================================
``class_weight``           ``weight``
``ignore_label``           ``ignore_index`` (default -100 when unset)
``label_smoothing``        ``label_smoothing``
``temperature`` T          ``T**2 * cross_entropy(x / T, ...)``
probability targets        a float target of the scores' shape
class axis (``axis``)      moved to dim 1, as PyTorch expects
``per_position``           ``reduction="none"``
``WEIGHTED``,              ``reduction="mean"`` (PyTorch divides by the sum
``LABEL_WEIGHTED``         of the labels' weights: LABEL_WEIGHTED exactly,
                           WEIGHTED without smoothing)
``VALID`` (no weights, or  ``reduction="mean"``
probability targets)
``VALID`` with weights     ``reduction="sum"`` / max(#valid, 1) (PyTorch's
(hard labels)              mean would divide by the weights)
``FULL``                   ``reduction="sum"`` / #positions
``BATCH_SIZE``             ``reduction="sum"`` / (product of the dims before
                           the class axis)
``NONE``                   ``reduction="sum"``
top.1 (probabilities)      ``softmax(x / T, dim=axis)``
=========================  ===================================================

PyTorch has no FULL or BATCH_SIZE reduction and no Caffe FLT_MIN clamp; the
divisors above are what a PyTorch user writes for them.
"""

from netlite.reference.peers._common import (
    Unsupported,
    output_shape,
    softmax_loss_settings,
)


def reduction_of(s):
    """``(reduction, divisor)``: cross_entropy's ``reduction`` for the
    settings ``s`` and what its result is divided by afterwards (a string
    naming a count taken from the labels, or None)."""
    if s.per_position:
        return "none", None
    if s.weight_normalization in ("WEIGHTED", "LABEL_WEIGHTED"):
        return "mean", None
    if s.normalization == "VALID":
        if s.class_weight is None or s.soft:
            return "mean", None
        return "sum", "valid"
    if s.normalization == "FULL":
        return "sum", "positions"
    if s.normalization == "BATCH_SIZE":
        return "sum", "outer"
    if s.normalization == "NONE":
        return "sum", None
    raise Unsupported(f"normalization {s.normalization}")


def impl(case):
    """The implementation for ``netlite validate --framework torch``."""
    import torch
    import torch.nn.functional as F

    s = softmax_loss_settings(case)
    x = case.inputs["bottom.0"]
    target = case.inputs["bottom.1"]
    xm = torch.movedim(x, s.axis, 1)
    if s.soft:
        tm = torch.movedim(target, s.axis, 1)
    else:
        tm = target.reshape(xm.shape[:1] + xm.shape[2:])
    weight = (
        None
        if s.class_weight is None
        else torch.tensor(s.class_weight, dtype=x.dtype, device=x.device)
    )
    reduction, divisor = reduction_of(s)
    T = s.temperature
    loss = F.cross_entropy(
        xm / T if T != 1 else xm,
        tm,
        weight=weight,
        ignore_index=-100 if s.ignore_label is None else s.ignore_label,
        reduction=reduction,
        label_smoothing=s.label_smoothing,
    )
    if T != 1:
        loss = loss * (T * T)
    if divisor == "valid":
        count = tm.numel() if s.ignore_label is None else (tm != s.ignore_label).sum()
        loss = loss / max(int(count), 1)
    elif divisor == "positions":
        loss = loss / tm.numel()
    elif divisor == "outer":
        outer = 1
        for d in x.shape[: s.axis]:
            outer *= int(d)
        loss = loss / outer
    outs = [loss.reshape(output_shape(case, 0))]
    if s.prob_top:
        outs.append(torch.softmax(x / T if T != 1 else x, dim=s.axis))
    return outs
