"""The ``netlite`` command line (netlite/tools/) and the training plots.

Everything runs on tiny nets: DummyData nets for ``time`` and ``test``, and
a two-class problem written as IDX files for ``train`` (learnable in a few
dozen iterations, so the test accuracy and the plots are meaningful).
"""

import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from cli_testing import GLOG_LINE, glog_messages

import netlite
from netlite.data import idx
from netlite.tools import cli, commands, logs, plotting

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Constant inputs, so that every output is known exactly: x = 1 (4x3),
# y = 0.5 (4x2) and an unconsumed output z = 2 (2 elements).
TINY_NET = """
name: "tiny"
layer { name: "data" type: "DummyData" top: "x" top: "y" top: "z"
  dummy_data_param {
    shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 } shape { dim: 2 }
    data_filler { type: "constant" value: 1 }
    data_filler { type: "constant" value: 0.5 }
    data_filler { type: "constant" value: 2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
  inner_product_param { num_output: 2 weight_filler { type: "xavier" }
                        bias_filler { type: "constant" value: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "y" top: "loss"
  loss_weight: 3 }
"""


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


# ----------------------------------------------------------- two classes
def _two_class_idx(directory, n, seed):
    """4x4 uint8 images: class 0 is bright on the left, class 1 on the right."""
    gen = np.random.default_rng(seed)
    labels = gen.integers(0, 2, n).astype(np.uint8)
    images = gen.integers(0, 60, (n, 4, 4)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, :, 2 * c: 2 * c + 2] += 180
    img = os.path.join(directory, f"images-{seed}.idx")
    lbl = os.path.join(directory, f"labels-{seed}.idx")
    idx.save_idx(img, images)
    idx.save_idx(lbl, labels)
    return img, lbl


@pytest.fixture
def solver_file(tmp_path):
    """A solver for the two-class problem; returns its path."""
    train_img, train_lbl = _two_class_idx(tmp_path, 256, seed=1)
    test_img, test_lbl = _two_class_idx(tmp_path, 100, seed=2)
    net = _write(tmp_path / "twoclass_train_test.prototxt", f"""
name: "TwoClass"
layer {{ name: "d" type: "IDXData" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ scale: 0.00390625 }}
  idx_data_param {{ image_source: "{train_img}" label_source: "{train_lbl}"
                   batch_size: 32 shuffle: true }} }}
layer {{ name: "d" type: "IDXData" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ scale: 0.00390625 }}
  idx_data_param {{ image_source: "{test_img}" label_source: "{test_lbl}"
                   batch_size: 50 }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param {{ num_output: 2 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "accuracy" type: "Accuracy" bottom: "ip" bottom: "label"
  top: "accuracy" include {{ phase: TEST }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label"
  top: "loss" }}
""")
    return _write(tmp_path / "twoclass_solver.prototxt", f"""
net: "{net}"
test_iter: 2
test_interval: 20
base_lr: 0.5
momentum: 0.9
lr_policy: "fixed"
display: 10
max_iter: 40
snapshot: 20
snapshot_prefix: "{tmp_path / 'snapshots' / 'twoclass'}"
random_seed: 7
""")


# ------------------------------------------------------------- arguments
@pytest.mark.parametrize("argv, field, expected", [
    (["train", "--solver", "s.prototxt"], "gpu", None),
    (["train", "--solver", "s.prototxt", "--gpu"], "gpu", 0),
    (["train", "--solver", "s.prototxt", "--gpu", "1"], "gpu", 1),
    (["train", "--solver", "s.prototxt", "--engine", "numba"], "engine", "numba"),
    (["train", "--solver", "s.prototxt", "--plot", "out"], "plot", "out"),
    (["train", "--solver", "s.prototxt", "--data", "d"], "data", "d"),
    (["train", "--solver", "s", "--snapshot", "x.solverstate"], "snapshot",
     "x.solverstate"),
    (["test", "--model", "m", "--weights", "w"], "iterations", 50),
    (["time", "--model", "m"], "iterations", 50),
    (["time", "--model", "m"], "phase", "TRAIN"),
    (["time", "--model", "m", "--phase", "test"], "phase", "TEST"),
    (["time", "--model", "m", "--stage", "a", "--stage", "b"], "stage", ["a", "b"]),
])
def test_parser_values(argv, field, expected):
    args = cli.build_parser().parse_args(argv)
    assert getattr(args, field) == expected


