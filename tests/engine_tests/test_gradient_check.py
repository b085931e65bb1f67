"""Self-tests of the GradientChecker (Caffe has none): it passes correct
layers, catches wrong ones, and implements Caffe's objective, kink, element-
wise, check_bottom, parameter-zeroing and RNG-reseeding rules."""

import numpy as np
import pytest

import netlite
from netlite import Blob, registry, rng
from netlite.gradient_check import GradientChecker, GradientCheckError
from netlite.layer import Layer, NeuronLayer


def _bottom(shape, dtype, values=None, std=1.0):
    blob = Blob(shape, dtype=dtype)
    if values is None:
        values = rng.get_rng().normal(0.0, std, size=shape)
    blob.data = values
    return blob


# -------------------------------------------------------------- toy layers
class Square(NeuronLayer):
    """y = x**2 (or with deliberate bugs in the backward)."""

    def __init__(self, factor=1.0, flip=None, **kwargs):
        super().__init__(**kwargs)
        self.factor, self.flip = factor, flip

    def forward_cpu(self, bottom, top):
        top[0].data[...] = bottom[0].data ** 2

    def backward_cpu(self, top, propagate_down, bottom):
        if propagate_down[0]:
            dx = 2 * bottom[0].data * top[0].diff * self.dtype.type(self.factor)
            if self.flip is not None:
                dx.reshape(-1)[self.flip] *= -1
            bottom[0].diff[...] = dx


class Abs(NeuronLayer):
    """y = |x|: a kink at 0 (sign(0) = 0 as in Caffe)."""

    def forward_cpu(self, bottom, top):
        top[0].data[...] = np.abs(bottom[0].data)

    def backward_cpu(self, top, propagate_down, bottom):
        bottom[0].diff[...] = np.sign(bottom[0].data) * top[0].diff


class Mix(NeuronLayer):
    """y_i = x_i + 0.5 x_{i+1}: element-wise shape, non-diagonal Jacobian."""

    def forward_cpu(self, bottom, top):
        x = bottom[0].flat_data
        y = top[0].flat_data
        y[...] = x
        y[:-1] += 0.5 * x[1:]

    def backward_cpu(self, top, propagate_down, bottom):
        dy = top[0].flat_diff
        dx = bottom[0].flat_diff
        dx[...] = dy
        dx[1:] += 0.5 * dy[:-1]


class Linear(Layer):
    """y = x W^T + b; parameter diffs accumulate, as every layer's must."""

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def __init__(self, num_output=3, weight_bug=1.0, **kwargs):
        super().__init__(**kwargs)
        self.num_output, self.weight_bug = num_output, weight_bug

    def layer_setup(self, bottom, top):
        if not self.blobs:
            k = bottom[0].count_range(1)
            self.blobs = [self.make_blob((self.num_output, k)),
                          self.make_blob((self.num_output,))]
            self.blobs[0].data = rng.get_rng().normal(size=(self.num_output, k))
            self.blobs[1].data = rng.get_rng().normal(size=self.num_output)

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape[0], self.num_output)

    def forward_cpu(self, bottom, top):
        x = bottom[0].data.reshape(bottom[0].shape[0], -1)
        top[0].data[...] = x @ self.blobs[0].data.T + self.blobs[1].data

    def backward_cpu(self, top, propagate_down, bottom):
        dy = top[0].diff
        x = bottom[0].data.reshape(bottom[0].shape[0], -1)
        if self.propagates_param(0):
            self.blobs[0].diff += (dy.T @ x) * self.dtype.type(self.weight_bug)
        if self.propagates_param(1):
            self.blobs[1].diff += dy.sum(axis=0)
        if propagate_down[0]:
            bottom[0].diff[...] = (dy @ self.blobs[0].data).reshape(bottom[0].shape)


