"""Pooling: ports of Caffe's test_pooling_layer.cpp (MAX and AVE, CPU); the
standard tests of the harness over the layer's parameters (with the Numba
parity); then Caffe's output-size examples, ties, NaN, windows past the
data, reshapes and parameter errors."""

import naive
import numpy as np
import pytest
from layer_test_case import LayerTestCase
from layer_testing import filler, make_blob, requires_numba

import netlite
from netlite import Blob, GradientChecker, LayerSetupError, ShapeError
from netlite.layers.pooling import FLT_MAX, PoolingLayer, pooled_size

MAX = netlite.io.netlite_pb2.PoolingParameter.MAX
AVE = netlite.io.netlite_pb2.PoolingParameter.AVE
STOCHASTIC = netlite.io.netlite_pb2.PoolingParameter.STOCHASTIC
FLOOR = netlite.io.netlite_pb2.PoolingParameter.FLOOR

ENGINES = ["numpy", pytest.param("numba", marks=requires_numba())]


def distinct(shape, dtype):
    """Bottom filler for MAX: the values ``(k - count / 2) / 8`` for ``k`` a
    random permutation of ``range(count)``.  No two are closer than 1/8, so
    a finite-difference step (1e-4) never changes a window's argmax, and
    all are exact in float32."""
    count = int(np.prod(shape))
    values = (netlite.rng.get_rng().permutation(count) - count / 2) / 8
    return values.reshape(shape).astype(dtype)


class TestPoolingLayer(LayerTestCase):
    """The standard tests for MAX (distinct values, see :func:`distinct`)
    and AVE: padding, rectangular windows and strides, the mask top, FLOOR
    rounding, global pooling, overlapping windows, the Numba 2x2 fast path
    (with and without overlap) and its overhanging fallback, and AVE
    windows past the data (divisor 1).  MAX windows past the data output
    -FLT_MAX, which would swamp the oracle tolerance's scale: that case is
    :func:`test_windows_past_the_data`.  The forward and contract tests
    run on both engines."""

    shape, pool, kernel, stride, pad = (1, 2, 6, 5), "MAX", (3, 3), (2, 2), (0, 0)
    round_mode, global_pooling = "CEIL", False
    cases = {
        "max_pad": {"pad": (1, 1)},
        "max_rect": {"kernel": (3, 2), "stride": (2, 1), "pad": (1, 1)},
        "max_mask": {"shape": (1, 2, 7, 6), "tops": 2},
        "max_floor": {"shape": (1, 2, 7, 6), "round_mode": "FLOOR"},
        "max_global": {"global_pooling": True},
        "max_overlap": {"kernel": (3, 3), "stride": (1, 1), "pad": (1, 1),
                        "shape": (1, 2, 4, 4)},
        "max_2x2": {"kernel": (2, 2), "stride": (2, 2), "shape": (1, 2, 6, 4)},
        "max_2x2_overlap": {"kernel": (2, 2), "stride": (1, 1),
                            "shape": (1, 2, 4, 3), "tops": 2},
        "max_2x2_overhang": {"kernel": (2, 2), "stride": (2, 2),
                             "shape": (1, 2, 5, 5)},
        "ave": {"pool": "AVE", "shape": (1, 2, 7, 6)},
        "ave_pad": {"pool": "AVE", "kernel": (4, 3), "pad": (2, 2)},
        "ave_overlap": {"pool": "AVE", "stride": (1, 1), "pad": (1, 1),
                        "shape": (1, 2, 4, 4)},
        "ave_global": {"pool": "AVE", "global_pooling": True},
        "ave_past_data": {"pool": "AVE", "kernel": (1, 1), "stride": (3, 3),
                          "shape": (1, 2, 4, 5)},
    }

    @property
    def layer(self):
        fields = [f"pool: {self.pool}", f"round_mode: {self.round_mode}"]
        if self.global_pooling:
            fields.append("global_pooling: true")
        else:
            for name, (h, w) in (("kernel", self.kernel), ("stride", self.stride),
                                 ("pad", self.pad)):
                fields.append(f"{name}_h: {h} {name}_w: {w}" if h != w else
                              f"{'kernel_size' if name == 'kernel' else name}: {h}")
        return f'type: "Pooling" pooling_param {{ {" ".join(fields)} }}'

    @property
    def bottoms(self):
        fill = distinct if self.pool == "MAX" else filler("gaussian")
        return [(self.shape, fill)]

    def oracle(self, bottoms, blobs):
        y, argmax = naive.pooling(bottoms[0], self.pool, self.kernel, self.stride,
                                  self.pad, self.round_mode, self.global_pooling)
        return [y, argmax][:self.tops]

