"""LabelSpecificAdd (AM-Softmax / CosFace): the standard tests over several
shapes, per-class biases, ignored labels, happynear's conditional rule and
the annealed bias; then the TEST phase, the schedule, in-place use, bad
input, and cross-checks with PyTorch autograd and pytorch-metric-learning's
CosFaceLoss logit transform."""

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
from netlite.errors import LabelError, LayerSetupError, NonFiniteError, ShapeError

UNIFORM = filler("uniform", min=-1, max=1)


def schedule(base, gamma, power, lo, hi, t):
    """happynear's annealed bias, written out."""
    b = f32(base) + (1 + f32(gamma) * t) ** f32(power) - 1
    return min(max(b, f32(lo)), f32(hi))


class TestLabelSpecificAddLayer(LayerTestCase):
    """Forward against ``naive.label_specific_add`` (both dtypes), the
    exhaustive float64 gradient (the identity), propagate_down and the
    overwritten bottom diff, for several shapes and options."""

    shape, classes, text, ignore, bias, only_above = (
        (6, 5),
        5,
        "bias: -0.35",
        None,
        -0.35,
        False,
    )
    extra, tops, annealed = "", 1, None
    cases = {
        "rows": {},
        "caffe_4d": {"shape": (4, 3, 1, 1), "classes": 3},
        "one_row": {"shape": (1, 7), "classes": 7},
        "ignore": {"extra": "loss_param { ignore_label: 2 }", "ignore": 2},
        "ignore_minus_one": {"extra": "loss_param { ignore_label: -1 }", "ignore": -1},
        "only_above": {
            "text": "bias: -0.35 only_above_margin: true",
            "only_above": True,
        },
        "class_bias": {
            "text": "class_bias: [-0.1, -0.2, 0, -0.4, -0.5]",
            "bias": [-0.1, -0.2, 0, -0.4, -0.5],
        },
        "bias_top": {"tops": 2},
        "annealed": {
            "text": "bias_base: 0 bias_gamma: -5e-5 bias_power: 1 "
            "bias_min: -0.4 bias_max: 0 iteration: 3000",
            "tops": 2,
            "annealed": (0, -5e-5, 1, -0.4, 0, 3000),
        },
        "zero_bias": {"text": "", "bias": 0.0},
        # Above PARALLEL_MIN_ELEMENTS (the threaded kernels); parity only.
        "large": {"shape": (64, 1000), "classes": 1000, "tops": 2},
        "large_ignore_only_above": {
            "shape": (64, 1000),
            "classes": 1000,
            "text": "bias: -0.35 only_above_margin: true",
            "extra": "loss_param { ignore_label: -1 }",
            "ignore": -1,
        },
    }

    def applies(self, test_name, case):
        if case.startswith("large") and not test_name.startswith("test_engine_parity"):
            return False
        return super().applies(test_name, case)

    @property
    def layer(self):
        return (
            f'type: "LabelSpecificAdd" label_specific_add_param {{ {self.text} }} '
            f"{self.extra}"
        )

    @property
    def bottoms(self):
        return [
            (self.shape, UNIFORM),
            ((self.shape[0],), labels(self.classes, self.ignore, 3)),
        ]

    def oracle(self, bottoms, blobs):
        if self.annealed:  # computed in float64 from float32 fields
            b = schedule(*self.annealed)
        else:
            b = np.float32(self.bias).astype(np.float64)
        tops = [
            naive.label_specific_add(
                bottoms[0], bottoms[1], b, self.only_above, self.ignore
            )
        ]
        if self.tops > 1:
            tops.append(np.atleast_1d(np.asarray(b, dtype=np.float64)))
        return tops


def _run(text, x, y, dtype=np.float64, phase="", iteration=0, extra=""):
    layer = netlite.create_layer(
        f'name: "add" type: "LabelSpecificAdd" {phase} '
        f"label_specific_add_param {{ {text} }} {extra}",
        dtype=dtype,
    )
    bottom = [make_blob(np.shape(x), dtype, x), make_blob(np.shape(y), dtype, y)]
    top = [Blob(dtype=dtype), Blob(dtype=dtype)]
    layer.setup(bottom, top)
    layer.iteration = iteration
    layer.forward(bottom, top)
    return layer, bottom, top


