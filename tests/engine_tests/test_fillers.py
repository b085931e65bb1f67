"""Fillers: port of Caffe's test_filler.cpp (TestDtypes) plus what it missed.

Upstream's Xavier test compares the sample standard deviation with
sqrt(2/n), although Caffe's Xavier draws from U(-sqrt(3/n), +sqrt(3/n)),
whose standard deviation is sqrt(1/n); it only passes because its absolute
tolerance (0.1) is larger than the difference.  Here every statistical check
uses a relative tolerance small enough to tell sqrt(1/n) from sqrt(2/n).
"""

import math

import numpy as np
import pytest

import netlite
from netlite import Blob, fillers
from netlite.errors import LayerSetupError
from netlite.io import FillerParameter

SHAPES = [(2, 3, 4, 5), (15,), (8, 3), (2, 3, 4, 5, 2)]
FAN_IN = FillerParameter.FAN_IN
FAN_OUT = FillerParameter.FAN_OUT
AVERAGE = FillerParameter.AVERAGE


def _fill(shape, dtype, **fields):
    blob = Blob(shape, dtype=dtype)
    fillers.get_filler(FillerParameter(**fields)).fill(blob)
    return blob


# ------------------------------------------------------------------ constant
@pytest.mark.parametrize("shape", SHAPES)
def test_constant(shape, dtype):
    blob = _fill(shape, dtype, type="constant", value=10)
    assert blob.data.dtype == dtype
    assert np.all(blob.data == 10)


def test_missing_filler_is_constant_zero(dtype):
    blob = Blob((3, 4), dtype=dtype)
    blob.data[...] = 5
    fillers.get_filler(None).fill(blob)
    assert not blob.data.any()
    assert FillerParameter().type == "constant"


# ------------------------------------------------------------------- uniform
@pytest.mark.parametrize("shape", SHAPES)
def test_uniform(shape, dtype):
    blob = _fill(shape, dtype, type="uniform", min=1, max=2)
    assert np.all(blob.data >= 1) and np.all(blob.data <= 2)
    assert len(np.unique(blob.data)) > blob.count // 2  # really random


def test_uniform_min_above_max_rejected():
    with pytest.raises(LayerSetupError, match="min 3.0 > max 1.0"):
        _fill((3,), np.float32, type="uniform", min=3, max=1)


# --------------------------------------------------------- positive_unitball
@pytest.mark.parametrize("shape", SHAPES)
def test_positive_unitball(shape, dtype):
    blob = _fill(shape, dtype, type="positive_unitball")
    data = blob.data
    assert np.all(data >= 0) and np.all(data <= 1)
    rows = data.reshape(shape[0], -1).sum(axis=1)
    np.testing.assert_allclose(rows, 1.0, atol=1e-3)
    # Caffe's check is 1 +- 0.001; the rows are in fact exact to rounding.
    np.testing.assert_allclose(rows, 1.0, rtol=1e-5 if dtype == np.float32 else 1e-12)


# --------------------------------------------------------- gaussian_unitball
@pytest.mark.parametrize("shape", SHAPES + [(3,)])
def test_gaussian_unitball_rows_are_unit_vectors(shape, dtype):
    # happynear's filler: each of the shape[0] rows (count / shape[0]
    # values) has L2 norm 1 (1 - 1e-12 / (2 |row|^2) in exact arithmetic;
    # a 1-D blob has rows of one value, +-1, where |row| may be small).
    blob = _fill(shape, dtype, type="gaussian_unitball", mean=5, std=9)
    rows = blob.data.reshape(shape[0], -1).astype(np.float64)
    exact = dtype == np.float64 and rows.shape[1] > 1
    np.testing.assert_allclose(np.sqrt((rows ** 2).sum(axis=1)), 1.0,
                               rtol=1e-12 if exact else 1e-6)


def test_gaussian_unitball_is_a_normalised_standard_gaussian():
    # The draw is N(0, 1) whatever mean/std say (happynear ignores them):
    # the same seed gives the standard Gaussian divided by its row norms,
    # and the sign/direction statistics of a unit vector (mean 0,
    # E[x_k^2] = 1/d).
    netlite.set_random_seed(5)
    blob = _fill((2000, 4), np.float64, type="gaussian_unitball", mean=5, std=9)
    netlite.set_random_seed(5)
    raw = netlite.rng.get_rng().standard_normal((2000, 4))
    expected = raw / np.sqrt((raw ** 2).sum(axis=1, keepdims=True) + 1e-12)
    np.testing.assert_allclose(blob.data, expected, rtol=1e-14)
    assert abs(blob.data.mean()) < 0.03
    np.testing.assert_allclose((blob.data ** 2).mean(axis=0), 0.25, rtol=0.1)


