"""LabelSpecificMargin (ArcFace and InsightFace's combined margin): the
standard tests for every boundary mode, SOFT, per-class margins, ignored
labels, the TEST phase and targets near theta = 0 and pi; then the th/mm
values, continuity and monotonicity, the edge cases |c| = 1 and rounding
past 1 (no NaN or Inf), the surrogate gradient modes pinned to their
formulas, annealing, warnings, bad input, and cross-checks with PyTorch
autograd, arcface_torch's straight-through trick and pytorch-metric-
learning's ArcFaceLoss (including its inf at |c| = 1)."""

import math
import warnings

import naive
import numpy as np
import pytest
from layer_test_case import LayerTestCase, labels
from layer_testing import (
    f32,
    filler,
    make_blob,
    requires_numba,
)

import netlite
from netlite import Blob
from netlite.errors import (
    LabelError,
    LayerSetupError,
    NetliteWarning,
    NonFiniteError,
    ShapeError,
)
from netlite.layers.label_specific_margin import CLAMPED_EPS, DELTA_MAX, EPS

BOUNDARIES = ("THMM", "EASY", "NONE")
GRAD_MODES = ("EXACT", "STRAIGHT_THROUGH", "CLAMPED")


def rad(deg):
    """A margin in degrees (a float32 field) in radians, as the layer has it."""
    return f32(deg) * math.pi / 180


def _targets_at(thetas, classes=5, seed=3):
    """Bottoms whose targets sit at the angles ``thetas`` (others uniform)."""
    n = len(thetas)
    rng = np.random.default_rng(seed)
    x = rng.uniform(-0.9, 0.9, (n, classes))
    y = rng.integers(0, classes, n)
    x[np.arange(n), y] = np.cos(thetas)
    return x, y.astype(np.float64)


NEAR_ZERO = _targets_at([0.03, 0.05, 0.08, 0.12, 0.2, 0.4])
NEAR_PI = _targets_at(
    [math.pi - 0.03, math.pi - 0.05, math.pi - 0.1, math.pi - 0.2, 2.5, 1.0]
)


