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


# ----------------------------------------------------------------- planner
NOT_FUSED = {
    "a second reader of the logits": (
        {"more": 'layer { name: "acc" type: "Accuracy" bottom: "logits" '
                 'bottom: "label" top: "acc" }\n'},
        "the chain stops at logits_scale_0_split (Split)"),
    "a bias in the InnerProduct": ({}, "has a bias"),
    "a Scale with a bias": (
        {"scale_extra": "bias_term: true"}, "without bias"),
    "a learned per-class Scale": (
        {"scale_param": "lr_mult: 1"}, "nor a fixed per-class one"),
    "no loss after the scale": (
        {}, "the chain stops at loss (Softmax)"),
}


@pytest.mark.parametrize("case", sorted(NOT_FUSED))
def test_what_is_not_fused_is_logged(case, caplog):
    kwargs, reason = NOT_FUSED[case]
    kwargs = dict(kwargs)
    text = head_net(**{k: v for k, v in kwargs.items() if v is not None})
    if case == "a bias in the InnerProduct":
        text = text.replace("bias_term: false", "bias_term: true")
    if case == "a learned per-class Scale":
        text = text.replace("num_axes: 0 ", "")
    if case == "no loss after the scale":
        text = text.replace(
            'type: "SoftmaxWithLoss" bottom: "logits" bottom: "label" top: "loss"',
            'type: "Softmax" bottom: "logits" top: "prob"')
    with caplog.at_level(logging.INFO, logger="netlite"):
        netlite.set_cpu_engine("numba")
        net = netlite.Net(text, netlite.TRAIN, dtype=np.float64)
    assert net.fused_heads() == []
    assert any("Not fusing the head from layer fc" in r.getMessage()
               and reason in r.getMessage() for r in caplog.records), caplog.text


def test_the_fusion_is_logged_at_build_and_in_debug_info(caplog):
    text = "debug_info: true\n" + head_net(margin="arc")
    with caplog.at_level(logging.INFO, logger="netlite"):
        run(text, True, steps=1)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Fusing layers fc (InnerProduct) -> margin "
                            "(LabelSpecificMargin) -> scale (Scale) -> loss "
                            "(SoftmaxWithLoss)") for m in messages)
    assert sum("[Forward] Fused layers fc" in m for m in messages) == 1
    assert sum("[Backward] Fused layers fc" in m for m in messages) == 1
    # Each layer's own debug lines still follow, with the unfused values.
    assert any("[Forward] Layer margin, top blob cos_m data" in m for m in messages)


def test_a_loss_extension_runs_the_layers_one_by_one():
    text = head_net(margin="add",
                    loss_extra="loss_param { label_smoothing: 0.1 }")
    net, fused = run(text, True)
    assert [h.ran_fused for h in net.fused_heads()] == [False]
    _, plain = run(text, False)
    assert_same(fused, plain, np.float64)


def test_the_numpy_engine_runs_the_layers_one_by_one():
    netlite.set_cpu_engine("numpy")
    try:
        net = netlite.Net(head_net(), netlite.TRAIN, dtype=np.float64)
        net.forward()
        assert [h.ran_fused for h in net.fused_heads()] == [False]
    finally:
        netlite.set_cpu_engine("numba")


def test_environment_variable_turns_fusion_off(monkeypatch):
    from netlite import fusion

    monkeypatch.setenv("NETLITE_FUSION", "0")
    monkeypatch.setattr(fusion, "_enabled", None)
    assert not netlite.fusion_enabled()
    monkeypatch.setenv("NETLITE_FUSION", "1")
    monkeypatch.setattr(fusion, "_enabled", None)
    assert netlite.fusion_enabled()


def test_cannot_be_written_in_a_prototxt():
    with pytest.raises(LayerSetupError, match="made by the Net from a chain of layers"):
        netlite.Net(
            'layer { name: "in" type: "Input" top: "x" top: "label" input_param { '
            "shape { dim: 2 dim: 3 } shape { dim: 2 } } }\n"
            'layer { name: "h" type: "FusedMarginHead" bottom: "x" bottom: "label" '
            'top: "loss" }', netlite.TRAIN)


