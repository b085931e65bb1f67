"""Dropout: ports of the Dropout tests of Caffe's test_neuron_layer.cpp,
plus mask reuse in backward, reproducibility, in-place use, the ratio's
range and engine agreement."""

import naive
import numpy as np
import pytest
from layer_test_case import LayerTestCase
from layer_testing import filler, make_blob, requires_numba

import netlite
from netlite import TEST, TRAIN, Blob, GradientChecker, LayerSetupError
from netlite.layers.dropout import DropoutLayer


class TestDropoutLayer(LayerTestCase):
    """The standard tests in TRAIN (ratios 0.5, 0.75, 0.3 and 0) and in
    TEST.  The harness reseeds the global generator with 1701 before the
    forward and before the oracle, so the oracle redraws the layer's
    uniforms: ``rng.get_rng().random(shape)``, one per element, kept where
    ``u >= p``."""

    bottoms = [((2, 3, 4, 5), filler("gaussian"))]
    ratio, phase = 0.5, "TRAIN"
    cases = {"half": {}, "three_quarters": {"ratio": 0.75},
             "inexact_ratio": {"ratio": 0.3}, "zero": {"ratio": 0.0},
             "test_phase": {"phase": "TEST"},
             "test_phase_ratio": {"phase": "TEST", "ratio": 0.75}}

    @property
    def layer(self):
        return (f'type: "Dropout" phase: {self.phase} '
                f"dropout_param {{ dropout_ratio: {self.ratio} }}")

    def oracle(self, bottoms, blobs):
        x = bottoms[0]
        if self.phase == "TEST":
            return [naive.dropout(x)]
        u = netlite.rng.get_rng().random(x.shape)
        # dropout_ratio is a float in the prototxt: float32 in every dtype.
        return [naive.dropout(x, u, float(np.float32(self.ratio)))]


def dropout_layer(ratio=None, phase=None):
    """A Dropout layer; ``ratio=None`` leaves Caffe's default 0.5."""
    param = netlite.io.LayerParameter(name="drop", type="Dropout")
    if ratio is not None:
        param.dropout_param.dropout_ratio = ratio
    if phase is not None:
        param.phase = phase
    return DropoutLayer(param)


@pytest.fixture
def bottom(dtype):
    """Caffe's NeuronLayerTest fixture: (2, 3, 4, 5) Gaussian, seed 1701."""
    return make_blob((2, 3, 4, 5), dtype, filler("gaussian"))


def run_forward(ratio, bottom, dtype):
    """Caffe's TestDropoutForward."""
    layer = dropout_layer(None if ratio == 0.5 else ratio, phase=TRAIN)
    top = Blob(dtype=dtype)
    layer.setup([bottom], [top])
    layer.forward([bottom], [top])
    x, y = bottom.data, top.data
    scale = dtype.type(1.0 / (1.0 - ratio))
    kept = y != 0
    np.testing.assert_array_equal(y[kept], x[kept] * scale)
    count = bottom.count
    std_error = np.sqrt(ratio * (1 - ratio) / count)
    empirical = 1 - kept.sum() / count
    assert abs(empirical - ratio) <= 1.96 * std_error


# ---------------------------------------------------------------- Caffe ports
def test_dropout_half(bottom, dtype):
    run_forward(0.5, bottom, dtype)


def test_dropout_three_quarters(bottom, dtype):
    run_forward(0.75, bottom, dtype)


def test_dropout_test_phase(bottom, dtype):
    layer = dropout_layer(phase=TEST)
    top = Blob(dtype=dtype)
    layer.setup([bottom], [top])
    layer.forward([bottom], [top])
    # Caffe only compares the non-zero entries; in TEST all are kept.
    np.testing.assert_array_equal(top.data, bottom.data)


@pytest.mark.parametrize("phase", [TRAIN, TEST], ids=["train", "test"])
def test_dropout_gradient(bottom, dtype, phase):
    layer = dropout_layer(phase=phase)
    checker = GradientChecker(1e-2, 1e-3)
    checker.check_gradient_eltwise(layer, [bottom], [Blob(dtype=dtype)])


