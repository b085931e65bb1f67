"""netlite.data: the named datasets, their lookup, download, checksums and
loading (the IDX reader itself is tested in test_idx.py).

No test touches the network: an autouse fixture replaces the URL opener by
one that fails like an offline machine, and the download tests serve files
from a fake opener or from a local HTTP server on 127.0.0.1.
"""

import dataclasses
import gzip
import hashlib
import http.server
import io
import os
import shutil
import struct
import threading
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from netlite.data import catalog, download, lookup, mnist, verify
from netlite.data.idx import IDXFormatError, load_idx, save_idx
from netlite.data.lookup import DatasetNotFoundError
from netlite.data.verify import ChecksumError

SHARED = Path(__file__).resolve().parents[3] / "shared" / "datasets"
MNIST_DIR = SHARED / "mnist"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
STEMS = [
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
]

needs_mnist = pytest.mark.skipif(
    not (MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason=f"MNIST not found in {MNIST_DIR}",
)
needs_fashion = pytest.mark.skipif(
    not (DEBIAN_FASHION / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed",
)

# From /work/shared/datasets/mnist/SOURCE.md.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _offline_urlopen(url, timeout=None):
    raise urllib.error.URLError("network disabled in the tests")


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No network, no real cache/HOME, no NETLITE_* variables, empty
    system directory; restores the module setting afterwards."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("NETLITE_DATA", raising=False)
    monkeypatch.delenv("NETLITE_OFFLINE", raising=False)
    monkeypatch.setattr(catalog, "SYSTEM_DATA_DIRS", (tmp_path / "system",))
    monkeypatch.setattr(download, "_urlopen", _offline_urlopen)
    previous = catalog.get_data_dir()
    catalog.set_data_dir(None)
    yield tmp_path
    catalog.set_data_dir(previous)


def _md5(data):
    return hashlib.md5(data).hexdigest()


# ------------------------------------------------------------ synthetic data
def _synthetic_files(directory, n_train=12, n_test=5, compress=True, seed=0):
    """Write a tiny MNIST-shaped dataset; return {stem: raw file bytes}."""
    gen = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": gen.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": gen.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": gen.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": gen.integers(0, 10, n_test),
    }
    files = {}
    for stem, array in arrays.items():
        path = directory / (stem + (".gz" if compress else ""))
        save_idx(path, array.astype(np.uint8))
        files[stem] = path.read_bytes()
    return files


def _synthetic_spec(files, name="mnist"):
    """A copy of the real spec whose checksums describe ``files``."""
    spec = catalog.DATASETS[name]
    gz = {s: _md5(b) for s, b in files.items()}
    content = {s: _md5(gzip.decompress(b)) for s, b in files.items()}
    return dataclasses.replace(
        spec, gz_md5=gz, content_md5=content, other_gz_md5={},
        mirrors=("http://mirror-a.invalid/", "http://mirror-b.invalid/"),
    )


class _FakeResponse(io.BytesIO):
    def __init__(self, payload, fail_after=None):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}
        self.fail_after = fail_after

    def read(self, n=-1):
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise ConnectionResetError("connection reset (test)")
        return super().read(n)


class _FakeOpener:
    """Serves ``{url: bytes or Exception}``; records the URLs asked for."""

    def __init__(self, routes, fail_after=None):
        self.routes = routes
        self.calls = []
        self.fail_after = fail_after

    def __call__(self, url, timeout=None):
        self.calls.append(url)
        assert timeout is not None  # never wait forever on a mirror
        item = self.routes.get(url, urllib.error.HTTPError(
            url, 404, "Not Found", {}, None))
        if isinstance(item, BaseException):
            raise item
        return _FakeResponse(item, self.fail_after)


