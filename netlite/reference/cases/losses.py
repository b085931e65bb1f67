"""Cases of the losses: SoftmaxWithLoss (every normalization, ignored labels
inside and outside [0, C), all ignored, spatial axes, the class axis last,
huge and tiny logits, the FLT_MIN clamp, class weights, label smoothing,
temperature, probability targets, per-position losses), FocalLoss,
EuclideanLoss and HingeLoss (docs/reference.md §2).
"""

import numpy as np

from netlite.reference.cases.spec import (
    LOG_FLT_MIN,
    CaseList,
    away,
    custom,
    gauss,
    labels,
    probs,
    tolerance,
)

CASES = CaseList()
add = CASES.add


def _label_shape(shape, axis):
    axis %= len(shape)
    return shape[:axis] + shape[axis + 1 :]


# ------------------------------------------------------------- SoftmaxWithLoss
_SWL = "docs/layers/softmax_loss.md#3-backward"
_SWL_EXT = "docs/layers/softmax_loss.md#84-backward"
_SWL_EQ = "L = -sum_valid log p_y / normalizer; dx = (p - onehot(y)) / normalizer"
_SWL_EXT_EQ = (
    "L = -sum_i w_i sum_c t_ic log softmax(x_i / T)_c / Z; "
    "dx_i = w_i (p_i - t_i) / (T Z)"
)


def swl(
    name,
    shape,
    loss="",
    axis=1,
    ignore=None,
    every=3,
    soft=False,
    values=None,
    docs=_SWL,
    equation=_SWL_EQ,
    std=2.0,
    mean=0.0,
    **kw,
):
    text = f"softmax_param {{ axis: {axis} }}"
    if loss:
        text += f" loss_param {{ {loss} }}"
    n = shape[axis % len(shape)]
    if soft:
        target = probs(shape, axis % len(shape))
    else:
        target = labels(_label_shape(shape, axis), n, ignore, every, values)
    x = kw.pop("x", None) or gauss(shape, std=std, mean=mean)
    add("SoftmaxWithLoss", name, text, [x, target], docs, equation=equation, **kw)


swl(
    "valid_ignore_inside",
    (4, 5, 2),
    "normalization: VALID ignore_label: 2",
    ignore=2,
    edges=("ignored labels", "spatial"),
    description="VALID: divided by the count of non-ignored positions; the ignore "
    "label 2 is a class index",
)
swl(
    "full_ignore_outside",
    (6, 5),
    "normalization: FULL ignore_label: -1",
    ignore=-1,
    edges=("ignored labels",),
    description="FULL: divided by every position; ignore -1",
)
swl(
    "batch_size_spatial",
    (3, 4, 2, 3),
    "normalization: BATCH_SIZE ignore_label: 0",
    ignore=0,
    every=4,
    edges=("ignored labels", "spatial"),
    description="BATCH_SIZE: divided by N = 3; 2x3 spatial positions",
)
swl(
    "none_ignore_255",
    (6, 5),
    "normalization: NONE ignore_label: 255",
    ignore=255,
    edges=("ignored labels",),
    description="NONE: the plain sum",
)
swl("rows_default", (5, 7), description="no loss_param: VALID, no ignore label")
swl(
    "all_ignored",
    (4, 5),
    "normalization: VALID ignore_label: 3",
    values=[3, 3, 3, 3],
    edges=("all ignored",),
    description="every label ignored: loss 0 and gradient 0 (Caffe: normalizer "
    "max(count, 1)); PyTorch's mean reduction gives NaN",
)
swl(
    "all_ignored_full",
    (2, 3, 2),
    "normalization: FULL ignore_label: -1",
    values=[[-1, -1], [-1, -1]],
    edges=("all ignored", "spatial"),
    description="every label ignored under FULL: loss 0 and gradient 0",
)
swl(
    "axis_last",
    (3, 4, 5),
    axis=-1,
    edges=("spatial",),
    description="the class axis last (softmax_param { axis: -1 })",
)
swl(
    "huge_logits",
    (4, 5),
    mean=1e4,
    fd_step=1e-9,
    tolerance=tolerance(rtol32=1e-2, atol32=2e-3),
    edges=("huge logits",),
    description="logits around 1e4: a softmax without the max shift overflows",
)
swl(
    "tiny_logits",
    (4, 5),
    std=1e-6,
    edges=("tiny logits",),
    description="logits of size 1e-6: p nearly uniform",
)


