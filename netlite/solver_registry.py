"""The solver-type registry and :func:`get_solver`.

Every solver class is registered under its Caffe ``type`` string with
:func:`register_solver` (as layers are with
:func:`netlite.registry.register_layer`); the built-in types of
:mod:`netlite.sgd_solvers` are registered on first use.  :func:`get_solver`
reads a ``SolverParameter`` and builds the class its ``type`` (or the
deprecated ``solver_type`` enum) names.
"""

import numpy as np

from netlite import io
from netlite.solver_param import SolverParameterError, solver_type_name

_SOLVERS = {}


def register_solver(type_name):
    """Class decorator: register a :class:`netlite.solver.Solver` subclass
    under ``type``.

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
    type_name = solver_type_name(io.read_solver_param(solver))
    return solver_class(type_name)(solver, dtype=dtype)
