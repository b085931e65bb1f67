"""The 2-D feature experiments (netlite feature2d, docs/feature2d.md).

Every variant's prototxt builds in TRAIN and TEST and runs a forward and
backward pass on random IDX data; the TEST net's ``scores`` blob is the
margin-free logit the study predicted with; the runner trains a two-variant,
one-epoch grid on a few hundred MNIST images through ``--jobs 2`` and
through a Dask ``LocalCluster``, and a rerun skips the finished runs.
"""

import json
import os
import warnings

import numpy as np
import pytest

import netlite
from netlite import backend
from netlite.data import idx, lookup
from netlite.tools import cli, feature2d
from netlite.tools import feature2d_nets as nets

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "feature2d")
GRID_VARIANTS = "softmax,amsoftmax_m0.1"
#: netlite's warning that the study's ArcFace (boundary NONE) is not
#: monotonic past pi - m: expected here, recorded by the runner.
ARC_WARNING = r"LabelSpecificMargin .*rises again"
#: Numba's kernels (cached on disk) make these nets about 7x faster.
ENGINE = "numba" if backend.numba_available() else "numpy"


@pytest.fixture(autouse=True)
def _engine():
    previous = backend.cpu_engine()
    backend.set_cpu_engine(ENGINE)
    yield
    backend.set_cpu_engine(previous)


@pytest.fixture(scope="module")
def random_idx(tmp_path_factory):
    """A tiny random 'MNIST' (64 train + 100 test images) as IDX files."""
    folder = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    sources = []
    for split, n in (("train", 64), ("test", 100)):
        paths = (str(folder / f"{split}-images"), str(folder / f"{split}-labels"))
        idx.save_idx(paths[0], rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        idx.save_idx(paths[1], (np.arange(n) % 10).astype(np.uint8))
        sources.append(paths)
    return sources


def _net_file(tmp_path, variant, backbone, sources):
    path = tmp_path / f"{variant}.prototxt"
    path.write_text(nets.net_prototxt(variant, backbone, *sources))
    return str(path)


# --------------------------------------------------------------- variants
def test_the_grid_has_every_row_of_the_issue():
    names = list(nets.VARIANTS)
    assert len(names) == len(set(names)) == 41
    for pattern, count in (("normfeature_s*", 5), ("normface_s*", 5),
                           ("normface_learned_s*", 5), ("amsoftmax_m*", 5),
                           ("arcface_m*", 4), ("ringloss_l*", 3),
                           ("normweight_ringloss_l*", 3), ("lsoftmax_m*", 4),
                           ("asoftmax_m*", 4), ("subcenter*", 1)):
        assert len(nets.select_variants([pattern])) == count, pattern
    with pytest.raises(ValueError, match="no variant matches"):
        nets.select_variants(["cosface*"])


@pytest.mark.parametrize("variant", list(nets.VARIANTS))
def test_every_variant_builds_and_runs_forward_and_backward(
        tmp_path, random_idx, variant):
    path = _net_file(tmp_path, variant, "small", random_idx)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ARC_WARNING, netlite.NetliteWarning)
        train = netlite.Net(path, netlite.TRAIN)
        loss = train.forward()["loss"]
        train.backward()
        test = netlite.Net(path, netlite.TEST)
        test.share_trained_layers_with(train)
        out = test.forward()
    assert np.isfinite(float(loss)) and np.isfinite(float(out["loss"]))
    assert 0.0 <= float(out["accuracy"]) <= 1.0
    assert train.blobs["feature"].shape == (nets.TRAIN_BATCH, 2)
    assert test.blobs["scores"].shape == (nets.TEST_BATCH, nets.NUM_CLASSES)
    for name, blobs in train.params.items():
        for blob in blobs:
            assert np.all(np.isfinite(blob.diff)), name
    feature_diff = np.asarray(train.params["feature"][0].diff)
    assert np.any(feature_diff != 0), "no gradient reached the 2-D feature layer"


def test_train_set_stage_reads_the_train_split_in_file_order(tmp_path, random_idx):
    path = _net_file(tmp_path, "softmax", "small", random_idx)
    net = netlite.Net(path, netlite.TEST, stages=[nets.TRAIN_SET_STAGE])
    net.forward()
    # 64 train images (labels i % 10), then the wrap to the start.
    labels = np.asarray(net.blobs["label"].data)
    assert np.array_equal(labels, np.arange(nets.TEST_BATCH) % 64 % 10)
    test = netlite.Net(path, netlite.TEST)
    test.forward()
    assert np.array_equal(np.asarray(test.blobs["label"].data),
                          np.arange(nets.TEST_BATCH) % 10)


