"""Normalize (happynear): the standard tests (LayerTestCase) for L2 and L1,
2-D to 5-D bottoms, a zero vector, the norm top with bp_norm; then the
closed-form backward, fix_gradient, the norm top without bp_norm, in-place
use, bad parameters and input, and the float64 cross-checks against
PyTorch autograd and F.normalize."""

import naive
import numpy as np
import pytest
from layer_test_case import LayerTestCase
from layer_testing import assert_close, filler, make_blob

import netlite
from netlite import Blob, LayerSetupError, NonFiniteError, ShapeError
from netlite.layers.normalize import NormalizeLayer

EPS = float(np.float32(1e-6))  # the proto default, as the layer reads it


def with_zero_column(shape, dtype):
    """Gaussian, with the features of sample 1 (every spatial position)
    set to 0: a zero vector."""
    values = netlite.rng.get_rng().standard_normal(shape)
    values[1] = 0
    return values.astype(dtype)


class TestNormalizeLayer(LayerTestCase):
    """Forward against ``naive.normalize``; the exhaustive float64 gradient
    (top[0], and the norm top with ``bp_norm``).  The zero-vector case
    needs a step well below sqrt(eps) = 1e-3, the scale on which
    x / sqrt(|x|^2 + eps) bends there; L1 has a kink at x_c = 0."""

    shape, norm_type, eps, bp_norm, zero = (2, 3, 2, 2), "L2", None, False, False
    cases = {
        "l2": {},
        "l2_2d": {"shape": (4, 5)},
        "l2_5d": {"shape": (2, 3, 2, 1, 2)},
        "l2_eps": {"eps": 0.5},
        "l2_zero": {"shape": (3, 4), "zero": True, "stepsize": 1e-7},
        "l2_zero_4d": {"zero": True, "stepsize": 1e-7},
        "l2_norm_top": {"tops": 2, "bp_norm": True},
        "l2_norm_top_2d": {"shape": (3, 4), "tops": 2, "bp_norm": True},
        "l1": {"norm_type": "L1", "kink_range": 1e-3},
        "l1_2d": {"norm_type": "L1", "shape": (4, 5), "kink_range": 1e-3},
        "l1_norm_top": {"norm_type": "L1", "tops": 2, "bp_norm": True,
                        "kink_range": 1e-3},
    }

    @property
    def layer(self):
        eps = "" if self.eps is None else f"eps: {self.eps} "
        return (
            f'type: "Normalize" normalize_param {{ normalize_type: '
            f'"{self.norm_type}" bp_norm: {str(self.bp_norm).lower()} {eps}}}'
        )

    @property
    def bottoms(self):
        return [(self.shape, with_zero_column if self.zero else filler("gaussian"))]

    def oracle(self, bottoms, blobs):
        assert not blobs
        eps = EPS if self.eps is None else float(np.float32(self.eps))
        y, norm = naive.normalize(bottoms[0], self.norm_type, eps)
        return [y, norm][:self.tops]


def normalize_layer(norm_type=None, eps=None, fix_gradient=None, bp_norm=None,
                    name="norm"):
    param = netlite.io.LayerParameter(name=name, type="Normalize")
    p = param.normalize_param
    for field, value in (("normalize_type", norm_type), ("eps", eps),
                         ("fix_gradient", fix_gradient), ("bp_norm", bp_norm)):
        if value is not None:
            setattr(p, field, value)
    return NormalizeLayer(param)


def run(layer, x, dtype, tops=1, top_diffs=None, seed=7):
    """Forward and backward on ``x``; the top diffs are drawn (seed) unless
    given.  Returns ``(bottom, top)``."""
    bottom = make_blob(x.shape, dtype, x)
    top = [Blob(dtype=dtype) for _ in range(tops)]
    layer.setup([bottom], top)
    layer.forward([bottom], top)
    gen = np.random.default_rng(seed)
    for j, t in enumerate(top):
        diff = gen.standard_normal(t.shape) if top_diffs is None else top_diffs[j]
        t.diff[...] = diff
    layer.backward(top, [True], [bottom])
    return bottom, top


def gaussian(shape, seed=3):
    return np.random.default_rng(seed).standard_normal(shape)


