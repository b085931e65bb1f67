"""FusedMarginHead: a margin head's chain run as one Numba computation.

Every test builds the same prototxt twice -- fused (the default) and with
``netlite.set_fusion(False)`` -- and compares every blob the user can read
(data and diff of the input, the intermediates, the loss, the weights and
the scale) after two forward/backward steps (parameter diffs accumulate
over both).  Then: the planner's rules (what is fused and what is not, and
the log that says so), deferral and memory, partial forward/backward,
errors, the switch, and training with a solver.
"""

import logging
import tracemalloc

import numpy as np
import pytest

import netlite
from netlite import LabelError, LayerSetupError, NonFiniteError

N, D, C = 6, 8, 13

#: float64: the two computations round differently ((x . w) / nu against
#: x . (w / nu), the softmax's sums in another order) by a few ulps, which
#: s = 64 and the exponential amplify at most ~1e3-fold: 1e-11 relative to
#: the largest value of each array.  float32: the same at eps32, 1e-4.
TOL = {np.float64: 1e-11, np.float32: 1e-4}


def margin_layer(kind, extra=""):
    if kind == "add":
        return ('layer { name: "margin" type: "LabelSpecificAdd" bottom: "cos" '
                'bottom: "label" top: "cos_m" label_specific_add_param { '
                f"bias: -0.35 {extra} }} }}\n")
    return ('layer { name: "margin" type: "LabelSpecificMargin" bottom: "cos" '
            'bottom: "label" top: "cos_m" label_specific_margin_param { '
            f"margin_base: 28.6 gamma: 0 {extra} }} }}\n")


def head_net(margin="arc", margin_extra="", scale=64.0, scale_param="lr_mult: 0",
             scale_extra="", loss_extra="", fc_extra="weight_norm_mode: TRUE_GRADIENT",
             force_backward=True, more=""):
    text = ("force_backward: true\n" if force_backward else "") + (
        'layer { name: "in" type: "Input" top: "x" top: "label" '
        f"input_param {{ shape {{ dim: {N} dim: {D} }} shape {{ dim: {N} }} }} }}\n"
        'layer { name: "norm" type: "Normalize" bottom: "x" top: "xn" }\n'
        'layer { name: "fc" type: "InnerProduct" bottom: "xn" top: "cos" '
        f"inner_product_param {{ num_output: {C} bias_term: false normalize: true "
        f'{fc_extra} weight_filler {{ type: "gaussian" std: 0.5 }} }} }}\n')
    after = "cos"
    if margin:
        text += margin_layer(margin, margin_extra)
        after = "cos_m"
    if scale is not None:
        text += (f'layer {{ name: "scale" type: "Scale" bottom: "{after}" '
                 f'top: "logits" param {{ {scale_param} }} scale_param {{ '
                 f'num_axes: 0 filler {{ type: "constant" value: {scale} }} '
                 f"{scale_extra} }} }}\n")
        after = "logits"
    text += (f'layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "{after}" '
             f'bottom: "label" top: "loss" {loss_extra} }}\n')
    return text + more


def inputs(seed=3, ignore=None):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D)) * 3
    labels = rng.integers(0, C, N).astype(float)
    if ignore is not None:
        labels[1] = ignore
    return x, labels


def run(text, fuse, dtype=np.float64, steps=2, phase=netlite.TRAIN, ignore=None,
        seed=3):
    """Build, run ``steps`` forward/backward steps; everything readable."""
    netlite.set_cpu_engine("numba")
    netlite.set_fusion(fuse)
    netlite.set_random_seed(11)
    net = netlite.Net(text, phase, dtype=dtype)
    x, labels = inputs(seed, ignore)
    net.blobs["x"].data[...] = x
    net.blobs["label"].data[...] = labels
    for _ in range(steps):
        net.forward()
        if phase == netlite.TRAIN:
            net.backward()
    out = {f"{k}.data": b.data.copy() for k, b in net.blobs.items()}
    out.update({f"{k}.diff": b.diff.copy() for k, b in net.blobs.items()})
    for name, params in net.params.items():
        for j, p in enumerate(params):
            out[f"{name}[{j}].data"] = p.data.copy()
            out[f"{name}[{j}].diff"] = p.diff.copy()
    return net, out


@pytest.fixture(autouse=True)
def _restore_fusion():
    yield
    netlite.set_fusion(True)


