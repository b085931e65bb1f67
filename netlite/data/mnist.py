"""Loading MNIST-style datasets, checked and cached.

:func:`load_mnist` finds (:func:`netlite.data.lookup.find_dataset`), checks
and loads one split of MNIST or Fashion-MNIST.  Loaded files are verified by
the MD5 of their uncompressed content (which also accepts Debian's
re-packed ``.gz`` files) and kept in a process-wide cache
(:func:`load_idx_cached`), so TRAIN and TEST nets, and nets built again,
share one read-only copy.  See docs/datasets.md.
"""

import os
import threading
from pathlib import Path

from netlite.data.catalog import SPLIT_FILES, get_spec, normalize_split
from netlite.data.idx import IDXFormatError, parse_idx, read_idx_bytes
from netlite.data.lookup import dataset_files
from netlite.data.verify import verify_content

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
        verify_content(path, content, spec, stem)
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
