"""Tests for FocalLoss (happynear/caffe-windows' softmax focal loss): the
standard tests, the p -> 1 limits against mpmath, the reduction to
SoftmaxWithLoss at gamma = 0, happynear's own gradient expression, bad
parameters, and PyTorch autograd in float64."""

import math

import naive
import numpy as np
import pytest
from layer_test_case import LayerTestCase
from layer_testing import f32, make_blob
from softmax_loss_testing import loss_param_fields, run_loss, scores_and_labels

import netlite
from netlite import backend
from netlite.layers.focal_loss import FocalLossLayer
from netlite.layers.softmax_loss import FLT_MIN, SoftmaxWithLossLayer


class TestFocalLossLayer(LayerTestCase):
    """gamma 0, 0.5, 1, 2; alpha and class weights; WEIGHTED; ignore labels
    inside and outside [0, C); ONEADDP; per-position; the probability top;
    spatial positions; the class axis last."""

    shape, axis, ignore, mode, tops = (6, 5, 2), 1, None, "VALID", 1
    gamma, alpha, weight, weighted, kind = 2.0, 1.0, None, False, "ORIGIN"
    per_position = False
    cases = {
        "default": {},
        "gamma0": {"gamma": 0.0, "ignore": 3},
        "gamma_half": {"gamma": 0.5, "ignore": -1, "shape": (8, 5)},
        "gamma1": {"gamma": 1.0, "ignore": 255, "mode": "NONE"},
        "alpha_weights": {"alpha": 0.25, "weight": (0.5, 2.0, 1.0, 3.0, 0.25),
                          "ignore": 0, "mode": "BATCH_SIZE"},
        "weighted": {"weight": (0.5, 2.0, 1.0, 3.0, 0.25), "weighted": True,
                     "ignore": -100, "gamma": 1.5},
        "oneaddp": {"kind": "ONEADDP", "gamma": 2.0, "ignore": 1},
        "per_position": {"per_position": True, "gamma": 0.5, "ignore": 4,
                         "shape": (4, 5, 3)},
        "prob_top": {"tops": 2, "mode": "FULL", "ignore": 2},
        "axis_last": {"shape": (3, 4, 5), "axis": -1, "gamma": 3.0},
    }

    @property
    def layer(self):
        loss = loss_param_fields(self)
        return (f'type: "FocalLoss" softmax_param {{ axis: {self.axis} }} '
                f'loss_param {{ {" ".join(loss)} }} focal_loss_param {{ '
                f'type: {self.kind} gamma: {self.gamma} alpha: {self.alpha} }}')

    @property
    def bottoms(self):
        return scores_and_labels(self.shape, self.axis, self.ignore)

    def oracle(self, bottoms, blobs):
        loss, _ = naive.focal_loss(
            bottoms[0], bottoms[1], self.axis, self.ignore,
            "VALID" if self.weighted else self.mode, f32(self.gamma),
            f32(self.alpha), self.weight, self.weighted, self.per_position,
            self.kind == "ONEADDP")
        tops = [np.asarray(loss)]
        if self.tops > 1:
            tops.append(naive.softmax(bottoms[0], self.axis))
        return tops


def _layer(focal="", loss=""):
    return FocalLossLayer(f'name: "focal" loss_param {{ {loss} }} '
                          f'focal_loss_param {{ {focal} }}')


# ------------------------------------------------------------------ maths
@pytest.mark.parametrize("loss", ["", "ignore_label: 1 normalization: FULL",
                                  "class_weight: [1, 2, 0.5, 3] "
                                  "weight_normalization: WEIGHTED",
                                  "per_position: true ignore_label: -1"])
