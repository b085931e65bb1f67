"""Every file netlite writes gets the umask's permissions, as ``open()``
gives them.

Atomic writes go through a temporary file; :func:`tempfile.mkstemp` would
create it with mode 0600 and the rename would keep that, so snapshots were
private while plots were not.  Each test sets a umask and checks the modes
of what was written: weights, snapshots (tests/solvers_tests), plots, the
converted LMDB and the download's temporary file.
"""

import os
import stat

import numpy as np
import pytest

import netlite
from netlite import io
from netlite.data import convert_mnist, idx
from netlite.tools import plotting

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")


@pytest.fixture(params=[0o022, 0o027, 0o002], ids=["022", "027", "002"])
def umask(request):
    """Run the test under this umask; returns it."""
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_of_a_new_file(tmp_path, umask):
    path = tmp_path / "new" / "file.bin"
    io.atomic_write_bytes(path, b"payload")
    assert path.read_bytes() == b"payload"
    assert mode(path) == 0o666 & ~umask
    assert mode(path.parent) == 0o777 & ~umask  # makedirs, as mkdir -p
    assert os.listdir(path.parent) == ["file.bin"]


def test_a_rewritten_file_gets_the_umask_mode_too(tmp_path, umask):
    # The file is new (written beside and renamed): a snapshot that an
    # older netlite wrote 0600 does not stay private when it is rewritten.
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")
    os.chmod(path, 0o600)
    io.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and mode(path) == 0o666 & ~umask


def test_same_mode_as_open(tmp_path, umask):
    with open(tmp_path / "plain", "wb"):
        pass
    io.atomic_write_bytes(tmp_path / "atomic", b"")
    assert mode(tmp_path / "atomic") == mode(tmp_path / "plain")


def test_temporary_files_and_directories(tmp_path, umask):
    fd, path = io.make_temp_file(tmp_path, prefix=".x.", suffix=".part")
    os.close(fd)
    assert os.path.basename(path).startswith(".x.") and path.endswith(".part")
    assert mode(path) == 0o666 & ~umask
    directory = io.make_temp_dir(tmp_path, prefix=".db.")
    assert os.path.basename(directory).startswith(".db.")
    assert mode(directory) == 0o777 & ~umask
    # Fresh names every time.
    assert io.make_temp_dir(tmp_path, prefix=".db.") != directory


def test_weights_files(tmp_path, umask):
    net = netlite.Net("""
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"
  inner_product_param { num_output: 1 } }
""", netlite.TEST)
    for name in ("w.caffemodel", "w.npz"):
        net.save(str(tmp_path / name))
        assert mode(tmp_path / name) == 0o666 & ~umask, name


def test_plots(tmp_path, umask):
    pytest.importorskip("matplotlib")
    history = plotting.TrainingHistory()
    for i in range(5):
        history.add_train(i, 1.0 / (i + 1))
    history.add_test(4, {"accuracy": 0.5})
    paths = plotting.plot_history(history, tmp_path / "plots")
    assert len(paths) == 2
    for path in paths:
        assert mode(path) == 0o666 & ~umask, path
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path / "plots")) == ["accuracy.png", "loss.png"]


def test_converted_lmdb(tmp_path, umask):
    pytest.importorskip("lmdb")
    images = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    labels = np.array([0, 1, 2], dtype=np.uint8)
    idx.save_idx(tmp_path / "images.idx", images)
    idx.save_idx(tmp_path / "labels.idx", labels)
    db = tmp_path / "db"
    assert convert_mnist.convert_mnist(tmp_path / "images.idx",
                                       tmp_path / "labels.idx", db) == 3
    # The directory as mkdir makes it, the files as open() makes them
    # (neither mkdtemp's 0700 nor lmdb's default 0755).
    assert mode(db) == 0o777 & ~umask
    for name in os.listdir(db):
        assert mode(db / name) == 0o666 & ~umask, name