# ----------------------------------------------------------------- real MNIST
@needs_mnist
def test_real_mnist_train():
    images, labels = mnist.load_mnist("mnist", "train", data_dir=SHARED)
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,) and labels.dtype == np.uint8
    assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert np.bincount(labels, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert images.mean() / 255 == pytest.approx(0.1307, abs=5e-5)
    assert not images.flags.writeable  # shared with the cache


@needs_mnist
def test_real_mnist_test():
    images, labels = mnist.load_mnist("mnist", "test", data_dir=MNIST_DIR)
    assert images.shape == (10000, 28, 28)
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(labels, minlength=10).tolist() == MNIST_TEST_COUNTS
    # The IDX header: magic 0x00000803 and 10000 x 28 x 28.
    content = gzip.decompress((MNIST_DIR / "t10k-images-idx3-ubyte.gz").read_bytes())
    assert struct.unpack(">4I", content[:16]) == (0x803, 10000, 28, 28)
    assert np.array_equal(images.reshape(-1), np.frombuffer(content[16:], np.uint8))


@needs_mnist
@pytest.mark.parametrize("stem", STEMS)
def test_real_mnist_checksum_tables(stem):
    raw = (MNIST_DIR / f"{stem}.gz").read_bytes()
    spec = catalog.DATASETS["mnist"]
    assert _md5(raw) == spec.gz_md5[stem]
    assert _md5(gzip.decompress(raw)) == spec.content_md5[stem]
    assert verify.verify_file(MNIST_DIR / f"{stem}.gz", "mnist") == (
        spec.content_md5[stem]
    )


@needs_mnist
def test_real_mnist_uncompressed_copy_verifies(tmp_path):
    # Files found uncompressed are checked by their content MD5.
    for stem in STEMS[2:]:
        raw = gzip.decompress((MNIST_DIR / f"{stem}.gz").read_bytes())
        (tmp_path / "plain" / "mnist").mkdir(parents=True, exist_ok=True)
        (tmp_path / "plain" / "mnist" / stem).write_bytes(raw)
    for stem in STEMS[:2]:
        shutil.copy(MNIST_DIR / f"{stem}.gz", tmp_path / "plain" / "mnist")
    images, labels = mnist.load_mnist("mnist", "test", data_dir=tmp_path / "plain")
    ref_images, ref_labels = mnist.load_mnist("mnist", "test", data_dir=MNIST_DIR)
    assert np.array_equal(images, ref_images) and np.array_equal(labels, ref_labels)


@needs_mnist
def test_mnist_files_do_not_pass_as_fashion_mnist():
    with pytest.raises(ChecksumError, match="not the 'fashion-mnist' file"):
        mnist.load_mnist("fashion-mnist", "test", data_dir=MNIST_DIR)


@needs_mnist
def test_download_real_files_with_fake_opener(isolated, monkeypatch):
    # The canonical .gz files, served by a fake mirror: the published MD5s
    # of the .gz must match, and they land in the user cache.
    mirror = catalog.DATASETS["mnist"].mirrors[0]
    routes = {mirror + f"{s}.gz": (MNIST_DIR / f"{s}.gz").read_bytes() for s in STEMS}
    opener = _FakeOpener(routes)
    monkeypatch.setattr(download, "_urlopen", opener)
    found = lookup.find_dataset("mnist")
    assert found == isolated / "home" / ".cache" / "netlite" / "mnist"
    assert sorted(opener.calls) == sorted(routes)
    for stem in STEMS:
        assert (found / f"{stem}.gz").read_bytes() == routes[mirror + f"{stem}.gz"]
    assert sorted(p.name for p in found.iterdir()) == sorted(f"{s}.gz" for s in STEMS)


# ----------------------------------------------------------- Fashion-MNIST
@needs_fashion
def test_fashion_mnist_from_debian(monkeypatch):
    monkeypatch.setattr(catalog, "SYSTEM_DATA_DIRS", (Path("/usr/share/datasets"),))
    assert lookup.find_dataset("fashion-mnist", download=False) == DEBIAN_FASHION
    images, labels = mnist.load_mnist("Fashion_MNIST", "train", download=False)
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [6000] * 10
    images, labels = mnist.load_mnist("fashion-mnist", "test", download=False)
    assert images.shape == (10000, 28, 28)
    assert np.bincount(labels).tolist() == [1000] * 10


@needs_fashion
@pytest.mark.parametrize("stem", STEMS)
def test_fashion_mnist_checksum_tables(stem):
    # Debian's .gz differ from Zalando's, the content is the same.
    raw = (DEBIAN_FASHION / f"{stem}.gz").read_bytes()
    spec = catalog.DATASETS["fashion-mnist"]
    assert _md5(raw) == spec.other_gz_md5[stem] != spec.gz_md5[stem]
    assert verify.verify_file(DEBIAN_FASHION / f"{stem}.gz", "fashion-mnist") == (
        spec.content_md5[stem]
    )


# ------------------------------------------------------------------ lookup
def _complete_dir(directory, compress=True):
    _synthetic_files(directory, compress=compress)
    return directory


def test_lookup_order(isolated, monkeypatch):
    root = isolated
    explicit = _complete_dir(root / "explicit" / "mnist")
    setting = _complete_dir(root / "setting")  # the files directly in DIR
    env = _complete_dir(root / "env" / "mnist")
    cache = _complete_dir(root / "home" / ".cache" / "netlite" / "mnist")
    system = _complete_dir(root / "system" / "mnist")
    monkeypatch.setenv("NETLITE_DATA", str(root / "env"))
    catalog.set_data_dir(root / "setting")
    expected = [explicit, setting, env, cache, system]
    for directory in expected:
        found = lookup.find_dataset("mnist", data_dir=root / "explicit",
                                      download=False)
        assert found == directory
        shutil.rmtree(directory)
    with pytest.raises(DatasetNotFoundError):
        lookup.find_dataset("mnist", data_dir=root / "explicit", download=False)


def test_search_dirs_lists_everything_in_order(isolated, monkeypatch):
    root = isolated
    monkeypatch.setenv("NETLITE_DATA", os.pathsep.join([str(root / "a"),
                                                        str(root / "b")]))
    catalog.set_data_dir(root / "cli")
    dirs = [d for d, _ in catalog.search_dirs("mnist", data_dir=root / "arg")]
    assert dirs == [
        root / "arg" / "mnist", root / "arg",
        root / "cli" / "mnist", root / "cli",
        root / "a" / "mnist", root / "b" / "mnist",
        root / "home" / ".cache" / "netlite" / "mnist",
        root / "system" / "mnist",
    ]


def test_xdg_cache_home(isolated, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(isolated / "xdg"))
    assert catalog.cache_dir("mnist") == isolated / "xdg" / "netlite" / "mnist"
    _complete_dir(isolated / "xdg" / "netlite" / "mnist")
    assert lookup.find_dataset("mnist", download=False) == (
        isolated / "xdg" / "netlite" / "mnist"
    )
    # A relative XDG_CACHE_HOME is ignored (XDG base directory spec).
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert catalog.cache_dir() == isolated / "home" / ".cache" / "netlite"


def test_netlite_data_needs_the_dataset_subdirectory(isolated, monkeypatch):
    _complete_dir(isolated / "flat")
    monkeypatch.setenv("NETLITE_DATA", str(isolated / "flat"))
    with pytest.raises(DatasetNotFoundError):
        lookup.find_dataset("mnist", download=False)
    _complete_dir(isolated / "flat" / "fashion-mnist")
    assert lookup.find_dataset("fashion-mnist", download=False) == (
        isolated / "flat" / "fashion-mnist"
    )


def test_lookup_accepts_uncompressed_and_mixed(isolated):
    _complete_dir(isolated / "plain" / "mnist", compress=False)
    assert lookup.find_dataset("mnist", isolated / "plain", download=False) == (
        isolated / "plain" / "mnist"
    )
    # Mixed: one file uncompressed, the others gzip.
    mixed = _complete_dir(isolated / "mixed")
    gz = mixed / "t10k-labels-idx1-ubyte.gz"
    (mixed / "t10k-labels-idx1-ubyte").write_bytes(gzip.decompress(gz.read_bytes()))
    gz.unlink()
    images_path, labels_path = lookup.dataset_files(
        "mnist", "test", isolated / "mixed", download=False
    )
    assert images_path.name == "t10k-images-idx3-ubyte.gz"
    assert labels_path.name == "t10k-labels-idx1-ubyte"
    assert load_idx(labels_path).shape == (5,)


def test_lookup_skips_incomplete_directory(isolated):
    partial = _complete_dir(isolated / "partial" / "mnist")
    (partial / "train-images-idx3-ubyte.gz").unlink()
    complete = _complete_dir(isolated / "home" / ".cache" / "netlite" / "mnist")
    assert lookup.find_dataset("mnist", isolated / "partial",
                                 download=False) == complete
    shutil.rmtree(complete)
    with pytest.raises(DatasetNotFoundError,
                       match=r"partial/mnist  \(data directory; incomplete, "
                             r"missing train-images-idx3-ubyte\)"):
        lookup.find_dataset("mnist", isolated / "partial", download=False)


def test_dataset_names_and_splits():
    assert catalog.get_spec("Fashion_MNIST").name == "fashion-mnist"
    assert catalog.normalize_split("t10k") == "test"
    assert catalog.parse_source("fashion-mnist:train") == ("fashion-mnist", "train")
    with pytest.raises(ValueError, match="known datasets: mnist, fashion-mnist"):
        catalog.get_spec("cifar10")
    with pytest.raises(ValueError, match="'train' or 'test'"):
        catalog.normalize_split("validation")
    with pytest.raises(ValueError, match="'<dataset>:<split>'"):
        catalog.parse_source("mnist")


# ------------------------------------------------------------ offline errors
def test_offline_message_lists_every_path_and_file(isolated, monkeypatch):
    monkeypatch.setenv("NETLITE_DATA", str(isolated / "env"))
    catalog.set_data_dir(isolated / "cli")
    with pytest.raises(DatasetNotFoundError) as info:
        lookup.find_dataset("fashion-mnist", data_dir=isolated / "arg")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "network disabled in the tests" in message
    for directory, _ in catalog.search_dirs("fashion-mnist", isolated / "arg"):
        assert str(directory) in message
    for stem in STEMS:
        assert f"{stem}.gz" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "NETLITE_DATA" in message and "--data" in message
    # A failed attempt leaves no empty cache directory behind.
    assert not (isolated / "home" / ".cache" / "netlite" / "fashion-mnist").exists()


def test_no_download_when_disabled(isolated, monkeypatch):
    opener = _FakeOpener({})
    monkeypatch.setattr(download, "_urlopen", opener)
    with pytest.raises(DatasetNotFoundError, match="downloading was not requested"):
        lookup.find_dataset("mnist", download=False)
    monkeypatch.setenv("NETLITE_OFFLINE", "1")
    with pytest.raises(DatasetNotFoundError, match="NETLITE_OFFLINE"):
        lookup.find_dataset("mnist")
    assert opener.calls == []


def test_unwritable_cache_is_reported_as_not_found(isolated, monkeypatch):
    blocker = isolated / "home" / ".cache"
    blocker.write_text("a file where the cache directory should be")
    with pytest.raises(DatasetNotFoundError, match="the download failed"):
        lookup.find_dataset("mnist")


# ---------------------------------------------------------------- download
def _routes(spec, files, mirror=0):
    return {spec.mirrors[mirror] + f"{s}.gz": b for s, b in files.items()}


def test_download_into_cache_and_verify(isolated, monkeypatch):
    files = _synthetic_files(isolated / "origin")
    spec = _synthetic_spec(files)
    monkeypatch.setitem(catalog.DATASETS, "mnist", spec)
    opener = _FakeOpener(_routes(spec, files))
    monkeypatch.setattr(download, "_urlopen", opener)
    images, labels = mnist.load_mnist("mnist", "train")
    cache = isolated / "home" / ".cache" / "netlite" / "mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{s}.gz" for s in STEMS)
    for stem, payload in files.items():
        assert (cache / f"{stem}.gz").read_bytes() == payload
    assert images.shape == (12, 28, 28) and labels.shape == (12,)
    # Found in the cache the second time: nothing is downloaded again.
    opener.calls.clear()
    mnist.load_mnist("mnist", "test")
    assert opener.calls == []


