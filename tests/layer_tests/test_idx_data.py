"""IDXData layer: in-memory batches from IDX files (MNIST, Fashion-MNIST)."""

import copy
import urllib.error
from pathlib import Path

import numpy as np
import pytest

import netlite
from netlite import rng
from netlite.data import catalog, download, idx, lookup, mnist
from netlite.data.idx import IDXFormatError, save_idx
from netlite.errors import LayerSetupError

SHARED = Path(__file__).resolve().parents[3] / "shared" / "datasets"
needs_mnist = pytest.mark.skipif(
    not (SHARED / "mnist" / "train-images-idx3-ubyte.gz").is_file(),
    reason="MNIST not found",
)
needs_fashion = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed",
)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("network disabled in the tests")

    monkeypatch.setattr(download, "_urlopen", offline)
    previous = catalog.get_data_dir()
    yield
    catalog.set_data_dir(previous)


@pytest.fixture
def idx_files(tmp_path):
    """10 images of 4x5 whose pixels identify them, labels 0..9 reversed."""
    n, h, w = 10, 4, 5
    images = ((np.arange(n)[:, None, None] * 20 + np.arange(h * w).reshape(h, w))
              % 256).astype(np.uint8)
    labels = (9 - np.arange(n)).astype(np.uint8)
    save_idx(tmp_path / "images.gz", images)
    save_idx(tmp_path / "labels", labels)
    return tmp_path / "images.gz", tmp_path / "labels", images, labels


def _param(images_path, labels_path=None, batch_size=4, extra="", transform=""):
    labels = f'label_source: "{labels_path}"' if labels_path else ""
    return (
        f'name: "data" type: "IDXData" '
        f'idx_data_param {{ image_source: "{images_path}" {labels} '
        f"batch_size: {batch_size} {extra} }} "
        f"transform_param {{ {transform} }}"
    )


def _setup(param, dtype=np.float32, tops=2, phase=None):
    if phase is not None:
        param += f" phase: {'TRAIN' if phase == netlite.TRAIN else 'TEST'}"
    layer = netlite.create_layer(param, dtype=dtype)
    top = [netlite.Blob(dtype=dtype) for _ in range(tops)]
    layer.setup([], top)
    return layer, top


def _batches(layer, top, count):
    out = []
    for _ in range(count):
        layer.forward([], top)
        out.append([t.data.copy() for t in top])
    return out


# ------------------------------------------------------------------ basics
def test_shapes_and_values(idx_files, dtype):
    images_path, labels_path, images, labels = idx_files
    layer, top = _setup(_param(images_path, labels_path), dtype)
    assert top[0].shape == (4, 1, 4, 5) and top[1].shape == (4,)
    assert top[0].dtype == dtype and top[1].dtype == dtype
    layer.forward([], top)
    np.testing.assert_array_equal(top[0].data[:, 0], images[:4].astype(dtype))
    np.testing.assert_array_equal(top[1].data, labels[:4].astype(dtype))
    assert layer.backward(top, [], []) is None  # no bottoms, nothing to do


def test_scale_one_over_256(idx_files, dtype):
    images_path, labels_path, images, _ = idx_files
    layer, top = _setup(_param(images_path, labels_path,
                               transform="scale: 0.00390625"), dtype)
    layer.forward([], top)
    # 1/256 is a power of two: the products are exact in both dtypes.
    np.testing.assert_array_equal(top[0].data[:, 0], images[:4].astype(dtype) / 256)
    assert top[0].data.max() <= 255 / 256


def test_mean_then_scale(idx_files, dtype):
    images_path, labels_path, images, _ = idx_files
    layer, top = _setup(_param(images_path, labels_path,
                               transform="scale: 0.5 mean_value: 100"), dtype)
    layer.forward([], top)
    expected = (images[:4].astype(dtype) - dtype.type(100)) * dtype.type(0.5)
    np.testing.assert_array_equal(top[0].data[:, 0], expected)


def test_wraps_around_like_caffe(idx_files):
    images_path, labels_path, images, labels = idx_files
    layer, top = _setup(_param(images_path, labels_path, batch_size=4))
    expected = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1], [2, 3, 4, 5]]
    epochs = [0, 0, 1, 1]
    for index, epoch in zip(expected, epochs):
        layer.forward([], top)
        np.testing.assert_array_equal(top[1].data, labels[index])
        np.testing.assert_array_equal(top[0].data[:, 0], images[index])
        assert layer.epoch == epoch


def test_batch_larger_than_dataset(idx_files):
    images_path, labels_path, _, labels = idx_files
    layer, top = _setup(_param(images_path, labels_path, batch_size=25))
    layer.forward([], top)
    np.testing.assert_array_equal(top[1].data, labels[np.arange(25) % 10])
    assert (layer.epoch, layer.cursor) == (2, 5)


