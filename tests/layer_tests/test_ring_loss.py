"""RingLoss: the standard tests (LayerTestCase) for both forms, the scalar
and the per-sample output, 2-D and 4-D features, zero-norm features and
the radius set from the first batch; then the closed-form gradient, the
first-batch radius across snapshot/resume, bad input, and float64
cross-checks against PyTorch autograd."""

import math

import naive
import numpy as np
import pytest
from layer_test_case import LayerTestCase
from layer_testing import assert_close, filler, make_blob, rel_err, requires_numba

import netlite
from netlite import Blob, LayerSetupError, NetliteWarning, NonFiniteError, ShapeError


def _with_zero_row(shape, dtype):
    """Gaussian features whose sample 1 is the zero vector."""
    x = netlite.rng.get_rng().standard_normal(shape)
    x[1] = 0
    return x.astype(dtype)


class TestRingLossLayer(LayerTestCase):
    """The standard tests: forward against ``naive.ring_loss``, the
    exhaustive float64 gradient of x and R, propagate_down, R's diff
    accumulating, overwritten bottom diffs, ``loss_weight`` scaling.  A
    zero feature is a kink of the norm; the central difference there is 0
    by symmetry, which is the layer's gradient."""

    shape, kind, radius, eps = (5, 3), "SQUARED", 1.5, 1e-6
    per_position, first_batch = False, False
    zero_row = False  # sample 1 is the zero vector
    cases = {
        "squared": {},
        "squared_4d": {"shape": (3, 2, 2, 2)},
        "squared_radius_small": {"radius": 1e-3},
        "squared_radius_10": {"radius": 10.0},
        "charbonnier": {"kind": "CHARBONNIER"},
        "charbonnier_4d": {"kind": "CHARBONNIER", "shape": (3, 2, 2, 2)},
        "charbonnier_eps_0.1": {"kind": "CHARBONNIER", "eps": 0.1},
        "first_batch": {"first_batch": True},
        "per_position": {"per_position": True},
        "per_position_charbonnier": {"per_position": True, "kind": "CHARBONNIER",
                                     "shape": (4, 2, 3)},
        "zero_norm": {"zero_row": True},
        "zero_norm_charbonnier": {"zero_row": True, "kind": "CHARBONNIER"},
        "zero_norm_per_position": {"zero_row": True, "per_position": True},
        # Above PARALLEL_MIN_ELEMENTS (the threaded kernels); parity only.
        "large": {"shape": (64, 1000), "radius": 30.0},
        "large_charbonnier_per_position": {"shape": (64, 10, 100),
                                           "kind": "CHARBONNIER",
                                           "per_position": True},
        "large_first_batch_zero_norm": {"shape": (64, 1000), "first_batch": True,
                                        "zero_row": True},
    }

    def applies(self, test_name, case):
        if case.startswith("large") and not test_name.startswith("test_engine_parity"):
            return False
        return super().applies(test_name, case)

    @property
    def layer(self):
        return (
            f'type: "RingLoss" ring_loss_param {{ type: {self.kind} '
            f"radius: {self.radius} eps: {self.eps} "
            f"radius_from_first_batch: {str(self.first_batch).lower()} }} "
            f"loss_param {{ per_position: {str(self.per_position).lower()} }}"
        )

    @property
    def bottoms(self):
        return [(self.shape, _with_zero_row if self.zero_row else filler("gaussian"))]

    def oracle(self, bottoms, blobs):
        (r,) = blobs
        assert r.shape == (1,)
        if self.first_batch:
            norms = [math.sqrt(float(np.sum(row ** 2)))
                     for row in bottoms[0].reshape(self.shape[0], -1)]
            assert r[0] == pytest.approx(np.mean(norms), rel=1e-6)
        else:
            assert r[0] == pytest.approx(self.radius, rel=1e-7)
        eps = float(np.float32(self.eps))
        return [naive.ring_loss(bottoms[0], r, self.kind, eps, self.per_position)]