class Product(Layer):
    """y = a * b (element-wise), with an optional bug in db; records the
    propagate_down it was given."""

    exact_num_bottom_blobs = 2
    exact_num_top_blobs = 1

    def __init__(self, b_bug=1.0, **kwargs):
        super().__init__(**kwargs)
        self.b_bug = b_bug
        self.seen_propagate_down = []

    def reshape(self, bottom, top):
        top[0].reshape_like(bottom[0])

    def forward_cpu(self, bottom, top):
        top[0].data[...] = bottom[0].data * bottom[1].data

    def backward_cpu(self, top, propagate_down, bottom):
        self.seen_propagate_down.append(list(propagate_down))
        dy = top[0].diff
        if propagate_down[0]:
            bottom[0].diff[...] = dy * bottom[1].data
        if propagate_down[1]:
            bottom[1].diff[...] = dy * bottom[0].data * self.dtype.type(self.b_bug)


class NoTop(Layer):
    """A sink: no blob-count constraints, no tops."""

    def reshape(self, bottom, top):
        pass


class RandomMask(NeuronLayer):
    """Dropout-like: y = x * m / 0.5 with a fresh Bernoulli mask per forward."""

    def forward_cpu(self, bottom, top):
        self.mask = rng.get_rng().random(bottom[0].shape) < 0.5
        top[0].data[...] = bottom[0].data * self.mask * 2

    def backward_cpu(self, top, propagate_down, bottom):
        bottom[0].diff[...] = top[0].diff * self.mask * 2


def _run(layer, bottom, top=None, mode="exhaustive", checker=None, **kwargs):
    checker = checker or GradientChecker(1e-2, 1e-3)
    top = top if top is not None else [Blob(dtype=bottom[0].dtype)]
    getattr(checker, f"check_gradient_{mode}" if mode else "check_gradient")(
        layer, bottom, top, **kwargs)
    return top


# --------------------------------------------------------- correct layers
@pytest.mark.parametrize("mode", ["exhaustive", None, "eltwise"])
def test_correct_elementwise_layer_passes(mode, dtype):
    _run(Square(), [_bottom((2, 3, 4), dtype)], mode=mode)


def test_correct_layer_with_params_passes(dtype):
    _run(Linear(), [_bottom((4, 2, 3), dtype)])


def test_correct_two_bottom_layer_passes(dtype):
    _run(Product(), [_bottom((3, 4), dtype), _bottom((3, 4), dtype)])


# ----------------------------------------------------------- wrong layers
@pytest.mark.parametrize("mode", ["exhaustive", None, "eltwise"])
def test_backward_off_by_ten_percent_is_caught(mode, dtype):
    with pytest.raises(GradientCheckError) as info:
        _run(Square(factor=1.1), [_bottom((2, 3, 4), dtype)], mode=mode)
    failures = info.value.failures
    assert failures and all(f[0] == "bottom[0]" for f in failures)
    for _, _, analytic, numeric, *_ in failures:
        assert analytic == pytest.approx(1.1 * numeric, rel=1e-2, abs=1e-3)


def test_sign_error_in_one_element_is_caught_at_that_element(dtype):
    bottom = [_bottom((2, 3, 4), dtype)]
    bottom[0].data[1, 0, 3] = 1.5  # large enough to fail clearly
    with pytest.raises(GradientCheckError) as info:
        _run(Square(flip=15), bottom)  # flat 15 == index (1, 0, 3)
    failures = info.value.failures
    assert {f[1] for f in failures} == {(1, 0, 3)}
    assert len(failures) == 1  # only the diagonal entry of that element
    blob, index, analytic, numeric, top_id, top_elem, _ = failures[0]
    assert (blob, top_id, top_elem) == ("bottom[0]", 0, 15)
    assert analytic == pytest.approx(-numeric, rel=1e-3)
    assert numeric == pytest.approx(2 * 2 * 1.5, rel=1e-3)


