"""BatchNorm: the standard tests (LayerTestCase) with batch statistics on
1-D to 5-D bottoms and a constant channel, and with global statistics
(given accumulators, the TEST-phase default, an empty accumulator); ports
of Caffe's test_batch_norm_layer.cpp; then the accumulator update, the
pinned lr_mult, in-place use, bad input, and float64 cross-checks of
BatchNorm + Scale against PyTorch autograd."""

import naive
import numpy as np
import pytest
from batch_norm_testing import ChannelCase, gaussian, training_forwards
from layer_test_case import LayerTestCase
from layer_testing import make_blob, rel_err

import netlite
from netlite import Blob, GradientChecker, LayerSetupError, NonFiniteError, ShapeError
from netlite.layers.batch_norm import BatchNormLayer

#: Accumulators for a (., 2, ...) bottom: A_mu, A_var, s (as after a few
#: TRAIN steps with lambda = 0.9: s = 1 + 0.9 = 1.9).
STORED = ("blobs { shape { dim: 2 } data: 0.3 data: -0.6 } "
          "blobs { shape { dim: 2 } data: 1.7 data: 0.4 } "
          "blobs { shape { dim: 1 } data: 1.9 }")


class TestBatchNormLayer(ChannelCase, LayerTestCase):
    """The standard tests: forward against ``naive.batch_norm``, the
    exhaustive float64 gradient of x, propagate_down, overwritten bottom
    diffs.  The statistic blobs are not learned: with batch statistics the
    output does not depend on them (their finite differences are 0, as
    their diffs); with global statistics they are constants, so only x is
    checked (``test_gradient`` below), and ``test_param_diffs_accumulate``
    is replaced by the check that their diffs are never written."""

    shape, use_global, phase, stored, constant = (3, 2, 2, 2), None, None, False, False
    eps, fraction = 1e-5, 0.999
    cases = {
        "batch_4d": {},
        "batch_2d": {"shape": (5, 3)},
        "batch_1d": {"shape": (6,)},
        "batch_5d": {"shape": (2, 2, 2, 1, 3)},
        "batch_eps_fraction": {"eps": 0.5, "fraction": 0.9},
        # var = 0: the curvature scales with eps^-3/2, so a smaller step
        # keeps the central difference's h^2 error under the threshold.
        "batch_constant_channel": {"constant": True, "stepsize": 1e-6},
        "global_stored": {"use_global": True, "stored": True, "eps": 0.01},
        "global_test_phase": {"phase": "TEST", "stored": True},
        "global_empty": {"use_global": True},
    }

    @property
    def global_stats(self):
        return self.use_global or self.phase == "TEST"

    @property
    def layer(self):
        use = ("" if self.use_global is None
               else f"use_global_stats: {str(self.use_global).lower()}")
        return (f'type: "BatchNorm" batch_norm_param {{ {use} eps: {self.eps} '
                f"moving_average_fraction: {self.fraction} }} "
                + (f"phase: {self.phase} " if self.phase else "")
                + (STORED if self.stored else ""))

    def oracle(self, bottoms, blobs):
        c = self.shape[1] if len(self.shape) > 1 else 1
        assert [b.shape for b in blobs] == [(c,), (c,), (1,)]
        return [naive.batch_norm(bottoms[0], *blobs, self.global_stats,
                                 float(np.float32(self.eps)))]

    @property
    def grad_params(self):
        # Global statistics: x only (the statistics are constants here).
        return [] if self.global_stats else None

    def test_param_diffs_accumulate(self, engine, case, dtype):
        # Replaces the harness's: the statistics have no gradient, and the
        # backward never touches their diffs.
        self.assert_param_diffs_untouched(engine, case, dtype)


def bn_layer(text="", name="bn"):
    return BatchNormLayer(netlite.io.parse_layer_param(
        f'name: "{name}" type: "BatchNorm" {text}'))


# ------------------------------------------------------------ Caffe ports
def _expect_normalised(data, num, channels, height, width):
    # Caffe's loops: per channel, the mean of y and of y^2 within 1e-3.
    for j in range(channels):
        total = var = 0.0
        for i in range(num):
            for k in range(height):
                for m in range(width):
                    v = float(data[i, j, k, m])
                    total += v
                    var += v * v
        total /= height * width * num
        var /= height * width * num
        assert abs(total - 0) <= 0.001
        assert abs(var - 1) <= 0.001


