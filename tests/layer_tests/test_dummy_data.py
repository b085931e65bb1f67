"""Tests for the DummyData layer (port of test_dummy_data_layer.cpp).

Caffe's tests compare against exact draws of its own RNG; netlite's global
RNG differs, so the random part checks the semantics instead: constant tops
are filled once and never change, random tops are refilled at every forward
(and are reproducible under a fixed seed).
"""

import naive
import numpy as np
import pytest
from layer_test_case import LayerTestCase
from layer_testing import tolerance

import netlite
from netlite.layers.dummy_data import DummyDataLayer

_LEGACY_FIELDS = ("num", "channels", "height", "width")


class TestDummyDataLayer(LayerTestCase):
    """The standard forward test for the fillers whose values an oracle can
    state: ``constant`` (filled once, at setup) and ``bilinear`` (not
    constant, so refilled at every forward, but deterministic).  Covers
    ``shape`` once and per top (a scalar included), the legacy 4-D fields
    once and per top, and no, one shared or one per-top filler.  No bottoms
    and no backward; the random fillers are tested below."""

    bottoms = []
    has_backward = False
    tops = 3
    shapes = [(2, 3)]
    legacy = {}
    fillers = []
    cases = {
        "zeros": {},
        "shared_constant": {"tops": 2, "fillers": [("constant", 0.1)]},
        "per_top": {"shapes": [(2, 3), (2, 1, 3, 3), ()],
                    "fillers": [("constant", 7.0), ("bilinear",),
                                ("constant", -2.5)]},
        "shared_bilinear": {"tops": 2, "shapes": [(1, 2, 4, 4), (3, 1, 5, 5)],
                            "fillers": [("bilinear",)]},
        # Caffe's TestTwoTopConstant: channels and width given once.
        "legacy": {"tops": 2, "shapes": [],
                   "legacy": {"num": [5, 5], "channels": [3],
                              "height": [2, 1], "width": [4]},
                   "fillers": [("constant", 7.0)]},
    }

    @property
    def layer(self):
        parts = ["shape { " + " ".join(f"dim: {d}" for d in s) + " }"
                 for s in self.shapes]
        for field in _LEGACY_FIELDS:
            parts += [f"{field}: {v}" for v in self.legacy.get(field, ())]
        for kind in self.fillers:
            parts.append(f"data_filler {{ value: {kind[1]} }}" if kind[0] == "constant"
                         else f'data_filler {{ type: "{kind[0]}" }}')
        return f'type: "DummyData" dummy_data_param {{ {" ".join(parts)} }}'

    def oracle(self, bottoms, blobs):
        # A filler's value is a float in the prototxt: float32 in every dtype.
        fillers = [(k[0], float(np.float32(k[1]))) if k[0] == "constant" else k
                   for k in self.fillers]
        return naive.dummy_data(self.tops, self.shapes, fillers, **self.legacy)


def _tops(dtype, n=3):
    return [netlite.Blob(dtype=dtype) for _ in range(n)]


# ----------------------------------------------------------- Caffe's tests
def test_one_top_constant(dtype):
    layer = DummyDataLayer(
        "dummy_data_param { num: 5 channels: 3 height: 2 width: 4 }"
    )
    a, b, c = _tops(dtype)
    layer.setup([], [a])
    assert a.shape == (5, 3, 2, 4)
    assert b.count == 0 and c.count == 0
    assert np.all(a.data == 0)
    layer.forward([], [a])
    assert np.all(a.data == 0)


def test_two_top_constant(dtype):
    # The second top gives num and height only; channels and width are
    # given once and apply to both tops.
    layer = DummyDataLayer(
        """dummy_data_param {
             num: 5 channels: 3 height: 2 width: 4
             num: 5 height: 1
             data_filler { value: 7 } }"""
    )
    a, b, c = _tops(dtype)
    layer.setup([], [a, b])
    assert a.shape == (5, 3, 2, 4)
    assert b.shape == (5, 3, 1, 4)
    assert c.count == 0
    for _ in range(2):
        assert np.all(a.data == 7) and np.all(b.data == 7)
        layer.forward([], [a, b])


def test_three_top_constant_gaussian_constant(dtype):
    layer = DummyDataLayer(
        """dummy_data_param {
             num: 5 channels: 3 height: 2 width: 4
             data_filler { value: 7 }
             data_filler { type: "gaussian" mean: 3.0 std: 0.01 }
             data_filler { value: 9 } }"""
    )
    a, b, c = tops = _tops(dtype)
    layer.setup([], tops)
    for t in tops:
        assert t.shape == (5, 3, 2, 4)
    assert np.all(a.data == 7) and np.all(c.data == 9)
    # The Gaussian top is not filled at setup: it still reads as fresh
    # (zero) memory.
    assert np.all(b.data == 0)
    layer.forward([], tops)
    assert np.all(a.data == 7) and np.all(c.data == 9)
    # 10 sigma: a bound on the draws, not on rounding, so the same in both
    # dtypes.
    np.testing.assert_allclose(b.data, 3.0, rtol=0, atol=0.01 * 10)
    first = b.data.copy()
    layer.forward([], tops)
    assert np.all(a.data == 7) and np.all(c.data == 9)
    np.testing.assert_allclose(b.data, 3.0, rtol=0, atol=0.01 * 10)
    assert b.data.flat[0] != first.flat[0] and b.data.flat[-1] != first.flat[-1]
    # Gaussian draws, not a shifted copy: a sample of 120 has spread.
    assert 0.005 < b.data.std() < 0.02


