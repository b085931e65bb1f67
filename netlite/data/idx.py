"""The IDX file format (LeCun's format for MNIST).

:func:`load_idx` reads a gzip or raw file (told apart by the magic bytes,
not the name) and checks the magic number, the dimensions and the exact
file length; :func:`save_idx` writes one.  A damaged file raises
:class:`IDXFormatError` naming the file and what is wrong.  See
docs/datasets.md.
"""

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from netlite import io
from netlite.errors import NetliteError


class IDXFormatError(NetliteError, ValueError):
    """An IDX file is truncated, corrupt or not an IDX file at all."""


#: IDX element type code (third magic byte) -> big-endian dtype.
IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_TYPE_NAMES = {
    0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "short (int16)",
    0x0C: "int (int32)", 0x0D: "float (float32)", 0x0E: "double (float64)",
}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx_bytes(path):
    """Return ``(file_bytes, content)`` of an IDX file, gzip or raw.

    ``content`` is the uncompressed IDX payload (``file_bytes`` itself for
    a raw file).  Compression is detected from the gzip magic bytes.

    Raises
    ------
    IDXFormatError
        When a gzip stream is truncated or fails its CRC/length check.
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.startswith(_GZIP_MAGIC):
        return raw, raw
    try:
        content = gzip.decompress(raw)
    except EOFError as exc:
        raise IDXFormatError(
            f"{path}: truncated gzip stream ({len(raw)} bytes read): {exc}"
        ) from None
    except (OSError, zlib.error) as exc:
        # gzip.BadGzipFile (an OSError) reports CRC and length errors.
        raise IDXFormatError(f"{path}: corrupt gzip stream: {exc}") from None
    return raw, content


def parse_idx(content, source="<bytes>"):
    """Decode an uncompressed IDX payload into a native-endian array.

    Parameters
    ----------
    content : bytes
        The whole file: magic ``0x00 0x00 <type> <ndim>``, ``ndim``
        big-endian uint32 dimensions, then the elements, big-endian.
    source : str
        Named in error messages.

    Returns
    -------
    numpy.ndarray
        A writable array with the dimensions from the header.

    Raises
    ------
    IDXFormatError
        Bad magic, unknown element type, truncated header, or a length that
        differs from what the header announces.
    """
    n = len(content)
    if n < 4:
        raise IDXFormatError(
            f"{source}: not an IDX file: {n} byte(s), too short for the 4-byte "
            "magic number"
        )
    magic = content[:4].hex()
    code, ndim = content[2], content[3]
    if content[0] or content[1]:
        raise IDXFormatError(
            f"{source}: bad IDX magic number 0x{magic}: the first two bytes must "
            "be zero (expected 0x0000TTNN, e.g. 0x00000803 for images or "
            "0x00000801 for labels)"
        )
    if code not in IDX_TYPES:
        known = ", ".join(f"0x{c:02x} {t}" for c, t in _IDX_TYPE_NAMES.items())
        raise IDXFormatError(
            f"{source}: bad IDX magic number 0x{magic}: unknown element type "
            f"0x{code:02x} (known: {known})"
        )
    if ndim == 0:
        raise IDXFormatError(
            f"{source}: bad IDX magic number 0x{magic}: zero dimensions"
        )
    header = 4 + 4 * ndim
    if n < header:
        raise IDXFormatError(
            f"{source}: truncated IDX header: magic 0x{magic} announces {ndim} "
            f"dimension(s), which need {header} header bytes; the file has {n}"
        )
    dims = struct.unpack(f">{ndim}I", content[4:header])
    dtype = IDX_TYPES[code]
    count = 1
    for d in dims:
        count *= d  # Python ints: no overflow on absurd headers
    expected = header + count * dtype.itemsize
    if n != expected:
        what = "truncated" if n < expected else "trailing data"
        shape = " x ".join(str(d) for d in dims)
        raise IDXFormatError(
            f"{source}: {what}: an IDX file of {_IDX_TYPE_NAMES[code]} "
            f"elements with shape {shape} must be {expected} bytes ({header}-byte "
            f"header + {count} x {dtype.itemsize}), but it is {n} bytes "
            f"({abs(expected - n)} {'missing' if n < expected else 'extra'})"
        )
    array = np.frombuffer(content, dtype=dtype, count=count, offset=header)
    # astype copies into a writable, native-endian array.
    return array.reshape(dims).astype(dtype.newbyteorder("="))


def load_idx(path):
    """Read an IDX file (gzip or raw) into a NumPy array.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    numpy.ndarray
        Native byte order, shape from the header (e.g. ``(60000, 28, 28)``
        uint8 for MNIST training images).

    Raises
    ------
    IDXFormatError
        The file is truncated or corrupt; the message names the file and
        what is wrong (expected vs actual byte count, bad magic, gzip
        CRC/EOF error).
    FileNotFoundError
        The file does not exist.
    """
    _, content = read_idx_bytes(path)
    return parse_idx(content, source=str(path))


def save_idx(path, array, compress=None):
    """Write ``array`` as an IDX file (atomically).

    Parameters
    ----------
    path : str or path-like
    array : array_like
        uint8, int8, int16, int32, float32 or float64; 1 to 255 axes.
    compress : bool, optional
        gzip the file; defaults to whether ``path`` ends in ``.gz``.
    """
    array = np.asarray(array)
    codes = {np.dtype(t).newbyteorder("="): c for c, t in IDX_TYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise TypeError(f"IDX cannot store dtype {array.dtype}")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX arrays have 1 to 255 axes, got {array.ndim}")
    code = codes[native]
    payload = (
        bytes([0, 0, code, array.ndim])
        + struct.pack(f">{array.ndim}I", *array.shape)
        + np.ascontiguousarray(array, dtype=IDX_TYPES[code]).tobytes()
    )
    if compress is None:
        compress = str(path).endswith(".gz")
    if compress:
        payload = gzip.compress(payload, mtime=0)
    io.atomic_write_bytes(path, payload)
