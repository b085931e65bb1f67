"""The work behind ``netlite train``, ``test`` and ``time``.

:func:`train`, :func:`test` and :func:`time_net` are the same functions a
Python program calls (devices: :mod:`netlite.tools.devices`); the command line
(:mod:`netlite.tools.cli`) only parses arguments and configures logging.
They log through the ``netlite`` logger, as Caffe's ``caffe`` tool does.
See docs/cli.md.
"""

import collections
import logging
import os
import signal
import threading
import time as _time

import numpy as np

from netlite import backend, io
from netlite.data import catalog
from netlite.layer import TEST, TRAIN
from netlite.net import Net
from netlite.solvers import registry
from netlite.solvers.registry import get_solver
from netlite.tools import logs, plotting
from netlite.tools.devices import select_device

logger = logging.getLogger("netlite")

TestResult = collections.namedtuple("TestResult", ["outputs", "loss"])
TestResult.__doc__ = """What :func:`test` measured.

outputs : dict of str -> float or ndarray
    Mean of every net output over the batches (per element, as Caffe).
loss : float
    Mean of the net's total weighted loss over the batches.
"""
TestResult.__test__ = False  # not a pytest test class despite its name


class TrainResult(collections.namedtuple(
        "TrainResult", ["solver", "history", "plots", "interrupted",
                        "stopped_by"], defaults=(None,))):
    """What :func:`train` returns.

    Attributes
    ----------
    solver : netlite solver
        The solver after training (``solver.net`` holds the weights).
    history : netlite.tools.plotting.TrainingHistory
        Training loss per iteration and every test pass.
    plots : list of str
        PNG files written (empty without ``plot_dir``).
    interrupted : bool
        True when training stopped early, on Ctrl-C or a signal whose
        effect is "stop" (a snapshot was written).
    stopped_by : {None, "SIGINT", "SIGHUP"}
        The signal that stopped training (Ctrl-C is SIGINT).
    """

    __slots__ = ()

    @property
    def final_test(self):
        """``{output name: value}`` of the last test pass of test net #0."""
        outputs = self.history.tests.get(0, {})
        return {name: series[-1][1] for name, series in outputs.items()}

    @property
    def last_test(self):
        """``(iteration, {output name: value})`` of the last test pass of
        test net #0, or None when no test ran."""
        return self.history.last_test(0)


# ------------------------------------------------------------------ set-up
def set_data_dir(data_dir):
    """Make ``data_dir`` the first place datasets are looked up (``--data``)."""
    if data_dir is None:
        return
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"--data: no such directory: {data_dir}")
    catalog.set_data_dir(data_dir)


_ORIGINS = {
    "set_data_dir / --data": "--data",
    "data directory": "--data",
    "user cache": "the user cache",
    "system": "the system folder",
}


def named_datasets(nets):
    """The named datasets (``source: "mnist:train"``) the nets' layers read.

    Returns
    -------
    list of str
        Dataset names in the order first met, each once.
    """
    names = []
    for net in nets:
        for layer in net.layers:
            param = layer.layer_param
            if not param.HasField("idx_data_param"):
                continue
            source = param.idx_data_param.source
            if not source:
                continue
            try:
                name, _ = catalog.parse_source(source)
            except ValueError:
                continue
            if name not in names:
                names.append(name)
    return names