def test_download_falls_back_to_next_mirror(isolated, monkeypatch):
    files = _synthetic_files(isolated / "origin")
    spec = _synthetic_spec(files)
    monkeypatch.setitem(catalog.DATASETS, "mnist", spec)
    routes = _routes(spec, files, mirror=1)
    for stem in STEMS:
        routes[spec.mirrors[0] + f"{stem}.gz"] = urllib.error.URLError("refused")
    opener = _FakeOpener(routes)
    monkeypatch.setattr(download, "_urlopen", opener)
    found = lookup.find_dataset("mnist")
    assert len(opener.calls) == 8
    assert all((found / f"{s}.gz").read_bytes() == files[s] for s in STEMS)


def test_download_checksum_mismatch(isolated, monkeypatch):
    files = _synthetic_files(isolated / "origin")
    spec = _synthetic_spec(files)
    monkeypatch.setitem(catalog.DATASETS, "mnist", spec)
    tampered = dict(files)
    bad = "t10k-labels-idx1-ubyte"  # the last one: the others are kept
    tampered[bad] = gzip.compress(b"\x00\x00\x08\x01" + b"xy")
    routes = _routes(spec, tampered, 0)
    routes.update(_routes(spec, tampered, 1))
    monkeypatch.setattr(download, "_urlopen", _FakeOpener(routes))
    with pytest.raises(ChecksumError) as info:
        lookup.find_dataset("mnist")
    message = str(info.value)
    assert spec.gz_md5[bad] in message and _md5(tampered[bad]) in message
    assert all(m + f"{bad}.gz" in message for m in spec.mirrors)
    cache = isolated / "home" / ".cache" / "netlite" / "mnist"
    # No bad or partial file is left under any name.
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        f"{s}.gz" for s in STEMS if s != bad
    )


