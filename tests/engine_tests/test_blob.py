"""Blob: port of Caffe's test_blob.cpp plus the semantics netlite relies on.

Caffe's tests (BlobSimpleTest, BlobMathTest) run for float and double; the
additions pin down the memory model (grow-only capacity, zero-filled fresh
memory, aliasing) that layers, weight sharing and Split depend on.
"""

import numpy as np
import pytest

from netlite import Blob, fillers
from netlite.io import BlobProto, FillerParameter


def _uniform(blob, lo=-3.0, hi=3.0):
    fillers.get_filler(FillerParameter(type="uniform", min=lo, max=hi)).fill(blob)


# ---------------------------------------------------------------- Caffe tests
def test_initialization(dtype):
    blob = Blob(dtype=dtype)
    preshaped = Blob((2, 3, 4, 5), dtype=dtype)
    assert (preshaped.num, preshaped.channels) == (2, 3)
    assert (preshaped.height, preshaped.width) == (4, 5)
    assert preshaped.count == 120
    assert blob.num_axes == 0
    assert blob.count == 0


def test_pointers(dtype):
    # Caffe's TestPointersCPUGPU: the buffers exist and are writable.
    blob = Blob((2, 3, 4, 5), dtype=dtype)
    assert isinstance(blob.data, np.ndarray) and blob.data.dtype == dtype
    assert isinstance(blob.diff, np.ndarray) and blob.diff.dtype == dtype
    assert blob.data.flags.writeable and blob.diff.flags.writeable
    assert blob.device == "cpu" and blob.xp is np


def test_reshape(dtype):
    blob = Blob(dtype=dtype)
    blob.reshape(2, 3, 4, 5)
    assert blob.shape == (2, 3, 4, 5)
    assert (blob.num, blob.channels, blob.height, blob.width) == (2, 3, 4, 5)
    assert blob.count == 120


def test_reshape_zero(dtype):
    blob = Blob(dtype=dtype)
    blob.reshape([0, 5])
    assert blob.count == 0
    assert blob.data.shape == (0, 5)


def test_legacy_blob_proto_shape_equals(dtype):
    blob = Blob((3, 2), dtype=dtype)

    def legacy(n, c, h, w):
        return BlobProto(num=n, channels=c, height=h, width=w)

    # (3 x 2) == (1 x 1 x 3 x 2) legacy, but not (0|3 x 1 x 3 x 2).
    assert blob.shape_equals_proto_shape(legacy(1, 1, 3, 2))
    assert not blob.shape_equals_proto_shape(legacy(0, 1, 3, 2))
    assert not blob.shape_equals_proto_shape(legacy(3, 1, 3, 2))
    blob.reshape(1, 3, 2)
    assert blob.shape_equals_proto_shape(legacy(1, 1, 3, 2))
    blob.reshape(2, 3, 2)
    assert not blob.shape_equals_proto_shape(legacy(1, 1, 3, 2))


def test_shape_equals_new_style_proto_is_exact(dtype):
    blob = Blob((3, 2), dtype=dtype)
    proto = BlobProto()
    proto.shape.dim.extend([3, 2])
    assert blob.shape_equals_proto_shape(proto)
    proto.shape.dim[:] = [1, 1, 3, 2]
    # Only the legacy fields get the "last four axes" treatment.
    assert not blob.shape_equals_proto_shape(proto)


def test_sum_of_squares(dtype):
    blob = Blob((2, 3, 4, 5), dtype=dtype)
    assert blob.sumsq_data() == 0 and blob.sumsq_diff() == 0
    _uniform(blob)
    expected = float(np.sum(blob.data.astype(np.float64) ** 2))
    assert blob.sumsq_data() == pytest.approx(expected, rel=1e-6)
    assert blob.sumsq_diff() == 0
    blob.diff[...] = 7 * blob.data
    assert blob.sumsq_data() == pytest.approx(expected, rel=1e-6)
    assert blob.sumsq_diff() == pytest.approx(expected * 49, rel=1e-6)


def test_asum(dtype):
    blob = Blob((2, 3, 4, 5), dtype=dtype)
    assert blob.asum_data() == 0 and blob.asum_diff() == 0
    _uniform(blob)
    expected = float(np.abs(blob.data.astype(np.float64)).sum())
    assert blob.asum_data() == pytest.approx(expected, rel=1e-6)
    assert blob.asum_diff() == 0
    blob.diff[...] = 7 * blob.data
    assert blob.asum_diff() == pytest.approx(expected * 7, rel=1e-6)