class TestLabelSpecificMarginLayer(LayerTestCase):
    """Forward against ``naive.label_specific_margin`` (both dtypes); the
    exhaustive float64 gradient for the EXACT mode (the surrogate modes'
    gradients are pinned to their formulas below); propagate_down and the
    overwritten bottom diff for every case.  Cosines are uniform in
    [-0.9, 0.9] unless a case places its targets near 0 or pi."""

    shape, classes, ignore = (6, 5), 5, None
    text, extra, tops = "margin_base: 28.6 gamma: 0", "", 1
    # Margins as the prototxt gives them (m2 in `unit`); the oracle widens
    # them from float32 and converts m2 to radians.
    m1, m2, m3, unit, boundary, grad = 1.0, 28.6, 0.0, "DEGREE", "THMM", "EXACT"
    fixed = None
    cases = {
        "arcface": {},
        "arcface_radian": {
            "text": "margin_base: 0.5 gamma: 0 unit: RADIAN",
            "unit": "RADIAN",
            "m2": 0.5,
        },
        "combined": {
            "text": "margin_base: 0.4 gamma: 0 unit: RADIAN m1: 0.9 m3: 0.15",
            "m1": 0.9,
            "unit": "RADIAN",
            "m2": 0.4,
            "m3": 0.15,
        },
        "combined_insightface": {
            "text": "margin_base: 0.3 gamma: 0 unit: RADIAN m3: 0.2",
            "unit": "RADIAN",
            "m2": 0.3,
            "m3": 0.2,
        },
        "m1_above_1": {
            "text": "margin_base: 0.2 gamma: 0 unit: RADIAN m1: 1.5",
            "m1": 1.5,
            "unit": "RADIAN",
            "m2": 0.2,
        },
        "easy": {
            "text": "margin_base: 28.6 gamma: 0 boundary: EASY",
            "boundary": "EASY",
        },
        "none": {
            "text": "margin_base: 0.5 gamma: 0 unit: RADIAN m1: 0.8 boundary: NONE",
            "m1": 0.8,
            "unit": "RADIAN",
            "m2": 0.5,
            "boundary": "NONE",
        },
        "cosface_m3": {"text": "m3: 0.35", "m2": 0.0, "m3": 0.35},
        "soft": {"text": "type: SOFT margin_base: 2 gamma: 0", "m1": 2.0, "m2": 0.0},
        "class_margin": {
            "text": "class_margin: [10, 20, 30, 0, 45]",
            "m2": [10, 20, 30, 0, 45],
            "unit": "DEGREE",
        },
        "ignore": {"extra": "loss_param { ignore_label: -1 }", "ignore": -1},
        "caffe_4d": {"shape": (4, 3, 1, 1), "classes": 3},
        "margin_top": {"tops": 2},
        "test_phase": {"extra": "phase: TEST", "m2": 0.0},
        "margin_on_test": {
            "text": "margin_base: 28.6 gamma: 0 margin_on_test: true",
            "extra": "phase: TEST",
        },
        "near_zero": {"fixed": "near_zero", "stepsize": 1e-6},
        "near_zero_none": {
            "fixed": "near_zero",
            "stepsize": 1e-6,
            "boundary": "NONE",
            "text": "margin_base: 0.5 gamma: 0 unit: RADIAN m1: 0.8 boundary: NONE",
            "m1": 0.8,
            "unit": "RADIAN",
            "m2": 0.5,
        },
        "near_pi_none": {
            "fixed": "near_pi",
            "stepsize": 1e-6,
            "boundary": "NONE",
            "text": "margin_base: 0.5 gamma: 0 unit: RADIAN m1: 0.8 boundary: NONE",
            "m1": 0.8,
            "unit": "RADIAN",
            "m2": 0.5,
        },
        "near_pi_thmm": {"fixed": "near_pi", "stepsize": 1e-6},
        "straight_through": {
            "text": "margin_base: 28.6 gamma: 0 grad_mode: STRAIGHT_THROUGH",
            "grad": "STRAIGHT_THROUGH",
        },
        "clamped": {
            "text": "margin_base: 28.6 gamma: 0 grad_mode: CLAMPED",
            "grad": "CLAMPED",
        },
        # Above PARALLEL_MIN_ELEMENTS (the threaded kernels); parity only.
        "large": {"shape": (64, 1000), "classes": 1000, "tops": 2},
        "large_combined_ignore": {
            "shape": (64, 1000),
            "classes": 1000,
            "text": "margin_base: 0.4 gamma: 0 unit: RADIAN m1: 0.9 m3: 0.15",
            "extra": "loss_param { ignore_label: -1 }",
            "ignore": -1,
        },
        "large_soft_4d_clamped": {
            "shape": (64, 10, 10, 10),
            "classes": 1000,
            "text": "type: SOFT margin_base: 2 gamma: 0 grad_mode: CLAMPED",
        },
    }

    @property
    def layer(self):
        return (
            f'type: "LabelSpecificMargin" label_specific_margin_param {{ '
            f"{self.text} }} {self.extra}"
        )

    @property
    def bottoms(self):
        if self.fixed is not None:
            x, y = {"near_zero": NEAR_ZERO, "near_pi": NEAR_PI}[self.fixed]
            return [(x.shape, x), (y.shape, y)]
        return [
            (self.shape, filler("uniform", min=-0.9, max=0.9)),
            ((self.shape[0],), labels(self.classes, self.ignore, 3)),
        ]

    def applies(self, test_name, case):
        if case.startswith("large") and not test_name.startswith("test_engine_parity"):
            return False
        # Only the EXACT mode is the derivative of the forward.
        if (
            test_name == "test_gradient"
            and type(self).cases[case].get("grad", "EXACT") != "EXACT"
        ):
            return False
        return super().applies(test_name, case)

    def oracle(self, bottoms, blobs):
        per_unit = 1.0 if self.unit == "RADIAN" else math.pi / 180
        m2 = np.float32(self.m2).astype(np.float64) * per_unit
        m1, m3 = np.float32(self.m1).astype(np.float64), f32(self.m3)
        tops = [
            naive.label_specific_margin(
                bottoms[0], bottoms[1], m1, m2, m3, self.boundary, self.ignore
            )
        ]
        if self.tops > 1:
            tops.append(np.array([f32(28.6)]))
        return tops


def _layer(text, dtype=np.float64, extra=""):
    return netlite.create_layer(
        f'name: "arc" type: "LabelSpecificMargin" label_specific_margin_param '
        f"{{ {text} }} {extra}",
        dtype=dtype,
    )


def _run(text, x, y, dtype=np.float64, extra="", dy=None, iteration=0):
    """Forward (and backward with ``dy``, default ones): (layer, z, dx, top)."""
    layer = _layer(text, dtype, extra)
    x = np.asarray(x, dtype=np.float64)
    bottom = [make_blob(x.shape, dtype, x), make_blob(np.shape(y), dtype, y)]
    top = [Blob(dtype=dtype), Blob(dtype=dtype)]
    layer.setup(bottom, top)
    layer.iteration = iteration
    layer.forward(bottom, top)
    top[0].diff[...] = np.ones(x.shape) if dy is None else dy
    layer.backward(top, [True, False], bottom)
    return layer, top[0].data.copy(), bottom[0].diff.copy(), top


def _column(c, text, dtype=np.float64, extra=""):
    """psi and the gradient factor for a column of target cosines."""
    c = np.asarray(c, dtype=np.float64)
    x = np.zeros((c.size, 2))
    x[:, 0] = c
    _, z, dx, _ = _run(text, x, np.zeros(c.size), dtype, extra)
    return z[:, 0], dx[:, 0]


ARC_05 = "margin_base: 0.5 gamma: 0 unit: RADIAN"