X = np.array([[0.9, 0.2, -0.3], [0.1, 0.35, 0.5], [0.36, -1.0, 1.0], [-0.2, 0.0, 0.34]])
Y = np.array([0, 1, 0, 2])


def test_adds_bias_to_the_target_only(dtype):
    _, _, top = _run("bias: -0.35", X, Y, dtype)
    want = X.astype(dtype).astype(np.float64)
    want[np.arange(4), Y] -= f32(0.35)
    np.testing.assert_allclose(
        top[0].data, want, rtol=0, atol=1e-7 if dtype == np.float32 else 1e-16
    )
    assert top[1].data.tolist() == [np.float32(-0.35).astype(dtype)]


def test_unconditional_by_default_even_below_the_margin():
    # CosFace / pml / insightface: the target moves for every cosine, 0.1 too.
    _, _, top = _run("bias: -0.35", X, Y)
    assert top[0].data[1, 1] == pytest.approx(0.35 - f32(0.35), abs=1e-15)
    assert top[0].data[3, 2] == pytest.approx(0.34 - f32(0.35))


def test_only_above_margin_is_happynears_rule():
    # Added only where target > -bias = m: 0.9 and 0.36 move; 0.35 (the
    # float32 m itself is 0.3499999940...: 0.35 > m) moves too; 0.34 stays.
    _, _, top = _run("bias: -0.35 only_above_margin: true", X, Y)
    m = f32(0.35)
    assert top[0].data[0, 0] == pytest.approx(0.9 - m)
    assert top[0].data[2, 0] == pytest.approx(0.36 - m)
    assert top[0].data[3, 2] == 0.34
    x = X.copy()
    x[1, 1] = m  # exactly at the margin: not strictly above, unchanged
    _, _, top = _run("bias: -0.35 only_above_margin: true", x, Y)
    assert top[0].data[1, 1] == m


def test_only_above_margin_jumps_down_at_the_margin():
    # psi(c) = c for c <= m and c - m above: the target logit falls by m.
    m = f32(0.35)
    x = np.array([[m - 1e-9, 0.0], [m + 1e-9, 0.0]])
    _, _, top = _run("bias: -0.35 only_above_margin: true", x, np.array([0, 0]))
    assert top[0].data[0, 0] - top[0].data[1, 0] == pytest.approx(m, abs=1e-8)


def test_backward_is_the_identity_in_every_mode(dtype):
    for text in (
        "bias: -0.35",
        "bias: -0.35 only_above_margin: true",
        "class_bias: [-0.1, -0.2, -0.3]",
    ):
        layer, bottom, top = _run(text, X, Y, dtype)
        dy = np.random.default_rng(3).standard_normal(X.shape)
        top[0].diff[...] = dy
        bottom[0].diff[...] = 7
        layer.backward(top, [True, False], bottom)
        np.testing.assert_array_equal(bottom[0].diff, dy.astype(dtype))


def test_ignored_rows_get_no_bias():
    y = np.array([0, -1, 0, -1])
    _, _, top = _run("bias: -0.35", X, y, extra="loss_param { ignore_label: -1 }")
    np.testing.assert_array_equal(top[0].data[[1, 3]], X[[1, 3]])
    assert top[0].data[0, 0] == pytest.approx(0.9 - f32(0.35))


def test_all_rows_ignored_is_the_identity():
    y = np.full(4, 7.0)
    _, _, top = _run("bias: -0.35", X, y, extra="loss_param { ignore_label: 7 }")
    np.testing.assert_array_equal(top[0].data, X)


# ------------------------------------------------------------- phases
def test_test_phase_adds_nothing_by_default():
    _, _, top = _run("bias: -0.35", X, Y, phase="phase: TEST")
    np.testing.assert_array_equal(top[0].data, X)
    assert float(top[1].data[0]) == f32(-0.35)  # the bias it would add


def test_transform_test_adds_the_bias_in_test():
    # happynear ANDs transform_test with phase == TRAIN, so the flag can
    # never act; netlite honours it.
    _, _, top = _run("bias: -0.35 transform_test: true", X, Y, phase="phase: TEST")
    assert top[0].data[0, 0] == pytest.approx(0.9 - f32(0.35))


