"""The published L-Softmax, SphereFace, AM-Softmax and NormFace prototxts:
equivalents that set every layer type and parameter field the originals set
(see published_nets.py) build in both phases and run forward and backward on
random data, and a solver step trains them."""

import numpy as np
import pytest
from published_nets import CLASSES, INPUT, NETS, ORIGINAL

import netlite
from netlite import io
from netlite.proto import netlite_pb2

BATCH = 4


def _field_paths(message, prefix=""):
    """Every set field of ``message`` as a dotted path to its leaves."""
    paths = set()
    for field, value in message.ListFields():
        name = prefix + field.name
        if field.message_type is None:
            paths.add(name)
            continue
        children = set()
        for item in value if field.is_repeated else [value]:
            children |= _field_paths(item, name + ".")
        paths |= children or {name}
    return paths


@pytest.mark.parametrize("name", sorted(NETS))
def test_equivalent_sets_every_type_and_field_of_the_original(name):
    param = io.parse_text(NETS[name](BATCH), netlite_pb2.NetParameter)
    types, fields = set(), set()
    for layer in param.layer:
        if layer.type == "Input":
            continue
        types.add(layer.type)
        fields |= {p for p in _field_paths(layer)
                   if p.split(".")[0] not in ("name", "type", "bottom", "top")}
    want_types, want_fields = ORIGINAL[name]
    assert want_types <= types, sorted(want_types - types)
    assert want_fields <= fields, sorted(want_fields - fields)


def _feed(net, name, rng):
    net.blobs["data"].data[...] = rng.normal(0, 1, (BATCH, *INPUT[name]))
    net.blobs["label"].data[...] = rng.integers(0, CLASSES[name], BATCH)


@pytest.mark.parametrize("phase", [netlite.TRAIN, netlite.TEST], ids=["train", "test"])
@pytest.mark.parametrize("name", sorted(NETS))
def test_builds_and_runs_forward_and_backward(name, phase):
    netlite.set_random_seed(1701)
    net = netlite.Net(NETS[name](BATCH), phase)
    rng = np.random.default_rng(0)
    _feed(net, name, rng)
    outputs = net.forward()
    loss = [v for k, v in outputs.items() if "loss" in k]
    assert len(loss) == 1 and np.isfinite(loss[0]).all() and float(loss[0]) > 0
    if phase == netlite.TEST and "accuracy" in outputs:
        assert 0 <= float(outputs["accuracy"]) <= 1
    net.backward()
    grads = [blob.diff for blobs in net.params.values() for blob in blobs]
    assert all(np.isfinite(g).all() for g in grads)
    # The classifier and the first learned layer both receive a gradient.
    first = next(iter(net.params.values()))[0]
    assert np.abs(first.diff).max() > 0


@pytest.mark.parametrize("name", sorted(NETS))
def test_one_sgd_step_changes_the_weights_and_stays_finite(name, tmp_path):
    solver_text = (
        'base_lr: 0.01 lr_policy: "fixed" momentum: 0.9 weight_decay: 0.0005 '
        'max_iter: 2 display: 0 snapshot_after_train: false '
        f'net_param {{ {NETS[name](BATCH)} }}'
    )
    netlite.set_random_seed(1701)
    solver = netlite.SGDSolver(solver_text)
    rng = np.random.default_rng(1)
    before = {k: [b.data.copy() for b in v] for k, v in solver.net.params.items()}
    for _ in range(2):
        _feed(solver.net, name, rng)
        solver.step(1)
    moved = [not np.array_equal(b.data, before[k][i])
             for k, v in solver.net.params.items() for i, b in enumerate(v)]
    assert any(moved)
    assert all(np.isfinite(b.data).all() for v in solver.net.params.values() for b in v)