def test_gamma_zero_alpha_one_is_softmax_with_loss(dtype, loss):
    gen = netlite.rng.get_rng()
    x = gen.standard_normal((7, 4, 3)) * 3
    lab = gen.integers(0, 4, size=(7, 3)).astype(float)
    lab[0] = 1
    lab[2, 1] = -1
    if "ignore_label: -1" not in loss:
        lab[2, 1] = 0
    focal = run_loss(_layer("gamma: 0", loss), x, lab, dtype, top_diff=1.0)
    plain = run_loss(SoftmaxWithLossLayer(f'name: "l" loss_param {{ {loss} }}'), x,
                     lab, dtype, top_diff=1.0)
    tol = {"rtol": 2e-6, "atol": 1e-7} if dtype == np.float32 else {
        "rtol": 1e-13, "atol": 1e-15}
    for a, b in zip(focal, plain):
        np.testing.assert_allclose(a, b, **tol)


def _mp_focal(z, y, gamma, sign=-1):
    """mpmath (50 digits): the loss and its gradient, from the definition
    ``-(1 + sign p)^gamma log p`` and the chain rule, for one column."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(50):
        zs = [mpmath.mpf(float(v)) for v in z]
        s = mpmath.fsum(mpmath.exp(v) for v in zs)
        p = [mpmath.exp(v) / s for v in zs]
        v = 1 + sign * p[y]
        g = mpmath.mpf(f32(gamma))
        loss = -v ** g * mpmath.log(p[y])
        # The chain rule as written: dl/dp_y times dp_y/dz_c = p_y ([c = y]
        # - p_c); at 50 digits v = 1 - p_y > 0 for every margin used.
        dl_dp = -(sign * g * v ** (g - 1) * mpmath.log(p[y]) + v ** g / p[y])
        grad = [dl_dp * p[y] * ((c == y) - pc) for c, pc in enumerate(p)]
        return float(loss), [float(d) for d in grad]


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 0.25])
@pytest.mark.parametrize("margin", [5.0, 20.0, 38.0, 45.0])
def test_p_to_one_against_mpmath(gamma, margin):
    # The label's score leads by `margin`: 1 - p ~ 3 e^-margin, down to
    # 1e-20 (where p rounds to 1).  Loss and every gradient entry, the
    # label's included, to float64 relative precision: (1 - p) comes from
    # -expm1(log p) and log p from log1p, and (1-p)^(gamma-1) p log p takes
    # its limit as a product (gamma < 1).
    z = np.array([margin, 0.0, -1.0, 0.5])
    _, loss, dx = run_loss(_layer(f"gamma: {gamma}", "normalization: NONE"),
                           z[None], np.array([0.0]))
    expected, grad = _mp_focal(z, 0, gamma)
    assert float(loss) == pytest.approx(expected, rel=1e-13, abs=1e-300)
    np.testing.assert_allclose(dx[0], grad, rtol=1e-13, atol=0)
    assert np.all(np.isfinite(dx))


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_exact_p_equal_one_limit(gamma):
    # The other scores are -inf: p = 1 exactly, log p = 0, 1 - p = 0; the
    # loss is 0 and the gradient 0 (its limit), never NaN.  At gamma = 0
    # the gradient is p - onehot = 0 too.
    z = np.array([[3.0, -np.inf, -np.inf]])
    _, loss, dx = run_loss(_layer(f"gamma: {gamma}"), z, np.array([0.0]))
    assert float(loss) == 0.0
    assert np.all(dx == 0)


def test_p_to_zero_and_flt_min_clamp(dtype):
    # A -inf score on the label: p = 0, the loss is alpha * 1 * 87.3365
    # (the FLT_MIN floor of log p, as Caffe and happynear), the gradient
    # alpha * (p - onehot) (f -> 1 as p -> 0).
    z = np.array([[-np.inf, 0.0, 1.0]])
    _, loss, dx = run_loss(_layer("gamma: 2 alpha: 0.25"), z, np.array([0.0]), dtype)
    np.testing.assert_allclose(float(loss), 0.25 * -math.log(FLT_MIN), rtol=1e-6)
    q = np.exp(z[0] - np.logaddexp(0.0, 1.0))
    q[0] = 0
    np.testing.assert_allclose(dx[0], 0.25 * (q - [1, 0, 0]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
def test_matches_happynear_gradient_expression(gamma):
    # happynear's focal_loss_layer.cpp (alpha = 1): grad = -gamma (1-p)^gamma
    # / max(1-p, 1e-10) * log p * p + (1-p)^gamma, diff_c = grad * (p_c -
    # [c = y]); ONEADDP the same with 1 + p and +gamma.  Away from p = 1
    # (its 1e-10 floor), netlite's exact gradient is that expression.
    gen = netlite.rng.get_rng()
    x = gen.standard_normal((6, 5)) * 2
    lab = gen.integers(0, 5, size=6)
    p = np.exp(x - np.logaddexp.reduce(x, axis=1, keepdims=True))
    pt = p[np.arange(6), lab]
    onehot = np.eye(5)[lab]
    for kind, s in (("ORIGIN", -1), ("ONEADDP", 1)):
        g = f32(gamma)
        v = 1 + s * pt
        grad = s * g * v ** g / np.maximum(v, 1e-10) * np.log(pt) * pt + v ** g
        loss = -(v ** g * np.log(pt)).sum()
        _, top, dx = run_loss(_layer(f"type: {kind} gamma: {gamma}",
                                     "normalization: NONE"), x, lab.astype(float))
        np.testing.assert_allclose(float(top), loss, rtol=1e-13)
        np.testing.assert_allclose(dx, grad[:, None] * (p - onehot), rtol=1e-12,
                                   atol=1e-15)


def test_alpha_scales_and_class_weights_are_per_class_alpha():
    gen = netlite.rng.get_rng()
    x = gen.standard_normal((8, 3)) * 2
    lab = np.array([0, 1, 2, 2, 1, 0, 0, 2.0])
    _, base, dbase = run_loss(_layer("gamma: 2", "normalization: NONE"), x, lab)
    _, scaled, dscaled = run_loss(_layer("gamma: 2 alpha: 0.25",
                                         "normalization: NONE"), x, lab)
    np.testing.assert_allclose(scaled, 0.25 * base, rtol=1e-14)
    np.testing.assert_allclose(dscaled, 0.25 * dbase, rtol=1e-14)
    _, per, dper = run_loss(_layer("gamma: 2", "normalization: NONE per_position: "
                                   "true"), x, lab, top_diff=1.0)
    w = np.array([1.0, 4.0, 0.5])
    _, weighted, dweighted = run_loss(_layer("gamma: 2", "class_weight: [1, 4, 0.5] "
                                             "weight_normalization: WEIGHTED"), x, lab)
    wl = w[lab.astype(int)]
    np.testing.assert_allclose(float(weighted), (wl * per).sum() / wl.sum(),
                               rtol=1e-14)
    np.testing.assert_allclose(dweighted, dper * wl[:, None] / wl.sum(),
                               rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("mode", ["VALID", "FULL", "BATCH_SIZE", "NONE"])
def test_all_ignored_gives_zero_loss_and_gradient(dtype, mode):
    x = netlite.rng.get_rng().standard_normal((4, 3, 2))
    lab = np.full((4, 2), 7.0)
    loss, top, dx = run_loss(_layer("gamma: 0.5", f"ignore_label: 7 normalization: "
                                    f"{mode}"), x, lab, dtype)
    assert loss == 0.0 and float(top) == 0.0 and np.all(dx == 0)


def test_non_finite_score_raises_and_is_harmless_when_ignored(dtype):
    x = np.zeros((3, 4))
    x[1, 2] = np.nan
    with pytest.raises(netlite.NonFiniteError, match=r"FocalLoss layer 'focal'.*"
                       r"\(1, 2\)"):
        run_loss(_layer(), x, np.array([0, 1, 2.0]), dtype)
    _, top, dx = run_loss(_layer("", "ignore_label: 9"), x, np.array([0, 9, 2.0]),
                          dtype)
    assert math.isfinite(float(top)) and np.all(dx[1] == 0)


# ------------------------------------------------------------- bad input
@pytest.mark.parametrize("focal, loss, match", [
    ("type: LINEAR", "", "type LINEAR is not supported"),
    ("gamma: -1", "", "gamma is -1.0; it must be finite and >= 0"),
    ("gamma: nan", "", "gamma is nan"),
    ("gamma: inf", "", "gamma is inf"),
    ("alpha: 0", "", "alpha is 0.0; it must be finite and > 0"),
    ("alpha: -0.25", "", "alpha is -0.25"),
    ("alpha: nan", "", "alpha is nan"),
    ("", "label_smoothing: 0.1", "label_smoothing and loss_param.temperature"),
    ("", "temperature: 2", "label_smoothing and loss_param.temperature"),
    ("", "class_weight: [1, -2, 1]", r"class_weight\[1\] is -2.0"),
])
def test_bad_parameters(focal, loss, match):
    data, label = make_blob((4, 3), np.float64), make_blob((4,), np.float64)
    with pytest.raises(netlite.LayerSetupError, match=match) as info:
        _layer(focal, loss).setup([data, label], [netlite.Blob()])
    assert "FocalLoss layer 'focal'" in str(info.value)


def test_labels_only(dtype):
    # No target probabilities: a label blob of the scores' shape is a
    # label-count mismatch; bad labels raise as in SoftmaxWithLoss.
    with pytest.raises(netlite.ShapeError, match="FocalLoss layer 'focal'"):
        run_loss(_layer(), np.zeros((4, 3)), np.full((4, 3), 1 / 3), dtype)
    with pytest.raises(netlite.LabelError, match=r"label 3\.0 at index \(1,\)"):
        run_loss(_layer(), np.zeros((4, 3)), np.array([0, 3, 1, 2.0]), dtype)
    with pytest.raises(ValueError, match="label"):
        layer = _layer()
        data, label = make_blob((2, 3), dtype), make_blob((2,), dtype)
        top = [netlite.Blob(dtype=dtype)]
        layer.setup([data, label], top)
        layer.forward([data, label], top)
        layer.backward(top, [True, True], [data, label])


def test_runs_the_reference_on_numba(dtype):
    pytest.importorskip("numba")
    x = netlite.rng.get_rng().standard_normal((5, 4))
    lab = np.array([0, 1, 2, 3, 1.0])
    runs = []
    for engine in ("numpy", "numba"):
        backend.set_cpu_engine(engine)
        layer = _layer("gamma: 2")
        runs.append(run_loss(layer, x, lab, dtype))
        assert layer.extended and layer.engine == "numpy"
        assert layer._adapters == {}
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_in_a_net(dtype):
    net = netlite.Net(
        """
        force_backward: true
        layer { name: "in" type: "Input" top: "x" top: "label"
                input_param { shape { dim: 5 dim: 4 } shape { dim: 5 } } }
        layer { name: "focal" type: "FocalLoss" bottom: "x" bottom: "label"
                top: "loss" top: "prob" loss_weight: 2 loss_weight: 0
                loss_param { ignore_label: 3 }
                focal_loss_param { gamma: 2 alpha: 0.5 } }
        """, dtype=dtype)
    gen = netlite.rng.get_rng()
    x = gen.standard_normal((5, 4))
    lab = np.array([0, 3, 1, 2, 1])
    out = net.forward(x=x, label=lab)
    expected, grad = naive.focal_loss(x, lab, ignore_label=3, gamma=2.0,
                                      alpha=0.5)
    tol = {"rtol": 2e-5, "atol": 1e-6} if dtype == np.float32 else {
        "rtol": 1e-12, "atol": 1e-14}
    assert net.loss == pytest.approx(2 * expected, rel=tol["rtol"])
    np.testing.assert_allclose(out["prob"], naive.softmax(x), **tol)
    net.backward()
    np.testing.assert_allclose(net.blobs["x"].diff, 2 * grad, **tol)


# ------------------------------------------------------------------ torch
def _torch_focal(torch, x, lab, gamma, alpha, weight, ignore):
    """The focal loss per position, hand-written on torch.log_softmax
    (autograd gives the gradient)."""
    lp = torch.log_softmax(x, dim=1)
    valid = lab != ignore
    safe = torch.where(valid, lab, torch.zeros_like(lab))
    lpt = lp.gather(1, safe.unsqueeze(1)).squeeze(1)
    w = alpha * (weight[safe] if weight is not None else torch.ones_like(lpt))
    loss = -w * (-torch.expm1(lpt)) ** gamma * lpt
    return torch.where(valid, loss, torch.zeros_like(loss)), torch.where(
        valid, w / alpha, torch.zeros_like(w))


@pytest.mark.torch
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "weighted"])
@pytest.mark.parametrize("ignore", [-1, 2, 255])
@pytest.mark.parametrize("weight", [False, True])
def test_matches_torch_autograd(gamma, reduction, ignore, weight):
    torch = pytest.importorskip("torch")
    gen = netlite.rng.get_rng()
    shape = (6, 5, 3)
    x = gen.standard_normal(shape) * 3
    lab = gen.integers(0, 5, size=(6, 3))
    lab.flat[::4] = ignore
    alpha = 0.25
    w = (0.5, 2.0, 1.0, 3.0, 0.25)
    wt = torch.tensor(w, dtype=torch.float64) if weight else None
    xt = torch.tensor(x, requires_grad=True)
    per, wl = _torch_focal(torch, xt, torch.tensor(lab), f32(gamma), alpha, wt,
                           ignore)
    out = {"none": per, "sum": per.sum(),
           "mean": per.sum() / (torch.tensor(lab) != ignore).sum(),
           "weighted": per.sum() / wl.sum()}[reduction]
    dy = gen.standard_normal((6, 3)) if reduction == "none" else None
    out.backward(torch.tensor(dy) if dy is not None else None)
    loss_fields = [f"ignore_label: {ignore}",
                   {"none": "per_position: true", "sum": "normalization: NONE",
                    "mean": "normalization: VALID",
                    "weighted": "weight_normalization: WEIGHTED"}[reduction]]
    if weight:
        loss_fields.append(f"class_weight: {list(w)}")
    layer = _layer(f"gamma: {gamma} alpha: {alpha}", " ".join(loss_fields))
    _, top, dx = run_loss(layer, x, lab.astype(float),
                          top_diff=dy if dy is not None else 1.0)
    np.testing.assert_allclose(top, out.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-11, atol=1e-14)


@pytest.mark.torch
def test_torch_nan_at_p_one_for_gamma_below_one():
    # The hand-written torch formula loses 1 - p when p rounds to 1
    # (log_softmax gives log p = 0 exactly), and autograd's
    # (1 - p)^(gamma - 1) = inf times 0 gives NaN for gamma < 1; netlite's
    # gradient is finite and equals mpmath's (test_p_to_one_against_mpmath).
    torch = pytest.importorskip("torch")
    z = np.array([[45.0, 0.0, -1.0, 0.5]])
    xt = torch.tensor(z, requires_grad=True)
    per, _ = _torch_focal(torch, xt, torch.tensor([0]), 0.5, 1.0, None, -1)
    per.sum().backward()
    assert torch.isnan(xt.grad).any()
    _, _, dx = run_loss(_layer("gamma: 0.5"), z, np.array([0.0]))
    _, grad = _mp_focal(z[0], 0, 0.5)
    np.testing.assert_allclose(dx[0], grad, rtol=1e-13, atol=0)
