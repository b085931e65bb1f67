"""LargeMarginInnerProduct (L-Softmax): the standard tests for m = 1..4,
several shapes, lambda 0 / 1 / large, ignored labels and degenerate inputs;
then the shared maths of layers/_multiplicative_margin.py (psi_m against
the angle form and the fork's sign form, continuity at the thresholds, the
lambda schedule); the fork's closed-form backward; TEST-phase use; edge
cases and bad input; bit-exact resume of the lambda schedule through a
solver snapshot; PyTorch autograd and pytorch-metric-learning 2.9.0."""

import math

import naive
import numpy as np
import pytest
from layer_test_case import LayerTestCase
from layer_testing import f32, make_blob, rel_err
from margin_testing import (
    LABELS_0_PI,
    SHARED_CASES,
    TYPES,
    W_0_PI,
    W_ZERO_ROW,
    MarginCase,
    blob_text,
    features_0_pi,
    fork_coefficients,
    fork_psi,
    pml_loss,
    pml_margin_loss,
    schedule_lambda,
    schedule_text,
    softmax_cross_entropy,
    torch_logits,
)

import netlite
from netlite import io
from netlite.errors import LabelError, LayerSetupError, NonFiniteError, ShapeError
from netlite.layers import _multiplicative_margin as mm

F32 = np.float32


class TestLargeMarginInnerProductLayer(MarginCase, LayerTestCase):
    """Forward against ``naive.large_margin_inner_product`` (the angle form
    of psi), the exhaustive float64 gradient of x and W, and the contract
    tests.  Gaussian features rarely put a cosine within a step of a
    threshold (psi is C^1 there), so no kink is declared, except around 0
    for the zero-feature case (the margin logit is not differentiable at
    x = 0)."""

    cases = {
        **SHARED_CASES,
        "quadruple_lambda_large": {
            "sched": {"base": 1000, "gamma": 0.001, "power": 2, "iteration": 5}},
        "double_lambda_min": {
            "m": 2, "sched": {"base": 1, "gamma": 1, "lambda_min": 0.25,
                              "iteration": 9}},
        "triple_theta_0_and_pi": {"m": 3, "weights": W_0_PI, "num_output": 4,
                                  "shape": (8, 3), "features": features_0_pi,
                                  "label_values": LABELS_0_PI},
        "zero_weight_row": {"m": 3, "weights": W_ZERO_ROW, "num_output": 4,
                            "label_values": np.array([0, 1, 3, 3, 0, 1.0])},
    }

    @property
    def layer(self):
        loss, blobs = self.extra_text()
        return (
            f'type: "LargeMarginInnerProduct" {loss} '
            f"largemargin_inner_product_param {{ num_output: {self.num_output} "
            f"type: {TYPES[self.m]} axis: {self.axis} {schedule_text(self.sched)} "
            'weight_filler { type: "gaussian" std: 0.7 } } ' + blobs
        )

    def oracle(self, bottoms, blobs):
        lam = schedule_lambda(self.sched)
        z = naive.large_margin_inner_product(bottoms[0], blobs[0], bottoms[1],
                                             self.m, lam, self.ignore, self.axis)
        return [z, np.array(lam)][:self.tops]


def lsoftmax(m=4, sched=None, n=5, extra="", dtype=np.float64, name="lsm"):
    sched = {"base": 0} if sched is None else sched
    text = (f'name: "{name}" type: "LargeMarginInnerProduct" {extra} '
            f"largemargin_inner_product_param {{ num_output: {n} type: {TYPES[m]} "
            f'{schedule_text(sched)} weight_filler {{ type: "gaussian" }} }}')
    return netlite.create_layer(io.parse_layer_param(text), dtype=dtype)


def run(layer, x, y, top_diff=None, iteration=0, dtype=np.float64, w=None):
    """Set up, forward (and backward with ``top_diff``); return
    ``(z, lambda, dx, dW)``."""
    xb = make_blob(np.shape(x), dtype, x)
    yb = make_blob(np.shape(y), dtype, y)
    tops = [netlite.Blob(dtype=dtype), netlite.Blob(dtype=dtype)]
    layer.setup([xb, yb], tops)
    if w is not None:
        layer.blobs[0].data[...] = w
    layer.iteration = iteration
    layer.forward([xb, yb], tops)
    z, lam = tops[0].data.copy(), float(tops[1].data)
    if top_diff is None:
        return z, lam, None, None
    tops[0].diff[...] = top_diff
    layer.blobs[0].diff[...] = 0
    layer.backward(tops, [True, False], [xb, yb])
    return z, lam, xb.diff.copy(), layer.blobs[0].diff.copy()