# ------------------------------------------------------------- the maths
@pytest.mark.parametrize("norm_type", ["L2", "L1"])
def test_backward_closed_form(dtype, norm_type):
    # Section 3: dx = (g - t (y.g)) / n with t = y (L2) or sign(x) (L1).
    x = gaussian((3, 4, 2, 2))
    bottom, (top,) = run(normalize_layer(norm_type), x, dtype)
    y, n = naive.normalize(x, norm_type, EPS)
    g = top.diff.astype(np.float64)
    t = y if norm_type == "L2" else np.sign(x)
    dot = (y * g).sum(axis=1, keepdims=True)
    assert_close(bottom.diff, (g - t * dot) / n, "oracle", dtype)


def test_norm_top_and_bp_norm_closed_form(dtype):
    # Section 3: with bp_norm, dx gains h * y (L2); the norm top's shape is
    # x's with axis 1 set to 1, as happynear's (N, 1, H, W).
    x = gaussian((2, 3, 4, 5))
    bottom, (top, norm) = run(normalize_layer(bp_norm=True), x, dtype, tops=2)
    assert norm.shape == (2, 1, 4, 5)
    y, n = naive.normalize(x, "L2", EPS)
    assert_close(norm.data, n, "oracle", dtype)
    g, h = top.diff.astype(np.float64), norm.diff.astype(np.float64)
    expected = (g - y * (y * g).sum(axis=1, keepdims=True)) / n + h * y
    assert_close(bottom.diff, expected, "oracle", dtype)


def test_norm_top_diff_ignored_without_bp_norm(dtype):
    # happynear: without bp_norm the norm top is an output only; its diff
    # does not reach the bottom (the gradient is then that of top[0]).
    x = gaussian((3, 4))
    b1, _ = run(normalize_layer(), x, dtype, tops=2)
    b0, _ = run(normalize_layer(), x, dtype, tops=1)
    np.testing.assert_array_equal(b1.diff, b0.diff)
    # bp_norm without the second top is accepted and does nothing (happynear).
    b2, _ = run(normalize_layer(bp_norm=True), x, dtype, tops=1)
    np.testing.assert_array_equal(b2.diff, b0.diff)
    assert normalize_layer().layer_param.normalize_param.eps == pytest.approx(1e-6)


@pytest.mark.parametrize("norm_type", ["L2", "L1"])
def test_fix_gradient_skips_the_division_by_the_norm(dtype, norm_type):
    # happynear's GPU code: dx = g - t (y.g), n times the true gradient.
    x = gaussian((3, 5)) * 4
    exact, (top,) = run(normalize_layer(norm_type), x, dtype)
    fixed, _ = run(normalize_layer(norm_type, fix_gradient=True), x, dtype)
    _, n = naive.normalize(x, norm_type, EPS)
    assert_close(fixed.diff, exact.diff.astype(np.float64) * n, "oracle", dtype)


@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 2, 2)])
def test_zero_vector_gives_finite_output_and_gradient(dtype, shape):
    # Section 4: y = 0 and dx = g / sqrt(eps) = 1000 g at a zero vector.
    x = gaussian(shape)
    x[1] = 0
    bottom, (top, norm) = run(normalize_layer(bp_norm=True), x, dtype, tops=2)
    assert np.all(np.isfinite(top.data)) and np.all(np.isfinite(bottom.diff))
    assert not top.data[1].any()
    np.testing.assert_allclose(norm.data[1], np.sqrt(EPS), rtol=1e-6)
    # At y = 0 the projection and the norm term vanish: dx = g / sqrt(eps).
    assert_close(bottom.diff[1], top.diff[1].astype(np.float64) / np.sqrt(EPS),
                 "oracle", dtype)


def test_l1_zero_vector(dtype):
    x = gaussian((3, 4))
    x[0] = 0
    bottom, (top,) = run(normalize_layer("L1"), x, dtype)
    assert not top.data[0].any()
    assert_close(bottom.diff[0], top.diff[0].astype(np.float64) / EPS, "oracle",
                 dtype)


def test_in_place_matches_out_of_place(dtype):
    x = gaussian((2, 3, 2, 2))
    for norm_type in ("L2", "L1"):
        ref, (ref_top, _) = run(normalize_layer(norm_type, bp_norm=True), x,
                                dtype, tops=2)
        blob = make_blob(x.shape, dtype, x)
        norm = Blob(dtype=dtype)
        layer = normalize_layer(norm_type, bp_norm=True)
        layer.setup([blob], [blob, norm])
        layer.forward([blob], [blob, norm])
        np.testing.assert_array_equal(blob.data, ref_top.data)
        gen = np.random.default_rng(7)
        blob.diff[...] = gen.standard_normal(blob.shape)
        norm.diff[...] = gen.standard_normal(norm.shape)
        layer.backward([blob, norm], [True], [blob])
        np.testing.assert_array_equal(blob.diff, ref.diff)


