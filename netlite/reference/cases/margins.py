"""Cases of the margin family and its normalisation layers: Normalize,
InnerProduct { normalize } (TRUE_GRADIENT, with RENORM_INPLACE as a
surrogate), LargeMarginInnerProduct, MarginInnerProduct (SPHEREFACE
surrogate), LabelSpecificAdd, LabelSpecificMargin (STRAIGHT_THROUGH and
CLAMPED surrogates; |cos| = 1, theta = 0, theta = pi, theta + m > pi under
each boundary), SubCenterMax, RingLoss (docs/reference.md §2).
"""

import math

import numpy as np

from netlite.reference.cases.spec import (
    CaseList,
    away,
    custom,
    fixed,
    gauss,
    labels,
    tolerance,
    unif,
)

CASES = CaseList()
add = CASES.add


def _zero_row(shape, row=1):
    def fn(r):
        x = r.standard_normal(shape)
        x[row] = 0
        return x

    return custom(shape, fn)


# ------------------------------------------------------------------- Normalize
_NORM = "docs/layers/normalize.md#3-backward"
_NORM_EQ = "y = x / sqrt(|x|^2 + eps); dx = (dy - y (y . dy)) / sqrt(|x|^2 + eps)"


def normalize(name, shape, text="", x=None, **kw):
    kw.setdefault("equation", _NORM_EQ)
    add(
        "Normalize",
        name,
        f"normalize_param {{ {text} }}",
        [x or gauss(shape)],
        _NORM,
        **kw,
    )


normalize("l2_4d", (2, 3, 2, 2), description="over the channels at every position")
normalize("l2_rows", (4, 5))
normalize("l2_eps", (3, 4), "eps: 0.5", description="a large eps under the root")
normalize(
    "l2_zero_vector",
    (3, 4),
    x=_zero_row((3, 4)),
    fd_step=1e-7,
    edges=("zero norm",),
    description="row 1 is 0: y = 0, dx = dy / sqrt(eps)",
)
normalize(
    "l2_norm_top",
    (3, 4),
    "bp_norm: true",
    tops=2,
    description="top.1 is the norm, back-propagated (bp_norm)",
)
normalize(
    "l1_rows",
    (4, 5),
    'normalize_type: "L1"',
    x=away((4, 5)),
    equation="y = x / (sum |x| + eps)",
    description="values 0.05 from the kink at 0",
)

# ------------------------------------------------------ InnerProduct { normalize }
_IPN = "docs/layers/inner_product.md#9-weight-normalisation-normalize-true"
_IPN_EQ = (
    "Y = X What^T + b, What_n = w_n / sqrt(|w_n|^2 + 1e-6); "
    "dw_n = (g_n - What_n (What_n . g_n)) / nu_n"
)


def _ipn_text(mode, n, transpose="false", bias="true", axis=1):
    return (
        f"inner_product_param {{ num_output: {n} axis: {axis} transpose: {transpose} "
        f"bias_term: {bias} normalize: true weight_norm_mode: {mode} }}"
    )


def ip_normalize(name, shape, n, zero_row=False, **fields):
    def params(rng, shapes):
        out = [rng.standard_normal(s) for s in shapes]
        if zero_row:  # (N, K) weights: row 1 is class 1's
            out[0][1] = 0
        return out

    true = _ipn_text("TRUE_GRADIENT", n, **fields)
    renorm = _ipn_text("RENORM_INPLACE", n, **fields)
    extra = {"edges": ("zero norm",), "fd_step": 1e-7} if zero_row else {}
    add(
        "InnerProduct",
        name,
        true,
        [gauss(shape)],
        _IPN,
        equation=_IPN_EQ,
        params=params,
        warmup=f'type: "InnerProduct" {renorm}',
        surrogates=(("RENORM_INPLACE", f'type: "InnerProduct" {renorm}'),),
        description="weights stored after one RENORM_INPLACE forward (rows of norm "
        "1 - O(1e-6)); gradient: TRUE_GRADIENT; surrogate RENORM_INPLACE: the plain "
        "weight diff dY^T X, not projected",
        **extra,
    )


