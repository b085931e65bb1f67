"""Snapshots, restore and Ctrl-C.

Caffe's own snapshot test (TestSnapshot, ported in test_solver.py) needs the
data layer to be advanced by hand after a restore, because a Caffe
``.solverstate`` holds only the iteration, the weights file, the history and
the multistep position.  netlite adds the ``netlite_state`` field (the RNG,
the smoothed-loss window and every stateful layer's ``state_dict``), so a
resumed run must be **bit-for-bit** the uninterrupted one.  These tests use
a shuffling data layer that draws a new order from the global RNG at every
epoch, momentum, a multistep schedule, a test net with its own data layer
and loss smoothing: everything that would drift if any piece of state were
lost.
"""

import io as pyio
import json
import logging
import os
import signal
import stat
from pathlib import Path

import numpy as np
import pytest

import netlite
from netlite import io, registry, rng
from netlite.layer import TRAIN, Layer
from netlite.proto import netlite_pb2
from netlite.registry import register_layer
from netlite.solvers.snapshot import _decode, _encode

# ------------------------------------------------------- shuffling layer
_GEN = np.random.default_rng(20)
ARRAYS = {
    "train": (_GEN.standard_normal((10, 5)), _GEN.standard_normal((10, 2))),
    "test": (_GEN.standard_normal((6, 5)), _GEN.standard_normal((6, 2))),
}
#: Test hooks: raise KeyboardInterrupt at the n-th TRAIN-phase forward.
HOOKS = {"interrupt_at_forward": None}


class SnapshotTestShuffledDataLayer(Layer):
    """Serve ``ARRAYS[source]`` rows in an order reshuffled from the global
    RNG at the start of every epoch (``data_param.batch_size`` per forward).
    Its position is ``state_dict()`` = {cursor, epoch, order}."""

    exact_num_bottom_blobs = 0
    exact_num_top_blobs = 2

    def layer_setup(self, bottom, top):
        p = self.layer_param.data_param
        self.x, self.y = ARRAYS[p.source]
        self.batch_size = p.batch_size
        self.cursor, self.epoch, self.order = 0, 0, None
        self.forwards = 0

    def reshape(self, bottom, top):
        top[0].reshape((self.batch_size, self.x.shape[1]))
        top[1].reshape((self.batch_size, self.y.shape[1]))

    def forward_cpu(self, bottom, top):
        self.forwards += 1
        if self.phase == TRAIN and self.forwards == HOOKS["interrupt_at_forward"]:
            # Consume some of this batch first, like a real interrupted read.
            rng.get_rng().random()
            self.cursor = (self.cursor + 1) % len(self.x)
            raise KeyboardInterrupt
        rows = []
        for _ in range(self.batch_size):
            if self.cursor == 0:
                self.order = rng.get_rng().permutation(len(self.x))
                self.epoch += 1
            rows.append(self.order[self.cursor])
            self.cursor = (self.cursor + 1) % len(self.x)
        top[0].data[...] = self.x[rows]
        top[1].data[...] = self.y[rows]

    def state_dict(self):
        order = self.order if self.order is not None else np.zeros(0, np.int64)
        return {"cursor": self.cursor, "epoch": self.epoch, "order": order}

    def load_state_dict(self, state):
        self.cursor, self.epoch = int(state["cursor"]), int(state["epoch"])
        order = np.asarray(state["order"], dtype=np.int64)
        self.order = order if order.size else None


@pytest.fixture(autouse=True)
def _register_test_layer(monkeypatch):
    # Registered for the duration of each test only, on a copy of the
    # registry: the layout rules (tests/test_layout.py) apply to real layers.
    monkeypatch.setattr(registry.LAYERS, "_classes", dict(registry.LAYERS._classes))
    register_layer("SnapshotTestShuffledData")(SnapshotTestShuffledDataLayer)


@pytest.fixture(autouse=True)
def _reset_hooks():
    HOOKS["interrupt_at_forward"] = None
    yield
    HOOKS["interrupt_at_forward"] = None