# ----------------------------------------------------------- annealing
AMSOFTMAX_WO_FN = (
    "iteration: 0 bias_base: 0 bias_gamma: -5e-05 bias_power: 1 "
    "bias_min: -0.4 bias_max: 0"
)


@pytest.mark.parametrize(
    "t, expected",
    [(0, 0.0), (2000, -0.1), (4000, -0.2), (8000, -0.4), (20000, -0.4), (30000, -0.4)],
)
def test_annealed_bias_follows_the_solver_iteration(t, expected):
    # AMSoftmax's face_train_test_wo_fn.prototxt: 0 -> -0.4 at iteration 8000.
    layer, _, top = _run(AMSOFTMAX_WO_FN, X, Y, iteration=t)
    assert layer.current_bias() == pytest.approx(
        schedule(0, -5e-5, 1, -0.4, 0, t), abs=1e-12
    )
    assert float(top[1].data[0]) == pytest.approx(expected, abs=1e-6)
    assert top[0].data[0, 0] == pytest.approx(0.9 + layer.current_bias())


def test_iteration_field_offsets_the_solver_iteration():
    a, _, _ = _run(
        AMSOFTMAX_WO_FN.replace("iteration: 0", "iteration: 1000"), X, Y, iteration=500
    )
    b, _, _ = _run(AMSOFTMAX_WO_FN, X, Y, iteration=1500)
    assert a.current_bias() == b.current_bias()


def test_annealing_needs_bias_base():
    # Without bias_base (HasField) the other annealing fields are inert.
    layer, _, top = _run("bias: -0.2 bias_gamma: 1 bias_min: -1", X, Y, iteration=50)
    assert float(top[1].data[0]) == f32(-0.2)


def test_net_set_iteration_drives_the_schedule():
    text = (
        'layer { name: "in" type: "Input" top: "x" top: "y" '
        "input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }\n"
        'layer { name: "add" type: "LabelSpecificAdd" bottom: "x" bottom: "y" '
        f'top: "z" top: "b" label_specific_add_param {{ {AMSOFTMAX_WO_FN} }} }}\n'
    )
    net = netlite.Net(text, netlite.TRAIN, dtype=np.float64)
    net.blobs["x"].data[...] = X
    net.blobs["y"].data[...] = Y
    seen = []
    for t in (0, 4000, 4000, 8000):  # repeated forwards do not advance it
        net.set_iteration(t)
        seen.append(float(net.forward()["b"][0]))
    np.testing.assert_allclose(seen, [0, -0.2, -0.2, -0.4], atol=1e-6)


def test_undefined_schedule_is_an_error():
    # A negative base to a non-integer power (C's pow gives NaN).
    with pytest.raises(LayerSetupError, match=r"'add'.*undefined at t = 30000"):
        _run(
            "bias_base: 0 bias_gamma: -5e-5 bias_power: 0.5 bias_min: -1",
            X,
            Y,
            iteration=30000,
        )


# ------------------------------------------------------------ in place
def test_in_place_equals_out_of_place(dtype):
    _, _, want = _run("bias: -0.35", X, Y, dtype)
    layer = netlite.create_layer(
        'name: "add" type: "LabelSpecificAdd" label_specific_add_param { bias: -0.35 }',
        dtype=dtype,
    )
    x, y = make_blob(X.shape, dtype, X), make_blob(Y.shape, dtype, Y)
    layer.setup([x, y], [x])
    layer.forward([x, y], [x])
    np.testing.assert_array_equal(x.data, want[0].data)
    x.diff[...] = 2.5
    layer.backward([x], [True, False], [x, y])
    assert np.all(x.diff == 2.5)


