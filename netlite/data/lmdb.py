"""LMDB helpers: importing py-lmdb, sharing environments, decoding Datums.

The optional ``lmdb`` package is imported on first use
(:func:`import_lmdb`, with an install hint).  :func:`acquire_env` and
:func:`release_env` share one read-only environment per database among the
data layers that read it; :func:`decode_datum` turns a serialized Caffe
``Datum`` into an array and a label.  Used by the ``Data`` layer
(layers/data.py) and by :mod:`netlite.data.convert_mnist`.  See
docs/layers/data.md.
"""

import os
import threading

import numpy as np

from netlite.errors import LayerSetupError, ShapeError
from netlite.proto import netlite_pb2

# py-lmdb refuses to open one environment twice in a process, and a TRAIN
# and a TEST net (or two nets) may read the same database: share one
# read-only environment per path, closed when its last layer goes away.
_envs = {}
_envs_lock = threading.Lock()


def import_lmdb(owner="netlite"):
    """Import the optional ``lmdb`` package, with an install hint."""
    try:
        import lmdb
    except ImportError:
        raise ImportError(
            f"{owner}: reading or writing LMDB needs the 'lmdb' package: "
            "pip install lmdb (or pip install 'netlite-caffe[lmdb]')"
        ) from None
    return lmdb


def acquire_env(path, owner):
    """Open (or share) a read-only LMDB environment for ``path``.

    Parameters
    ----------
    path : str
        The LMDB directory.
    owner : str
        Named in error messages (e.g. ``"Data layer 'mnist'"``).

    Returns
    -------
    key : str
        The real path; give it to :func:`release_env` when done.
    env : lmdb.Environment
        Shared by every user of the same database.

    Raises
    ------
    LayerSetupError
        When the database cannot be opened.
    """
    lmdb = import_lmdb(owner)
    key = os.path.realpath(path)
    with _envs_lock:
        entry = _envs.get(key)
        if entry is None:
            try:
                env = lmdb.open(key, readonly=True, lock=False, readahead=False,
                                max_readers=1024)
            except lmdb.Error as exc:
                raise LayerSetupError(
                    f"{owner}: cannot open LMDB '{path}': {exc}"
                ) from None
            entry = _envs[key] = [env, 0]
        entry[1] += 1
        return key, entry[0]


def release_env(key):
    """Drop one reference to the environment of ``key``; close it at zero."""
    with _envs_lock:
        entry = _envs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _envs[key]
            entry[0].close()


def decode_datum(value, owner="Datum"):
    """Decode a serialized Datum into ``(array (C, H, W), label)``.

    The array is uint8 for ``data`` bytes and float32 for ``float_data``.

    Raises
    ------
    ShapeError
        When the payload size does not match channels x height x width.
    LayerSetupError
        For encoded (JPEG/PNG) datums, which netlite cannot decode.
    """
    datum = netlite_pb2.Datum.FromString(value)
    if datum.encoded:
        raise LayerSetupError(
            f"{owner}: encoded (JPEG/PNG) Datum records need OpenCV and are not "
            "supported; store raw pixels (convert_imageset without --encoded)"
        )
    shape = (datum.channels, datum.height, datum.width)
    size = shape[0] * shape[1] * shape[2]
    if datum.data:
        pixels = np.frombuffer(datum.data, dtype=np.uint8)
    else:
        pixels = np.asarray(datum.float_data, dtype=np.float32)
    if size <= 0 or pixels.size != size:
        raise ShapeError(
            f"{owner}: a Datum of shape {shape} holds {pixels.size} values"
        )
    return pixels.reshape(shape), datum.label