def test_scale_data_and_diff(dtype):
    blob = Blob((2, 3, 4, 5), dtype=dtype)
    _uniform(blob)
    before = blob.asum_data()
    blob.scale_data(3)
    assert blob.asum_data() == pytest.approx(before * 3, rel=1e-6)
    assert blob.asum_diff() == 0
    blob.diff[...] = 7 * blob.data
    blob.scale_diff(3)
    assert blob.asum_data() == pytest.approx(before * 3, rel=1e-6)
    assert blob.asum_diff() == pytest.approx(before * 3 * 7 * 3, rel=1e-6)
    assert blob.data.dtype == dtype and blob.diff.dtype == dtype


# ------------------------------------------------------------- shape rules
def test_default_blob_has_empty_views(dtype):
    blob = Blob(dtype=dtype)
    assert blob.shape == () and blob.count == 0 and blob.capacity == 0
    assert blob.data.size == 0 and blob.diff.size == 0


def test_scalar_blob_has_count_one(dtype):
    blob = Blob((), dtype=dtype)
    assert blob.num_axes == 0 and blob.count == 1
    assert blob.data.shape == ()
    blob.data = 2.5
    assert float(blob.data) == 2.5
    # A scalar reads as 1 x 1 x 1 x 1 through the legacy accessors.
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 1, 1, 1)
    assert Blob(dtype=dtype).reshape([]).count == 1


def test_reshape_accepts_several_spellings(dtype):
    shapes = [Blob(dtype=dtype).reshape(s).shape
              for s in ((2, 3), [2, 3], np.array([2, 3]))]
    assert shapes == [(2, 3)] * 3
    assert Blob(dtype=dtype).reshape(2, 3).shape == (2, 3)
    assert Blob(7, dtype=dtype).shape == (7,)
    proto = BlobProto()
    proto.shape.dim.extend([4, 1, 2])
    assert Blob(proto.shape, dtype=dtype).shape == (4, 1, 2)
    assert Blob(dtype=dtype).reshape_like(Blob((5, 6))).shape == (5, 6)


@pytest.mark.parametrize("shape", [(2, -1), (-3,)])
def test_negative_dimension_rejected(shape):
    with pytest.raises(ValueError, match="negative"):
        Blob(shape)


def test_too_many_axes_rejected():
    Blob((1,) * 32)
    with pytest.raises(ValueError, match="at most 32"):
        Blob((1,) * 33)


def test_count_over_int_max_rejected():
    with pytest.raises(ValueError, match="INT_MAX"):
        Blob((2**16, 2**16))


def test_legacy_accessors_pad_with_ones():
    blob = Blob((6, 7))
    assert (blob.num, blob.channels, blob.height, blob.width) == (6, 7, 1, 1)
    assert blob.legacy_shape(-1) == 7 and blob.legacy_shape(-3) == 1
    with pytest.raises(IndexError):
        blob.legacy_shape(4)
    with pytest.raises(IndexError):
        blob.legacy_shape(-5)
    with pytest.raises(ValueError, match="at most 4 axes"):
        _ = Blob((1, 2, 3, 4, 5)).num


def test_canonical_axis_index():
    blob = Blob((2, 3, 4))
    assert [blob.canonical_axis_index(a) for a in (0, 1, 2)] == [0, 1, 2]
    assert [blob.canonical_axis_index(a) for a in (-1, -2, -3)] == [2, 1, 0]
    for bad in (3, -4, 10):
        with pytest.raises(IndexError, match=f"axis {bad} out of range"):
            blob.canonical_axis_index(bad)
    with pytest.raises(IndexError):
        Blob(()).canonical_axis_index(0)


def test_count_range():
    blob = Blob((2, 3, 4, 5))
    assert blob.count_range(0) == 120
    assert blob.count_range(1) == 60
    assert blob.count_range(1, 3) == 12
    assert blob.count_range(2, 2) == 1
    assert blob.count_range(4, 4) == 1
    for start, end in ((3, 2), (-1, 2), (0, 5)):
        with pytest.raises(IndexError):
            blob.count_range(start, end)


def test_shape_string():
    assert Blob((2, 3, 4)).shape_string() == "2 3 4 (24)"
    assert Blob(()).shape_string() == " (1)"


