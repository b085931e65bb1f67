"""Datasets: the IDX file format, finding MNIST-style data, downloading it.

Three layers of functionality, each usable on its own:

* **IDX files** (LeCun's format for MNIST): :func:`load_idx` reads a gzip or
  raw file (told apart by the magic bytes, not the name) and checks the
  magic number, the dimensions and the exact file length; :func:`save_idx`
  writes one.  A damaged file raises :class:`IDXFormatError` naming the file
  and what is wrong.
* **Lookup** of the named datasets ``"mnist"`` and ``"fashion-mnist"``
  (:func:`find_dataset`).  Directories are searched in this order:

  1. the directory the caller passes (the command line's ``--data``), then
     the one set with :func:`set_data_dir`; each as ``DIR/<name>/`` and as
     ``DIR/`` itself;
  2. ``$NETLITE_DATA/<name>/`` (``NETLITE_DATA`` may list several
     directories separated by ``os.pathsep``);
  3. the per-user cache, ``$XDG_CACHE_HOME/netlite/<name>/`` or
     ``~/.cache/netlite/<name>/``;
  4. Debian's ``/usr/share/datasets/<name>/`` (``apt-get install
     dataset-fashion-mnist``).

  A directory qualifies when it holds all four files, each either as the
  canonical ``.gz`` or uncompressed.
* **Download** into the cache from the canonical mirrors when nothing is
  found (unless ``download=False`` or ``NETLITE_OFFLINE=1``), written
  atomically and verified by MD5.  Offline, the error says where to put
  the files.

Loaded datasets are verified by the MD5 of their uncompressed content
(which also accepts Debian's re-packed ``.gz`` files) and kept in a
process-wide cache, so TRAIN and TEST nets, and nets built again, share
one read-only copy.  See docs/datasets.md.
"""

import gzip
import hashlib
import logging
import os
import struct
import sys
import tempfile
import threading
import urllib.error
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from netlite.errors import NetliteError

logger = logging.getLogger("netlite")


class IDXFormatError(NetliteError, ValueError):
    """An IDX file is truncated, corrupt or not an IDX file at all."""


class ChecksumError(NetliteError, ValueError):
    """A dataset file does not have the published MD5 checksum."""


class DatasetNotFoundError(NetliteError, FileNotFoundError):
    """A named dataset is in none of the searched places and was not
    downloaded; the message lists every path searched and the file names."""


# ----------------------------------------------------------------- IDX files
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
    from netlite import io

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


# ---------------------------------------------------------- named datasets
#: split -> (image file stem, label file stem): the canonical file names.
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_SPLIT_ALIASES = {"train": "train", "test": "test", "t10k": "test"}


@dataclass(frozen=True)
class DatasetSpec:
    """What netlite knows about one named dataset.

    Attributes
    ----------
    name : str
    mirrors : tuple of str
        Base URLs tried in order; a file's URL is ``mirror + stem + ".gz"``.
    gz_md5 : dict
        stem -> published MD5 of the ``.gz`` (what a download is checked
        against).
    content_md5 : dict
        stem -> MD5 of the uncompressed file (what a local file is checked
        against, whatever its compression).
    other_gz_md5 : dict
        stem -> MD5s of other known-good ``.gz`` packagings (Debian's).
    sizes : dict
        split -> number of examples.
    hint : str
        Extra advice for the not-found message.
    """

    name: str
    mirrors: tuple
    gz_md5: dict
    content_md5: dict
    other_gz_md5: dict = field(default_factory=dict)
    sizes: dict = field(default_factory=lambda: {"train": 60000, "test": 10000})
    hint: str = ""

    @property
    def stems(self):
        """The four canonical file stems (no ``.gz``)."""
        return [s for pair in SPLIT_FILES.values() for s in pair]


