"""Margin heads composed of small layers in prototxt equal their closed forms
(docs/margin_family.md §2) and agree with pytorch-metric-learning 2.9.0.

Every head here is ``Normalize → InnerProduct { normalize } → [margin] →
Scale → SoftmaxWithLoss`` (or L2-softmax's ``Normalize → Scale →
InnerProduct``), built as a float64 net and compared, loss and every
gradient, with

- ``cosine_head``: the general gradient of a normalised-cosine head with a
  target-logit modifier ψ (margin-losses.md §1.5), written out in NumPy;
- pytorch-metric-learning's ``NormalizedSoftmaxLoss``, ``CosFaceLoss``,
  ``ArcFaceLoss`` and ``SubCenterArcFaceLoss`` with autograd, its weight
  layout ``(D, C)`` mapped onto netlite's ``(C, D)``.

The inner product runs in ``TRUE_GRADIENT`` mode, the one whose gradient is
the derivative of the forward (``RENORM_INPLACE`` is compared with it in
``test_renorm_inplace_differs_from_the_true_gradient_only_in_the_weight_diff``).
"""

import math

import numpy as np
import pytest

import netlite

N, D, C = 8, 5, 4
#: Normalize's and InnerProduct { normalize }'s epsilon under the root.
EPS = float(np.float32(1e-6))
EPS_W = 1e-6
#: Float64 round-off over a few hundred operations.
RTOL = 1e-10


def _data(seed, scale=1.0, classes=C, rows=C):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, scale, (N, D))
    w = rng.normal(0, scale, (rows, D))
    labels = rng.permutation(np.arange(N) % classes)
    return x, w, labels


def head_net(margin="", scale=30.0, scale_lr=0, rows=C, sub_centers=1):
    """A cosine head in prototxt; ``margin`` is one layer reading "cos"."""
    after = "cos"
    text = (
        "force_backward: true\n"
        'layer { name: "in" type: "Input" top: "x" top: "label" '
        f"input_param {{ shape {{ dim: {N} dim: {D} }} shape {{ dim: {N} }} }} }}\n"
        'layer { name: "norm" type: "Normalize" bottom: "x" top: "xn" }\n'
        'layer { name: "fc" type: "InnerProduct" bottom: "xn" top: "cos_all" '
        f"inner_product_param {{ num_output: {rows} bias_term: false normalize: true "
        'weight_norm_mode: TRUE_GRADIENT weight_filler { type: "gaussian" } } }\n'
    )
    if sub_centers > 1:
        text += (
            'layer { name: "sub" type: "SubCenterMax" bottom: "cos_all" top: "cos" '
            f"sub_center_param {{ num_subcenters: {sub_centers} }} }}\n"
        )
    else:
        text = text.replace('top: "cos_all"', 'top: "cos"')
    if margin:
        text += margin + "\n"
        after = "cos_m"
    text += (
        f'layer {{ name: "scale" type: "Scale" bottom: "{after}" top: "logits" '
        f"param {{ lr_mult: {scale_lr} }} scale_param {{ num_axes: 0 "
        f'filler {{ type: "constant" value: {scale} }} }} }}\n'
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "logits" bottom: "label" '
        'top: "loss" }\n'
    )
    return text


def run_net(text, x, w, labels):
    """Loss, dx, dW and ds of a float64 TRAIN net with weights ``w``."""
    net = netlite.Net(text, netlite.TRAIN, dtype=np.float64)
    net.params["fc"][0].data[...] = w
    net.blobs["x"].data[...] = x
    net.blobs["label"].data[...] = labels
    loss = float(net.forward()["loss"])
    net.clear_param_diffs()
    net.backward()
    learned = net.layer_by_name("scale").propagates_param(0)
    ds = float(net.params["scale"][0].diff.ravel()[0]) if learned else None
    return loss, net.blobs["x"].diff.copy(), net.params["fc"][0].diff.copy(), ds


def _project(v, u, norm):
    """``(I - u uᵀ) v / norm`` row by row: the gradient through ``u = v/‖v‖``."""
    return (v - u * (u * v).sum(1, keepdims=True)) / norm


def cosine_head(x, w, labels, psi, dpsi, s, sub_centers=1):
    """Loss and gradients of ``s·φ(x̂·ŵ)`` under softmax cross-entropy."""
    n = np.sqrt((x * x).sum(1, keepdims=True) + EPS)
    xh = x / n
    m = np.sqrt((w * w).sum(1, keepdims=True) + EPS_W)
    wh = w / m
    c_all = xh @ wh.T
    c = c_all.reshape(N, -1, sub_centers).max(2)
    rows = np.arange(N)
    phi = c.copy()
    phi[rows, labels] = psi(c[rows, labels])
    z = s * phi
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    loss = -np.log(p[rows, labels]).mean()
    g = p.copy()
    g[rows, labels] -= 1
    g /= N
    G = s * g
    G[rows, labels] *= dpsi(c[rows, labels])
    # Route each class's gradient to its winning sub-center.
    G_all = np.zeros_like(c_all)
    win = c_all.reshape(N, -1, sub_centers).argmax(2)
    for i in range(N):
        G_all[i, np.arange(c.shape[1]) * sub_centers + win[i]] = G[i]
    dx = _project(G_all @ wh, xh, n)
    dw = _project(G_all.T @ xh, wh, m)
    return loss, dx, dw, float((g * phi).sum())