def test_download_bad_first_mirror_good_second(isolated, monkeypatch):
    files = _synthetic_files(isolated / "origin")
    spec = _synthetic_spec(files)
    monkeypatch.setitem(catalog.DATASETS, "mnist", spec)
    routes = _routes(spec, files, 1)
    routes.update({k: b"garbage" for k in _routes(spec, files, 0)})
    monkeypatch.setattr(download, "_urlopen", _FakeOpener(routes))
    found = lookup.find_dataset("mnist")
    assert all((found / f"{s}.gz").read_bytes() == files[s] for s in STEMS)


def test_download_accepts_recompressed_gzip_with_same_content(isolated, monkeypatch):
    files = _synthetic_files(isolated / "origin")
    spec = _synthetic_spec(files)
    monkeypatch.setitem(catalog.DATASETS, "mnist", spec)
    # Another gzip header (time stamp, level): another .gz MD5, same content.
    repacked = {s: gzip.compress(gzip.decompress(b), compresslevel=1, mtime=12345)
                for s, b in files.items()}
    assert all(_md5(repacked[s]) != spec.gz_md5[s] for s in STEMS)
    monkeypatch.setattr(download, "_urlopen", _FakeOpener(_routes(spec, repacked)))
    images, _ = mnist.load_mnist("mnist", "train")
    assert images.shape == (12, 28, 28)