# ----------------------------------------------------- the shared maths
C_GRID = np.concatenate([np.linspace(-1, 1, 4001), [0.0, 0.5, -0.5, math.sqrt(0.5),
                                                      -math.sqrt(0.5), 1.0, -1.0]])


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_psi_matches_the_angle_form(m):
    value, slope = mm.psi(np, m, C_GRID)
    expected = [naive.multiplicative_margin_psi(c, m) for c in C_GRID]
    np.testing.assert_allclose(value, expected, rtol=0, atol=1e-12)
    # psi' = (-1)^k m sin(m theta) / sin(theta) inside (0, pi).
    theta = np.arccos(C_GRID)
    inside = np.sin(theta) > 1e-3
    theta = theta[inside]
    k = np.minimum(m - 1, np.floor(m * theta / math.pi))
    want = (-1.0) ** k * m * np.sin(m * theta) / np.sin(theta)
    np.testing.assert_allclose(slope[inside], want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("m", [2, 3, 4])
def test_psi_slope_is_the_derivative(m):
    c = np.linspace(-0.999, 0.999, 997)
    far = np.all([abs(c - t) > 1e-4 for t in mm.THRESHOLDS[m]], axis=0)
    h = 1e-6
    fd = (mm.psi(np, m, c + h)[0] - mm.psi(np, m, c - h)[0]) / (2 * h)
    np.testing.assert_allclose(mm.psi(np, m, c)[1][far], fd[far], rtol=0, atol=1e-7)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_psi_matches_the_fork_sign_form(m):
    # Including the exact boundaries c = 0, +-1/2, +-sqrt(1/2), +-1, where
    # Caffe's sign(0) = 0 still gives the continuous value.
    value, slope = mm.psi(np, m, C_GRID)
    np.testing.assert_allclose(value, fork_psi(m, C_GRID), rtol=0, atol=1e-13)
    if m > 1:
        a, b = fork_coefficients(m, C_GRID)
        np.testing.assert_allclose(slope, a, rtol=0, atol=1e-12)
        np.testing.assert_allclose(C_GRID * slope - value, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("m, j", [(m, j) for m in (2, 3, 4) for j in range(1, m)])
def test_psi_is_continuous_at_the_thresholds(m, j):
    c = math.cos(j * math.pi / m)
    points = np.array([c, np.nextafter(c, 2), np.nextafter(c, -2), c + 1e-9, c - 1e-9])
    value, slope = mm.psi(np, m, points)
    np.testing.assert_allclose(value, 1 - 2 * j, rtol=0, atol=1e-7)
    np.testing.assert_allclose(value[:3], 1 - 2 * j, rtol=0, atol=1e-13)
    # C^1: psi' vanishes from both sides.
    np.testing.assert_allclose(slope, 0, atol=1e-6)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_psi_endpoints_and_monotonicity(m):
    value, slope = mm.psi(np, m, np.array([1.0, -1.0]))
    np.testing.assert_allclose(value, [1, 1 - 2 * m], rtol=0, atol=1e-13)
    np.testing.assert_allclose(slope, [m * m, m * m], rtol=0, atol=1e-12)
    theta = np.linspace(0, math.pi, 20001)
    v = mm.psi(np, m, np.cos(theta))[0]
    assert np.all(np.diff(v) < 0)  # strictly decreasing in theta
    # |c| past 1 by rounding: no clamp needed, the values stay continuous.
    beyond = mm.psi(np, m, np.array([1 + 2e-16, -1 - 2e-16]))[0]
    np.testing.assert_allclose(beyond, [1, 1 - 2 * m], rtol=0, atol=1e-13)


def test_sign_index_counts_thresholds_without_acos():
    c = np.array([1.0, 0.8, 0.70, 0.5, 0.2, 0.0, -0.2, -0.5, -0.71, -1.0])
    assert mm.sign_index(np, 4, c).tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 3, 3]
    assert mm.sign_index(np, 3, c).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    # Off the thresholds, k = floor(m theta / pi) (at most m - 1).
    theta = np.arccos(np.clip(c, -1, 1))
    for m in (2, 3, 4):
        off = np.all([c != t for t in mm.THRESHOLDS[m]], axis=0)
        want = np.minimum(m - 1, np.floor(m * theta / math.pi)).astype(int)
        assert mm.sign_index(np, m, c)[off].tolist() == want[off].tolist()


# ------------------------------------------------------- lambda schedule
def test_lambda_schedule_of_the_published_examples():
    mnist = {"base": 1000, "gamma": 2.5e-5, "power": 35}
    # margin-losses.md §2.3: 999 at 1, 421 at 1k, 16.2 at 5k, 0.41 at 10k.
    for it, want in [(1, 999.1), (1000, 421), (5000, 16.2), (10000, 0.41)]:
        assert schedule_lambda(mnist, it - 1) == pytest.approx(want, rel=2e-2)
    sphere = {"base": 1000, "gamma": 0.12, "power": 1, "lambda_min": 5}
    for it, want in [(1, 893), (100, 76.9), (1000, 8.26), (1700, 5)]:
        assert schedule_lambda(sphere, it - 1) == pytest.approx(want, rel=1e-2)


@pytest.mark.parametrize("solver_iteration, offset", [(0, 0), (7, 3), (2499, 0)])
def test_lambda_follows_the_solver_iteration_plus_one(solver_iteration, offset):
    sched = {"base": 1000, "gamma": 2.5e-5, "power": 35, "lambda_min": 0.5,
             "iteration": offset}
    layer = lsoftmax(sched=sched)
    x = np.random.default_rng(0).standard_normal((3, 4))
    _, lam, _, _ = run(layer, x, [0, 1, 2], iteration=solver_iteration)
    it = offset + solver_iteration + 1
    assert lam == naive.margin_lambda(it, f32(1000), f32(2.5e-5), f32(35), 0.5)
    # Forwarding again at the same solver iteration changes nothing
    # (Caffe's counter would advance).
    _, lam2, _, _ = run(layer, x, [0, 1, 2], iteration=solver_iteration)
    assert lam2 == lam


def test_proto_defaults_blend_half_and_base_0_is_the_pure_margin():
    gen = np.random.default_rng(1)
    x, w, y = gen.standard_normal((4, 3)), gen.standard_normal((5, 3)), [0, 4, 2, 2]
    blended, lam, _, _ = run(lsoftmax(m=2, sched={}), x, y, w=w)
    assert lam == 1.0
    pure, lam0, _, _ = run(lsoftmax(m=2, sched={"base": 0}), x, y, w=w)
    assert lam0 == 0.0
    for i, j in enumerate(y):
        nx, nw = np.linalg.norm(x[i]), np.linalg.norm(w[j])
        c = x[i] @ w[j] / (nx * nw)
        psi = 2 * c * c - 1 if c >= 0 else -(2 * c * c - 1) - 2
        assert pure[i, j] == pytest.approx(nx * nw * psi, rel=1e-13)
        assert blended[i, j] == pytest.approx((x[i] @ w[j] + nx * nw * psi) / 2,
                                              rel=1e-13)
    off = np.ones_like(pure, bool)
    off[np.arange(4), y] = False
    np.testing.assert_array_equal(blended[off], (x @ w.T)[off])


# ---------------------------------------------------- forward, backward
def test_single_is_the_plain_inner_product(dtype):
    # The fork's TEST-phase layer (type SINGLE, base 0): z = x W^T exactly,
    # whatever lambda is; the backward is the inner product's.
    gen = np.random.default_rng(2)
    x, w, g = (gen.standard_normal((5, 4)), gen.standard_normal((3, 4)),
               gen.standard_normal((5, 3)))
    x, w, g = (a.astype(dtype) for a in (x, w, g))
    z, lam, dx, dw = run(lsoftmax(m=1, sched={"base": 3}, n=3, dtype=dtype),
                         x, [0, 1, 2, 0, 1], g, dtype=dtype, w=w)
    assert lam == pytest.approx(3)
    np.testing.assert_array_equal(z, x @ w.T)
    np.testing.assert_array_equal(dx, g @ w)
    np.testing.assert_array_equal(dw, g.T @ x)


@pytest.mark.parametrize("m", [2, 3, 4])
def test_target_logit_at_the_thresholds(m, dtype):
    # Features at theta = j pi / m from their class's row: the target logit
    # is |w| |x| (1 - 2j) (lambda 0), from either side of the threshold.
    w = np.array([[2.0, 0, 0], [0, 1.0, 0]])
    rows, want = [], []
    for j in range(1, m):
        for delta in (0.0, 1e-7, -1e-7):
            a = j * math.pi / m + delta
            rows.append(1.5 * np.array([math.cos(a), math.sin(a), 0.0]))
            want.append(3.0 * (1 - 2 * j))
    x = np.array(rows)
    z, _, _, _ = run(lsoftmax(m, n=2, dtype=dtype), x.astype(dtype), [0] * len(x),
                     dtype=dtype, w=w.astype(dtype))
    tol = 1e-5 if dtype == np.float32 else 1e-9
    np.testing.assert_allclose(z[:, 0], want, rtol=0, atol=tol)


def _fork_backward(x, w, y, g, m, lam):
    """The fork's Backward_cpu (largemargin_inner_product_layer.cpp), in
    float64 loops: target entries get (a w - (|w|/|x|) b x) / (1 + lam) and
    (a x - (|x|/|w|) b w) / (1 + lam); every entry adds lam / (1 + lam)
    times the plain inner-product gradient; off target the loops add
    1 / (1 + lam) of it."""
    dx, dw = np.zeros_like(x), np.zeros_like(w)
    for i in range(len(x)):
        nx = np.linalg.norm(x[i])
        for j in range(len(w)):
            nw = np.linalg.norm(w[j])
            u = g[i, j] / (1 + lam)
            if j != y[i]:
                dx[i] += u * w[j]
                dw[j] += u * x[i]
            else:
                a, b = fork_coefficients(m, x[i] @ w[j] / (nx * nw))
                dx[i] += u * a * w[j] + u / (-nx / nw) * b * x[i]
                dw[j] += u * a * x[i] + u * (-nx / nw) * b * w[j]
            dx[i] += lam / (1 + lam) * g[i, j] * w[j]
            dw[j] += lam / (1 + lam) * g[i, j] * x[i]
    return dx, dw


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("sched", [{"base": 0}, {}, {"base": 40}],
                         ids=["lambda0", "lambda1", "lambda40"])
def test_backward_equals_the_fork_closed_form(m, sched):
    gen = np.random.default_rng(10 + m)
    x, w, g = (gen.standard_normal((7, 4)), gen.standard_normal((5, 4)),
               gen.standard_normal((7, 5)))
    y = gen.integers(0, 5, 7)
    _, lam, dx, dw = run(lsoftmax(m, sched), x, y, g, w=w)
    want_dx, want_dw = _fork_backward(x, w, y, g, m, lam)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-12, atol=1e-12)