# ------------------------------------------------------- th and mm
@pytest.mark.parametrize(
    "margin, unit, th, mm",
    [
        (0.5, "RADIAN", -0.878, 0.240),
        (10, "DEGREE", -0.985, 0.030),
        (20, "DEGREE", -0.940, 0.119),
        (30, "DEGREE", -0.866, 0.262),
    ],
)
def test_th_and_mm_match_appendix_b(margin, unit, th, mm):
    text = f"margin_base: {margin} gamma: 0 unit: {unit}"
    m = f32(margin) * (1 if unit == "RADIAN" else math.pi / 180)
    grid = np.linspace(-1, -0.8, 200001)
    psi, _ = _column(grid, text)
    # The switch is the one place where psi falls as c rises.
    jump = int(np.argmax(psi[:-1] - psi[1:]))
    assert grid[jump] == pytest.approx(th, abs=5e-4)
    assert grid[jump] == pytest.approx(math.cos(math.pi - m), abs=2e-6)
    below = grid[: jump - 1]
    np.testing.assert_allclose(below - psi[: jump - 1], m * math.sin(m), rtol=1e-12)
    assert m * math.sin(m) == pytest.approx(mm, abs=5e-4)


def test_thmm_generalises_to_the_combined_margin():
    # theta* = (pi - m2) / m1 and mm = delta sin(delta), delta = pi - theta*.
    m1, m2, m3 = 1.5, f32(0.2), f32(0.1)
    theta_star = (math.pi - m2) / m1
    delta = math.pi - theta_star
    text = "margin_base: 0.2 gamma: 0 unit: RADIAN m1: 1.5 m3: 0.1"
    c = np.array([math.cos(theta_star) + 1e-9, math.cos(theta_star) - 1e-9, -0.9])
    psi, factor = _column(c, text)
    assert psi[0] == pytest.approx(-1 - m3, abs=1e-7)
    np.testing.assert_allclose(
        psi[1:], c[1:] - delta * math.sin(delta) - m3, rtol=1e-14
    )
    np.testing.assert_array_equal(factor[1:], 1.0)


# ------------------------------------------ continuity, monotonicity
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_psi_is_continuous_except_at_its_switch(boundary):
    text = f"margin_base: 0.5 gamma: 0 unit: RADIAN m1: 0.8 boundary: {boundary}"
    grid = np.linspace(-1, 1, 400001)
    psi, _ = _column(grid, text)
    steps = np.abs(np.diff(psi))
    # Away from the switch a step of 5e-6 in c moves psi by at most
    # m1 * sqrt(2 * 5e-6) < 3e-3 (the steepest step, at |c| = 1, where
    # theta moves by sqrt(2 dc)); the EASY switch is a jump of 0.185.
    big = np.nonzero(steps > 1e-2)[0]
    m1, m2 = f32(0.8), f32(0.5)
    if boundary == "EASY":
        assert big.tolist() == [200000 - 1] or big.tolist() == [200000]
        assert abs(grid[big[0]]) <= 1e-5
    else:  # m1 pi + m2 < pi: no fallback for THMM either
        assert big.size == 0
        assert psi[0] == pytest.approx(math.cos(m1 * math.pi + m2))


@pytest.mark.parametrize("deg", [5, 28.6, 60, 90, 120, 133])
def test_thmm_psi_is_monotonic_up_to_delta_max(deg):
    grid = np.linspace(-1, 1, 200001)
    psi, _ = _column(grid, f"margin_base: {deg} gamma: 0")
    assert np.all(np.diff(psi) >= -1e-12)


def test_thmm_jump_is_downward_and_of_the_expected_size():
    m = f32(0.5)
    th, mm = math.cos(math.pi - m), m * math.sin(m)
    psi, _ = _column([th + 1e-12, th - 1e-12], ARC_05)
    assert psi[0] - psi[1] == pytest.approx(-1 - (th - mm), abs=1e-9)
    assert psi[0] > psi[1]


@pytest.mark.parametrize("boundary", ["NONE", "EASY"])
def test_margin_branch_is_monotonic_within_its_bound(boundary):
    grid = np.linspace(-1, 1, 200001)
    # NONE: m1 pi + m2 <= pi; EASY: m1 pi / 2 + m2 <= pi.
    text = (
        "margin_base: 0.6 gamma: 0 unit: RADIAN m1: 0.8 boundary: NONE"
        if boundary == "NONE"
        else "margin_base: 80 gamma: 0 m1: 1.1 boundary: EASY"
    )
    psi, _ = _column(grid, text)
    d = np.diff(psi)
    if boundary == "EASY":
        d = d[grid[:-1] > 1e-9]
    assert np.all(d >= -1e-12)


# -------------------------------------------------------- warnings
def test_no_warning_within_the_bounds():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _column([0.3, -0.99], "margin_base: 133 gamma: 0")
        _column([0.3], "margin_base: 0.6 gamma: 0 unit: RADIAN m1: 0.8 boundary: NONE")


@pytest.mark.parametrize(
    "text, bound",
    [
        ("margin_base: 140 gamma: 0", r"delta <= 133\.5635 deg \(2\.331122 rad\)"),
        (f"{ARC_05} boundary: NONE", r"theta > \(pi - m2\) / m1 = 151\.4 deg"),
        ("margin_base: 100 gamma: 0 boundary: EASY", r"m1 \* 90 deg \+ m2 <= 180 deg"),
        ("class_margin: [10, 140] ", r"delta = 140 deg"),
    ],
)
def test_non_monotonic_margin_warns_once_with_the_bound(text, bound):
    layer = _layer(text)
    x, y = (
        make_blob((2, 2), np.float64, [[0.5, 0.1], [0.2, 0.3]]),
        make_blob((2,), np.float64, [0, 1]),
    )
    top = [Blob(dtype=np.float64)]
    layer.setup([x, y], top)
    with pytest.warns(NetliteWarning, match=bound):
        layer.forward([x, y], top)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.forward([x, y], top)  # once only


