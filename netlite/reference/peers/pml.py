"""The composed heads and the margin layers through pytorch-metric-learning
2.9.0 (framework ``torch``; docs/validation.md §2).

Conventions mapped here, not in pml:

* weights: netlite's blob is (C, D) (a row per class), pml's ``W`` is
  (D, C); the case's blob enters as ``param.T`` through
  ``torch.func.functional_call``, so autograd reaches the case's tensor;
  sub-centres are class-major in both (column ``c * K + k``);
* ArcFace's margin: netlite's ``margin_base`` (degrees unless ``unit:
  RADIAN``) is given to pml in degrees; ``scale`` is the head's Scale blob
  (s); NormalizedSoftmaxLoss's ``temperature`` is 1 / s (a tensor, so a
  learned s gets its gradient);
* pml has no lambda (L-Softmax / SphereFace blend (lambda c + psi) / (1 +
  lambda)): with lambda = 0 the loss is pml's own; otherwise the target
  logits are blended here from pml's pieces (``get_cosine``,
  ``modify_cosine_of_target_classes``, ``scale_logits``);
* pml has no ignore label: rows whose label is ignored keep the plain
  logit (done here);
* pml reduces with ``MeanReducer`` (the mean over the batch): netlite's
  VALID with no ignored label.

:func:`impl` is pml as shipped; :func:`impl_netlite_eps` is the same with
pml's L2 normalisation ``x / max(|x|, 1e-12)`` replaced by netlite's
``x / sqrt(|x|^2 + 1e-6)`` (Normalize and InnerProduct{normalize}), which
isolates that difference.
"""

import math
import warnings

from netlite.reference.peers._common import Unsupported

# netlite's eps under the root in Normalize and InnerProduct{normalize}.
NETLITE_EPS = 1e-6


# ----------------------------------------------------------------- helpers
def _layers(case):
    return {ly["name"]: ly for ly in case.params_text.get("layer", [])}


def _lambda(p):
    """netlite's lambda schedule at solver iteration 0 (large_margin_inner_
    product.md §2.3)."""
    it = int(p.get("iteration", 0)) + 1
    base = float(p.get("base", 1.0))
    gamma = float(p.get("gamma", 0.0))
    power = float(p.get("power", 1.0))
    return max(float(p.get("lambda_min", 0.0)), base * (1.0 + gamma * it) ** -power)


_M = {"SINGLE": 1, "DOUBLE": 2, "TRIPLE": 3, "QUADRUPLE": 4}


def _margin_radians(p):
    """LabelSpecificMargin's m2 in radians, for the cases pml expresses
    (one margin for every class, m1 = 1, m3 = 0, THMM, constant)."""
    if p.get("class_margin"):
        raise Unsupported("per-class margins (pml has one margin)")
    if float(p.get("m1", 1.0)) != 1.0 or float(p.get("m3", 0.0)) != 0.0:
        raise Unsupported("combined margins m1, m3 (pml's ArcFaceLoss has m2 only)")
    if p.get("boundary", "THMM") != "THMM":
        raise Unsupported(f"boundary {p['boundary']} (pml's ArcFaceLoss is THMM)")
    if p.get("type", "HARD") != "HARD" or float(p.get("gamma", 1.0)) != 0.0:
        raise Unsupported("a margin schedule (pml's margin is constant)")
    m = float(p.get("margin_base", 0.0))
    return m if p.get("unit", "DEGREE") == "RADIAN" else math.radians(m)


def _netlite_normalize(x, dim=1, **_):
    import torch

    return x / torch.sqrt((x * x).sum(dim=dim, keepdim=True) + NETLITE_EPS)


def _loss(cls, netlite_eps, **kwargs):
    """A pml loss in float64 on the CPU; with ``netlite_eps`` its distance
    normalises as netlite does."""
    import torch

    with warnings.catch_warnings():
        # LargeMarginSoftmaxLoss.init_margin calls scipy.special.binom on
        # torch scalars: NumPy 2's DeprecationWarning about __array_wrap__.
        warnings.simplefilter("ignore", DeprecationWarning)
        loss = cls(**kwargs).to(torch.float64)
    if netlite_eps:
        loss.distance.normalize = _netlite_normalize
    return loss


def _call(loss, W, x, y):
    """pml's loss with ``W`` (D, C) in place of its parameter."""
    from torch.func import functional_call

    return functional_call(loss, {"W": W}, (x, y))