# -------------------------------------------------------- deferral, memory
def fresh_net(text, steps=1):
    """A net after ``steps`` fused steps, none of its blobs read since."""
    net, _ = run(text, True, steps=0)
    for _ in range(steps):
        net.forward()
        net.backward()
    return net


def test_intermediate_blobs_are_deferred_and_hold_no_memory():
    net = fresh_net(head_net(margin="arc"))
    for name in ("cos", "cos_m", "logits"):
        blob = net.blobs[name]
        assert blob.deferred == ("data", "diff")
        assert blob.nbytes == 0
    assert net.layers[-1].prob.nbytes == 0
    value = net.blobs["cos_m"].diff  # materialised on request
    assert net.blobs["cos_m"].nbytes == value.nbytes
    assert net.blobs["cos_m"].deferred == ("data",)
    assert net.blobs["cos"].nbytes == 0


def test_a_materialised_blob_is_replaced_by_the_next_forward():
    net, _ = run(head_net(margin="add"), True, steps=1)
    first = net.blobs["cos"].data.copy()
    net.blobs["x"].data[...] *= -1
    net.forward()
    np.testing.assert_allclose(net.blobs["cos"].data, -first, rtol=1e-12)
    assert net.blobs["cos"].deferred == ()


def test_a_fused_step_allocates_no_n_by_c_array():
    # After the first step (which allocates the head's two N x C arrays),
    # a step allocates only O(N + C) and the weight GEMM's block.
    global N, C
    n_c = (N, C)
    N, C = 64, 3000
    try:
        net, _ = run(head_net(margin="arc"), True, steps=1, dtype=np.float32)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            net.forward()
            net.backward()
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        assert peak < N * C * 4 / 4, peak
    finally:
        N, C = n_c


# ------------------------------------------------------- partial, errors
def test_partial_forward_and_backward_match_the_unfused_chain():
    text = head_net(margin="arc", scale_param="lr_mult: 1")
    results = []
    for fuse in (True, False):
        net, _ = run(text, fuse, steps=1)
        net.clear_param_diffs()
        net.forward()
        # A backward that ends inside the chain (down to the margin layer),
        # then the rest: the chain reruns its layers' forwards first.
        net.backward(start="loss", end="margin")
        net.backward(start="fc", end="norm")
        # A forward that starts inside the chain.
        net.forward(start="scale")
        results.append({k: (b.data.copy(), b.diff.copy()) for k, b in net.blobs.items()}
                       | {"W": (net.params["fc"][0].data.copy(),
                                net.params["fc"][0].diff.copy()),
                          "s": (net.params["scale"][0].data.copy(),
                                net.params["scale"][0].diff.copy())})
    for key, (data, diff) in results[1].items():
        np.testing.assert_allclose(results[0][key][0], data, rtol=1e-11, atol=1e-13)
        np.testing.assert_allclose(results[0][key][1], diff, rtol=1e-11, atol=1e-13)


def forward_errors(text, kind, edit):
    """The messages of the ``kind`` error a forward raises after ``edit(x,
    labels, net)``: fused, then the layers one by one."""
    messages = []
    for fuse in (True, False):
        netlite.set_cpu_engine("numba")
        netlite.set_fusion(fuse)
        net = netlite.Net(text, netlite.TRAIN, dtype=np.float64)
        x, labels = inputs()
        edit(x, labels, net)
        net.blobs["x"].data[...] = x
        net.blobs["label"].data[...] = labels
        with pytest.raises(kind) as info:
            net.forward()
        messages.append(str(info.value))
    return messages


def test_non_finite_features_raise_the_layers_error():
    def edit(x, labels, net):
        x[2, 3] = np.nan

    fused, plain = forward_errors(head_net(margin="arc", fc_extra=""),
                                  NonFiniteError, edit)
    assert fused == plain


