"""Finding a named dataset on disk, downloading it when it is missing.

:func:`find_dataset` searches the directories of
:func:`netlite.data.catalog.search_dirs` and, when none holds the files,
downloads them into the user cache (unless ``download=False`` or
``NETLITE_OFFLINE=1``).  Offline, :class:`DatasetNotFoundError` says where
to put the files.  See docs/datasets.md.
"""

import os
import urllib.error

from netlite.data.catalog import (
    SPLIT_FILES,
    cache_dir,
    file_in,
    get_spec,
    has_all_files,
    normalize_split,
    search_dirs,
)
from netlite.data.download import download_dataset
from netlite.errors import NetliteError


class DatasetNotFoundError(NetliteError, FileNotFoundError):
    """A named dataset is in none of the searched places and was not
    downloaded; the message lists every path searched and the file names."""


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
        if has_all_files(directory, spec):
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
        "or pass the directory with --data DIR "
        "(netlite.data.catalog.set_data_dir), "
        f"or set NETLITE_DATA=ROOT with the files in ROOT/{spec.name}/.",
        f"The files can be downloaded from:\n{mirrors}",
    ]
    if spec.hint:
        lines.append(spec.hint + ".")
    return "\n".join(lines)


def _missing_note(directory, spec):
    """``"; has only ..."`` for a directory holding part of the files."""
    have = [stem for stem in spec.stems if file_in(directory, stem)]
    if not have:
        return ""
    missing = [stem for stem in spec.stems if stem not in have]
    return f"; incomplete, missing {', '.join(missing)}"


def dataset_files(name, split, data_dir=None, download=True, progress=None):
    """Return ``(images_path, labels_path)`` of one split of a dataset."""
    spec = get_spec(name)
    split = normalize_split(split)
    directory = find_dataset(spec.name, data_dir, download, progress)
    return tuple(file_in(directory, stem) for stem in SPLIT_FILES[split])