# ------------------------------------------------------------------- heads
def _head(case, netlite_eps):
    name = case.id.split("/", 1)[1]
    x, y = case.inputs["input.x"], case.inputs["input.label"]
    P = case.params
    ly = _layers(case)
    N, D = x.shape
    if name == "L2Softmax":
        raise Unsupported(
            "pml has no L2-softmax (normalised features times a fixed alpha into a "
            "plain inner product with bias)"
        )
    if name in ("LSoftmax", "SphereFace"):
        return _multiplicative_head(case, name, netlite_eps)
    from pytorch_metric_learning import losses

    W = P["param.fc.0"].T  # (D, C) or (D, C * K)
    s = P["param.scale.0"].reshape(())
    if name == "NormFace":
        C = W.shape[1]
        loss = _loss(
            losses.NormalizedSoftmaxLoss, netlite_eps, num_classes=C, embedding_size=D
        )
        loss.temperature = 1.0 / s
        if netlite_eps:
            # get_logits normalises W itself, then its distance normalises
            # both operands again (idempotent with pml's x / |x|, not with
            # the eps form): normalise each once, as netlite does.
            loss.distance.normalize_embeddings = False
            x = _netlite_normalize(x)
        return {"output.loss": _call(loss, W, x, y)}
    if name == "AMSoftmax":
        bias = float(ly["margin"]["label_specific_add_param"]["bias"])
        loss = _loss(
            losses.CosFaceLoss,
            netlite_eps,
            num_classes=W.shape[1],
            embedding_size=D,
            margin=-bias,
        )
        loss.scale = s
        return {"output.loss": _call(loss, W, x, y)}
    m = _margin_radians(ly["margin"]["label_specific_margin_param"])
    if name == "ArcFace":
        loss = _loss(
            losses.ArcFaceLoss,
            netlite_eps,
            num_classes=W.shape[1],
            embedding_size=D,
            margin=math.degrees(m),
        )
    elif name == "SubCenterArcFace":
        k = int(ly["sub"]["sub_center_param"]["num_subcenters"])
        loss = _loss(
            losses.SubCenterArcFaceLoss,
            netlite_eps,
            num_classes=W.shape[1] // k,
            embedding_size=D,
            margin=math.degrees(m),
            sub_centers=k,
        )
    else:
        raise Unsupported(f"no pml loss for {case.id}")
    loss.scale = s
    return {"output.loss": _call(loss, W, x, y)}


def _multiplicative_head(case, name, netlite_eps):
    import torch.nn.functional as F

    x, y = case.inputs["input.x"], case.inputs["input.label"]
    fc = _layers(case)["fc"]
    key = (
        "largemargin_inner_product_param"
        if name == "LSoftmax"
        else "margin_inner_product_param"
    )
    z = _multiplicative_logits(
        name == "SphereFace",
        fc[key],
        x,
        case.params["param.fc.0"],
        y,
        None,
        netlite_eps,
    )
    return {"output.loss": F.cross_entropy(z, y)}


def _multiplicative_logits(sphere, p, x, w, y, ignore, netlite_eps):
    """L-Softmax (``sphere`` False: LargeMarginSoftmaxLoss) or SphereFace
    (SphereFaceLoss) logits from pml's pieces, with netlite's lambda blend
    on the target logits; ``w`` (C, D)."""
    import torch
    from pytorch_metric_learning import losses

    m = _M[p.get("type", "SINGLE")]
    lam = _lambda(p)
    cls = losses.SphereFaceLoss if sphere else losses.LargeMarginSoftmaxLoss
    # netlite's multiplicative layers normalise with max(|v|, 1e-12), as
    # pml does: no eps to swap here.
    del netlite_eps
    loss = _loss(
        cls, False, num_classes=w.shape[0], embedding_size=x.shape[1], margin=m, scale=1
    )
    loss.cast_types(x.dtype, x.device)
    # pml's compute_loss (large_margin_softmax_loss.py) step by step, with the
    # case's (C, D) blob, transposed, in place of the parameter W (D, C), so
    # autograd reaches the case's tensor.
    del loss.W
    loss.W = w.T
    valid = torch.ones_like(y, dtype=torch.bool) if ignore is None else y != ignore
    yv = torch.where(valid, y, torch.zeros_like(y))
    mask = torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype)
    rows = torch.arange(x.shape[0])
    mask[rows[valid], yv[valid]] = 1
    cosine = loss.get_cosine(x)
    c = cosine[rows, yv]
    psi = loss.modify_cosine_of_target_classes(c)
    # netlite's phi = (lambda c + psi) / (1 + lambda); pml's is psi.
    phi = (lam * c + psi) / (1.0 + lam)
    logits = cosine + mask * (phi - c).unsqueeze(1)
    return loss.scale_logits(logits, x)