def test_a_bad_label_raises_the_layers_error():
    def edit(x, labels, net):
        labels[0] = C

    fused, plain = forward_errors(head_net(margin="add"), LabelError, edit)
    assert fused == plain


@pytest.mark.parametrize("margin", ["arc", None])
def test_threaded_kernels_equal_the_chain(margin):
    # 64 x 600 = 38400 cosines: above the tests' threshold of the kernels'
    # multi-threaded builds (conftest.py), on several threads when there are.
    global N, C
    n_c = (N, C)
    N, C = 64, 600
    try:
        text = head_net(margin=margin, scale_param="lr_mult: 1")
        net, fused = run(text, True)
        assert net.fused_heads()[0].adapter("numba").parallel
        _, plain = run(text, False)
        assert_same(fused, plain, np.float64)
    finally:
        N, C = n_c


# ------------------------------------------------------------- CuPy engine
def requires_gpu():
    """The CuPy parity tests' condition: CuPy and a CUDA device (marks gpu)."""
    from layer_testing import requires_gpu as mark

    return mark()


def run_gpu(text, fuse, dtype=np.float64, **kwargs):
    """:func:`run` on the GPU (a net made in GPU mode); NumPy copies of
    everything readable."""
    netlite.set_mode_gpu()
    try:
        net, out = run(text, fuse, dtype, **kwargs)
    finally:
        netlite.set_mode_cpu()
    return net, {k: netlite.backend.to_numpy(v) for k, v in out.items()}


def assert_ran_on_the_gpu(net, fused=True):
    head, = net.fused_heads()
    assert head.ran_fused == fused
    assert head.engine == ("cupy" if fused else "numpy")


@requires_gpu()
@pytest.mark.filterwarnings("ignore:.*rises again")
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_cupy_fused_equals_unfused(chain, dtype):
    text = head_net(**CHAINS[chain])
    net, fused = run_gpu(text, True, dtype)
    assert_ran_on_the_gpu(net)
    _, plain = run_gpu(text, False, dtype)
    assert_same(fused, plain, dtype)


@requires_gpu()
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode", ["true_gradient", "renorm_inplace"])
def test_cupy_weight_gradient_in_blocks(mode, dtype, monkeypatch):
    # Blocks of 3 weight rows (the last one of 1) over C = 13 classes: the
    # copy of E's columns, the sparse rows and the epilogue per block.
    from netlite.layers import fused_margin_head_cupy

    itemsize = np.dtype(dtype).itemsize
    monkeypatch.setattr(fused_margin_head_cupy, "WEIGHT_BLOCK_BYTES",
                        3 * max(N, D) * itemsize)
    extra = {} if mode == "true_gradient" else {"fc_extra": ""}
    text = head_net(margin="arc", scale_param="lr_mult: 1", **extra)
    net, fused = run_gpu(text, True, dtype)
    assert_ran_on_the_gpu(net)
    assert net.fused_heads()[0].adapter("cupy").tmp.shape == (3, D)
    _, plain = run_gpu(text, False, dtype)
    assert_same(fused, plain, dtype)


@requires_gpu()
@pytest.mark.parametrize("margin", ["add", "arc", None])
def test_cupy_ignored_rows(margin):
    ignore = 'loss_param { ignore_label: 4 }'
    text = head_net(margin=margin, loss_extra=ignore)
    if margin:
        text = text.replace('top: "cos_m" ', f'top: "cos_m" {ignore} ')
    net, fused = run_gpu(text, True, ignore=4)
    assert_ran_on_the_gpu(net)
    _, plain = run_gpu(text, False, ignore=4)
    assert_same(fused, plain, np.float64)
    assert not fused["x.diff"][1].any()


