"""BN (the L-Softmax fork's batch normalization): the standard tests
(LayerTestCase) with batch statistics on 1-D to 4-D bottoms and a constant
channel, in the TEST phase and frozen; then the running-blob update, the
default blobs, the fork's MNIST prototxt form in a net, the pinned
lr_mult, in-place use, bad input, and float64 cross-checks against
PyTorch autograd."""

import naive
import numpy as np
import pytest
from batch_norm_testing import ChannelCase, gaussian, training_forwards
from layer_test_case import LayerTestCase
from layer_testing import make_blob, rel_err

import netlite
from netlite import Blob, LayerSetupError, ShapeError
from netlite.layers.bn import BNLayer

#: Four blobs for C = 2: slope, bias, running mean, running inverse std.
STORED = ("blobs { shape { dim: 1 dim: 2 } data: 1.3 data: -0.7 } "
          "blobs { shape { dim: 1 dim: 2 } data: 0.2 data: 0.5 } "
          "blobs { shape { dim: 1 dim: 2 } data: 0.3 data: -0.6 } "
          "blobs { shape { dim: 1 dim: 2 } data: 0.8 data: 1.6 } ")


class TestBNLayer(ChannelCase, LayerTestCase):
    """The standard tests: forward against ``naive.bn``, the exhaustive
    float64 gradient, propagate_down, accumulated slope and bias diffs,
    overwritten bottom diffs.  With batch statistics the running blobs do
    not enter the output (finite differences 0, diffs 0).  In the TEST
    phase they are constants: x, slope and bias are checked; frozen, the
    layer learns nothing: x is checked, and ``test_param_diffs_accumulate``
    becomes the check that no diff is written."""

    shape, test_phase, constant = (3, 2, 2, 2), False, False
    eps, momentum, frozen = 1e-5, 0.9, False
    cases = {
        "batch_4d": {},
        "batch_2d": {"shape": (5, 2)},
        "batch_1d": {"shape": (6,)},
        "batch_3d_eps_momentum": {"shape": (2, 3, 4), "eps": 0.5, "momentum": 0.5},
        "batch_constant_channel": {"constant": True, "stepsize": 1e-6},
        # The running cases read the stored blobs STORED.
        "test_phase": {"test_phase": True},
        "frozen": {"frozen": True},
        "frozen_test_phase": {"frozen": True, "test_phase": True},
    }

    @property
    def batch_stats(self):
        return not (self.frozen or self.test_phase)

    @property
    def layer(self):
        return (f'type: "BN" bn_param {{ slope_filler {{ type: "gaussian" }} '
                f'bias_filler {{ type: "gaussian" }} momentum: {self.momentum} '
                f"eps: {self.eps} frozen: {str(self.frozen).lower()} }} "
                + ("phase: TEST " if self.test_phase else "")
                + ("" if self.batch_stats else STORED))

    def oracle(self, bottoms, blobs):
        c = self.shape[1] if len(self.shape) > 1 else 1
        assert [b.shape for b in blobs] == [(1, c)] * 4
        return [naive.bn(bottoms[0], *blobs, batch_stats=self.batch_stats,
                         eps=float(np.float32(self.eps)))]

    @property
    def grad_params(self):
        # Running statistics are constants here; frozen learns nothing.
        if self.batch_stats:
            return None
        return [] if self.frozen else [0, 1]

    def test_param_diffs_accumulate(self, engine, case, dtype):
        self.configure(case)
        if not self.frozen:
            super().test_param_diffs_accumulate(engine, case, dtype)
            return
        self.assert_param_diffs_untouched(engine, case, dtype)


def bn_layer(text="", bn="", name="bn", slope="gaussian"):
    """A BN layer: ``bn`` goes inside bn_param (after gaussian fillers
    unless ``slope`` is None), ``text`` after it."""
    fillers = (f'slope_filler {{ type: "{slope}" }} bias_filler {{ type: "gaussian" }} '
               if slope else "")
    return BNLayer(netlite.io.parse_layer_param(
        f'name: "{name}" type: "BN" bn_param {{ {fillers}{bn} }} {text}'))


def run(layer, x, dy=None):
    top = Blob(dtype=x.dtype)
    layer.setup([x], [top])
    layer.forward([x], [top])
    if dy is not None:
        top.diff[...] = dy
        for p in layer.blobs:
            p.diff[...] = 0
        layer.backward([top], [True], [x])
    return top


