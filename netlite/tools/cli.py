"""The ``netlite`` command line: Caffe's ``caffe`` tool in Python.

::

    netlite train --solver S [--weights W | --snapshot F] [--gpu ID|all]
                  [--plot DIR] [--level L] [--stage S] [--sigint-effect E] ...
    netlite test  --model M --weights W [--iterations N] [--gpu ID] ...
    netlite time  --model M [--iterations N] [--phase TRAIN|TEST] [--gpu ID] ...
    netlite device_query [--gpu ID|all]
    netlite convert-mnist ...
    netlite reference --out DIR [--layers T1,T2] [--dtype float64]
    netlite validate --corpus DIR --impl M:F --framework torch|jax|netlite ...
    netlite feature2d --dataset mnist --backbone small --variants V ...

Every option is also accepted in Caffe's (gflags') spellings: one dash
(``-solver S``), ``-solver=S``, and underscores (``--sigint_effect``).  The
global options (``-q``, ``--log-level``, ``--engine``, ``--data``,
``--version``) go before or after the command, and a command's options may
come before it, as gflags parses flags anywhere.  An option that is not
known is named, with the nearest known one (:func:`normalize_argv`).

This module only parses arguments (:func:`build_parser`) and configures
logging (:mod:`netlite.tools.logs`); the work is done by
:func:`netlite.tools.commands.train`, :func:`~netlite.tools.commands.test`,
:func:`~netlite.tools.commands.time_net` and
:func:`netlite.tools.devices.device_query`, which are the same functions
a Python program calls.  Log lines come from the ``netlite`` logger (the
solver's and the Net's Caffe-style messages) and are written to stdout in a
glog-like format.  See docs/cli.md.
"""

import argparse
import difflib
import importlib
import logging
import re
import signal
import sys

from netlite import backend
from netlite.errors import NetliteError
from netlite.tools import commands, devices, logs

#: Exit status after Ctrl-C (the shell's 128 + SIGINT).
EXIT_INTERRUPTED = 128 + signal.SIGINT
#: Exit status after a SIGHUP whose effect is "stop" (128 + SIGHUP).
EXIT_HANGUP = 128 + getattr(signal, "SIGHUP", 1)

#: ``--log-level`` values: Python's level names and glog's
#: ``-minloglevel`` numbers (0 INFO, 1 WARNING, 2 ERROR, 3 FATAL).
LOG_LEVELS = {
    "debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
    "warn": logging.WARNING, "error": logging.ERROR,
    "critical": logging.CRITICAL, "fatal": logging.CRITICAL,
    "0": logging.INFO, "1": logging.WARNING, "2": logging.ERROR,
    "3": logging.CRITICAL,
}

_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


# ------------------------------------------------------------ value types
def _gpu_arg(text):
    """``-gpu``: a device id, ids separated by commas, or ``all``."""
    text = text.strip()
    if text.lower() == "all":
        return "all"
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a CUDA device number, numbers separated by commas, or "
            f"'all', got {text!r}"
        ) from None
    bad = [i for i in ids if i < 0]
    if bad:
        raise argparse.ArgumentTypeError(f"device number must be >= 0, got {bad[0]}")
    return ids[0] if len(ids) == 1 else ids


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _log_level(text):
    try:
        return LOG_LEVELS[text.strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"expected one of debug, info, warning, error (or glog's 0-3), "
            f"got {text!r}"
        ) from None


def _stages(text):
    """``-stage a,b`` (Caffe) and repeated ``--stage`` both add stages."""
    return [s for s in (part.strip() for part in text.split(",")) if s]


# ---------------------------------------------------------------- parser
class _LibraryEngine:
    """``netlite.cpu_engine()`` as text, computed only when ``--help`` is
    printed: finding the default may import Numba, which every other use
    of the parser (``--version``, a usage error) should not wait for."""

    def __str__(self):
        try:
            return backend.cpu_engine()
        except (ValueError, ImportError) as exc:
            return f"unavailable ({exc})"