ip_normalize("normalize_rows", (5, 3), 4)
ip_normalize("normalize_transpose", (2, 3, 2), 3, transpose="true", bias="false")
ip_normalize("normalize_zero_row", (4, 3), 3, zero_row=True, bias="false")

# ----------------------------------------- LargeMarginInnerProduct / MarginInnerProduct
TYPES = {1: "SINGLE", 2: "DOUBLE", 3: "TRIPLE", 4: "QUADRUPLE"}
W_0_PI = np.array(
    [[0.9, -0.4, 0.3], [0.2, 1.1, -0.5], [-0.7, 0.1, 0.8], [0.5, 0.6, 0.4]]
)
LABELS_0_PI = [0, 1, 2, 3, 0, 1, 2, 3]


def _features_0_pi():
    """Rows 0-3 exactly (anti)parallel to their class's weight row (c = +-1),
    rows 4-7 within ~1e-3 rad of it."""
    gen = np.random.default_rng(3)
    x = np.empty((8, 3))
    for i, y in enumerate(LABELS_0_PI):
        x[i] = (1.0 if i % 2 == 0 else -1.0) * (1.5 + 0.25 * i) * W_0_PI[y]
        if i >= 4:
            x[i] += 1e-3 * gen.standard_normal(3)
    return x


def _fixed_weights(w):
    return lambda rng, shapes: [np.array(w, dtype=np.float64).reshape(shapes[0])]


def _unit_rows(rng, shapes):
    w = rng.standard_normal(shapes[0])
    return [w / np.linalg.norm(w, axis=1, keepdims=True)]


def _zero_x_row(arrays):
    x = arrays["bottom.0"]
    return {"bottom.0": np.broadcast_to(np.all(x == 0, axis=1, keepdims=True), x.shape)}


def _zero_w_row(arrays):
    w = arrays["param.0"]
    return {"param.0": np.broadcast_to(np.all(w == 0, axis=1, keepdims=True), w.shape)}


def margin_ip(
    layer_type,
    name,
    m,
    sched="base: 0",
    shape=(6, 3),
    n=5,
    ignore=None,
    label_values=None,
    x=None,
    weights=None,
    surrogate=False,
    **kw,
):
    param = (
        "largemargin_inner_product_param"
        if layer_type == "LargeMarginInnerProduct"
        else "margin_inner_product_param"
    )
    loss = f"loss_param {{ ignore_label: {ignore} }} " if ignore is not None else ""

    def text(mode=None):
        grad = f"grad_mode: {mode} " if mode else ""
        return f"{loss}{param} {{ num_output: {n} type: {TYPES[m]} {grad}{sched} }}"

    def full(mode):
        return f'type: "{layer_type}" {text(mode)}'

    lab = labels(shape[:1], n, ignore, 3, label_values)
    if weights is not None:
        kw["params"] = _fixed_weights(weights)
    page = (
        "large_margin_inner_product.md#3-backward"
        if layer_type == "LargeMarginInnerProduct"
        else "margin_inner_product.md#3-backward-grad_mode-exact"
    )
    if surrogate:
        kw.setdefault("params", _unit_rows)
        kw["warmup"] = full("SPHEREFACE")
        kw["surrogates"] = (("SPHEREFACE", full("SPHEREFACE")),)
    kw.setdefault("params", "random")
    body = text("EXACT" if layer_type == "MarginInnerProduct" else None)
    add(
        layer_type,
        name,
        body,
        [x or gauss(shape), lab],
        f"docs/layers/{page}",
        param_std=0.7,
        equation="z_iy = (lambda x.w_y + |x||w| psi_m(cos theta)) / (1 + lambda), "
        "psi_m = (-1)^k cos(m theta) - 2k",
        **kw,
    )