def test_interrupted_download_leaves_no_file(isolated, monkeypatch):
    files = _synthetic_files(isolated / "origin")
    spec = _synthetic_spec(files)
    monkeypatch.setitem(catalog.DATASETS, "mnist", spec)
    monkeypatch.setattr(download, "_urlopen",
                        _FakeOpener(_routes(spec, files), fail_after=100))
    target = isolated / "target"
    target.mkdir()
    with pytest.raises(ConnectionResetError):
        download.download_dataset("mnist", target, mirrors=spec.mirrors[:1])
    assert list(target.iterdir()) == []


def test_download_progress_bar(isolated, monkeypatch, capsys):
    files = _synthetic_files(isolated / "origin")
    spec = _synthetic_spec(files)
    monkeypatch.setitem(catalog.DATASETS, "mnist", spec)
    monkeypatch.setattr(download, "_urlopen", _FakeOpener(_routes(spec, files)))
    download.download_dataset("mnist", isolated / "quiet", progress=False)
    assert capsys.readouterr().err == ""
    download.download_dataset("mnist", isolated / "loud", progress=True)
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte.gz" in err


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_from_local_http_server(isolated, monkeypatch):
    files = _synthetic_files(isolated / "served")
    spec = _synthetic_spec(files)
    monkeypatch.setitem(catalog.DATASETS, "mnist", spec)
    monkeypatch.setattr(download, "_urlopen", None)  # the real urlopen
    monkeypatch.setattr(download, "DOWNLOAD_TIMEOUT", 10)

    def handler(*args, **kwargs):
        return _QuietHandler(*args, directory=str(isolated / "served"), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        target = download.download_dataset(
            "mnist", isolated / "dl", progress=False,
            mirrors=[base + "missing/", base],  # the first one answers 404
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert all((target / f"{s}.gz").read_bytes() == files[s] for s in STEMS)


# ------------------------------------------------------- loading and cache
def test_load_verifies_checksums(isolated, monkeypatch):
    files = _synthetic_files(isolated / "data" / "mnist")
    monkeypatch.setitem(catalog.DATASETS, "mnist", _synthetic_spec(files))
    mnist.load_mnist("mnist", "test", isolated / "data")
    other = _synthetic_files(isolated / "other" / "mnist", seed=9)
    assert other != files
    with pytest.raises(ChecksumError, match="t10k-images-idx3-ubyte.*MD5") as info:
        mnist.load_mnist("mnist", "test", isolated / "other")
    assert "image_source/label_source" in str(info.value)
    images, _ = mnist.load_mnist("mnist", "test", isolated / "other", verify=False)
    assert images.shape == (5, 28, 28)


def test_cache_shares_and_notices_changes(isolated):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = isolated / "x.idx"
    save_idx(path, array)
    first = mnist.load_idx_cached(path)
    assert mnist.load_idx_cached(path) is first
    assert not first.flags.writeable
    save_idx(path, array[:1])
    os.utime(path, ns=(1, 1))  # a new mtime even on coarse clocks
    assert mnist.load_idx_cached(path).shape == (1, 3, 4)
    mnist.clear_cache()
    assert mnist.load_idx_cached(path) is not first


def test_pair_validation(isolated):
    save_idx(isolated / "img", np.zeros((4, 2, 2), np.uint8))
    save_idx(isolated / "lab3", np.zeros(3, np.uint8))
    save_idx(isolated / "labf", np.zeros(4, np.float32))
    save_idx(isolated / "lab2d", np.zeros((4, 1), np.uint8))
    save_idx(isolated / "flat", np.zeros(4, np.uint8))
    with pytest.raises(IDXFormatError, match="has 4 images but .* has 3 labels"):
        mnist.load_idx_pair(isolated / "img", isolated / "lab3")
    with pytest.raises(IDXFormatError, match="1-D integer array"):
        mnist.load_idx_pair(isolated / "img", isolated / "labf")
    with pytest.raises(IDXFormatError, match="1-D integer array"):
        mnist.load_idx_pair(isolated / "img", isolated / "lab2d")
    with pytest.raises(IDXFormatError, match="at least 2 axes"):
        mnist.load_idx_pair(isolated / "flat", isolated / "flat")
