"""Checking dataset files against their published MD5 checksums.

A file passes when the MD5 of its uncompressed content matches, so the
canonical ``.gz``, a re-packed ``.gz`` (Debian's) and an uncompressed copy
all pass.  See docs/datasets.md.
"""

import hashlib
from pathlib import Path

from netlite.data.catalog import get_spec
from netlite.data.idx import read_idx_bytes
from netlite.errors import NetliteError


class ChecksumError(NetliteError, ValueError):
    """A dataset file does not have the published MD5 checksum."""


def md5_hex(data):
    """Hex MD5 digest of ``data`` (bytes)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


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
    return verify_content(path, content, spec, stem)


def verify_content(path, content, spec, stem):
    """Check the uncompressed ``content`` of file ``stem`` of ``spec``.

    ``path`` is named in the messages.  Returns the content MD5.

    Raises
    ------
    ChecksumError
        The MD5 differs from the published one.
    ValueError
        ``stem`` is not a file of the dataset.
    """
    md5 = md5_hex(content)
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
