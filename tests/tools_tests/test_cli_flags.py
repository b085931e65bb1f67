"""Caffe's ``caffe`` command-line habits: gflags spellings, global options
anywhere, ``-gpu all``, ``device_query`` and unknown-flag messages.

Caffe's tool (tools/caffe.cpp) reads its flags with gflags, which takes
``-solver S``, ``-solver=S``, ``--solver S`` and ``--solver=S`` alike, and
flags before or after the command.  No GPU is needed: ``device_query`` and
``-gpu`` are checked against a stand-in ``cupy`` module that reports
devices, and against none.
"""

import logging
import sys
import types

import pytest
from cli_testing import glog_messages

import netlite
from netlite import backend
from netlite.data import convert_mnist
from netlite.tools import cli, devices

TINY_NET = """
name: "tiny"
layer { name: "data" type: "DummyData" top: "x" top: "y"
  dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
  inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "y" top: "loss" }
"""


def parse(argv):
    parser = cli.build_parser()
    argv, tail = cli.normalize_argv(parser, argv)
    assert tail == []
    return parser.parse_args(argv)


# ------------------------------------------------------- gflags spellings
@pytest.mark.parametrize("spelling", [
    ["-solver", "s.prototxt"], ["-solver=s.prototxt"],
    ["--solver", "s.prototxt"], ["--solver=s.prototxt"],
], ids=["-flag value", "-flag=value", "--flag value", "--flag=value"])
def test_solver_in_every_gflags_spelling(spelling):
    args = parse(["train", *spelling])
    assert args.command == "train" and args.solver == "s.prototxt"


@pytest.mark.parametrize("argv, field, expected", [
    (["train", "-solver", "s", "-weights", "a.caffemodel,b.caffemodel"],
     "weights", "a.caffemodel,b.caffemodel"),
    (["train", "-solver", "s", "-snapshot", "x.solverstate"], "snapshot",
     "x.solverstate"),
    (["train", "-solver", "s", "-gpu", "0"], "gpu", 0),
    (["train", "-solver", "s", "-gpu", "all"], "gpu", "all"),
    (["train", "-solver", "s", "-gpu=all"], "gpu", "all"),
    (["train", "-solver", "s", "-gpu", "0,1"], "gpu", [0, 1]),
    (["train", "-solver", "s", "-gpu"], "gpu", 0),
    (["train", "-solver", "s", "-level", "2"], "level", 2),
    (["train", "-solver", "s", "-stage", "a,b"], "stage", ["a", "b"]),
    (["train", "-solver", "s", "-sigint_effect", "snapshot"], "sigint_effect",
     "snapshot"),
    (["train", "-solver", "s", "--sighup_effect=none"], "sighup_effect", "none"),
    (["train", "-solver", "s", "--sigint-effect", "none"], "sigint_effect", "none"),
    (["train", "-solver", "s"], "sigint_effect", "stop"),      # Caffe's defaults
    (["train", "-solver", "s"], "sighup_effect", "snapshot"),
    (["test", "-model", "m", "-weights", "w", "-iterations", "7"], "iterations", 7),
    (["test", "-model", "m", "-weights", "w", "-stage", "x", "--stage", "y"],
     "stage", ["x", "y"]),
    (["time", "-model", "m", "-phase", "TEST"], "phase", "TEST"),
    (["time", "-model=m", "-phase=test", "-level=1"], "level", 1),
    (["device_query", "-gpu", "all"], "gpu", "all"),
    (["device_query"], "gpu", None),
])
def test_caffe_flags(argv, field, expected):
    assert getattr(parse(argv), field) == expected


def test_device_query_has_the_hyphenated_alias():
    assert parse(["device-query", "-gpu", "1"]).gpu == 1