def test_wrong_parameter_gradient_is_caught(dtype):
    with pytest.raises(GradientCheckError) as info:
        _run(Linear(weight_bug=1.1), [_bottom((4, 5), dtype)])
    assert {f[0] for f in info.value.failures} == {"param[0]"}


def test_error_message_lists_worst_entries_first():
    # Gradients 4x < 1: the tolerance is absolute, so the error 0.4x (and
    # the excess over the tolerance) grows with x.
    bottom = [_bottom((30,), np.float64, values=np.linspace(0.01, 0.2, 30))]
    with pytest.raises(GradientCheckError) as info:
        _run(Square(factor=1.1), bottom, mode="eltwise")
    error = info.value
    assert isinstance(error, AssertionError)
    message = str(error)
    lines = message.splitlines()
    # Element-wise mode counts the 30 x 30 Jacobian entries (off-diagonal
    # analytic values compared with 0); the 30 diagonal ones fail.
    assert lines[0].startswith("Square layer '<unnamed>': 30 of 900 gradient")
    assert "threshold 0.001" in lines[0]
    assert lines[1].split()[:4] == ["blob", "index", "analytic", "numeric"]
    # Worst first: the largest x gives the largest error; 10 rows shown.
    first = lines[2].split()
    assert first[0] == "bottom[0]" and first[1] == "(29,)"
    assert float(first[2]) == pytest.approx(1.1 * 4 * 0.2)
    assert float(first[3]) == pytest.approx(4 * 0.2)
    assert [line.split()[1] for line in lines[2:12]] == [
        f"({i},)" for i in range(29, 19, -1)]
    assert lines[-1] == "  ... and 20 more"
    assert len(lines) == 2 + 10 + 1
    excess = [f[6] for f in error.failures]
    assert excess == sorted(excess, reverse=True)


# ------------------------------------------------------------------ kinks
def test_abs_kink_passes_only_with_kink_range(dtype):
    values = np.array([-1.3, -0.004, 0.0, 0.003, 0.8, 2.0])
    with pytest.raises(GradientCheckError) as info:
        _run(Abs(), [_bottom((6,), dtype, values)])
    # Within h of the kink the central difference straddles it.
    assert {f[1] for f in info.value.failures} == {(1,), (3,)}
    checker = GradientChecker(1e-2, 1e-3, kink=0.0, kink_range=0.01)
    _run(Abs(), [_bottom((6,), dtype, values)], checker=checker)


def test_kink_away_from_zero():
    # kink 1, range 0.01 skips 0.99 <= |x| <= 1.01 only.
    class Hinge(NeuronLayer):
        def forward_cpu(self, bottom, top):
            top[0].data[...] = np.maximum(np.abs(bottom[0].data), 1.0)

        def backward_cpu(self, top, propagate_down, bottom):
            x = bottom[0].data
            bottom[0].diff[...] = np.where(np.abs(x) > 1, np.sign(x), 0) * top[0].diff

    values = np.array([0.2, 0.995, -1.004, 1.5, -3.0])
    with pytest.raises(GradientCheckError):
        _run(Hinge(), [_bottom((5,), np.float64, values)])
    _run(Hinge(), [_bottom((5,), np.float64, values)],
         checker=GradientChecker(1e-2, 1e-3, kink=1.0, kink_range=0.01))
    # A range around 0 does not help here.
    with pytest.raises(GradientCheckError):
        _run(Hinge(), [_bottom((5,), np.float64, values)],
             checker=GradientChecker(1e-2, 1e-3, kink=0.0, kink_range=0.01))


# ------------------------------------------------------------ element-wise
def test_eltwise_catches_a_nonzero_off_diagonal(dtype):
    bottom = [_bottom((2, 5), dtype)]
    _run(Mix(), bottom)  # the exhaustive check sees a correct Jacobian
    with pytest.raises(GradientCheckError) as info:
        _run(Mix(), bottom, mode="eltwise")
    # Each failure is an off-diagonal entry (input i+1 for output i) whose
    # analytic value 2 * 0.5 (the objective's top diff is 2) must be ~0 in
    # element-wise mode.
    assert len(info.value.failures) == 9
    for _, index, analytic, numeric, top_id, top_elem, _ in info.value.failures:
        assert top_id == 0 and numeric == 0.0 and analytic == pytest.approx(1.0)
        assert index[0] * 5 + index[1] == top_elem + 1