def test_gaussian_unitball_normalises_rows_of_a_transposed_ip_blob():
    # shape[0] rows, as happynear: an InnerProduct weight (N, K) gets unit
    # rows of W; a transpose blob (K, N) gets unit rows of length N.
    blob = _fill((5, 3), np.float64, type="gaussian_unitball")
    np.testing.assert_allclose(np.linalg.norm(blob.data, axis=1), 1.0, rtol=1e-12)
    assert np.abs(np.linalg.norm(blob.data, axis=0) - 1).max() > 1e-3


# ------------------------------------------------------------------ gaussian
@pytest.mark.parametrize("shape, tolerance", [
    ((2, 3, 4, 5), 3.0), ((125,), 3.0), ((8, 15), 3.0), ((2, 3, 4, 5, 2), 2.0),
])
def test_gaussian(shape, tolerance, dtype):
    # Caffe's check, 100 repetitions: the mean within mean +- std * tol and
    # the variance within [var / tol, var * tol].
    mean, std = 10.0, 0.1
    blob = Blob(shape, dtype=dtype)
    filler = fillers.get_filler(FillerParameter(type="gaussian", mean=mean, std=std))
    all_values = []
    for _ in range(100):
        filler.fill(blob)
        data = blob.data.astype(np.float64)
        assert mean - std * tolerance <= data.mean() <= mean + std * tolerance
        assert std**2 / tolerance <= data.var() <= std**2 * tolerance
        all_values.append(data.ravel())
    # Over all draws together the moments are much tighter (>= 12000 values:
    # 5 standard errors of the mean is < 0.005 std, of the std < 3.5%).
    pooled = np.concatenate(all_values)
    assert abs(pooled.mean() - mean) < 0.05 * std
    assert abs(pooled.std() / std - 1) < 0.035


def test_sparse_gaussian(dtype):
    # IP weights (num_output=20, K=500); sparse 5 keeps each weight with
    # probability 5 / 20, i.e. on average 5 non-zeros per input column.
    blob = _fill((20, 500), dtype, type="gaussian", std=2.0, sparse=5)
    nonzero = blob.data != 0
    fraction = nonzero.mean()
    assert abs(fraction - 0.25) < 0.02  # 10000 Bernoulli(0.25): SE 0.0043
    assert abs(nonzero.sum(axis=0).mean() - 5) < 0.4
    kept = blob.data[nonzero].astype(np.float64)
    assert abs(kept.std() / 2.0 - 1) < 0.05


def test_sparse_zero_keeps_nothing_and_too_large_is_an_error():
    assert not _fill((4, 6), np.float32, type="gaussian", sparse=0).data.any()
    with pytest.raises(LayerSetupError, match="not a probability"):
        _fill((4, 6), np.float32, type="gaussian", sparse=5)


# ------------------------------------------------------------- xavier / msra
_VARIANCE_CASES = [(FAN_IN, 2 * 4 * 5), (FAN_OUT, 1000 * 4 * 5),
                   (AVERAGE, (2 * 4 * 5 + 1000 * 4 * 5) / 2.0)]


def _check_std(filler_type, variance_norm, target_std, dtype):
    blob = Blob((1000, 2, 4, 5), dtype=dtype)
    param = FillerParameter(type=filler_type, variance_norm=variance_norm)
    for _ in range(100):
        fillers.get_filler(param).fill(blob)
        data = blob.data.astype(np.float64)
        # 40000 values: the standard error of the mean is 0.005 std and of
        # the std below 0.4%, so 5% is > 10 standard errors, while a factor
        # sqrt(2) in the std would be off by 41%.
        assert abs(data.mean()) <= 0.05 * target_std
        assert abs(data.std() / target_std - 1) <= 0.05
    return blob


@pytest.mark.parametrize("variance_norm, n", _VARIANCE_CASES)
def test_xavier_std_is_sqrt_one_over_n(variance_norm, n, dtype):
    blob = _check_std("xavier", variance_norm, math.sqrt(1.0 / n), dtype)
    # Uniform on [-sqrt(3/n), sqrt(3/n)]: bounded, and reaching the bounds.
    limit = math.sqrt(3.0 / n)
    assert np.abs(blob.data).max() <= limit * (1 + 1e-6)
    assert np.abs(blob.data).max() >= 0.99 * limit


