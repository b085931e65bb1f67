"""MarginInnerProduct (A-Softmax / SphereFace): the standard tests for
m = 1..4 in both gradient modes (EXACT: exhaustive float64 gradient;
SPHEREFACE: every contract test but the gradient check, which it fails
by design), several shapes, lambda 0 / 1 / large, ignored labels and
degenerate inputs; the weight-normalisation policy of each mode; the
fork's backward pinned to a float64 transcription and shown not to be the
gradient; edge cases and bad input; bit-exact resume; PyTorch autograd and
pytorch-metric-learning 2.9.0 ``SphereFaceLoss``.  The shared maths
(psi_m, k, the lambda schedule) is tested in
test_large_margin_inner_product.py."""


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
    pml_margin_loss,
    schedule_lambda,
    schedule_text,
    softmax_cross_entropy,
    torch_logits,
    zero_feature_row,
)

import netlite
from netlite import io
from netlite.errors import LabelError, LayerSetupError, NonFiniteError, ShapeError
from netlite.layers import _multiplicative_margin as mm


class TestMarginInnerProductLayer(MarginCase, LayerTestCase):
    """Forward against ``naive.margin_inner_product``; the EXACT cases also
    pass the exhaustive float64 gradient check (x and the raw W, through
    the row normalisation).  The SPHEREFACE cases run every other standard
    test: their backward is not the gradient (see
    test_sphereface_backward_is_not_the_gradient)."""

    mode = "EXACT"
    cases = {
        **SHARED_CASES,
        "quadruple_lambda_large": {
            "sched": {"base": 1000, "gamma": 0.12, "power": 1, "lambda_min": 5}},
        "double_theta_0_and_pi": {"m": 2, "weights": W_0_PI, "num_output": 4,
                                  "shape": (8, 3), "features": features_0_pi,
                                  "label_values": LABELS_0_PI},
        # w / max(|w|, EPS) is not differentiable at w = 0: skip that row.
        "zero_weight_row": {"m": 3, "weights": W_ZERO_ROW, "num_output": 4,
                            "kink_range": 1e-3},
        "sphereface_single": {"m": 1, "mode": "SPHEREFACE"},
        "sphereface_double": {"m": 2, "mode": "SPHEREFACE", "sched": {}},
        "sphereface_triple": {"m": 3, "mode": "SPHEREFACE"},
        "sphereface_quadruple": {"mode": "SPHEREFACE",
                                 "sched": {"base": 1000, "gamma": 0.12,
                                           "lambda_min": 5, "iteration": 900}},
        "sphereface_ignore": {"mode": "SPHEREFACE", "ignore": -1},
        "sphereface_zero_feature": {"mode": "SPHEREFACE",
                                    "features": zero_feature_row},
    }

    @property
    def layer(self):
        loss, blobs = self.extra_text()
        return (
            f'type: "MarginInnerProduct" {loss} '
            f"margin_inner_product_param {{ num_output: {self.num_output} "
            f"type: {TYPES[self.m]} axis: {self.axis} grad_mode: {self.mode} "
            f"{schedule_text(self.sched)} "
            'weight_filler { type: "gaussian" std: 0.7 } } ' + blobs
        )

    def applies(self, test_name, case):
        if test_name == "test_gradient" and case.startswith("sphereface"):
            return False  # not the gradient of the forward, by design
        return super().applies(test_name, case)

    def oracle(self, bottoms, blobs):
        lam = schedule_lambda(self.sched)
        z = naive.margin_inner_product(bottoms[0], blobs[0], bottoms[1], self.m,
                                       lam, self.ignore, self.axis)
        return [z, np.array(lam)][:self.tops]


def sphere(m=4, sched=None, n=5, mode="EXACT", extra="", dtype=np.float64,
           name="sph"):
    sched = {"base": 0} if sched is None else sched
    text = (f'name: "{name}" type: "MarginInnerProduct" {extra} '
            f"margin_inner_product_param {{ num_output: {n} type: {TYPES[m]} "
            f"grad_mode: {mode} {schedule_text(sched)} "
            'weight_filler { type: "gaussian" } }')
    return netlite.create_layer(io.parse_layer_param(text), dtype=dtype)


