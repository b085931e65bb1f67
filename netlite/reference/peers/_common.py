"""What the peers share: the reading of a SoftmaxWithLoss case's
hyper-parameters (docs/layers/softmax_loss.md §2, §8)."""

from dataclasses import dataclass


class Unsupported(NotImplementedError):
    """The peer cannot express this case (reported by the harness as an
    error row whose message starts with ``Unsupported:``)."""


@dataclass(frozen=True)
class SoftmaxLossSettings:
    axis: int  # the class axis, non-negative
    ignore_label: int  # None when not set
    class_weight: tuple  # None when not set
    normalization: str  # FULL, VALID, BATCH_SIZE or NONE
    weight_normalization: str  # UNWEIGHTED, WEIGHTED or LABEL_WEIGHTED
    label_smoothing: float
    temperature: float
    per_position: bool
    soft: bool  # bottom.1 holds probability targets
    prob_top: bool  # the case wants top.1, the probabilities


def softmax_loss_settings(case):
    """The :class:`SoftmaxLossSettings` of a ``SoftmaxWithLoss`` case."""
    if case.kind != "layer" or case.layer_type != "SoftmaxWithLoss":
        raise Unsupported(f"{case.id}: only SoftmaxWithLoss layer cases")
    p = case.params_text
    lp = p.get("loss_param", {})
    x = case.inputs["bottom.0"]
    ndim = len(x.shape)
    axis = int(p.get("softmax_param", {}).get("axis", 1)) % ndim
    if "normalization" in lp:
        norm = lp["normalization"]
    elif "normalize" in lp:
        norm = "VALID" if lp["normalize"] else "BATCH_SIZE"
    else:
        norm = "VALID"
    weights = lp.get("class_weight")
    return SoftmaxLossSettings(
        axis=axis,
        ignore_label=int(lp["ignore_label"]) if "ignore_label" in lp else None,
        class_weight=tuple(float(w) for w in weights) if weights else None,
        normalization=norm,
        weight_normalization=lp.get("weight_normalization", "UNWEIGHTED"),
        label_smoothing=float(lp.get("label_smoothing", 0.0)),
        temperature=float(lp.get("temperature", 1.0)),
        per_position=bool(lp.get("per_position", False)),
        soft="bottom.1" not in case.labels,
        prob_top=len(case.output_names) > 1,
    )


def output_shape(case, i=0):
    """The stored shape of output ``i``."""
    return tuple(case.record.specs("output")[i].shape)
