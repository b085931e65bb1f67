"""Tests for the Input layer (Caffe has no dedicated test file)."""

import naive
import numpy as np
import pytest
from layer_test_case import LayerTestCase
from layer_testing import assert_close, make_blob, tolerance

import netlite
from netlite.layers.input import InputLayer


class TestInputLayer(LayerTestCase):
    """The standard forward test of a source layer: after setup and a
    forward the tops have the declared shapes (one for every top, or one
    per top) and hold the zeros setup allocated, or, without input_param,
    exactly what the caller put there.  No bottoms and no backward, so the
    gradient, propagate_down and diff tests do not apply."""

    bottoms = []
    has_backward = False
    tops = 3
    shapes = [(2, 3, 4)]
    fed = None
    cases = {
        "one_shape": {},
        "per_top": {"tops": 2, "shapes": [(64, 1, 28, 28), (64,)]},
        # No input_param: the tops keep what the caller shaped and wrote
        # (before setup here, where the harness lets a caller act).
        "caller": {"tops": 2, "shapes": [],
                   "fed": [[[1.5, -2.0, 0.25], [3.0, 4.0, -0.5]], [7.0, -1.0]]},
    }

    @property
    def layer(self):
        shapes = " ".join(
            "shape { " + " ".join(f"dim: {d}" for d in s) + " }" for s in self.shapes
        )
        return f'type: "Input" input_param {{ {shapes} }}'

    def applies(self, test_name, case):
        # The engine-parity test builds fresh tops (layer_testing.run_engine),
        # so nothing the caller fed would reach it: it would compare two
        # empty tops.
        if test_name == "test_engine_parity_cupy" and type(self).cases[case].get(
                "fed"):
            return False
        return super().applies(test_name, case)

    def make_tops(self, dtype):
        if self.fed is None:
            return super().make_tops(dtype)
        return [make_blob(np.shape(a), dtype, a) for a in self.fed]

    def oracle(self, bottoms, blobs):
        return naive.input_tops(self.tops, self.shapes, self.fed)


def _tops(dtype, n):
    return [netlite.Blob(dtype=dtype) for _ in range(n)]


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
    # float64 expectations from the float64 draws: the float32 net sees them
    # rounded, which the oracle tolerance of its dtype covers.
    tol = tolerance("oracle", dtype)
    assert net.loss == pytest.approx(np.sum((x - t) ** 2) / 10, rel=tol["rtol"],
                                     abs=tol["atol"])
    diffs = net.backward()
    assert_close(diffs["data"], (x - t) / 5, "oracle", dtype, "d loss / d data")


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