# ----------------------------------------------------------- bad input
@pytest.mark.parametrize("norm_type", ["L3", "l2", ""])
def test_unknown_normalize_type(norm_type):
    with pytest.raises(LayerSetupError,
                       match=r"Normalize layer 'norm'.*normalize_type.*'"
                             + norm_type + "'"):
        normalize_layer(norm_type).setup([Blob((2, 3))], [Blob()])


@pytest.mark.parametrize("eps", [-1e-6, 0.0, float("nan"), float("inf")])
def test_bad_eps(eps):
    with pytest.raises(LayerSetupError,
                       match=r"Normalize layer 'norm'.*eps must be positive"):
        normalize_layer(eps=eps).setup([Blob((2, 3))], [Blob()])


@pytest.mark.parametrize("engine", ["numpy", "numba"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input(dtype, bad, engine):
    netlite.set_cpu_engine(engine)
    x = gaussian((2, 3, 2))
    x[1, 2, 0] = bad
    bottom = make_blob(x.shape, dtype, x)
    layer = normalize_layer()
    layer.setup([bottom], [Blob(dtype=dtype)])
    with pytest.raises(NonFiniteError,
                       match=r"Normalize layer 'norm'.*bottom\[0\].*\(1, 2, 0\)"):
        layer.forward([bottom], [Blob(dtype=dtype)])


def test_one_axis_bottom_rejected():
    with pytest.raises(ShapeError, match=r"Normalize layer 'norm'.*at least 2 axes"):
        normalize_layer().setup([Blob((5,))], [Blob()])


# ------------------------------------------------------ cross-checks
@pytest.mark.torch
@pytest.mark.parametrize("norm_type", ["L2", "L1"])
@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 4, 5)])
def test_matches_torch_autograd(norm_type, shape):
    """The same formula written in torch, differentiated by autograd, with
    both tops and bp_norm (the zero vector included), float64."""
    torch = pytest.importorskip("torch")
    x = gaussian(shape)
    x[0] = 0
    gen = np.random.default_rng(11)
    g = gen.standard_normal(shape)
    h = gen.standard_normal((shape[0], 1) + shape[2:])
    bottom, (top, norm) = run(normalize_layer(norm_type, bp_norm=True), x,
                              np.float64, tops=2, top_diffs=[g, h])
    xt = torch.tensor(x, requires_grad=True)
    if norm_type == "L2":
        nt = torch.sqrt((xt * xt).sum(dim=1, keepdim=True) + EPS)
    else:
        nt = xt.abs().sum(dim=1, keepdim=True) + EPS
    yt = xt / nt
    ((yt * torch.tensor(g)).sum() + (nt * torch.tensor(h)).sum()).backward()
    worst = 0.0
    for ours, theirs in ((top.data, yt.detach().numpy()),
                         (norm.data, nt.detach().numpy()),
                         (bottom.diff, xt.grad.numpy())):
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
        worst = max(worst, float(np.max(np.abs(ours - theirs)
                                        / np.maximum(np.abs(theirs), 1e-300))))
    print(f"Normalize {norm_type} {shape} vs torch autograd: worst rel err {worst:.2e}")


@pytest.mark.torch
def test_differs_from_torch_f_normalize_as_documented():
    """F.normalize is x / max(|x|, 1e-12): away from 0 it differs from
    x / sqrt(|x|^2 + 1e-6) by a relative eps / (2 |x|^2); at a zero vector
    both outputs are 0 but its gradient is g / 1e-12, ours g / 1e-3."""
    torch = pytest.importorskip("torch")
    x = gaussian((4, 6))
    x[0] = 0
    g = np.random.default_rng(5).standard_normal(x.shape)
    bottom, (top,) = run(normalize_layer(), x, np.float64, top_diffs=[g])
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.normalize(xt, dim=1)
    yt.backward(torch.tensor(g))
    sq = (x[1:] ** 2).sum(axis=1, keepdims=True)
    rel = top.data[1:] / yt.detach().numpy()[1:] - 1
    np.testing.assert_allclose(rel, -EPS / (2 * sq) * np.ones_like(rel),
                               rtol=1e-3, atol=0)
    assert not top.data[0].any() and not yt.detach().numpy()[0].any()
    np.testing.assert_allclose(bottom.diff[0], g[0] / np.sqrt(EPS), rtol=1e-12)
    np.testing.assert_allclose(xt.grad.numpy()[0], g[0] / 1e-12, rtol=1e-12)