def test_margin_applies_in_test_phase_and_the_forks_test_layer_is_plain():
    # The fork applies the margin in every phase; its examples evaluate
    # with a second layer, type SINGLE with base 0, sharing the weights.
    net_text = """
    layer { name: "data" type: "Input" top: "x" top: "y"
            input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }
    layer { name: "ip2" type: "LargeMarginInnerProduct" bottom: "x" bottom: "y"
            top: "margin" top: "lambda" param { name: "ip2_w" }
            largemargin_inner_product_param { num_output: 5 type: QUADRUPLE
              base: 0 weight_filler { type: "msra" } } }
    layer { name: "ip2_test" type: "LargeMarginInnerProduct" bottom: "x"
            bottom: "y" top: "plain" param { name: "ip2_w" }
            largemargin_inner_product_param { num_output: 5 type: SINGLE
              base: 0 weight_filler { type: "msra" } } }
    """
    net = netlite.Net(net_text, netlite.TEST, dtype=np.float64)
    x = np.random.default_rng(4).standard_normal((4, 3))
    y = np.array([0, 1, 2, 3.0])
    out = net.forward(x=x, y=y)
    w = net.layer_by_name("ip2").blobs[0].data
    np.testing.assert_array_equal(net.layer_by_name("ip2_test").blobs[0].data, w)
    np.testing.assert_array_equal(out["plain"], x @ w.T)
    want = naive.large_margin_inner_product(x, w, y, 4, 0.0)
    np.testing.assert_allclose(out["margin"], want, rtol=1e-12, atol=1e-12)
    assert not np.allclose(out["margin"], out["plain"])


