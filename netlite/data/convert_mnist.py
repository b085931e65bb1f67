"""convert-mnist: IDX images + labels -> an LMDB of Caffe Datum records.

The port of Caffe's ``examples/mnist/convert_mnist_data``: every image
becomes one ``Datum`` (channels 1, height and width from the file, the
pixels as uint8 ``data`` bytes, the label), stored under the key
``"%08d" % index`` and committed every 1000 records.  The records are
byte-for-byte what Caffe writes, so Caffe's LeNet prototxt (a ``Data``
layer reading ``mnist_train_lmdb``) runs unchanged::

    netlite convert-mnist train-images-idx3-ubyte.gz \\
        train-labels-idx1-ubyte.gz examples/mnist/mnist_train_lmdb
    netlite convert-mnist --source mnist:test examples/mnist/mnist_test_lmdb

Input files may be gzip or raw (detected by content), unlike Caffe's tool,
which needs them uncompressed.
"""

import argparse
import logging
import os
import shutil
import sys

import numpy as np

from netlite import io
from netlite.data import catalog, idx, lookup
from netlite.data.lmdb import import_lmdb
from netlite.proto import netlite_pb2

logger = logging.getLogger("netlite")

#: Records per write transaction (Caffe commits every 1000).
COMMIT_EVERY = 1000

_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension


def _read_magic(path):
    _, content = idx.read_idx_bytes(path)
    magic = int.from_bytes(content[:4], "big") if len(content) >= 4 else None
    return content, magic


def convert_mnist(images_path, labels_path, db_path, backend="lmdb"):
    """Write an MNIST-style IDX pair as a Caffe LMDB of Datum records.

    Parameters
    ----------
    images_path : path-like
        IDX ubyte images, magic 0x00000803, shape (N, rows, cols).
    labels_path : path-like
        IDX ubyte labels, magic 0x00000801, shape (N,).
    db_path : path-like
        The LMDB directory to create; it must not exist yet (Caffe's
        ``db::NEW``).
    backend : {"lmdb"}
        LevelDB is not supported.

    Returns
    -------
    int
        The number of records written.

    Raises
    ------
    IDXFormatError
        Wrong magic numbers, damaged files, or different image and label
        counts.
    FileExistsError
        ``db_path`` exists.
    """
    if str(backend).lower() != "lmdb":
        raise ValueError(
            f"backend {backend!r} is not supported; netlite writes LMDB only"
        )
    lmdb = import_lmdb("convert-mnist")
    image_content, magic = _read_magic(images_path)
    if magic != _IMAGES_MAGIC:
        raise idx.IDXFormatError(
            f"{images_path}: incorrect image file magic "
            f"{'none' if magic is None else f'0x{magic:08x}'} (expected 0x00000803)"
        )
    label_content, magic = _read_magic(labels_path)
    if magic != _LABELS_MAGIC:
        raise idx.IDXFormatError(
            f"{labels_path}: incorrect label file magic "
            f"{'none' if magic is None else f'0x{magic:08x}'} (expected 0x00000801)"
        )
    images = idx.parse_idx(image_content, str(images_path))
    labels = idx.parse_idx(label_content, str(labels_path))
    if images.shape[0] != labels.shape[0]:
        raise idx.IDXFormatError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has "
            f"{labels.shape[0]} labels"
        )
    num, rows, cols = images.shape
    db_path = os.path.normpath(os.fspath(db_path))
    if os.path.exists(db_path):
        raise FileExistsError(f"{db_path} already exists; remove it or pick another")
    logger.info("A total of %d items.", num)
    logger.info("Rows: %d Cols: %d", rows, cols)
    # Generous map size (LMDB reserves address space, not disk): the
    # payload plus per-record overhead, doubled.
    map_size = 2 * (num * (rows * cols + 64) + (1 << 20))
    # Build in a sibling temporary directory and rename it into place, so an
    # interrupted conversion never leaves a partial database under db_path.
    parent = os.path.dirname(os.path.abspath(db_path))
    # The directory and the files get the umask's permissions, as mkdir and
    # open() give them (lmdb drops the execute bits of ``mode`` for files).
    tmp = io.make_temp_dir(parent, prefix=f".{os.path.basename(db_path)}.")
    try:
        env = lmdb.open(tmp, map_size=map_size, subdir=True, mode=0o777)
        try:
            _write_records(env, images, labels.view(np.int8))
        finally:
            env.close()
        os.rename(tmp, db_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Processed %d files.", num)
    return num


def _write_records(env, images, labels):
    num, rows, cols = images.shape
    datum = netlite_pb2.Datum(channels=1, height=rows, width=cols)
    txn = env.begin(write=True)
    try:
        for index in range(num):
            datum.data = images[index].tobytes()
            datum.label = int(labels[index])
            txn.put(f"{index:08d}".encode("ascii"), datum.SerializeToString())
            if (index + 1) % COMMIT_EVERY == 0:
                txn.commit()
                txn = env.begin(write=True)
        txn.commit()
    except BaseException:
        txn.abort()
        raise


def main(argv=None):
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="netlite convert-mnist",
        description=(
            "Convert MNIST-style IDX files (gzip or raw) to an LMDB of Caffe "
            "Datum records, like Caffe's convert_mnist_data."
        ),
    )
    parser.add_argument(
        "paths", nargs="+", metavar="PATH",
        help="IMAGES LABELS DB, or only DB with --source",
    )
    parser.add_argument(
        "--source", metavar="DATASET:SPLIT",
        help="read a named dataset instead of files, e.g. mnist:train",
    )
    parser.add_argument(
        "--data", metavar="DIR", help="directory searched first for --source",
    )
    parser.add_argument(
        "--backend", default="lmdb", help="database backend (only lmdb)",
    )
    args = parser.parse_args(argv)
    try:
        if args.source:
            if len(args.paths) != 1:
                parser.error("with --source give only the output DB path")
            name, split = catalog.parse_source(args.source)
            images, labels = lookup.dataset_files(name, split, args.data)
            db_path = args.paths[0]
        else:
            if len(args.paths) != 3:
                parser.error("expected IMAGES LABELS DB (or --source with DB)")
            images, labels, db_path = args.paths
        count = convert_mnist(images, labels, db_path, backend=args.backend)
    except (OSError, ValueError, ImportError) as exc:
        print(f"netlite convert-mnist: error: {exc}", file=sys.stderr)
        return 1
    print(f"Wrote {count} records to {db_path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