@pytest.mark.parametrize("variance_norm, n", _VARIANCE_CASES)
def test_msra_std_is_sqrt_two_over_n(variance_norm, n, dtype):
    blob = _check_std("msra", variance_norm, math.sqrt(2.0 / n), dtype)
    # Gaussian, not uniform: some values beyond 2 standard deviations.
    assert np.abs(blob.data).max() > 2 * math.sqrt(2.0 / n)


@pytest.mark.parametrize("filler_type", ["xavier", "msra"])
@pytest.mark.parametrize("shape, n", [
    ((25,), (1 + 25) / 2.0),            # fan_in 1, fan_out = count
    ((8, 3), (3 + 8) / 2.0),
    ((2, 3, 4, 5, 2), (120 + 80) / 2.0),
])
def test_xavier_msra_other_shapes(filler_type, shape, n, dtype):
    blob = _fill(shape, dtype, type=filler_type, variance_norm=AVERAGE)
    assert np.all(np.isfinite(blob.data)) and blob.data.any()
    if filler_type == "xavier":
        assert np.abs(blob.data).max() <= math.sqrt(3.0 / n) * (1 + 1e-6)


def test_fan_computation_on_empty_blob_is_an_error():
    with pytest.raises(LayerSetupError, match="empty blob"):
        _fill((0, 3), np.float32, type="xavier")


# ------------------------------------------------------------------ bilinear
@pytest.mark.parametrize("k", [7, 6])
def test_bilinear(k, dtype):
    blob = _fill((1000, 2, k, k), dtype, type="bilinear")
    f = math.ceil(k / 2.0)
    c = (k - 1) / (2.0 * f)
    x = np.arange(k)
    expected = np.outer(1 - np.abs(x / f - c), 1 - np.abs(x / f - c))
    np.testing.assert_allclose(blob.data, np.broadcast_to(expected, blob.shape),
                               atol=0.01)
    np.testing.assert_allclose(blob.data[3, 1], expected, rtol=1e-6)


@pytest.mark.parametrize("shape", [(2, 3, 4), (2, 3, 4, 5)])
def test_bilinear_needs_square_4d(shape):
    with pytest.raises(LayerSetupError, match="4-D blob with height == width"):
        _fill(shape, np.float32, type="bilinear")


# -------------------------------------------------------------------- errors
def test_unknown_filler_type():
    with pytest.raises(LayerSetupError, match="unknown filler type 'gausian'.*"
                       "bilinear, constant, gaussian, gaussian_unitball, msra, "
                       "positive_unitball, uniform, xavier"):
        fillers.get_filler(FillerParameter(type="gausian"))


@pytest.mark.parametrize("filler_type", ["constant", "uniform", "xavier", "msra",
                                         "positive_unitball", "bilinear",
                                         "gaussian_unitball"])
def test_sparse_only_for_gaussian(filler_type):
    with pytest.raises(LayerSetupError, match="does not support sparse"):
        fillers.get_filler(FillerParameter(type=filler_type, sparse=3))


# ------------------------------------------------------------ reproducibility
@pytest.mark.parametrize("filler_type", ["uniform", "gaussian", "xavier", "msra",
                                         "positive_unitball", "gaussian_unitball"])
def test_set_random_seed_reproduces_fills(filler_type):
    def draw(seed, dtype=np.float64):
        netlite.set_random_seed(seed)
        return _fill((6, 5), dtype, type=filler_type).data.copy()

    np.testing.assert_array_equal(draw(3), draw(3))
    assert not np.array_equal(draw(3), draw(4))
    # float32 and float64 nets seeded alike start from the same weights.
    np.testing.assert_allclose(draw(3, np.float32), draw(3), rtol=1e-6)


def test_fills_advance_the_global_generator():
    netlite.set_random_seed(11)
    first = _fill((4,), np.float64, type="gaussian").data.copy()
    second = _fill((4,), np.float64, type="gaussian").data.copy()
    assert not np.array_equal(first, second)


def test_negative_seed_rejected():
    with pytest.raises(ValueError, match=">= 0"):
        netlite.set_random_seed(-1)