_THETA = dict(
    weights=W_0_PI,
    n=4,
    shape=(8, 3),
    x=fixed(_features_0_pi()),
    label_values=LABELS_0_PI,
    edges=("|cos|=1", "theta=0", "theta=pi"),
)
# name, m, whether MarginInnerProduct's case has the SPHEREFACE surrogate, fields
_MARGIN_IP_CASES = [
    (
        "single",
        1,
        True,
        {
            "sched": "",
            "description": "m = 1: a plain inner product (normalised weights for "
            "MarginInnerProduct)",
        },
    ),
    ("double", 2, True, {}),
    (
        "triple_lambda_1",
        3,
        True,
        {"sched": "", "description": "lambda = 1 (the proto defaults)"},
    ),
    ("quadruple", 4, True, {}),
    (
        "quadruple_schedule",
        4,
        True,
        {
            "sched": "base: 1000 gamma: 0.12 power: 1 lambda_min: 5 iteration: 900",
            "description": "SphereFace-20's schedule at iteration 900",
        },
    ),
    (
        "triple_spatial",
        3,
        False,
        {
            "shape": (4, 2, 1, 3),
            "edges": ("spatial",),
            "description": "features flattened from axis 1 (K = 6)",
        },
    ),
    (
        "ignore",
        4,
        True,
        {"sched": "base: 0.5", "ignore": -1, "edges": ("ignored labels",)},
    ),
    (
        "all_ignored",
        4,
        False,
        {
            "ignore": 7,
            "label_values": [7] * 6,
            "edges": ("all ignored",),
            "description": "no row gets a margin: z = x W^T",
        },
    ),
    ("quadruple_theta_0_pi", 4, True, _THETA),
    ("double_theta_0_pi", 2, False, _THETA),
    (
        "zero_feature",
        4,
        True,
        {
            "x": _zero_row((6, 3)),
            "edges": ("zero norm",),
            "fd_skip": _zero_x_row,
            "fd_skip_reason": "the target logit |x| phi(c) is not differentiable at "
            "x = 0; the stored value is the documented convention (margin pages "
            "section 4/5), pinned by the layer's zero_feature test case",
        },
    ),
]
for lt in ("LargeMarginInnerProduct", "MarginInnerProduct"):
    sur = lt == "MarginInnerProduct"
    for name, m, with_surrogate, fields in _MARGIN_IP_CASES:
        margin_ip(lt, name, m, surrogate=sur and with_surrogate, **fields)
    margin_ip(
        lt,
        "zero_weight_row",
        3,
        weights=np.where(np.arange(4)[:, None] == 2, 0.0, W_0_PI),
        n=4,
        edges=("zero norm",),
        label_values=[0, 1, 3, 3, 0, 1],
        fd_step=1e-7,
        **(
            {
                "fd_skip": _zero_w_row,
                "fd_skip_reason": "w / max(|w|, 1e-12) is not differentiable at w = 0; "
                "the stored row is dE/dw_hat / 1e-12's derivative convention "
                "(margin_inner_product.md section 5)",
            }
            if sur
            else {}
        ),
    )

# ------------------------------------------------------------ LabelSpecificAdd
_LSA = "docs/layers/label_specific_add.md#3-backward"


def lsa(name, text, shape=(6, 5), ignore=None, loss="", x=None, **kw):
    add(
        "LabelSpecificAdd",
        name,
        f"label_specific_add_param {{ {text} }} {loss}",
        [x or unif(shape, -0.9, 0.9), labels(shape[:1], shape[1], ignore, 3)],
        _LSA,
        equation="z_iy = x_iy + b (AM-Softmax / CosFace with b = -m); dx = dz",
        **kw,
    )