NET = """
  name: 'ShuffleNet'
  layer { name: 'data' type: 'SnapshotTestShuffledData' top: 'data'
          top: 'targets' include { phase: TRAIN }
          data_param { source: 'train' batch_size: 4 } }
  layer { name: 'data_test' type: 'SnapshotTestShuffledData' top: 'data'
          top: 'targets' include { phase: TEST }
          data_param { source: 'test' batch_size: 3 } }
  layer { name: 'ip1' type: 'InnerProduct' bottom: 'data' top: 'ip1'
          inner_product_param { num_output: 4
            weight_filler { type: 'gaussian' std: 0.5 }
            bias_filler { type: 'gaussian' std: 0.5 } } }
  layer { name: 'relu' type: 'ReLU' bottom: 'ip1' top: 'ip1' }
  layer { name: 'ip2' type: 'InnerProduct' bottom: 'ip1' top: 'ip2'
          inner_product_param { num_output: 2
            weight_filler { type: 'gaussian' std: 0.5 } } }
  layer { name: 'loss' type: 'EuclideanLoss' bottom: 'ip2' bottom: 'targets'
          top: 'loss' }
"""

MAX_ITER = 12


def solver_text(prefix, seed=42, extra=""):
    return f"""
type: 'SGD' base_lr: 0.05 momentum: 0.9 weight_decay: 0.01
lr_policy: 'multistep' gamma: 0.5 stepvalue: 2 stepvalue: 3 stepvalue: 4
average_loss: 3 display: 1 max_iter: {MAX_ITER}
test_iter: 2 test_interval: 4
random_seed: {seed}
snapshot_prefix: '{prefix}'
net_param {{ {NET} }}
{extra}
"""


class Recorder:
    """Collects what the callbacks report."""

    def __init__(self, solver):
        self.iterations, self.tests = [], []
        solver.add_callback(
            on_iteration=lambda *a: self.iterations.append(a),
            on_test=lambda it, i, scores: self.tests.append((it, i, scores)),
        )


def make_solver(tmp_path, dtype, seed=42, extra="", name="run"):
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    solver = netlite.get_solver(solver_text(folder / "snap", seed, extra),
                                dtype=dtype)
    return solver, Recorder(solver)


def weights_and_history(solver):
    return ([np.array(p.data) for p in solver.net.learnable_params],
            [np.array(h.data) for h in solver.history])


def assert_same_run(straight, resumed, straight_rec, resumed_rec, from_iter,
                    check_rng=True):
    want_w, want_h = weights_and_history(straight)
    got_w, got_h = weights_and_history(resumed)
    assert resumed.iter == straight.iter
    assert resumed.current_step == straight.current_step
    for want, got in zip(want_w + want_h, got_w + got_h):
        np.testing.assert_array_equal(got, want)
    # Losses, smoothed losses, rates and test scores: identical too.
    want_its = [r for r in straight_rec.iterations if r[0] >= from_iter]
    assert resumed_rec.iterations == want_its
    want_tests = [t for t in straight_rec.tests if t[0] >= from_iter]
    assert resumed_rec.tests == want_tests
    if check_rng:
        # Even the global generator ends in the same state.
        assert rng.get_state() == straight_rec.final_rng_state


def run_straight(tmp_path, dtype):
    solver, rec = make_solver(tmp_path, dtype, name="straight")
    solver.step(MAX_ITER)
    rec.final_rng_state = rng.get_state()
    return solver, rec


# --------------------------------------------------------------- resume
@pytest.mark.parametrize("how", ["restore_step", "solve_resume_file"])
@pytest.mark.parametrize("k", [6, 8], ids=["between-tests", "at-a-test"])
def test_resume_is_bit_exact(tmp_path, dtype, k, how):
    straight, straight_rec = run_straight(tmp_path, dtype)
    first, _ = make_solver(tmp_path, dtype, name="first")
    first.step(k)
    path = first.snapshot()
    assert path == str(tmp_path / "first" / f"snap_iter_{k}.solverstate")
    # A different seed: everything must come from the snapshot.
    resumed, rec = make_solver(tmp_path, dtype, seed=7, name="resumed")
    if how == "restore_step":
        resumed.restore(path)
        assert resumed.iter == k
        resumed.step(MAX_ITER - k)
    else:
        resumed.param.snapshot_after_train = False
        resumed.param.display = 0  # no extra final forward
        resumed.solve(resume_file=path)
        # solve() also tests at max_iter; drop it before comparing.
        rec.tests = [t for t in rec.tests if t[0] < MAX_ITER]
    assert_same_run(straight, resumed, straight_rec, rec, k,
                    check_rng=how == "restore_step")