# ---------------------------------------------------------- per-layer cases
def _lsm(case, netlite_eps):
    """LabelSpecificMargin through ArcFaceLoss.modify_cosine_of_target_classes
    (CosFace's subtraction for m2 = 0, m3 > 0)."""
    import torch
    from pytorch_metric_learning import losses

    p = case.params_text.get("label_specific_margin_param", {})
    x, y = case.inputs["bottom.0"], case.inputs["bottom.1"]
    shape = x.shape
    x2 = x.reshape(shape[0], -1)
    ignore = case.params_text.get("loss_param", {}).get("ignore_label")
    if (
        float(p.get("margin_base", 0.0)) == 0.0
        and not p.get("class_margin")
        and (float(p.get("m1", 1.0)) == 1.0)
    ):
        loss = _loss(
            losses.CosFaceLoss,
            netlite_eps,
            num_classes=x2.shape[1],
            embedding_size=1,
            margin=float(p.get("m3", 0.0)),
        )
    else:
        m = _margin_radians(p)
        loss = _loss(
            losses.ArcFaceLoss,
            netlite_eps,
            num_classes=x2.shape[1],
            embedding_size=1,
            margin=math.degrees(m),
        )
    outs = [_modify_targets(loss, x2, y, ignore).reshape(shape)]
    if len(case.output_names) > 1:  # top.1: the margin, in the prototxt's unit
        outs.append(torch.tensor([float(p.get("margin_base", 0.0))], dtype=x.dtype))
    return outs


def _lsa(case, netlite_eps):
    """LabelSpecificAdd through CosFaceLoss.modify_cosine_of_target_classes."""
    from pytorch_metric_learning import losses

    p = case.params_text.get("label_specific_add_param", {})
    if len(case.output_names) > 1:
        raise Unsupported("the bias top (pml does not expose it)")
    if p.get("class_bias") or p.get("only_above_margin") or "bias_base" in p:
        raise Unsupported("per-class, conditional or annealed bias (pml: one margin)")
    x, y = case.inputs["bottom.0"], case.inputs["bottom.1"]
    shape = x.shape
    x2 = x.reshape(shape[0], -1)
    ignore = case.params_text.get("loss_param", {}).get("ignore_label")
    loss = _loss(
        losses.CosFaceLoss,
        netlite_eps,
        num_classes=x2.shape[1],
        embedding_size=1,
        margin=-float(p.get("bias", 0.0)),
    )
    return [_modify_targets(loss, x2, y, ignore).reshape(shape)]


def _modify_targets(loss, x, y, ignore):
    """``x`` with its target entries replaced by pml's modified cosine (rows
    with an ignored label unchanged) -- pml's compute_loss up to the logits."""
    import torch

    valid = torch.ones_like(y, dtype=torch.bool) if ignore is None else y != int(ignore)
    yv = torch.where(valid, y, torch.zeros_like(y))
    rows = torch.arange(x.shape[0])
    mask = torch.zeros_like(x)
    mask[rows[valid], yv[valid]] = 1
    c = x[rows, yv]
    diff = (loss.modify_cosine_of_target_classes(c) - c).unsqueeze(1)
    return x + mask * diff


def _margin_ip(case, netlite_eps):
    """LargeMarginInnerProduct / MarginInnerProduct from pml's pieces."""
    sphere = case.layer_type == "MarginInnerProduct"
    key = "margin_inner_product_param" if sphere else "largemargin_inner_product_param"
    p = case.params_text.get(key, {})
    if len(case.output_names) > 1:
        raise Unsupported("the lambda top")
    if int(p.get("axis", 1)) != 1:
        raise Unsupported("axis")
    x, y = case.inputs["bottom.0"], case.inputs["bottom.1"]
    x2 = x.reshape(x.shape[0], -1)
    ignore = case.params_text.get("loss_param", {}).get("ignore_label")
    return [
        _multiplicative_logits(
            sphere,
            p,
            x2,
            case.params["param.0"],
            y,
            None if ignore is None else int(ignore),
            netlite_eps,
        )
    ]


_LAYERS = {
    "LabelSpecificMargin": _lsm,
    "LabelSpecificAdd": _lsa,
    "LargeMarginInnerProduct": _margin_ip,
    "MarginInnerProduct": _margin_ip,
}


def _dispatch(case, netlite_eps):
    if case.kind == "net":
        return _head(case, netlite_eps)
    fn = _LAYERS.get(case.layer_type)
    if fn is None:
        raise Unsupported(f"pml has no counterpart of {case.layer_type}")
    return fn(case, netlite_eps)


def impl(case):
    """pytorch-metric-learning as shipped (framework ``torch``)."""
    return _dispatch(case, netlite_eps=False)


def impl_netlite_eps(case):
    """The same, with pml's L2 normalisation replaced by netlite's eps form."""
    return _dispatch(case, netlite_eps=True)