@pytest.mark.parametrize("argv, needle", [
    ([], "COMMAND"),
    (["train"], "--solver"),
    (["train", "--solver", "s", "--weights", "w", "--snapshot", "x"],
     "not allowed with"),
    (["train", "--solver", "s", "--engine", "fortran"], "invalid choice"),
    (["train", "--solver", "s", "--gpu", "-1"], "must be >= 0"),
    (["test", "--model", "m"], "--weights"),
    (["test", "--model", "m", "--weights", "w", "--iterations", "0"], ">= 1"),
    (["time", "--model", "m", "--iterations", "many"], "integer"),
    (["time", "--model", "m", "--phase", "VALIDATE"], "invalid choice"),
    (["fly"], "invalid choice"),
])
def test_bad_arguments_are_usage_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: netlite" in err
    assert needle in err


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "test", "time", "convert-mnist"):
        assert command in out


def test_console_entry_point_runs():
    # `python -m netlite.tools.cli` is what the console script calls.
    result = subprocess.run(
        [sys.executable, "-m", "netlite.tools.cli", "--version"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"netlite {netlite.__version__}"


def test_missing_files_are_errors_not_tracebacks(tmp_path, capsys):
    missing = str(tmp_path / "nope.prototxt")
    assert cli.main(["train", "--solver", missing]) == 1
    err = capsys.readouterr().err
    assert err.startswith("netlite train: error:") and "nope.prototxt" in err
    assert "Traceback" not in err
    model = _write(tmp_path / "tiny.prototxt", TINY_NET)
    assert cli.main(["time", "--model", model, "--data", missing]) == 1
    assert "--data" in capsys.readouterr().err


def test_gpu_without_cupy_is_an_error(tmp_path, capsys):
    if netlite.backend.cupy_available():
        pytest.skip("a GPU is available")
    model = _write(tmp_path / "tiny.prototxt", TINY_NET)
    assert cli.main(["time", "--model", model, "--gpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("netlite time: error:") and "CuPy" in err


def test_caffe_formatter():
    record = logging.LogRecord("netlite", logging.WARNING, "/x/solver.py", 42,
                               "Iteration %d, loss = %g", (100, 0.25), None)
    line = logs.CaffeFormatter().format(record)
    assert GLOG_LINE.match(line)
    assert line.startswith("W")
    assert line.endswith(" solver.py:42] Iteration 100, loss = 0.25")


# ------------------------------------------------------------------ time
def test_time_reports_caffe_lines(tmp_path, capsys):
    model = _write(tmp_path / "tiny.prototxt", TINY_NET)
    assert cli.main(["time", "--model", model, "--iterations", "3"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines and all(GLOG_LINE.match(line) for line in lines), out
    msgs = glog_messages(out)
    assert any(m.startswith("Initial loss: ") for m in msgs)
    assert "Testing for 3 iterations." in msgs
    assert sum(m.startswith("Iteration: ") for m in msgs) == 3
    for layer in ("data", "ip", "loss"):
        for direction in ("forward", "backward"):
            pattern = rf"^\s*{layer}\t{direction}: [0-9.e+-]+ ms\.$"
            assert any(re.match(pattern, m) for m in msgs), (layer, direction)
    for head in ("Average Forward pass: ", "Average Backward pass: ",
                 "Average Forward-Backward: ", "Total Time: "):
        assert any(m.startswith(head) and m.endswith(" ms.") for m in msgs), head


def test_time_net_returns_consistent_numbers(tmp_path):
    model = _write(tmp_path / "tiny.prototxt", TINY_NET)
    out = commands.time_net(model, iterations=4, phase="TEST")
    assert [name for name, _, _ in out["layers"]] == ["data", "ip", "loss"]
    assert all(f >= 0 and b >= 0 for _, f, b in out["layers"])
    # Per-layer times are parts of the passes, which are parts of the total.
    assert sum(f for _, f, _ in out["layers"]) <= out["forward_ms"] + 1e-9
    assert sum(b for _, _, b in out["layers"]) <= out["backward_ms"] + 1e-9
    assert out["forward_ms"] + out["backward_ms"] <= out["forward_backward_ms"] + 1e-9
    assert out["total_ms"] == pytest.approx(4 * out["forward_backward_ms"])
    assert out["initial_loss"] > 0  # EuclideanLoss with random weights


def test_time_runs_on_the_numba_engine(tmp_path, capsys):
    pytest.importorskip("numba")
    model = _write(tmp_path / "tiny.prototxt", TINY_NET)
    assert cli.main(["time", "--model", model, "--iterations", "1",
                     "--engine", "numba"]) == 0
    assert netlite.cpu_engine() == "numba"
    assert "Use CPU (numba engine)." in glog_messages(capsys.readouterr().out)


# ------------------------------------------------------------------ test
@pytest.fixture
def tiny_weights(tmp_path):
    """Known weights for TINY_NET's "ip" layer, saved as a .caffemodel."""
    model = _write(tmp_path / "tiny.prototxt", TINY_NET)
    net = netlite.Net(model, netlite.TEST)
    net.params["ip"][0].data[...] = [[0.1, 0.2, 0.3], [-0.5, 0.25, 0.0]]
    net.params["ip"][1].data[...] = [0.4, -0.1]
    path = str(tmp_path / "tiny.caffemodel")
    net.save(path)
    # ip = x W^T + b = [1.0, -0.35] per row; the loss top holds
    # sum((ip - 0.5)^2) / (2 N), the net's loss is 3 times that.
    loss = 4 * ((1.0 - 0.5) ** 2 + (-0.35 - 0.5) ** 2) / 8
    return model, path, loss


def test_test_reports_batches_and_means(tiny_weights, capsys):
    model, weights, loss = tiny_weights
    assert cli.main(["test", "--model", model, "--weights", weights,
                     "--iterations", "2"]) == 0
    msgs = glog_messages(capsys.readouterr().out)
    assert "Running for 2 iterations." in msgs
    for i in range(2):
        batch = [m for m in msgs if m.startswith(f"Batch {i}, ")]
        # Outputs in Caffe's (alphabetical) order, one line per element.
        assert batch[0].startswith(f"Batch {i}, loss = ")
        assert float(batch[0].split("= ")[1]) == pytest.approx(loss, rel=1e-5)
        assert batch[1:] == [f"Batch {i}, z = 2", f"Batch {i}, z = 2"]
    loss_line = next(m for m in msgs if m.startswith("Loss: "))
    assert float(loss_line[6:]) == pytest.approx(3 * loss, rel=1e-5)
    mean = next(m for m in msgs if m.startswith("loss = "))
    match = re.fullmatch(r"loss = (\S+) \(\* 3 = (\S+) loss\)", mean)
    assert match, mean
    assert float(match.group(1)) == pytest.approx(loss, rel=1e-5)
    assert float(match.group(2)) == pytest.approx(3 * loss, rel=1e-5)
    assert msgs.count("z = 2") == 2  # per element, no loss suffix


def test_test_function_returns_means(tiny_weights):
    model, weights, loss = tiny_weights
    result = commands.test(model, weights, iterations=3)
    assert result.loss == pytest.approx(3 * loss, rel=1e-5)  # weighted
    assert result.outputs["loss"] == pytest.approx(loss, rel=1e-5)
    np.testing.assert_array_equal(result.outputs["z"], [2.0, 2.0])


def test_test_rejects_mismatched_weights(tmp_path, tiny_weights, capsys):
    model, _, _ = tiny_weights
    # Same layer names, but "ip" has 5 inputs instead of 3.
    other = netlite.Net(TINY_NET.replace("dim: 4 dim: 3", "dim: 4 dim: 5"),
                        netlite.TEST)
    path = str(tmp_path / "other.caffemodel")
    other.save(path)
    assert cli.main(["test", "--model", model, "--weights", path]) == 1
    err = capsys.readouterr().err
    assert "netlite test: error:" in err and "ip" in err


# ----------------------------------------------------------------- train
def test_train_writes_plots_snapshots_and_summary(solver_file, tmp_path, capsys):
    plots = tmp_path / "plots"
    code = cli.main(["train", "--solver", solver_file, "--plot", str(plots),
                     "--engine", "numpy"])
    out = capsys.readouterr().out
    assert code == 0, out
    msgs = glog_messages(out)
    # The solver's Caffe-style lines come through the CLI's handler.
    assert any(re.match(r"Iteration 10 \(.* iter/s, .*\), loss = ", m) for m in msgs)
    assert any(m.startswith("Iteration 40, Testing net (#0)") for m in msgs)
    assert "Optimization Done." in msgs
    # The summary: the last test (at the last iteration; the problem is
    # easy), weights and plots.
    final = re.search(
        r"^Last test \(iteration 40\): accuracy = ([0-9.]+), loss = [0-9.e+-]+$",
        out, re.M,
    )
    assert final and float(final.group(1)) >= 0.95, out
    snap = tmp_path / "snapshots"
    for it in (20, 40):
        assert (snap / f"twoclass_iter_{it}.caffemodel").is_file()
        assert (snap / f"twoclass_iter_{it}.solverstate").is_file()
    assert f"Weights: {snap / 'twoclass_iter_40.caffemodel'}" in out
    for name in ("twoclass_loss.png", "twoclass_accuracy.png"):
        path = plots / name
        assert f"Plot: {path}" in out
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert path.stat().st_size > 5000  # a drawn figure, not an empty file


def test_train_function_history(solver_file, tmp_path):
    result = commands.train(solver_file, engine="numpy", progress=False)
    assert not result.interrupted and result.plots == []
    history = result.history
    assert history.train_iters == list(range(40))
    assert all(np.isfinite(history.train_loss))
    accuracy = history.tests[0]["accuracy"]
    assert [it for it, _ in accuracy] == [0, 20, 40]
    assert result.final_test["accuracy"] == accuracy[-1][1] >= 0.95
    # Training lowered the loss.
    assert np.mean(history.train_loss[-10:]) < np.mean(history.train_loss[:5])
    assert result.solver.iter == 40


def test_train_resume_and_finetune(solver_file, tmp_path, capsys):
    assert cli.main(["train", "--solver", solver_file]) == 0
    snap = tmp_path / "snapshots"
    state = snap / "twoclass_iter_20.solverstate"
    capsys.readouterr()
    result = commands.train(solver_file, snapshot=str(state), progress=False)
    # Resumed at 20: only iterations 20..39 ran.
    assert result.history.train_iters == list(range(20, 40))
    capsys.readouterr()
    weights = snap / "twoclass_iter_40.caffemodel"
    result = commands.train(solver_file, weights=str(weights), progress=False)
    # Fine-tuning from trained weights: the first test is already good.
    assert result.history.tests[0]["accuracy"][0][1] >= 0.95
    with pytest.raises(ValueError, match="not both"):
        commands.train(solver_file, weights=str(weights), snapshot=str(state))


def test_train_ctrl_c_snapshots_and_exits_nonzero(solver_file, tmp_path, capsys,
                                                  monkeypatch):
    real = plotting.TrainingHistory.add_train

    def interrupt(self, iteration, loss):
        real(self, iteration, loss)
        if iteration == 12:
            raise KeyboardInterrupt  # what Ctrl-C raises in the main loop

    monkeypatch.setattr(plotting.TrainingHistory, "add_train", interrupt)
    plots = tmp_path / "plots"
    code = cli.main(["train", "--solver", solver_file, "--plot", str(plots)])
    captured = capsys.readouterr()
    assert code == cli.EXIT_INTERRUPTED != 0
    assert "netlite train: interrupted at iteration 13" in captured.err
    state = tmp_path / "snapshots" / "twoclass_iter_13.solverstate"
    assert state.is_file() and str(state) in captured.err
    assert (tmp_path / "snapshots" / "twoclass_iter_13.caffemodel").is_file()
    # The run so far is still plotted.
    assert (plots / "twoclass_loss.png").read_bytes()[:8] == PNG_MAGIC


def test_train_without_matplotlib_fails_before_training(solver_file, tmp_path,
                                                        capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    code = cli.main(["train", "--solver", solver_file, "--plot",
                     str(tmp_path / "plots")])
    captured = capsys.readouterr()
    assert code == 1
    assert "matplotlib" in captured.err
    assert "Solving" not in captured.out  # nothing was trained
    assert not (tmp_path / "snapshots").exists()


def test_train_progress_bar_and_log_lines_share_stdout(solver_file, capsys):
    pytest.importorskip("tqdm")
    logs.configure_logging()
    result = commands.train(solver_file, progress=True)
    assert not result.interrupted
    assert logs._handler.bar is None  # detached when training ended
    out = capsys.readouterr().out
    assert "40/40" in out  # the bar reached the end
    # Log lines still arrive whole, each on its own line.
    assert any(re.match(r"^I\d{4} .*\] Optimization Done\.$", line)
               for line in out.splitlines())


def test_quiet_hides_info_lines(solver_file, capsys):
    assert cli.main(["-q", "train", "--solver", solver_file]) == 0
    out = capsys.readouterr().out
    assert "Iteration" not in out
    assert re.search(r"^Last test \(iteration 40\): accuracy = ", out, re.M)


# ---------------------------------------------------------- convert-mnist
def test_convert_mnist_is_delegated(tmp_path, capsys):
    pytest.importorskip("lmdb")
    img, lbl = _two_class_idx(tmp_path, 10, seed=3)
    db = tmp_path / "db"
    assert cli.main(["convert-mnist", img, lbl, str(db)]) == 0
    assert "Wrote 10 records" in capsys.readouterr().out
    assert db.is_dir()
    assert cli.main(["-q", "convert-mnist", img, lbl, str(tmp_path / "db2")]) == 0
    assert (tmp_path / "db2").is_dir()
    assert cli.main(["convert-mnist", img, lbl, str(db)]) == 1  # exists
    assert "error" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["convert-mnist", "--help"])
    assert exc.value.code == 0
    assert "netlite convert-mnist" in capsys.readouterr().out


# -------------------------------------------------------------- plotting
def test_moving_average():
    assert plotting.moving_average([1, 2, 3, 4, 5], 2) == [1, 1.5, 2.5, 3.5, 4.5]
    assert plotting.moving_average([4.0], 10) == [4.0]


def test_plot_history_without_tests_writes_only_the_loss(tmp_path):
    pytest.importorskip("matplotlib")
    history = plotting.TrainingHistory()
    for i in range(300):
        history.add_train(i, 2.0 * np.exp(-i / 50))
    paths = plotting.plot_history(history, tmp_path / "p", prefix="x_")
    assert paths == [str(tmp_path / "p" / "x_loss.png")]
    with open(paths[0], "rb") as f:
        assert f.read(8) == PNG_MAGIC
    history.add_test(300, {"accuracy": 0.9, "loss": 0.3})
    paths = plotting.plot_history(history, tmp_path / "p")
    assert [os.path.basename(p) for p in paths] == ["loss.png", "accuracy.png"]
    assert history.final_test("accuracy") == 0.9


def test_history_leaves_out_vector_outputs():
    history = plotting.TrainingHistory()
    history.add_test(0, {"accuracy": 0.5, "per_class": np.array([0.1, 0.9])})
    history.add_test(10, {"accuracy": np.float32(0.75)})
    assert history.tests == {0: {"accuracy": [(0, 0.5), (10, 0.75)]}}
    assert history.accuracy_outputs() == [(0, "accuracy")]


@pytest.mark.skipif(not hasattr(os, "killpg") or sys.platform == "win32",
                    reason="needs POSIX signals")
def test_real_sigint_snapshots_and_exits_130(solver_file, tmp_path):
    import signal

    # Train "forever" (the two-class net is fast), interrupt once the log
    # shows training is under way.
    with open(solver_file, encoding="utf-8") as f:
        text = f.read()
    forever = _write(tmp_path / "forever_solver.prototxt",
                     text.replace("max_iter: 40", "max_iter: 100000000")
                     .replace("snapshot: 20", "snapshot: 0"))
    # A shell may start this process with SIGINT ignored, and children
    # inherit that; the child restores the default (KeyboardInterrupt).
    code = ("import signal, sys; "
            "signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from netlite.tools.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "train", "--solver", forever],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        for line in proc.stdout:
            if re.search(r"\] Iteration 100 \(", line):
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == cli.EXIT_INTERRUPTED, err
    match = re.search(r"interrupted at iteration (\d+); snapshot written: (\S+)",
                      err)
    assert match, err
    state = match.group(2)
    assert state.endswith(f"_iter_{match.group(1)}.solverstate")
    assert os.path.isfile(state)
    assert os.path.isfile(state.replace(".solverstate", ".caffemodel"))
    assert "Interrupted: snapshotting iteration" in out