def pool_layer(**fields):
    """A Pooling layer with the given ``pooling_param`` fields."""
    param = netlite.io.LayerParameter(name="pool", type="Pooling")
    for name, value in fields.items():
        setattr(param.pooling_param, name, value)
    return PoolingLayer(param)


@pytest.fixture
def bottom(dtype):
    """Caffe's fixture: (2, 3, 6, 5), Gaussian, seed 1701."""
    return make_blob((2, 3, 6, 5), dtype, filler("gaussian"))


@pytest.fixture(params=ENGINES)
def engine(request):
    netlite.set_cpu_engine(request.param)
    return request.param


# MATLAB's magic(6), used by the rectangular-kernel tests.
MAGIC6 = np.array([
    [35, 1, 6, 26, 19, 24],
    [3, 32, 7, 21, 23, 25],
    [31, 9, 2, 22, 27, 20],
    [8, 28, 33, 17, 10, 15],
    [30, 5, 34, 12, 14, 16],
    [4, 36, 29, 13, 18, 11],
])

# (fields, input plane, expected maxima, expected argmax) for Caffe's
# TestForwardSquare / TestForwardRectHigh / TestForwardRectWide.
FORWARD_MAX_CASES = {
    "square": (
        {"kernel_size": 2},
        np.array([[1, 2, 5, 2, 3], [9, 4, 1, 4, 8], [1, 2, 5, 2, 3]]),
        np.array([[9, 5, 5, 8], [9, 5, 5, 8]]),
        np.array([[5, 2, 2, 9], [5, 12, 12, 9]]),
    ),
    "rect_high": (
        {"kernel_h": 3, "kernel_w": 2},
        MAGIC6,
        np.array([[35, 32, 26, 27, 27], [32, 33, 33, 27, 27],
                  [31, 34, 34, 27, 27], [36, 36, 34, 18, 18]]),
        np.array([[0, 7, 3, 16, 16], [7, 20, 20, 16, 16],
                  [12, 26, 26, 16, 16], [31, 31, 26, 34, 34]]),
    ),
    "rect_wide": (
        {"kernel_h": 2, "kernel_w": 3},
        MAGIC6,
        np.array([[35, 32, 26, 26], [32, 32, 27, 27], [33, 33, 33, 27],
                  [34, 34, 34, 17], [36, 36, 34, 18]]),
        np.array([[0, 7, 3, 3], [7, 7, 16, 16], [20, 20, 20, 16],
                  [26, 26, 26, 21], [31, 31, 26, 34]]),
    ),
}


def run_forward_max(case, dtype, with_mask):
    fields, plane, expected, expected_mask = FORWARD_MAX_CASES[case]
    num, channels = 2, 2
    bottom = make_blob((num, channels) + plane.shape, dtype,
                       np.broadcast_to(plane, (num, channels) + plane.shape))
    top, mask = Blob(dtype=dtype), Blob(dtype=dtype)
    tops = [top, mask] if with_mask else [top]
    layer = pool_layer(pool=MAX, **fields)
    layer.setup([bottom], tops)
    for t in tops:
        assert t.shape == (num, channels) + expected.shape
    layer.forward([bottom], tops)
    np.testing.assert_array_equal(top.data, np.broadcast_to(expected, top.shape))
    if with_mask:
        np.testing.assert_array_equal(
            mask.data, np.broadcast_to(expected_mask, mask.shape)
        )