# ------------------------------------------------------------ edge cases
@pytest.mark.parametrize("m", [2, 3, 4])
def test_zero_feature_gives_zero_logits_and_a_finite_gradient(m, dtype):
    # The fork's CPU backward divides by |x| (NaN); netlite takes
    # x_hat = x / max(|x|, EPS) = 0, c = 0: the plain inner products'
    # gradient plus the target's psi'(0) term.
    gen = np.random.default_rng(5)
    x, w, g = (gen.standard_normal((3, 4)), gen.standard_normal((5, 4)),
               gen.standard_normal((3, 5)))
    x[1] = 0
    y = [0, 3, 4]
    z, lam, dx, dw = run(lsoftmax(m, {"base": 0.5}, dtype=dtype), x.astype(dtype), y,
                         g.astype(dtype), dtype=dtype, w=w.astype(dtype))
    assert np.all(z[1] == 0)
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dw))
    slope0 = mm.psi(np, m, np.zeros(1))[1][0]
    coeff = g[1].copy()
    coeff[3] *= (lam + slope0) / (1 + lam)
    np.testing.assert_allclose(dx[1], coeff @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [2, 3, 4])
def test_zero_weight_row_gives_finite_logits_and_gradient(m, dtype):
    gen = np.random.default_rng(6)
    x, w, g = (gen.standard_normal((4, 3)), gen.standard_normal((5, 3)),
               gen.standard_normal((4, 5)))
    w[2] = 0
    y = [2, 2, 0, 1]  # the zero row is a target class too
    z, _, dx, dw = run(lsoftmax(m, {"base": 0}, dtype=dtype), x.astype(dtype), y,
                       g.astype(dtype), dtype=dtype, w=w.astype(dtype))
    assert np.all(z[:, 2] == 0)
    for a in (z, dx, dw):
        assert np.all(np.isfinite(a))


