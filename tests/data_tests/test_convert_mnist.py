"""netlite.data.convert_mnist: IDX -> LMDB of Caffe Datum records."""

import dataclasses
import gzip
import hashlib
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from netlite.data import catalog, download
from netlite.data.convert_mnist import convert_mnist, main
from netlite.data.idx import IDXFormatError, save_idx
from netlite.data.mnist import load_mnist
from netlite.proto import netlite_pb2

lmdb = pytest.importorskip("lmdb")

SHARED = Path(__file__).resolve().parents[3] / "shared" / "datasets"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("network disabled in the tests")

    monkeypatch.setattr(download, "_urlopen", offline)


def _idx_pair(tmp_path, n=7, rows=4, cols=3, seed=0, compress=True):
    gen = np.random.default_rng(seed)
    images = gen.integers(0, 256, (n, rows, cols)).astype(np.uint8)
    labels = gen.integers(0, 10, n).astype(np.uint8)
    suffix = ".gz" if compress else ""
    save_idx(tmp_path / f"images{suffix}", images)
    save_idx(tmp_path / f"labels{suffix}", labels)
    return tmp_path / f"images{suffix}", tmp_path / f"labels{suffix}", images, labels


def _read_db(path):
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return list(txn.cursor().iternext())
    finally:
        env.close()


def _caffe_record(image, label):
    """The bytes Caffe's convert_mnist_data stores, spelled out by hand:
    channels=1 (field 1), height (2), width (3), data (4), label (5)."""
    def varint(v):
        out = b""
        while True:
            byte, v = v & 0x7F, v >> 7
            out += bytes([byte | (0x80 if v else 0)])
            if not v:
                return out

    def signed_varint(v):
        return varint(v if v >= 0 else v + (1 << 64))

    rows, cols = image.shape
    data = image.tobytes()
    return (b"\x08\x01" + b"\x10" + varint(rows) + b"\x18" + varint(cols)
            + b"\x22" + varint(len(data)) + data + b"\x28" + signed_varint(label))


@pytest.mark.parametrize("compress", [True, False])
def test_records_match_caffe_byte_for_byte(tmp_path, compress):
    images_path, labels_path, images, labels = _idx_pair(tmp_path, compress=compress)
    assert convert_mnist(images_path, labels_path, tmp_path / "db") == 7
    records = _read_db(tmp_path / "db")
    assert [k for k, _ in records] == [f"{i:08d}".encode() for i in range(7)]
    for i, (_, value) in enumerate(records):
        assert value == _caffe_record(images[i], int(labels[i]))
        datum = netlite_pb2.Datum.FromString(value)
        assert (datum.channels, datum.height, datum.width) == (1, 4, 3)
        assert datum.label == labels[i]
        assert np.array_equal(np.frombuffer(datum.data, np.uint8).reshape(4, 3),
                              images[i])
    assert sorted(p.name for p in (tmp_path / "db").iterdir()) == [
        "data.mdb", "lock.mdb"
    ]


def test_labels_go_through_a_signed_char_like_caffe(tmp_path):
    save_idx(tmp_path / "i", np.zeros((2, 1, 1), np.uint8))
    save_idx(tmp_path / "l", np.array([127, 200], np.uint8))
    convert_mnist(tmp_path / "i", tmp_path / "l", tmp_path / "db")
    records = _read_db(tmp_path / "db")
    labels = [netlite_pb2.Datum.FromString(v).label for _, v in records]
    assert labels == [127, -56]


def test_many_commits(tmp_path):
    # More than two 1000-record transactions, and a partial last one.
    images_path, labels_path, images, labels = _idx_pair(tmp_path, n=2345, rows=2,
                                                         cols=2)
    convert_mnist(images_path, labels_path, tmp_path / "db")
    records = _read_db(tmp_path / "db")
    assert len(records) == 2345
    assert records[-1][0] == b"00002344"
    last = netlite_pb2.Datum.FromString(records[-1][1])
    assert last.label == labels[-1] and last.data == images[-1].tobytes()


