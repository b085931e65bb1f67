"""End to end: Caffe's LeNet learns real MNIST, and the deploy net classifies.

Trains examples/mnist/lenet_train_test.prototxt with Caffe's solver settings
(lenet_solver.prototxt) for 500 iterations (about half an epoch, Caffe's
first test point) on the Numba engine, then scores the first 2,000 test
images.  The full schedule reaches 97.6 % on the whole test set at that
point; the test asks for 95 %.  Accuracy alone is a weak witness of
backprop: with the convolutions' gradients lost, the random conv features
plus trained inner products still reach about 93 %.  So the test also
checks that every layer's weights moved much further than weight decay
alone would move them.

MNIST is found through netlite.data.lookup ($NETLITE_DATA, which CI sets to
../shared/datasets); without it the tests skip and say where to put it.
"""

import importlib.util
import os

import numpy as np
import pytest

import netlite
from netlite import backend, io
from netlite.data import lookup, mnist

ENGINE = "numba" if backend.numba_available() else "numpy"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "mnist")
TRAIN_ITERS = 500
TEST_BATCHES = 20  # x 100 images

pytestmark = pytest.mark.slow


def _require_mnist():
    try:
        return lookup.find_dataset("mnist", download=False)
    except lookup.DatasetNotFoundError:
        pytest.skip(
            "MNIST not found: set NETLITE_DATA to a directory with mnist/ in it "
            "(the README's `make test` uses ../shared/datasets); see "
            "docs/datasets.md"
        )


def _load_classify():
    # examples/ is not a package: load the script as a module.
    spec = importlib.util.spec_from_file_location(
        "mnist_classify", os.path.join(EXAMPLE, "classify.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LeNet solver after TRAIN_ITERS iterations, and its weights file."""
    _require_mnist()
    previous = backend.cpu_engine()
    backend.set_cpu_engine(ENGINE)
    try:
        param = io.read_solver_param(os.path.join(EXAMPLE, "lenet_solver.prototxt"))
        param.net = os.path.join(EXAMPLE, "lenet_train_test.prototxt")
        param.max_iter = TRAIN_ITERS
        param.test_iter[:] = [TEST_BATCHES]
        param.test_interval = 10 ** 6  # no test during training ...
        param.test_initialization = False  # ... and none before it
        param.snapshot = 0
        param.snapshot_after_train = False
        param.display = 0
        solver = netlite.get_solver(param)
        initial = {name: blobs[0].data.copy()
                   for name, blobs in solver.net.params.items()}
        losses = []
        solver.add_callback(on_iteration=lambda it, loss, smooth, lr:
                            losses.append(loss))
        solver.solve()
        scores = solver.test(0)
        weights = str(tmp_path_factory.mktemp("lenet") / "lenet.caffemodel")
        solver.net.save(weights)
    finally:
        backend.set_cpu_engine(previous)
    changes = {
        name: float(np.linalg.norm(blobs[0].data - initial[name])
                    / np.linalg.norm(initial[name]))
        for name, blobs in solver.net.params.items()
    }
    return solver, scores, losses, weights, changes


def test_every_layer_learns(trained):
    # Weight decay alone moves each weight blob by about 2 % of its norm in
    # 500 iterations; gradients move every layer by well over 10 %.  A layer
    # whose weight gradient is lost (or never reaches it, because a layer
    # above drops the bottom diff) stays near 2 %.
    *_, changes = trained
    assert set(changes) == {"conv1", "conv2", "ip1", "ip2"}
    for name, change in changes.items():
        assert change > 0.08, (name, changes)


def test_lenet_learns_mnist(trained):
    solver, scores, losses, *_ = trained
    assert solver.iter == TRAIN_ITERS
    assert len(losses) == TRAIN_ITERS and np.all(np.isfinite(losses))
    # ln(10) = 2.30 at the start; a working net is far below it by now.
    assert np.mean(losses[:10]) > 1.5
    assert np.mean(losses[-50:]) < 0.35, np.mean(losses[-50:])
    assert scores["accuracy"] >= 0.95, scores


def test_deploy_net_classifies_with_the_trained_weights(trained):
    solver, _, _, weights, _ = trained
    classify = _load_classify()
    backend.set_cpu_engine(ENGINE)  # conftest restores the engine

    images, labels = mnist.load_mnist("mnist", "test", download=False)
    deploy = netlite.Net(os.path.join(EXAMPLE, "lenet.prototxt"), netlite.TEST,
                         weights=weights)
    probs = classify.classify(deploy, images[:1000], batch_size=500)
    assert probs.shape == (1000, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    accuracy = float(np.mean(probs.argmax(axis=1) == labels[:1000]))
    assert accuracy >= 0.95, accuracy

    # The deploy net computes what the test net computes, on the test net's
    # own (already scaled) batch.
    test_net = solver.test_nets[0]
    test_net.forward()
    data = backend.to_numpy(test_net.blobs["data"].data).copy()
    scores = backend.to_numpy(test_net.blobs["ip2"].data).astype(np.float64)
    prob = backend.to_numpy(deploy.forward(data=data)["prob"])
    expected = np.exp(scores - scores.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(prob, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(prob.argmax(axis=1), scores.argmax(axis=1))


def test_classify_script_reports_accuracy(trained, capsys):
    weights = trained[3]
    classify = _load_classify()
    assert classify.main(["--weights", weights, "--count", "500", "--show", "3",
                          "--engine", ENGINE]) == 0
    out = capsys.readouterr().out
    assert out.count("image ") == 3
    line = next(x for x in out.splitlines() if x.startswith("Accuracy: "))
    assert float(line.split()[1]) >= 0.95, line