def test_ignore_label_rows_keep_the_plain_inner_product():
    gen = np.random.default_rng(7)
    x, w, g = (gen.standard_normal((5, 3)), gen.standard_normal((4, 3)),
               gen.standard_normal((5, 4)))
    y = np.array([0, 255, 2, 255, 3])
    layer = lsoftmax(4, {"base": 0}, n=4, extra="loss_param { ignore_label: 255 }")
    z, _, dx, dw = run(layer, x, y, g, w=w)
    ignored = y == 255
    np.testing.assert_array_equal(z[ignored], (x @ w.T)[ignored])
    assert not np.allclose(z[~ignored], (x @ w.T)[~ignored])
    np.testing.assert_allclose(dx[ignored], (g @ w)[ignored], rtol=1e-13)
    # The same rows without a margin row contribute g^T x to dW.
    keep = ~ignored
    _, _, _, dw_kept = run(lsoftmax(4, {"base": 0}, n=4), x[keep], y[keep], g[keep],
                           w=w)
    np.testing.assert_allclose(dw, dw_kept + g[ignored].T @ x[ignored], rtol=1e-12)


# ------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [5, -1, 2.5, float("nan")])
def test_bad_labels_raise(bad):
    layer = lsoftmax(n=5)
    with pytest.raises(LabelError, match="LargeMarginInnerProduct layer 'lsm'"):
        run(layer, np.ones((3, 2)), [0, bad, 1])


def test_ignore_label_must_match_exactly():
    layer = lsoftmax(n=5, extra="loss_param { ignore_label: -1 }")
    with pytest.raises(LabelError, match="-2.0"):
        run(layer, np.ones((3, 2)), [0, -2, 1])


@pytest.mark.parametrize("field", ["base", "gamma", "power", "lambda_min"])
@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_bad_schedule_parameters_raise(field, value):
    layer = lsoftmax(sched={field: value})
    with pytest.raises(LayerSetupError, match=f"lsm'.*{field}"):
        run(layer, np.ones((2, 3)), [0, 1])