def test_refuses_existing_database(tmp_path):
    images_path, labels_path, _, _ = _idx_pair(tmp_path)
    (tmp_path / "db").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        convert_mnist(images_path, labels_path, tmp_path / "db")


def test_bad_inputs_leave_nothing_behind(tmp_path):
    images_path, labels_path, _, _ = _idx_pair(tmp_path)
    with pytest.raises(IDXFormatError, match=r"incorrect image file magic 0x00000801"):
        convert_mnist(labels_path, labels_path, tmp_path / "db")
    with pytest.raises(IDXFormatError, match=r"incorrect label file magic 0x00000803"):
        convert_mnist(images_path, images_path, tmp_path / "db")
    save_idx(tmp_path / "few", np.zeros(3, np.uint8))
    with pytest.raises(IDXFormatError, match="has 7 images but .* has 3 labels"):
        convert_mnist(images_path, tmp_path / "few", tmp_path / "db")
    (tmp_path / "cut.gz").write_bytes(images_path.read_bytes()[:30])
    with pytest.raises(IDXFormatError, match="truncated gzip"):
        convert_mnist(tmp_path / "cut.gz", labels_path, tmp_path / "db")
    with pytest.raises(ValueError, match="LMDB only"):
        convert_mnist(images_path, labels_path, tmp_path / "db", backend="leveldb")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cut.gz", "few", "images.gz", "labels.gz"
    ]


def test_main_with_files(tmp_path, capsys):
    images_path, labels_path, _, _ = _idx_pair(tmp_path)
    rc = main([str(images_path), str(labels_path), str(tmp_path / "db")])
    assert rc == 0
    assert "Wrote 7 records" in capsys.readouterr().out
    assert len(_read_db(tmp_path / "db")) == 7
    # Errors are reported on stderr with a non-zero status.
    assert main([str(images_path), str(labels_path), str(tmp_path / "db")]) == 1
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(images_path), str(tmp_path / "db")])


def test_main_with_named_dataset(tmp_path, monkeypatch, capsys):
    directory = tmp_path / "data" / "mnist"
    directory.mkdir(parents=True)
    gen = np.random.default_rng(5)
    files = {}
    for stem, shape in (("train-images-idx3-ubyte", (3, 28, 28)),
                        ("train-labels-idx1-ubyte", (3,)),
                        ("t10k-images-idx3-ubyte", (2, 28, 28)),
                        ("t10k-labels-idx1-ubyte", (2,))):
        save_idx(directory / f"{stem}.gz", gen.integers(0, 10, shape).astype(np.uint8))
        files[stem] = (directory / f"{stem}.gz").read_bytes()
    md5 = {s: hashlib.md5(gzip.decompress(b)).hexdigest() for s, b in files.items()}
    monkeypatch.setitem(catalog.DATASETS, "mnist", dataclasses.replace(
        catalog.DATASETS["mnist"], content_md5=md5))
    rc = main(["--source", "mnist:test", "--data", str(tmp_path / "data"),
               str(tmp_path / "db")])
    assert rc == 0, capsys.readouterr().err
    assert len(_read_db(tmp_path / "db")) == 2
    with pytest.raises(SystemExit):
        main(["--source", "mnist:test", "a", "b"])


@pytest.mark.skipif(not (SHARED / "mnist" / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="MNIST not found")
def test_real_mnist_test_set(tmp_path):
    mnist = SHARED / "mnist"
    n = convert_mnist(mnist / "t10k-images-idx3-ubyte.gz",
                      mnist / "t10k-labels-idx1-ubyte.gz", tmp_path / "mnist_test_lmdb")
    assert n == 10000
    records = _read_db(tmp_path / "mnist_test_lmdb")
    images, labels = load_mnist("mnist", "test", data_dir=mnist)
    assert len(records) == 10000
    for i in (0, 1, 9999):
        assert records[i][1] == _caffe_record(images[i], int(labels[i]))
    assert len(records[0][1]) == 795  # 784 pixels + 11 bytes of fields