@requires_gpu()
@pytest.mark.parametrize("margin", ["arc", None])
@pytest.mark.parametrize("error", ["nan_weight", "label"])
def test_cupy_errors_are_the_layers(error, margin):
    # A NaN weight makes the head's log-sum-exp NaN: it reruns the layers,
    # whose own check raises (the margin layer's, or the loss's).
    messages = []
    for fuse in (True, False):
        netlite.set_fusion(fuse)
        netlite.set_mode_gpu()
        try:
            net = netlite.Net(head_net(margin=margin), netlite.TRAIN, dtype=np.float64)
        finally:
            netlite.set_mode_cpu()
        x, labels = inputs()
        if error == "nan_weight":
            net.params["fc"][0].data[4, 3] = np.nan
        else:
            labels[0] = C
        net.blobs["x"].data[...] = x
        net.blobs["label"].data[...] = labels
        expected = NonFiniteError if error == "nan_weight" else LabelError
        with pytest.raises(expected) as info:
            net.forward()
        messages.append(str(info.value))
    assert messages[0] == messages[1]


@pytest.mark.parametrize("margin", ["arc", "add", None])
def test_non_finite_weights_raise_the_layers_error(margin):
    # NaN weights: the features pass Normalize, the cosines are NaN; the
    # fused forward reruns the layers, whose error is raised (no warning).
    def edit(x, labels, net):
        net.params["fc"][0].data[3, 1] = np.nan

    fused, plain = forward_errors(head_net(margin=margin), NonFiniteError, edit)
    assert fused == plain


def test_a_layers_own_backward_after_a_fused_forward():
    # net.forward() ran fused; calling the layers' backward one by one (as
    # netlite.reference does, with upstream gradients on intermediate
    # blobs) reruns the chain's forwards first and gives the chain's values.
    results = []
    for fuse in (True, False):
        net, _ = run(head_net(margin="arc"), fuse, steps=0)
        net.forward()
        assert [h.ran_fused for h in net.fused_heads()] == [fuse]
        net.clear_param_diffs()
        net.blobs["cos_m"].diff[...] = 0.5  # an upstream on an intermediate
        for i in range(len(net.layers) - 1, -1, -1):
            if i == net.layer_index("margin"):
                net.blobs["cos_m"].diff[...] += 0.5
            if net.layer_need_backward[i]:
                net.layers[i].backward(net.top_vecs[i], net.bottom_need_backward[i],
                                       net.bottom_vecs[i])
        assert [h.ran_fused for h in net.fused_heads()] == [False]
        results.append((net.blobs["x"].diff.copy(), net.params["fc"][0].diff.copy()))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)


def in_place(text):
    """The margin and the Scale updating the InnerProduct's top in place."""
    for name in ("cos_m", "logits"):
        text = text.replace(f'top: "{name}"', 'top: "cos"')
        text = text.replace(f'bottom: "{name}"', 'bottom: "cos"')
    return text


@pytest.mark.parametrize("margin", ["arc", "add", None])
def test_in_place_chain(margin):
    # The blob holds the Scale's top after the forward and the margin's
    # bottom diff (the first layer's top diff) after the backward.
    text = in_place(head_net(margin=margin, scale_param="lr_mult: 1"))
    net, fused = run(text, True)
    assert [h.ran_fused for h in net.fused_heads()] == [True]
    assert "cos_m" not in net.blobs and "logits" not in net.blobs
    _, plain = run(text, False)
    assert_same(fused, plain, np.float64)


@pytest.mark.parametrize("values", [(30.0, 30.0), (30.0, 20.0)],
                         ids=["uniform", "mixed"])
