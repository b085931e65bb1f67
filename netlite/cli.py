"""The ``netlite`` command line: Caffe's ``caffe`` tool in Python.

::

    netlite train --solver S [--weights W | --snapshot F] [--engine E] [--gpu [N]]
                  [--data DIR] [--plot DIR]
    netlite test  --model M --weights W [--iterations N] [--engine E] [--gpu [N]]
    netlite time  --model M [--iterations N] [--phase TRAIN|TEST] [--engine E]
    netlite convert-mnist ...

The command line only parses arguments and configures logging; the work is
done by :func:`train`, :func:`test` and :func:`time_net`, which are the same
functions a Python program calls.  Log lines come from the ``netlite``
logger (the solver's and the Net's Caffe-style messages) and are written to
stdout in a glog-like format.  See docs/cli.md.
"""

import argparse
import collections
import logging
import os
import sys
import time as _time

from netlite import backend
from netlite.errors import NetliteError
from netlite.layer import TEST, TRAIN

logger = logging.getLogger("netlite")

#: Exit status after Ctrl-C (the shell's 128 + SIGINT).
EXIT_INTERRUPTED = 130

TestResult = collections.namedtuple("TestResult", ["outputs", "loss"])
TestResult.__doc__ = """What :func:`test` measured.

outputs : dict of str -> float or ndarray
    Mean of every net output over the batches (per element, as Caffe).
loss : float
    Mean of the net's total weighted loss over the batches.
"""
TestResult.__test__ = False  # not a pytest test class despite its name


class TrainResult(collections.namedtuple(
        "TrainResult", ["solver", "history", "plots", "interrupted"])):
    """What :func:`train` returns.

    Attributes
    ----------
    solver : netlite solver
        The solver after training (``solver.net`` holds the weights).
    history : netlite.plotting.TrainingHistory
        Training loss per iteration and every test pass.
    plots : list of str
        PNG files written (empty without ``plot_dir``).
    interrupted : bool
        True when training stopped on Ctrl-C (a snapshot was written).
    """

    __slots__ = ()

    @property
    def final_test(self):
        """``{output name: value}`` of the last test pass of test net #0."""
        outputs = self.history.tests.get(0, {})
        return {name: series[-1][1] for name, series in outputs.items()}


# ----------------------------------------------------------------- logging
class CaffeFormatter(logging.Formatter):
    """glog's line layout: ``I1124 14:15:00.123456 solver.py:218] message``."""

    _LETTERS = {"DEBUG": "D", "INFO": "I", "WARNING": "W", "ERROR": "E",
                "CRITICAL": "F"}

    def format(self, record):
        stamp = _time.strftime("%m%d %H:%M:%S", _time.localtime(record.created))
        micros = int((record.created % 1) * 1e6)
        letter = self._LETTERS.get(record.levelname, record.levelname[:1])
        head = f"{letter}{stamp}.{micros:06d} {record.filename}:{record.lineno}]"
        text = f"{head} {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _TqdmAwareHandler(logging.StreamHandler):
    """Write log lines above an active tqdm bar instead of through it."""

    def __init__(self, stream):
        super().__init__(stream)
        self.bar = None

    def emit(self, record):
        if self.bar is None:
            super().emit(record)
            return
        try:
            # One write call per line: an interrupt between the text and
            # its newline would glue the next line onto this one.
            self.bar.write(self.format(record) + "\n", file=self.stream, end="")
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


_handler = None


def configure_logging(level=logging.INFO, stream=None):
    """Send the ``netlite`` logger to ``stream`` (stdout) in glog's format.

    Calling it again replaces the handler it installed before (tests call
    :func:`main` many times in one process).
    """
    global _handler
    if _handler is not None:
        logger.removeHandler(_handler)
    _handler = _TqdmAwareHandler(stream if stream is not None else sys.stdout)
    _handler.setFormatter(CaffeFormatter())
    logger.addHandler(_handler)
    logger.setLevel(level)
    # The CLI owns the output; do not duplicate lines through the root logger.
    logger.propagate = False
    return _handler