def ring_layer(text="", dtype=np.float64, name="ring"):
    param = netlite.io.parse_layer_param(f'name: "{name}" type: "RingLoss" {text}')
    return netlite.create_layer(param, dtype=dtype)


def features(shape=(6, 4), dtype=np.float64, seed=3, scale=1.0):
    gen = np.random.default_rng(seed)
    return make_blob(shape, dtype, scale * gen.standard_normal(shape))


def run(layer, x, top_diff=None):
    top = Blob(dtype=x.dtype)
    layer.setup([x], [top])
    loss = layer.forward([x], [top])
    if top_diff is not None:
        top.diff[...] = top_diff
    for p in layer.blobs:
        p.diff[...] = 0
    layer.backward([top], [True], [x])
    return loss, top


# ------------------------------------------------------------- the maths
def test_closed_form_gradient_squared():
    # dL/dx_i = (lambda/M) (1 - R/|x_i|) x_i,
    # dL/dR = -(lambda/M) sum_i (|x_i| - R).
    x = features((6, 4))
    layer = ring_layer('loss_weight: 0.01 ring_loss_param { radius: 1.7 }')
    loss, _ = run(layer, x)
    xv = np.asarray(x.data)
    norms = np.linalg.norm(xv, axis=1)
    lam, m, r = float(np.float32(0.01)), 6, float(np.float32(1.7))
    assert loss == pytest.approx(lam / (2 * m) * np.sum((norms - r) ** 2), rel=1e-13)
    np.testing.assert_allclose(x.diff, lam / m * (1 - r / norms)[:, None] * xv,
                               rtol=1e-13)
    np.testing.assert_allclose(layer.blobs[0].diff, [-lam / m * np.sum(norms - r)],
                               rtol=1e-13)


def test_closed_form_gradient_charbonnier():
    # l_i = sqrt(d_i^2 + eps), d_i = |x_i| + eps - R:
    # dL/dx_i = (1/M) d_i / l_i * x_i / |x_i|, dL/dR = -(1/M) sum d_i / l_i.
    x = features((5, 3))
    layer = ring_layer('ring_loss_param { type: CHARBONNIER radius: 0.5 eps: 0.01 }')
    loss, _ = run(layer, x)
    xv = np.asarray(x.data)
    norms = np.linalg.norm(xv, axis=1)
    eps, r = float(np.float32(0.01)), 0.5
    d = norms + eps - r
    ell = np.sqrt(d ** 2 + eps)
    assert loss == pytest.approx(np.mean(ell), rel=1e-13)
    np.testing.assert_allclose(x.diff, (d / ell / norms)[:, None] * xv / 5, rtol=1e-13)
    np.testing.assert_allclose(layer.blobs[0].diff, [-np.sum(d / ell) / 5], rtol=1e-13)


def test_radius_zero_is_half_the_mean_squared_norm():
    # R = 0 (allowed): L = 1/(2M) sum |x_i|^2, dL/dx = x/M, dL/dR = -mean |x_i|.
    x = features((5, 3))
    layer = ring_layer("ring_loss_param { radius: 0 }")
    loss, _ = run(layer, x)
    xv = np.asarray(x.data)
    assert loss == pytest.approx(np.sum(xv ** 2) / 10, rel=1e-14)
    np.testing.assert_allclose(x.diff, xv / 5, rtol=1e-14)
    np.testing.assert_allclose(layer.blobs[0].diff,
                               [-np.linalg.norm(xv, axis=1).mean()], rtol=1e-14)


def test_per_position_is_unnormalised_and_sums_to_the_mean():
    x = features((4, 2, 3))
    scalar, top_s = run(ring_layer(), x)
    dx_scalar = np.array(x.diff)
    per, top_p = run(ring_layer("loss_param { per_position: true }"), x,
                     top_diff=np.full(4, 1 / 4))
    assert top_p.shape == (4,)
    assert float(np.sum(top_p.data)) / 4 == pytest.approx(float(top_s.data), rel=1e-14)
    # Equal top diffs 1/M reproduce the mean's gradient.
    np.testing.assert_allclose(x.diff, dx_scalar, rtol=1e-14)
    # The returned loss is sum_i weight * l_i (weight 1 by default).
    assert per == pytest.approx(float(np.sum(top_p.data)), rel=1e-14)