def test_multistep_position_is_saved(tmp_path, dtype):
    solver, _ = make_solver(tmp_path, dtype)
    solver.step(6)
    assert solver.current_step == 3
    state = netlite_pb2.SolverState()
    with open(solver.snapshot(), "rb") as f:
        state.ParseFromString(f.read())
    assert state.current_step == 3
    assert state.iter == 6


# -------------------------------------------------------------- Ctrl-C
def _files(folder):
    return sorted(os.listdir(folder))


def test_ctrl_c_from_a_callback_snapshots_the_last_iteration(tmp_path, dtype,
                                                            caplog):
    straight, straight_rec = run_straight(tmp_path, dtype)
    solver, _ = make_solver(tmp_path, dtype, name="interrupted")

    def stop(it, *_):
        if it == 4:
            raise KeyboardInterrupt

    solver.add_callback(on_iteration=stop)
    with caplog.at_level(logging.WARNING, logger="netlite"):
        with pytest.raises(KeyboardInterrupt):
            solver.solve()
    assert solver.iter == 5
    assert "Interrupted: snapshotting iteration 5" in caplog.text
    folder = tmp_path / "interrupted"
    assert _files(folder) == ["snap_iter_5.caffemodel", "snap_iter_5.solverstate"]
    resumed, rec = make_solver(tmp_path, dtype, seed=3, name="resumed")
    resumed.restore(folder / "snap_iter_5.solverstate")
    resumed.step(MAX_ITER - 5)
    assert_same_run(straight, resumed, straight_rec, rec, 5)


def test_ctrl_c_in_the_middle_of_a_forward_pass(tmp_path, dtype):
    """The interrupted iteration already consumed data and random numbers;
    the snapshot must hold the state from *before* it."""
    straight, straight_rec = run_straight(tmp_path, dtype)
    solver, _ = make_solver(tmp_path, dtype, name="interrupted")
    HOOKS["interrupt_at_forward"] = 7  # iteration 6's forward
    with pytest.raises(KeyboardInterrupt):
        solver.step(MAX_ITER)
    HOOKS["interrupt_at_forward"] = None
    assert solver.iter == 6
    resumed, rec = make_solver(tmp_path, dtype, seed=3, name="resumed")
    resumed.restore(tmp_path / "interrupted" / "snap_iter_6.solverstate")
    resumed.step(MAX_ITER - 6)
    assert_same_run(straight, resumed, straight_rec, rec, 6)


def test_ctrl_c_during_a_test_pass(tmp_path, dtype):
    straight, straight_rec = run_straight(tmp_path, dtype)
    solver, _ = make_solver(tmp_path, dtype, name="interrupted")

    def stop(it, *_):
        if it == 8:
            raise KeyboardInterrupt

    solver.add_callback(on_test=stop)
    with pytest.raises(KeyboardInterrupt):
        solver.step(MAX_ITER)
    assert solver.iter == 8
    resumed, rec = make_solver(tmp_path, dtype, seed=3, name="resumed")
    resumed.restore(tmp_path / "interrupted" / "snap_iter_8.solverstate")
    resumed.step(MAX_ITER - 8)
    # The resumed run repeats the interrupted test at iteration 8.
    assert_same_run(straight, resumed, straight_rec, rec, 8)


def test_sigint_during_the_update_is_held_until_it_completes(tmp_path, dtype):
    """A real SIGINT in the middle of apply_update: the update finishes (no
    half-updated parameters), then KeyboardInterrupt, then the snapshot."""
    straight, straight_rec = run_straight(tmp_path, dtype)
    solver, _ = make_solver(tmp_path, dtype, name="interrupted")
    original = solver.compute_update_value

    def update_with_sigint(param_id, rate):
        if solver.iter == 3 and param_id == 0:
            os.kill(os.getpid(), signal.SIGINT)
        original(param_id, rate)

    solver.compute_update_value = update_with_sigint
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        solver.step(MAX_ITER)
    assert solver.iter == 4
    assert signal.getsignal(signal.SIGINT) is handler
    resumed, rec = make_solver(tmp_path, dtype, seed=3, name="resumed")
    resumed.restore(tmp_path / "interrupted" / "snap_iter_4.solverstate")
    resumed.step(MAX_ITER - 4)
    assert_same_run(straight, resumed, straight_rec, rec, 4)