def test_negative_iteration_and_missing_num_output_raise():
    with pytest.raises(LayerSetupError, match="iteration"):
        run(lsoftmax(sched={"iteration": -2}), np.ones((2, 3)), [0, 1])
    with pytest.raises(LayerSetupError, match="num_output"):
        run(lsoftmax(n=0), np.ones((2, 3)), [0, 1])


def test_loaded_weights_of_the_wrong_feature_size_raise():
    text = ('name: "lsm" type: "LargeMarginInnerProduct" '
            "largemargin_inner_product_param { num_output: 4 type: DOUBLE } "
            + blob_text(np.ones((4, 5))))
    layer = netlite.create_layer(io.parse_layer_param(text), dtype=np.float64)
    with pytest.raises(ShapeError, match=r"lsm'.*expected \(4, 3\)"):
        run(layer, np.ones((2, 3)), [0, 1])


def test_shape_errors():
    layer = lsoftmax()
    run(layer, np.ones((2, 3)), [0, 1])
    x, y = make_blob((2, 4), np.float64, 1), make_blob((2,), np.float64, 0)
    with pytest.raises(ShapeError, match="K = 3"):
        layer.forward([x, y], [netlite.Blob(dtype=np.float64)])
    x, y = make_blob((2, 3), np.float64, 1), make_blob((3,), np.float64, 0)
    with pytest.raises(ShapeError, match="one label per feature row"):
        layer.forward([x, y], [netlite.Blob(dtype=np.float64)])
    with pytest.raises(LayerSetupError, match="in-place"):
        layer.reshape([x, y], [x])


def test_non_finite_features_raise():
    with pytest.raises(NonFiniteError, match=r"lsm'.*nan at index \(1, 2\)"):
        run(lsoftmax(), np.array([[1, 2, 3], [4, 5, np.nan]]), [0, 1])


def test_labels_get_no_gradient():
    layer = lsoftmax()
    assert layer.allow_force_backward(0) and not layer.allow_force_backward(1)
    x, y = make_blob((2, 3), np.float64, 1), make_blob((2,), np.float64, 0)
    top = [netlite.Blob(dtype=np.float64)]
    layer.setup([x, y], top)
    layer.forward([x, y], top)
    with pytest.raises(ValueError, match="cannot backpropagate to label"):
        layer.backward(top, [True, True], [x, y])


# ------------------------------------------------ the solver and resume
def _solver_text(prefix, seed, extra=""):
    return f"""
type: 'SGD' base_lr: 0.05 momentum: 0.9 weight_decay: 0.001
lr_policy: 'fixed' max_iter: 10 random_seed: {seed} display: 0
snapshot_prefix: '{prefix}'
{extra}
net_param {{
  layer {{ name: 'data' type: 'DummyData' top: 'x' top: 'y'
          dummy_data_param {{ shape {{ dim: 4 dim: 3 }} shape {{ dim: 4 }}
            data_filler {{ type: 'gaussian' std: 1 }}
            data_filler {{ type: 'constant' value: 2 }} }} }}
  layer {{ name: 'fc' type: 'LargeMarginInnerProduct' bottom: 'x' bottom: 'y'
          top: 'z' top: 'lambda'
          largemargin_inner_product_param {{ num_output: 3 type: TRIPLE
            base: 100 gamma: 0.5 power: 2 lambda_min: 3 iteration: 2
            weight_filler {{ type: 'gaussian' std: 0.5 }} }} }}
  layer {{ name: 'loss' type: 'SoftmaxWithLoss' bottom: 'z' bottom: 'y'
          top: 'loss' }}
}}
"""


def _solver(tmp_path, name, seed, extra=""):
    folder = tmp_path / name
    folder.mkdir()
    solver = netlite.get_solver(_solver_text(folder / "snap", seed, extra))
    lambdas = []
    solver.add_callback(on_iteration=lambda *a: lambdas.append(
        float(solver.net.blobs["lambda"].data)))
    return solver, lambdas


