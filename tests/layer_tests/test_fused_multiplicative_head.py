"""FusedMultiplicativeHead: L-Softmax / SphereFace and their softmax loss run
as one Numba computation.

As for the cosine heads (test_fused_margin_head.py): each net is built
twice, fused and with ``netlite.set_fusion(False)``, and every blob and
parameter (data and diff) is compared after two steps; then what is not
fused, and training with a solver.
"""

import logging

import numpy as np
import pytest
from test_fused_margin_head import TOL, assert_same

import netlite

N, D, C = 7, 6, 11


def head_net(kind="LargeMarginInnerProduct", m="QUADRUPLE", base=0.0, gamma=0.0,
             extra="", loss_extra="", tops='top: "logits"'):
    field = {"LargeMarginInnerProduct": "largemargin_inner_product_param",
             "MarginInnerProduct": "margin_inner_product_param"}[kind]
    return (
        "force_backward: true\n"
        'layer { name: "in" type: "Input" top: "x" top: "label" '
        f"input_param {{ shape {{ dim: {N} dim: {D} }} shape {{ dim: {N} }} }} }}\n"
        f'layer {{ name: "fc" type: "{kind}" bottom: "x" bottom: "label" {tops} '
        f"{field} {{ num_output: {C} type: {m} base: {base} gamma: {gamma} "
        f'power: 1 {extra} weight_filler {{ type: "gaussian" std: 0.5 }} }} }}\n'
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "logits" '
        f'bottom: "label" top: "loss" {loss_extra} }}\n')


def run(text, fuse, dtype=np.float64, steps=2, iteration=0, ignore=None):
    netlite.set_cpu_engine("numba")
    netlite.set_fusion(fuse)
    netlite.set_random_seed(4)
    net = netlite.Net(text, netlite.TRAIN, dtype=dtype)
    net.set_iteration(iteration)
    rng = np.random.default_rng(9)
    labels = rng.integers(0, C, N).astype(float)
    if ignore is not None:
        labels[2] = ignore
    net.blobs["x"].data[...] = rng.standard_normal((N, D)) * 2
    net.blobs["label"].data[...] = labels
    for _ in range(steps):
        net.forward()
        net.backward()
    out = {f"{k}.data": b.data.copy() for k, b in net.blobs.items()}
    out.update({f"{k}.diff": b.diff.copy() for k, b in net.blobs.items()})
    out["W.data"] = net.params["fc"][0].data.copy()
    out["W.diff"] = net.params["fc"][0].diff.copy()
    return net, out


@pytest.fixture(autouse=True)
def _restore_fusion():
    yield
    netlite.set_fusion(True)


CASES = {
    "lsoftmax_m4": {},
    "lsoftmax_m2_lambda": {"m": "DOUBLE", "base": 5.0, "gamma": 0.5},
    "lsoftmax_m3": {"m": "TRIPLE", "base": 2.0},
    "lsoftmax_m1": {"m": "SINGLE"},
    "sphereface_m4": {"kind": "MarginInnerProduct"},
    "sphereface_m2_lambda": {"kind": "MarginInnerProduct", "m": "DOUBLE",
                             "base": 5.0, "gamma": 0.5},
    "sphereface_m1": {"kind": "MarginInnerProduct", "m": "SINGLE"},
    "loss_weight": {"loss_extra": "loss_weight: 0.5"},
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_equals_unfused(case, dtype):
    text = head_net(**CASES[case])
    net, fused = run(text, True, dtype, iteration=3)
    assert [type(h).__name__ for h in net.fused_heads()] == [
        "FusedMultiplicativeHeadLayer"]
    assert net.fused_heads()[0].ran_fused
    _, plain = run(text, False, dtype, iteration=3)
    assert_same(fused, plain, dtype)


@pytest.mark.parametrize("kind", ["LargeMarginInnerProduct", "MarginInnerProduct"])
def test_ignored_rows(kind):
    ignore = "loss_param { ignore_label: 3 }"
    text = head_net(kind=kind, loss_extra=ignore).replace(
        'top: "logits" ', f'top: "logits" {ignore} ', 1)
    _, fused = run(text, True, ignore=3)
    _, plain = run(text, False, ignore=3)
    assert_same(fused, plain, np.float64)
    assert not fused["x.diff"][2].any()


def test_training_with_a_solver_matches():
    text = head_net(kind="MarginInnerProduct", base=10.0, gamma=0.1)
    weights = []
    for fuse in (True, False):
        netlite.set_cpu_engine("numba")
        netlite.set_fusion(fuse)
        netlite.set_random_seed(5)
        solver = netlite.SGDSolver(
            f'net_param {{ {text} }} base_lr: 0.05 momentum: 0.9 lr_policy: "fixed" '
            "weight_decay: 0.0005 max_iter: 4", dtype=np.float64)
        rng = np.random.default_rng(2)
        x, labels = rng.standard_normal((N, D)), rng.integers(0, C, N)
        for _ in range(4):
            solver.net.blobs["x"].data[...] = x
            solver.net.blobs["label"].data[...] = labels
            solver.step(1)
        assert [h.ran_fused for h in solver.net.fused_heads()] == [fuse]
        weights.append(solver.net.params["fc"][0].data.copy())
    np.testing.assert_allclose(weights[0], weights[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case, reason", [
    ({"kind": "MarginInnerProduct", "extra": "grad_mode: SPHEREFACE"},
     "grad_mode SPHEREFACE is not the gradient of the forward"),
])
def test_what_is_not_fused_is_logged(case, reason, caplog):
    with caplog.at_level(logging.INFO, logger="netlite"):
        netlite.set_cpu_engine("numba")
        net = netlite.Net(head_net(**case), netlite.TRAIN, dtype=np.float64)
    assert net.fused_heads() == []
    assert any("Not fusing the head from layer fc" in r.getMessage()
               and reason in r.getMessage() for r in caplog.records), caplog.text


def test_a_zero_weight_row_gets_the_layers_gradient():
    # SphereFace normalises with max(|w|, 1e-12); a row below that gets no
    # projection in the layer, and none in the fused head.
    text = head_net(kind="MarginInnerProduct")
    outs = []
    for fuse in (True, False):
        netlite.set_cpu_engine("numba")
        netlite.set_fusion(fuse)
        netlite.set_random_seed(4)
        net = netlite.Net(text, netlite.TRAIN, dtype=np.float64)
        net.params["fc"][0].data[5] = 0
        rng = np.random.default_rng(9)
        net.blobs["x"].data[...] = rng.standard_normal((N, D))
        net.blobs["label"].data[...] = rng.integers(0, C, N)
        net.forward()
        net.backward()
        outs.append(net.params["fc"][0].diff.copy())
    assert np.abs(outs[1][5]).max() > 0
    np.testing.assert_allclose(outs[0], outs[1], rtol=TOL[np.float64], atol=1e-13)


def test_the_lambda_top():
    text = head_net(base=100.0, gamma=0.5, tops='top: "logits" top: "lambda"')
    net, fused = run(text, True, iteration=6)
    assert net.fused_heads()[0].ran_fused
    # lambda = base (1 + gamma t)^-power at the layer's t = iteration + 1.
    assert float(fused["lambda.data"]) == pytest.approx(100.0 / (1 + 0.5 * 7))
    _, plain = run(text, False, iteration=6)
    assert_same(fused, plain, np.float64)