@pytest.mark.parametrize("variant", ["softmax", "ringloss_l1"])
def test_seed_backbone_is_the_study_net(tmp_path, random_idx, variant):
    """Both seed nets pool to 1x1 (round_mode FLOOR: Caffe's CEIL would give
    the ring net's AvgPool(k3, s3) on 4x4 a 2x2 output) and have the
    study's channel counts."""
    net = netlite.Net(_net_file(tmp_path, variant, "seed", random_idx),
                      netlite.TEST)
    wide = 64 if variant.startswith("ring") else 512
    assert net.blobs["pool4"].shape == (nets.TEST_BATCH, wide, 1, 1)
    assert net.params["feature"][0].shape == (2, wide)
    assert net.params["pred"][0].shape == (nets.NUM_CLASSES, 2)
    assert net.blobs["conv1"].shape[1:] == ((16 if wide == 64 else 64), 14, 14)
    text = nets.net_prototxt(variant, "seed")
    assert text.count("round_mode: FLOOR") == 2
    # conv1 has no ReLU; conv2-4 have one.
    assert "relu_conv1" not in text and text.count('type: "ReLU"') == 3


def _scores(cos_or_logits):
    return np.asarray(cos_or_logits, dtype=np.float64)


@pytest.mark.parametrize("variant", [
    "softmax", "normweight", "normfeature_s5", "normface_s10",
    "amsoftmax_m0.3", "arcface_m30", "lsoftmax_m4", "asoftmax_m4",
    "subcenter_arcface_k3_m10",
])
def test_test_net_predicts_on_the_margin_free_logits(tmp_path, random_idx, variant):
    """In TEST, ``scores`` is the study's prediction logit: W x (softmax,
    L-Softmax), |x| cos (normweight, A-Softmax), s x_hat W (L2-softmax),
    s cos (NormFace, AM-Softmax, ArcFace, sub-center max), whatever the
    margin layers do in TRAIN."""
    path = _net_file(tmp_path, variant, "small", random_idx)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ARC_WARNING, netlite.NetliteWarning)
        train = netlite.Net(path, netlite.TRAIN)
        train.forward()  # L-/A-Softmax: the margin layer sees its weights
        test = netlite.Net(path, netlite.TEST)
        test.share_trained_layers_with(train)
        test.forward()
    x = np.asarray(test.blobs["feature"].data, dtype=np.float64)
    w = np.asarray(train.params["pred"][0].data, dtype=np.float64)
    v = nets.VARIANTS[variant]
    x_hat = x / np.sqrt((x * x).sum(1, keepdims=True) + 1e-6)
    w_hat = w / np.sqrt((w * w).sum(1, keepdims=True) + 1e-6)
    family = v["family"]
    if family in ("softmax", "lsoftmax"):
        expected = x @ w.T
    elif family in ("normweight", "asoftmax"):
        expected = x @ w_hat.T
    elif family == "normfeature":
        expected = v["s"] * x_hat @ w.T
    else:
        cos = x_hat @ w_hat.T
        if family == "subcenter_arcface":
            cos = cos.reshape(len(x), nets.NUM_CLASSES, v["k"]).max(axis=2)
        expected = v["s"] * cos
    got = _scores(test.blobs["scores"].data)
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5)
    # ... and the TRAIN logits carry the margin (they differ on the target).
    if family not in ("softmax", "normweight", "normfeature", "normface"):
        assert not np.allclose(_scores(train.blobs["scores"].data)[:10],
                               expected[:10], atol=1e-4)


def test_solver_file_is_the_study_optimiser():
    from netlite import io

    param = io.read_solver_param(nets.solver_prototxt("net.prototxt", 938, 40,
                                                      7, 100))
    assert param.type == "Adam" and param.lr_policy == "fixed"
    assert param.base_lr == pytest.approx(1e-3)
    assert param.weight_decay == pytest.approx(1e-3)
    assert param.regularization_type == "L2"
    assert (param.momentum, param.momentum2) == (pytest.approx(0.9),
                                                 pytest.approx(0.999))
    assert param.delta == pytest.approx(1e-8)
    assert param.max_iter == 938 * 40 and param.random_seed == 7


def test_examples_folder_matches_the_generator():
    """examples/feature2d/<backbone>/<variant>.prototxt are the generator's
    output for MNIST (regenerate: see examples/feature2d/README.md)."""
    for backbone in nets.BACKBONES:
        folder = os.path.join(EXAMPLE, backbone)
        assert sorted(os.listdir(folder)) == sorted(
            f"{v}.prototxt" for v in nets.VARIANTS)
        for variant in nets.VARIANTS:
            with open(os.path.join(folder, f"{variant}.prototxt")) as f:
                assert f.read() == nets.net_prototxt(variant, backbone), variant