lsa("rows", "bias: -0.35")
lsa("caffe_4d", "bias: -0.35", shape=(4, 3, 1, 1))
lsa(
    "ignore_inside",
    "bias: -0.35",
    ignore=2,
    loss="loss_param { ignore_label: 2 }",
    edges=("ignored labels",),
)
lsa(
    "only_above",
    "bias: -0.35 only_above_margin: true",
    x=away((6, 5), kinks=(0.35,), std=0.5),
    description="targets 0.05 from the jump at c = -b",
)
lsa("class_bias", "class_bias: [-0.1, -0.2, 0, -0.4, -0.5]", edges=("class margins",))
lsa(
    "annealed_bias_top",
    "bias_base: 0 bias_gamma: -5e-5 bias_power: 1 bias_min: -0.4 "
    "bias_max: 0 iteration: 3000",
    tops=2,
    dead_tops=(1,),
    description="annealed b(3000) = -0.15; top.1 is b (a constant, upstream 0)",
)

# --------------------------------------------------------- LabelSpecificMargin
_LSM = "docs/layers/label_specific_margin.md#3-backward"
_LSM_EQ = (
    "z_iy = m1' cos(m1 theta + m2) - m3 (with the boundary rule), dx_iy = psi'(c) dz"
)
_ST_CL = ("STRAIGHT_THROUGH", "CLAMPED")


def _targets_at(thetas, classes=5, seed=3):
    """Inputs whose target cosines sit at the angles ``thetas``."""
    n = len(thetas)
    rng = np.random.default_rng(seed)
    x = rng.uniform(-0.9, 0.9, (n, classes))
    y = rng.integers(0, classes, n)
    x[np.arange(n), y] = np.cos(thetas)
    return fixed(x), labels((n,), classes, values=y.astype(np.float64))


NEAR_ZERO = _targets_at([0.03, 0.05, 0.08, 0.12, 0.2, 0.4])
NEAR_PI = _targets_at(
    [math.pi - 0.03, math.pi - 0.05, math.pi - 0.1, math.pi - 0.2, 2.5, 1.0]
)
#: Targets at c = 1, -1 exactly, and 1e-9 inside: the derivative's edges.
COS_ONE = _targets_at([0.0, math.pi, 0.0, math.pi, 0.7, 2.0])


def _cos_one_skip(arrays):
    x, y = arrays["bottom.0"], arrays["bottom.1"].astype(int)
    mask = np.zeros(x.shape, bool)
    rows = np.arange(len(y))
    mask[rows, y] = np.abs(x[rows, y]) >= 1 - 1e-6
    return {"bottom.0": mask}


def lsm(name, text, inputs=None, surrogates=_ST_CL, extra="", **kw):
    body = f"label_specific_margin_param {{ {text} }} {extra}"
    full = f'type: "LabelSpecificMargin" {body}'
    kw.setdefault("edges", ())
    add(
        "LabelSpecificMargin",
        name,
        body,
        inputs or [unif((6, 5), -0.9, 0.9), labels((6,), 5)],
        _LSM,
        equation=_LSM_EQ,
        surrogates=tuple(
            (s, full.replace(" }", f" grad_mode: {s} }}", 1)) for s in surrogates
        ),
        **kw,
    )