def _assert_equal(got, want, rtol=RTOL):
    for a, b, what in zip(got, want, ("loss", "dx", "dW", "ds")):
        if a is None:  # a fixed scale (lr_mult: 0) computes no diff
            continue
        np.testing.assert_allclose(
            a, b, rtol=rtol, atol=rtol * np.abs(b).max(), err_msg=what
        )


def _identity(c):
    return c


def _one(c):
    return np.ones_like(c)


def arc_psi(m):
    th, mm = math.cos(math.pi - m), math.sin(math.pi - m) * m

    def psi(c):
        return np.where(c > th, np.cos(np.arccos(c) + m), c - mm)

    def dpsi(c):
        sin = np.sqrt(1 - c * c)
        return np.where(c > th, math.cos(m) + c * math.sin(m) / sin, 1.0)

    return psi, dpsi


COSFACE = (
    'layer { name: "margin" type: "LabelSpecificAdd" bottom: "cos" '
    'bottom: "label" top: "cos_m" label_specific_add_param { bias: %r } }'
)
ARCFACE = (
    'layer { name: "margin" type: "LabelSpecificMargin" bottom: "cos" '
    'bottom: "label" top: "cos_m" label_specific_margin_param { '
    "margin_base: %r gamma: 0 } }"
)


# ---------------------------------------------------------------- closed forms
def test_normface_chain_equals_its_closed_form_learned_scale():
    x, w, labels = _data(1)
    got = run_net(head_net(scale=10.0, scale_lr=1), x, w, labels)
    _assert_equal(got, cosine_head(x, w, labels, _identity, _one, 10.0))


def test_amsoftmax_chain_equals_its_closed_form():
    x, w, labels = _data(2)
    got = run_net(head_net(COSFACE % -0.375, scale=30.0), x, w, labels)
    want = cosine_head(x, w, labels, lambda c: c - 0.375, _one, 30.0)
    _assert_equal(got, want)


def test_arcface_chain_equals_its_closed_form():
    x, w, labels = _data(3)
    psi, dpsi = arc_psi(math.radians(28.5))
    got = run_net(head_net(ARCFACE % 28.5, scale=16.0), x, w, labels)
    _assert_equal(got, cosine_head(x, w, labels, psi, dpsi, 16.0))


def test_sub_center_arcface_chain_equals_its_closed_form():
    x, w, labels = _data(4, rows=3 * C)
    psi, dpsi = arc_psi(math.radians(20.0))
    got = run_net(
        head_net(ARCFACE % 20.0, scale=8.0, rows=3 * C, sub_centers=3), x, w, labels
    )
    _assert_equal(got, cosine_head(x, w, labels, psi, dpsi, 8.0, sub_centers=3))


def test_l2_softmax_chain_equals_its_closed_form():
    """L2-softmax: ``z = W·(α x̂) + b`` with a fixed α (``lr_mult: 0``)."""
    x, w, labels = _data(5)
    b = np.random.default_rng(5).normal(size=C)
    alpha = 6.0
    text = (
        "force_backward: true\n"
        'layer { name: "in" type: "Input" top: "x" top: "label" '
        f"input_param {{ shape {{ dim: {N} dim: {D} }} shape {{ dim: {N} }} }} }}\n"
        'layer { name: "norm" type: "Normalize" bottom: "x" top: "xn" }\n'
        'layer { name: "alpha" type: "Scale" bottom: "xn" top: "f" param { lr_mult: 0 '
        '} '
        f'scale_param {{ num_axes: 0 filler {{ type: "constant" value: {alpha} }} }} '
        '}\n'
        'layer { name: "fc" type: "InnerProduct" bottom: "f" top: "logits" '
        f"inner_product_param {{ num_output: {C} }} }}\n"
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "logits" bottom: "label" '
        'top: "loss" }\n'
    )
    net = netlite.Net(text, netlite.TRAIN, dtype=np.float64)
    net.params["fc"][0].data[...] = w
    net.params["fc"][1].data[...] = b
    net.blobs["x"].data[...] = x
    net.blobs["label"].data[...] = labels
    loss = float(net.forward()["loss"])
    net.backward()
    n = np.sqrt((x * x).sum(1, keepdims=True) + EPS)
    f = alpha * x / n
    z = f @ w.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    rows = np.arange(N)
    g = p.copy()
    g[rows, labels] -= 1
    g /= N
    np.testing.assert_allclose(loss, -np.log(p[rows, labels]).mean(), rtol=RTOL)
    np.testing.assert_allclose(
        net.blobs["x"].diff, alpha * _project(g @ w, x / n, n), rtol=RTOL, atol=1e-14
    )
    np.testing.assert_allclose(net.params["fc"][0].diff, g.T @ f, rtol=RTOL)
    np.testing.assert_allclose(
        net.params["fc"][1].diff, g.sum(0), rtol=RTOL, atol=1e-15
    )