def _add_global_args(p, top_level):
    """The options every command takes, before or after it.

    On the subcommands their defaults are SUPPRESS, so that an option given
    before the command is not reset by the subcommand's parser.
    """
    group = p.add_argument_group("global options")

    def default(value):
        return value if top_level else argparse.SUPPRESS

    group.add_argument("--version", action="version",
                       version=f"netlite {_version()}")
    group.add_argument(
        "-q", "--quiet", dest="log_level", action="store_const",
        const=logging.WARNING, default=default(logging.INFO),
        help="log warnings and errors only (the train summary is still printed)",
    )
    group.add_argument(
        "--log-level", "--minloglevel", dest="log_level", type=_log_level,
        default=default(logging.INFO), metavar="LEVEL",
        help="debug, info (default), warning or error; or glog's 0-3",
    )
    engine = group.add_argument(
        "--engine", choices=backend.CPU_ENGINES, default=default(None),
        help="CPU engine: numba (JIT kernels) or numpy (the readable "
             "reference); default: %(library_default)s "
             "(netlite.cpu_engine(), which $NETLITE_CPU_ENGINE sets)",
    )
    engine.library_default = _LibraryEngine()
    group.add_argument(
        "--data", metavar="DIR", default=default(None),
        help="look for datasets (mnist/, fashion-mnist/) here first",
    )


def _add_gpu_arg(p, help_text):
    p.add_argument(
        "--gpu", nargs="?", const=0, default=None, type=_gpu_arg, metavar="ID",
        help=help_text,
    )


def _add_state_args(p):
    p.add_argument("--level", type=int, default=None,
                   help="NetState level (default 0)")
    p.add_argument(
        "--stage", action="extend", type=_stages, default=[], metavar="NAME",
        help="NetState stage (comma-separated, or repeat the option)",
    )


_GPU_HELP = ("run on CUDA device ID (default 0) with CuPy; 'all' or '0,1' "
             "name several, of which the first is used")


#: Commands with a parser of their own, to which every argument after the
#: command name goes: name -> (help summary, "module:function", the global
#: options given before the command that are passed on to it).
DELEGATED = {
    "convert-mnist": ("write MNIST IDX files as Caffe's LMDB databases",
                      "netlite.data.convert_mnist:main", ("data",)),
    "reference": ("write the reference-gradient corpus",
                  "netlite.reference.cli:main_reference", ()),
    "validate": ("hold a PyTorch, JAX or netlite implementation to a "
                 "reference corpus", "netlite.reference.cli:main_validate",
                 ("engine",)),
    "feature2d": ("train and draw the 2-D feature experiments",
                  "netlite.tools.feature2d:main", ("engine", "data")),
}


def _run_delegated(args, tail):
    """Run a delegated command on ``tail``, with the global options it takes
    that were given before it (unless ``tail`` sets them itself).  Its
    module is imported here, so that ``netlite train`` does not load it."""
    _, target, passed = DELEGATED[args.command]
    for name in passed:
        value = getattr(args, name)
        if value is not None and not any(
            a == f"--{name}" or a.startswith(f"--{name}=") for a in tail
        ):
            tail = [f"--{name}", value, *tail]
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)(tail) or 0