DATASETS = {
    "mnist": DatasetSpec(
        name="mnist",
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        gz_md5={
            "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        content_md5={
            "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
            "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
            "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
            "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
        },
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/"
            "master/data/fashion/",
        ),
        # Zalando's published checksums of their .gz files.
        gz_md5={
            "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        content_md5={
            "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
            "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
            "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
        },
        # Debian's package re-wrote the gzip headers (no stored name, a new
        # time stamp): same content, different .gz checksums.
        other_gz_md5={
            "train-images-idx3-ubyte": "cf8536b0aa1a6ac5fa3f23001093305c",
            "train-labels-idx1-ubyte": "10bea18fdb374794d4bb42e356e600c9",
            "t10k-images-idx3-ubyte": "f78720b4224f21cce2f2ccf2d7a94c9a",
            "t10k-labels-idx1-ubyte": "0d30e22e447f3c33dab9ed536400ac01",
        },
        hint="On Debian/Ubuntu: apt-get install dataset-fashion-mnist",
    ),
}

#: System-wide data directories (Debian's convention), searched last.
SYSTEM_DATA_DIRS = (Path("/usr/share/datasets"),)

#: Seconds before a download attempt gives up on an unresponsive mirror.
DOWNLOAD_TIMEOUT = 30

# The URL opener; None means urllib.request.urlopen (imported on first use:
# it pulls in http.client and ssl).  Tests replace it.
_urlopen = None

_data_dir = None


def set_data_dir(path):
    """Set the directory searched first for named datasets (``--data``).

    Parameters
    ----------
    path : str, path-like or None
        ``None`` clears the setting.
    """
    global _data_dir
    _data_dir = None if path is None else Path(path).expanduser()


def get_data_dir():
    """The directory set with :func:`set_data_dir` (or None)."""
    return _data_dir


def get_spec(name):
    """Return the :class:`DatasetSpec` of ``name`` (case/underscore blind)."""
    key = str(name).strip().lower().replace("_", "-")
    try:
        return DATASETS[key]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}"
        ) from None


def normalize_split(split):
    """``"train"`` or ``"test"`` (``"t10k"`` is accepted for test)."""
    key = str(split).strip().lower()
    try:
        return _SPLIT_ALIASES[key]
    except KeyError:
        raise ValueError(
            f"unknown split {split!r}; expected 'train' or 'test'"
        ) from None