def test_delta_max_is_the_root():
    assert math.cos(DELTA_MAX) + DELTA_MAX * math.sin(DELTA_MAX) == pytest.approx(
        1, abs=1e-15
    )
    assert math.pi / 2 < DELTA_MAX < math.pi


# --------------------------------------------------------- edge cases
EDGES = [1.0, -1.0, 0.0, 1 + 2e-7, -1 - 2e-7, 1 - 1e-9, -1 + 1e-9]


@pytest.mark.parametrize("grad", GRAD_MODES)
@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_no_nan_or_inf_at_the_edges(boundary, grad, dtype):
    # |c| = 1, theta = 0 and pi, |c| just past 1 from rounding (a float32
    # 1 + 2e-7 is its nextafter(1)), for ArcFace and a combined margin.
    for text in (
        ARC_05,
        "margin_base: 0.3 gamma: 0 unit: RADIAN m1: 1.2 m3: 0.2",
        "type: SOFT margin_base: 2.5 gamma: 0",
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NetliteWarning)  # NONE
            psi, factor = _column(
                EDGES, f"{text} boundary: {boundary} grad_mode: {grad}", dtype
            )
        assert np.all(np.isfinite(psi)) and np.all(np.isfinite(factor)), (psi, factor)
        assert np.all(np.abs(psi) <= 3)  # SOFT 2.5: th/mm gives -2.79 at c = -1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_gradient_at_cos_one_is_held_at_one_minus_eps(dtype):
    eps = EPS[np.dtype(dtype).name]
    m = f32(0.5)
    psi, factor = _column([1.0, 1 + 2e-7, 1 - eps / 2, 1 - 2 * eps], ARC_05, dtype)
    assert psi[0] == pytest.approx(math.cos(m), rel=1e-7)
    assert psi[1] == psi[0]  # rounding past 1 reads as 1
    held = naive.arc_margin_slope(1 - eps, 1.0, m)
    rtol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(factor[:3], held, rtol=rtol)
    assert held > 30
    # Below the clamp: the exact derivative at the (rounded) cosine.
    inside = float(np.asarray(1 - 2 * eps, dtype=dtype))
    assert factor[3] == pytest.approx(naive.arc_margin_slope(inside, 1.0, m), rel=rtol)


def test_exact_gradient_at_theta_zero_uses_the_finite_limit():
    # m2 = 0: psi = cos(m1 theta) has psi'(1) = m1^2 (SOFT 2 -> 4, and
    # m1 = 0.75 -> 0.5625); CosFace through m3 has psi' = 1 exactly.
    _, factor = _column([1.0, 1 + 2e-7], "type: SOFT margin_base: 2 gamma: 0")
    np.testing.assert_array_equal(factor, 4.0)
    _, factor = _column([1.0], "m1: 0.75")
    assert factor[0] == 0.5625
    _, factor = _column([1.0, -1.0, 0.3], "m3: 0.35")
    np.testing.assert_array_equal(factor, 1.0)


def test_theta_pi_under_each_boundary():
    m = f32(0.5)
    for boundary, want_psi, want_factor in (
        ("THMM", -1 - m * math.sin(m), 1.0),  # the fallback: c - mm
        ("EASY", -1.0, 1.0),
    ):  # no margin where c <= 0
        psi, factor = _column([-1.0], f"{ARC_05} boundary: {boundary}")
        assert psi[0] == pytest.approx(want_psi, abs=1e-15)
        assert factor[0] == want_factor
    with pytest.warns(NetliteWarning):
        psi, factor = _column([-1.0], f"{ARC_05} boundary: NONE")
    assert psi[0] == pytest.approx(math.cos(math.pi + m), abs=1e-15)
    held = naive.arc_margin_slope(-1 + EPS["float64"], 1.0, m, "NONE")
    assert factor[0] == pytest.approx(held, rel=1e-9) and held < -1000


def test_exact_gradient_matches_finite_differences_near_the_edges():
    # Inside the clamp the factor is the derivative of the forward.
    for c0 in (1 - 2e-6, 1 - 1e-5, 0.9999, -0.9999):
        for text in (
            ARC_05,
            f"{ARC_05} m1: 0.8 boundary: NONE",
            "type: SOFT margin_base: 3 gamma: 0",
        ):
            h = (1 - abs(c0)) / 1000
            psi, factor = _column([c0 - h, c0 + h, c0], text)
            fd = (psi[1] - psi[0]) / (2 * h)
            assert factor[2] == pytest.approx(fd, rel=1e-4), (c0, text)


# ------------------------------------------------ the surrogate modes
def _surrogate_rows():
    rng = np.random.default_rng(11)
    c = np.concatenate([rng.uniform(-0.99, 0.99, 40), [0.9999, 0.99999, -0.95]])
    return c


