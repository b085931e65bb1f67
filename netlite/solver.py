"""The Solver: Caffe's training loop, test nets, learning-rate policies and
snapshots.

A solver owns one train net and zero or more test nets built from a
``SolverParameter`` (a prototxt path, prototxt text or a message).  Its
:meth:`Solver.step` runs Caffe's main loop exactly (``Solver::Step``):

1. clear the parameter diffs;
2. every ``test_interval`` iterations run every test net;
3. ``iter_size`` forward/backward passes (parameter diffs accumulate), the
   loss averaged over them and smoothed over ``average_loss`` iterations;
4. on display iterations log Caffe's lines;
5. apply the update: learning rate from the policy, gradient clipping,
   ``iter_size`` normalisation, L2/L1 weight decay, the solver type's
   update rule (``compute_update_value``), ``W -= diff``, ``iter += 1``;
6. snapshot every ``snapshot`` iterations.

The update rules of the solver types live in :mod:`netlite.sgd_solvers`;
:func:`get_solver` picks the class from the ``type`` field.  See
docs/engine/solvers.md for the formulas and what the snapshot files hold.

The pycaffe-shaped API::

    solver = netlite.get_solver("lenet_solver.prototxt")
    solver.step(100)            # or solver.solve(resume_file=None)
    solver.net, solver.test_nets, solver.iter
    path = solver.snapshot()    # "<prefix>_iter_<N>.solverstate"
    solver.restore(path)
"""

import contextlib
import io as _pyio
import json
import logging
import math
import os
import signal
import threading
import time

import numpy as np
from google.protobuf import message as pb_message

from netlite import backend, io, rng
from netlite.blob import Blob
from netlite.errors import NetliteError
from netlite.layer import TEST, TRAIN
from netlite.net import Net
from netlite.proto import netlite_pb2

logger = logging.getLogger("netlite")

#: The learning-rate policies Caffe knows (``SolverParameter.lr_policy``).
LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")

#: Caffe's deprecated ``solver_type`` enum -> the ``type`` string.
_SOLVER_TYPE_NAMES = {
    netlite_pb2.SolverParameter.SGD: "SGD",
    netlite_pb2.SolverParameter.NESTEROV: "Nesterov",
    netlite_pb2.SolverParameter.ADAGRAD: "AdaGrad",
    netlite_pb2.SolverParameter.RMSPROP: "RMSProp",
    netlite_pb2.SolverParameter.ADADELTA: "AdaDelta",
    netlite_pb2.SolverParameter.ADAM: "Adam",
}

_NET_FIELDS = ("net", "net_param", "train_net", "train_net_param")

#: Version of the ``netlite_state`` archive layout inside a .solverstate.
_STATE_FORMAT = "netlite-solverstate"
_STATE_VERSION = 1


class SolverParameterError(NetliteError, ValueError):
    """A ``SolverParameter`` is invalid (Caffe would CHECK-fail on it)."""


class SolverStateError(NetliteError, ValueError):
    """A ``.solverstate`` file cannot be read or does not fit the solver."""


# ---------------------------------------------------------------- registry
_SOLVERS = {}


def register_solver(type_name):
    """Class decorator: register a :class:`Solver` subclass under ``type``.

    Raises
    ------
    KeyError
        When ``type_name`` is already registered.
    """

    def decorator(cls):
        if type_name in _SOLVERS:
            other = _SOLVERS[type_name]
            raise KeyError(
                f"solver type {type_name!r} is already registered by "
                f"{other.__module__}.{other.__qualname__}"
            )
        cls.type = type_name
        _SOLVERS[type_name] = cls
        return cls

    return decorator


def _ensure_builtin_solvers():
    import netlite.sgd_solvers  # noqa: F401  (registers the solver types)


def solver_types():
    """Sorted list of every registered solver ``type`` string."""
    _ensure_builtin_solvers()
    return sorted(_SOLVERS)


def solver_class(type_name):
    """The class registered under ``type_name``.

    Raises
    ------
    SolverParameterError
        For an unknown type (the message lists the known ones).
    """
    _ensure_builtin_solvers()
    try:
        return _SOLVERS[type_name]
    except KeyError:
        raise SolverParameterError(
            f"unknown solver type {type_name!r}; known types: "
            f"{', '.join(sorted(_SOLVERS))}"
        ) from None


def get_solver(solver, dtype=np.float32):
    """Build the solver a ``SolverParameter`` describes (pycaffe's
    ``caffe.get_solver``).

    Parameters
    ----------
    solver : str, path or SolverParameter
        A solver prototxt path, prototxt text or message.
    dtype : {numpy.float32, numpy.float64}
        Dtype of every blob of the nets and of the solver history.

    Returns
    -------
    Solver
        An instance of the subclass registered under the (upgraded)
        ``type`` field, e.g. :class:`netlite.sgd_solvers.SGDSolver`.
    """
    param = io.read_solver_param(solver)
    type_name = param.type
    if param.HasField("solver_type") and not param.HasField("type"):
        type_name = _SOLVER_TYPE_NAMES[param.solver_type]
    return solver_class(type_name)(solver, dtype=dtype)