# ------------------------------------------------------ file contents
def test_snapshot_files(tmp_path, dtype):
    solver, _ = make_solver(tmp_path, dtype, extra="snapshot_diff: true")
    solver.step(5)
    expected_rng = rng.get_state()
    state_path = solver.snapshot()
    model_path = str(tmp_path / "run" / "snap_iter_5.caffemodel")
    assert state_path == str(tmp_path / "run" / "snap_iter_5.solverstate")

    # .caffemodel: a binary NetParameter with every layer's blobs.
    net_param = io.read_binary_net_param(model_path)
    assert net_param.name == "ShuffleNet"
    by_name = {layer.name: layer for layer in net_param.layer}
    for name, blobs in solver.net.params.items():
        for proto, blob in zip(by_name[name].blobs, blobs):
            values = proto.double_data if dtype == np.float64 else proto.data
            diffs = proto.double_diff if dtype == np.float64 else proto.diff
            np.testing.assert_array_equal(np.asarray(values, dtype), blob.data.ravel())
            np.testing.assert_array_equal(np.asarray(diffs, dtype), blob.diff.ravel())
            assert tuple(proto.shape.dim) == blob.shape
    test_copy = netlite.Net(io.parse_text(NET, netlite_pb2.NetParameter),
                            netlite.TRAIN, weights=model_path, dtype=dtype)
    for name, blobs in solver.net.params.items():
        for a, b in zip(test_copy.params[name], blobs):
            np.testing.assert_array_equal(a.data, b.data)

    # .solverstate: Caffe's fields plus netlite_state.
    state = netlite_pb2.SolverState()
    with open(state_path, "rb") as f:
        state.ParseFromString(f.read())
    assert state.iter == 5
    assert state.learned_net == model_path
    assert state.current_step == 3
    assert len(state.history) == len(solver.net.learnable_params) == 4
    for proto, blob in zip(state.history, solver.history):
        assert tuple(proto.shape.dim) == blob.shape
    with np.load(pyio.BytesIO(state.netlite_state), allow_pickle=False) as archive:
        manifest = json.loads(archive["manifest"].tobytes())
        assert manifest["format"] == "netlite-solverstate"
        assert manifest["rng"] == json.loads(json.dumps(expected_rng))
        layers = {(e["net"], e["layer"]): e["state"] for e in manifest["layers"]}
        assert set(layers) == {(0, "data"), (1, "data_test")}
        train_state = _decode(layers[(0, "data")], archive)
    data_layer = solver.net.layer_by_name("data")
    assert train_state["cursor"] == data_layer.cursor
    np.testing.assert_array_equal(train_state["order"], data_layer.order)
    assert len(manifest["smoothing"]["losses"]) == 3


def test_snapshot_without_diff_has_no_diff(tmp_path):
    solver, _ = make_solver(tmp_path, np.float32)
    solver.step(1)
    solver.snapshot()
    net_param = io.read_binary_net_param(tmp_path / "run" / "snap_iter_1.caffemodel")
    assert all(len(b.diff) == 0 and len(b.data) > 0
               for layer in net_param.layer for b in layer.blobs)