def test_fixed_per_class_scale(values):
    # AM-Softmax's prototxt: a Scale with num_axes 1, lr_mult 0, constant
    # 30 -- one value per class, all equal: fused; unequal values run the
    # layers one by one.
    # (No force_backward: it would ask for the scale's diff, per class.)
    text = head_net(margin="add", force_backward=False).replace("num_axes: 0 ", "")
    results = []
    for fuse in (True, False):
        netlite.set_cpu_engine("numba")
        netlite.set_fusion(fuse)
        netlite.set_random_seed(11)
        net = netlite.Net(text, netlite.TRAIN, dtype=np.float64)
        net.params["scale"][0].data[...] = values[0]
        net.params["scale"][0].data[0] = values[1]
        x, labels = inputs()
        net.blobs["x"].data[...] = x
        net.blobs["label"].data[...] = labels
        net.forward()
        net.backward()
        uniform = values[0] == values[1]
        assert [h.ran_fused for h in net.fused_heads()] == [fuse and uniform]
        results.append({k: (b.data.copy(), b.diff.copy())
                        for k, b in net.blobs.items()})
    for key, (data, diff) in results[1].items():
        np.testing.assert_allclose(results[0][key][0], data, rtol=1e-11, atol=1e-13)
        np.testing.assert_allclose(results[0][key][1], diff, rtol=1e-11, atol=1e-13)


def test_published_prototxts_fuse_and_equal_their_layers():
    # The four published heads (tests/layer_tests/published_nets.py) in TRAIN:
    # L-Softmax (with its lambda top), SphereFace, AM-Softmax (per-class fixed
    # scale), NormFace (in-place clamped scale).
    from published_nets import NETS

    for name, make in NETS.items():
        outs = []
        for fuse in (True, False):
            netlite.set_cpu_engine("numba")
            netlite.set_fusion(fuse)
            netlite.set_random_seed(3)
            net = netlite.Net(make(), netlite.TRAIN, dtype=np.float64)
            rng = np.random.default_rng(8)
            for key in net.inputs:
                blob = net.blobs[key]
                if key == "label":  # (every head has at least 7 classes)
                    blob.data[...] = rng.integers(0, 7, blob.shape)
                else:
                    blob.data[...] = rng.standard_normal(blob.shape)
            for _ in range(2):
                net.forward()
                net.backward()
            assert [h.ran_fused for h in net.fused_heads()] == [fuse], name
            out = {f"{k}.data": b.data.copy() for k, b in net.blobs.items()}
            out.update({f"{k}.diff": b.diff.copy() for k, b in net.blobs.items()})
            for layer, params in net.params.items():
                for j, p in enumerate(params):
                    out[f"{layer}[{j}].diff"] = p.diff.copy()
            outs.append(out)
        # Relative to each array's largest value, but at least 1e-3 of the
        # net's largest: the convolutions' bias diffs in L-Softmax's net are
        # round-off around 0 (a BN layer follows each), ~1e-15 against
        # weight diffs of ~10.
        floor = 1e-3 * max(float(np.abs(v).max(initial=0.0)) for v in outs[1].values())
        for key, b in outs[1].items():
            err = float(np.abs(outs[0][key] - b).max(initial=0.0))
            scale = max(float(np.abs(b).max(initial=0.0)), floor)
            assert err <= TOL[np.float64] * scale, (name, key, err)


def test_the_heads_reference_engine_runs_the_layers():
    # On the numpy engine the head's own forward/backward are the layers'
    # (with the Net's flags per layer), so the head is a complete Layer.
    _, plain = run(head_net(margin="arc", scale_param="lr_mult: 1"), False, steps=1)
    net, _ = run(head_net(margin="arc", scale_param="lr_mult: 1"), False, steps=0)
    netlite.set_cpu_engine("numpy")
    net.forward(end="norm")
    net.clear_param_diffs()
    head = net.fused_heads()[0]
    head.forward(head.bottom_vec, head.top_vec)
    head.backward(head.top_vec, head.propagate_down, head.bottom_vec)
    net.backward(start="norm")
    assert head.engine == "numpy"
    for key in ("x", "xn", "cos", "cos_m", "logits"):
        for side in ("data", "diff"):
            np.testing.assert_allclose(getattr(net.blobs[key], side),
                                       plain[f"{key}.{side}"], rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(net.params["fc"][0].diff, plain["fc[0].diff"],
                               rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(net.params["scale"][0].diff, plain["scale[0].diff"],
                               rtol=1e-11, atol=1e-13)