# --------------------------------------------------------- global options
@pytest.mark.parametrize("argv", [
    ["-q", "train", "-solver", "s"],
    ["train", "-q", "-solver", "s"],
    ["train", "-solver", "s", "-q"],
    ["train", "-solver", "s", "--quiet"],
    ["--log-level", "warning", "train", "-solver", "s"],
    ["train", "-solver", "s", "-log_level=WARNING"],
    ["train", "-solver", "s", "-minloglevel", "1"],   # glog's flag and numbers
])
def test_quiet_before_or_after_the_command(argv):
    assert parse(argv).log_level == logging.WARNING


@pytest.mark.parametrize("argv", [
    ["--engine", "numba", "--data", "d", "time", "-model", "m"],
    ["time", "-model", "m", "-engine", "numba", "-data", "d"],
    ["--engine=numba", "time", "--data=d", "-model", "m"],
    # gflags takes flags anywhere: a command's flags before the command too.
    ["-model", "m", "-engine", "numba", "-data", "d", "time"],
])
def test_engine_and_data_before_or_after_the_command(argv):
    args = parse(argv)
    assert (args.command, args.model, args.engine, args.data) == (
        "time", "m", "numba", "d")


def test_global_defaults_survive_the_subcommand():
    # An option before the command is not reset by the command's parser.
    args = parse(["-q", "--engine", "numpy", "time", "-model", "m"])
    assert args.log_level == logging.WARNING and args.engine == "numpy"
    args = parse(["time", "-model", "m"])
    assert args.log_level == logging.INFO and args.engine is None
    assert args.data is None and args.level is None and args.stage == []


@pytest.mark.parametrize("argv", [["--version"], ["train", "--version"],
                                  ["-version"]])