def read_solver(solver, solver_file=None):
    """Read and upgrade a SolverParameter.

    Parameters
    ----------
    solver : str, path or SolverParameter
        A solver prototxt path, prototxt text or message.
    solver_file : str, optional
        The file a message was read from (default: ``solver`` itself when
        it names a file).

    Returns
    -------
    param : SolverParameter
        A copy with the deprecated ``solver_type`` enum upgraded to ``type``
        and, when read from a file, ``snapshot_prefix`` derived as Caffe's
        ``UpgradeSnapshotPrefixProperty`` does.
    source : str or None
        The solver file's path, or None for text or a message.
    """
    source = os.fspath(solver_file) if solver_file is not None else None
    if source is None and not isinstance(solver, pb_message.Message):
        path = os.fspath(solver)
        if os.path.isfile(path):
            source = path
    param = netlite_pb2.SolverParameter()
    param.CopyFrom(io.read_solver_param(solver))
    upgrade_solver_type(param, source)
    if source is not None:
        upgrade_snapshot_prefix(param, source)
    return param, source


def upgrade_solver_type(param, source=None):
    """Replace the deprecated ``solver_type`` enum by the ``type`` string.

    Modifies ``param`` in place; returns True when it changed it.

    Raises
    ------
    SolverParameterError
        When both ``solver_type`` and ``type`` are given.
    """
    if not param.HasField("solver_type"):
        return False
    where = source or "solver parameters"
    if param.HasField("type"):
        raise SolverParameterError(
            f"{where}: give either the deprecated 'solver_type' (enum) or "
            "'type' (string), not both"
        )
    param.type = _SOLVER_TYPE_NAMES[param.solver_type]
    param.ClearField("solver_type")
    logger.warning(
        "%s: upgraded the deprecated 'solver_type' enum to type: \"%s\"; "
        "write 'type' instead", where, param.type,
    )
    return True


def upgrade_snapshot_prefix(param, solver_file):
    """Caffe's snapshot_prefix rule for a solver read from ``solver_file``.

    Unset -> the solver file's path without its extension; an existing
    directory -> that directory joined with the solver file's stem.
    """
    stem = os.path.splitext(os.path.basename(solver_file))[0]
    if not param.HasField("snapshot_prefix"):
        param.snapshot_prefix = os.path.splitext(solver_file)[0]
        logger.info(
            "snapshot_prefix was not specified and is set to %s",
            param.snapshot_prefix,
        )
    elif os.path.isdir(param.snapshot_prefix):
        param.snapshot_prefix = os.path.join(param.snapshot_prefix, stem)
        logger.info(
            "snapshot_prefix was a directory and is replaced to %s",
            param.snapshot_prefix,
        )


# ------------------------------------------------------------ lr policies
def check_lr_policy(param):
    """Raise :class:`SolverParameterError` when the policy cannot run.

    Caffe finds these problems at the first update (or never); netlite
    checks them when the solver is built.
    """
    policy = param.lr_policy
    if not policy:
        raise SolverParameterError(
            f"lr_policy is not set; choose one of {', '.join(LR_POLICIES)}"
        )
    if policy not in LR_POLICIES:
        raise SolverParameterError(
            f"unknown lr_policy {policy!r}; choose one of {', '.join(LR_POLICIES)}"
        )
    if policy in ("step", "exp", "inv", "multistep", "sigmoid") and param.gamma < 0:
        raise SolverParameterError(
            f"lr_policy {policy!r} needs gamma >= 0, got {param.gamma:g}"
        )
    if policy in ("step", "sigmoid") and param.stepsize <= 0:
        raise SolverParameterError(
            f"lr_policy {policy!r} needs stepsize > 0, got {param.stepsize}"
        )
    if policy == "poly" and param.max_iter <= 0:
        raise SolverParameterError(
            f"lr_policy 'poly' needs max_iter > 0, got {param.max_iter}"
        )
    if policy == "multistep":
        values = list(param.stepvalue)
        if any(b <= a for a, b in zip(values, values[1:])):
            raise SolverParameterError(
                f"lr_policy 'multistep' needs strictly increasing stepvalue "
                f"entries, got {values}"
            )