def test_import_netlite_needs_neither_matplotlib_nor_dask():
    import subprocess
    import sys

    code = ("import sys, netlite, netlite.tools.cli, netlite.tools.feature2d; "
            "bad = [m for m in ('matplotlib', 'dask', 'distributed') "
            "if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


# ----------------------------------------------------------------- runner
def _require_mnist():
    try:
        lookup.find_dataset("mnist", download=False)
    except lookup.DatasetNotFoundError:
        pytest.skip("MNIST not found: set NETLITE_DATA (docs/datasets.md)")


ARGS = ["--dataset", "mnist", "--backbone", "small", "--variants", GRID_VARIANTS,
        "--epochs", "1", "--seeds", "3", "--train-limit", "192",
        "--test-limit", "200", "--train-eval", "100", "--no-progress"]


def _check_grid(out):
    records = feature2d.read_results(os.path.join(out, "results.jsonl"))
    assert sorted(r["settings"]["variant"] for r in records) == sorted(
        GRID_VARIANTS.split(","))
    for rec in records:
        folder = os.path.join(out, rec["run_dir"])
        with open(os.path.join(folder, "record.json")) as f:
            assert json.load(f)["key"] == rec["key"]
        assert rec["settings"]["seed"] == 3 and rec["n_train"] == 192
        assert rec["n_test"] == 200 and rec["iters_per_epoch"] == 3
        (epoch,) = rec["epochs"]
        assert 0.0 <= epoch["test_acc"] <= 1.0 and np.isfinite(epoch["test_ce"])
        assert rec["best_epoch"] == 1 and rec["netlite_version"]
        assert rec["engine"] == ENGINE and rec["wall_seconds"] > 0
        for name in ("net.prototxt", "solver.prototxt"):
            assert os.path.getsize(os.path.join(folder, name)) > 0
        for name in ("petals_best", "petals_last", "curves"):
            _check_png(os.path.join(folder, rec["files"][name]))
        data = np.load(os.path.join(folder, rec["files"]["features_last"]))
        assert data["test_features"].shape == (200, 2)
        assert data["train_features"].shape == (100, 2)
    with open(os.path.join(out, "results.md")) as f:
        table = f.read()
    for variant in GRID_VARIANTS.split(","):
        assert f"| mnist | small | {variant} | 3 | 1 |" in table
    _check_png(os.path.join(out, "contact_sheet.png"))
    return records


def _check_png(path):
    matplotlib = pytest.importorskip("matplotlib")
    from matplotlib import image

    assert matplotlib is not None
    pixels = image.imread(path)
    assert pixels.ndim == 3 and min(pixels.shape[:2]) >= 100
    assert os.path.getsize(path) < 150_000


def test_cli_grid_with_two_jobs_then_resume(tmp_path, capsys):
    _require_mnist()
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "grid")
    assert cli.main(["feature2d", *ARGS, "--jobs", "2", "--engine", ENGINE,
                     "--out", out]) == 0
    first = _check_grid(out)
    capsys.readouterr()
    # A second call skips both runs (nothing retrained, records unchanged).
    assert cli.main(["--engine", ENGINE, "feature2d", *ARGS, "--out", out]) == 0
    assert "2 of 2 runs already" in capsys.readouterr().out
    assert _check_grid(out) == first


def test_grid_resumes_after_a_partial_run(tmp_path):
    _require_mnist()
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "grid")
    specs = feature2d.make_specs("mnist", "small", GRID_VARIANTS.split(","), [3],
                                 1, out, engine=ENGINE, train_limit=192,
                                 test_limit=200, train_eval=100)
    feature2d.run_grid(specs[:1], progress=False, log=lambda *a: None)
    # A torn last line (a crash mid-write) is skipped, and that run reruns.
    with open(os.path.join(out, "results.jsonl"), "a") as f:
        f.write('{"key": "torn')
    calls = []
    feature2d.run_grid(specs, progress=False, log=calls.append)
    assert calls == [f"feature2d: 1 of 2 runs already in "
                     f"{os.path.join(out, 'results.jsonl')}; running 1"]
    _check_grid(out)


def test_grid_on_a_dask_local_cluster(tmp_path):
    _require_mnist()
    pytest.importorskip("matplotlib")
    distributed = pytest.importorskip("distributed")
    out = str(tmp_path / "grid")
    specs = feature2d.make_specs("mnist", "small", GRID_VARIANTS.split(","), [3],
                                 1, out, engine=ENGINE, train_limit=192,
                                 test_limit=200, train_eval=100)
    # One worker thread: netlite's engine and RNG are per process.
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1,
                                  processes=False, dashboard_address=None) as cluster:
        feature2d.run_grid(specs, dask=cluster.scheduler_address, progress=False,
                           log=lambda *a: None)
    _check_grid(out)


def test_workers_get_one_blas_thread_per_job(monkeypatch):
    # Unset, each spawned worker's OpenBLAS starts a thread per core and
    # --jobs workers oversubscribe the machine (a 2-job grid ran 6x slower).
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")  # the user's own value stays
    with feature2d._blas_threads(1):
        assert os.environ["OPENBLAS_NUM_THREADS"] == "1"
        assert os.environ["OMP_NUM_THREADS"] == "1"
        assert os.environ["MKL_NUM_THREADS"] == "3"
    assert "OPENBLAS_NUM_THREADS" not in os.environ
    assert os.environ["MKL_NUM_THREADS"] == "3"
