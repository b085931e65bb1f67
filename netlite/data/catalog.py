"""The named datasets and where they are looked for.

:data:`DATASETS` describes ``"mnist"`` and ``"fashion-mnist"``: their
mirrors, their published checksums and their sizes (:class:`DatasetSpec`).
:func:`search_dirs` lists the directories searched for a dataset, in this
order:

1. the directory the caller passes (the command line's ``--data``), then
   the one set with :func:`set_data_dir`; each as ``DIR/<name>/`` and as
   ``DIR/`` itself;
2. ``$NETLITE_DATA/<name>/`` (``NETLITE_DATA`` may list several
   directories separated by ``os.pathsep``);
3. the per-user cache, ``$XDG_CACHE_HOME/netlite/<name>/`` or
   ``~/.cache/netlite/<name>/`` (:func:`cache_dir`);
4. Debian's ``/usr/share/datasets/<name>/`` (``apt-get install
   dataset-fashion-mnist``).

A directory qualifies when it holds all four files, each either as the
canonical ``.gz`` or uncompressed (:func:`has_all_files`).  The search
itself, with the download fallback, is
:func:`netlite.data.lookup.find_dataset`.  See docs/datasets.md.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

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


def parse_source(source):
    """Split ``"mnist:train"`` into ``("mnist", "train")`` (validated)."""
    name, sep, split = str(source).partition(":")
    if not sep:
        raise ValueError(
            f"dataset source {source!r} must be '<dataset>:<split>' such as "
            "'mnist:train' or 'fashion-mnist:test'"
        )
    return get_spec(name).name, normalize_split(split)


def file_in(directory, stem):
    """The ``.gz`` or uncompressed file ``stem`` in ``directory``, or None."""
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def has_all_files(directory, spec):
    """True when ``directory`` holds every file of ``spec`` (either form)."""
    return all(file_in(directory, stem) for stem in spec.stems)