def test_features_flattened_per_sample():
    x4 = features((3, 2, 2, 2))
    x2 = make_blob((3, 8), np.float64, np.asarray(x4.data).reshape(3, 8))
    _, t4 = run(ring_layer(), x4)
    _, t2 = run(ring_layer(), x2)
    assert float(t4.data) == float(t2.data)
    np.testing.assert_array_equal(np.asarray(x4.diff).reshape(3, 8), x2.diff)


@pytest.mark.parametrize("kind", ["SQUARED", "CHARBONNIER"])
def test_zero_norm_feature_is_finite_with_zero_gradient(kind, dtype):
    x = make_blob((3, 4), dtype, np.zeros((3, 4)))
    x.data[0] = [1, 2, 2, 0]  # norm 3
    layer = ring_layer(f"ring_loss_param {{ type: {kind} radius: 2 }}", dtype)
    loss, _ = run(layer, x)
    assert math.isfinite(loss)
    assert np.all(np.isfinite(x.diff)) and np.all(np.isfinite(layer.blobs[0].diff))
    np.testing.assert_array_equal(x.diff[1:], 0)
    expected = naive.ring_loss(np.asarray(x.data, np.float64), [2.0], kind,
                               float(np.float32(1e-6)))
    assert loss == pytest.approx(float(expected), rel=1e-6)


def test_empty_batch_has_zero_loss():
    x = make_blob((0, 3), np.float64)
    layer = ring_layer("ring_loss_param { radius_from_first_batch: true radius: 2 }")
    loss, top = run(layer, x)
    assert loss == 0 and float(top.data) == 0
    # No norm to average: R keeps its initial value, still to be set.
    assert layer.blobs[0].data[0] == 2 and not layer.radius_initialised


# ------------------------------------------------------ first-batch radius
def test_radius_from_first_train_batch_only():
    layer = ring_layer("ring_loss_param { radius_from_first_batch: true radius: 9 }")
    x = features((6, 4))
    assert layer.state_dict() == {"radius_initialised": False}
    _, top = run(layer, x)
    first = np.linalg.norm(np.asarray(x.data), axis=1).mean()
    assert layer.blobs[0].data[0] == pytest.approx(first, rel=1e-15)
    assert layer.state_dict() == {"radius_initialised": True}
    # A second batch does not move it (only the solver does).
    x.data[...] *= 3
    layer.forward([x], [top])
    assert layer.blobs[0].data[0] == pytest.approx(first, rel=1e-15)


def test_radius_from_first_batch_not_in_test_phase():
    layer = ring_layer("phase: TEST ring_loss_param { radius_from_first_batch: true "
                       "radius: 9 }")
    run(layer, features())
    assert layer.blobs[0].data[0] == 9 and not layer.radius_initialised


def test_state_dict_round_trip_and_errors():
    assert ring_layer().state_dict() == {}  # nothing to keep without the option
    layer = ring_layer("ring_loss_param { radius_from_first_batch: true radius: 9 }")
    layer.load_state_dict({"radius_initialised": True})
    run(layer, features())
    assert layer.blobs[0].data[0] == 9  # restored state: no re-initialisation
    for bad in ({}, {"radius_initialised": 1}, None):
        with pytest.raises(LayerSetupError, match="RingLoss layer 'ring'.*saved state"):
            layer.load_state_dict(bad)


RESUME_NET = """
  name: 'RingNet'
  layer { name: 'data' type: 'DummyData' top: 'x'
          dummy_data_param { shape { dim: 4 dim: 3 }
                             data_filler { type: 'gaussian' } } }
  layer { name: 'ip' type: 'InnerProduct' bottom: 'x' top: 'f'
          inner_product_param { num_output: 2
            weight_filler { type: 'gaussian' std: 0.5 } } }
  layer { name: 'ring' type: 'RingLoss' bottom: 'f' top: 'loss'
          ring_loss_param { radius_from_first_batch: true radius: 5 } }
"""