# ----------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "text, match",
    [
        ("bias: 0.35", r"bias = 0.3499.* must be finite and <= 0.*negative margin"),
        ("bias: nan", "bias = nan must be finite"),
        ("bias: -inf", "bias = -inf must be finite"),
        ("class_bias: [-0.1, 0.2, -0.1]", r"class_bias\[1\]"),
        ("class_bias: [-0.1, nan, -0.1]", r"class_bias\[1\] = nan"),
        ("class_bias: [-0.1, -0.1, -0.1] bias: -0.2", "do not also set bias"),
        ("class_bias: [-0.1, -0.1, -0.1] bias_base: 0", "do not also set"),
        ("bias_base: 0 bias_max: 0.1", r"bias_max = 0.1.* <= 0"),
        (
            "bias_base: 0 bias_min: -0.1 bias_max: -0.2",
            "bias_min = .* exceeds bias_max",
        ),
        ("bias_base: nan", "bias_base = nan"),
        ("bias_base: 0 bias_gamma: inf", "bias_gamma = inf"),
    ],
)
def test_bad_parameters(text, match):
    with pytest.raises(LayerSetupError, match=match) as info:
        _run(text, X, Y)
    assert "LabelSpecificAdd layer 'add'" in str(info.value)


def test_class_bias_length_must_be_c():
    with pytest.raises(ShapeError, match=r"class_bias has 2 values for C = 3"):
        _run("class_bias: [-0.1, -0.2]", X, Y)


def test_class_bias_per_class_and_its_top():
    _, _, top = _run("class_bias: [-0.1, -0.2, -0.3]", X, Y)
    want = naive.label_specific_add(X, Y, np.float32([-0.1, -0.2, -0.3]))
    np.testing.assert_array_equal(top[0].data, want)
    np.testing.assert_array_equal(top[1].data, np.float32([-0.1, -0.2, -0.3]))


@pytest.mark.parametrize("engine", ["numpy", "numba"])
@pytest.mark.parametrize("label", [3.0, -1.0, 0.5, float("nan")])
def test_bad_labels(label, engine):
    netlite.set_cpu_engine(engine)
    y = Y.astype(float).copy()
    y[2] = label
    with pytest.raises(LabelError, match=r"LabelSpecificAdd layer 'add'.*index \(2,\)"):
        _run("bias: -0.35", X, y)


def test_label_count_must_be_n():
    with pytest.raises(ShapeError, match="one label per row"):
        _run("bias: -0.35", X, Y[:3])