def test_straight_through_factor_is_one():
    """arcface_torch (2022-12): forward with the margin, backward as if
    psi' = 1; it is not the derivative of the forward."""
    c = _surrogate_rows()
    psi, factor = _column(c, f"{ARC_05} grad_mode: STRAIGHT_THROUGH")
    psi_exact, exact = _column(c, ARC_05)
    np.testing.assert_array_equal(psi, psi_exact)  # same forward
    np.testing.assert_array_equal(factor, 1.0)
    margin_rows = c > math.cos(math.pi - f32(0.5))
    assert np.all(np.abs(exact[margin_rows] - 1) > 1e-3)


def test_pass_bp_is_straight_through():
    c = _surrogate_rows()
    _, factor = _column(c, f"{ARC_05} pass_bp: true")
    np.testing.assert_array_equal(factor, 1.0)


def _clamped64(c, m):
    """happynear's HARD backward factor, written out in float64."""
    ce = np.clip(c, -1 + 1e-4, 1 - 1e-4)
    g = math.cos(m) + ce / np.sqrt(1 - ce * ce) * math.sin(m)
    return np.clip(g, 0, 2)


def test_clamped_factor_is_happynears_formula():
    c = _surrogate_rows()
    m = rad(28.6)
    text = "margin_base: 28.6 gamma: 0 boundary: NONE grad_mode: CLAMPED"
    with pytest.warns(NetliteWarning):
        psi, factor = _column(c, text)
    np.testing.assert_allclose(factor, _clamped64(c, m), rtol=1e-13, atol=1e-15)
    assert CLAMPED_EPS == 1e-4
    # It differs from the derivative of the forward where the exact
    # factor leaves [0, 2] (c near 1: large; theta + m > pi: negative).
    with pytest.warns(NetliteWarning):
        _, exact = _column(c, "margin_base: 28.6 gamma: 0 boundary: NONE")
    out = (exact > 2) | (exact < 0)
    assert out.sum() >= 3 and np.all(factor[out] != exact[out])
    h = 1e-7
    for i in np.nonzero(out)[0]:
        with pytest.warns(NetliteWarning):
            lo, _ = _column([c[i] - h], "margin_base: 28.6 gamma: 0 boundary: NONE")
        with pytest.warns(NetliteWarning):
            hi, _ = _column([c[i] + h], "margin_base: 28.6 gamma: 0 boundary: NONE")
        fd = (hi[0] - lo[0]) / (2 * h)
        assert abs(factor[i] - fd) > 1e-2 * max(1, abs(fd))


def test_clamped_under_thmm_keeps_the_fallback_factor():
    c = _surrogate_rows()
    _, factor = _column(c, f"{ARC_05} grad_mode: CLAMPED")
    th = math.cos(math.pi - f32(0.5))
    want = np.where(c > th, _clamped64(c, f32(0.5)), 1.0)
    np.testing.assert_allclose(factor, want, rtol=1e-13)


# --------------------------------------------- phases, SOFT, per class
def test_test_phase_is_the_identity_and_reports_the_margin():
    x = np.array([[0.5, 0.1], [0.2, 0.3]])
    layer, z, dx, top = _run("margin_base: 30 gamma: 0", x, [0, 1], extra="phase: TEST")
    np.testing.assert_array_equal(z, x)
    np.testing.assert_array_equal(dx, 1.0)
    assert float(top[1].data[0]) == 30.0


def test_margin_on_test_applies_the_margin_in_test():
    # happynear ANDs margin_on_test with phase == TRAIN: it never acts.
    x = np.array([[0.5, 0.1], [0.2, 0.3]])
    _, z, _, _ = _run(
        "margin_base: 30 gamma: 0 margin_on_test: true", x, [0, 1], extra="phase: TEST"
    )
    assert z[0, 0] == pytest.approx(math.cos(math.acos(0.5) + math.radians(30)))


def test_soft_is_the_multiplicative_margin_and_zero_means_none():
    c = np.array([0.9, 0.5, 0.1])
    with pytest.warns(NetliteWarning, match="rises again for theta > .* = 90 deg"):
        psi, _ = _column(c, "type: SOFT margin_base: 2 gamma: 0 boundary: NONE")
    np.testing.assert_allclose(psi, np.cos(2 * np.arccos(c)), rtol=1e-14)
    psi, factor = _column(c, "type: SOFT")  # margin 0: happynear skips it
    np.testing.assert_array_equal(psi, c)
    np.testing.assert_array_equal(factor, 1.0)


def test_class_margin_per_class_and_its_top():
    x = np.array([[0.5, 0.1, 0.3], [0.2, 0.3, 0.1], [0.7, 0.2, 0.4]])
    _, z, _, top = _run("class_margin: [10, 0, 30]", x, [0, 1, 2])
    want = naive.label_specific_margin(x, [0, 1, 2], 1.0, [rad(10), 0.0, rad(30)])
    np.testing.assert_allclose(z, want, rtol=1e-15)
    assert z[1, 1] == 0.3  # margin 0: unchanged
    np.testing.assert_array_equal(top[1].data, [10, 0, 30])


def test_ignored_rows_get_no_margin_and_all_ignored_is_identity():
    x = np.array([[0.5, 0.1], [0.2, 0.3]])
    _, z, dx, _ = _run(
        "margin_base: 30 gamma: 0", x, [0, -1], extra="loss_param { ignore_label: -1 }"
    )
    np.testing.assert_array_equal(z[1], x[1])
    assert z[0, 0] != x[0, 0]
    _, z, dx, _ = _run(
        "margin_base: 30 gamma: 0", x, [-1, -1], extra="loss_param { ignore_label: -1 }"
    )
    np.testing.assert_array_equal(z, x)
    np.testing.assert_array_equal(dx, 1.0)