def test_renorm_inplace_differs_from_the_true_gradient_only_in_the_weight_diff():
    """The Caffe-faithful mode gives the same loss and feature gradient; its
    weight diff is the unprojected ``∂L/∂ŵ`` and the blob holds ``ŵ``."""
    x, w, labels = _data(6)
    text = head_net(COSFACE % -0.375)
    true = run_net(text, x, w, labels)
    caffe_text = text.replace("weight_norm_mode: TRUE_GRADIENT", "")
    net = netlite.Net(caffe_text, netlite.TRAIN, dtype=np.float64)
    net.params["fc"][0].data[...] = w
    net.blobs["x"].data[...] = x
    net.blobs["label"].data[...] = labels
    loss = float(net.forward()["loss"])
    net.backward()
    wh = w / np.sqrt((w * w).sum(1, keepdims=True) + EPS_W)
    np.testing.assert_allclose(net.params["fc"][0].data, wh, rtol=1e-14)
    np.testing.assert_allclose(loss, true[0], rtol=RTOL)
    np.testing.assert_allclose(net.blobs["x"].diff, true[1], rtol=RTOL, atol=1e-15)
    m = np.sqrt((w * w).sum(1, keepdims=True) + EPS_W)
    raw = net.params["fc"][0].diff
    np.testing.assert_allclose(_project(raw, wh, m), true[2], rtol=1e-9, atol=1e-14)
    assert not np.allclose(raw, true[2])


# ------------------------------------------- pytorch-metric-learning 2.9.0
def _pml(loss_cls, x, w, labels, **kwargs):
    torch = pytest.importorskip("torch")
    loss_fn = loss_cls(
        num_classes=kwargs.pop("num_classes", C), embedding_size=D, **kwargs
    )
    loss_fn.W.data = torch.tensor(w.T.copy(), dtype=torch.float64)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    loss = loss_fn(xt, torch.tensor(labels))
    loss.backward()
    return loss.item(), xt.grad.numpy(), loss_fn.W.grad.numpy().T


def _worst_relative(got, want):
    return max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(got, want))


# pml normalises with F.normalize (‖x‖ clamped at 1e-12), netlite with
# sqrt(‖x‖² + 1e-6): relatively 1e-6/(2‖x‖²) apart, about 1e-11 for the
# norms of 100 or more used below; the bound leaves room for the scale.
PML_RTOL = 1e-9
PML_CASES = {
    "normalized_softmax": (
        "NormalizedSoftmaxLoss",
        {"temperature": 0.0625},
        "",
        16.0,
        1,
    ),
    "cosface": (
        "CosFaceLoss",
        {"margin": 0.375, "scale": 30},
        COSFACE % -0.375,
        30.0,
        1,
    ),
    "arcface": ("ArcFaceLoss", {"margin": 28.5, "scale": 64}, ARCFACE % 28.5, 64.0, 1),
    "sub_center_arcface": (
        "SubCenterArcFaceLoss",
        {"margin": 20.0, "scale": 16, "sub_centers": 3},
        ARCFACE % 20.0,
        16.0,
        3,
    ),
}


@pytest.mark.torch
@pytest.mark.parametrize("case", sorted(PML_CASES))
def test_agrees_with_pytorch_metric_learning(case):
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    cls_name, kwargs, margin, scale, k = PML_CASES[case]
    x, w, labels = _data(7, scale=100.0, rows=k * C)
    got = run_net(
        head_net(margin, scale=scale, rows=k * C, sub_centers=k), x, w, labels
    )
    want = _pml(getattr(losses, cls_name), x, w, labels, **kwargs)
    worst = _worst_relative(got[:3], want)
    print(f"{case}: worst relative error {worst:.3g}")
    assert worst < PML_RTOL, f"{case}: worst relative error {worst:.3g}"


@pytest.mark.torch
def test_pml_arcface_gives_nan_at_cos_one_where_netlite_is_finite():
    """A feature on its class weight: pml's acos has an infinite derivative
    at c = 1 and its gradients are not finite; netlite's are (ψ' is taken at
    c held at 1 - ε, docs/layers/label_specific_margin.md §4)."""
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    x, w, labels = _data(8, scale=10.0)
    x[0] = 3.0 * w[labels[0]]
    got = run_net(head_net(ARCFACE % 28.5, scale=64.0), x, w, labels)
    want = _pml(losses.ArcFaceLoss, x, w, labels, margin=28.5, scale=64)
    assert all(np.isfinite(g).all() for g in got[1:3])
    assert not np.isfinite(want[1]).all() or not np.isfinite(want[2]).all()