def test_resume_restores_lambda_and_weights_bit_exactly(tmp_path):
    straight, want = _solver(tmp_path, "straight", 5)
    straight.step(10)
    first, got_first = _solver(tmp_path, "first", 5)
    first.step(4)
    path = first.snapshot()
    resumed, got = _solver(tmp_path, "resumed", 99)  # all state from the file
    resumed.restore(path)
    resumed.step(6)
    assert got_first + got == want  # bit-identical lambdas
    assert want == [f32(schedule_lambda({"base": 100, "gamma": 0.5, "power": 2,
                                         "lambda_min": 3, "iteration": 2}, t))
                    for t in range(10)]
    assert want[-1] == 3 and want[0] > 10  # the schedule was exercised
    np.testing.assert_array_equal(resumed.net.layer_by_name("fc").blobs[0].data,
                                  straight.net.layer_by_name("fc").blobs[0].data)


def test_lambda_advances_per_solver_iteration_with_iter_size(tmp_path):
    # Caffe's counter advances per forward: with iter_size 3 it would use
    # it = 1, 2, 3 in iteration 0.  netlite's lambda is that of the solver
    # iteration, the same for each of its forwards.
    solver, lambdas = _solver(tmp_path, "iter_size", 5, "iter_size: 3")
    seen = []
    layer = solver.net.layer_by_name("fc")
    forward = layer.forward_cpu

    def spy(bottom, top):
        forward(bottom, top)
        seen.append(layer.lam)

    layer.forward_cpu = spy
    solver.step(3)
    sched = {"base": 100, "gamma": 0.5, "power": 2, "lambda_min": 3, "iteration": 2}
    want = [schedule_lambda(sched, t) for t in range(3)]
    assert lambdas == [f32(v) for v in want]
    assert seen == [v for v in want for _ in range(3)]


# ----------------------------------------------------------------- torch
@pytest.mark.torch
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("sched, ignore", [({"base": 0}, None), ({}, None),
                                           ({"base": 25}, -1)],
                         ids=["lambda0", "lambda1", "lambda25_ignore"])
def test_matches_torch_autograd(m, sched, ignore):
    torch = pytest.importorskip("torch")
    gen = np.random.default_rng(20 + m)
    x, w, g = (gen.standard_normal((9, 4)), gen.standard_normal((6, 4)),
               gen.standard_normal((9, 6)))
    y = gen.integers(0, 6, 9).astype(float)
    x[2] = -1.7 * w[int(y[2])]  # theta = pi
    x[3] = 0.8 * w[int(y[3])]  # theta = 0
    if ignore is not None:
        y[[1, 5]] = ignore
    extra = f"loss_param {{ ignore_label: {ignore} }}" if ignore is not None else ""
    z, lam, dx, dw = run(lsoftmax(m, sched, n=6, extra=extra), x, y, g, w=w)
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    zt = torch_logits(torch, xt, wt, y.astype(int).tolist(), m, lam,
                      ignore_label=ignore)
    zt.backward(torch.tensor(g))
    errs = [rel_err(z, zt.detach().numpy()), rel_err(dx, xt.grad.numpy()),
            rel_err(dw, wt.grad.numpy())]
    print(f"LargeMarginInnerProduct vs torch m={m} {sched}: worst rel err "
          f"{max(errs):.2e}")
    assert max(errs) < 1e-12


# ----------------------------------------------- pytorch-metric-learning
@pytest.mark.torch
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_matches_pytorch_metric_learning(m):
    torch = pytest.importorskip("torch")
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    gen = np.random.default_rng(30 + m)
    x, w = gen.standard_normal((8, 5)), gen.standard_normal((6, 5))
    y = gen.integers(0, 6, 8)
    x[0] = -2.0 * w[y[0]] + 1e-3 * gen.standard_normal(5)  # theta near pi
    want = pml_margin_loss(torch, losses.LargeMarginSoftmaxLoss, m, x, w, y)
    # netlite: base 0 (PML has no lambda), then a float64 softmax
    # cross-entropy with PML's mean over the batch.
    layer = lsoftmax(m, {"base": 0}, n=6)
    z, _, _, _ = run(layer, x, y, w=w)
    loss, g = softmax_cross_entropy(z, y)
    _, _, dx, dw = run(layer, x, y, g, w=w)
    errs = [rel_err(loss, want[0]), rel_err(dx, want[1]), rel_err(dw, want[2])]
    print(f"LargeMarginInnerProduct vs PML m={m}: worst rel err {max(errs):.2e}")
    assert max(errs) < 1e-12