# ------------------------------------------------------------------ set-up
def select_device(engine=None, gpu=None):
    """Apply ``--engine`` and ``--gpu``.

    Parameters
    ----------
    engine : {"numpy", "numba"}, optional
        The CPU engine; unchanged when None.
    gpu : bool or int, optional
        False/None: CPU mode.  True: GPU 0.  An int: that CUDA device.
    """
    if engine is not None:
        backend.set_cpu_engine(engine)
    if gpu is None or gpu is False:
        backend.set_mode_cpu()
        logger.info("Use CPU (%s engine).", backend.cpu_engine())
        return
    device_id = 0 if gpu is True else int(gpu)
    backend.set_mode_gpu()
    backend.set_device(device_id)
    logger.info("Use GPU with device ID %d", device_id)


def set_data_dir(data_dir):
    """Make ``data_dir`` the first place datasets are looked up (``--data``)."""
    if data_dir is None:
        return
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"--data: no such directory: {data_dir}")
    from netlite import datasets

    datasets.set_data_dir(data_dir)


def _parse_phase(phase):
    if phase in (TRAIN, TEST):
        return phase
    names = {"TRAIN": TRAIN, "TEST": TEST}
    try:
        return names[str(phase).upper()]
    except KeyError:
        raise ValueError(f"phase must be TRAIN or TEST, got {phase!r}") from None


def _synchronize(net):
    if net.device == "gpu":
        import cupy

        cupy.cuda.Device().synchronize()


def _scalar_or_array(values):
    return float(values[0]) if len(values) == 1 else values


# -------------------------------------------------------------------- test
def test(model, weights, iterations=50, engine=None, gpu=None, data_dir=None,
         level=0, stages=()):
    """Score a trained model like ``caffe test``.

    Builds the TEST-phase net, copies ``weights`` into it and runs
    ``iterations`` forward passes, logging every output element per batch
    (``Batch i, accuracy = 0.98``), the mean loss, and each output's mean
    over the batches; outputs with a loss weight also show
    ``(* w = w*mean loss)``.

    Returns
    -------
    TestResult
    """
    import numpy as np

    from netlite.net import Net

    select_device(engine, gpu)
    set_data_dir(data_dir)
    iterations = int(iterations)
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    net = Net(model, TEST, weights=weights, level=level, stages=stages)
    logger.info("Running for %d iterations.", iterations)
    sums = collections.OrderedDict()
    total_loss = 0.0
    for i in range(iterations):
        result = net.forward()
        total_loss += net.loss
        for name in net.outputs:
            values = np.asarray(backend.to_numpy(result[name]),
                                dtype=np.float64).ravel()
            for v in values:
                logger.info("Batch %d, %s = %g", i, name, v)
            if name in sums:
                sums[name] += values
            else:
                sums[name] = values.copy()
    loss = total_loss / iterations
    logger.info("Loss: %g", loss)
    means = collections.OrderedDict()
    for name, total in sums.items():
        mean = total / iterations
        weight = net.blob_loss_weights[net._name_to_id[name]]
        for v in mean:
            suffix = f" (* {weight:g} = {weight * v:g} loss)" if weight else ""
            logger.info("%s = %g%s", name, v, suffix)
        means[name] = _scalar_or_array(mean)
    return TestResult(means, loss)