def _clamp_logits(shape):
    def fn(r):
        x = r.standard_normal(shape)
        x[0] = [0.0, -200.0, 1.0, 0.5, -0.5]  # label 1: p = e^-200 < FLT_MIN
        return x

    return custom(shape, fn)


def _clamp_rows(arrays):
    return {"bottom.0": np.arange(20).reshape(4, 5) < 5}


def _clamp_gradient(arrays):
    x, y = arrays["bottom.0"], arrays["bottom.1"].astype(int)
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(4), y] -= 1
    return {"grad.bottom.0": p * float(arrays["top_diff.0"].ravel()[0]) / 4}


swl(
    "flt_min_clamp",
    (4, 5),
    values=[1, 0, 2, 3],
    x=_clamp_logits((4, 5)),
    edges=("FLT_MIN clamp",),
    fd_skip=_clamp_rows,
    closed_form=_clamp_gradient,
    description=f"row 0's label has p = e^-200: its loss is clamped to -log FLT_MIN = "
    f"{LOG_FLT_MIN:.4f} and its gradient is still p - onehot (Caffe's backward "
    "ignores the clamp); row 0 is held to that closed form instead of finite "
    "differences, which see the flat clamp",
)
swl(
    "prob_top",
    (4, 6, 3),
    tops=2,
    dead_tops=(1,),
    edges=("spatial",),
    description="top.1 is the probability: no gradient flows from it (upstream 0)",
)

# Extensions (softmax_loss.md §8): name, shape, loss_param, the ignore label
# (or "soft": probability targets), edges, description.
_W = "class_weight: [0.5, 2.0, 1.0, 3.0, 0.25]"
_IGN, _CW, _LS = "ignored labels", "class weights", "label smoothing"
for name, shape, loss, target, edges, description in [
    (
        "class_weight",
        (6, 5),
        f"normalization: VALID ignore_label: 2 {_W}",
        2,
        (_IGN, _CW),
        "",
    ),
    (
        "class_weight_weighted",
        (8, 5),
        f"ignore_label: -1 {_W} weight_normalization: WEIGHTED",
        -1,
        (_IGN, _CW),
        "WEIGHTED: divided by the sum of the valid positions' weights",
    ),
    (
        "label_smoothing",
        (6, 5),
        "ignore_label: 255 label_smoothing: 0.1",
        255,
        (_IGN, _LS),
        "",
    ),
    (
        "smoothing_weighted",
        (6, 5),
        f"ignore_label: -100 {_W} weight_normalization: WEIGHTED label_smoothing: 0.2",
        -100,
        (_IGN, _CW, _LS),
        "PyTorch's cross_entropy(weight, label_smoothing) differs here "
        "(softmax_loss.md §8.3)",
    ),
    (
        "temperature",
        (4, 5, 3),
        "ignore_label: 7 temperature: 2.5",
        7,
        (_IGN, "temperature", "spatial"),
        "",
    ),
    (
        "soft_targets_temperature",
        (6, 5),
        "temperature: 3.0 class_weight: [1.0, 2.0, 0.5, 1.5, 1.0]",
        "soft",
        ("probability targets", "temperature", _CW),
        "probability targets (bottom.1, not differentiated), T = 3",
    ),
    (
        "per_position",
        (4, 5, 3),
        f"ignore_label: -1 {_W} label_smoothing: 0.1 per_position: true",
        -1,
        ("per position", _IGN, _LS, "spatial"),
        "top.0 holds one loss per position (4, 3)",
    ),
]:
    swl(
        name,
        shape,
        loss,
        ignore=None if target == "soft" else target,
        soft=target == "soft",
        edges=edges,
        description=description,
        docs=_SWL_EXT,
        equation=_SWL_EXT_EQ,
    )

# ------------------------------------------------------------------- FocalLoss
_FOCAL = "docs/layers/focal_loss.md#3-backward"
_FOCAL_EQ = "L = -alpha w_y (1 - p_y)^gamma log p_y / normalizer"