def learning_rate(param, iteration, current_step=0):
    r"""The rate of Caffe's ``SGDSolver::GetLearningRate`` at ``iteration``.

    Parameters
    ----------
    param : SolverParameter
        ``lr_policy``, ``base_lr``, ``gamma``, ``power``, ``stepsize``,
        ``stepvalue``, ``max_iter``.
    iteration : int
        The solver's iteration (updates done so far).
    current_step : int
        The multistep position before this call.

    Returns
    -------
    rate : float
        Computed in double precision from the (float32) proto fields.
    current_step : int
        The position after this call: ``step`` sets it to
        ``iteration // stepsize``; ``multistep`` advances it by **at most
        one** when ``iteration >= stepvalue[current_step]`` (so a solver
        restored past several step values catches up one per iteration,
        as in Caffe); other policies leave it alone.

    With ``it = iteration``:

    * fixed: $\text{base\_lr}$
    * step: $\text{base\_lr}\,\gamma^{\lfloor it/\text{stepsize}\rfloor}$
    * exp: $\text{base\_lr}\,\gamma^{it}$
    * inv: $\text{base\_lr}\,(1 + \gamma\,it)^{-\text{power}}$
    * multistep: $\text{base\_lr}\,\gamma^{\text{current\_step}}$
    * poly: $\text{base\_lr}\,(1 - it/\text{max\_iter})^{\text{power}}$
    * sigmoid: $\text{base\_lr} / (1 + e^{-\gamma (it - \text{stepsize})})$
    """
    check_lr_policy(param)
    policy, base, it = param.lr_policy, param.base_lr, int(iteration)
    if policy == "fixed":
        return base, current_step
    if policy == "step":
        current_step = it // param.stepsize
        return base * param.gamma ** current_step, current_step
    if policy == "exp":
        return base * param.gamma ** it, current_step
    if policy == "inv":
        return base * (1.0 + param.gamma * it) ** (-param.power), current_step
    if policy == "multistep":
        if current_step < len(param.stepvalue) and it >= param.stepvalue[current_step]:
            current_step += 1
            logger.info("MultiStep Status: Iteration %d, step = %d", it, current_step)
        return base * param.gamma ** current_step, current_step
    if policy == "poly":
        return base * (1.0 - it / param.max_iter) ** param.power, current_step
    # sigmoid
    return base / (1.0 + math.exp(-param.gamma * (it - param.stepsize))), current_step