def test_eltwise_preconditions():
    checker = GradientChecker(1e-2, 1e-3)
    with pytest.raises(ValueError, match="without params"):
        checker.check_gradient_eltwise(Linear(), [_bottom((2, 3), np.float64)],
                                       [Blob(dtype=np.float64)])
    with pytest.raises(ValueError, match="at least one top"):
        checker.check_gradient_eltwise(NoTop(), [_bottom((2,), np.float64)], [])


# ------------------------------------------------------- parameter diffs
def test_parameter_diffs_are_zeroed_before_the_analytic_pass(dtype):
    layer = Linear()
    bottom = [_bottom((4, 3), dtype)]
    top = [Blob(dtype=dtype)]
    layer.setup(bottom, top)
    for blob in layer.blobs:
        blob.diff[...] = 100.0  # stale gradient the layer would add to
    GradientChecker(1e-2, 1e-3).check_gradient_exhaustive(layer, bottom, top)


def test_check_gradient_single_with_stale_diffs():
    layer = Linear()
    bottom = [_bottom((2, 3), np.float64)]
    top = [Blob(dtype=np.float64)]
    layer.setup(bottom, top)
    layer.blobs[0].diff[...] = 5.0
    GradientChecker(1e-2, 1e-3).check_gradient_single(layer, bottom, top, -1, 0, 4)


# ----------------------------------------------------------- RNG reseeding
def test_stochastic_layer_passes_thanks_to_reseeding(dtype):
    _run(RandomMask(), [_bottom((3, 4), dtype)])


def test_stochastic_layer_fails_without_reseeding(monkeypatch):
    bottom = [_bottom((3, 4), np.float64)]
    monkeypatch.setattr(rng, "set_random_seed", lambda seed: None)
    with pytest.raises(GradientCheckError):
        _run(RandomMask(), bottom)


def test_seed_is_the_one_given():
    seen = []

    class SeedSpy(Square):
        def forward_cpu(self, bottom, top):
            seen.append(rng.get_rng().integers(1 << 30))
            super().forward_cpu(bottom, top)

    _run(SeedSpy(), [_bottom((2,), np.float64)], checker=GradientChecker(
        1e-2, 1e-3, seed=42))
    netlite.set_random_seed(42)
    assert set(seen) == {rng.get_rng().integers(1 << 30)}
    # setup + (analytic + 2 per input element) per top element.
    assert len(seen) == 2 * (1 + 2 * 2)


# ----------------------------------------------------------- check_bottom
def _product_case(b_bug, check_bottom):
    layer = Product(b_bug=b_bug)
    bottom = [_bottom((2, 3), np.float64), _bottom((2, 3), np.float64)]
    _run(layer, bottom, check_bottom=check_bottom)
    return layer.seen_propagate_down


def test_check_bottom_minus_one_checks_every_bottom():
    assert _product_case(1.0, -1)[0] == [True, True]
    with pytest.raises(GradientCheckError) as info:
        _product_case(1.1, -1)
    assert {f[0] for f in info.value.failures} == {"bottom[1]"}


def test_check_bottom_index_checks_only_that_bottom():
    # The buggy bottom 1 is neither checked nor even asked for.
    assert set(map(tuple, _product_case(1.1, 0))) == {(True, False)}
    with pytest.raises(GradientCheckError):
        _product_case(1.1, 1)