# ------------------------------------------------------------ memory model
def test_capacity_grows_only_and_keeps_contents(dtype):
    blob = Blob((2, 3), dtype=dtype)
    blob.data = np.arange(6).reshape(2, 3)
    blob.diff = -np.arange(6).reshape(2, 3)
    buffer = blob.flat_data.base
    blob.reshape(4)
    assert blob.capacity == 6 and blob.count == 4
    np.testing.assert_array_equal(blob.data, [0, 1, 2, 3])
    np.testing.assert_array_equal(blob.diff, [0, -1, -2, -3])
    # Regrowing within the capacity keeps the old contents (not cleared).
    blob.reshape(3, 2)
    np.testing.assert_array_equal(blob.data.ravel(), np.arange(6))
    np.testing.assert_array_equal(blob.diff.ravel(), -np.arange(6))
    assert blob.capacity == 6
    assert buffer is not None and blob.flat_data.base is buffer


def test_growing_reallocates_zero_filled(dtype):
    blob = Blob((2, 3), dtype=dtype)
    blob.data[...] = 5
    blob.diff[...] = 6
    blob.reshape(3, 4)
    assert blob.capacity == 12
    np.testing.assert_array_equal(blob.data, np.zeros((3, 4)))
    np.testing.assert_array_equal(blob.diff, np.zeros((3, 4)))


def test_new_blob_is_zero(dtype):
    blob = Blob((3, 5), dtype=dtype)
    assert not blob.data.any() and not blob.diff.any()


def test_data_view_writes_through(dtype):
    blob = Blob((2, 2), dtype=dtype)
    view = blob.data
    view[1, 1] = 4
    assert blob.flat_data[3] == 4
    blob.flat_diff[0] = 9
    assert blob.diff[0, 0] == 9


def test_assignment_copies_into_the_buffer(dtype):
    blob = Blob((2, 3), dtype=dtype)
    alias = Blob((3, 2), dtype=dtype)
    alias.share_data(blob)
    source = np.ones((2, 3))
    blob.data = source
    source[...] = 7  # the blob holds a copy, not the caller's array
    np.testing.assert_array_equal(blob.data, np.ones((2, 3)))
    # The buffer object is unchanged, so the alias sees the write.
    np.testing.assert_array_equal(alias.data, np.ones((3, 2)))
    assert blob.data.dtype == dtype
    blob.diff = 3.0  # a scalar broadcasts
    np.testing.assert_array_equal(blob.diff, np.full((2, 3), 3.0))


def test_assignment_of_wrong_shape_rejected():
    blob = Blob((2, 3))
    with pytest.raises(ValueError, match=r"shape \(3, 2\).*reshape the blob"):
        blob.data = np.zeros((3, 2))
    with pytest.raises(ValueError):
        blob.diff = np.zeros(6)


def test_share_data_and_diff_alias(dtype):
    a = Blob((2, 3), dtype=dtype)
    b = Blob((6,), dtype=dtype)
    b.share_data(a)
    assert b.shares_data_with(a) and not b.shares_diff_with(a)
    a.data[0, 1] = 5
    assert b.data[1] == 5
    b.data[5] = -1
    assert a.data[1, 2] == -1
    b.share_diff(a)
    b.diff[...] = 2
    np.testing.assert_array_equal(a.diff, np.full((2, 3), 2.0))


def test_share_requires_equal_count_and_dtype():
    with pytest.raises(ValueError, match="counts differ"):
        Blob((2, 3)).share_data(Blob((5,)))
    with pytest.raises(TypeError, match="dtype"):
        Blob((2,), dtype=np.float32).share_diff(Blob((2,), dtype=np.float64))


def test_reallocation_breaks_sharing(dtype):
    a = Blob((2, 3), dtype=dtype)
    b = Blob((2, 3), dtype=dtype)
    b.share_data(a)
    b.share_diff(a)
    b.reshape(1, 6)  # within capacity: still aliased
    assert b.shares_data_with(a) and b.shares_diff_with(a)
    b.reshape(4, 4)  # grows: fresh (zeroed) memory, alias broken
    assert not b.shares_data_with(a) and not b.shares_diff_with(a)
    a.data[...] = 1
    assert not b.data.any()
    # The original keeps its own buffer when it is the one that grows.
    c = Blob((2, 3), dtype=dtype)
    c.share_data(a)
    a.reshape(10)
    a.data[...] = 3
    np.testing.assert_array_equal(c.data, np.ones((2, 3)))


def test_update(dtype):
    blob = Blob((2, 3), dtype=dtype)
    blob.data = np.arange(6).reshape(2, 3)
    blob.diff = np.full((2, 3), 0.5)
    blob.update()
    np.testing.assert_allclose(blob.data, np.arange(6).reshape(2, 3) - 0.5)
    np.testing.assert_array_equal(blob.diff, np.full((2, 3), 0.5))