def ring_solver(folder):
    folder.mkdir(exist_ok=True)
    return netlite.get_solver(
        f"type: 'SGD' base_lr: 0.1 momentum: 0.9 lr_policy: 'fixed' max_iter: 6 "
        f"display: 0 random_seed: 5 snapshot_prefix: '{folder / 'snap'}' "
        f"net_param {{ {RESUME_NET} }}", dtype=np.float64)


def test_first_batch_radius_survives_snapshot_and_resume(tmp_path):
    straight = ring_solver(tmp_path / "straight")
    straight.step(6)
    first = ring_solver(tmp_path / "first")
    first.step(3)
    path = first.snapshot()
    resumed = ring_solver(tmp_path / "resumed")
    resumed.restore(path)
    ring = resumed.net.layer_by_name("ring")
    assert ring.radius_initialised  # from the netlite_state, not re-drawn
    resumed.step(3)
    for want, got in zip(straight.net.learnable_params, resumed.net.learnable_params):
        np.testing.assert_array_equal(got.data, want.data)
    # Without the flag the resumed run would reset R from its next batch.
    lost = ring_solver(tmp_path / "lost")
    lost.restore(path)
    lost.net.layer_by_name("ring").radius_initialised = False
    lost.step(3)
    r_want = straight.net.layer_by_name("ring").blobs[0].data[0]
    assert lost.net.layer_by_name("ring").blobs[0].data[0] != r_want


# ----------------------------------------------------------------- errors
@pytest.mark.parametrize("field, value", [("radius", -1), ("radius", "nan"),
                                          ("eps", -1e-3), ("eps", "inf")])
def test_bad_parameters(field, value):
    with pytest.raises(LayerSetupError,
                       match=f"RingLoss layer 'ring'.*ring_loss_param.{field}"):
        run(ring_layer(f"ring_loss_param {{ {field}: {value} }}"), features())


def test_scalar_bottom_is_rejected():
    with pytest.raises(ShapeError, match="RingLoss layer 'ring'.*sample axis"):
        run(ring_layer(), make_blob((), np.float64, 1.0))


def test_loaded_radius_shape_is_checked():
    text = "blobs { shape { dim: 2 } data: 1 data: 2 }"
    with pytest.raises(ShapeError, match="RingLoss layer 'ring'.*radius"):
        run(ring_layer(text), features())