# -------------------------------------------------------------------- time
def time_net(model, iterations=50, phase=TRAIN, engine=None, gpu=None,
             data_dir=None, level=0, stages=()):
    """Time every layer's forward and backward like ``caffe time``.

    One untimed forward (logging "Initial loss") and backward of every layer
    come first, so that buffers are allocated and JIT kernels compiled.
    Then, for each of ``iterations`` rounds, every layer's forward is timed
    in order (this includes its reshape, as in Caffe) and then every layer's
    backward from last to first (called for every layer with its
    bottom_need_backward flags, as Caffe does).

    Returns
    -------
    dict
        ``"layers"``: list of ``(name, forward ms, backward ms)`` averaged
        over the iterations; ``"forward_ms"``, ``"backward_ms"``,
        ``"forward_backward_ms"`` (averages per iteration) and
        ``"total_ms"``.
    """
    from netlite.net import Net

    select_device(engine, gpu)
    set_data_dir(data_dir)
    iterations = int(iterations)
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    net = Net(model, _parse_phase(phase), level=level, stages=stages)
    logger.info("Performing Forward")
    initial_loss = net.forward_from_to(0, len(net.layers) - 1)
    logger.info("Initial loss: %g", initial_loss)
    logger.info("Performing Backward")
    # Warm up exactly what the timed loop calls (every layer's backward),
    # so that no kernel is compiled inside the first timed iteration; Caffe
    # warms up with Net::Backward, which skips layers that need none.
    for i in range(len(net.layers) - 1, -1, -1):
        net.layers[i].backward(
            net.top_vecs[i], net.bottom_need_backward[i], net.bottom_vecs[i]
        )
    _synchronize(net)

    n = len(net.layers)
    fwd, bwd = [0.0] * n, [0.0] * n
    forward_total = backward_total = 0.0
    clock = _time.perf_counter
    logger.info("*** Benchmark begins ***")
    logger.info("Testing for %d iterations.", iterations)
    start_all = clock()
    for j in range(iterations):
        start_iter = clock()
        for i in range(n):
            t = clock()
            net.layers[i].forward(net.bottom_vecs[i], net.top_vecs[i])
            _synchronize(net)
            fwd[i] += clock() - t
        mid = clock()
        forward_total += mid - start_iter
        for i in range(n - 1, -1, -1):
            t = clock()
            net.layers[i].backward(
                net.top_vecs[i], net.bottom_need_backward[i], net.bottom_vecs[i]
            )
            _synchronize(net)
            bwd[i] += clock() - t
        end = clock()
        backward_total += end - mid
        logger.info("Iteration: %d forward-backward time: %g ms.", j + 1,
                    (end - start_iter) * 1e3)
    total = clock() - start_all
    logger.info("Average time per layer: ")
    layers = []
    for i, name in enumerate(net.layer_names):
        f_ms, b_ms = fwd[i] * 1e3 / iterations, bwd[i] * 1e3 / iterations
        layers.append((name, f_ms, b_ms))
        logger.info("%10s\tforward: %g ms.", name, f_ms)
        logger.info("%10s\tbackward: %g ms.", name, b_ms)
    out = {
        "layers": layers,
        "initial_loss": initial_loss,
        "forward_ms": forward_total * 1e3 / iterations,
        "backward_ms": backward_total * 1e3 / iterations,
        "forward_backward_ms": total * 1e3 / iterations,
        "total_ms": total * 1e3,
    }
    logger.info("Average Forward pass: %g ms.", out["forward_ms"])
    logger.info("Average Backward pass: %g ms.", out["backward_ms"])
    logger.info("Average Forward-Backward: %g ms.", out["forward_backward_ms"])
    logger.info("Total Time: %g ms.", out["total_ms"])
    logger.info("*** Benchmark ends ***")
    return out


# ------------------------------------------------------------------- train
def _plot_prefix(solver_path):
    """``examples/mnist/lenet_quick_solver.prototxt`` -> ``"lenet_quick_"``."""
    if not isinstance(solver_path, (str, os.PathLike)) or not os.path.isfile(
        solver_path
    ):
        return ""
    stem = os.path.splitext(os.path.basename(solver_path))[0]
    for suffix in ("_solver", "solver"):
        if stem.endswith(suffix) and len(stem) > len(suffix):
            stem = stem[: -len(suffix)]
            break
    return stem.rstrip("_") + "_"


def _want_progress(progress):
    if progress is not None:
        return bool(progress)
    try:
        tty = sys.stdout.isatty()
    except (AttributeError, ValueError):
        tty = False
    if not tty:
        return False
    import importlib.util

    return importlib.util.find_spec("tqdm") is not None


class _Progress:
    """A tqdm bar driven by the solver's callbacks (or nothing)."""

    def __init__(self, enabled, start, total):
        self.bar = None
        if not enabled or total <= start:
            return
        from tqdm import tqdm

        self.bar = tqdm(
            total=total, initial=start, unit="iter", file=sys.stdout,
            dynamic_ncols=True, leave=True, desc="train",
        )
        if _handler is not None:
            _handler.bar = self.bar
        self.postfix = {}

    def iteration(self, smoothed_loss, lr):
        if self.bar is None:
            return
        self.postfix["loss"] = f"{smoothed_loss:.4g}"
        self.postfix["lr"] = f"{lr:.3g}"
        self.bar.set_postfix(self.postfix, refresh=False)
        self.bar.update(1)

    def test(self, scores):
        if self.bar is None:
            return
        for name, value in scores.items():
            if "acc" in name.lower() and isinstance(value, float):
                self.postfix[f"test {name}"] = f"{value:.4f}"
        self.bar.set_postfix(self.postfix)

    def close(self):
        if self.bar is None:
            return
        self.bar.close()
        if _handler is not None:
            _handler.bar = None
        self.bar = None


