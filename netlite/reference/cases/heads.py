"""Net cases: the composed heads of docs/layers/margin_family.md §1 (NormFace,
AM-Softmax, ArcFace, sub-center ArcFace, L2-softmax, L-Softmax, SphereFace),
each a float64 TRAIN net with an Input layer, ids ``Head/<name>``
(docs/reference.md §2).

Inputs are ``input.x`` (N x D features) and ``input.label``; the parameters
are every parameter blob, ``param.<layer>.<i>``, drawn by the prototxt's
fillers from the case seed (a blob with ``lr_mult: 0``, such as a fixed
scale, is stored without a gradient); the output is ``output.loss``.
"""

from netlite.reference.cases.spec import Case, gauss, labels

CASES = []
N, D, C = 4, 3, 3
_DOCS = "docs/layers/margin_family.md#2-one-formula-for-every-normalised-cosine-head"


def _input(d=D):
    return (
        'layer { name: "in" type: "Input" top: "x" top: "label" input_param { '
        f"shape {{ dim: {N} dim: {d} }} shape {{ dim: {N} }} }} }}\n"
    )


def _cosine(rows=C):
    return (
        'layer { name: "norm" type: "Normalize" bottom: "x" top: "xn" }\n'
        'layer { name: "fc" type: "InnerProduct" bottom: "xn" top: "cos" '
        f"inner_product_param {{ num_output: {rows} bias_term: false normalize: true "
        'weight_norm_mode: TRUE_GRADIENT weight_filler { type: "gaussian" } } }\n'
    )


def _scale(bottom, s, lr):
    return (
        f'layer {{ name: "scale" type: "Scale" bottom: "{bottom}" top: "logits" '
        f"param {{ lr_mult: {lr} }} scale_param {{ num_axes: 0 "
        f'filler {{ type: "constant" value: {s} }} }} }}\n'
    )


_LOSS = (
    'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "logits" '
    'bottom: "label" top: "loss" }\n'
)


def head(name, body, description, edges=(), surrogates=(), **kw):
    text = "force_backward: true\n" + _input(kw.pop("d", D)) + body
    CASES.append(
        Case(
            "Head",
            name,
            text,
            [("x", gauss((N, kw.pop("x_d", D)))), ("label", labels((N,), C))],
            docs=kw.pop("docs", _DOCS),
            kind="net",
            params="keep",
            edges=edges,
            equation=kw.pop("equation", "L = CE(s phi(xhat . what), y)"),
            description=description,
            surrogates=tuple(
                (m, "force_backward: true\n" + _input() + b) for m, b in surrogates
            ),
            **kw,
        )
    )


head(
    "NormFace",
    _cosine() + _scale("cos", 10, 1) + _LOSS,
    "Normalize -> InnerProduct{normalize} -> Scale(s = 10, learned) -> SoftmaxWithLoss",
)
_AM = (
    'layer { name: "margin" type: "LabelSpecificAdd" bottom: "cos" bottom: "label" '
    'top: "cos_m" label_specific_add_param { bias: -0.35 } }\n'
)
head(
    "AMSoftmax",
    _cosine() + _AM + _scale("cos_m", 10, 0) + _LOSS,
    "... -> LabelSpecificAdd(-0.35) -> Scale(s = 10, fixed) -> SoftmaxWithLoss",
)


def _arc(mode=""):
    grad = f" grad_mode: {mode}" if mode else ""
    return (
        'layer { name: "margin" type: "LabelSpecificMargin" bottom: "cos" '
        'bottom: "label" top: "cos_m" label_specific_margin_param { '
        f"margin_base: 0.5 gamma: 0 unit: RADIAN{grad} }} }}\n"
    )


head(
    "ArcFace",
    _cosine() + _arc() + _scale("cos_m", 10, 0) + _LOSS,
    "... -> LabelSpecificMargin(m = 0.5 rad, THMM) -> Scale(s = 10) -> loss; "
    "surrogate STRAIGHT_THROUGH: arcface_torch's backward",
    surrogates=(
        (
            "STRAIGHT_THROUGH",
            _cosine() + _arc("STRAIGHT_THROUGH") + _scale("cos_m", 10, 0) + _LOSS,
        ),
    ),
)
_SUB = _cosine(C * 2).replace('top: "cos"', 'top: "cos_all"') + (
    'layer { name: "sub" type: "SubCenterMax" bottom: "cos_all" top: "cos" '
    "sub_center_param { num_subcenters: 2 } }\n"
)
head(
    "SubCenterArcFace",
    _SUB + _arc() + _scale("cos_m", 10, 0) + _LOSS,
    "InnerProduct{normalize, C*2} -> SubCenterMax(2) -> ArcFace margin -> loss",
)
_L2 = (
    'layer { name: "norm" type: "Normalize" bottom: "x" top: "xn" }\n'
    'layer { name: "alpha" type: "Scale" bottom: "xn" top: "xs" param { lr_mult: 0 } '
    'scale_param { num_axes: 0 filler { type: "constant" value: 4 } } }\n'
    'layer { name: "fc" type: "InnerProduct" bottom: "xs" top: "logits" '
    f"inner_product_param {{ num_output: {C} "
    'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } } }\n'
)
head(
    "L2Softmax",
    _L2 + _LOSS,
    "Normalize -> Scale(alpha = 4, fixed) -> InnerProduct -> SoftmaxWithLoss",
)


def _mult(layer_type, param, extra=""):
    return (
        f'layer {{ name: "fc" type: "{layer_type}" bottom: "x" bottom: "label" '
        f'top: "logits" {param} {{ num_output: {C} type: DOUBLE base: 1 {extra}'
        'weight_filler { type: "gaussian" } } }\n'
    )


head(
    "LSoftmax",
    _mult("LargeMarginInnerProduct", "largemargin_inner_product_param") + _LOSS,
    "LargeMarginInnerProduct(m = 2, lambda = 1) -> SoftmaxWithLoss",
    docs="docs/layers/large_margin_inner_product.md#3-backward",
    equation="z_iy = (lambda x.w + |x||w| psi_2(c)) / (1 + lambda)",
)
head(
    "SphereFace",
    _mult("MarginInnerProduct", "margin_inner_product_param", "grad_mode: EXACT ")
    + _LOSS,
    "MarginInnerProduct(m = 2, lambda = 1) -> SoftmaxWithLoss; surrogate SPHEREFACE: "
    "the fork's rescaled backward (weights stored after its in-place renormalisation)",
    docs="docs/layers/margin_inner_product.md#3-backward-grad_mode-exact",
    equation="z_iy = (lambda x.what + |x| psi_2(c)) / (1 + lambda)",
    warmup="force_backward: true\n"
    + _input()
    + _mult(
        "MarginInnerProduct", "margin_inner_product_param", "grad_mode: SPHEREFACE "
    )
    + _LOSS,
    surrogates=(
        (
            "SPHEREFACE",
            _mult(
                "MarginInnerProduct",
                "margin_inner_product_param",
                "grad_mode: SPHEREFACE ",
            )
            + _LOSS,
        ),
    ),
)