def focal(
    name,
    shape,
    gamma,
    loss="",
    alpha=1.0,
    kind="ORIGIN",
    axis=1,
    ignore=None,
    values=None,
    **kw,
):
    text = (
        f"softmax_param {{ axis: {axis} }} loss_param {{ {loss} }} focal_loss_param "
        f"{{ type: {kind} gamma: {gamma} alpha: {alpha} }}"
    )
    n = shape[axis % len(shape)]
    add(
        "FocalLoss",
        name,
        text,
        [
            gauss(shape, std=2.0),
            labels(_label_shape(shape, axis), n, ignore, 3, values),
        ],
        _FOCAL,
        equation=_FOCAL_EQ,
        **kw,
    )


focal("gamma2", (6, 5), 2.0)
focal(
    "gamma0_ignore",
    (6, 5),
    0.0,
    "ignore_label: 3",
    ignore=3,
    edges=("ignored labels",),
    description="gamma 0: the softmax loss",
)
focal(
    "gamma_half_outside",
    (8, 5),
    0.5,
    "ignore_label: -1",
    ignore=-1,
    edges=("ignored labels",),
    description="gamma 0.5: (1 - p)^(gamma - 1) grows at p -> 1",
)
focal(
    "alpha_weights_batch",
    (6, 5),
    1.0,
    f"normalization: BATCH_SIZE ignore_label: 0 {_W}",
    alpha=0.25,
    ignore=0,
    edges=("ignored labels", "class weights"),
)
focal(
    "oneaddp",
    (6, 5),
    2.0,
    "ignore_label: 1",
    kind="ONEADDP",
    ignore=1,
    edges=("ignored labels",),
    description="happynear's ONEADDP variant",
)
focal(
    "per_position_spatial",
    (4, 5, 3),
    0.5,
    "ignore_label: 4 per_position: true",
    ignore=4,
    edges=("per position", "spatial", "ignored labels"),
)
focal("axis_last", (3, 4, 5), 3.0, axis=-1, edges=("spatial",))
focal(
    "all_ignored",
    (4, 5),
    2.0,
    "ignore_label: 2",
    values=[2, 2, 2, 2],
    edges=("all ignored",),
    description="loss 0 and gradient 0",
)

# --------------------------------------------------------------- EuclideanLoss
_EUC = "docs/layers/euclidean_loss.md#3-backward"
_EUC_EQ = "L = ||a - b||^2 / (2N); da = (a - b) / N, db = -da"
CASES.family(
    "EuclideanLoss",
    _EUC,
    [
        (
            "rows",
            "",
            [gauss((4, 3)), gauss((4, 3))],
            "both bottoms differentiable (the target may be learned)",
        ),
        (
            "shapes_differ",
            "",
            [gauss((4, 3, 1, 1)), gauss((4, 3))],
            "same count, different shapes",
        ),
        ("spatial", "", [gauss((2, 3, 2)), gauss((2, 6))], "", {"edges": ("spatial",)}),
    ],
    equation=_EUC_EQ,
)

# ------------------------------------------------------------------- HingeLoss
_HINGE = "docs/layers/hinge_loss.md#3-backward"


def _hinge(name, shape, label_shape, norm, **kw):
    classes = int(np.prod(shape[1:]))
    add(
        "HingeLoss",
        name,
        f"hinge_loss_param {{ norm: {norm} }}",
        [
            away(shape, kinks=(-1.0, 1.0), gap=0.05, std=2.0),
            labels(label_shape, classes),
        ],
        _HINGE,
        equation="m = max(0, 1 - t x), t = +-1; L1: sum m / N, L2: sum m^2 / N",
        description="scores at least 0.05 from the kinks at |x| = 1",
        **kw,
    )


_hinge("l1", (6, 5), (6,), "L1")
_hinge("l2", (6, 5), (6,), "L2")
_hinge("l2_spatial", (4, 2, 3), (4,), "L2", edges=("spatial",))
_hinge("l1_caffe_shapes", (5, 4, 1, 1), (5, 1, 1, 1), "L1")