def test_check_bottom_below_minus_one_checks_params_only(dtype):
    layer = Linear()
    bottom = [_bottom((3, 4), dtype)]
    bottom[0].diff[...] = 7.0
    _run(layer, bottom, check_bottom=-2)
    np.testing.assert_array_equal(bottom[0].diff, np.full((3, 4), 7.0))
    with pytest.raises(GradientCheckError):
        _run(Linear(weight_bug=0.9), [_bottom((3, 4), dtype)], check_bottom=-2)
    with pytest.raises(ValueError, match="no blobs to check"):
        _run(Square(), [_bottom((3,), dtype)], check_bottom=-2)


def test_check_bottom_sequence_and_range():
    assert set(map(tuple, _product_case(1.0, [1]))) == {(False, True)}
    with pytest.raises(IndexError, match="check_bottom 2 but the layer has 2"):
        _product_case(1.0, 2)


def test_exhaustive_needs_a_top():
    with pytest.raises(ValueError, match="at least one top"):
        _run(NoTop(), [_bottom((2,), np.float64)], top=[])


# ------------------------------------------------------------- objective
def test_sum_of_squares_objective_sets_diffs_to_data():
    layer = Square()
    bottom = [_bottom((4,), np.float64, values=[1.0, -2.0, 0.5, 3.0])]
    top = _run(layer, bottom, mode=None)
    np.testing.assert_allclose(top[0].diff, top[0].data)


def test_single_element_objective_is_two_at_that_element():
    layer = Square()
    bottom = [_bottom((4,), np.float64, values=[1.0, -2.0, 0.5, 3.0])]
    top = [Blob(dtype=np.float64)]
    layer.setup(bottom, top)
    GradientChecker(1e-2, 1e-3).check_gradient_single(layer, bottom, top, -1, 0, 2)
    np.testing.assert_array_equal(top[0].diff, [0, 0, 2, 0])
    np.testing.assert_allclose(bottom[0].diff, [0, 0, 2 * 2 * 0.5, 0])


def test_configured_loss_weight_is_ignored():
    # The checker's objective overwrites the loss-weight seed in the diff.
    layer = Square(layer_param="loss_weight: 1000")
    _run(layer, [_bottom((3,), np.float64)])


def test_threshold_is_relative_above_one_and_absolute_below():
    # The objective 2 * y_j gives g = 4x; analytic 1.1 g is off by 0.1 |g|.
    # With threshold 0.2 that passes everywhere: relatively where |g| >= 1
    # (0.1 / 1.1 < 0.2) and absolutely below (0.1 |g| < 0.2).  With 0.05 it
    # fails wherever 0.1 |g| > 0.05, i.e. x > 0.125.
    values = np.array([0.01, 0.1, 0.2, 0.3, 5.0, 50.0])
    _run(Square(factor=1.1), [_bottom((6,), np.float64, values)], mode="eltwise",
         checker=GradientChecker(1e-3, 0.2))
    with pytest.raises(GradientCheckError) as info:
        _run(Square(factor=1.1), [_bottom((6,), np.float64, values)],
             mode="eltwise", checker=GradientChecker(1e-3, 0.05))
    assert {f[1] for f in info.value.failures} == {(2,), (3,), (4,), (5,)}


# ------------------------------------------------------------------- nets
@pytest.fixture
def scratch_registry(monkeypatch):
    monkeypatch.setattr(registry.LAYERS, "_classes", dict(registry.LAYERS._classes))


def _needs(*types):
    missing = set(types) - set(netlite.layer_types())
    return pytest.mark.skipif(bool(missing), reason=f"layers missing: {missing}")