def build_parser():
    """The argument parser of the ``netlite`` command.

    Its ``commands`` attribute maps every command name (aliases included)
    to the command's parser.
    """
    parser = argparse.ArgumentParser(
        prog="netlite", allow_abbrev=False,
        description="Train, score and time Caffe-style nets with netlite. "
                    "Options also take Caffe's spelling: -solver S, "
                    "-solver=S, --sigint_effect.",
        epilog="See docs/cli.md for examples.",
    )
    _add_global_args(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add_command(name, **kwargs):
        p = sub.add_parser(name, allow_abbrev=False, **kwargs)
        _add_global_args(p, top_level=False)
        return p

    p = add_command("train", help="train a model from a solver prototxt",
                    description="Train a model (caffe train).")
    p.add_argument("--solver", required=True, metavar="S",
                   help="solver prototxt")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--weights", metavar="W",
        help="initialise from these weights (.caffemodel or .npz; "
             "comma-separated for several) to fine-tune",
    )
    group.add_argument("--snapshot", metavar="F",
                       help="resume from a .solverstate file")
    _add_gpu_arg(p, _GPU_HELP + " (netlite trains on one device)")
    p.add_argument("--plot", metavar="DIR", default=None,
                   help="write training-loss and test-accuracy PNG plots here")
    p.add_argument("--no-progress", action="store_true",
                   help="neither a progress bar (on a terminal) nor progress "
                        "records (in a log)")
    p.add_argument(
        "--progress-interval", type=_seconds, default=logs.PROGRESS_INTERVAL,
        metavar="SECONDS",
        help="seconds between two progress records when stdout is not a "
             f"terminal (default {logs.PROGRESS_INTERVAL:g}; 0: every iteration)",
    )
    _add_state_args(p)
    for name, default in (("sigint", "stop"), ("sighup", "snapshot")):
        p.add_argument(
            f"--{name}-effect", choices=commands.SIGNAL_EFFECTS, default=default,
            help=f"what {name.upper()} does while training: stop (after a "
                 f"snapshot), snapshot (and go on) or none (default {default})",
        )

    p = add_command("test", help="score a trained model",
                    description="Score a model (caffe test).")
    p.add_argument("--model", required=True, metavar="M", help="net prototxt")
    p.add_argument("--weights", required=True, metavar="W",
                   help="trained weights (.caffemodel or .npz)")
    p.add_argument("--iterations", type=_positive_int, default=50, metavar="N",
                   help="number of batches to run (default 50)")
    _add_gpu_arg(p, _GPU_HELP)
    _add_state_args(p)

    p = add_command("time", help="time each layer's forward and backward",
                    description="Benchmark a model (caffe time).")
    p.add_argument("--model", required=True, metavar="M", help="net prototxt")
    p.add_argument("--iterations", type=_positive_int, default=50, metavar="N",
                   help="number of timed iterations (default 50)")
    p.add_argument("--phase", choices=("TRAIN", "TEST"), default="TRAIN",
                   type=str.upper, help="net phase (default TRAIN)")
    _add_gpu_arg(p, _GPU_HELP)
    _add_state_args(p)

    p = add_command(
        "device_query", aliases=["device-query"],
        help="show the CUDA devices CuPy sees",
        description="Show GPU diagnostic information (caffe device_query).",
    )
    p.add_argument(
        "--gpu", default=None, type=_gpu_arg, metavar="ID",
        help="the devices to query: an id, ids separated by commas, or all "
             "(the default)",
    )

    for name, (summary, _, _) in DELEGATED.items():
        sub.add_parser(name, add_help=False,
                       help=f"{summary} (netlite {name} --help)")
    parser.commands = sub.choices
    return parser


def _version():
    from netlite import __version__

    return __version__


# ------------------------------------------------- Caffe's flag spellings
def _looks_like_option(token):
    return token.startswith("-") and token != "-" and not _NUMBER.match(token)


def _option_key(name):
    """The parser's option string for a flag name as typed (no dashes)."""
    name = name.replace("_", "-")
    return f"--{name}" if len(name) > 1 else f"-{name}"


def _options_of(p):
    return p._option_string_actions  # argparse's table: option string -> action


def _command_names(parsers):
    """Each command's parser under its first name (aliases left out)."""
    names = {}
    for name, p in parsers.items():
        names.setdefault(id(p), name)
    return {name: parsers[name] for name in names.values()}


