"""``netlite reference`` and ``netlite validate`` through netlite's command
line (netlite/tools/cli.py delegates both to netlite/reference/cli.py).

(Named test_reference_cli.py: tests/tools_tests/test_cli.py holds the
basename test_cli.py, and test directories are not packages.)"""

import json
import sys
import types

import pytest
import validate_testing as vt

from netlite.tools import cli

pytest.importorskip("safetensors")


@pytest.fixture
def corpus_dir(tmp_path):
    (tmp_path / "corpus").mkdir()
    vt.write_corpus(
        tmp_path / "corpus", which=("InnerProduct", "SoftmaxWithLoss", "Head")
    )
    return str(tmp_path / "corpus")


def _validate(corpus_dir, framework, *args, before=()):
    """``netlite [before] validate --corpus corpus_dir --framework framework
    [args]``: the exit code."""
    return cli.main(
        [*before, "validate", "--corpus", corpus_dir, "--framework", framework, *args]
    )


def _impl_file(tmp_path, body):
    path = tmp_path / "my_impl.py"
    path.write_text("import validate_testing as vt\n" + body)
    return f"{path}:impl"


@pytest.mark.torch
def test_validate_passes_with_exit_0(corpus_dir, capsys):
    pytest.importorskip("torch")
    code = _validate(corpus_dir, "torch", "--impl", "validate_testing:torch_impl")
    out = capsys.readouterr().out
    assert code == 0, out
    assert "== InnerProduct (1 case)" in out and "== Head (1 case)" in out
    assert out.rstrip().endswith(
        "3 cases, torch, float64: 3 passed, 0 failed, 0 matched a surrogate, 0 errored"
    )


@pytest.mark.torch
def test_validate_fails_with_exit_1(corpus_dir, tmp_path, capsys):
    pytest.importorskip("torch")
    impl = _impl_file(
        tmp_path, "def impl(case):\n    return vt.torch_impl(case, flip=True)\n"
    )
    code = _validate(corpus_dir, "torch", "--impl", impl)
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL: dbottom.0" in out and "2 failed" in out


@pytest.mark.torch
def test_validate_surrogate_is_exit_0(corpus_dir, tmp_path, capsys):
    pytest.importorskip("torch")
    impl = _impl_file(
        tmp_path, "def impl(case):\n    return vt.torch_impl(case, half=True)\n"
    )
    assert _validate(corpus_dir, "torch", "--impl", impl) == 0
    assert "matches surrogate HALF" in capsys.readouterr().out


@pytest.mark.torch
def test_validate_error_case_is_exit_1_and_json(corpus_dir, tmp_path, capsys):
    pytest.importorskip("torch")
    impl = _impl_file(
        tmp_path,
        (
            "def impl(case):\n"
            "    if case.kind == 'net':\n"
            "        raise KeyError('nets are not supported')\n"
            "    return vt.torch_impl(case)\n"
        ),
    )
    code = _validate(
        corpus_dir,
        "torch",
        "--impl",
        impl,
        "--json",
        "--layers",
        "Head,SoftmaxWithLoss",
    )
    assert code == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False
    assert data["counts"] == {
        "pass": 1,
        "fail": 0,
        "surrogate": 0,
        "error": 1,
        "skip": 0,
    }
    head = next(c for c in data["cases"] if c["id"] == "Head/ip_softmax")
    assert head["verdict"] == "error" and "nets are not supported" in head["message"]


@pytest.mark.parametrize("engine_args", [["--engine", "numba"], []])
def test_validate_netlite_engines(corpus_dir, capsys, engine_args):
    code = _validate(corpus_dir, "netlite", *engine_args)
    out = capsys.readouterr().out
    assert code == 0, out
    engine = engine_args[1] if engine_args else "numpy"
    assert f"netlite ({engine} engine), float64: 3 passed" in out


def test_global_engine_is_passed_on(corpus_dir, capsys):
    assert _validate(corpus_dir, "netlite", before=("--engine", "numba")) == 0
    assert "(numba engine)" in capsys.readouterr().out


def test_bad_corpus_is_exit_1_naming_the_case(corpus_dir, capsys):
    import os

    os.remove(os.path.join(corpus_dir, "InnerProduct__basic.safetensors"))
    code = _validate(corpus_dir, "netlite")
    assert code == 1
    err = capsys.readouterr().err
    assert "netlite validate: error: case InnerProduct/basic: file" in err


def test_bad_impl_is_exit_1(corpus_dir, tmp_path, capsys):
    assert _validate(corpus_dir, "torch", "--impl", "no_such_module_xyz:f") == 1
    assert "no_such_module_xyz" in capsys.readouterr().err
    broken = tmp_path / "broken.py"
    broken.write_text("def impl(:\n")
    assert _validate(corpus_dir, "torch", "--impl", f"{broken}:impl") == 1
    assert "SyntaxError" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--framework", "torch"], "--framework torch needs --impl"),
        (
            ["--framework", "torch", "--impl", "m:f", "--engine", "numba"],
            "--engine applies to --framework netlite only",
        ),
        (["--framework", "tensorflow"], "invalid choice: 'tensorflow'"),
        ([], "the following arguments are required: --framework"),
    ],
)
def test_usage_errors_are_exit_2(corpus_dir, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(["validate", "--corpus", corpus_dir, *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_reference_calls_write(monkeypatch, tmp_path, capsys):
    calls = []

    def write(out, layers=None, dtype="float64", check=True):
        calls.append((out, layers, dtype, check))
        return vt.write_corpus(out)

    monkeypatch.setitem(
        sys.modules, "netlite.reference.write", types.SimpleNamespace(write=write)
    )
    (tmp_path / "corpus").mkdir()
    out = str(tmp_path / "corpus")
    assert cli.main(["reference", "--out", out, "--layers", "InnerProduct,Scale"]) == 0
    assert calls == [(out, ["InnerProduct", "Scale"], "float64", True)]
    assert f"Wrote 2 cases of 2 layer types to {out} (" in capsys.readouterr().out
    assert cli.main(["reference", "--out", out, "--no-check"]) == 0
    assert calls[-1] == (out, None, "float64", False)


def test_reference_error_is_exit_1(monkeypatch, tmp_path, capsys):
    def write(out, **_):
        raise ValueError("unknown layer type 'Nope'")

    monkeypatch.setitem(
        sys.modules, "netlite.reference.write", types.SimpleNamespace(write=write)
    )
    assert cli.main(["reference", "--out", str(tmp_path), "--layers", "Nope"]) == 1
    assert "netlite reference: error: unknown layer type 'Nope'" in (
        capsys.readouterr().err
    )


def test_help_of_both_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "reference" in out and "validate" in out
    for command, option in (("reference", "--out DIR"), ("validate", "--framework")):
        with pytest.raises(SystemExit) as exc:
            cli.main([command, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert f"netlite {command}" in out and option in out


def test_validate_jax(corpus_dir, capsys):
    pytest.importorskip("jax")
    code = _validate(corpus_dir, "jax", "--impl", "validate_testing:jax_impl")
    out = capsys.readouterr().out
    assert code == 0, out
    assert "3 cases, jax, float64: 3 passed" in out
