"""Downloading the named datasets from their mirrors.

:func:`download_dataset` fetches the missing files of a dataset into a
directory (by default the user cache), trying each mirror in turn; every
file is written atomically and checked against the published MD5 of the
``.gz`` (or, for a re-packed gzip, the MD5 of its content).  See
docs/datasets.md.
"""

import hashlib
import logging
import os
import sys
import urllib.error
from pathlib import Path

from netlite import io
from netlite.data.catalog import cache_dir, file_in, get_spec
from netlite.data.idx import IDXFormatError, read_idx_bytes
from netlite.data.verify import ChecksumError, md5_hex

logger = logging.getLogger("netlite")

#: Seconds before a download attempt gives up on an unresponsive mirror.
DOWNLOAD_TIMEOUT = 30

# The URL opener; None means urllib.request.urlopen (imported on first use:
# it pulls in http.client and ssl).  Tests replace it.
_urlopen = None


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
            if not file_in(directory, stem):
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
    # The umask's permissions (mkstemp's 0600 would hide the cached data).
    fd, tmp = io.make_temp_file(dest.parent, prefix=f".{dest.name}.",
                                suffix=".part")
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
                content_md5 = md5_hex(read_idx_bytes(tmp)[1])
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