def train(solver_path, weights=None, snapshot=None, engine=None, gpu=None,
          data_dir=None, plot_dir=None, progress=None):
    """Train like ``caffe train``; the function behind ``netlite train``.

    Parameters
    ----------
    solver_path : str or path
        Solver prototxt (relative ``net:`` paths are tried from the working
        directory, then beside the solver file).
    weights : str or list of str, optional
        Weights to fine-tune from (``.caffemodel`` or ``.npz``; a string may
        list several, comma-separated).  Copied into the train net and every
        test net by layer name, as Caffe's ``-weights``.
    snapshot : str, optional
        A ``.solverstate`` to resume from (``-snapshot``).  Not together
        with ``weights``.
    engine : {"numpy", "numba"}, optional
        CPU engine (default: unchanged).
    gpu : bool or int, optional
        Run on that CUDA device (True means 0).  The solver's
        ``solver_mode`` is ignored, as the command line decides.
    data_dir : str, optional
        Searched first for named datasets ("mnist:train").
    plot_dir : str, optional
        Write ``<stem>_loss.png`` and ``<stem>_accuracy.png`` here
        (``<stem>`` is the solver file name without ``_solver``).
        Checked before training: a missing matplotlib fails at once.
    progress : bool, optional
        Show a tqdm progress bar; default: when stdout is a terminal.

    Returns
    -------
    TrainResult
        With ``interrupted=True`` when Ctrl-C stopped training; the solver
        has then written a snapshot of the last completed iteration (see
        ``result.solver``), and the plots show the run so far.
    """
    from netlite import plotting
    from netlite.solver import get_solver

    if weights and snapshot:
        raise ValueError(
            "give a snapshot to resume training or weights to fine-tune, not both"
        )
    if plot_dir is not None:
        plotting._import_matplotlib()  # fail before training, not after
    select_device(engine, gpu)
    set_data_dir(data_dir)

    solver = get_solver(solver_path)
    if weights:
        paths = weights.split(",") if isinstance(weights, str) else list(weights)
        for path in (p.strip() for p in paths):
            if not path:
                continue
            logger.info("Finetuning from %s", path)
            for net in (solver.net, *solver.test_nets):
                net.copy_from(path)
    if snapshot:
        logger.info("Resuming from %s", snapshot)
        solver.restore(snapshot)

    history = plotting.TrainingHistory()
    snapshots = []
    bar = _Progress(_want_progress(progress), solver.iter, solver.param.max_iter)

    def on_iteration(iteration, loss, smoothed_loss, lr):
        history.add_train(iteration, loss)
        bar.iteration(smoothed_loss, lr)

    def on_test(iteration, test_net_id, scores):
        history.add_test(iteration, scores, test_net_id)
        if test_net_id == 0:
            bar.test(scores)

    def on_snapshot(iteration, model_path, state_path):
        snapshots.append((iteration, model_path, state_path))

    solver.add_callback(on_iteration=on_iteration, on_test=on_test,
                        on_snapshot=on_snapshot)
    logger.info("Starting Optimization")
    interrupted = False
    try:
        solver.solve()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    solver.snapshots = snapshots
    plots = []
    if plot_dir is not None:
        plots = plotting.plot_history(history, plot_dir,
                                      prefix=_plot_prefix(solver_path),
                                      title=solver.net.name or None)
    return TrainResult(solver, history, plots, interrupted)


# --------------------------------------------------------------- commands
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
            from netlite import convert_mnist

            return convert_mnist.main(argv[i + 1:]) or 0
    args = build_parser().parse_args(argv)
    configure_logging(logging.WARNING if args.quiet else logging.INFO)
    try:
        if args.command == "train":
            result = train(
                args.solver, weights=args.weights, snapshot=args.snapshot,
                engine=args.engine, gpu=args.gpu, data_dir=args.data,
                plot_dir=args.plot,
                progress=False if args.no_progress else None,
            )
            return _report_train(result)
        if args.command == "test":
            test(args.model, args.weights, iterations=args.iterations,
                 engine=args.engine, gpu=args.gpu, data_dir=args.data,
                 level=args.level, stages=args.stage)
        elif args.command == "time":
            time_net(args.model, iterations=args.iterations, phase=args.phase,
                     engine=args.engine, gpu=args.gpu, data_dir=args.data,
                     level=args.level, stages=args.stage)
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


if __name__ == "__main__":  # python -m netlite.cli
    sys.exit(main())