def test_in_place_equals_out_of_place(dtype):
    x0 = np.array([[0.5, 0.1], [0.2, -0.95]])
    _, want_z, want_dx, _ = _run(ARC_05, x0, [0, 1], dtype, dy=np.full((2, 2), 3.0))
    layer = _layer(ARC_05, dtype)
    x, y = make_blob((2, 2), dtype, x0), make_blob((2,), dtype, [0, 1])
    layer.setup([x, y], [x])
    layer.forward([x, y], [x])
    np.testing.assert_array_equal(x.data, want_z)
    x.diff[...] = 3.0
    layer.backward([x], [True, False], [x, y])
    np.testing.assert_array_equal(x.diff, want_dx)


# ------------------------------------------------------------ annealing
def test_annealed_margin_follows_the_iteration_and_caps():
    # margin = margin_base + (1 + gamma t)^power - 1, min margin_max.
    text = "margin_base: 5 gamma: 0.5 power: 1 margin_max: 30 iteration: 10"
    for t, want in ((0, 10.0), (20, 20.0), (30, 25.0), (1000, 30.0)):
        layer, z, _, top = _run(text, [[0.5, 0.1]], [0], iteration=t)
        assert layer.current_margin() == pytest.approx(want)
        assert float(top[1].data[0]) == pytest.approx(want)
        assert z[0, 0] == pytest.approx(math.cos(math.acos(0.5) + math.radians(want)))


def test_without_margin_base_there_is_no_margin():
    layer, z, _, _ = _run("gamma: 3 margin_max: 20", [[0.5, 0.1]], [0], iteration=7)
    assert layer.current_margin() == 0.0 and z[0, 0] == 0.5


def test_unbounded_schedule_warns_at_setup():
    with pytest.warns(NetliteWarning, match="margin_base \\+ t"):
        _layer("margin_base: 20").setup(
            [
                make_blob((1, 2), np.float64, [[0.5, 0.1]]),
                make_blob((1,), np.float64, [0]),
            ],
            [Blob(dtype=np.float64)],
        )


def test_schedule_reaching_a_half_turn_is_an_error():
    with pytest.raises(
        LayerSetupError, match=r"annealed margin at t = 200 .*below 180"
    ):
        _run(
            "margin_base: 0 gamma: 1 margin_max: 200", [[0.5, 0.1]], [0], iteration=200
        )


def test_net_set_iteration_drives_the_margin():
    text = (
        'layer { name: "in" type: "Input" top: "x" top: "y" '
        "input_param { shape { dim: 1 dim: 2 } shape { dim: 1 } } }\n"
        'layer { name: "arc" type: "LabelSpecificMargin" bottom: "x" bottom: "y" '
        'top: "z" top: "m" label_specific_margin_param { margin_base: 0 gamma: 0.1 '
        "margin_max: 30 } }\n"
    )
    net = netlite.Net(text, netlite.TRAIN, dtype=np.float64)
    net.blobs["x"].data[...] = [[0.5, 0.1]]
    net.blobs["y"].data[...] = [0]
    seen = []
    for t in (0, 100, 100, 1000):
        net.set_iteration(t)
        seen.append(float(net.forward()["m"][0]))
    np.testing.assert_allclose(seen, [0, 10, 10, 30], atol=1e-5)


# ----------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "text, match",
    [
        ("margin_base: -5 gamma: 0", r"annealed margin at t = 0 = -5.*negative margin"),
        ("margin_base: nan gamma: 0", "margin_base = nan"),
        ("margin_base: 30 gamma: 0 margin_max: -1", "margin_max = -1"),
        ("margin_base: 180 gamma: 0", "below 180"),
        ("margin_base: 3.2 gamma: 0 unit: RADIAN", r"below 3\.14159"),
        ("m1: 0", "m1 = 0.0 must be finite and > 0"),
        ("m1: -1", "m1 = -1.0"),
        ("m1: nan", "m1 = nan"),
        ("m3: -0.1", "m3 = -0.1"),
        ("m3: inf", "m3 = inf"),
        ("class_margin: [10, -1]", r"class_margin\[1\] = -1.0.*negative margin"),
        ("class_margin: [10, nan]", r"class_margin\[1\] = nan"),
        ("class_margin: [10, 190]", r"class_margin\[1\] = 190.0 must be below 180"),
        ("class_margin: [10, 20] margin_base: 3", "do not also set margin_base"),
        ("type: SOFT m1: 2", "do not also set m1"),
        ("type: SOFT margin_base: -1 gamma: 0", "SOFT margin multiplies"),
        ("auto_tune: true", "auto_tune: true is not supported"),
        (
            "reset_margin: true",
            "reset_margin: true is not supported: the fork declares",
        ),
        (
            "pass_bp: true grad_mode: CLAMPED",
            "pass_bp: true is grad_mode: STRAIGHT_THROUGH",
        ),
    ],
)
def test_bad_parameters(text, match):
    with pytest.raises(LayerSetupError, match=match) as info:
        _run(text, [[0.5, 0.1]], [0])
    assert "LabelSpecificMargin layer 'arc'" in str(info.value)