@pytest.mark.parametrize("engine", ["numpy", "numba"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_features_are_named(bad, engine):
    netlite.set_cpu_engine(engine)
    x = features((4, 3))
    x.data[2, 1] = bad
    with pytest.raises(NonFiniteError,
                       match=r"RingLoss layer 'ring'.*bottom\[0\].*index \(2, 1\)"):
        run(ring_layer(), x)


@pytest.mark.parametrize("engine", ["numpy", "numba"])
def test_negative_radius_warns_once(engine):
    netlite.set_cpu_engine(engine)
    layer = ring_layer()
    x = features()
    top = Blob(dtype=np.float64)
    layer.setup([x], [top])
    layer.blobs[0].data[...] = -0.5
    with pytest.warns(NetliteWarning, match="RingLoss layer 'ring'.*R = -0.5"):
        layer.forward([x], [top])
    layer.forward([x], [top])  # once only: warnings are errors here


def test_in_a_net_beside_a_softmax_loss():
    net = netlite.Net("""
      layer { name: 'in' type: 'Input' top: 'x' top: 'y'
              input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }
      layer { name: 'ip' type: 'InnerProduct' bottom: 'x' top: 'f'
              inner_product_param { num_output: 3
                weight_filler { type: 'gaussian' } } }
      layer { name: 's' type: 'Split' bottom: 'f' top: 'f1' top: 'f2' }
      layer { name: 'sm' type: 'SoftmaxWithLoss' bottom: 'f1' bottom: 'y' top: 'ce' }
      layer { name: 'ring' type: 'RingLoss' bottom: 'f2' loss_weight: 0.01 }
    """, netlite.TRAIN)
    x = np.random.default_rng(0).standard_normal((4, 3))
    out = net.forward(x=x, y=np.array([0.0, 1, 2, 1]))
    f = np.asarray(net.blobs["f"].data)
    ring = naive.ring_loss(f, [1.0])
    total = net.forward_backward()
    assert total == pytest.approx(float(out["ce"]) + 0.01 * float(ring), rel=1e-5)
    assert net.layer_by_name("ring").blobs[0].diff[0] != 0


# ----------------------------------------------------------------- PyTorch
def torch_ring(torch, x, r, kind, eps, per_position):
    norm = x.reshape(x.shape[0], -1).norm(dim=1)
    if kind == "CHARBONNIER":  # the seed study's expression
        ell = torch.sqrt((norm + eps - r) ** 2 + eps)
    else:
        ell = 0.5 * (norm - r) ** 2
    return ell if per_position else ell.mean()


@pytest.mark.torch
@pytest.mark.parametrize("kind", ["SQUARED", "CHARBONNIER"])
@pytest.mark.parametrize("per_position", [False, True])
@pytest.mark.parametrize("shape", [(7, 5), (4, 2, 3, 2)])
def test_torch_autograd_float64(kind, per_position, shape):
    torch = pytest.importorskip("torch")
    x = features(shape, seed=11, scale=2.0)
    x.data[2] = 0  # a zero feature: torch's norm backward gives 0 there too
    lam = 0.25  # exact in float32
    layer = ring_layer(
        f"loss_weight: {lam} ring_loss_param {{ type: {kind} radius: 1.3 eps: 1e-3 }} "
        f"loss_param {{ per_position: {str(per_position).lower()} }}")
    top_w = np.random.default_rng(2).standard_normal(shape[0]) if per_position else None
    _, top = run(layer, x, None if top_w is None else lam * top_w)
    xt = torch.tensor(np.asarray(x.data), requires_grad=True)
    rt = torch.tensor(float(np.float32(1.3)), dtype=torch.float64, requires_grad=True)
    out = torch_ring(torch, xt, rt, kind, float(np.float32(1e-3)), per_position)
    objective = lam * (out * torch.tensor(top_w)).sum() if per_position else lam * out
    objective.backward()
    errors = [rel_err(top.data, out.detach().numpy()),
              rel_err(x.diff, xt.grad.numpy()),
              rel_err(layer.blobs[0].diff, [rt.grad.item()])]
    print(f"ring_loss torch {kind} per_position={per_position} {shape}: "
          f"worst relative error {max(errors):.3g}")
    assert max(errors) < 1e-13


@requires_numba()
@pytest.mark.parametrize("kind", ["SQUARED", "CHARBONNIER"])
@pytest.mark.parametrize("per_position", [False, True])
def test_numba_matches_numpy_over_steps(dtype, kind, per_position):
    # Two forward/backward passes on one layer: the first sets R from the
    # batch (the reference runs it), the second runs the kernels with that
    # R; R's diff accumulates across both.
    def steps(engine):
        netlite.set_cpu_engine(engine)
        layer = ring_layer(
            f"ring_loss_param {{ type: {kind} radius_from_first_batch: true }} "
            f"loss_param {{ per_position: {str(per_position).lower()} }}", dtype)
        x = features((64, 1000), dtype, seed=5)
        top = Blob(dtype=dtype)
        layer.setup([x], [top])
        out = []
        for _ in range(2):
            x.data[...] *= 1.5  # the norms move away from R
            out.append(layer.forward([x], [top]))
            out.append(top.data.copy())
            layer.backward([top], [True], [x])
            out.append(x.diff.copy())
        return out + [layer.blobs[0].data.copy(), layer.blobs[0].diff.copy()]

    for j, (a, b) in enumerate(zip(steps("numpy"), steps("numba"))):
        assert_close(b, a, "parity", dtype, f"output {j}")