def test_state_encoding_round_trip():
    state = {
        "cursor": 3, "ratio": 0.1, "name": "x", "none": None, "flag": True,
        "f32": np.float32(0.25), "order": np.arange(5, dtype=np.int64),
        "nested": {"list": [1, np.zeros((2, 2)), {"deep": "yes"}]},
        "tuple": (1, 2),
    }
    arrays = {}
    spec = json.loads(json.dumps(_encode(state, arrays, "state")))
    back = _decode(spec, arrays)
    assert back["cursor"] == 3 and back["ratio"] == 0.1 and back["name"] == "x"
    assert back["none"] is None and back["flag"] is True
    assert back["f32"] == np.float32(0.25) and back["f32"].dtype == np.float32
    np.testing.assert_array_equal(back["order"], state["order"])
    assert back["nested"]["list"][0] == 1
    np.testing.assert_array_equal(back["nested"]["list"][1], np.zeros((2, 2)))
    assert back["nested"]["list"][2] == {"deep": "yes"}
    assert back["tuple"] == [1, 2]
    with pytest.raises(TypeError, match="keys must be strings"):
        _encode({1: 2}, {}, "state")
    with pytest.raises(TypeError, match="object arrays"):
        _encode({"a": np.array([object()])}, {}, "state")
    with pytest.raises(TypeError, match="cannot store a set"):
        _encode({"a": {1}}, {}, "state")


# ------------------------------------------------------------ atomicity
def test_snapshots_go_through_atomic_writes(tmp_path, monkeypatch):
    solver, _ = make_solver(tmp_path, np.float32)
    solver.step(1)
    written = []
    real = io.atomic_write_bytes
    monkeypatch.setattr(io, "atomic_write_bytes",
                        lambda path, payload: (written.append(str(path)),
                                               real(path, payload)))
    solver.snapshot()
    assert [os.path.basename(p) for p in written] == [
        "snap_iter_1.caffemodel", "snap_iter_1.solverstate"
    ]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_snapshot_files_get_the_umask_permissions(tmp_path, umask):
    # As open() creates files (the policy of every netlite output), not
    # mkstemp's 0600.
    previous = os.umask(umask)
    try:
        solver, _ = make_solver(tmp_path, np.float32)
        solver.step(1)
        solver.snapshot()
    finally:
        os.umask(previous)
    for name in ("snap_iter_1.caffemodel", "snap_iter_1.solverstate"):
        st_mode = (tmp_path / "run" / name).stat().st_mode
        assert stat.S_IMODE(st_mode) == 0o666 & ~umask, name


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_snapshot_leaves_no_partial_file(tmp_path, monkeypatch, error):
    solver, _ = make_solver(tmp_path, np.float32)
    solver.step(1)
    solver.snapshot()
    folder = tmp_path / "run"
    before = {name: (folder / name).read_bytes() for name in _files(folder)}
    solver.step(1)
    real_fsync = os.fsync

    def failing_fsync(fd):
        real_fsync(fd)
        raise error

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(type(error)):
        solver.snapshot()
    monkeypatch.undo()
    # Neither iteration-2 file nor a temporary file; iteration 1 untouched.
    assert _files(folder) == sorted(before)
    for name, payload in before.items():
        assert (folder / name).read_bytes() == payload


# -------------------------------------------------- prefix and schedule
def _write_solver(folder, name, prefix_line=""):
    path = folder / name
    path.write_text(
        f"base_lr: 0.1 lr_policy: 'fixed' max_iter: 2 {prefix_line} "
        f"net_param {{ {NET} }}"
    )
    return path


def test_prefix_defaults_to_the_solver_file(tmp_path):
    path = _write_solver(tmp_path, "lenet_solver.prototxt")
    solver = netlite.get_solver(path)
    assert solver.param.snapshot_prefix == str(tmp_path / "lenet_solver")
    solver.step(1)
    assert solver.snapshot() == str(tmp_path / "lenet_solver_iter_1.solverstate")


def test_directory_prefix_appends_the_solver_stem(tmp_path):
    (tmp_path / "snaps").mkdir()
    path = _write_solver(tmp_path, "my_solver.prototxt",
                         f"snapshot_prefix: '{tmp_path / 'snaps'}'")
    solver = netlite.get_solver(path)
    assert solver.param.snapshot_prefix == str(tmp_path / "snaps" / "my_solver")


def test_text_solver_prefix_is_used_as_given(tmp_path):
    """Without a solver file nothing is derived (Caffe's tests rely on a
    'dir/' prefix producing 'dir/_iter_N')."""
    text = (f"base_lr: 0.1 lr_policy: 'fixed' snapshot_prefix: '{tmp_path}/' "
            f"net_param {{ {NET} }}")
    solver = netlite.get_solver(text)
    solver.step(1)
    assert solver.snapshot() == f"{tmp_path}/_iter_1.solverstate"
    nested = tmp_path / "new" / "dirs" / "lenet"
    text = (f"base_lr: 0.1 lr_policy: 'fixed' snapshot_prefix: '{nested}' "
            f"net_param {{ {NET} }}")
    solver = netlite.get_solver(text)
    assert solver.snapshot() == f"{nested}_iter_0.solverstate"