def test_class_margin_length_must_be_c():
    with pytest.raises(ShapeError, match="class_margin has 3 values for C = 2"):
        _run("class_margin: [1, 2, 3]", [[0.5, 0.1]], [0])


def test_third_bottom_is_rejected():
    # happynear's margin-from-a-bottom form is not supported.
    layer = _layer(ARC_05)
    blobs = [
        make_blob((1, 2), np.float64, [[0.5, 0.1]]),
        make_blob((1,), np.float64, [0]),
        make_blob((1,), np.float64, [1]),
    ]
    with pytest.raises(LayerSetupError, match="exactly 2 bottom"):
        layer.setup(blobs, [Blob(dtype=np.float64)])


@pytest.mark.parametrize("engine", ["numpy", "numba"])
@pytest.mark.parametrize("label", [2.0, -1.0, 1.5, float("nan")])
def test_bad_labels(label, engine):
    netlite.set_cpu_engine(engine)
    with pytest.raises(LabelError, match=r"'arc'.*index \(1,\)"):
        _run(ARC_05, [[0.5, 0.1], [0.2, 0.3]], [0, label])


@pytest.mark.parametrize("engine", ["numpy", "numba"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_cosine(value, engine):
    netlite.set_cpu_engine(engine)
    with pytest.raises(NonFiniteError, match=r"'arc'.*index \(0, 1\)"):
        _run(ARC_05, [[0.5, value], [0.2, 0.3]], [0, 1])


def test_no_gradient_to_labels():
    layer = _layer(ARC_05)
    bottom = [
        make_blob((1, 2), np.float64, [[0.5, 0.1]]),
        make_blob((1,), np.float64, [0]),
    ]
    top = [Blob(dtype=np.float64)]
    layer.setup(bottom, top)
    layer.forward(bottom, top)
    with pytest.raises(ValueError, match="label"):
        layer.backward(top, [True, True], bottom)


# ------------------------------------------------------- cross-checks
def _layer_rows(c, y, text, dy):
    layer, z, dx, _ = _run(text, c, y, dy=dy)
    return z, dx


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def _torch_psi(torch, c, m1, m2, m3, boundary):
    """psi as an autograd formulation, insightface-style."""
    theta = torch.acos(c)
    arc = torch.cos(m1 * theta + m2) - m3
    if boundary == "THMM":
        delta = math.pi - (math.pi - m2) / m1
        return torch.where(
            m1 * theta + m2 <= math.pi, arc, c - delta * math.sin(delta) - m3
        )
    if boundary == "EASY":
        return torch.where(c > 0, arc, c)
    return arc


@pytest.mark.torch
@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize(
    "margins",
    [
        ("margin_base: 0.5 gamma: 0 unit: RADIAN", 1.0, f32(0.5), 0.0),
        ("margin_base: 0.3 gamma: 0 unit: RADIAN m3: 0.2", 1.0, f32(0.3), f32(0.2)),
        (
            "margin_base: 0.4 gamma: 0 unit: RADIAN m1: 0.9 m3: 0.15",
            f32(0.9),
            f32(0.4),
            f32(0.15),
        ),
        ("margin_base: 0.2 gamma: 0 unit: RADIAN m1: 1.5", 1.5, f32(0.2), 0.0),
    ],
    ids=["arcface", "combined_1_03_02", "combined_09_04_015", "m1_15"],
)
def test_matches_torch_autograd(boundary, margins):
    torch = pytest.importorskip("torch")
    text, m1, m2, m3 = margins
    rng = np.random.default_rng(21)
    n, classes = 64, 7
    c = rng.uniform(-0.999, 0.999, (n, classes))
    y = rng.integers(0, classes, n)
    dy = rng.standard_normal(c.shape)
    ct = torch.tensor(c, requires_grad=True)
    mask = torch.nn.functional.one_hot(torch.tensor(y), classes).bool()
    z = torch.where(mask, _torch_psi(torch, ct, m1, m2, m3, boundary), ct)
    z.backward(torch.tensor(dy))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NetliteWarning)
        got_z, got_dx = _layer_rows(c, y, f"{text} boundary: {boundary}", dy)
    worst = max(_rel(got_z, z.detach().numpy()), _rel(got_dx, ct.grad.numpy()))
    print(
        f"LabelSpecificMargin {boundary} vs torch autograd: worst relative error "
        f"{worst:.3g}"
    )
    assert worst < 1e-12


@pytest.mark.torch
def test_straight_through_is_arcface_torch_trick():
    """arcface_torch's CombinedMarginLoss since 2022-12: arccos_, + m2 and
    cos_ in place under no_grad, then the scale (no boundary handling)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(22)
    c = rng.uniform(-0.999, 0.999, (32, 6))
    y = rng.integers(0, 6, 32)
    dy = rng.standard_normal(c.shape)
    s, m2 = 64.0, f32(0.5)
    leaf = torch.tensor(c, requires_grad=True)
    logits = leaf * 1.0
    index = torch.where(torch.tensor(y) != -1)[0]
    labels_t = torch.tensor(y)
    target_logit = logits[index, labels_t[index].view(-1)]
    with torch.no_grad():
        target_logit.arccos_()
        logits.arccos_()
        final_target_logit = target_logit + m2
        logits[index, labels_t[index].view(-1)] = final_target_logit
        logits.cos_()
    out = logits * s
    out.backward(torch.tensor(dy))
    text = f"{ARC_05} boundary: NONE grad_mode: STRAIGHT_THROUGH"
    with pytest.warns(NetliteWarning):
        z, dx = _layer_rows(c, y, text, s * dy)
    worst = max(_rel(s * z, out.detach().numpy()), _rel(dx, leaf.grad.numpy()))
    print(
        f"LabelSpecificMargin STRAIGHT_THROUGH vs arcface_torch: worst relative "
        f"error {worst:.3g}"
    )
    assert worst < 1e-13


def _pml_transform(torch, loss, c, y, dy):
    """pml's logit construction around ``modify_cosine_of_target_classes``."""
    ct = torch.tensor(c, requires_grad=True)
    mask = torch.nn.functional.one_hot(torch.tensor(y), c.shape[1]).double()
    target = ct[mask == 1]
    z = ct + mask * (loss.modify_cosine_of_target_classes(target) - target).unsqueeze(1)
    z.backward(torch.tensor(dy))
    return z.detach().numpy(), ct.grad.numpy()


@pytest.mark.torch
def test_matches_pml_arcface_logit_transform():
    torch = pytest.importorskip("torch")
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    rng = np.random.default_rng(23)
    c = rng.uniform(-0.999, 0.999, (64, 5))
    y = rng.integers(0, 5, 64)
    dy = rng.standard_normal(c.shape)
    pml = losses.ArcFaceLoss(num_classes=5, embedding_size=3, margin=f32(28.6))
    want_z, want_dx = _pml_transform(torch, pml, c, y, dy)
    z, dx = _layer_rows(c, y, "margin_base: 28.6 gamma: 0", dy)
    worst = max(_rel(z, want_z), _rel(dx, want_dx))
    print(
        f"LabelSpecificMargin vs pml ArcFaceLoss transform: worst relative error "
        f"{worst:.3g}"
    )
    assert worst < 1e-12


@pytest.mark.torch
def test_pml_arcface_is_infinite_at_cos_one_where_netlite_is_finite():
    """pml differentiates acos(clamp(c, -1, 1)): at |c| = 1 its gradient is
    inf (NaN after a zero upstream factor), and 0 just past 1; netlite's
    is finite and held at +-(1 - eps) (docs §4)."""
    torch = pytest.importorskip("torch")
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    pml = losses.ArcFaceLoss(num_classes=2, embedding_size=3, margin=f32(28.6))
    c = np.array([[1.0, 0.2], [-1.0, 0.1], [1 + 2**-52, 0.3]])
    y = np.array([0, 0, 0])
    dy = np.ones(c.shape)
    _, want_dx = _pml_transform(torch, pml, c, y, dy)
    assert np.isinf(want_dx[0, 0]) and np.isinf(want_dx[1, 0])
    assert want_dx[2, 0] == 0.0
    z, dx = _layer_rows(c, y, "margin_base: 28.6 gamma: 0", dy)
    assert np.all(np.isfinite(z)) and np.all(np.isfinite(dx))
    held = naive.arc_margin_slope(1 - EPS["float64"], 1.0, rad(28.6))
    assert dx[0, 0] == pytest.approx(held, rel=1e-9)
    assert dx[2, 0] == dx[0, 0]
    assert dx[1, 0] == 1.0  # theta = pi lies in the th/mm fallback


def _in_place(engine, text, x, y, dy, dtype):
    """Forward and backward in place on ``engine``: (z, dx, top[1])."""
    netlite.set_cpu_engine(engine)
    layer = _layer(text, dtype, "loss_param { ignore_label: -1 }")
    xb, yb = make_blob(x.shape, dtype, x), make_blob(y.shape, dtype, y)
    m = Blob(dtype=dtype)
    layer.setup([xb, yb], [xb, m])
    layer.forward([xb, yb], [xb, m])
    z = xb.data.copy()
    xb.diff[...] = dy
    layer.backward([xb, m], [True, False], [xb, yb])
    return z, xb.diff.copy(), m.data.copy()


@requires_numba()
@pytest.mark.parametrize("shape", [(6, 5), (64, 1000)], ids=["small", "large"])
@pytest.mark.parametrize("grad", GRAD_MODES)
def test_numba_in_place_matches_numpy(dtype, shape, grad):
    # The Numba kernels copy (or, in place, only check) the cosines and the
    # diff; psi and its factor are the layer's own maths: bit for bit the
    # reference, out of place (test_engine_parity_numba) and in place.
    rng = np.random.default_rng(9)
    x = rng.uniform(-0.999, 0.999, shape)
    y = rng.integers(0, shape[1], shape[0]).astype(float)
    y[::4] = -1
    dy = rng.standard_normal(shape)
    text = f"{ARC_05} grad_mode: {grad}"
    for a, b in zip(_in_place("numpy", text, x, y, dy, dtype),
                    _in_place("numba", text, x, y, dy, dtype)):
        np.testing.assert_array_equal(b, a)
