"""Tests for the Input layer (Caffe has no dedicated test file)."""

import numpy as np
import pytest

import netlite
from netlite.layers.input import InputLayer


def _tops(dtype, n):
    return [netlite.Blob(dtype=dtype) for _ in range(n)]


def test_one_shape_for_every_top(dtype):
    layer = InputLayer("input_param { shape { dim: 2 dim: 3 dim: 4 } }")
    tops = _tops(dtype, 3)
    layer.setup([], tops)
    assert [t.shape for t in tops] == [(2, 3, 4)] * 3
    assert all(t.dtype == dtype and np.all(t.data == 0) for t in tops)


def test_one_shape_per_top(dtype):
    layer = InputLayer(
        "input_param { shape { dim: 64 dim: 1 dim: 28 dim: 28 } shape { dim: 64 } }"
    )
    data, label = tops = _tops(dtype, 2)
    layer.setup([], tops)
    assert data.shape == (64, 1, 28, 28) and label.shape == (64,)


def test_no_shape_leaves_tops_to_the_caller(dtype):
    layer = InputLayer()
    tops = _tops(dtype, 2)
    tops[1].reshape((5, 2))
    layer.setup([], tops)
    assert tops[0].count == 0
    assert tops[1].shape == (5, 2)


def test_forward_backward_and_reshape_touch_nothing(dtype):
    layer = InputLayer("input_param { shape { dim: 2 dim: 3 } }")
    (top,) = tops = _tops(dtype, 1)
    layer.setup([], tops)
    top.data = np.arange(6.0).reshape(2, 3)
    top.diff[...] = 4.0
    assert layer.forward([], tops) == 0.0
    layer.backward(tops, [], [])
    np.testing.assert_array_equal(top.data, np.arange(6.0).reshape(2, 3))
    assert np.all(top.diff == 4.0)
    # The caller owns the shape: a reshape by the caller is kept.
    top.reshape((7, 3))
    layer.reshape([], tops)
    layer.forward([], tops)
    assert top.shape == (7, 3)


@pytest.mark.parametrize(
    "text, n_tops, match",
    [
        ("input_param { shape { dim: 1 } shape { dim: 2 } }", 3, "0, 1 or 3"),
        ("input_param { shape { dim: 2 dim: -1 } }", 1, "bad input_param.shape"),
    ],
)
def test_parameter_errors(dtype, text, n_tops, match):
    with pytest.raises(netlite.LayerSetupError, match="Input.*" + match):
        InputLayer(text).setup([], _tops(dtype, n_tops))


def test_blob_counts(dtype):
    with pytest.raises(netlite.LayerSetupError, match="at least 1 top"):
        InputLayer().setup([], [])
    with pytest.raises(netlite.LayerSetupError, match="exactly 0 bottom"):
        InputLayer().setup(_tops(dtype, 1), _tops(dtype, 1))


def test_in_a_net(dtype):
    net = netlite.Net(
        """
        force_backward: true
        layer { name: "in" type: "Input" top: "data" top: "target"
                input_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 3 } } }
        layer { name: "loss" type: "EuclideanLoss" bottom: "data"
                bottom: "target" top: "loss" }
        """,
        dtype=dtype,
    )
    assert net.inputs == ["data", "target"]
    assert net.blobs["data"].shape == (2, 3)
    gen = netlite.rng.get_rng()
    x, t = gen.standard_normal((5, 3)), gen.standard_normal((5, 3))
    net.forward(data=x, target=t)  # a new batch size reshapes the inputs
    assert net.blobs["data"].shape == (5, 3)
    assert net.loss == pytest.approx(np.sum((x - t) ** 2) / 10, rel=1e-5)
    diffs = net.backward()
    np.testing.assert_allclose(diffs["data"], (x - t) / 5, rtol=1e-5, atol=1e-7)


def test_legacy_net_inputs_become_an_input_layer(dtype):
    net = netlite.Net(
        """
        input: "data"
        input_shape { dim: 3 dim: 4 }
        layer { name: "relu" type: "ReLU" bottom: "data" top: "out" }
        """,
        dtype=dtype,
    )
    assert net.layer_names[0] == "input"
    assert isinstance(net.layers[0], InputLayer)
    assert net.inputs == ["data"] and net.blobs["data"].shape == (3, 4)
    out = net.forward(data=-np.ones((3, 4)))["out"]
    assert out.shape == (3, 4) and np.all(out == 0)