_NET = """name: 'check_me' {force}
    layer {{ name: 'data' type: 'Input' top: 'data' top: 'label'
            input_param {{ shape {{ dim: 4 dim: 5 }} shape {{ dim: 4 }} }} }}
    layer {{ name: 'ip1' type: 'InnerProduct' bottom: 'data' top: 'ip1'
            {param} inner_product_param {{ num_output: 6
            weight_filler {{ type: 'gaussian' std: 0.5 }}
            bias_filler {{ type: 'gaussian' std: 0.5 }} }} }}
    layer {{ name: 'relu1' type: 'ReLU' bottom: 'ip1' top: 'relu1' }}
    layer {{ name: 'ip2' type: 'InnerProduct' bottom: 'relu1' top: 'ip2'
            inner_product_param {{ num_output: 3
            weight_filler {{ type: 'gaussian' std: 0.5 }} }} }}
    layer {{ name: 'loss' type: '{loss}' bottom: 'ip2' bottom: 'label'
            loss_weight: 2 }}
"""


def _net_inputs(dtype, loss):
    data = rng.get_rng().normal(size=(4, 5))
    label = rng.get_rng().integers(0, 3, size=4).astype(dtype)
    if loss == "EuclideanLoss":
        label = rng.get_rng().normal(size=(4, 3))
    return {"data": data, "label": label}


def _prepare(dtype, loss, param="", force="force_backward: true"):
    text = _NET.format(param=param, loss=loss, force=force)
    if loss == "EuclideanLoss":
        text = text.replace("shape { dim: 4 } }", "shape { dim: 4 dim: 3 } }")
    net = netlite.Net(text, dtype=dtype)
    return net, _net_inputs(dtype, loss)


@_needs("InnerProduct", "ReLU", "SoftmaxWithLoss")
def test_check_gradient_net_softmax_loss(dtype):
    net, inputs = _prepare(dtype, "SoftmaxWithLoss")
    GradientChecker(1e-2, 1e-2, kink=0.0, kink_range=0.01).check_gradient_net(
        net, **inputs)


@_needs("InnerProduct", "ReLU", "EuclideanLoss")
def test_check_gradient_net_restores_loss_weights(dtype):
    net, inputs = _prepare(dtype, "EuclideanLoss")
    GradientChecker(1e-2, 1e-2, kink=0.0, kink_range=0.01).check_gradient_net(
        net, **inputs)
    loss_top = net.top_vecs[net.layer_index("loss")][0]
    assert float(loss_top.diff) == 2.0  # the seed is back, training can go on
    net.forward(**inputs)
    assert net.loss == pytest.approx(2 * float(loss_top.data))


@_needs("InnerProduct", "ReLU", "EuclideanLoss")
def test_check_gradient_net_skips_frozen_parameters():
    # lr_mult 0: the net never computes that gradient, so it is not checked
    # (checking it would compare a zero analytic value with the numeric one).
    # (force_backward would switch every param_propagate_down back on.)
    net, inputs = _prepare(np.float64, "EuclideanLoss", force="",
                           param="param { lr_mult: 0 } param { lr_mult: 1 }")
    assert not net.layers[1].propagates_param(0)
    assert net.layers[1].propagates_param(1)
    GradientChecker(1e-2, 1e-2, kink=0.0, kink_range=0.01).check_gradient_net(
        net, **inputs)


@_needs("InnerProduct", "ReLU", "EuclideanLoss")
def test_check_gradient_net_catches_a_wrong_layer(scratch_registry):
    @registry.register_layer("BuggyReLU")
    class BuggyReLU(NeuronLayer):
        def forward_cpu(self, bottom, top):
            top[0].data[...] = np.maximum(bottom[0].data, 0)

        def backward_cpu(self, top, propagate_down, bottom):
            if propagate_down[0]:
                bottom[0].diff[...] = (bottom[0].data > 0) * top[0].diff * 0.9

    net, inputs = _prepare(np.float64, "EuclideanLoss")
    text = net.net_param  # rebuild with the buggy layer in place of ReLU
    text.layer[2].type = "BuggyReLU"
    buggy = netlite.Net(text, dtype=np.float64)
    with pytest.raises(GradientCheckError, match="BuggyReLU layer 'relu1'"):
        GradientChecker(1e-2, 1e-2, kink=0.0, kink_range=0.01).check_gradient_net(
            buggy, **inputs)