# ---------------------------------------------------------------- Caffe ports
def test_setup(bottom, dtype):
    top = Blob(dtype=dtype)
    pool_layer(kernel_size=3, stride=2).setup([bottom], [top])
    assert top.shape == (2, 3, 3, 2)


def test_setup_padded(bottom, dtype):
    top = Blob(dtype=dtype)
    pool_layer(kernel_size=3, stride=2, pad=1, pool=AVE).setup([bottom], [top])
    assert top.shape == (2, 3, 4, 3)


def test_setup_global_pooling(bottom, dtype):
    top = Blob(dtype=dtype)
    pool_layer(global_pooling=True, pool=AVE).setup([bottom], [top])
    assert top.shape == (2, 3, 1, 1)


@pytest.mark.parametrize("case", sorted(FORWARD_MAX_CASES))
def test_forward_max(case, dtype, engine):
    run_forward_max(case, dtype, with_mask=False)


@pytest.mark.parametrize("case", sorted(FORWARD_MAX_CASES))
def test_forward_max_top_mask(case, dtype, engine):
    run_forward_max(case, dtype, with_mask=True)


@pytest.mark.parametrize("kernel_h", [3, 4])
@pytest.mark.parametrize("kernel_w", [3, 4])
def test_gradient_max(bottom, dtype, kernel_h, kernel_w):
    layer = pool_layer(kernel_h=kernel_h, kernel_w=kernel_w, stride=2, pad=1,
                       pool=MAX)
    checker = GradientChecker(1e-4, 1e-2)
    checker.check_gradient_exhaustive(layer, [bottom], [Blob(dtype=dtype)])


