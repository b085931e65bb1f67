"""Tests for the Silence layer (Caffe has no test file for it)."""

import numpy as np
import pytest
from layer_test_case import LayerTestCase
from layer_testing import assert_close, filler, make_blob

import netlite
from netlite.layers.silence import SilenceLayer


class TestSilenceLayer(LayerTestCase):
    """The standard tests for one and for several bottoms (a scalar among
    them).  The layer has no top, so the objective of a gradient check
    cannot depend on the bottoms: the two harness tests that need a top, or
    a non-zero gradient, are replaced below."""

    layer = 'type: "Silence"'
    tops = 0
    bottoms = [((2, 3, 4, 5), filler("gaussian")), ((7,), filler("gaussian")),
               ((), np.array(1.5))]
    cases = {"three": {}, "one": {"bottoms": [((4,), filler("gaussian"))]}}

    def oracle(self, bottoms, blobs):
        return []

    def test_gradient(self, case):
        # Replaces the harness's: the finite-difference checker needs a top.
        # With none, the objective is constant, so every bottom's gradient
        # is exactly 0.
        layer, bottom, top, _ = self.setup(case, np.float64)
        for b in bottom:
            b.diff[...] = np.nan
        dx, _ = self.backward(layer, bottom, top)
        for i, d in enumerate(dx):
            np.testing.assert_array_equal(d, 0, f"bottom[{i}]")

    def test_bottom_diffs_overwritten(self, case, dtype):
        # Replaces the harness's, which needs a non-zero clean gradient:
        # here the clean one is 0, and garbage must become 0 too.
        layer, bottom, top, _ = self.setup(case, dtype)
        for b in bottom:
            b.diff[...] = 1e3
        dirty, _ = self.backward(layer, bottom, top)
        for i, d in enumerate(dirty):
            np.testing.assert_array_equal(d, 0, f"bottom[{i}]")


def test_blob_counts(dtype):
    bottoms = [make_blob((2, 3), dtype, filler("gaussian"))]
    with pytest.raises(netlite.LayerSetupError, match="Silence.*at least 1 bottom"):
        SilenceLayer().setup([], [])
    with pytest.raises(netlite.LayerSetupError, match="Silence.*exactly 0 top"):
        SilenceLayer().setup(bottoms, [netlite.Blob(dtype=dtype)])


def test_in_a_net(dtype):
    # The silenced label is not an output; with force_backward its gradient
    # is 0, while the data input gets the loss gradient.
    text = """
        force_backward: true
        layer { name: "in" type: "Input" top: "x" top: "t" top: "label"
                input_param { shape { dim: 2 dim: 3 } } }
        layer { name: "mute" type: "Silence" bottom: "label" }
        layer { name: "loss" type: "EuclideanLoss" bottom: "x" bottom: "t"
                top: "loss" }
    """
    net = netlite.Net(text, dtype=dtype)
    assert net.outputs == ["loss"]
    gen = netlite.rng.get_rng()
    x, t = gen.standard_normal((2, 3)), gen.standard_normal((2, 3))
    net.forward(x=x, t=t, label=np.ones((2, 3)))
    net.blobs["label"].diff[...] = 9.0
    net.backward()
    assert np.all(net.blobs["label"].diff == 0)
    # EuclideanLoss: dE/dx = (x - t) / N, against its float64 value.
    assert_close(net.blobs["x"].diff, (x - t) / 2, "oracle", dtype)
    # Without force_backward nothing needs the label's gradient.
    net = netlite.Net(text.replace("force_backward: true", ""), dtype=dtype)
    assert not net.layer_need_backward[net.layer_index("mute")]