def run(layer, x, y, top_diff=None, dtype=np.float64, w=None):
    """Set up, forward (and backward with ``top_diff``); return
    ``(z, lambda, dx, dW, W after forward)``."""
    xb = make_blob(np.shape(x), dtype, x)
    yb = make_blob(np.shape(y), dtype, y)
    tops = [netlite.Blob(dtype=dtype), netlite.Blob(dtype=dtype)]
    layer.setup([xb, yb], tops)
    if w is not None:
        layer.blobs[0].data[...] = w
    layer.forward([xb, yb], tops)
    z, lam = tops[0].data.copy(), float(tops[1].data)
    w_after = layer.blobs[0].data.copy()
    if top_diff is None:
        return z, lam, None, None, w_after
    tops[0].diff[...] = top_diff
    layer.blobs[0].diff[...] = 0
    layer.backward(tops, [True, False], [xb, yb])
    return z, lam, xb.diff.copy(), layer.blobs[0].diff.copy(), w_after


def _data(seed, mrows=7, n=5, k=4):
    gen = np.random.default_rng(seed)
    return (gen.standard_normal((mrows, k)), 2 * gen.standard_normal((n, k)),
            gen.integers(0, n, mrows), gen.standard_normal((mrows, n)))


# -------------------------------------------------- weight normalisation
@pytest.mark.parametrize("m", [1, 4])
def test_exact_keeps_the_blob_sphereface_renormalises_it_in_place(m):
    x, w, y, _ = _data(1)
    z_exact, _, _, _, w_exact = run(sphere(m), x, y, w=w)
    z_fork, _, _, _, w_fork = run(sphere(m, mode="SPHEREFACE"), x, y, w=w)
    np.testing.assert_array_equal(w_exact, w)
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    np.testing.assert_allclose(w_fork, unit, rtol=1e-15, atol=1e-15)
    # The forward is the same function of the stored blob in both modes.
    np.testing.assert_allclose(z_exact, z_fork, rtol=1e-13, atol=1e-13)
    # Features are not normalised: the logits scale with |x|.
    z3, _, _, _, _ = run(sphere(m), 3 * x, y, w=w)
    np.testing.assert_allclose(z3, 3 * z_exact, rtol=1e-12)


@pytest.mark.parametrize("mode", ["EXACT", "SPHEREFACE"])
def test_zero_weight_row_stays_zero_and_finite(mode, dtype):
    # The fork divides by the bare norm (NaN); netlite by max(|w|, EPS): a
    # zero row stays zero (also in the renormalised blob) and has c = 0, so
    # its column is 0 off target and |x| psi_4(0) = -3 |x| on target.
    x, w, _, g = _data(2)
    w[2] = 0
    y = np.array([2, 2, 0, 1, 3, 4, 2])
    z, _, dx, dw, w_after = run(sphere(4, mode=mode, dtype=dtype), x.astype(dtype),
                                y, g.astype(dtype), dtype=dtype, w=w.astype(dtype))
    assert np.all(w_after[2] == 0) and np.all(z[y != 2, 2] == 0)
    np.testing.assert_allclose(z[y == 2, 2], -3 * np.linalg.norm(x[y == 2], axis=1),
                               rtol=1e-6)
    for a in (z, dx, dw):
        assert np.all(np.isfinite(a))
    if mode == "EXACT":
        # The gradient of w / max(|w|, EPS) at 0: dE/dw_hat / EPS.
        assert np.abs(dw[2]).max() > 1e6


@pytest.mark.parametrize("mode", ["EXACT", "SPHEREFACE"])
@pytest.mark.parametrize("m", [2, 3, 4])
def test_zero_feature_gives_zero_logits_and_a_finite_gradient(m, mode, dtype):
    x, w, y, g = _data(3)
    x[1] = 0
    z, lam, dx, dw, _ = run(sphere(m, {"base": 0.5}, mode=mode, dtype=dtype),
                            x.astype(dtype), y, g.astype(dtype), dtype=dtype,
                            w=w.astype(dtype))
    assert np.all(z[1] == 0)
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dw))
    w_hat = w / np.linalg.norm(w, axis=1, keepdims=True)
    coeff = g[1].copy()
    if mode == "EXACT":  # c = 0: the inner products' gradient + psi'(0) term
        coeff[y[1]] *= (lam + mm.psi(np, m, np.zeros(1))[1][0]) / (1 + lam)
    else:  # the fork's rescaled pair at |x| = 0 is (0, -sign(b))
        coeff[y[1]] *= lam / (1 + lam)
    np.testing.assert_allclose(dx[1], coeff @ w_hat, rtol=1e-5, atol=1e-5)