def test_update_moves_every_alias(dtype):
    owner = Blob((4,), dtype=dtype)
    sharer = Blob((2, 2), dtype=dtype)
    sharer.share_data(owner)
    sharer.share_diff(owner)
    owner.data = [1, 2, 3, 4]
    sharer.diff[...] = 1
    owner.update()
    np.testing.assert_array_equal(sharer.data.ravel(), [0, 1, 2, 3])


# ------------------------------------------------------------------ dtypes
def test_dtypes_are_kept(dtype):
    blob = Blob((3,), dtype=dtype)
    assert blob.dtype == dtype
    blob.data = np.array([1, 2, 3], dtype=np.int64)
    assert blob.data.dtype == dtype and blob.diff.dtype == dtype
    blob.reshape(10)
    assert blob.data.dtype == dtype


@pytest.mark.parametrize("bad", [np.int32, np.int64, np.float16, np.complex64,
                                 bool, np.uint8])
def test_non_float_dtypes_rejected(bad):
    with pytest.raises(TypeError, match="float32 or float64"):
        Blob((2,), dtype=bad)


# ---------------------------------------------------------- copy and proto
def test_copy_from(dtype):
    src = Blob((2, 3), dtype=dtype)
    _uniform(src)
    src.diff = -src.data
    dst = Blob((2, 3), dtype=dtype)
    dst.copy_from(src)
    np.testing.assert_array_equal(dst.data, src.data)
    assert not dst.diff.any()
    dst.copy_from(src, copy_diff=True)
    np.testing.assert_array_equal(dst.diff, src.diff)
    other = Blob((6,), dtype=dtype)
    with pytest.raises(ValueError, match="reshape=True"):
        other.copy_from(src)
    other.copy_from(src, reshape=True)
    assert other.shape == (2, 3)
    np.testing.assert_array_equal(other.data, src.data)


def test_proto_round_trip(dtype):
    blob = Blob((2, 3, 4), dtype=dtype)
    _uniform(blob)
    blob.diff = 2 * blob.data
    proto = blob.to_proto(write_diff=True)
    assert list(proto.shape.dim) == [2, 3, 4]
    if dtype == np.float64:
        assert len(proto.double_data) == 24 and len(proto.data) == 0
    else:
        assert len(proto.data) == 24 and len(proto.double_data) == 0
    # Through the wire format and back.
    restored = Blob(dtype=dtype).from_proto(
        BlobProto.FromString(proto.SerializeToString())
    )
    assert restored.shape == (2, 3, 4)
    np.testing.assert_array_equal(restored.data, blob.data)
    np.testing.assert_array_equal(restored.diff, blob.diff)
    # Without write_diff, the diff is not stored.
    assert not Blob(dtype=dtype).from_proto(blob.to_proto()).diff.any()


def test_scalar_proto_round_trip():
    blob = Blob(())
    blob.data = 3.0
    restored = Blob().from_proto(blob.to_proto())
    assert restored.shape == () and float(restored.data) == 3.0


def test_from_legacy_4d_proto(dtype):
    proto = BlobProto(num=1, channels=2, height=1, width=3)
    proto.data.extend([1, 2, 3, 4, 5, 6])
    blob = Blob(dtype=dtype).from_proto(proto)
    assert blob.shape == (1, 2, 1, 3)
    np.testing.assert_array_equal(blob.data.ravel(), np.arange(1, 7))
    # reshape=False accepts a (2, 3) blob: legacy dims match its last axes.
    target = Blob((2, 3), dtype=dtype)
    target.from_proto(BlobProto(num=1, channels=1, height=2, width=3,
                                data=[6, 5, 4, 3, 2, 1]), reshape=False)
    np.testing.assert_array_equal(target.data, [[6, 5, 4], [3, 2, 1]])


def test_from_proto_prefers_double_data():
    proto = BlobProto(data=[1, 2], double_data=[0.25, 0.5])
    proto.shape.dim.append(2)
    np.testing.assert_array_equal(Blob(dtype=np.float64).from_proto(proto).data,
                                  [0.25, 0.5])


def test_from_proto_errors():
    proto = BlobProto(data=[1, 2, 3])
    proto.shape.dim.extend([2, 2])
    with pytest.raises(ValueError, match="3 values, blob has 4"):
        Blob().from_proto(proto)
    good = BlobProto(data=[1, 2, 3, 4])
    good.shape.dim.extend([2, 2])
    with pytest.raises(ValueError, match="does not match"):
        Blob((4,)).from_proto(good, reshape=False)


def test_repr():
    assert repr(Blob((2,), dtype=np.float64)) == (
        "Blob(shape=(2,), dtype=float64, device='cpu')"
    )