def _unknown_option(token, parsers, command, where):
    """Exit with argparse's usage error for an unknown option, naming the
    nearest known one (or the commands that do know it)."""
    typed = token.split("=", 1)[0]
    dashes = "--" if typed.startswith("--") else "-"
    key = _option_key(typed.lstrip("-"))
    owners = [name for name, p in _command_names(parsers).items()
              if key in _options_of(p) and name != command]
    msg = f"unrecognized option {typed!r}"
    if owners and command is not None:
        msg += f": it is an option of {' and '.join(owners)}, not of {command}"
    else:
        known = sorted({o[2:] for o in _options_of(where) if o.startswith("--")})
        wanted = typed.lstrip("-").replace("_", "-")
        close = difflib.get_close_matches(wanted, known, n=1, cutoff=0.6)
        if close:
            suggestion = close[0]
            if "_" in typed:  # answer in the spelling the user used
                suggestion = suggestion.replace("-", "_")
            msg += f"; did you mean {dashes}{suggestion}?"
        else:
            msg += "; known options: " + ", ".join(f"--{k}" for k in known)
    where.error(msg)


def _unknown_command(parser, token):
    """Exit with a usage error naming the nearest command, when one is near
    (else argparse's "invalid choice" lists them all)."""
    names = list(_command_names(parser.commands))
    close = difflib.get_close_matches(token, parser.commands, n=1, cutoff=0.6)
    if close:
        parser.error(
            f"argument COMMAND: invalid choice: {token!r}; did you mean "
            f"{close[0]}? (commands: {', '.join(names)})"
        )


def normalize_argv(parser, argv):
    """Rewrite Caffe's (gflags') spellings into the parser's.

    ``-solver S`` and ``-solver=S`` become ``--solver S`` and
    ``--solver=S``; ``--sigint_effect`` becomes ``--sigint-effect``; a
    command's options given before the command move after it.  An unknown
    option is a usage error (exit status 2) that names it and the nearest
    known option, instead of argparse's later "the following arguments are
    required".

    Returns
    -------
    argv : list of str
        For ``parser.parse_args``.
    tail : list of str
        The arguments after a delegated command (``convert-mnist``,
        ``reference``, ``validate``, ``feature2d``: their own parsers'), else [].
    """
    parsers = parser.commands
    head, moved, rest_args, tail = [], [], [], []
    command = None
    i = 0
    while i < len(argv):
        token = argv[i]
        out = head if command is None else rest_args
        if token == "--":
            out.extend(argv[i:])
            break
        i += 1
        if not _looks_like_option(token):
            out.append(token)
            if command is None:
                if token not in parsers:
                    _unknown_command(parser, token)
                    head.extend(argv[i:])  # argparse's "invalid choice"
                    break
                command = token
                if parsers[command].add_help is False:  # a delegated sub-tool
                    tail = argv[i:]
                    break
            continue
        name, eq, _ = token.lstrip("-").partition("=")
        key = _option_key(name)
        where = parsers[command] if command is not None else parser
        action = _options_of(where).get(key)
        if action is None and command is None:
            # gflags reads flags anywhere: a command's option before the
            # command is kept for it (and checked once the command is known).
            owner = next((p for p in parsers.values() if key in _options_of(p)),
                         None)
            if owner is not None:
                action, out = _options_of(owner)[key], moved
        if action is None:
            _unknown_option(token, parsers, command, where)
        group = [key + token[token.index("="):] if eq else key]
        if not eq and action.nargs != 0 and i < len(argv):
            following = argv[i]
            if action.nargs != "?" or (
                not _looks_like_option(following)
                and not (command is None and following in parsers)
            ):
                group.append(following)
                i += 1
        if out is moved:
            moved.append((token, group))
        else:
            out.extend(group)
    moved_args = [t for _, group in moved for t in group]
    if command is None:
        return head + moved_args, tail
    for token, group in moved:
        if group[0].split("=", 1)[0] not in _options_of(parsers[command]):
            _unknown_option(token, parsers, command, parsers[command])
    return head + moved_args + rest_args, tail


