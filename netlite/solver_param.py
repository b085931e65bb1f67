"""Reading, upgrading and checking a ``SolverParameter``; building its nets.

Everything the :class:`netlite.solver.Solver` does with its parameters
before the first iteration:

* :func:`read_solver` reads a prototxt path, text or message and applies
  Caffe's upgrades: the deprecated ``solver_type`` enum becomes the ``type``
  string (:func:`upgrade_solver_type`) and, for a solver file,
  ``snapshot_prefix`` gets Caffe's default (:func:`upgrade_snapshot_prefix`);
* :func:`check_solver_param` and :func:`check_lr_policy` raise
  :class:`SolverParameterError` for parameters Caffe would CHECK-fail on
  (at construction, where Caffe often finds them at the first update);
* :func:`build_train_net` and :func:`build_test_nets` pick the nets from
  ``net``/``net_param``/``train_net``/``test_net``..., merge the NetStates
  and copy the ``weights`` files in;
* :func:`snapshot_filename` is the ``<prefix>_iter_<N><ext>`` rule.

See docs/engine/solvers.md §2.
"""

import logging
import os

from google.protobuf import message as pb_message

from netlite import io
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


class SolverParameterError(NetliteError, ValueError):
    """A ``SolverParameter`` is invalid (Caffe would CHECK-fail on it)."""


# ---------------------------------------------------------------- reading
def solver_type_name(param):
    """The solver ``type`` a (possibly not upgraded) ``param`` asks for.

    The deprecated ``solver_type`` enum counts when ``type`` is not set.
    """
    if param.HasField("solver_type") and not param.HasField("type"):
        return _SOLVER_TYPE_NAMES[param.solver_type]
    return param.type


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


def snapshot_filename(param, iteration, extension):
    """``<snapshot_prefix>_iter_<iteration><extension>``, as Caffe."""
    return f"{param.snapshot_prefix}_iter_{iteration}{extension}"


# --------------------------------------------------------------- checking
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


def check_solver_param(param):
    """The checks every solver type shares (the nets are checked as they
    are built, the type-specific ones by ``Solver.check_param``).

    Raises
    ------
    SolverParameterError
        For the first problem found.
    """
    p = param
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
        _check_snapshot_writable(p)


def _check_snapshot_writable(param):
    # Caffe probes the prefix at start-up so that a bad path fails now,
    # not at the first snapshot thousands of iterations later.
    directory = os.path.dirname(os.path.abspath(snapshot_filename(param, 0, "")))
    probe = directory
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not (os.path.isdir(probe) and os.access(probe, os.W_OK | os.X_OK)):
        raise SolverParameterError(
            f"cannot write snapshots with snapshot_prefix "
            f"'{param.snapshot_prefix}': {probe} is not a writable "
            "directory"
        )


# ------------------------------------------------------------- the nets
def _resolve_net_file(name, solver_file):
    if os.path.isfile(name):
        return name
    tried = [os.path.abspath(name)]
    if solver_file and not os.path.isabs(name):
        candidate = os.path.join(os.path.dirname(solver_file), name)
        if os.path.isfile(candidate):
            return candidate
        tried.append(os.path.abspath(candidate))
    raise FileNotFoundError(
        f"net file '{name}' not found (tried {', '.join(tried)})"
    )


def _read_net_file(name, solver_file):
    return io.read_net_param(_resolve_net_file(name, solver_file))


def _build_net(net_param, phase, state_override, dtype):
    # Caffe's precedence: solver default phase < the net's own state <
    # train_state/test_state.
    state = netlite_pb2.NetState(phase=phase)
    state.MergeFrom(net_param.state)
    if state_override is not None:
        state.MergeFrom(state_override)
    return Net(
        net_param, phase=state.phase, dtype=dtype, level=state.level,
        stages=list(state.stage),
    )


def _load_weights(param, net):
    for entry in param.weights:
        for path in entry.split(","):
            path = path.strip()
            if path:
                logger.info("Finetuning from %s", path)
                net.copy_from(path)


def build_train_net(param, solver_file, dtype):
    """The train net (phase TRAIN) with the ``weights`` files copied in.

    Relative net paths are looked up in the current directory, then beside
    ``solver_file``.
    """
    p = param
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
        net_param = _read_net_file(p.train_net, solver_file)
    elif field == "net_param":
        logger.info("Creating training net specified in net_param.")
        net_param = p.net_param
    else:
        logger.info("Creating training net from net file: %s", p.net)
        net_param = _read_net_file(p.net, solver_file)
    override = p.train_state if p.HasField("train_state") else None
    net = _build_net(net_param, TRAIN, override, dtype)
    _load_weights(p, net)
    return net


def build_test_nets(param, solver_file, dtype, train_net):
    """The test nets (phase TEST), in Caffe's order, sharing ``train_net``'s
    trained layers."""
    p = param
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
        sources.append(
            (f"test_net file: {name}", _read_net_file(name, solver_file))
        )
    remaining = count - len(sources)
    if remaining and p.HasField("net_param"):
        sources += [("net_param", p.net_param)] * remaining
    elif remaining:
        shared = _read_net_file(p.net, solver_file)
        sources += [(f"net file: {p.net}", shared)] * remaining
    test_nets = []
    for i, (what, net_param) in enumerate(sources):
        logger.info("Creating test net (#%d) specified by %s", i, what)
        override = p.test_state[i] if p.test_state else None
        test_net = _build_net(net_param, TEST, override, dtype)
        test_net.debug_info = p.debug_info
        _load_weights(p, test_net)
        test_net.share_trained_layers_with(train_net)
        test_nets.append(test_net)
    return test_nets