# --------------------------------------------------- the fork's backward
def _fork_backward(x, w_unit, y, g, m, lam):
    """MarginInnerProductLayer::Backward_cpu (caffe-sphereface), float64
    loops: dW = g^T x; for the target entry coeff_w = a_m,
    coeff_x = b_m / (-|x|), both divided by sqrt(coeff_w^2 + coeff_x^2),
    then g / (1 + lam) * (coeff_w w + coeff_x x); off target g / (1 + lam)
    * w; plus lam / (1 + lam) * g w for every entry."""
    dx = np.zeros_like(x)
    dw = g.T @ x
    for i in range(len(x)):
        nx = np.sqrt(x[i] @ x[i])
        for j in range(len(w_unit)):
            u = g[i, j] / (1 + lam)
            if j != y[i] or m == 1:
                dx[i] += u * w_unit[j]
            else:
                a, b = fork_coefficients(m, (x[i] @ w_unit[j]) / nx)
                coeff_w, coeff_x = a, 1.0 / (-nx) * b
                coeff_norm = np.sqrt(coeff_w * coeff_w + coeff_x * coeff_x)
                coeff_w, coeff_x = coeff_w / coeff_norm, coeff_x / coeff_norm
                dx[i] += u * coeff_w * w_unit[j] + u * coeff_x * x[i]
            dx[i] += lam / (1 + lam) * g[i, j] * w_unit[j]
    return dx, dw


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("sched", [{"base": 0}, {}, {"base": 1000, "gamma": 0.12,
                                                       "lambda_min": 5}],
                         ids=["lambda0", "lambda1", "sphereface20"])
def test_sphereface_backward_is_the_forks_formula(m, sched):
    x, w, y, g = _data(10 + m)
    _, lam, dx, dw, w_unit = run(sphere(m, sched, mode="SPHEREFACE"), x, y, g, w=w)
    want_dx, want_dw = _fork_backward(x, w_unit, y, g, m, lam)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_sphereface_backward_is_not_the_gradient(m):
    # At a unit-norm blob (the fork's state after its in-place
    # renormalisation) the forward is the same in both modes; central
    # differences of E = sum g * z agree with EXACT, not with SPHEREFACE.
    x, w, y, g = _data(20 + m)
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    _, _, dx_fork, dw_fork, _ = run(sphere(m, mode="SPHEREFACE"), x, y, g, w=w)
    _, _, dx_exact, dw_exact, _ = run(sphere(m), x, y, g, w=w)

    def energy(xv, wv):
        return float(np.sum(g * run(sphere(m), xv, y, w=wv)[0]))

    h = 1e-6
    fd_x, fd_w = np.zeros_like(x), np.zeros_like(w)
    for fd, arr, is_x in ((fd_x, x, True), (fd_w, w, False)):
        for idx in np.ndindex(arr.shape):
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += h
            minus[idx] -= h
            args = ((plus, w), (minus, w)) if is_x else ((x, plus), (x, minus))
            fd[idx] = (energy(*args[0]) - energy(*args[1])) / (2 * h)
    np.testing.assert_allclose(dx_exact, fd_x, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dw_exact, fd_w, rtol=1e-6, atol=1e-7)
    assert rel_err(dw_fork, fd_w) > 0.05  # no projection, no margin
    if m > 1:
        assert rel_err(dx_fork, fd_x) > 0.05  # the rescaled pair
    else:
        np.testing.assert_allclose(dx_fork, fd_x, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [5, -1, 0.5])