@pytest.mark.parametrize("engine", ["numpy", "numba"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_cosine(value, engine):
    netlite.set_cpu_engine(engine)
    x = X.copy()
    x[1, 2] = value
    with pytest.raises(NonFiniteError, match=r"index \(1, 2\)"):
        _run("bias: -0.35", x, Y)


def test_no_gradient_to_labels():
    layer, bottom, top = _run("bias: -0.35", X, Y)
    with pytest.raises(ValueError, match="label"):
        layer.backward(top, [True, True], bottom)


# ------------------------------------------------------- cross-checks
def _torch_cosface(torch, c, y, m, dy):
    """CosFace as PyTorch autograd: logits = c - m onehot(y)."""
    ct = torch.tensor(c, requires_grad=True)
    onehot = torch.nn.functional.one_hot(torch.tensor(y), c.shape[1]).double()
    z = ct - m * onehot
    z.backward(torch.tensor(dy))
    return z.detach().numpy(), ct.grad.numpy()


@pytest.mark.torch
def test_matches_torch_autograd():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    c, y = rng.uniform(-1, 1, (16, 10)), rng.integers(0, 10, 16)
    dy = rng.standard_normal(c.shape)
    layer, bottom, top = _run("bias: -0.35", c, y)
    top[0].diff[...] = dy
    layer.backward(top, [True, False], bottom)
    z, g = _torch_cosface(torch, c, y, f32(0.35), dy)
    worst = max(
        np.abs(top[0].data - z).max() / np.abs(z).max(),
        np.abs(bottom[0].diff - g).max() / np.abs(g).max(),
    )
    print(f"LabelSpecificAdd vs torch autograd: worst relative error {worst:.3g}")
    assert worst <= 1e-15


@pytest.mark.torch
def test_matches_pml_cosface_logit_transform():
    """pml's CosFaceLoss builds ``cosine + mask * (modified - cosine)``
    with ``modified = modify_cosine_of_target_classes(target)``; called in
    isolation it equals the layer, forward and autograd backward."""
    torch = pytest.importorskip("torch")
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    rng = np.random.default_rng(6)
    c, y = rng.uniform(-1, 1, (12, 6)), rng.integers(0, 6, 12)
    dy = rng.standard_normal(c.shape)
    pml = losses.CosFaceLoss(num_classes=6, embedding_size=3, margin=f32(0.35))
    ct = torch.tensor(c, requires_grad=True)
    mask = torch.nn.functional.one_hot(torch.tensor(y), 6).double()
    target = ct[mask == 1]
    z = ct + mask * (pml.modify_cosine_of_target_classes(target) - target).unsqueeze(1)
    z.backward(torch.tensor(dy))
    layer, bottom, top = _run("bias: -0.35", c, y)
    top[0].diff[...] = dy
    layer.backward(top, [True, False], bottom)
    worst = max(
        np.abs(top[0].data - z.detach().numpy()).max(),
        np.abs(bottom[0].diff - ct.grad.numpy()).max() / np.abs(dy).max(),
    )
    print(
        "LabelSpecificAdd vs pml CosFaceLoss transform: worst relative error "
        f"{worst:.3g}"
    )
    assert worst <= 1e-15


def _in_place(engine, text, x, y, dy, dtype):
    """Forward and backward in place on ``engine``: (z, dx, top[1])."""
    netlite.set_cpu_engine(engine)
    layer = netlite.create_layer(
        f'name: "add" type: "LabelSpecificAdd" label_specific_add_param {{ {text} }} '
        "loss_param { ignore_label: -1 }",
        dtype=dtype,
    )
    xb, yb = make_blob(x.shape, dtype, x), make_blob(y.shape, dtype, y)
    b = Blob(dtype=dtype)
    layer.setup([xb, yb], [xb, b])
    layer.forward([xb, yb], [xb, b])
    z = xb.data.copy()
    xb.diff[...] = dy
    layer.backward([xb, b], [True, False], [xb, yb])
    return z, xb.diff.copy(), b.data.copy()


@requires_numba()
@pytest.mark.parametrize("shape", [(6, 5), (64, 1000)], ids=["small", "large"])
@pytest.mark.parametrize("per_class", [False, True], ids=["bias", "class_bias"])
def test_numba_in_place_matches_numpy(dtype, shape, per_class):
    # The Numba kernels copy (or, in place, only check) the cosines; the
    # target logits are the layer's own maths: bit for bit the reference.
    text = "bias: -0.35"
    if per_class:
        biases = -np.linspace(0, 0.5, shape[1]).astype(np.float32)
        text = f"class_bias: [{', '.join(repr(float(b)) for b in biases)}]"
    rng = np.random.default_rng(9)
    x = rng.uniform(-1, 1, shape)
    y = rng.integers(0, shape[1], shape[0]).astype(float)
    y[::4] = -1
    dy = rng.standard_normal(shape)
    for a, b in zip(_in_place("numpy", text, x, y, dy, dtype),
                    _in_place("numba", text, x, y, dy, dtype)):
        np.testing.assert_array_equal(b, a)


@requires_numba()
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("where", [(0, 0), (31, 500), (63, 999)])
def test_numba_non_finite_in_any_chunk_raises_the_reference_error(where, in_place):
    # A large batch: the threaded kernel splits it into chunks; the bad value
    # is found wherever it is, and in place the cosines are left untouched.
    netlite.set_cpu_engine("numba")
    x = np.random.default_rng(4).uniform(-1, 1, (64, 1000))
    x[where] = np.inf
    xb = make_blob(x.shape, np.float32, x)
    yb = make_blob((64,), np.float32, np.zeros(64))
    top = [xb] if in_place else [Blob(dtype=np.float32)]
    layer = netlite.create_layer(
        'name: "add" type: "LabelSpecificAdd" label_specific_add_param { bias: -0.35 }',
        dtype=np.float32)
    layer.setup([xb, yb], top)
    match = rf"'add'.*index \({where[0]}, {where[1]}\)"
    with pytest.raises(NonFiniteError, match=match):
        layer.forward([xb, yb], top)
    np.testing.assert_array_equal(xb.data, x.astype(np.float32))
