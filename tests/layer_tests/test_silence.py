"""Tests for the Silence layer (Caffe has no test file for it)."""

import numpy as np
import pytest
from layer_testing import filler, make_blob

import netlite
from netlite.layers.silence import SilenceLayer


@pytest.fixture
def bottoms(dtype):
    return [
        make_blob((2, 3, 4, 5), dtype, filler("gaussian")),
        make_blob((7,), dtype, filler("gaussian")),
        make_blob((), dtype, 1.5),
    ]


def test_setup_and_forward_leave_bottoms_alone(bottoms):
    layer = SilenceLayer()
    before = [(b.shape, b.data.copy()) for b in bottoms]
    layer.setup(bottoms, [])
    assert layer.forward(bottoms, []) == 0.0
    for b, (shape, data) in zip(bottoms, before):
        assert b.shape == shape
        np.testing.assert_array_equal(b.data, data)


def test_backward_zeroes_requested_diffs_only(bottoms):
    layer = SilenceLayer()
    layer.setup(bottoms, [])
    layer.forward(bottoms, [])
    for b in bottoms:
        b.diff[...] = 3.0
    layer.backward([], [True, False, True], bottoms)
    assert np.all(bottoms[0].diff == 0)
    assert np.all(bottoms[1].diff == 3.0)
    assert np.all(bottoms[2].diff == 0)


def test_single_bottom(dtype):
    x = make_blob((4,), dtype, filler("gaussian"))
    layer = SilenceLayer()
    layer.setup([x], [])
    x.diff[...] = 1.0
    layer.backward([], [True], [x])
    assert np.all(x.diff == 0)


def test_blob_counts(bottoms, dtype):
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
    np.testing.assert_allclose(net.blobs["x"].diff, (x - t) / 2, rtol=1e-5, atol=1e-7)
    # Without force_backward nothing needs the label's gradient.
    net = netlite.Net(text.replace("force_backward: true", ""), dtype=dtype)
    assert not net.layer_need_backward[net.layer_index("mute")]