def test_bad_labels_raise(bad):
    with pytest.raises(LabelError, match="MarginInnerProduct layer 'sph'"):
        run(sphere(n=5), np.ones((3, 2)), [0, bad, 1])


@pytest.mark.parametrize("field", ["base", "gamma", "power", "lambda_min"])
def test_bad_schedule_parameters_raise(field):
    for value in ("-0.5", "nan"):
        with pytest.raises(LayerSetupError, match=f"sph'.*{field}"):
            run(sphere(sched={field: value}), np.ones((2, 3)), [0, 1])


def test_shape_and_value_errors():
    text = ('name: "sph" type: "MarginInnerProduct" '
            "margin_inner_product_param { num_output: 4 type: DOUBLE } "
            + blob_text(np.ones((4, 5))))
    layer = netlite.create_layer(io.parse_layer_param(text), dtype=np.float64)
    with pytest.raises(ShapeError, match=r"sph'.*expected \(4, 3\)"):
        run(layer, np.ones((2, 3)), [0, 1])
    layer = sphere()
    run(layer, np.ones((2, 3)), [0, 1])
    x, y = make_blob((2, 4), np.float64, 1), make_blob((2,), np.float64, 0)
    with pytest.raises(ShapeError, match="K = 3"):
        layer.forward([x, y], [netlite.Blob(dtype=np.float64)])
    with pytest.raises(NonFiniteError, match=r"sph'.*inf at index \(0, 1\)"):
        run(sphere(), np.array([[1, np.inf, 3], [4, 5, 6]]), [0, 1])
    with pytest.raises(LayerSetupError, match="num_output"):
        run(sphere(n=0), np.ones((2, 3)), [0, 1])
    assert not sphere().allow_force_backward(1)


# ------------------------------------------------------------ resume
def _solver(tmp_path, name, seed, mode):
    folder = tmp_path / name
    folder.mkdir()
    text = f"""
type: 'SGD' base_lr: 0.05 momentum: 0.9 weight_decay: 0.0005
lr_policy: 'fixed' max_iter: 8 random_seed: {seed} display: 0
snapshot_prefix: '{folder / "snap"}'
net_param {{
  layer {{ name: 'data' type: 'DummyData' top: 'x' top: 'y'
          dummy_data_param {{ shape {{ dim: 4 dim: 3 }} shape {{ dim: 4 }}
            data_filler {{ type: 'gaussian' std: 1 }}
            data_filler {{ type: 'constant' value: 1 }} }} }}
  layer {{ name: 'fc' type: 'MarginInnerProduct' bottom: 'x' bottom: 'y'
          top: 'z' top: 'lambda'
          margin_inner_product_param {{ num_output: 3 type: QUADRUPLE
            base: 1000 gamma: 0.12 power: 1 lambda_min: 5 iteration: 1000
            grad_mode: {mode} weight_filler {{ type: 'xavier' }} }} }}
  layer {{ name: 'loss' type: 'SoftmaxWithLoss' bottom: 'z' bottom: 'y'
          top: 'loss' }}
}}
"""
    solver = netlite.get_solver(text)
    lambdas = []
    solver.add_callback(on_iteration=lambda *a: lambdas.append(
        float(solver.net.blobs["lambda"].data)))
    return solver, lambdas


@pytest.mark.parametrize("mode", ["EXACT", "SPHEREFACE"])
def test_resume_restores_lambda_and_weights_bit_exactly(tmp_path, mode):
    straight, want = _solver(tmp_path, "straight", 5, mode)
    straight.step(8)
    first, got_first = _solver(tmp_path, "first", 5, mode)
    first.step(3)
    path = first.snapshot()
    resumed, got = _solver(tmp_path, "resumed", 77, mode)
    resumed.restore(path)
    resumed.step(5)
    assert got_first + got == want
    sched = {"base": 1000, "gamma": 0.12, "lambda_min": 5, "iteration": 1000}
    assert want == [f32(schedule_lambda(sched, t)) for t in range(8)]
    np.testing.assert_array_equal(resumed.net.layer_by_name("fc").blobs[0].data,
                                  straight.net.layer_by_name("fc").blobs[0].data)


