"""Reading, upgrading and checking a ``SolverParameter``.

Everything the :class:`netlite.solvers.solver.Solver` does with its
parameters before it builds its nets:

* :func:`read_solver` reads a prototxt path, text or message and applies
  Caffe's upgrades: the deprecated ``solver_type`` enum becomes the ``type``
  string (:func:`upgrade_solver_type`) and, for a solver file,
  ``snapshot_prefix`` gets Caffe's default (:func:`upgrade_snapshot_prefix`);
* :func:`check_solver_param` raises :class:`SolverParameterError` for
  parameters Caffe would CHECK-fail on (at construction, where Caffe often
  finds them at the first update), the learning-rate policy included
  (:func:`netlite.solvers.lr_policy.check_lr_policy`);
* :func:`snapshot_filename` is the ``<prefix>_iter_<N><ext>`` rule.

The nets are built by :mod:`netlite.solvers.nets`.  See
docs/engine/solvers.md §2.
"""

import logging
import os

from google.protobuf import message as pb_message

from netlite import io
from netlite.proto import netlite_pb2
from netlite.solvers.errors import SolverParameterError
from netlite.solvers.lr_policy import check_lr_policy

logger = logging.getLogger("netlite")

#: Caffe's deprecated ``solver_type`` enum -> the ``type`` string.
_SOLVER_TYPE_NAMES = {
    netlite_pb2.SolverParameter.SGD: "SGD",
    netlite_pb2.SolverParameter.NESTEROV: "Nesterov",
    netlite_pb2.SolverParameter.ADAGRAD: "AdaGrad",
    netlite_pb2.SolverParameter.RMSPROP: "RMSProp",
    netlite_pb2.SolverParameter.ADADELTA: "AdaDelta",
    netlite_pb2.SolverParameter.ADAM: "Adam",
}


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