def test_forward_max_padded(dtype, engine):
    bottom = make_blob((1, 1, 3, 3), dtype, [[[[1, 2, 4], [2, 3, 2], [4, 2, 1]]]])
    top = Blob(dtype=dtype)
    layer = pool_layer(kernel_size=3, stride=2, pad=2, pool=MAX)
    layer.setup([bottom], [top])
    assert top.shape == (1, 1, 3, 3)
    layer.forward([bottom], [top])
    expected = [[1, 4, 4], [4, 4, 4], [4, 4, 1]]
    np.testing.assert_allclose(top.data[0, 0], expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("kernel_h", [3, 4])
@pytest.mark.parametrize("kernel_w", [3, 4])
def test_gradient_max_top_mask(bottom, dtype, kernel_h, kernel_w):
    layer = pool_layer(kernel_h=kernel_h, kernel_w=kernel_w, stride=2, pool=MAX)
    checker = GradientChecker(1e-4, 1e-2)
    checker.check_gradient_exhaustive(
        layer, [bottom], [Blob(dtype=dtype), Blob(dtype=dtype)]
    )


def test_forward_ave(dtype, engine):
    bottom = make_blob((1, 1, 3, 3), dtype, filler("constant", value=2))
    top = Blob(dtype=dtype)
    layer = pool_layer(kernel_size=3, stride=1, pad=1, pool=AVE)
    layer.setup([bottom], [top])
    assert top.shape == (1, 1, 3, 3)
    layer.forward([bottom], [top])
    expected = [[8 / 9, 4 / 3, 8 / 9], [4 / 3, 2, 4 / 3], [8 / 9, 4 / 3, 8 / 9]]
    np.testing.assert_allclose(top.data[0, 0], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kernel_h", [3, 4])
@pytest.mark.parametrize("kernel_w", [3, 4])
def test_gradient_ave(bottom, dtype, kernel_h, kernel_w):
    layer = pool_layer(kernel_h=kernel_h, kernel_w=kernel_w, stride=2, pool=AVE)
    checker = GradientChecker(1e-2, 1e-2)
    checker.check_gradient_exhaustive(layer, [bottom], [Blob(dtype=dtype)])


@pytest.mark.parametrize("kernel_h", [3, 4])
@pytest.mark.parametrize("kernel_w", [3, 4])
def test_gradient_ave_padded(bottom, dtype, kernel_h, kernel_w):
    layer = pool_layer(kernel_h=kernel_h, kernel_w=kernel_w, stride=2, pad=2,
                       pool=AVE)
    checker = GradientChecker(1e-2, 1e-2)
    checker.check_gradient_exhaustive(layer, [bottom], [Blob(dtype=dtype)])


# ------------------------------------------------------ beyond Caffe's tests
@pytest.mark.parametrize(
    ("size", "kernel", "stride", "pad", "mode", "expected"),
    [
        (6, 3, 2, 0, None, 3), (5, 3, 2, 0, None, 2),   # TestSetup
        (6, 3, 2, 1, None, 4), (5, 3, 2, 1, None, 3),   # TestSetupPadded
        (3, 3, 2, 2, None, 3), (3, 3, 1, 1, None, 3),   # the forward tests
        (24, 2, 2, 0, None, 12), (8, 2, 2, 0, None, 4),  # LeNet
        (6, 3, 2, 0, FLOOR, 2), (5, 2, 2, 0, FLOOR, 2), (5, 2, 2, 0, None, 3),
        (5, 2, 2, 1, None, 3),   # CEIL gives 4, but the 4th window would
                                 # start at 3 * 2 - 1 = 5 >= 5: dropped
        (5, 2, 2, 0, None, 3),   # no pad: no such clipping
    ],
)
def test_pooled_size(size, kernel, stride, pad, mode, expected):
    args = () if mode is None else (mode,)
    assert pooled_size(size, kernel, stride, pad, *args) == expected


def test_ties_go_to_first_in_raster_order(dtype, engine):
    bottom = make_blob((1, 2, 4, 4), dtype, filler("constant", value=-3))
    top, mask = Blob(dtype=dtype), Blob(dtype=dtype)
    layer = pool_layer(kernel_size=3, stride=1, pad=1)
    layer.setup([bottom], [top, mask])
    layer.forward([bottom], [top, mask])
    # Each window's first in-image element is its top-left corner clipped
    # to the image.
    rows = np.maximum(np.arange(4) - 1, 0)
    np.testing.assert_array_equal(mask.data[0, 0], rows[:, None] * 4 + rows)
    np.testing.assert_array_equal(top.data, -3)


def test_max_ignores_nan_and_minus_inf(dtype, engine):
    # Caffe's strict "v > running max" from -FLT_MAX skips NaN and -inf.
    plane = [[np.nan, 1.0], [-np.inf, 0.5]]
    bottom = make_blob((1, 1, 2, 2), dtype, [[plane]])
    top, mask = Blob(dtype=dtype), Blob(dtype=dtype)
    layer = pool_layer(kernel_size=2)
    layer.setup([bottom], [top, mask])
    layer.forward([bottom], [top, mask])
    assert top.data.item() == 1.0 and mask.data.item() == 1


def test_max_backward_accumulates_overlaps(dtype, engine):
    # k3 s1: the maximum of a 3x3 plane wins all 4 windows it lies in.
    plane = np.arange(9, dtype=float).reshape(3, 3)
    bottom = make_blob((1, 1, 3, 3), dtype, plane[None, None])
    top = Blob(dtype=dtype)
    layer = pool_layer(kernel_size=2, stride=1)
    layer.setup([bottom], [top])
    layer.forward([bottom], [top])
    top.diff[...] = [[[[1, 2], [3, 4]]]]
    bottom.diff[...] = 99  # must be overwritten
    layer.backward([top], [True], [bottom])
    expected = np.zeros((3, 3))
    expected[1:, 1:] = [[1, 2], [3, 4]]
    np.testing.assert_array_equal(bottom.diff[0, 0], expected)


def test_windows_past_the_data(dtype, engine):
    # stride > kernel with CEIL rounding and no pad: the last window of
    # each axis holds no element (Caffe reads index -1 there).  It outputs
    # -FLT_MAX with mask -1 (MAX) or 0 (AVE) and sends no gradient.
    x = np.arange(1, 17, dtype=float).reshape(1, 1, 4, 4)
    for pool in (MAX, AVE):
        bottom = make_blob(x.shape, dtype, x)
        tops = [Blob(dtype=dtype) for _ in range(2 if pool == MAX else 1)]
        layer = pool_layer(kernel_size=1, stride=2, pool=pool)
        layer.setup([bottom], tops)
        assert tops[0].shape == (1, 1, 3, 3)
        layer.forward([bottom], tops)
        y = tops[0].data[0, 0]
        np.testing.assert_array_equal(y[:2, :2], x[0, 0, ::2, ::2])
        empty = -FLT_MAX if pool == MAX else 0.0
        np.testing.assert_array_equal(y[2, :], empty)
        np.testing.assert_array_equal(y[:, 2], empty)
        if pool == MAX:
            np.testing.assert_array_equal(tops[1].data[0, 0, 2, :], -1)
        tops[0].diff[...] = 1
        layer.backward(tops, [True], [bottom])
        expected = np.zeros((4, 4))
        expected[::2, ::2] = 1
        np.testing.assert_array_equal(bottom.diff[0, 0], expected)


def test_global_pooling_follows_reshape(bottom, dtype):
    top = Blob(dtype=dtype)
    layer = pool_layer(global_pooling=True)
    layer.setup([bottom], [top])
    bottom.reshape(2, 3, 4, 7)
    bottom.data[...] = np.arange(bottom.count).reshape(bottom.shape)
    layer.forward([bottom], [top])
    assert top.shape == (2, 3, 1, 1)
    np.testing.assert_array_equal(top.data[:, :, 0, 0], bottom.data.max(axis=(2, 3)))


def test_mask_top_is_only_for_max(bottom, dtype):
    with pytest.raises(LayerSetupError, match="at most 1 top"):
        pool_layer(kernel_size=2, pool=AVE).setup(
            [bottom], [Blob(dtype=dtype), Blob(dtype=dtype)]
        )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kernel_size": 2, "pool": STOCHASTIC}, "STOCHASTIC"),
        ({}, "kernel_size"),
        ({"kernel_h": 2}, "kernel_size"),
        ({"kernel_size": 2, "kernel_h": 2, "kernel_w": 2}, "kernel_size"),
        ({"global_pooling": True, "kernel_size": 2}, "global_pooling"),
        ({"global_pooling": True, "pad": 1}, "global_pooling"),
        ({"global_pooling": True, "stride": 2}, "global_pooling"),
        ({"kernel_size": 2, "pad": 2}, "smaller than the kernel"),
        ({"kernel_size": 2, "pad_h": 1}, "pad_h and pad_w"),
        ({"kernel_size": 2, "pad": 1, "pad_h": 1, "pad_w": 1}, "pad_h and pad_w"),
        ({"kernel_size": 2, "stride_w": 1}, "stride_h and stride_w"),
        ({"kernel_size": 2, "stride": 0}, "stride must be positive"),
        ({"kernel_h": 0, "kernel_w": 2}, "kernel dimensions"),
    ],
)
def test_bad_parameters(bottom, dtype, fields, message):
    with pytest.raises(LayerSetupError, match=message) as info:
        pool_layer(**fields).setup([bottom], [Blob(dtype=dtype)])
    assert "Pooling layer 'pool'" in str(info.value)


def test_input_must_be_4d(dtype):
    bottom = make_blob((2, 3, 6), dtype, filler("gaussian"))
    with pytest.raises(ShapeError, match="4 axes"):
        pool_layer(kernel_size=2).setup([bottom], [Blob(dtype=dtype)])


def test_floor_mode_without_output(dtype):
    bottom = make_blob((1, 1, 2, 2), dtype, filler("gaussian"))
    with pytest.raises(ShapeError, match="smaller than the kernel"):
        pool_layer(kernel_size=3, round_mode=FLOOR).setup(
            [bottom], [Blob(dtype=dtype)]
        )