# ------------------------------------------------------------------ main
def main(argv=None):
    """Entry point of the ``netlite`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    argv, tail = normalize_argv(parser, argv)
    args = parser.parse_args(argv)
    if args.command in DELEGATED:
        return _run_delegated(args, tail)
    command = "device_query" if args.command == "device-query" else args.command
    logs.configure_logging(args.log_level)
    try:
        if command == "train":
            result = commands.train(
                args.solver, weights=args.weights, snapshot=args.snapshot,
                engine=args.engine, gpu=args.gpu, data_dir=args.data,
                plot_dir=args.plot,
                progress=False if args.no_progress else None,
                level=args.level, stages=args.stage,
                sigint_effect=args.sigint_effect,
                sighup_effect=args.sighup_effect,
                progress_interval=args.progress_interval,
            )
            return _report_train(result)
        if command == "test":
            commands.test(
                args.model, args.weights, iterations=args.iterations,
                engine=args.engine, gpu=args.gpu, data_dir=args.data,
                level=args.level or 0, stages=args.stage,
            )
        elif command == "time":
            commands.time_net(
                args.model, iterations=args.iterations, phase=args.phase,
                engine=args.engine, gpu=args.gpu, data_dir=args.data,
                level=args.level or 0, stages=args.stage,
            )
        elif command == "device_query":
            devices.device_query("all" if args.gpu is None else args.gpu)
        return 0
    except KeyboardInterrupt:
        print("netlite: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (NetliteError, OSError, ValueError, ImportError, RuntimeError) as exc:
        print(f"netlite {command}: error: {exc}", file=sys.stderr)
        return 1


# --------------------------------------------------------------- summary
def _format_value(name, value):
    return f"{value:.4f}" if "acc" in name.lower() else f"{value:.6g}"


def summary_lines(result):
    """The end-of-training summary: the last test that ran, or why none.

    ``Last test (iteration 2000): accuracy = 0.9858, loss = 0.0456599``;
    the iteration is that of the test pass itself, and when training went
    on after it, the line says where training ended.
    """
    solver, history = result.solver, result.history
    lines = []
    several = len(getattr(solver, "test_nets", ())) > 1
    for net_id in sorted(history.test_iters):
        iteration, outputs = history.last_test(net_id)
        label = f"Last test of test net #{net_id}" if several else "Last test"
        when = f"iteration {iteration}"
        if iteration != solver.iter:
            when += f"; training ended at iteration {solver.iter}"
        values = ", ".join(f"{name} = {_format_value(name, v)}"
                           for name, v in outputs.items())
        lines.append(f"{label} ({when}): {values or 'no scalar output'}")
    if not lines:
        p = solver.param
        if not getattr(solver, "test_nets", ()):
            why = "the solver has no test net"
        elif result.interrupted:
            why = "training stopped before the first test"
        else:
            why = (f"test_interval: {p.test_interval}, test_initialization: "
                   f"{str(p.test_initialization).lower()}, training ended at "
                   f"iteration {solver.iter}")
        lines.append(f"No test ran ({why}).")
    return lines


def _report_train(result):
    """Print the end-of-training summary; return the exit status."""
    solver = result.solver
    snapshots = getattr(solver, "snapshots", [])
    if result.interrupted:
        how = ("interrupted" if result.stopped_by in (None, "SIGINT")
               else f"stopped by {result.stopped_by}")
        msg = f"netlite train: {how} at iteration {solver.iter}"
        if snapshots:
            state = snapshots[-1][2]
            msg += f"; snapshot written: {state} (resume with --snapshot {state})"
        print(msg, file=sys.stderr)
    for line in summary_lines(result):
        print(line)
    if snapshots:
        print(f"Weights: {snapshots[-1][1]}")
    for path in result.plots:
        print(f"Plot: {path}")
    if not result.interrupted:
        return 0
    return EXIT_HANGUP if result.stopped_by == "SIGHUP" else EXIT_INTERRUPTED


if __name__ == "__main__":  # python -m netlite.tools.cli
    sys.exit(main())
