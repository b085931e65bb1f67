"""netlite.data.idx: reading and writing IDX files, and every way they break."""

import gzip
import struct

import numpy as np
import pytest

from netlite.data.idx import IDXFormatError, load_idx, save_idx
from netlite.errors import NetliteError


# --------------------------------------------------------------- IDX reader
@pytest.mark.parametrize("dtype,code", [
    (np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B), (np.int32, 0x0C),
    (np.float32, 0x0D), (np.float64, 0x0E),
])
@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip_every_type(tmp_path, dtype, code, compress):
    gen = np.random.default_rng(3)
    array = (gen.standard_normal((3, 4, 5)) * 100).astype(dtype)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    save_idx(path, array)
    raw = path.read_bytes()
    assert raw.startswith(b"\x1f\x8b") == compress
    content = gzip.decompress(raw) if compress else raw
    # Magic 0x0000 <type> <ndim>, big-endian dimensions and elements.
    assert content[:4] == bytes([0, 0, code, 3])
    assert struct.unpack(">3I", content[4:16]) == (3, 4, 5)
    big = np.dtype(dtype).newbyteorder(">")
    assert content[16:] == array.astype(big).tobytes()
    loaded = load_idx(path)
    assert loaded.dtype == np.dtype(dtype) and loaded.dtype.isnative
    assert loaded.flags.writeable
    np.testing.assert_array_equal(loaded, array)


def test_idx_compression_detected_by_content_not_name(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    save_idx(tmp_path / "raw.gz", array, compress=False)
    save_idx(tmp_path / "zipped.idx", array, compress=True)
    assert not (tmp_path / "raw.gz").read_bytes().startswith(b"\x1f\x8b")
    assert (tmp_path / "zipped.idx").read_bytes().startswith(b"\x1f\x8b")
    np.testing.assert_array_equal(load_idx(tmp_path / "raw.gz"), array)
    np.testing.assert_array_equal(load_idx(tmp_path / "zipped.idx"), array)


def test_idx_one_dimension_and_empty(tmp_path):
    save_idx(tmp_path / "l", np.array([3, 1, 4], np.uint8))
    assert load_idx(tmp_path / "l").tolist() == [3, 1, 4]
    save_idx(tmp_path / "e", np.zeros((0, 28, 28), np.uint8))
    assert load_idx(tmp_path / "e").shape == (0, 28, 28)


def test_save_idx_rejects_unsupported(tmp_path):
    with pytest.raises(TypeError, match="bool"):
        save_idx(tmp_path / "b", np.zeros(3, bool))
    with pytest.raises(ValueError, match="1 to 255 axes"):
        save_idx(tmp_path / "s", np.uint8(3))


def _write(tmp_path, name, payload):
    path = tmp_path / name
    path.write_bytes(payload)
    return path


def _header(code, dims):
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


@pytest.mark.parametrize("payload,pattern", [
    (b"", r"not an IDX file: 0 byte\(s\)"),
    (b"\x00\x00\x08", r"not an IDX file: 3 byte"),
    (b"\x01\x00\x08\x01" + b"\x00" * 8, r"bad IDX magic number 0x01000801"),
    (b"PK\x03\x04" + b"\x00" * 8, r"bad IDX magic number 0x504b0304"),
    (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", r"unknown element type 0x07"),
    (b"\x00\x00\x08\x00", r"zero dimensions"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x02\x00\x00",
     r"truncated IDX header: .* 3 dimension\(s\), which need 16 header bytes; "
     r"the file has 10"),
])
def test_idx_bad_header(tmp_path, payload, pattern):
    path = _write(tmp_path, "bad-idx", payload)
    with pytest.raises(IDXFormatError, match=pattern) as info:
        load_idx(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, NetliteError)


def test_idx_short_file_reports_expected_and_actual_bytes(tmp_path):
    content = _header(0x08, (10, 28, 28)) + bytes(10 * 784 - 100)
    path = _write(tmp_path, "short-images", content)
    expected = 16 + 7840
    with pytest.raises(IDXFormatError) as info:
        load_idx(path)
    message = str(info.value)
    assert str(path) in message and "truncated" in message
    assert f"must be {expected} bytes" in message
    assert f"it is {expected - 100} bytes (100 missing)" in message
    assert "10 x 28 x 28" in message


def test_idx_wrong_dims_and_trailing_data(tmp_path):
    # Header claims 3 x 2 int32, the payload holds 7 of them.
    content = _header(0x0C, (3, 2)) + bytes(4 * 7)
    with pytest.raises(IDXFormatError, match=r"trailing data.*must be 36 bytes.*"
                       r"it is 40 bytes \(4 extra\)"):
        load_idx(_write(tmp_path, "long", content))
    # Multi-byte types: the length check counts itemsize.
    content = _header(0x0E, (4,)) + bytes(8 * 3)
    with pytest.raises(IDXFormatError, match=r"must be 40 bytes .* 4 x 8"):
        load_idx(_write(tmp_path, "double", content))


def test_idx_truncated_gzip(tmp_path):
    payload = gzip.compress(_header(0x08, (50, 28, 28)) + bytes(range(256)) * 154)
    path = _write(tmp_path, "cut.gz", payload[: len(payload) // 2])
    with pytest.raises(IDXFormatError, match=r"truncated gzip stream") as info:
        load_idx(path)
    assert str(path) in str(info.value)
    # Even losing only the 8-byte trailer (CRC and length) is detected.
    path = _write(tmp_path, "notrailer.gz", payload[:-8])
    with pytest.raises(IDXFormatError, match=r"truncated gzip stream"):
        load_idx(path)


def test_idx_gzip_crc_error(tmp_path):
    payload = bytearray(gzip.compress(_header(0x08, (2, 2)) + b"abcd"))
    payload[-8] ^= 0xFF  # the CRC32 of the content
    with pytest.raises(IDXFormatError, match=r"corrupt gzip stream: CRC check"):
        load_idx(_write(tmp_path, "crc.gz", bytes(payload)))


def test_idx_corrupt_deflate_data(tmp_path):
    payload = bytearray(gzip.compress(bytes(range(256)) * 64))
    payload[20:30] = b"\xff" * 10
    with pytest.raises(IDXFormatError, match=r"corrupt gzip stream"):
        load_idx(_write(tmp_path, "bad.gz", bytes(payload)))


def test_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_idx(tmp_path / "nope")