def assert_same(fused, plain, dtype):
    assert fused.keys() == plain.keys()
    for key in plain:
        a, b = fused[key], plain[key]
        scale = max(float(np.abs(b).max(initial=0.0)), 1e-300)
        err = float(np.abs(a - b).max(initial=0.0)) / scale
        assert err <= TOL[dtype], f"{key}: relative difference {err:.2e}"


CHAINS = {
    "normface": {"margin": None, "scale": 20.0},
    "cosface": {"margin": "add"},
    "arcface": {"margin": "arc"},
    "arcface_easy": {"margin": "arc", "margin_extra": "boundary: EASY"},
    "arcface_none_boundary": {"margin": "arc", "margin_extra": "boundary: NONE"},
    "arcface_straight_through": {"margin": "arc",
                                 "margin_extra": "grad_mode: STRAIGHT_THROUGH"},
    "combined_m1_m3": {"margin": "arc",
                       "margin_extra": "m1: 1.2 m3: 0.1 grad_mode: CLAMPED"},
    "add_only_above_margin": {"margin": "add",
                              "margin_extra": "only_above_margin: true"},
    "no_scale": {"margin": "arc", "scale": None},
    "learned_scale": {"margin": "add", "scale": 10.0, "scale_param": "lr_mult: 1"},
    "clamped_scale": {"margin": "add", "scale": 10.0, "scale_param": "lr_mult: 1",
                      "scale_extra": "min_value: 12 max_value: 30"},
    "renorm_inplace": {"margin": "arc", "fc_extra": ""},
    "loss_weight": {"margin": "arc", "loss_extra": "loss_weight: 2.5"},
    "batch_size_normalization": {
        "margin": "add", "loss_extra": "loss_param { normalization: BATCH_SIZE }"},
    "none_normalization": {
        "margin": "add", "loss_extra": "loss_param { normalization: NONE }"},
    "no_force_backward": {"margin": "arc", "force_backward": False},
}


# boundary: NONE warns that psi rises again past (pi - m2) / m1 (expected).
@pytest.mark.filterwarnings("ignore:.*rises again")
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_fused_equals_unfused(chain, dtype):
    text = head_net(**CHAINS[chain])
    net, fused = run(text, True, dtype)
    assert [h.ran_fused for h in net.fused_heads()] == [True]
    _, plain = run(text, False, dtype)
    assert_same(fused, plain, dtype)


@pytest.mark.parametrize("margin", ["add", "arc", None])
def test_ignored_rows(margin):
    ignore = 'loss_param { ignore_label: 4 }'
    extra = {"margin": margin, "loss_extra": ignore}
    text = head_net(**extra)
    if margin:  # the margin layer ignores them too
        text = text.replace('top: "cos_m" ', f'top: "cos_m" {ignore} ')
    _, fused = run(text, True, ignore=4)
    _, plain = run(text, False, ignore=4)
    assert_same(fused, plain, np.float64)
    assert not fused["x.diff"][1].any()  # the ignored row gets no gradient


def test_test_phase_without_margin_on_test():
    text = head_net(margin="arc")
    _, fused = run(text, True, phase=netlite.TEST)
    _, plain = run(text, False, phase=netlite.TEST)
    assert_same(fused, plain, np.float64)


def test_annealed_bias_follows_the_iteration():
    text = head_net(margin="add").replace(
        "bias: -0.35", "bias_base: -0.1 bias_gamma: 0.5 bias_power: 1 bias_min: -0.4 "
        "bias_max: 0")
    results = []
    for fuse in (True, False):
        netlite.set_fusion(fuse)
        net, _ = run(text, fuse, steps=0)
        net.set_iteration(3)
        net.forward()
        results.append(float(net.blobs["loss"].data))
    assert results[0] == pytest.approx(results[1], rel=1e-12)


def test_training_with_a_solver_matches():
    text = head_net(margin="arc", scale=16.0)
    weights = []
    for fuse in (True, False):
        netlite.set_cpu_engine("numba")
        netlite.set_fusion(fuse)
        netlite.set_random_seed(5)
        solver = netlite.SGDSolver(
            f'net_param {{ {text} }} base_lr: 0.1 momentum: 0.9 lr_policy: "fixed" '
            "weight_decay: 0.001 max_iter: 5", dtype=np.float64)
        net = solver.net
        x, labels = inputs()
        for _ in range(5):
            net.blobs["x"].data[...] = x
            net.blobs["label"].data[...] = labels
            solver.step(1)
        assert [h.ran_fused for h in net.fused_heads()] == [fuse]
        weights.append(net.params["fc"][0].data.copy())
    np.testing.assert_allclose(weights[0], weights[1], rtol=1e-10, atol=1e-12)