# ------------------------------------------------------ beyond Caffe's tests
def test_default_phase_is_train(bottom, dtype):
    layer = dropout_layer()
    assert layer.phase == TRAIN
    top = Blob(dtype=dtype)
    layer.setup([bottom], [top])
    layer.forward([bottom], [top])
    assert (top.data == 0).any()


def test_backward_uses_the_forward_mask(bottom, dtype):
    layer = dropout_layer(0.3)
    top = Blob(dtype=dtype)
    layer.setup([bottom], [top])
    layer.forward([bottom], [top])
    kept = top.data != 0
    netlite.rng.get_rng().random(100)  # draws between passes change nothing
    top.diff[...] = np.arange(top.count).reshape(top.shape) + 1
    bottom.diff[...] = 5
    layer.backward([top], [True], [bottom])
    # dropout_ratio is a float32 field: 0.3 is stored as 0.30000001...
    scale = dtype.type(1 / (1 - float(np.float32(0.3))))
    np.testing.assert_array_equal(bottom.diff, np.where(kept, top.diff * scale, 0))


def test_new_mask_every_forward_same_mask_for_same_seed(bottom, dtype):
    layer = dropout_layer()
    top = Blob(dtype=dtype)
    layer.setup([bottom], [top])
    masks = []
    for seed in (5, 5, 6):
        netlite.set_random_seed(seed)
        layer.forward([bottom], [top])
        masks.append(top.data != 0)
    layer.forward([bottom], [top])
    np.testing.assert_array_equal(masks[0], masks[1])
    assert (masks[0] != masks[2]).any()
    assert (masks[2] != (top.data != 0)).any()


def test_in_place(bottom, dtype):
    x = bottom.data.copy()
    layer = dropout_layer(0.5)
    netlite.set_random_seed(3)
    layer.setup([bottom], [bottom])
    layer.forward([bottom], [bottom])
    y = bottom.data.copy()
    kept = y != 0
    np.testing.assert_array_equal(y[kept], x[kept] * dtype.type(2))
    bottom.diff[...] = 1
    layer.backward([bottom], [True], [bottom])
    np.testing.assert_array_equal(bottom.diff, np.where(kept, 2, 0))


def test_test_phase_backward_copies(bottom, dtype):
    layer = dropout_layer(phase=TEST)
    top = Blob(dtype=dtype)
    layer.setup([bottom], [top])
    layer.forward([bottom], [top])
    top.diff[...] = bottom.data * 3
    layer.backward([top], [True], [bottom])
    np.testing.assert_array_equal(bottom.diff, top.diff)


def test_zero_ratio_is_identity(bottom, dtype):
    layer = dropout_layer(0.0)
    top = Blob(dtype=dtype)
    layer.setup([bottom], [top])
    layer.forward([bottom], [top])
    np.testing.assert_array_equal(top.data, bottom.data)


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1])
def test_bad_ratio(bottom, dtype, ratio):
    with pytest.raises(LayerSetupError, match="Dropout layer 'drop'.*dropout_ratio"):
        dropout_layer(ratio).setup([bottom], [Blob(dtype=dtype)])


def test_backward_before_forward(bottom, dtype):
    layer = dropout_layer()
    top = Blob(dtype=dtype)
    layer.setup([bottom], [top])
    with pytest.raises(RuntimeError, match="mask"):
        layer.backward([top], [True], [bottom])


@requires_numba()
def test_numba_engine_draws_the_same_mask(bottom, dtype):
    results = []
    for engine in ("numpy", "numba"):
        netlite.set_cpu_engine(engine)
        netlite.set_random_seed(42)
        layer = dropout_layer()
        top = Blob(dtype=dtype)
        layer.setup([bottom], [top])
        layer.forward([bottom], [top])
        top.diff[...] = 1
        layer.backward([top], [True], [bottom])
        results.append((top.data.copy(), bottom.diff.copy()))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