def log_data_folders(nets):
    """Log the folder each named dataset of ``nets`` is read from, and why.

    The folder is the first of :func:`netlite.data.catalog.search_dirs`
    that holds the files (the one the data layers used), e.g. ``Data folder
    of mnist: /data/mnist (from $NETLITE_DATA=/data)``.
    """
    for name in named_datasets(nets):
        spec = catalog.get_spec(name)
        found = next(((d, o) for d, o in catalog.search_dirs(name)
                      if catalog.has_all_files(d, spec)), None)
        if found is None:
            continue  # the nets were built, so the files are somewhere
        directory, origin = found
        if origin == "$NETLITE_DATA":
            where = f"$NETLITE_DATA={os.environ.get('NETLITE_DATA', '')}"
        elif origin == "set_data_dir / --data":
            where = f"--data {catalog.get_data_dir()}"
        else:
            where = _ORIGINS.get(origin, origin)
        logger.info("Data folder of %s: %s (from %s)", name, directory, where)


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
    select_device(engine, gpu)
    set_data_dir(data_dir)
    iterations = int(iterations)
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    net = Net(model, TEST, weights=weights, level=level, stages=stages)
    log_data_folders([net])
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
        weight = net.blob_loss_weights[name]
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
    select_device(engine, gpu)
    set_data_dir(data_dir)
    iterations = int(iterations)
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    net = Net(model, _parse_phase(phase), level=level, stages=stages)
    log_data_folders([net])
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


#: What ``-sigint_effect`` / ``-sighup_effect`` may ask for (Caffe's
#: SolverAction): stop training (after a snapshot), snapshot and go on, or
#: ignore the signal.
SIGNAL_EFFECTS = ("stop", "snapshot", "none")


class _SignalEffects:
    """Caffe's ``SignalHandler`` for :func:`train`.

    SIGINT with "stop" keeps Python's handler: Ctrl-C raises
    KeyboardInterrupt, which the solver turns into a snapshot of the last
    completed iteration (and holds while an update is in progress).  Every
    other effect is a request that :meth:`apply` carries out after an
    update, where the weights are those of a completed iteration.
    """

    def __init__(self, sigint_effect=None, sighup_effect=None):
        self.effects = {}
        for name, effect in (("SIGINT", sigint_effect),
                             ("SIGHUP", sighup_effect)):
            if effect is None:
                continue
            if effect not in SIGNAL_EFFECTS:
                raise ValueError(
                    f"{name.lower()}_effect must be one of "
                    f"{', '.join(SIGNAL_EFFECTS)}, got {effect!r}"
                )
            if hasattr(signal, name):  # Windows has no SIGHUP
                self.effects[name] = effect
        self.requests = []
        self.stopped_by = None
        self._previous = []

    def install(self):
        """Install the handlers (main thread only); :meth:`restore` undoes."""
        wanted = [(name, effect) for name, effect in self.effects.items()
                  if not (name == "SIGINT" and effect == "stop")]
        if wanted and threading.current_thread() is not threading.main_thread():
            raise ValueError(
                "sigint_effect/sighup_effect need the main thread "
                "(Python delivers signals only there)"
            )
        for name, effect in wanted:
            signum = getattr(signal, name)
            handler = (signal.SIG_IGN if effect == "none"
                       else lambda signum, frame: self.requests.append(signum))
            self._previous.append((signum, signal.signal(signum, handler)))

    def restore(self):
        while self._previous:
            signum, previous = self._previous.pop()
            signal.signal(signum, previous)

    def apply(self, solver):
        """Carry out the signals received since the last call."""
        while self.requests:
            name = signal.Signals(self.requests.pop(0)).name
            effect = self.effects[name]
            if effect == "snapshot":
                p = solver.param
                if not (p.snapshot and solver.iter % p.snapshot == 0):
                    logger.info("%s received: snapshotting iteration %d", name,
                                solver.iter)
                    solver.snapshot()
            else:  # "stop"; the solver snapshots on KeyboardInterrupt
                logger.info("%s received: stopping", name)
                self.stopped_by = name
                raise KeyboardInterrupt


def _images_per_iteration(solver):
    """Batch size times iter_size, when the train net starts with a data
    layer (a layer without bottoms); else None."""
    net = solver.net
    if not net.layers or net.bottom_vecs[0] or not net.top_vecs[0]:
        return None
    shape = net.top_vecs[0][0].shape
    if not shape:
        return None
    return int(shape[0]) * max(1, solver.param.iter_size)


