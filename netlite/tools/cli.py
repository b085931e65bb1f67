"""The ``netlite`` command line: Caffe's ``caffe`` tool in Python.

::

    netlite train --solver S [--weights W | --snapshot F] [--engine E] [--gpu [N]]
                  [--data DIR] [--plot DIR]
    netlite test  --model M --weights W [--iterations N] [--engine E] [--gpu [N]]
    netlite time  --model M [--iterations N] [--phase TRAIN|TEST] [--engine E]
    netlite convert-mnist ...

This module only parses arguments (:func:`build_parser`) and configures
logging (:mod:`netlite.tools.logs`); the work is done by
:func:`netlite.tools.commands.train`, :func:`~netlite.tools.commands.test`
and :func:`~netlite.tools.commands.time_net`, which are the same functions
a Python program calls.  Log lines come from the ``netlite`` logger (the
solver's and the Net's Caffe-style messages) and are written to stdout in a
glog-like format.  See docs/cli.md.
"""

import argparse
import logging
import sys

from netlite import backend
from netlite.data import convert_mnist
from netlite.errors import NetliteError
from netlite.tools import commands, logs

#: Exit status after Ctrl-C (the shell's 128 + SIGINT).
EXIT_INTERRUPTED = 130


def _gpu_arg(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a CUDA device number, got {text!r}"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"device number must be >= 0, got {value}")
    return value


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_device_args(p):
    p.add_argument(
        "--engine", choices=backend.CPU_ENGINES, default=None,
        help="CPU engine: numpy (the reference) or numba (JIT kernels); "
             "default: $NETLITE_CPU_ENGINE or numpy",
    )
    p.add_argument(
        "--gpu", nargs="?", const=0, default=None, type=_gpu_arg, metavar="N",
        help="run on CUDA device N (default 0) with CuPy",
    )
    p.add_argument(
        "--data", metavar="DIR", default=None,
        help="look for datasets (mnist/, fashion-mnist/) here first",
    )


def _add_state_args(p):
    p.add_argument("--level", type=int, default=0, help="NetState level (default 0)")
    p.add_argument(
        "--stage", action="append", default=[], metavar="NAME",
        help="NetState stage (repeat for several)",
    )


def build_parser():
    """The argument parser of the ``netlite`` command."""
    parser = argparse.ArgumentParser(
        prog="netlite",
        description="Train, score and time Caffe-style nets with netlite.",
        epilog="See docs/cli.md for examples.",
    )
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {_version()}")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="log warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="train a model from a solver prototxt",
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
    _add_device_args(p)
    p.add_argument("--plot", metavar="DIR", default=None,
                   help="write training-loss and test-accuracy PNG plots here")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar even when stdout is a terminal")

    p = sub.add_parser("test", help="score a trained model",
                       description="Score a model (caffe test).")
    p.add_argument("--model", required=True, metavar="M", help="net prototxt")
    p.add_argument("--weights", required=True, metavar="W",
                   help="trained weights (.caffemodel or .npz)")
    p.add_argument("--iterations", type=_positive_int, default=50, metavar="N",
                   help="number of batches to run (default 50)")
    _add_device_args(p)
    _add_state_args(p)

    p = sub.add_parser("time", help="time each layer's forward and backward",
                       description="Benchmark a model (caffe time).")
    p.add_argument("--model", required=True, metavar="M", help="net prototxt")
    p.add_argument("--iterations", type=_positive_int, default=50, metavar="N",
                   help="number of timed iterations (default 50)")
    p.add_argument("--phase", choices=("TRAIN", "TEST"), default="TRAIN",
                   type=str.upper, help="net phase (default TRAIN)")
    _add_device_args(p)
    _add_state_args(p)

    sub.add_parser(
        "convert-mnist", add_help=False,
        help="write MNIST IDX files as Caffe's LMDB databases "
             "(netlite convert-mnist --help)",
    )
    return parser


def _version():
    from netlite import __version__

    return __version__


def main(argv=None):
    """Entry point of the ``netlite`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "convert-mnist" in argv:
        # Everything after the command belongs to convert_mnist's own parser.
        i = argv.index("convert-mnist")
        if all(a in ("-q", "--quiet") for a in argv[:i]):
            return convert_mnist.main(argv[i + 1:]) or 0
    args = build_parser().parse_args(argv)
    logs.configure_logging(logging.WARNING if args.quiet else logging.INFO)
    try:
        if args.command == "train":
            result = commands.train(
                args.solver, weights=args.weights, snapshot=args.snapshot,
                engine=args.engine, gpu=args.gpu, data_dir=args.data,
                plot_dir=args.plot,
                progress=False if args.no_progress else None,
            )
            return _report_train(result)
        if args.command == "test":
            commands.test(
                args.model, args.weights, iterations=args.iterations,
                engine=args.engine, gpu=args.gpu, data_dir=args.data,
                level=args.level, stages=args.stage,
            )
        elif args.command == "time":
            commands.time_net(
                args.model, iterations=args.iterations, phase=args.phase,
                engine=args.engine, gpu=args.gpu, data_dir=args.data,
                level=args.level, stages=args.stage,
            )
        return 0
    except KeyboardInterrupt:
        print("netlite: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (NetliteError, OSError, ValueError, ImportError, RuntimeError) as exc:
        print(f"netlite {args.command}: error: {exc}", file=sys.stderr)
        return 1


def _report_train(result):
    """Print the end-of-training summary; return the exit status."""
    solver = result.solver
    snapshots = getattr(solver, "snapshots", [])
    if result.interrupted:
        msg = f"netlite train: interrupted at iteration {solver.iter}"
        if snapshots:
            state = snapshots[-1][2]
            msg += f"; snapshot written: {state} (resume with --snapshot {state})"
        print(msg, file=sys.stderr)
    for net_id, outputs in sorted(result.history.tests.items()):
        for name, series in outputs.items():
            iteration, value = series[-1]
            label = "Final test" if not result.interrupted else "Last test"
            shown = f"{value:.4f}" if "acc" in name.lower() else f"{value:.6g}"
            print(f"{label} {name} (test net #{net_id}, iteration {iteration}): "
                  f"{shown}")
    if snapshots:
        print(f"Weights: {snapshots[-1][1]}")
    for path in result.plots:
        print(f"Plot: {path}")
    return EXIT_INTERRUPTED if result.interrupted else 0


if __name__ == "__main__":  # python -m netlite.tools.cli
    sys.exit(main())
