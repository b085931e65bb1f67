"""``netlite train`` around the solver: progress in a terminal and in a
log, the end-of-training summary, the data folder it logs, Caffe's
``-sigint_effect``/``-sighup_effect`` and ``-level``/``-stage``.

The nets are DummyData nets (no dataset), so every run takes milliseconds.
"""

import io as pyio
import logging
import os
import re
import signal
import subprocess
import sys
import types

import pytest
from cli_testing import GLOG_LINE, glog_messages

from netlite.data import catalog
from netlite.proto import netlite_pb2
from netlite.tools import cli, commands, logs, plotting

NET = """
  name: "dummy"
  layer { name: "data" type: "DummyData" top: "x" top: "y"
    dummy_data_param { shape { dim: 8 dim: 3 } shape { dim: 8 dim: 2 }
      data_filler { type: "gaussian" } data_filler { type: "constant" value: 0.5 } } }
  layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
    inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
  layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "y" top: "loss" }
"""


def write_solver(tmp_path, max_iter=8, test_interval=4, extra="", net=NET,
                 name="dummy_solver.prototxt"):
    """A DummyData solver file in ``tmp_path``; returns its path."""
    path = tmp_path / name
    path.write_text(f"""
net_param {{ {net} }}
test_iter: 1
test_interval: {test_interval}
base_lr: 0.01
lr_policy: "fixed"
max_iter: {max_iter}
display: 0
snapshot_prefix: "{tmp_path / 'snap'}"
random_seed: 1
{extra}
""")
    return str(path)


# -------------------------------------------------------------- progress
class FakeTerminal(pyio.StringIO):
    """A stdout that says it is a terminal."""

    def isatty(self):
        return True


@pytest.mark.parametrize("progress, stream, expected", [
    (None, FakeTerminal(), "bar"),
    (None, pyio.StringIO(), "log"),   # a file or a pipe
    (True, pyio.StringIO(), "bar"),
    ("bar", pyio.StringIO(), "bar"),
    ("log", FakeTerminal(), "log"),
    (False, FakeTerminal(), None),
])
def test_progress_mode(progress, stream, expected):
    if expected == "bar":
        pytest.importorskip("tqdm")
    assert logs.progress_mode(progress, stream) == expected