def test_caffe_forward(dtype):
    bottom = gaussian((5, 2, 3, 4), dtype)  # seed 1701 (conftest)
    top = Blob(dtype=dtype)
    layer = BatchNormLayer(netlite.io.LayerParameter())
    layer.setup([bottom], [top])
    layer.forward([bottom], [top])
    _expect_normalised(top.data, 5, 2, 3, 4)


def test_caffe_forward_inplace(dtype):
    blob = gaussian((5, 2, 3, 4), dtype)
    layer = BatchNormLayer(netlite.io.LayerParameter())
    layer.setup([blob], [blob])
    layer.forward([blob], [blob])
    _expect_normalised(blob.data, 5, 2, 3, 4)


def test_caffe_gradient(dtype):
    bottom = gaussian((5, 2, 3, 4), dtype)
    layer = BatchNormLayer(netlite.io.LayerParameter())
    GradientChecker(1e-2, 1e-4).check_gradient_exhaustive(
        layer, [bottom], [Blob(dtype=dtype)])


# ------------------------------------------------------------- statistics
def test_accumulators_follow_caffes_update(dtype):
    # Three TRAIN forwards: s = lambda s + 1, A_mu = mu + lambda A_mu,
    # A_var = m/(m-1) var + lambda A_var, from zero.
    layer = bn_layer("batch_norm_param { moving_average_fraction: 0.8 }")
    top = Blob(dtype=dtype)
    state = [np.zeros(3), np.zeros(3), np.zeros(1)]
    for x in training_forwards(layer, top, dtype):
        state = naive.batch_norm_update(np.asarray(x.data, np.float64), *state,
                                        float(np.float32(0.8)))
        tol = 1e-5 if dtype == np.float32 else 1e-13
        for blob, want in zip(layer.blobs, state):
            np.testing.assert_allclose(blob.data, want, rtol=tol, atol=tol)


def test_global_stats_read_normalised_accumulators(dtype):
    # After one step from zero, A/s are the batch mean and the *unbiased*
    # variance (the m/(m-1) correction); a TEST-phase layer sharing the
    # blobs normalises with them.
    x = gaussian((4, 3, 2), dtype)
    train, test = bn_layer(), bn_layer("phase: TEST")
    train_top = Blob(dtype=dtype)
    train.setup([x], [train_top])
    train.forward([x], [train_top])
    xv = np.asarray(x.data, np.float64).transpose(1, 0, 2).reshape(3, -1)
    s = float(train.blobs[2].data[0])
    assert s == 1
    tol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(train.blobs[0].data / s, xv.mean(axis=1), rtol=tol,
                               atol=tol)
    np.testing.assert_allclose(train.blobs[1].data / s, xv.var(axis=1, ddof=1),
                               rtol=tol)
    test.blobs = train.blobs
    top = Blob(dtype=dtype)
    test.setup([x], [top])
    assert test.use_global_stats and test.blobs[0] is train.blobs[0]
    test.forward([x], [top])
    want = naive.batch_norm(np.asarray(x.data, np.float64),
                            *[np.asarray(b.data, np.float64) for b in train.blobs],
                            True, float(np.float32(1e-5)))
    np.testing.assert_allclose(top.data, want, rtol=tol * 10, atol=tol * 10)


def test_use_global_stats_overrides_the_phase():
    assert bn_layer("phase: TRAIN batch_norm_param { use_global_stats: true }"
                    ).layer_param.batch_norm_param.use_global_stats
    for text, want in (("", False), ("phase: TEST", True),
                       ("phase: TEST batch_norm_param { use_global_stats: false }",
                        False),
                       ("batch_norm_param { use_global_stats: true }", True)):
        layer = bn_layer(text)
        layer.setup([gaussian((2, 2), np.float64)], [Blob()])
        assert layer.use_global_stats is want, text


def test_global_stats_leave_the_accumulators_alone():
    layer = bn_layer("batch_norm_param { use_global_stats: true } " + STORED)
    x, top = gaussian((3, 2, 2), np.float64), Blob()
    layer.setup([x], [top])
    before = [np.array(b.data) for b in layer.blobs]
    layer.forward([x], [top])
    for b, want in zip(layer.blobs, before):
        np.testing.assert_array_equal(b.data, want)