def test_images_only(idx_files):
    images_path, _, images, _ = idx_files
    layer, top = _setup(_param(images_path, batch_size=3), tops=1)
    layer.forward([], top)
    np.testing.assert_array_equal(top[0].data[:, 0], images[:3])


def test_four_dimensional_images(tmp_path):
    images = np.arange(3 * 2 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2, 2)
    save_idx(tmp_path / "i", images)
    save_idx(tmp_path / "l", np.arange(3, dtype=np.uint8))
    layer, top = _setup(_param(tmp_path / "i", tmp_path / "l", batch_size=3))
    layer.forward([], top)
    np.testing.assert_array_equal(top[0].data, images)


def test_shared_cache_between_layers(idx_files):
    images_path, labels_path, _, _ = idx_files
    first, _ = _setup(_param(images_path, labels_path))
    second, _ = _setup(_param(images_path, labels_path, batch_size=2))
    assert first.images is second.images and first.labels is second.labels
    assert not first.images.flags.writeable


# ----------------------------------------------------------------- shuffle
def test_shuffle_reproducible_and_new_each_epoch(idx_files):
    images_path, labels_path, images, labels = idx_files
    param = _param(images_path, labels_path, batch_size=5, extra="shuffle: true")
    netlite.set_random_seed(42)
    layer, top = _setup(param)
    run = _batches(layer, top, 6)  # three epochs of two batches
    netlite.set_random_seed(42)
    again = _batches(*_setup(param), 6)
    for (d1, l1), (d2, l2) in zip(run, again):
        np.testing.assert_array_equal(d1, d2)
        np.testing.assert_array_equal(l1, l2)
    orders = [np.concatenate([run[2 * e][1], run[2 * e + 1][1]]) for e in range(3)]
    for order in orders:  # every epoch visits every sample once
        assert sorted(order.tolist()) == list(range(10))
    assert not np.array_equal(orders[0], orders[1])
    assert not np.array_equal(orders[1], orders[2])
    assert not np.array_equal(orders[0], 9 - np.arange(10))  # not file order
    # Images and labels stay paired.
    for data, label in run:
        index = 9 - label.astype(int)
        np.testing.assert_array_equal(data[:, 0], images[index])
    netlite.set_random_seed(43)
    other = _batches(*_setup(param), 2)
    assert not np.array_equal(other[0][1], run[0][1])


def test_shuffled_batch_straddling_two_epochs(idx_files):
    # Batch 3 (batch_size 4 of 10 samples) ends the first epoch's order and
    # starts the next one, which is drawn at the wrap.
    images_path, labels_path, images, labels = idx_files
    netlite.set_random_seed(7)
    layer, top = _setup(_param(images_path, labels_path, batch_size=4,
                               extra="shuffle: true"))
    first = layer.permutation.copy()
    batches = _batches(layer, top, 3)
    second = layer.permutation
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(
        np.concatenate([batches[0][1], batches[1][1]]), labels[first[:8]])
    index = np.concatenate([first[8:], second[:2]])
    np.testing.assert_array_equal(batches[2][1], labels[index])
    np.testing.assert_array_equal(batches[2][0][:, 0], images[index])
    assert (layer.epoch, layer.cursor) == (1, 2)


# --------------------------------------------------------- crop and mirror
def test_crop_centre_in_test_random_in_train(idx_files, dtype):
    images_path, labels_path, images, _ = idx_files
    param = _param(images_path, labels_path, batch_size=10, transform="crop_size: 2")
    layer, top = _setup(param, dtype, phase=netlite.TEST)
    layer.forward([], top)
    assert top[0].shape == (10, 1, 2, 2)
    # Offsets (4 - 2) // 2 = 1 and (5 - 2) // 2 = 1.
    np.testing.assert_array_equal(top[0].data[:, 0], images[:, 1:3, 1:3])
    layer, top = _setup(param, dtype, phase=netlite.TRAIN)
    layer.forward([], top)
    centre = 0
    for i in range(10):
        crops = [images[i, a:a + 2, b:b + 2] for a in range(3) for b in range(4)]
        assert any(np.array_equal(top[0].data[i, 0], c) for c in crops)
        centre += np.array_equal(top[0].data[i, 0], images[i, 1:3, 1:3])
    assert centre < 10


def test_mirror(idx_files):
    images_path, labels_path, images, _ = idx_files
    layer, top = _setup(_param(images_path, labels_path, batch_size=10,
                               transform="mirror: true"))
    layer.forward([], top)
    flipped = [np.array_equal(top[0].data[i, 0], images[i, :, ::-1])
               for i in range(10)]
    kept = [np.array_equal(top[0].data[i, 0], images[i]) for i in range(10)]
    assert all(f != k for f, k in zip(flipped, kept))
    assert 0 < sum(flipped) < 10