# ----------------------------------------------------------------- torch
@pytest.mark.torch
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("sched, ignore", [({"base": 0}, None), ({}, None),
                                           ({"base": 25}, -1)],
                         ids=["lambda0", "lambda1", "lambda25_ignore"])
def test_exact_matches_torch_autograd(m, sched, ignore):
    torch = pytest.importorskip("torch")
    x, w, y, g = _data(30 + m, mrows=9, n=6)
    y = y.astype(float)
    x[2] = -1.7 * w[int(y[2])]  # theta = pi
    x[3] = 0.8 * w[int(y[3])]  # theta = 0
    if ignore is not None:
        y[[1, 5]] = ignore
    extra = f"loss_param {{ ignore_label: {ignore} }}" if ignore is not None else ""
    z, lam, dx, dw, _ = run(sphere(m, sched, n=6, extra=extra), x, y, g, w=w)
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    zt = torch_logits(torch, xt, wt, y.astype(int).tolist(), m, lam,
                      normalize_weights=True, ignore_label=ignore)
    zt.backward(torch.tensor(g))
    errs = [rel_err(z, zt.detach().numpy()), rel_err(dx, xt.grad.numpy()),
            rel_err(dw, wt.grad.numpy())]
    print(f"MarginInnerProduct vs torch m={m} {sched}: worst rel err {max(errs):.2e}")
    assert max(errs) < 1e-12


# ----------------------------------------------- pytorch-metric-learning
def _pml(torch, m, x, w, y):
    """PML SphereFaceLoss: loss and autograd gradients w.r.t. the
    embeddings and our W."""
    from pytorch_metric_learning.losses import SphereFaceLoss

    return pml_margin_loss(torch, SphereFaceLoss, m, x, w, y)


@pytest.mark.torch
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_exact_matches_pytorch_metric_learning(m):
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_metric_learning")
    x, w, y, _ = _data(40 + m, mrows=8, n=6, k=5)
    x[0] = -2.0 * w[y[0]] / np.linalg.norm(w[y[0]])  # theta = pi
    want = _pml(torch, m, x, w, y)
    layer = sphere(m, {"base": 0}, n=6)  # PML has no lambda
    z, _, _, _, _ = run(layer, x, y, w=w)
    loss, g = softmax_cross_entropy(z, y)
    _, _, dx, dw, _ = run(layer, x, y, g, w=w)
    errs = [rel_err(loss, want[0]), rel_err(dx, want[1]), rel_err(dw, want[2])]
    print(f"MarginInnerProduct vs PML SphereFaceLoss m={m}: worst rel err "
          f"{max(errs):.2e}")
    assert max(errs) < 1e-12


@pytest.mark.torch
def test_pml_gradient_of_a_zero_embedding_is_zero_netlite_is_the_inner_products():
    # As for L-Softmax: PML's logits are cos * |x| with torch's norm
    # subgradient 0 at 0; netlite's off-target logits x . w_hat_j are
    # linear in x and keep their exact gradient.
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_metric_learning")
    x, w, y, _ = _data(50, mrows=3, n=5)
    x[1] = 0
    want = _pml(torch, 4, x, w, y)
    layer = sphere(4, {"base": 0}, n=5)
    z, _, _, _, _ = run(layer, x, y, w=w)
    loss, g = softmax_cross_entropy(z, y)
    _, _, dx, dw, _ = run(layer, x, y, g, w=w)
    assert loss == pytest.approx(want[0], rel=1e-13)
    assert np.all(want[1][1] == 0) and np.abs(dx[1]).max() > 1e-3
    np.testing.assert_allclose(np.delete(dx, 1, 0), np.delete(want[1], 1, 0),
                               rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dw, want[2], rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------- engines
@pytest.mark.skipif(not netlite.backend.numba_available(), reason="numba missing")
@pytest.mark.parametrize("mode", ["EXACT", "SPHEREFACE"])
def test_numba_engine_falls_back_to_the_reference(mode):
    x, w, y, g = _data(60)
    results = []
    for engine in ("numpy", "numba"):
        netlite.set_cpu_engine(engine)
        layer = sphere(3, {}, mode=mode)
        results.append(run(layer, x, y, g, w=w))
        assert layer.engine == engine
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