def cache_dir(name=None):
    """The per-user download cache (of dataset ``name`` when given)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says to ignore relative paths.
    root = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    root = root / "netlite"
    return root / get_spec(name).name if name is not None else root


def search_dirs(name, data_dir=None):
    """Every directory searched for dataset ``name``, in order.

    Returns
    -------
    list of (Path, str)
        The directory and where it comes from (for messages).
    """
    spec = get_spec(name)
    dirs = []
    for root, origin in ((data_dir, "data directory"),
                         (_data_dir, "set_data_dir / --data")):
        if root is not None:
            root = Path(root).expanduser()
            dirs += [(root / spec.name, origin), (root, origin)]
    for root in filter(None, os.environ.get("NETLITE_DATA", "").split(os.pathsep)):
        dirs.append((Path(root).expanduser() / spec.name, "$NETLITE_DATA"))
    dirs.append((cache_dir(spec.name), "user cache"))
    for root in SYSTEM_DATA_DIRS:
        dirs.append((Path(root) / spec.name, "system"))
    unique, seen = [], set()
    for d, origin in dirs:
        if d not in seen:
            seen.add(d)
            unique.append((d, origin))
    return unique


def _file_in(directory, stem):
    """The ``.gz`` or uncompressed file ``stem`` in ``directory``, or None."""
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _complete(directory, spec):
    return all(_file_in(directory, stem) for stem in spec.stems)


def find_dataset(name, data_dir=None, download=True, progress=None):
    """Return the directory that holds dataset ``name``'s four IDX files.

    Parameters
    ----------
    name : {"mnist", "fashion-mnist"}
    data_dir : str or path-like, optional
        Searched first, as ``data_dir/<name>/`` and as ``data_dir/``.
    download : bool
        When nothing is found, download into the user cache (also disabled
        by the environment variable ``NETLITE_OFFLINE=1``).
    progress : bool, optional
        Show a progress bar while downloading; default: when stderr is a
        terminal.

    Raises
    ------
    DatasetNotFoundError
        Not found and not downloaded; the message lists every searched
        directory and the file names to put there.
    ChecksumError
        A download did not have the published checksum.
    """
    spec = get_spec(name)
    searched = search_dirs(spec.name, data_dir)
    for directory, _origin in searched:
        if _complete(directory, spec):
            return directory
    if not download or os.environ.get("NETLITE_OFFLINE", "") not in ("", "0"):
        reason = (
            "downloads are disabled (NETLITE_OFFLINE is set)" if download
            else "downloading was not requested"
        )
        raise DatasetNotFoundError(_not_found_message(spec, searched, reason))
    target = cache_dir(spec.name)
    try:
        download_dataset(spec.name, target, progress=progress)
    except (urllib.error.URLError, OSError) as exc:
        if isinstance(exc, DatasetNotFoundError):
            raise
        raise DatasetNotFoundError(
            _not_found_message(spec, searched, f"the download failed: {exc}")
        ) from None
    return target


def _not_found_message(spec, searched, reason):
    names = "\n".join(f"    {stem}.gz" for stem in spec.stems)
    dirs = "\n".join(
        f"    {d}  ({origin}{_missing_note(d, spec)})" for d, origin in searched
    )
    mirrors = "\n".join(f"    {m}" for m in spec.mirrors)
    lines = [
        f"dataset '{spec.name}' was not found, and {reason}.",
        f"Put these four files (gzip, or uncompressed without '.gz'):\n{names}",
        f"into one of these directories (searched in this order):\n{dirs}",
        "or pass the directory with --data DIR (netlite.datasets.set_data_dir), "
        f"or set NETLITE_DATA=ROOT with the files in ROOT/{spec.name}/.",
        f"The files can be downloaded from:\n{mirrors}",
    ]
    if spec.hint:
        lines.append(spec.hint + ".")
    return "\n".join(lines)


def _missing_note(directory, spec):
    """``"; has only ..."`` for a directory holding part of the files."""
    have = [stem for stem in spec.stems if _file_in(directory, stem)]
    if not have:
        return ""
    missing = [stem for stem in spec.stems if stem not in have]
    return f"; incomplete, missing {', '.join(missing)}"


def dataset_files(name, split, data_dir=None, download=True, progress=None):
    """Return ``(images_path, labels_path)`` of one split of a dataset."""
    spec = get_spec(name)
    split = normalize_split(split)
    directory = find_dataset(spec.name, data_dir, download, progress)
    return tuple(_file_in(directory, stem) for stem in SPLIT_FILES[split])


# ------------------------------------------------------------- download
def _md5(data):
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def download_dataset(name, directory=None, progress=None, mirrors=None):
    """Download the missing files of dataset ``name`` into ``directory``.

    Each file is tried from every mirror in turn, streamed into a temporary
    file beside its destination, checked against the published MD5 of the
    ``.gz`` (or, for a re-packed gzip, the MD5 of its content) and then
    renamed into place, so an interrupted download never leaves a partial
    file under the final name.

    Parameters
    ----------
    name : str
    directory : path-like, optional
        Defaults to the user cache, :func:`cache_dir` ``(name)``.
    progress : bool, optional
        tqdm progress bar; default: when stderr is a terminal.
    mirrors : sequence of str, optional
        Base URLs overriding the dataset's mirrors.

    Returns
    -------
    Path
        ``directory``.

    Raises
    ------
    ChecksumError
        Every mirror served a file with the wrong checksum.
    urllib.error.URLError, OSError
        No mirror could be reached (the last error is re-raised).
    """
    spec = get_spec(name)
    directory = Path(directory) if directory is not None else cache_dir(spec.name)
    mirrors = tuple(mirrors) if mirrors is not None else spec.mirrors
    if progress is None:
        progress = sys.stderr is not None and sys.stderr.isatty()
    created = not directory.exists()
    try:
        for stem in spec.stems:
            if not _file_in(directory, stem):
                directory.mkdir(parents=True, exist_ok=True)
                _download_stem(directory, spec, stem, mirrors, progress)
    except BaseException:
        # Leave no empty cache directory behind after a failed attempt.
        if created and directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
        raise
    return directory


def _download_stem(directory, spec, stem, mirrors, progress):
    """Fetch ``stem.gz`` from the first mirror that serves a good copy."""
    bad, last_error = [], None
    for mirror in mirrors:
        url = mirror.rstrip("/") + f"/{stem}.gz"
        try:
            _download_one(url, directory / f"{stem}.gz", spec, stem, progress)
            return
        except ChecksumError as exc:
            bad.append(str(exc))
        except (urllib.error.URLError, OSError) as exc:
            logger.info("cannot download %s: %s", url, exc)
            if isinstance(exc, urllib.error.HTTPError):
                exc.close()  # an HTTP error holds the open connection
            last_error = exc
    if bad:
        raise ChecksumError("\n".join(bad))
    if last_error is None:
        raise urllib.error.URLError("no mirrors to download from")
    raise last_error


def _download_one(url, dest, spec, stem, progress):
    logger.info("Downloading %s", url)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part",
                               dir=dest.parent)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        opener = _urlopen
        if opener is None:
            import urllib.request

            opener = urllib.request.urlopen
        with os.fdopen(fd, "wb") as out, opener(url, timeout=DOWNLOAD_TIMEOUT) as r:
            headers = getattr(r, "headers", None) or {}
            total = int(headers.get("Content-Length") or 0) or None
            bar = _progress_bar(total, dest.name, progress)
            try:
                while True:
                    chunk = r.read(1 << 16)
                    if not chunk:
                        break
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            finally:
                bar.close()
            out.flush()
            os.fsync(out.fileno())
        md5 = digest.hexdigest()
        if md5 != spec.gz_md5[stem] and md5 not in spec.other_gz_md5.get(stem, ()):
            # A mirror may re-compress; the content is what must match.
            try:
                content_md5 = _md5(read_idx_bytes(tmp)[1])
            except IDXFormatError:
                content_md5 = None
            if content_md5 != spec.content_md5[stem]:
                raise ChecksumError(
                    f"{url}: MD5 of the download is {md5}, expected "
                    f"{spec.gz_md5[stem]} (uncompressed content: {content_md5}, "
                    f"expected {spec.content_md5[stem]})"
                )
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress_bar(total, desc, show):
    if not show:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True,
                unit_divisor=1024, file=sys.stderr, leave=False)


# ------------------------------------------------------------ verification
def verify_file(path, name, stem=None):
    """Check an IDX file against dataset ``name``'s published checksums.

    The file passes when the MD5 of its uncompressed content matches, so
    both the canonical ``.gz``, a re-packed ``.gz`` (Debian's) and an
    uncompressed copy pass.

    Returns
    -------
    str
        The content MD5.

    Raises
    ------
    ChecksumError
    """
    spec = get_spec(name)
    path = Path(path)
    stem = stem or path.name.removesuffix(".gz")
    _, content = read_idx_bytes(path)
    return _verify_content(path, content, spec, stem)


def _verify_content(path, content, spec, stem):
    md5 = _md5(content)
    expected = spec.content_md5.get(stem)
    if expected is None:
        raise ValueError(f"{path}: {stem!r} is not a file of dataset '{spec.name}'")
    if md5 != expected:
        raise ChecksumError(
            f"{path}: not the '{spec.name}' file {stem}: the MD5 of its "
            f"uncompressed content is {md5}, expected {expected}. Replace it with "
            "the canonical file, or give IDX files of your own with "
            "image_source/label_source instead of a dataset name"
        )
    return md5


# ------------------------------------------------------ cached loading
_cache = {}
_cache_lock = threading.Lock()


def clear_cache():
    """Forget every dataset loaded so far (frees the memory)."""
    with _cache_lock:
        _cache.clear()


def _identity(path):
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns)


def load_idx_cached(path, spec=None, stem=None):
    """:func:`load_idx` through the process-wide cache (read-only result).

    With ``spec`` (and the file's canonical ``stem``) the content is also
    verified against the dataset's checksum.  Entries are keyed by the real
    path, size and modification time, so a replaced file is read again.
    """
    if spec is not None and stem is None:
        stem = Path(path).name.removesuffix(".gz")
    key = (_identity(path), spec.name if spec is not None else None)
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    _, content = read_idx_bytes(path)
    if spec is not None:
        _verify_content(path, content, spec, stem)
    array = parse_idx(content, source=str(path))
    array.setflags(write=False)  # shared by every user of the cache
    with _cache_lock:
        _cache[key] = array
    return array


def load_idx_pair(images_path, labels_path, spec=None, split=None):
    """Load an images file and its labels file, checked and cached.

    Parameters
    ----------
    images_path, labels_path : path-like
    spec : DatasetSpec, optional
        When given (with ``split``), the files are verified against the
        dataset's checksums.
    split : {"train", "test"}, optional

    Returns
    -------
    images : numpy.ndarray, read-only
        ``(N, ...)``; ``(N, H, W)`` for MNIST.
    labels : numpy.ndarray, read-only
        ``(N,)``.

    Raises
    ------
    IDXFormatError
        A damaged file, labels that are not 1-D integers, or different
        numbers of images and labels.
    """
    stems = SPLIT_FILES[normalize_split(split)] if spec is not None else (None,) * 2
    images = load_idx_cached(images_path, spec, stems[0])
    labels = load_idx_cached(labels_path, spec, stems[1])
    if images.ndim < 2:
        raise IDXFormatError(
            f"{images_path}: an images file needs at least 2 axes (N, ...), "
            f"got shape {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise IDXFormatError(
            f"{labels_path}: a labels file must be a 1-D integer array, got "
            f"{labels.dtype} with shape {labels.shape}"
        )
    if images.shape[0] != labels.shape[0]:
        raise IDXFormatError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has "
            f"{labels.shape[0]} labels"
        )
    return images, labels


def load_mnist(name, split, data_dir=None, download=True, verify=True,
               progress=None):
    """Load one split of MNIST or Fashion-MNIST.

    Parameters
    ----------
    name : {"mnist", "fashion-mnist"}
    split : {"train", "test"}
    data_dir : path-like, optional
        Searched first (see :func:`find_dataset`).
    download : bool
        Download into the user cache when not found.
    verify : bool
        Check the files' MD5 checksums (of the uncompressed content).

    Returns
    -------
    images : numpy.ndarray of uint8, shape (N, 28, 28), read-only
    labels : numpy.ndarray of uint8, shape (N,), read-only
        Shared with the process-wide cache: copy before modifying.
    """
    spec = get_spec(name)
    split = normalize_split(split)
    images_path, labels_path = dataset_files(
        spec.name, split, data_dir, download, progress
    )
    return load_idx_pair(
        images_path, labels_path, spec if verify else None, split
    )


def parse_source(source):
    """Split ``"mnist:train"`` into ``("mnist", "train")`` (validated)."""
    name, sep, split = str(source).partition(":")
    if not sep:
        raise ValueError(
            f"dataset source {source!r} must be '<dataset>:<split>' such as "
            "'mnist:train' or 'fashion-mnist:test'"
        )
    return get_spec(name).name, normalize_split(split)