# -------------------------------------------------------------- state dict
def test_state_dict_round_trip_gives_identical_batches(idx_files):
    images_path, labels_path, _, _ = idx_files
    param = _param(images_path, labels_path, batch_size=3, extra="shuffle: true",
                   transform="mirror: true crop_size: 3")
    layer, top = _setup(param, phase=netlite.TRAIN)
    _batches(layer, top, 4)  # crosses an epoch boundary (12 > 10)
    state = copy.deepcopy(layer.state_dict())
    rng_state = copy.deepcopy(rng.get_state())
    assert isinstance(state["cursor"], int) and isinstance(state["epoch"], int)
    assert state["epoch"] == 1 and state["cursor"] == 2
    assert state["permutation"].dtype == np.int64 and state["permutation"].size == 10
    expected = _batches(layer, top, 7)
    netlite.set_random_seed(999)  # a different history...
    resumed, top2 = _setup(param, phase=netlite.TRAIN)
    _batches(resumed, top2, 1)
    resumed.load_state_dict(state)  # ...restored
    rng.set_state(rng_state)
    got = _batches(resumed, top2, 7)
    for (d1, l1), (d2, l2) in zip(expected, got):
        np.testing.assert_array_equal(d1, d2)
        np.testing.assert_array_equal(l1, l2)


def test_state_dict_without_shuffle(idx_files):
    images_path, labels_path, _, labels = idx_files
    layer, top = _setup(_param(images_path, labels_path, batch_size=4))
    _batches(layer, top, 3)
    state = layer.state_dict()
    assert state["permutation"].size == 0
    fresh, top2 = _setup(_param(images_path, labels_path, batch_size=4))
    fresh.load_state_dict(state)
    fresh.forward([], top2)
    np.testing.assert_array_equal(top2[1].data, labels[[2, 3, 4, 5]])


def test_load_state_dict_rejects_mismatches(idx_files):
    images_path, labels_path, _, _ = idx_files
    plain, _ = _setup(_param(images_path, labels_path))
    shuffled, _ = _setup(_param(images_path, labels_path, extra="shuffle: true"))
    good = shuffled.state_dict()
    with pytest.raises(LayerSetupError, match="for 11 samples"):
        shuffled.load_state_dict(dict(good, num_samples=11))
    with pytest.raises(LayerSetupError, match="at cursor 10"):
        shuffled.load_state_dict(dict(good, cursor=10))
    with pytest.raises(LayerSetupError, match="not a permutation of 10"):
        shuffled.load_state_dict(dict(good, permutation=np.zeros(10, np.int64)))
    with pytest.raises(LayerSetupError, match="shuffle on; this layer has shuffle off"):
        plain.load_state_dict(good)
    with pytest.raises(LayerSetupError, match="needs cursor, epoch, permutation"):
        plain.load_state_dict({"cursor": 0})
    with pytest.raises(LayerSetupError, match="IDXData layer 'data'"):
        shuffled.load_state_dict(plain.state_dict())


# ------------------------------------------------------------------ errors
def test_setup_errors(idx_files, tmp_path):
    images_path, labels_path, _, _ = idx_files
    with pytest.raises(LayerSetupError, match="batch_size must be > 0"):
        _setup(_param(images_path, labels_path, batch_size=0))
    with pytest.raises(LayerSetupError, match="needs source"):
        _setup('name: "data" type: "IDXData" idx_data_param { batch_size: 2 }')
    with pytest.raises(LayerSetupError, match="not both"):
        _setup(_param(images_path, labels_path, extra='source: "mnist:train"'))
    with pytest.raises(LayerSetupError, match="label top but no label_source"):
        _setup(_param(images_path))
    with pytest.raises(LayerSetupError,
                       match=r"IDXData layer 'data'.*<dataset>:<split>"):
        _setup('name: "data" type: "IDXData" '
               'idx_data_param { source: "mnist" batch_size: 2 }')
    with pytest.raises(LayerSetupError, match="known datasets"):
        _setup('name: "data" type: "IDXData" '
               'idx_data_param { source: "cifar:train" batch_size: 2 }')
    with pytest.raises(LayerSetupError, match="produces at most 2 top"):
        _setup(_param(images_path, labels_path), tops=3)