# ----------------------------------------------------------- the fork's
def test_default_blobs_follow_the_fork():
    # slope_filler / bias_filler absent: constant 0 (FillerParameter's
    # default, as the fork reads it); M = 0, R = 1; all of shape (1, C).
    layer = BNLayer(netlite.io.parse_layer_param('name: "bn" type: "BN"'))
    run(layer, gaussian((4, 3, 2)))
    assert [b.shape for b in layer.blobs] == [(1, 3)] * 4
    np.testing.assert_array_equal(layer.blobs[0].data, 0)
    np.testing.assert_array_equal(layer.blobs[1].data, 0)
    fresh = BNLayer(netlite.io.parse_layer_param('name: "bn" type: "BN"'))
    fresh.setup([gaussian((4, 3, 2))], [Blob()])
    np.testing.assert_array_equal(fresh.blobs[2].data, 0)
    np.testing.assert_array_equal(fresh.blobs[3].data, 1)


def test_running_blobs_follow_the_forks_update(dtype):
    # M = (1 - m) mu + m M, R = (1 - m) / sqrt(biased var + eps) + m R.
    layer, top = bn_layer(bn="momentum: 0.7 eps: 0.01"), Blob(dtype=dtype)
    m, eps = float(np.float32(0.7)), float(np.float32(0.01))
    state = [np.zeros((1, 3)), np.ones((1, 3))]
    for x in training_forwards(layer, top, dtype):
        state = naive.bn_update(np.asarray(x.data, np.float64), *state, m, eps)
        tol = 1e-5 if dtype == np.float32 else 1e-13
        for blob, want in zip(layer.blobs[2:], state):
            np.testing.assert_allclose(blob.data, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("text", ["phase: TEST", "bn_param { frozen: true }"])
def test_running_blobs_fixed_in_test_phase_and_frozen(text):
    layer = BNLayer(netlite.io.parse_layer_param(f'name: "bn" type: "BN" {text} '
                                                 + STORED))
    x = gaussian((3, 2, 4))
    top = run(layer, x)
    np.testing.assert_array_equal(layer.blobs[2].data, [[np.float32(0.3),
                                                         np.float32(-0.6)]])
    # y = slope (x - M) R + bias, R used as stored (no eps, no root).
    want = naive.bn(np.asarray(x.data), *[np.asarray(b.data) for b in layer.blobs],
                    batch_stats=False)
    np.testing.assert_allclose(top.data, want, rtol=1e-14)


def test_frozen_learns_nothing_and_passes_the_exact_input_gradient():
    layer = BNLayer(netlite.io.parse_layer_param(
        'name: "bn" type: "BN" bn_param { frozen: true } ' + STORED))
    x = gaussian((3, 2, 4))
    dy = np.random.default_rng(1).standard_normal(x.shape)
    run(layer, x, dy)
    for p in layer.blobs:
        np.testing.assert_array_equal(p.diff, 0)
    slope, _, _, r = (np.asarray(b.data).reshape(1, 2, 1) for b in layer.blobs)
    np.testing.assert_allclose(x.diff, dy * slope * r, rtol=1e-15)


def test_test_phase_input_gradient_is_the_forwards():
    # The fork reuses its batch-statistics backward in the TEST phase;
    # netlite differentiates the TEST forward: dx = dy * slope * R.
    layer = BNLayer(netlite.io.parse_layer_param(
        'name: "bn" type: "BN" phase: TEST ' + STORED))
    x = gaussian((3, 2, 4))
    dy = np.random.default_rng(1).standard_normal(x.shape)
    run(layer, x, dy)
    slope, _, mean, r = (np.asarray(b.data).reshape(1, 2, 1) for b in layer.blobs)
    np.testing.assert_allclose(x.diff, dy * slope * r, rtol=1e-15)
    xhat = (np.asarray(x.data) - mean) * r
    np.testing.assert_allclose(layer.blobs[0].diff.reshape(2),
                               (dy * xhat).sum(axis=(0, 2)), rtol=1e-14)
    np.testing.assert_allclose(layer.blobs[1].diff.reshape(2), dy.sum(axis=(0, 2)),
                               rtol=1e-14)


def test_engine_field_is_read_and_ignored():
    x = gaussian((4, 2, 3))
    netlite.set_random_seed(5)
    want = run(bn_layer(), x).data.copy()
    for engine in ("CAFFE", "CUDNN"):
        netlite.set_random_seed(5)
        got = run(bn_layer(bn=f"engine: {engine}"), x).data
        np.testing.assert_array_equal(got, want)


FORK_MNIST_FORM = """
  name: 'MNISTNet'
  layer { name: 'mnist' type: 'Input' top: 'data' top: 'label'
          input_param { shape { dim: 4 dim: 1 dim: 6 dim: 6 } shape { dim: 4 } } }
  layer { name: 'pre_conv' type: 'Convolution' bottom: 'data' top: 'pre_conv'
    param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
    convolution_param { num_output: 3 kernel_size: 3 stride: 1 pad: 1
      weight_filler { type: 'msra' } bias_filler { type: 'constant' } } }
  layer { name: 'pre_bn' type: 'BN' bottom: 'pre_conv' top: 'pre_bn'
    param { lr_mult: 1 decay_mult: 0 } param { lr_mult: 1 decay_mult: 0 }
    bn_param { slope_filler { type: 'constant' value: 1 }
               bias_filler { type: 'constant' value: 0 } } }
  layer { name: 'pre_relu' type: 'ReLU' bottom: 'pre_bn' top: 'pre_bn' }
  layer { name: 'ip1' type: 'InnerProduct' bottom: 'pre_bn' top: 'ip1'
    param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
    inner_product_param { num_output: 5 weight_filler { type: 'xavier' }
      bias_filler { type: 'constant' value: 0 } } }
  layer { name: 'ip1_bn' type: 'BN' bottom: 'ip1' top: 'ip1_bn'
    param { lr_mult: 1 decay_mult: 0 } param { lr_mult: 1 decay_mult: 0 }
    bn_param { slope_filler { type: 'constant' value: 1 }
               bias_filler { type: 'constant' value: 0 } } }
  layer { name: 'loss' type: 'SoftmaxWithLoss' bottom: 'ip1_bn' bottom: 'label'
          top: 'loss' }
"""


@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
def test_fork_mnist_form_builds_and_runs(phase):
    net = netlite.Net(FORK_MNIST_FORM, getattr(netlite, phase), dtype=np.float64)
    for name, channels in (("pre_bn", 3), ("ip1_bn", 5)):
        layer = net.layer_by_name(name)
        assert [b.shape for b in layer.blobs] == [(1, channels)] * 4
        np.testing.assert_array_equal(layer.blobs[0].data, 1)
        np.testing.assert_array_equal(layer.blobs[1].data, 0)
        assert [(s.lr_mult, s.decay_mult) for s in layer.layer_param.param] == [
            (1, 0), (1, 0), (0, 1), (0, 1)]
    # conv w, b, then per BN: slope, bias, M, R; then ip w, b, BN.
    assert net.params_lr == [1, 2, 1, 1, 0, 0, 1, 2, 1, 1, 0, 0]
    gen = np.random.default_rng(0)
    net.blobs["data"].data[...] = gen.standard_normal((4, 1, 6, 6))
    net.blobs["label"].data[...] = [0, 1, 4, 2]
    loss = net.forward_backward()
    assert np.isfinite(loss)
    moved = not np.all(net.layer_by_name("pre_bn").blobs[2].data == 0)
    assert moved is (phase == "TRAIN")
    if phase == "TRAIN":
        assert np.any(net.layer_by_name("pre_bn").blobs[0].diff != 0)
        assert np.all(np.isfinite(net.layer_by_name("pre_conv").blobs[0].diff))


@pytest.mark.parametrize("specs, ok", [
    ("param { lr_mult: 1 }", True),
    ("param { lr_mult: 1 } param { lr_mult: 1 } param { lr_mult: 0 } "
     "param { lr_mult: 0 }", True),
    ("param { lr_mult: 1 } param { lr_mult: 1 } param { lr_mult: 1 }", False),
])
def test_running_blobs_must_have_lr_mult_0(specs, ok):
    layer = bn_layer(specs)
    if ok:
        layer.setup([gaussian((2, 3))], [Blob()])
        assert [s.lr_mult for s in layer.layer_param.param] == [1, 1, 0, 0]
    else:
        with pytest.raises(LayerSetupError,
                           match="BN layer 'bn'.*param 2.*running mean.*lr_mult: 0"):
            layer.setup([gaussian((2, 3))], [Blob()])


@pytest.mark.parametrize("text, bn", [("", ""), ("phase: TEST", ""),
                                      ("", "frozen: true")])
def test_in_place_matches_out_of_place(text, bn, dtype):
    x = gaussian((3, 2, 2, 2), dtype)
    dy = np.random.default_rng(4).standard_normal(x.shape).astype(dtype)
    netlite.set_random_seed(5)  # the same slope and bias for both layers
    ref = bn_layer(text, bn)
    top = run(ref, x, dy)
    inplace = make_blob(x.shape, dtype, x.data)
    netlite.set_random_seed(5)
    layer = bn_layer(text, bn)
    layer.setup([inplace], [inplace])
    layer.forward([inplace], [inplace])
    np.testing.assert_array_equal(inplace.data, top.data)
    inplace.data[...] = -1  # a later in-place layer clobbers it
    inplace.diff[...] = dy
    for p in layer.blobs:
        p.diff[...] = 0
    layer.backward([inplace], [True], [inplace])
    np.testing.assert_array_equal(inplace.diff, x.diff)
    for p, q in zip(layer.blobs, ref.blobs):
        np.testing.assert_array_equal(p.diff, q.diff)


# ----------------------------------------------------------------- errors
@pytest.mark.parametrize("field, value", [("momentum", -0.1), ("momentum", "nan"),
                                          ("eps", -1), ("eps", "nan")])
def test_bad_parameters(field, value):
    with pytest.raises(LayerSetupError, match=f"BN layer 'bn'.*{field}"):
        bn_layer(bn=f"{field}: {value}", slope=None).setup(
            [gaussian((2, 3))], [Blob()])


def test_shape_errors():
    layer, top = bn_layer(), Blob()
    layer.setup([gaussian((2, 3))], [top])
    with pytest.raises(ShapeError, match="BN layer 'bn'.*4 channel.*for 3"):
        layer.forward([gaussian((2, 4))], [top])
    with pytest.raises(ShapeError, match="BN layer 'bn'.*running inverse std"):
        bn_layer("blobs { shape { dim: 1 dim: 3 } } " * 3
                 + "blobs { shape { dim: 3 } }").setup([gaussian((2, 3))], [Blob()])
    with pytest.raises(ShapeError, match="BN layer 'bn'.*batch axis"):
        bn_layer().setup([make_blob((), np.float64, 1.0)], [Blob()])


def test_non_finite_input_is_named():
    x = gaussian((3, 2, 2))
    x.data[0, 1, 1] = np.nan
    with pytest.raises(netlite.NonFiniteError, match="BN layer 'bn'.*channel 1"):
        run(bn_layer(), x)


# ----------------------------------------------------------------- PyTorch
@pytest.mark.torch
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 2, 5)])
@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
def test_torch_batch_norm_float64(shape, phase):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    gen = np.random.default_rng(9)
    x = make_blob(shape, np.float64, 1.5 * gen.standard_normal(shape) + 0.7)
    dy = gen.standard_normal(shape)
    mean0 = gen.standard_normal((1, 3))
    inv0 = gen.uniform(0.5, 2.0, (1, 3))
    layer = bn_layer(f"phase: {phase}", "momentum: 0.75 eps: 0.001")
    top = Blob(dtype=np.float64)
    layer.setup([x], [top])
    layer.blobs[2].data[...] = mean0
    layer.blobs[3].data[...] = inv0
    slope, bias = (np.array(b.data).reshape(3) for b in layer.blobs[:2])
    layer.forward([x], [top])
    top.diff[...] = dy
    for p in layer.blobs:
        p.diff[...] = 0
    layer.backward([top], [True], [x])

    eps = float(np.float32(1e-3))
    xt = torch.tensor(np.asarray(x.data), requires_grad=True)
    gt = torch.tensor(slope, requires_grad=True)
    bt = torch.tensor(bias, requires_grad=True)
    # torch's momentum weighs the batch: 1 - the fork's momentum.
    rm, rv = torch.tensor(mean0.ravel()), torch.tensor(1 / inv0.ravel() ** 2 - eps)
    y = F.batch_norm(xt, rm, rv, gt, bt, training=phase == "TRAIN",
                     momentum=1 - float(np.float32(0.75)), eps=eps)
    y.backward(torch.tensor(dy))
    errors = [rel_err(top.data, y.detach().numpy()), rel_err(x.diff, xt.grad.numpy()),
              rel_err(layer.blobs[0].diff.ravel(), gt.grad.numpy()),
              rel_err(layer.blobs[1].diff.ravel(), bt.grad.numpy()),
              rel_err(layer.blobs[2].data.ravel(), rm.numpy())]
    print(f"bn torch {phase} {shape}: worst relative error {max(errors):.3g}")
    assert max(errors) < 1e-13