def test_statistic_blobs_are_pinned_in_a_net():
    net = netlite.Net("""
      layer { name: 'in' type: 'Input' top: 'x'
              input_param { shape { dim: 4 dim: 3 } } }
      layer { name: 'bn' type: 'BatchNorm' bottom: 'x' top: 'y' }
      layer { name: 'sc' type: 'Scale' bottom: 'y' top: 'y'
              scale_param { bias_term: true } }
    """, netlite.TRAIN)
    assert net.params_lr == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert [s.lr_mult for s in net.layer_by_name("bn").layer_param.param] == [0, 0, 0]


@pytest.mark.parametrize("specs, ok", [
    ("param { lr_mult: 0 } param { lr_mult: 0 } param { lr_mult: 0 }", True),
    ("param { lr_mult: 0 }", True),
    ("param { lr_mult: 0 } param { lr_mult: 1 }", False),
    ("param { decay_mult: 0 }", False),  # lr_mult unset reads as 1 (Caffe)
])
def test_given_param_specs_must_say_lr_mult_0(specs, ok):
    layer = bn_layer(specs)
    x = gaussian((2, 3), np.float64)
    if ok:
        layer.setup([x], [Blob()])
        assert [s.lr_mult for s in layer.layer_param.param] == [0, 0, 0]
    else:
        with pytest.raises(LayerSetupError,
                           match="BatchNorm layer 'bn'.*running statistic.*lr_mult: 0"):
            layer.setup([x], [Blob()])


@pytest.mark.parametrize("text", ["", "batch_norm_param { use_global_stats: true } "
                                  + STORED])
def test_in_place_matches_out_of_place(text, dtype):
    x = gaussian((3, 2, 2, 2), dtype)
    dy = np.random.default_rng(4).standard_normal(x.shape).astype(dtype)
    ref, top = bn_layer(text), Blob(dtype=dtype)
    ref.setup([x], [top])
    ref.forward([x], [top])
    top.diff[...] = dy
    ref.backward([top], [True], [x])
    inplace = make_blob(x.shape, dtype, x.data)
    layer = bn_layer(text)
    layer.setup([inplace], [inplace])
    layer.forward([inplace], [inplace])
    np.testing.assert_array_equal(inplace.data, top.data)
    inplace.data[...] = -1  # a later in-place layer clobbers it: x_norm is kept
    inplace.diff[...] = dy
    layer.backward([inplace], [True], [inplace])
    np.testing.assert_array_equal(inplace.diff, x.diff)


# ----------------------------------------------------------------- errors
@pytest.mark.parametrize("field, value", [("moving_average_fraction", 1.5),
                                          ("moving_average_fraction", "nan"),
                                          ("eps", -1), ("eps", "inf")])
def test_bad_parameters(field, value):
    with pytest.raises(LayerSetupError, match=f"BatchNorm layer 'bn'.*{field}"):
        bn_layer(f"batch_norm_param {{ {field}: {value} }}").setup(
            [gaussian((2, 3), np.float64)], [Blob()])


def test_shape_errors():
    with pytest.raises(ShapeError, match="BatchNorm layer 'bn'.*batch axis"):
        bn_layer().setup([make_blob((), np.float64, 1.0)], [Blob()])
    layer, top = bn_layer(), Blob()
    layer.setup([gaussian((2, 3), np.float64)], [top])
    with pytest.raises(ShapeError, match="BatchNorm layer 'bn'.*4 channel.*for 3"):
        layer.forward([gaussian((2, 4), np.float64)], [top])
    with pytest.raises(ShapeError, match="BatchNorm layer 'bn'.*variance accumulator"):
        bn_layer("blobs { shape { dim: 3 } } blobs { shape { dim: 2 } } "
                 "blobs { shape { dim: 1 } }").setup([gaussian((2, 3), np.float64)],
                                                     [Blob()])