def test_file_errors_name_layer_and_file(idx_files, tmp_path):
    images_path, labels_path, _, _ = idx_files
    with pytest.raises(FileNotFoundError, match="IDXData layer 'data'.*missing"):
        _setup(_param(tmp_path / "missing", labels_path))
    (tmp_path / "cut.gz").write_bytes(images_path.read_bytes()[:-20])
    with pytest.raises(IDXFormatError, match=r"IDXData layer 'data'.*cut\.gz"):
        _setup(_param(tmp_path / "cut.gz", labels_path))
    save_idx(tmp_path / "few", np.zeros(3, np.uint8))
    with pytest.raises(IDXFormatError, match="10 images but .* 3 labels"):
        _setup(_param(images_path, tmp_path / "few"))
    save_idx(tmp_path / "vec", np.zeros((10, 2, 2, 2, 2), np.uint8))
    with pytest.raises(LayerSetupError, match=r"\(N, H, W\) or \(N, C, H, W\)"):
        _setup(_param(tmp_path / "vec", labels_path))
    with pytest.raises(netlite.ShapeError, match="crop_size 9 is larger"):
        _setup(_param(images_path, labels_path, transform="crop_size: 9"))


def test_offline_dataset_error_names_layer(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("NETLITE_DATA", raising=False)
    monkeypatch.setattr(catalog, "SYSTEM_DATA_DIRS", (tmp_path / "none",))
    catalog.set_data_dir(None)
    with pytest.raises(lookup.DatasetNotFoundError,
                       match=r"(?s)IDXData layer 'data': dataset 'mnist'.*"
                             r"train-images-idx3-ubyte\.gz"):
        _setup('name: "data" type: "IDXData" '
               'idx_data_param { source: "mnist:train" batch_size: 2 }')


# ---------------------------------------------------------- in a Net
NET = """
name: "phases"
layer {{ name: "data" type: "IDXData" top: "data" top: "label"
  include {{ phase: TRAIN }}
  transform_param {{ scale: 0.00390625 }}
  idx_data_param {{ image_source: "{train_images}" label_source: "{train_labels}"
                   batch_size: 4 shuffle: true }} }}
layer {{ name: "data" type: "IDXData" top: "data" top: "label"
  include {{ phase: TEST }}
  transform_param {{ scale: 0.00390625 }}
  idx_data_param {{ image_source: "{test_images}" label_source: "{test_labels}"
                   batch_size: 3 }} }}
layer {{ name: "flat" type: "Flatten" bottom: "data" top: "flat" }}
"""


def test_train_and_test_sources_by_phase(tmp_path, dtype):
    gen = np.random.default_rng(0)
    paths = {}
    for split, n in (("train", 8), ("test", 5)):
        save_idx(tmp_path / f"{split}_images", gen.integers(0, 256, (n, 6, 6))
                 .astype(np.uint8))
        save_idx(tmp_path / f"{split}_labels", np.arange(n, dtype=np.uint8))
        paths[f"{split}_images"] = tmp_path / f"{split}_images"
        paths[f"{split}_labels"] = tmp_path / f"{split}_labels"
    text = NET.format(**paths)
    train = netlite.Net(text, netlite.TRAIN, dtype=dtype)
    test = netlite.Net(text, netlite.TEST, dtype=dtype)
    assert len(train.layers) == len(test.layers) == 2
    assert train.blobs["data"].shape == (4, 1, 6, 6)
    assert test.blobs["data"].shape == (3, 1, 6, 6)
    assert train.layers[0].shuffle and not test.layers[0].shuffle
    out = test.forward()
    assert out["flat"].shape == (3, 36)
    np.testing.assert_array_equal(test.blobs["label"].data, [0, 1, 2])
    test_images = idx.load_idx(paths["test_images"])
    np.testing.assert_array_equal(out["flat"], test_images[:3].reshape(3, 36)
                                  .astype(dtype) / 256)
    seen = np.concatenate([train.forward(blobs=["label"])["label"].copy()
                           for _ in range(2)])
    assert sorted(seen.tolist()) == list(range(8))


# ----------------------------------------------------------- real datasets
@needs_mnist
def test_real_mnist_through_the_layer(dtype):
    catalog.set_data_dir(SHARED)
    layer, top = _setup('name: "mnist" type: "IDXData" '
                        'idx_data_param { source: "mnist:train" batch_size: 64 } '
                        'transform_param { scale: 0.00390625 }', dtype)
    layer.forward([], top)
    assert top[0].shape == (64, 1, 28, 28)
    np.testing.assert_array_equal(top[1].data[:10], [5, 0, 4, 1, 9, 2, 1, 3, 1, 4])
    images, _ = mnist.load_mnist("mnist", "train", SHARED)
    np.testing.assert_array_equal(top[0].data[:, 0], images[:64].astype(dtype) / 256)


@needs_fashion
def test_real_fashion_mnist_from_debian(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("NETLITE_DATA", raising=False)
    catalog.set_data_dir(None)
    layer, top = _setup('name: "f" type: "IDXData" '
                        'idx_data_param { source: "fashion-mnist:test" '
                        'batch_size: 100 }')
    assert layer.num_samples == 10000
    layer.forward([], top)
    assert top[0].shape == (100, 1, 28, 28) and top[0].data.max() <= 255
    assert set(np.unique(top[1].data)) <= set(range(10))