# ------------------------------------------------------------ beyond Caffe
def test_shared_random_filler_refills_every_top(dtype):
    layer = DummyDataLayer(
        """dummy_data_param { shape { dim: 50 }
                              data_filler { type: "uniform" min: -1 max: 1 } }"""
    )
    a, b = _tops(dtype, 2)
    layer.setup([], [a, b])
    assert np.all(a.data == 0) and np.all(b.data == 0)
    layer.forward([], [a, b])
    assert np.all(np.abs(a.data) <= 1) and np.all(np.abs(b.data) <= 1)
    assert not np.array_equal(a.data, b.data)
    before = a.data.copy(), b.data.copy()
    layer.forward([], [a, b])
    assert not np.any(a.data == before[0]) and not np.any(b.data == before[1])


def test_constant_top_is_not_rewritten(dtype):
    # Filled once at setup: a later write survives forward (Caffe's refill_
    # flag skips constant tops), while random tops are overwritten.
    layer = DummyDataLayer(
        """dummy_data_param { shape { dim: 4 }
                              data_filler { value: 2 }
                              data_filler { type: "gaussian" } }"""
    )
    a, b = _tops(dtype, 2)
    layer.setup([], [a, b])
    a.data[...] = -1.0
    b.data[...] = -1.0
    layer.forward([], [a, b])
    assert np.all(a.data == -1.0)
    assert not np.any(b.data == -1.0)


def test_random_tops_follow_the_global_seed(dtype):
    text = """dummy_data_param { shape { dim: 3 dim: 4 }
                                 data_filler { type: "gaussian" std: 2 } }"""
    runs = []
    for _ in range(2):
        layer, top = DummyDataLayer(text), netlite.Blob(dtype=dtype)
        layer.setup([], [top])
        netlite.set_random_seed(42)
        layer.forward([], [top])
        first = top.data.copy()
        layer.forward([], [top])
        runs.append((first, top.data.copy()))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert not np.array_equal(runs[0][0], runs[0][1])


def test_reshape_keeps_the_declared_shape(dtype):
    layer, top = DummyDataLayer("dummy_data_param { shape { dim: 2 } }"), netlite.Blob(
        dtype=dtype
    )
    layer.setup([], [top])
    top.reshape((5,))
    layer.reshape([], [top])
    assert top.shape == (5,)  # reshape does nothing, as in Caffe
    top.diff[...] = 3.0
    layer.backward([top], [], [])  # no bottoms: nothing to do, nothing touched
    assert np.all(top.data == 0) and np.all(top.diff == 3.0)


@pytest.mark.parametrize(
    "text, match",
    [
        ("shape { dim: 2 } data_filler { } data_filler { }", "data_filler must be"),
        ("shape { dim: 2 } shape { dim: 3 }", "shape must be given once"),
        ("", "shape must be given once"),
        ("num: 1 channels: 1 height: 1 width: 1 shape { dim: 2 }", "not both"),
        ("num: 1 channels: 1 height: 1", "'width' must be given"),
        ("num: 1 num: 2 channels: 1 height: 1 width: 1", "'num' must be given"),
        ("shape { dim: 2 } data_filler { type: 'nope' }", "unknown filler"),
        ("shape { dim: -2 }", "bad shape"),
    ],
)
def test_parameter_errors(dtype, text, match):
    layer = DummyDataLayer(f"dummy_data_param {{ {text} }}")
    with pytest.raises(netlite.LayerSetupError, match="DummyData.*" + match):
        layer.setup([], _tops(dtype))


def test_blob_counts(dtype):
    layer = DummyDataLayer("dummy_data_param { shape { dim: 2 } }")
    with pytest.raises(netlite.LayerSetupError, match="at least 1 top"):
        layer.setup([], [])
    with pytest.raises(netlite.LayerSetupError, match="exactly 0 bottom"):
        layer.setup([netlite.Blob(dtype=dtype)], _tops(dtype, 1))


def test_in_a_net(dtype):
    net = netlite.Net(
        """
        layer { name: "data" type: "DummyData" top: "x" top: "t"
                dummy_data_param { shape { dim: 4 dim: 3 }
                                   data_filler { type: "gaussian" }
                                   data_filler { value: 0.5 } } }
        layer { name: "loss" type: "EuclideanLoss" bottom: "x" bottom: "t"
                top: "loss" }
        """,
        dtype=dtype,
    )
    losses = []
    for _ in range(2):
        net.forward()
        x, t = net.blobs["x"].data, net.blobs["t"].data
        assert np.all(t == 0.5)
        tol = tolerance("oracle", dtype)
        expected = np.sum((x.astype(np.float64) - t) ** 2) / 8
        assert net.loss == pytest.approx(expected, rel=tol["rtol"], abs=tol["atol"])
        losses.append(net.loss)
    assert losses[0] != losses[1]