def test_progress_mode_without_tqdm_logs_records(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tqdm" else real(name, *a))
    assert logs.progress_mode(None, FakeTerminal()) == "log"


def test_progress_mode_rejects_other_values():
    with pytest.raises(ValueError, match="'bar' or 'log'"):
        logs.progress_mode("yes")


@pytest.mark.parametrize("seconds, text", [
    (0, "0:00:00"), (59.6, "0:01:00"), (3725, "1:02:05"), (90000, "25:00:00"),
    (None, "?"), (float("inf"), "?"),
])
def test_format_duration(seconds, text):
    assert logs.format_duration(seconds) == text


def test_progress_records_every_interval(caplog):
    caplog.set_level(logging.INFO, logger="netlite")
    now = [0.0]
    progress = logs.Progress("log", 0, 100, images_per_iteration=64,
                             interval=10.0, clock=lambda: now[0])
    for i in range(100):
        # 0.5 s per iteration, 1.5 s for the iterations 40..59.
        now[0] += 1.5 if 40 <= i < 60 else 0.5
        progress.iteration(smoothed_loss=1.0 / (i + 1), lr=0.01)
    progress.close()
    progress.close()  # idempotent
    assert caplog.messages == [
        "Progress: iteration 20/100 (20%), 2 iter/s, 128 images/s, "
        "loss 0.05, ETA 0:00:40",
        "Progress: iteration 40/100 (40%), 2 iter/s, 128 images/s, "
        "loss 0.025, ETA 0:00:30",
        # The rate is that of the last interval (here, 7 slow iterations).
        "Progress: iteration 47/100 (47%), 0.667 iter/s, 43 images/s, "
        "loss 0.02128, ETA 0:01:20",
        "Progress: iteration 54/100 (54%), 0.667 iter/s, 43 images/s, "
        "loss 0.01852, ETA 0:01:09",
        # 6 slow and 2 fast iterations in 10 s.
        "Progress: iteration 62/100 (62%), 0.8 iter/s, 51 images/s, "
        "loss 0.01613, ETA 0:00:48",
        "Progress: iteration 82/100 (82%), 2 iter/s, 128 images/s, "
        "loss 0.0122, ETA 0:00:09",
        # 100 iterations in 70 s.
        "Progress: done at iteration 100/100 after 0:01:10 (1.43 iter/s, "
        "91 images/s)",
    ]


def test_progress_interval_zero_records_every_iteration(caplog):
    caplog.set_level(logging.INFO, logger="netlite")
    now = [0.0]
    progress = logs.Progress("log", 5, 8, interval=0, clock=lambda: now[0])
    for _ in range(2):
        now[0] += 0.25
        progress.iteration(0.5, 0.1)
    progress.close()  # stopped before max_iter
    assert caplog.messages == [
        "Progress: iteration 6/8 (75%), 4 iter/s, loss 0.5, ETA 0:00:00",
        "Progress: iteration 7/8 (88%), 4 iter/s, loss 0.5, ETA 0:00:00",
        "Progress: stopped at iteration 7/8 after 0:00:00 (4 iter/s)",
    ]


def test_progress_off_and_nothing_to_do_log_nothing(caplog):
    caplog.set_level(logging.INFO, logger="netlite")
    for mode, start in ((None, 0), (False, 0), ("log", 10)):
        progress = logs.Progress(mode, start, 10)
        progress.iteration(1.0, 0.1)
        progress.close()
    assert caplog.messages == []
    with pytest.raises(ValueError, match="unknown progress mode"):
        logs.Progress("loud", 0, 10)
    with pytest.raises(ValueError, match=">= 0 s"):
        logs.Progress("log", 0, 10, interval=-1)


def test_train_in_a_terminal_shows_the_bar(tmp_path, monkeypatch):
    pytest.importorskip("tqdm")
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    logs.configure_logging(stream=terminal)
    result = commands.train(write_solver(tmp_path), progress_interval=0)
    assert not result.interrupted
    out = terminal.getvalue()
    assert "8/8" in out and "\r" in out  # tqdm's bar, redrawn in place
    assert "Progress:" not in out        # and no records
    assert any(m == "Optimization Done." for m in glog_messages(out))


def test_train_in_a_log_writes_progress_records(tmp_path, capsys):
    logs.configure_logging()  # stdout is pytest's capture: not a terminal
    result = commands.train(write_solver(tmp_path), progress_interval=0)
    assert not result.interrupted
    out = capsys.readouterr().out
    assert "\r" not in out
    records = [m for m in glog_messages(out) if m.startswith("Progress: ")]
    assert len(records) == 9, records  # one per iteration, then the end
    match = re.fullmatch(
        r"Progress: iteration 1/8 \(12%\), ([0-9.]+) iter/s, ([0-9]+) images/s, "
        r"loss [0-9.e+-]+, ETA \d+:\d\d:\d\d", records[0])
    assert match, records[0]
    # images/s is iter/s times the batch (8 rows of DummyData).
    per_s, images = float(match.group(1)), int(match.group(2))
    assert images == pytest.approx(8 * per_s, rel=0.01, abs=8)
    assert records[-1].startswith("Progress: done at iteration 8/8 after ")


def test_cli_through_a_pipe_writes_progress_records(tmp_path):
    solver = write_solver(tmp_path, max_iter=30, test_interval=10)
    result = subprocess.run(
        [sys.executable, "-m", "netlite.tools.cli", "train", "-solver", solver,
         "-progress_interval", "0", "-engine", "numpy"],
        capture_output=True, text=True, timeout=120,  # stdout is a pipe
    )
    assert result.returncode == 0, result.stderr
    msgs = glog_messages(result.stdout)
    records = [m for m in msgs if m.startswith("Progress: iteration ")]
    assert [int(re.match(r"Progress: iteration (\d+)/30", m).group(1))
            for m in records] == list(range(1, 31))
    assert any(m.startswith("Progress: done at iteration 30/30") for m in msgs)
    assert "\r" not in result.stdout


def test_no_progress_means_none(tmp_path, capsys):
    assert cli.main(["train", "-solver", write_solver(tmp_path),
                     "--no-progress", "--progress-interval", "0"]) == 0
    assert "Progress:" not in capsys.readouterr().out


# --------------------------------------------------------------- summary
def _summary(tmp_path, capsys, **kwargs):
    code = cli.main(["-q", "train", "-solver", write_solver(tmp_path, **kwargs)])
    out = capsys.readouterr().out
    return code, [line for line in out.splitlines() if not GLOG_LINE.match(line)]


def test_summary_names_the_last_test_at_the_end(tmp_path, capsys):
    code, lines = _summary(tmp_path, capsys, max_iter=8, test_interval=4)
    assert code == 0
    assert re.fullmatch(r"Last test \(iteration 8\): loss = [0-9.e+-]+", lines[0])


def test_summary_says_when_the_last_test_ran_before_the_end(tmp_path, capsys):
    # The README's kind of run: test_interval beyond max_iter, so the only
    # test is the initial one.  It is not presented as the final result.
    code, lines = _summary(tmp_path, capsys, max_iter=8, test_interval=500)
    assert code == 0
    assert re.fullmatch(
        r"Last test \(iteration 0; training ended at iteration 8\): "
        r"loss = [0-9.e+-]+", lines[0]), lines


def test_summary_says_no_test_ran(tmp_path, capsys):
    code, lines = _summary(tmp_path, capsys, test_interval=500,
                           extra="test_initialization: false")
    assert code == 0
    assert lines[0] == ("No test ran (test_interval: 500, test_initialization: "
                        "false, training ended at iteration 8).")
    assert not any("iteration 0" in line for line in lines)


def test_summary_when_stopped_before_the_first_test(tmp_path, capsys,
                                                    monkeypatch):
    def interrupt(self, iteration, loss):
        raise KeyboardInterrupt

    monkeypatch.setattr(plotting.TrainingHistory, "add_train", interrupt)
    solver = write_solver(tmp_path, extra="test_initialization: false")
    assert cli.main(["-q", "train", "-solver", solver]) == cli.EXIT_INTERRUPTED
    out = capsys.readouterr().out
    assert "No test ran (training stopped before the first test)." in out


def test_summary_without_a_test_net(tmp_path, capsys):
    path = tmp_path / "train_only_solver.prototxt"
    path.write_text(f"train_net_param {{ {NET} }} base_lr: 0.01 "
                    f"lr_policy: 'fixed' max_iter: 3 "
                    f"snapshot_prefix: '{tmp_path / 'snap'}'")
    assert cli.main(["-q", "train", "-solver", str(path)]) == 0
    out = capsys.readouterr().out
    assert "No test ran (the solver has no test net)." in out.splitlines()


def test_summary_of_several_test_nets(tmp_path, capsys):
    path = tmp_path / "two_tests_solver.prototxt"
    path.write_text(
        f"train_net_param {{ {NET} }} test_net_param {{ {NET} }} "
        f"test_net_param {{ {NET} }} test_iter: 1 test_iter: 1 "
        f"test_interval: 2 base_lr: 0.01 lr_policy: 'fixed' max_iter: 3 "
        f"snapshot_prefix: '{tmp_path / 'snap'}'")
    assert cli.main(["-q", "train", "-solver", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    for net_id in (0, 1):
        assert any(re.fullmatch(
            rf"Last test of test net #{net_id} \(iteration 2; training ended "
            rf"at iteration 3\): loss = [0-9.e+-]+", line) for line in lines)


def test_history_last_test():
    history = plotting.TrainingHistory()
    assert history.last_test() is None
    history.add_test(0, {"accuracy": 0.1, "per_class": [0.2, 0.3]})
    history.add_test(50, {"per_class": [0.5, 0.6]})  # no scalar output
    assert history.test_iters == {0: [0, 50]}
    assert history.last_test() == (50, {})
    history.add_test(100, {"accuracy": 0.9})
    assert history.last_test() == (100, {"accuracy": 0.9})
    assert history.last_test(1) is None


# ----------------------------------------------------------- data folder
def _stub_net(*sources):
    layers = []
    for source in sources:
        param = netlite_pb2.LayerParameter(name="d", type="IDXData")
        param.idx_data_param.source = source
        layers.append(types.SimpleNamespace(layer_param=param))
    layers.append(types.SimpleNamespace(
        layer_param=netlite_pb2.LayerParameter(name="ip", type="InnerProduct")))
    return types.SimpleNamespace(layers=layers)


def _fake_dataset(root, name="mnist"):
    folder = root / name
    folder.mkdir(parents=True)
    for stem in catalog.get_spec(name).stems:
        (folder / f"{stem}.gz").write_bytes(b"")
    return folder


def test_named_datasets():
    nets = [_stub_net("mnist:train", "fashion-mnist:test"),
            _stub_net("mnist:test", "not a source")]
    assert commands.named_datasets(nets) == ["mnist", "fashion-mnist"]


def test_data_folder_is_logged_with_its_origin(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="netlite")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    env_root = tmp_path / "env"
    env_folder = _fake_dataset(env_root)
    monkeypatch.setenv("NETLITE_DATA", str(env_root))
    commands.log_data_folders([_stub_net("mnist:train", "mnist:test")])
    assert caplog.messages == [
        f"Data folder of mnist: {env_folder} (from $NETLITE_DATA={env_root})"
    ]
    caplog.clear()
    flag_folder = _fake_dataset(tmp_path / "flag")
    commands.set_data_dir(str(tmp_path / "flag"))
    commands.log_data_folders([_stub_net("mnist:train")])
    assert caplog.messages == [
        f"Data folder of mnist: {flag_folder} (from --data {tmp_path / 'flag'})"
    ]
    caplog.clear()
    catalog.set_data_dir(None)
    monkeypatch.delenv("NETLITE_DATA")
    cached = _fake_dataset(tmp_path / "cache" / "netlite")
    commands.log_data_folders([_stub_net("mnist:train")])
    assert caplog.messages == [
        f"Data folder of mnist: {cached} (from the user cache)"
    ]


def test_train_logs_the_data_folder_before_optimizing(tmp_path, monkeypatch,
                                                      capsys):
    calls = []
    monkeypatch.setattr(commands, "log_data_folders",
                        lambda nets: calls.append([n.name for n in nets]))
    commands.train(write_solver(tmp_path), progress=False)
    assert calls == [["dummy", "dummy"]]  # the train net and the test net


def test_a_net_on_mnist_logs_where_mnist_comes_from(tmp_path, capsys):
    # The README's data set-up: NETLITE_DATA=../shared/datasets.
    spec = catalog.get_spec("mnist")
    found = [d for d, _ in catalog.search_dirs("mnist")
             if catalog.has_all_files(d, spec)]
    if not found:
        pytest.skip("MNIST is not on this machine")
    model = tmp_path / "mnist_ip.prototxt"
    model.write_text("""
layer { name: "mnist" type: "IDXData" top: "data" top: "label"
  idx_data_param { source: "mnist:test" batch_size: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 10 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label"
  top: "loss" }
""")
    assert cli.main(["time", "-model", str(model), "-iterations", "1",
                     "-phase", "TEST"]) == 0
    msgs = glog_messages(capsys.readouterr().out)
    line = next(m for m in msgs if m.startswith("Data folder of mnist: "))
    assert line.startswith(f"Data folder of mnist: {found[0]} (from ")
    # Logged before the work starts.
    assert msgs.index(line) < msgs.index("Performing Forward")


# ------------------------------------------------------- signal effects
@pytest.fixture
def send_at_iteration(monkeypatch):
    """``send(signum, at)``: the process signals itself after iteration
    ``at``; a recording handler stands in should train() install none."""
    stray = []
    previous = signal.signal(signal.SIGHUP, lambda *a: stray.append(a))

    def send(signum, at):
        real = plotting.TrainingHistory.add_train

        def add_train(self, iteration, loss):
            real(self, iteration, loss)
            if iteration == at:
                os.kill(os.getpid(), signum)

        monkeypatch.setattr(plotting.TrainingHistory, "add_train", add_train)

    yield send
    signal.signal(signal.SIGHUP, previous)
    assert stray == [], "train() left SIGHUP to the test's handler"


posix_signals = pytest.mark.skipif(not hasattr(signal, "SIGHUP"),
                                   reason="needs POSIX signals")


@posix_signals
@pytest.mark.parametrize("signame, flag", [("SIGHUP", "-sighup_effect"),
                                           ("SIGINT", "-sigint_effect")])
def test_signal_snapshot_effect_snapshots_and_goes_on(tmp_path, capsys, signame,
                                                      flag, send_at_iteration):
    send_at_iteration(getattr(signal, signame), at=3)
    code = cli.main(["train", "-solver", write_solver(tmp_path), flag, "snapshot",
                     "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"{signame} received: snapshotting iteration 4" in glog_messages(out)
    assert (tmp_path / "snap_iter_4.caffemodel").is_file()
    assert (tmp_path / "snap_iter_4.solverstate").is_file()
    assert (tmp_path / "snap_iter_8.caffemodel").is_file()  # ran to the end


@posix_signals
def test_sighup_stop_effect_stops_after_a_snapshot(tmp_path, capsys,
                                                   send_at_iteration):
    send_at_iteration(signal.SIGHUP, at=3)
    code = cli.main(["train", "-solver", write_solver(tmp_path),
                     "-sighup_effect", "stop"])
    captured = capsys.readouterr()
    assert code == cli.EXIT_HANGUP == 129
    assert "netlite train: stopped by SIGHUP at iteration 4" in captured.err
    assert "SIGHUP received: stopping" in glog_messages(captured.out)
    assert (tmp_path / "snap_iter_4.solverstate").is_file()
    assert not (tmp_path / "snap_iter_8.caffemodel").exists()


@posix_signals
def test_sighup_snapshot_is_the_cli_default(tmp_path, capsys, send_at_iteration):
    send_at_iteration(signal.SIGHUP, at=5)
    assert cli.main(["train", "-solver", write_solver(tmp_path)]) == 0
    assert (tmp_path / "snap_iter_6.caffemodel").is_file()


@posix_signals
def test_sigint_none_effect_ignores_ctrl_c(tmp_path, send_at_iteration):
    send_at_iteration(signal.SIGINT, at=2)
    result = commands.train(write_solver(tmp_path), progress=False,
                            sigint_effect="none")
    assert not result.interrupted and result.solver.iter == 8
    assert not (tmp_path / "snap_iter_3.caffemodel").exists()


@posix_signals
def test_sigint_stop_is_ctrl_c(tmp_path, send_at_iteration):
    send_at_iteration(signal.SIGINT, at=2)
    result = commands.train(write_solver(tmp_path), progress=False,
                            sigint_effect="stop", sighup_effect="snapshot")
    assert result.interrupted and result.stopped_by == "SIGINT"
    assert (tmp_path / "snap_iter_3.solverstate").is_file()


@posix_signals
def test_signal_handlers_are_restored(tmp_path):
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGHUP))
    commands.train(write_solver(tmp_path), progress=False,
                   sigint_effect="snapshot", sighup_effect="none")
    assert (signal.getsignal(signal.SIGINT),
            signal.getsignal(signal.SIGHUP)) == before


def test_signal_effects_are_checked(tmp_path):
    with pytest.raises(ValueError, match="sigint_effect must be one of stop"):
        commands.train(write_solver(tmp_path), sigint_effect="explode")


# ---------------------------------------------------------- level, stage
STAGED_NET = NET + """
  layer { name: "extra" type: "EuclideanLoss" bottom: "ip" bottom: "y"
    top: "extra" include { phase: TRAIN stage: "extra" } }
  layer { name: "deep" type: "EuclideanLoss" bottom: "ip" bottom: "y"
    top: "deep" include { phase: TRAIN min_level: 2 } }
"""


@pytest.mark.parametrize("argv, layers", [
    ([], []),
    (["-stage", "extra"], ["extra"]),
    (["-level", "2"], ["deep"]),
    (["-level=2", "-stage=extra"], ["extra", "deep"]),
])
def test_train_level_and_stage_reach_the_train_net(tmp_path, monkeypatch,
                                                   argv, layers):
    seen = {}
    real = commands.train

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        seen["layers"] = list(result.solver.net.layer_names)
        seen["prefix"] = result.solver.param.snapshot_prefix
        return result

    monkeypatch.setattr(commands, "train", spy)
    solver = write_solver(tmp_path, net=STAGED_NET, max_iter=1)
    assert cli.main(["-q", "train", "-solver", solver, *argv]) == 0
    # (Split layers left out: y feeds several losses.)
    assert [n for n in seen["layers"] if not n.endswith("_split")] == [
        "data", "ip", "loss", *layers]
    assert seen["prefix"] == str(tmp_path / "snap")