lsm(
    "arcface_degrees",
    "margin_base: 28.6 gamma: 0",
    description="ArcFace m = 28.6 deg, THMM boundary",
)
lsm("arcface_radian", "margin_base: 0.5 gamma: 0 unit: RADIAN")
lsm(
    "combined",
    "margin_base: 0.4 gamma: 0 unit: RADIAN m1: 0.9 m3: 0.15",
    description="cos(m1 theta + m2) - m3",
)
lsm("cosface_m3", "m3: 0.35", surrogates=(), description="m2 = 0: CosFace")
lsm("easy", "margin_base: 28.6 gamma: 0 boundary: EASY")
lsm(
    "ignore",
    "margin_base: 28.6 gamma: 0",
    inputs=[unif((6, 5), -0.9, 0.9), labels((6,), 5, -1)],
    extra="loss_param { ignore_label: -1 }",
    edges=("ignored labels",),
)
lsm("class_margin", "class_margin: [10, 20, 30, 0, 45]", edges=("class margins",))
lsm(
    "caffe_4d",
    "margin_base: 28.6 gamma: 0",
    inputs=[unif((4, 3, 1, 1), -0.9, 0.9), labels((4,), 3)],
)
lsm(
    "near_zero_thmm",
    "margin_base: 28.6 gamma: 0",
    inputs=list(NEAR_ZERO),
    fd_step=1e-7,
    tolerance=tolerance(rtol64=1e-8, atol64=1e-11, rtol32=1e-3, atol32=1e-4),
    edges=("theta=0",),
    description="targets 0.03 to 0.4 rad",
)
for boundary in ("THMM", "EASY", "NONE"):
    lsm(
        f"theta_m_gt_pi_{boundary.lower()}",
        f"margin_base: 0.5 gamma: 0 unit: RADIAN m1: 0.8 boundary: {boundary}",
        inputs=list(NEAR_PI),
        fd_step=1e-7,
        edges=("theta+m>pi", "theta=pi"),
        tolerance=tolerance(rtol64=1e-8, atol64=1e-11, rtol32=2e-3, atol32=1e-4),
        description=f"targets within 0.03 to 0.2 rad of pi: theta + m > pi under "
        f"{boundary}",
    )
    lsm(
        f"cos_one_{boundary.lower()}",
        f"margin_base: 0.5 gamma: 0 unit: RADIAN boundary: {boundary}",
        inputs=list(COS_ONE),
        edges=("|cos|=1", "theta=0", "theta=pi"),
        fd_skip=_cos_one_skip,
        fd_skip_reason="at |c| = 1 the forward reads the clipped c, so the derivative "
        "does not exist (m2 > 0: it diverges); the stored factor is the documented "
        "held value psi'(1 - 1e-7) (label_specific_margin.md section 3), pinned by "
        "test_no_nan_or_inf_at_the_edges",
        tolerance=tolerance(rtol64=1e-7, atol64=1e-10, rtol32=None),
        description=f"targets at c = 1 and c = -1 exactly under {boundary}; float32 "
        "holds the factor at 1 - 1e-4 instead of 1 - 1e-7 (34.78 vs 1072.9 at c = 1)",
    )
lsm(
    "margin_top",
    "margin_base: 28.6 gamma: 0",
    tops=2,
    dead_tops=(1,),
    description="top.1 is the margin (a constant, upstream 0)",
)

# ---------------------------------------------------------------- SubCenterMax
_SCM = "docs/layers/sub_center_max.md#3-backward"


def scm(name, shape, k, axis=1, **kw):
    kw.setdefault("description", "gaussian: no ties")
    add(
        "SubCenterMax",
        name,
        f"sub_center_param {{ num_subcenters: {k} axis: {axis} }}",
        [gauss(shape)],
        _SCM,
        equation="y_c = max_k x_{cK+k}; dx routed to the argmax",
        **kw,
    )


scm("rows_k3", (4, 12), 3)
scm("k1", (3, 5), 1, description="K = 1: the identity")
scm("spatial", (2, 6, 3), 3, edges=("spatial",))
scm("axis_last", (3, 2, 6), 2)

# -------------------------------------------------------------------- RingLoss
_RING = "docs/layers/ring_loss.md#3-backward"


def ring(name, shape, kind="SQUARED", radius=1.5, per_position=False, x=None, **kw):
    add(
        "RingLoss",
        name,
        f"ring_loss_param {{ type: {kind} radius: {radius} eps: 1e-6 }} "
        f"loss_param {{ per_position: {str(per_position).lower()} }}",
        [x or gauss(shape)],
        _RING,
        params="keep",
        equation="L = sum_i (|x_i| - R)^2 / (2N) (SQUARED); dR = -sum(|x_i| - R) / N",
        **kw,
    )


ring("squared", (5, 3))
ring("squared_4d", (3, 2, 2, 2))
ring("charbonnier", (5, 3), "CHARBONNIER")
ring("per_position", (4, 2, 3), per_position=True, edges=("per position",))
ring(
    "zero_norm",
    (5, 3),
    x=_zero_row((5, 3)),
    edges=("zero norm",),
    description="row 1 is 0: the central difference is 0 by symmetry, as the gradient",
)