def test_version_anywhere(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"netlite {netlite.__version__}"


def test_single_dash_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "-help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--solver" in out and "global options" in out


# ----------------------------------------------------------- unknown flags
@pytest.mark.parametrize("argv, message", [
    # The case: a misspelt flag used to give "required: --solver".
    (["train", "-solvr", "s"], "unrecognized option '-solvr'; did you mean -solver?"),
    (["train", "--solvr=s"], "unrecognized option '--solvr'; did you mean --solver?"),
    (["train", "-solver", "s", "-sigint_efect", "none"],
     "did you mean -sigint_effect?"),
    (["test", "-model", "m", "-weights", "w", "-iteration", "3"],
     "did you mean -iterations?"),
    (["-engin", "numba", "train", "-solver", "s"], "did you mean -engine?"),
    (["train", "-solver", "s", "-model", "m"],
     "unrecognized option '-model': it is an option of test and time, not of train"),
    (["-model", "m", "train", "-solver", "s"],
     "unrecognized option '-model': it is an option of test and time, not of "
     "train"),
    (["train", "-solver", "s", "-zzz"], "known options: --data, --engine"),
])
def test_unknown_flag_names_itself_and_the_nearest(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: netlite" in err
    assert message in err
    assert "the following arguments are required" not in err


def test_abbreviations_are_not_guessed(capsys):
    # gflags takes no abbreviations, and argparse's would hide typos.
    with pytest.raises(SystemExit):
        cli.main(["train", "--sol", "s"])
    assert "unrecognized option '--sol'; did you mean --solver?" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("argv, needle", [
    (["train", "-solver", "s", "-gpu", "x"], "'all'"),
    (["train", "-solver", "s", "-gpu", "0,-1"], "must be >= 0"),
    (["train", "-solver", "s", "-sigint_effect", "explode"], "invalid choice"),
    (["train", "-solver", "s", "--progress-interval", "-1"], "must be >= 0"),
    (["--log-level", "loud", "train", "-solver", "s"], "debug, info"),
])
def test_bad_values_are_usage_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_existing_double_dash_forms_still_work(tmp_path, capsys):
    model = tmp_path / "tiny.prototxt"
    model.write_text(TINY_NET)
    assert cli.main(["time", "--model", str(model), "--iterations", "1",
                     "--engine", "numpy", "--phase", "TEST"]) == 0
    assert cli.main(["time", "-model", str(model), "-iterations", "1",
                     "-engine=numpy", "-phase", "TEST", "-q"]) == 0
    out = capsys.readouterr().out
    assert "Use CPU (numpy engine)." in out


# ------------------------------------------------------------ the engine
def test_cli_follows_the_library_default_engine(tmp_path, capsys, monkeypatch):
    pytest.importorskip("numba")
    model = tmp_path / "tiny.prototxt"
    model.write_text(TINY_NET)
    # Whatever netlite.cpu_engine() says is what runs without --engine ...
    backend.set_cpu_engine("numba")
    assert cli.main(["time", "-model", str(model), "-iterations", "1"]) == 0
    assert "Use CPU (numba engine)." in capsys.readouterr().out
    assert backend.cpu_engine() == "numba"
    # ... and the reference is one flag away.
    assert cli.main(["time", "-model", str(model), "-iterations", "1",
                     "--engine", "numpy"]) == 0
    assert "Use CPU (numpy engine)." in capsys.readouterr().out


def test_help_states_the_default_engine(monkeypatch, capsys):
    for engine in ("numba", "numpy"):
        monkeypatch.setattr(backend, "cpu_engine", lambda engine=engine: engine)
        with pytest.raises(SystemExit):
            cli.main(["train", "--help"])
        help_text = " ".join(capsys.readouterr().out.split())
        assert f"default: {engine} (netlite.cpu_engine()" in help_text


# ------------------------------------------------------------------ GPUs
class FakeCupy(types.ModuleType):
    """Just enough of CuPy's runtime API for device_query and -gpu."""

    def __init__(self, count):
        super().__init__("cupy")
        self.used = []
        runtime = types.SimpleNamespace(
            getDeviceCount=lambda: count,
            getDeviceProperties=lambda i: {
                "name": f"Fake GPU {i}".encode(), "major": 9, "minor": 0,
                "totalGlobalMem": 150_000_000_000, "sharedMemPerBlock": 49152,
                "regsPerBlock": 65536, "warpSize": 32, "memPitch": 2**31 - 1,
                "maxThreadsPerBlock": 1024, "maxThreadsDim": (1024, 1024, 64),
                "maxGridSize": (2**31 - 1, 65535, 65535), "clockRate": 1980000,
                "totalConstMem": 65536, "textureAlignment": 512,
                "deviceOverlap": 1, "multiProcessorCount": 132,
                "kernelExecTimeoutEnabled": 0,
            },
        )
        device = types.SimpleNamespace(use=lambda: None)
        self.cuda = types.SimpleNamespace(
            runtime=runtime,
            Device=lambda i=0: (self.used.append(i), device)[1],
        )


@pytest.fixture
def fake_gpus(monkeypatch):
    """Install a stand-in cupy with ``n`` devices; returns the module."""

    def install(n):
        module = FakeCupy(n)
        monkeypatch.setitem(sys.modules, "cupy", module)
        monkeypatch.setattr(backend, "cupy_available", lambda: n > 0)
        return module

    return install


def test_device_query_reports_caffe_lines(fake_gpus, capsys):
    fake_gpus(2)
    assert cli.main(["device_query"]) == 0
    msgs = glog_messages(capsys.readouterr().out)
    assert msgs[0] == "Querying GPUs all"
    assert msgs.count("Name:                          Fake GPU 0") == 1
    assert "Name:                          Fake GPU 1" in msgs
    # Caffe's labels, in Caffe's order, with Caffe's Yes/No and triples.
    labels = [m.split(":")[0] for m in msgs[1:20]]
    assert labels[:4] == ["Device id", "Major revision number",
                          "Minor revision number", "Name"]
    assert "Maximum dimension of block:    1024, 1024, 64" in msgs
    assert "Concurrent copy and execution: Yes" in msgs
    assert "Kernel execution timeout:      No" in msgs


def test_device_query_selects_devices(fake_gpus, capsys):
    fake_gpus(3)
    found = devices.device_query("0,2")
    assert [d["id"] for d in found] == [0, 2]
    assert found[1]["name"] == b"Fake GPU 2"
    assert [d["id"] for d in devices.device_query("all")] == [0, 1, 2]
    assert cli.main(["device_query", "-gpu", "5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("netlite device_query: error: GPU 5 does not exist")
    assert "3 CUDA device(s) visible" in err


def test_device_query_without_a_gpu_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy fails
    assert cli.main(["device_query"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("netlite device_query: error: no CUDA device is visible")
    assert "CuPy is not installed" in err
    assert "Traceback" not in err


def test_device_query_with_zero_devices(fake_gpus, capsys):
    fake_gpus(0)
    assert cli.main(["device-query"]) == 1
    assert "no CUDA device is visible" in capsys.readouterr().err


@pytest.mark.parametrize("gpu, expected", [
    (None, []), (False, []), (True, [0]), (1, [1]), ("2", [2]), ("0,1", [0, 1]),
    ([1, 0], [1, 0]), ("all", [0, 1, 2]), ("ALL", [0, 1, 2]),
])
def test_resolve_gpus(gpu, expected, fake_gpus):
    fake_gpus(3)
    assert devices.resolve_gpus(gpu) == expected


def test_gpu_all_with_one_device_uses_it(fake_gpus, caplog):
    cupy = fake_gpus(1)
    caplog.set_level(logging.INFO, logger="netlite")
    assert devices.select_device(gpu="all") == 0
    assert backend.mode() == "gpu" and cupy.used == [0]
    assert "Use GPU with device ID 0" in caplog.messages
    assert not any("Not using" in m for m in caplog.messages)


def test_gpu_all_with_several_devices_uses_the_first(fake_gpus, caplog):
    fake_gpus(3)
    caplog.set_level(logging.INFO, logger="netlite")
    assert devices.select_device(gpu="all") == 0
    # Caffe's test and time: the same line for every device left out.
    assert caplog.messages[:2] == ["Not using GPU #2 for single-GPU function",
                                   "Not using GPU #1 for single-GPU function"]
    caplog.clear()
    assert devices.select_device(gpu="all", train=True) == 0
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    assert "netlite trains on one device: using GPU 0, not GPUs 1, 2" in (
        warning[0].getMessage())


def test_gpu_all_without_a_device_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "cupy", None)
    model = tmp_path / "tiny.prototxt"
    model.write_text(TINY_NET)
    assert cli.main(["time", "-model", str(model), "-gpu", "all"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("netlite time: error: no CUDA device is visible")


def test_gpu_id_beyond_the_visible_devices(fake_gpus, capsys, tmp_path):
    fake_gpus(1)
    model = tmp_path / "tiny.prototxt"
    model.write_text(TINY_NET)
    assert cli.main(["time", "-model", str(model), "-gpu", "3"]) == 1
    assert "GPU 3 does not exist: 1 CUDA device(s) visible" in (
        capsys.readouterr().err)


def test_unknown_command_names_the_nearest(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["trian", "-solver", "s"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'trian'; did you mean train?" in err
    assert "commands: train, test, time, device_query, convert-mnist" in err


def test_global_options_before_convert_mnist(monkeypatch, tmp_path):
    # convert-mnist has its own parser; a global --data is passed on to it.
    seen = []
    monkeypatch.setattr(convert_mnist, "main",
                        lambda argv: seen.append(argv) or 0)
    assert cli.main(["-q", "--data", "d", "convert-mnist", "--source",
                     "mnist:test", "out"]) == 0
    assert cli.main(["--data=d", "convert-mnist", "--data", "e", "x"]) == 0
    assert cli.main(["convert-mnist", "-q", "a", "b"]) == 0
    assert seen == [["--data", "d", "--source", "mnist:test", "out"],
                    ["--data", "e", "x"],   # its own --data wins
                    ["-q", "a", "b"]]       # untouched after the command


def test_the_default_engine_is_looked_up_only_for_help(monkeypatch, capsys):
    # Finding the default may import Numba; --version need not wait for it.
    def fail():
        raise AssertionError("cpu_engine() called")

    monkeypatch.setattr(backend, "cpu_engine", fail)
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