# --------------------------------------------------------------- helpers
@contextlib.contextmanager
def _sigint_deferred():
    """Hold Ctrl-C (SIGINT) until the block ends, then raise it.

    The update touches every parameter and history blob; an interrupt in
    the middle would leave a state that is neither iteration i nor i + 1,
    and the Ctrl-C snapshot would then be wrong.  Outside the main thread
    (where Python delivers no signals) this is a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt


def _copy_state(value):
    # Layers may keep mutating the arrays their state_dict returns.
    if isinstance(value, dict):
        return {k: _copy_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy_state(v) for v in value]
    if isinstance(value, np.generic):
        return value
    if hasattr(value, "__array__") and not isinstance(value, (str, bytes)):
        return backend.to_numpy(value).copy()
    return value


def _encode(value, arrays, where):
    """JSON-able description of ``value``; arrays go into ``arrays``."""
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(
                    f"{where}: state keys must be strings, got {key!r}"
                )
        return {"dict": {k: _encode(v, arrays, f"{where}.{k}")
                         for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return {"list": [_encode(v, arrays, f"{where}[{i}]")
                         for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"json": value}
    if isinstance(value, np.generic) or hasattr(value, "__array__"):
        array = np.asarray(backend.to_numpy(value))
        if array.dtype.hasobject:
            raise TypeError(f"{where}: object arrays cannot be stored without pickle")
        name = f"array_{len(arrays)}"
        arrays[name] = array
        return {"scalar" if isinstance(value, np.generic) else "array": name}
    raise TypeError(
        f"{where}: cannot store a {type(value).__name__} in a solver state "
        "(use arrays, numbers, strings, None, lists and dicts)"
    )


def _decode(spec, archive):
    kind, payload = next(iter(spec.items()))
    if kind == "dict":
        return {k: _decode(v, archive) for k, v in payload.items()}
    if kind == "list":
        return [_decode(v, archive) for v in payload]
    if kind == "json":
        return payload
    if kind == "array":
        return archive[payload]
    if kind == "scalar":
        return archive[payload][()]
    raise SolverStateError(f"unknown entry kind {kind!r} in netlite_state")


def _json_array(obj):
    return np.frombuffer(json.dumps(obj).encode("utf-8"), dtype=np.uint8)


# ----------------------------------------------------------------- Solver
class Solver:
    """Base class: Caffe's ``Solver`` plus the shared part of ``SGDSolver``.

    Subclasses (:mod:`netlite.sgd_solvers`) set :attr:`num_history_sets`,
    implement :meth:`compute_update_value` and may override
    :meth:`check_param`.

    Parameters
    ----------
    solver : str, path or SolverParameter
        A solver prototxt path, prototxt text or message.
    dtype : {numpy.float32, numpy.float64}
        Dtype of every blob (default float32, as Caffe's tools).
    solver_file : str, optional
        The file ``solver`` was read from, when it is already a message;
        relative ``net:`` paths and the default ``snapshot_prefix`` use it.

    Attributes
    ----------
    param : SolverParameter
        The (upgraded) parameters.
    net : Net
        The train net.
    test_nets : list of Net
        Test nets; their parameters alias the train net's.
    iter : int
        Number of updates done.
    current_step : int
        The ``step``/``multistep`` position (saved in snapshots).
    history : list of Blob
        Per learnable parameter update history (two sets for AdaDelta and
        Adam: ``history[P + i]`` is the second one of parameter ``i``).
    """

    #: The registered ``type`` string (set by :func:`register_solver`).
    type = None
    #: History blobs per learnable parameter.
    num_history_sets = 1

    def __init__(self, solver, dtype=np.float32, solver_file=None):
        param, solver_file = read_solver(solver, solver_file)
        self.param = param
        self.solver_file = solver_file
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"solver dtype must be float32 or float64, got {dtype}")
        if param.type != self.type:
            logger.info(
                "Solver type %r from the parameters ignored: this is a %s",
                param.type, type(self).__name__,
            )
        logger.info("Initializing solver from parameters:\n%s", io.to_text(param))
        self.iter = 0
        self.current_step = 0
        self._check_common_param()
        self.check_param()
        if param.HasField("solver_mode") or param.HasField("device_id"):
            # The device is the caller's choice (netlite.set_mode_gpu() or
            # the CLI's --gpu), never the prototxt's: a Caffe solver file
            # that says GPU must still run on a machine without one.
            logger.info(
                "Ignoring solver_mode/device_id in the solver parameters "
                "(solver_mode: %s): netlite follows the process mode, now %s; "
                "netlite.set_mode_gpu() or --gpu selects the GPU",
                netlite_pb2.SolverParameter.SolverMode.Name(param.solver_mode),
                backend.mode(),
            )
        if param.random_seed >= 0:
            rng.set_random_seed(param.random_seed)
        self._callbacks = []
        self._init_train_net()
        self._init_test_nets()
        logger.info("Solver scaffolding done.")
        self._losses, self._smoothed_loss, self._window_start = [], 0.0, 0
        self._keep_window = False
        self._resume_point = None
        self._init_history()

    # ---------------------------------------------------------- checking
    def _check_common_param(self):
        p = self.param
        if p.average_loss < 1:
            raise SolverParameterError(
                f"average_loss must be >= 1, got {p.average_loss}"
            )
        if p.iter_size < 1:
            raise SolverParameterError(f"iter_size must be >= 1, got {p.iter_size}")
        if p.regularization_type not in ("L1", "L2"):
            raise SolverParameterError(
                f"unknown regularization_type {p.regularization_type!r}; "
                "use 'L2' or 'L1'"
            )
        if p.snapshot_format != netlite_pb2.SolverParameter.BINARYPROTO:
            raise SolverParameterError(
                "snapshot_format: HDF5 is not supported by netlite; use "
                "snapshot_format: BINARYPROTO (the default)"
            )
        if p.snapshot < 0:
            raise SolverParameterError(f"snapshot must be >= 0, got {p.snapshot}")
        if any(n < 1 for n in p.test_iter):
            raise SolverParameterError(
                f"every test_iter must be >= 1, got {list(p.test_iter)}"
            )
        check_lr_policy(p)
        if p.snapshot:
            if not p.HasField("snapshot_prefix"):
                raise SolverParameterError(
                    "snapshot is set but snapshot_prefix is not"
                )
            self._check_snapshot_writable()

    def check_param(self):
        """Type-specific checks (Caffe's ``constructor_sanity_check``)."""

    def _check_snapshot_writable(self):
        # Caffe probes the prefix at start-up so that a bad path fails now,
        # not at the first snapshot thousands of iterations later.
        directory = os.path.dirname(os.path.abspath(self._snapshot_filename("")))
        probe = directory
        while not os.path.exists(probe):
            parent = os.path.dirname(probe)
            if parent == probe:
                break
            probe = parent
        if not (os.path.isdir(probe) and os.access(probe, os.W_OK | os.X_OK)):
            raise SolverParameterError(
                f"cannot write snapshots with snapshot_prefix "
                f"'{self.param.snapshot_prefix}': {probe} is not a writable "
                "directory"
            )

    # ---------------------------------------------------------- net setup
    def _resolve_net_file(self, name):
        if os.path.isfile(name):
            return name
        tried = [os.path.abspath(name)]
        if self.solver_file and not os.path.isabs(name):
            candidate = os.path.join(os.path.dirname(self.solver_file), name)
            if os.path.isfile(candidate):
                return candidate
            tried.append(os.path.abspath(candidate))
        raise FileNotFoundError(
            f"net file '{name}' not found (tried {', '.join(tried)})"
        )

    def _read_net_file(self, name):
        return io.read_net_param(self._resolve_net_file(name))

    def _build_net(self, net_param, phase, state_override):
        # Caffe's precedence: solver default phase < the net's own state <
        # train_state/test_state.
        state = netlite_pb2.NetState(phase=phase)
        state.MergeFrom(net_param.state)
        if state_override is not None:
            state.MergeFrom(state_override)
        return Net(
            net_param, phase=state.phase, dtype=self.dtype, level=state.level,
            stages=list(state.stage),
        )

    def _load_weights(self, net):
        for entry in self.param.weights:
            for path in entry.split(","):
                path = path.strip()
                if path:
                    logger.info("Finetuning from %s", path)
                    net.copy_from(path)

    def _init_train_net(self):
        p = self.param
        given = [f for f in _NET_FIELDS if p.HasField(f)]
        if len(given) != 1:
            what = "none" if not given else ", ".join(given)
            raise SolverParameterError(
                "SolverParameter must specify exactly one train net with one of "
                f"{', '.join(_NET_FIELDS)}; got {what}"
            )
        field = given[0]
        if field == "train_net_param":
            logger.info("Creating training net specified in train_net_param.")
            net_param = p.train_net_param
        elif field == "train_net":
            logger.info("Creating training net from train_net file: %s", p.train_net)
            net_param = self._read_net_file(p.train_net)
        elif field == "net_param":
            logger.info("Creating training net specified in net_param.")
            net_param = p.net_param
        else:
            logger.info("Creating training net from net file: %s", p.net)
            net_param = self._read_net_file(p.net)
        override = p.train_state if p.HasField("train_state") else None
        self.net = self._build_net(net_param, TRAIN, override)
        self._load_weights(self.net)

    def _init_test_nets(self):
        p = self.param
        generic = p.HasField("net_param") or p.HasField("net")
        explicit = len(p.test_net_param) + len(p.test_net)
        if (len(p.test_iter) < explicit) if generic else (len(p.test_iter) != explicit):
            raise SolverParameterError(
                f"test_iter must be given once per test net: {explicit} test "
                f"net(s) from test_net/test_net_param, {len(p.test_iter)} "
                "test_iter value(s)"
            )
        count = len(p.test_iter) if generic else explicit
        if p.test_state and len(p.test_state) != count:
            raise SolverParameterError(
                f"test_state must be unspecified or given once per test net "
                f"({count}), got {len(p.test_state)}"
            )
        if count and p.test_interval <= 0:
            raise SolverParameterError(
                f"{count} test net(s) need test_interval > 0, got {p.test_interval}"
            )
        sources = []
        for net_param in p.test_net_param:
            sources.append(("test_net_param", net_param))
        for name in p.test_net:
            sources.append((f"test_net file: {name}", self._read_net_file(name)))
        remaining = count - len(sources)
        if remaining and p.HasField("net_param"):
            sources += [("net_param", p.net_param)] * remaining
        elif remaining:
            shared = self._read_net_file(p.net)
            sources += [(f"net file: {p.net}", shared)] * remaining
        self.test_nets = []
        for i, (what, net_param) in enumerate(sources):
            logger.info("Creating test net (#%d) specified by %s", i, what)
            override = p.test_state[i] if p.test_state else None
            test_net = self._build_net(net_param, TEST, override)
            test_net.debug_info = p.debug_info
            self._load_weights(test_net)
            test_net.share_trained_layers_with(self.net)
            self.test_nets.append(test_net)

    def _init_history(self):
        params = self.net.learnable_params
        self.history = [
            Blob(p.shape, dtype=self.dtype, device=p.device)
            for _ in range(self.num_history_sets) for p in params
        ]
        # Work buffers, as Caffe's update_/temp_ (no allocation per update).
        self._update = [p.xp.zeros(p.count, dtype=self.dtype) for p in params]
        self._temp = [p.xp.zeros(p.count, dtype=self.dtype) for p in params]

    # ---------------------------------------------------------- callbacks
    def add_callback(self, on_start=None, on_gradients_ready=None, *,
                     on_iteration=None, on_test=None, on_snapshot=None):
        """Register functions the main loop calls.

        Parameters
        ----------
        on_start : callable(), optional
            Before the forward/backward passes of each iteration (after
            testing), as pycaffe's ``add_callback``.
        on_gradients_ready : callable(), optional
            After the forward/backward passes, before the update.
        on_iteration : callable(iter, loss, smoothed_loss, lr), optional
            After each update.  ``iter`` is the iteration the loss was
            computed at (the number Caffe's log shows; ``solver.iter`` is
            already ``iter + 1``), ``loss`` the mean over ``iter_size``
            passes, ``lr`` the base rate of the policy.
        on_test : callable(iter, test_net_id, scores), optional
            After each test; ``scores`` maps output blob names to the mean
            over ``test_iter`` batches (a float for scalar outputs, else an
            array of the blob's shape); ``"loss"``-named outputs included.
        on_snapshot : callable(iter, model_path, state_path), optional
            After both snapshot files are written.

        Raising ``KeyboardInterrupt`` from a callback stops training like
        Ctrl-C (a snapshot of the last completed iteration is written).
        """
        self._callbacks.append({
            "on_start": on_start, "on_gradients_ready": on_gradients_ready,
            "on_iteration": on_iteration, "on_test": on_test,
            "on_snapshot": on_snapshot,
        })

    def _fire(self, event, *args):
        for callback in self._callbacks:
            fn = callback[event]
            if fn is not None:
                fn(*args)

    # ----------------------------------------------------------- training
    def solve(self, resume_file=None):
        """Train to ``max_iter`` (Caffe's ``Solver::Solve``).

        Restores ``resume_file`` first when given; snapshots at the end when
        ``snapshot_after_train`` is set and the last iteration was not
        already snapshotted; then a final display forward and test pass.
        """
        logger.info("Solving %s", self.net.name)
        logger.info("Learning Rate Policy: %s", self.param.lr_policy)
        if resume_file is not None:
            logger.info("Restoring previous solver status from %s", resume_file)
            self.restore(resume_file)
        self.step(self.param.max_iter - self.iter)
        p = self.param
        if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot):
            self.snapshot()
        if p.display and self.iter % p.display == 0:
            self.net.set_iteration(self.iter)
            self.net.forward()
            self._update_smoothed_loss(self.net.loss)
            logger.info("Iteration %d, loss = %g", self.iter, self._smoothed_loss)
        if p.test_interval and self.iter % p.test_interval == 0:
            self.test_all()
        logger.info("Optimization Done.")

    def step(self, iters):
        """Run ``iters`` iterations (Caffe's ``Solver::Step``).

        Ctrl-C (``KeyboardInterrupt``) writes a snapshot of the last
        completed iteration, then propagates.
        """
        iters = int(iters)
        p = self.param
        if self._keep_window:
            # Just restored: keep the snapshot's smoothing window, so the
            # logged losses match an uninterrupted run.
            self._keep_window = False
        else:
            self._losses, self._smoothed_loss = [], 0.0
            self._window_start = self.iter
        self._resume_point = self._extra_state()
        timer, iterations_last = time.perf_counter(), self.iter
        stop_iter = self.iter + iters
        try:
            while self.iter < stop_iter:
                self.net.clear_param_diffs()
                if (p.test_interval and self.iter % p.test_interval == 0
                        and (self.iter > 0 or p.test_initialization)):
                    self.test_all()
                self._fire("on_start")
                display = bool(p.display) and self.iter % p.display == 0
                self.net.debug_info = display and p.debug_info
                loss = 0.0
                for _ in range(p.iter_size):
                    self.net.set_iteration(self.iter)
                    loss += self.net.forward_backward()
                loss /= p.iter_size
                self._update_smoothed_loss(loss)
                if display:
                    lapse = time.perf_counter() - timer
                    per_s = (self.iter - iterations_last) / (lapse or 1.0)
                    logger.info(
                        "Iteration %d (%g iter/s, %gs/%d iters), loss = %g",
                        self.iter, per_s, lapse, p.display, self._smoothed_loss,
                    )
                    timer, iterations_last = time.perf_counter(), self.iter
                    self._log_outputs(self.net, "Train", self._output_arrays())
                self._fire("on_gradients_ready")
                with _sigint_deferred():
                    rate = self.apply_update()
                    self._resume_point = self._extra_state()
                self._fire(
                    "on_iteration", self.iter - 1, loss, self._smoothed_loss, rate
                )
                if p.snapshot and self.iter % p.snapshot == 0:
                    self.snapshot()
        except KeyboardInterrupt:
            logger.warning(
                "Interrupted: snapshotting iteration %d before stopping", self.iter
            )
            self._write_snapshot(self._resume_point)
            raise

    def _update_smoothed_loss(self, loss):
        # Caffe's UpdateSmoothedLoss: a running mean until the window is
        # full, then a ring buffer indexed by the iteration.
        n = self.param.average_loss
        loss = float(loss)
        if len(self._losses) < n:
            self._losses.append(loss)
            size = len(self._losses)
            self._smoothed_loss = (self._smoothed_loss * (size - 1) + loss) / size
        else:
            idx = (self.iter - self._window_start) % n
            self._smoothed_loss += (loss - self._losses[idx]) / n
            self._losses[idx] = loss

    @property
    def smoothed_loss(self):
        """The loss averaged over the last ``average_loss`` iterations."""
        return self._smoothed_loss

    def _output_arrays(self, net=None):
        net = net or self.net
        return [(name, backend.to_numpy(net.blobs[name].data))
                for name in net.outputs]

    @staticmethod
    def _loss_weights(net):
        # Caffe's blob_loss_weights: the weight the last layer writing a
        # blob gave it (an in-place layer overwrites its producer's).
        weights = {}
        for layer_id, layer in enumerate(net.layers):
            for j, name in enumerate(net.top_names(layer_id)):
                weights[name] = layer.loss(j)
        return weights

    def _log_outputs(self, net, kind, outputs):
        weights = self._loss_weights(net)
        index = 0
        for name, values in outputs:
            weight = weights.get(name, 0.0)
            for v in np.ravel(values):
                suffix = f" (* {weight:g} = {weight * v:g} loss)" if weight else ""
                logger.info(
                    "    %s net output #%d: %s = %g%s", kind, index, name, v, suffix
                )
                index += 1

    # ------------------------------------------------------------ updating
    def get_learning_rate(self):
        """The current rate; advances ``current_step`` for step/multistep."""
        rate, self.current_step = learning_rate(self.param, self.iter,
                                                self.current_step)
        return rate

    def apply_update(self):
        """Caffe's ``SGDSolver::ApplyUpdate``; returns the rate it used.

        rate -> clip gradients -> per parameter: normalise by iter_size,
        add weight decay, ``compute_update_value`` -> ``net.update()`` ->
        ``iter += 1``.
        """
        rate = self.get_learning_rate()
        if self.param.display and self.iter % self.param.display == 0:
            logger.info("Iteration %d, lr = %g", self.iter, rate)
        self.clip_gradients()
        for i in range(len(self.net.learnable_params)):
            self.normalize(i)
            self.regularize(i)
            self.compute_update_value(i, rate)
        self.net.update()
        self.iter += 1
        return rate

    def clip_gradients(self):
        """Scale all diffs by clip/‖g‖₂ when the global norm exceeds
        ``clip_gradients`` (before normalisation and decay, as Caffe)."""
        clip = self.param.clip_gradients
        if clip < 0:
            return
        params = self.net.learnable_params
        norm = math.sqrt(sum(p.sumsq_diff() for p in params))
        if norm > clip:
            factor = clip / norm
            logger.info(
                "Gradient clipping: scaling down gradients (L2 norm %g > %g) by "
                "scale factor %g", norm, clip, factor,
            )
            for p in params:
                p.scale_diff(factor)

    def normalize(self, param_id):
        """Divide the accumulated diff by ``iter_size``."""
        if self.param.iter_size == 1:
            return
        dt = self.dtype.type
        diff = self.net.learnable_params[param_id].flat_diff
        diff *= dt(1) / dt(self.param.iter_size)

    def regularize(self, param_id):
        """Add ``weight_decay * decay_mult`` times W (L2) or sign(W) (L1)."""
        dt = self.dtype.type
        decay = dt(self.param.weight_decay) * dt(
            self.net.params_weight_decay[param_id]
        )
        if not decay:
            return
        blob = self.net.learnable_params[param_id]
        xp, data, diff = blob.xp, blob.flat_data, blob.flat_diff
        tmp = self._temp[param_id]
        if self.param.regularization_type == "L2":
            xp.multiply(data, decay, out=tmp)
        else:
            xp.sign(data, out=tmp)
            tmp *= decay
        diff += tmp

    def local_rate(self, param_id, rate):
        """``rate * lr_mult`` of a learnable parameter, in the solver dtype."""
        dt = self.dtype.type
        return dt(rate) * dt(self.net.params_lr[param_id])

    def compute_update_value(self, param_id, rate):
        """Turn the regularised gradient in the diff into the step."""
        raise NotImplementedError(
            f"{type(self).__name__} does not implement compute_update_value"
        )

    # ------------------------------------------------------------- testing
    def test_all(self):
        """Run every test net; return a list of ``{output: mean}`` dicts."""
        return [self.test(i) for i in range(len(self.test_nets))]

    def test(self, test_net_id=0):
        """Run ``test_iter[test_net_id]`` forward passes of a test net.

        Returns
        -------
        dict of str -> float or ndarray
            The mean of every output element over the batches.
        """
        logger.info("Iteration %d, Testing net (#%d)", self.iter, test_net_id)
        net = self.test_nets[test_net_id]
        net.share_trained_layers_with(self.net)
        n = self.param.test_iter[test_net_id]
        sums, loss = None, 0.0
        for _ in range(n):
            net.set_iteration(self.iter)
            net.forward()
            if self.param.test_compute_loss:
                loss += net.loss
            outputs = self._output_arrays(net)
            if sums is None:
                sums = [(name, v.astype(np.float64)) for name, v in outputs]
            else:
                for (_, acc), (_, v) in zip(sums, outputs):
                    acc += v
        if self.param.test_compute_loss:
            logger.info("Test loss: %g", loss / n)
        means = [(name, acc / n) for name, acc in sums]
        self._log_outputs(net, "Test", means)
        scores = {name: float(m) if m.size == 1 else m for name, m in means}
        self._fire("on_test", self.iter, test_net_id, scores)
        return scores

    # ----------------------------------------------------------- snapshots
    def _snapshot_filename(self, extension):
        return f"{self.param.snapshot_prefix}_iter_{self.iter}{extension}"

    def snapshot(self):
        """Write ``<prefix>_iter_<N>.caffemodel`` and ``.solverstate``.

        Returns
        -------
        str
            The path of the ``.solverstate`` file.
        """
        return self._write_snapshot(self._extra_state())

    def _write_snapshot(self, extra):
        model_path = self._snapshot_filename(".caffemodel")
        logger.info("Snapshotting to binary proto file %s", model_path)
        net_param = self.net.to_proto(write_diff=self.param.snapshot_diff)
        io.atomic_write_bytes(model_path, net_param.SerializeToString())
        state = netlite_pb2.SolverState(
            iter=self.iter, learned_net=model_path, current_step=self.current_step
        )
        for blob in self.history:
            state.history.add().CopyFrom(blob.to_proto())
        state.netlite_state = self._encode_extra_state(extra)
        state_path = self._snapshot_filename(".solverstate")
        logger.info(
            "Snapshotting solver state to binary proto file %s", state_path
        )
        io.atomic_write_bytes(state_path, state.SerializeToString())
        self._fire("on_snapshot", self.iter, model_path, state_path)
        return state_path

    def _stateful_layers(self):
        for net_index, net in enumerate([self.net, *self.test_nets]):
            for name, layer in zip(net.layer_names, net.layers):
                if callable(getattr(layer, "state_dict", None)):
                    yield net_index, name, layer

    def _extra_state(self):
        """What a bit-exact resume needs beyond Caffe's SolverState."""
        layers = []
        for net_index, name, layer in self._stateful_layers():
            state = layer.state_dict()
            if state:
                layers.append((net_index, name, _copy_state(state)))
        return {
            "rng": rng.get_state(),
            "smoothing": {
                "losses": list(self._losses),
                "smoothed_loss": self._smoothed_loss,
                "window_start": self._window_start,
            },
            "layers": layers,
        }

    def _encode_extra_state(self, extra):
        arrays = {}
        manifest = {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "rng": extra["rng"],
            "smoothing": extra["smoothing"],
            "layers": [
                {"net": net_index, "layer": name,
                 "state": _encode(state, arrays, f"layer '{name}' state")}
                for net_index, name, state in extra["layers"]
            ],
        }
        buf = _pyio.BytesIO()
        np.savez(buf, manifest=_json_array(manifest), **arrays)
        return buf.getvalue()

    def restore(self, path):
        """Resume from a ``.solverstate`` written by :meth:`snapshot` (or by
        Caffe).

        Sets ``iter`` and ``current_step``, loads the weights from the
        ``learned_net`` file and the history blobs, and, when the file has
        netlite's ``netlite_state``, the RNG state, the smoothing window and
        every stateful layer's state, so that training continues exactly as
        if never interrupted.  A Caffe-written state has none of those: as in
        Caffe, data layers then restart from their beginning.
        """
        path = os.fspath(path)
        if path.endswith(".h5"):
            raise SolverStateError(
                f"{path}: HDF5 solver states are not supported; use a binary "
                ".solverstate"
            )
        with open(path, "rb") as f:
            payload = f.read()
        state = netlite_pb2.SolverState()
        try:
            state.ParseFromString(payload)
        except pb_message.DecodeError as exc:
            raise SolverStateError(f"{path}: not a SolverState: {exc}") from None
        if len(state.history) != len(self.history):
            raise SolverStateError(
                f"{path}: {len(state.history)} history blob(s), this "
                f"{self.type} solver has {len(self.history)}"
            )
        for i, (proto, blob) in enumerate(zip(state.history, self.history)):
            shape = Blob.proto_shape(proto)
            if not blob.shape_equals_proto_shape(shape):
                raise SolverStateError(
                    f"{path}: history blob {i} has shape {tuple(shape)}, the "
                    f"solver expects {blob.shape}"
                )
        if state.HasField("learned_net"):
            self.net.copy_from(self._resolve_learned_net(state.learned_net, path))
        for proto, blob in zip(state.history, self.history):
            blob.from_proto(proto, reshape=False)
        self.iter = state.iter
        self.current_step = state.current_step
        if state.HasField("netlite_state"):
            self._apply_extra_state(state.netlite_state, path)
        else:
            logger.info(
                "%s has no netlite state: data-layer positions and the RNG are "
                "not restored (as in Caffe)", path,
            )
        self._resume_point = None
        logger.info("%s: restored iteration %d", type(self).__name__, self.iter)

    @staticmethod
    def _resolve_learned_net(learned_net, state_path):
        # Caffe stores the model path as written; look beside the state
        # file too, so snapshots can be moved or resumed from elsewhere.
        if os.path.isfile(learned_net):
            return learned_net
        beside = os.path.join(
            os.path.dirname(os.path.abspath(state_path)),
            os.path.basename(learned_net),
        )
        if os.path.isfile(beside):
            return beside
        raise SolverStateError(
            f"{state_path}: learned_net '{learned_net}' not found (also tried "
            f"{beside})"
        )

    def _apply_extra_state(self, payload, path):
        try:
            archive = np.load(_pyio.BytesIO(payload), allow_pickle=False)
            with archive:
                arrays = {k: archive[k] for k in archive.files}
            manifest = json.loads(arrays.pop("manifest").tobytes().decode("utf-8"))
        except (ValueError, OSError, KeyError, UnicodeDecodeError) as exc:
            raise SolverStateError(f"{path}: unreadable netlite_state: {exc}") from None
        if manifest.get("format") != _STATE_FORMAT or manifest.get(
            "version"
        ) != _STATE_VERSION:
            raise SolverStateError(
                f"{path}: netlite_state format {manifest.get('format')!r} version "
                f"{manifest.get('version')!r} is not {_STATE_FORMAT!r} version "
                f"{_STATE_VERSION}"
            )
        nets = [self.net, *self.test_nets]
        restored = set()
        for entry in manifest["layers"]:
            net_index, name = entry["net"], entry["layer"]
            if net_index >= len(nets) or not nets[net_index].has_layer(name):
                logger.warning(
                    "%s: state of layer '%s' (net #%d) has no layer to go to; "
                    "ignored", path, name, net_index,
                )
                continue
            layer = nets[net_index].layer_by_name(name)
            if not callable(getattr(layer, "load_state_dict", None)):
                logger.warning(
                    "%s: layer '%s' cannot load its saved state; ignored", path, name
                )
                continue
            layer.load_state_dict(_decode(entry["state"], arrays))
            restored.add((net_index, name))
        for net_index, name, layer in self._stateful_layers():
            if (net_index, name) not in restored and layer.state_dict():
                logger.warning(
                    "%s: no saved state for layer '%s' (net #%d); it starts "
                    "afresh", path, name, net_index,
                )
        rng.set_state(manifest["rng"])
        smoothing = manifest["smoothing"]
        self._losses = [float(v) for v in smoothing["losses"]]
        self._smoothed_loss = float(smoothing["smoothed_loss"])
        self._window_start = int(smoothing["window_start"])
        self._keep_window = True