@pytest.mark.torch
@pytest.mark.parametrize("m", [2, 3, 4])
def test_pml_takes_the_branch_beyond_pi_at_c_minus_1(m):
    # Documented difference: PML's k = floor(m acos(clamp(c)) / pi) is m at
    # c = -1, so its dpsi/dc there is -m^2; netlite's k is at most m - 1
    # and psi'(-1) = +m^2, the derivative from inside [0, pi].  psi agrees,
    # and so do the gradients w.r.t. x and W: dc/dx = 0 at theta = pi.
    torch = pytest.importorskip("torch")
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    loss_fn = pml_loss(losses.LargeMarginSoftmaxLoss, num_classes=3,
                       embedding_size=3, margin=m)
    c = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    value = loss_fn.modify_cosine_of_target_classes(c)
    value.backward()
    ours, slope = mm.psi(np, m, np.array([-1.0]))
    assert value.item() == pytest.approx(ours[0], abs=1e-13) == 1 - 2 * m
    assert c.grad.item() == pytest.approx(-m * m) and slope[0] == pytest.approx(m * m)
    w = np.eye(3) * [1.0, 2.0, 0.5]
    x = np.array([[-2.0, 0, 0], [0.3, 0.2, -0.1]])
    y = np.array([0, 1])
    want = pml_margin_loss(torch, losses.LargeMarginSoftmaxLoss, m, x, w, y)
    layer = lsoftmax(m, {"base": 0}, n=3)
    z, _, _, _ = run(layer, x, y, w=w)
    loss, g = softmax_cross_entropy(z, y)
    _, _, dx, dw = run(layer, x, y, g, w=w)
    assert loss == pytest.approx(want[0], rel=1e-13)
    np.testing.assert_allclose(dx, want[1], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dw, want[2], rtol=1e-12, atol=1e-14)


@pytest.mark.torch
def test_pml_gradient_of_a_zero_embedding_is_zero_netlite_is_the_inner_products():
    # Documented difference: PML builds every logit as cos * |w| |x|, and
    # torch's norm has subgradient 0 at 0, so a zero embedding gets a zero
    # gradient.  netlite's off-target logits are w_j . x, linear in x: their
    # exact gradient sum_j g_j w_j, plus the target's psi'(0) term.
    torch = pytest.importorskip("torch")
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    gen = np.random.default_rng(40)
    x, w = gen.standard_normal((3, 4)), gen.standard_normal((5, 4))
    x[1] = 0
    y = np.array([0, 3, 4])
    want = pml_margin_loss(torch, losses.LargeMarginSoftmaxLoss, 4, x, w, y)
    layer = lsoftmax(4, {"base": 0}, n=5)
    z, _, _, _ = run(layer, x, y, w=w)
    loss, g = softmax_cross_entropy(z, y)
    _, _, dx, dw = run(layer, x, y, g, w=w)
    assert loss == pytest.approx(want[0], rel=1e-13)
    assert np.all(want[1][1] == 0)
    coeff = g[1].copy()
    coeff[3] *= mm.psi(np, 4, np.zeros(1))[1][0]  # psi_4'(0) = 0
    np.testing.assert_allclose(dx[1], coeff @ w, rtol=1e-13)
    np.testing.assert_allclose(np.delete(dx, 1, 0), np.delete(want[1], 1, 0),
                               rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dw, want[2], rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------- engines
@pytest.mark.skipif(not netlite.backend.numba_available(), reason="numba missing")
def test_numba_engine_falls_back_to_the_reference():
    gen = np.random.default_rng(60)
    x, w, g = (gen.standard_normal((5, 3)), gen.standard_normal((4, 3)),
               gen.standard_normal((5, 4)))
    y = [0, 1, 2, 3, 1]
    results = []
    for engine in ("numpy", "numba"):
        netlite.set_cpu_engine(engine)
        layer = lsoftmax(3, {}, n=4)
        results.append(run(layer, x, y, g, w=w))
        assert layer.engine == engine
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