def test_empty_batch_in_train_is_rejected():
    layer, x, top = bn_layer(), make_blob((0, 3), np.float64), Blob()
    layer.setup([x], [top])
    with pytest.raises(ShapeError, match="BatchNorm layer 'bn'.*at least one value"):
        layer.forward([x], [top])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_leaves_the_accumulators_unchanged(bad):
    layer, top = bn_layer(), Blob()
    x = gaussian((3, 2, 2), np.float64)
    layer.setup([x], [top])
    layer.forward([x], [top])
    before = [np.array(b.data) for b in layer.blobs]
    x.data[1, 1, 0] = bad
    with pytest.raises(NonFiniteError, match="BatchNorm layer 'bn'.*channel 1"):
        layer.forward([x], [top])
    for b, want in zip(layer.blobs, before):
        np.testing.assert_array_equal(b.data, want)


# ----------------------------------------------------------------- PyTorch
BN_SCALE_NET = """
  force_backward: true
  layer { name: 'in' type: 'Input' top: 'x' input_param { shape { %s } } }
  layer { name: 'bn' type: 'BatchNorm' bottom: 'x' top: 'y' %s }
  layer { name: 'sc' type: 'Scale' bottom: 'y' top: 'y'
          scale_param { bias_term: true filler { type: 'gaussian' }
                        bias_filler { type: 'gaussian' } } }
"""


@pytest.mark.torch
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 2, 5)])
@pytest.mark.parametrize("mode", ["batch", "global"])
def test_torch_batch_norm_with_scale_float64(shape, mode):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    dims = " ".join(f"dim: {d}" for d in shape)
    extra = ("batch_norm_param { use_global_stats: true eps: 0.001 } "
             "blobs { shape { dim: 3 } data: 0.6 data: -1.2 data: 0.3 } "
             "blobs { shape { dim: 3 } data: 3.4 data: 0.8 data: 1.1 } "
             "blobs { shape { dim: 1 } data: 2 }" if mode == "global"
             else "batch_norm_param { eps: 0.001 }")
    net = netlite.Net(BN_SCALE_NET % (dims, extra), netlite.TRAIN, dtype=np.float64)
    gen = np.random.default_rng(9)
    x = 1.5 * gen.standard_normal(shape) + 0.7
    dy = gen.standard_normal(shape)
    out = net.forward(x=x)
    net.blobs["y"].diff[...] = dy
    net.backward()
    gamma, beta = (np.array(b.data) for b in net.params["sc"])

    xt = torch.tensor(x, requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.tensor(beta, requires_grad=True)
    eps = float(np.float32(1e-3))
    if mode == "global":
        # Caffe's A / s, from the float32 prototxt values.
        mean = torch.tensor(np.float32([0.6, -1.2, 0.3]).astype(np.float64) / 2)
        var = torch.tensor(np.float32([3.4, 0.8, 1.1]).astype(np.float64) / 2)
        y = F.batch_norm(xt, mean, var, gt, bt, training=False, eps=eps)
    else:
        y = F.batch_norm(xt, None, None, gt, bt, training=True, eps=eps)
    y.backward(torch.tensor(dy))
    sc_diff = [np.array(b.diff) for b in net.params["sc"]]
    errors = [rel_err(out["y"], y.detach().numpy()),
              rel_err(net.blobs["x"].diff, xt.grad.numpy()),
              rel_err(sc_diff[0], gt.grad.numpy()),
              rel_err(sc_diff[1], bt.grad.numpy())]
    print(f"batch_norm+scale torch {mode} {shape}: worst relative error "
          f"{max(errors):.3g}")
    assert max(errors) < 1e-13


@pytest.mark.torch
def test_torch_running_estimates_after_one_step():
    # torch with momentum 1 stores the batch mean and the unbiased variance;
    # Caffe's A/s after one step from zero are the same numbers.
    torch = pytest.importorskip("torch")
    x = gaussian((5, 3, 4), np.float64)
    layer, top = bn_layer(), Blob()
    layer.setup([x], [top])
    layer.forward([x], [top])
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    torch.nn.functional.batch_norm(torch.tensor(np.asarray(x.data)), rm, rv,
                                   training=True, momentum=1.0)
    s = layer.blobs[2].data[0]
    errors = [rel_err(layer.blobs[0].data / s, rm.numpy()),
              rel_err(layer.blobs[1].data / s, rv.numpy())]
    print("batch_norm running estimates vs torch: worst relative error "
          f"{max(errors):.3g}")
    assert max(errors) < 1e-14