@pytest.mark.parametrize("max_iter, after_train, expected", [
    (12, True, [5, 10, 12]),
    (12, False, [5, 10]),
    (10, True, [5, 10]),
])
def test_snapshot_schedule(tmp_path, caplog, max_iter, after_train, expected):
    solver, _ = make_solver(tmp_path, np.float32)
    solver.param.snapshot = 5
    solver.param.snapshot_after_train = after_train
    solver.param.max_iter = max_iter
    with caplog.at_level(logging.INFO, logger="netlite"):
        solver.solve()
    folder = tmp_path / "run"
    assert _files(folder) == sorted(
        f"snap_iter_{n}.{ext}" for n in expected
        for ext in ("caffemodel", "solverstate")
    )
    assert f"Snapshotting to binary proto file {folder / 'snap'}_iter_5.caffemodel" \
        in caplog.text
    assert "Snapshotting solver state to binary proto file" in caplog.text
    assert "Optimization Done." in caplog.text


# ------------------------------------------------------------ restoring
def test_restore_errors(tmp_path):
    solver, _ = make_solver(tmp_path, np.float32)
    solver.step(1)
    path = solver.snapshot()
    adam = netlite.get_solver(
        solver_text(tmp_path / "adam", extra="").replace("type: 'SGD'",
                                                         "type: 'Adam'")
        .replace("momentum: 0.9", "momentum: 0.9 momentum2: 0.999")
    )
    with pytest.raises(netlite.SolverStateError, match="4 history blob"):
        adam.restore(path)
    garbage = tmp_path / "garbage.solverstate"
    garbage.write_bytes(b"\xff\xff\xff\xff not a proto")
    with pytest.raises(netlite.SolverStateError, match="not a SolverState"):
        solver.restore(garbage)
    with pytest.raises(netlite.SolverStateError, match="HDF5"):
        solver.restore(tmp_path / "x.solverstate.h5")
    state = netlite_pb2.SolverState()
    state.ParseFromString(Path(path).read_bytes())
    state.learned_net = str(tmp_path / "gone" / "nowhere.caffemodel")
    lost = tmp_path / "lost.solverstate"
    lost.write_bytes(state.SerializeToString())
    with pytest.raises(netlite.SolverStateError, match="learned_net .* not found"):
        solver.restore(lost)


def test_restore_finds_moved_snapshots(tmp_path, dtype):
    solver, _ = make_solver(tmp_path, dtype)
    solver.step(3)
    path = solver.snapshot()
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in _files(tmp_path / "run"):
        os.rename(tmp_path / "run" / name, moved / name)
    resumed, _ = make_solver(tmp_path, dtype, seed=9, name="resumed")
    resumed.restore(moved / os.path.basename(path))
    for a, b in zip(weights_and_history(solver)[0], weights_and_history(resumed)[0]):
        np.testing.assert_array_equal(a, b)


def test_caffe_state_without_netlite_state(tmp_path, caplog):
    solver, _ = make_solver(tmp_path, np.float64)
    solver.step(3)
    path = solver.snapshot()
    state = netlite_pb2.SolverState()
    state.ParseFromString(Path(path).read_bytes())
    state.ClearField("netlite_state")
    Path(path).write_bytes(state.SerializeToString())
    resumed, _ = make_solver(tmp_path, np.float64, seed=9, name="resumed")
    with caplog.at_level(logging.INFO, logger="netlite"):
        resumed.restore(path)
    assert "has no netlite state" in caplog.text
    assert resumed.iter == 3 and resumed.current_step == solver.current_step == 1
    assert resumed.net.layer_by_name("data").cursor == 0  # as Caffe: restarts
    for a, b in zip(weights_and_history(solver)[1], weights_and_history(resumed)[1]):
        np.testing.assert_array_equal(a, b)