def _read_solver(solver_path, level, stages):
    """Build the solver, with ``-level``/``-stage`` added to its
    ``train_state`` as Caffe's ``train`` does."""
    if level is None and not stages:
        return get_solver(solver_path)
    param = io.read_solver_param(solver_path)
    if level is not None:
        param.train_state.level = int(level)
    param.train_state.stage.extend(stages or ())
    solver_file = solver_path if isinstance(solver_path, (str, os.PathLike)) \
        and os.path.isfile(solver_path) else None
    cls = registry.solver_class(registry.solver_type_name(param))
    return cls(param, solver_file=solver_file)


def train(solver_path, weights=None, snapshot=None, engine=None, gpu=None,
          data_dir=None, plot_dir=None, progress=None, level=None, stages=(),
          sigint_effect=None, sighup_effect=None,
          progress_interval=logs.PROGRESS_INTERVAL):
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
        CPU engine (default: the library's, :func:`netlite.cpu_engine`).
    gpu : None, bool, int, str or sequence of int
        Run on that CUDA device (True means 0, ``"all"`` every visible one;
        see :func:`select_device`).  The solver's ``solver_mode`` is
        ignored, as the command line decides.
    data_dir : str, optional
        Searched first for named datasets ("mnist:train").
    plot_dir : str, optional
        Write ``<stem>_loss.png`` and ``<stem>_accuracy.png`` here
        (``<stem>`` is the solver file name without ``_solver``).
        Checked before training: a missing matplotlib fails at once.
    progress : {None, True, False, "bar", "log"}
        A tqdm bar (True, "bar"), progress records in the log ("log") or
        nothing (False); default: a bar when stdout is a terminal, else
        records (see :class:`netlite.tools.logs.Progress`).
    level : int, optional
        NetState level of the train net (``-level``), written into the
        solver's ``train_state``.
    stages : sequence of str
        NetState stages added to the solver's ``train_state`` (``-stage``).
    sigint_effect, sighup_effect : {None, "stop", "snapshot", "none"}
        What SIGINT (Ctrl-C) and SIGHUP do while training, as Caffe's
        flags: stop after a snapshot, snapshot and go on, or nothing.
        None leaves the signal's handler alone (Python's Ctrl-C is
        "stop").  The command line passes Caffe's defaults, "stop" and
        "snapshot".
    progress_interval : float
        Seconds between two progress records (``progress="log"``).

    Returns
    -------
    TrainResult
        With ``interrupted=True`` when Ctrl-C or a "stop" signal ended
        training; the solver has then written a snapshot of the last
        completed iteration (see ``result.solver``), and the plots show
        the run so far.
    """
    if weights and snapshot:
        raise ValueError(
            "give a snapshot to resume training or weights to fine-tune, not both"
        )
    mode = logs.progress_mode(progress)
    effects = _SignalEffects(sigint_effect, sighup_effect)
    if plot_dir is not None:
        plotting._import_matplotlib()  # fail before training, not after
    select_device(engine, gpu, train=True)
    set_data_dir(data_dir)

    solver = _read_solver(solver_path, level, stages)
    log_data_folders([solver.net, *solver.test_nets])
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
    bar = logs.Progress(mode, solver.iter, solver.param.max_iter,
                        images_per_iteration=_images_per_iteration(solver),
                        interval=progress_interval)

    def on_iteration(iteration, loss, smoothed_loss, lr):
        history.add_train(iteration, loss)
        bar.iteration(smoothed_loss, lr)
        effects.apply(solver)

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
    effects.install()
    try:
        solver.solve()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        effects.restore()
        bar.close()
    solver.snapshots = snapshots
    plots = []
    if plot_dir is not None:
        plots = plotting.plot_history(history, plot_dir,
                                      prefix=_plot_prefix(solver_path),
                                      title=solver.net.name or None)
    stopped_by = (effects.stopped_by or "SIGINT") if interrupted else None
    return TrainResult(solver, history, plots, interrupted, stopped_by)
