"""The solver-type registry and :func:`get_solver`.

Every solver class is registered under its Caffe ``type`` string with
:func:`register_solver` (as layers are with
:func:`netlite.registry.register_layer`, through the same
:class:`netlite.registry.Registry`); the built-in types of
:mod:`netlite.solvers.sgd` are registered when :mod:`netlite.solvers` is
imported (``import netlite`` does).  :func:`get_solver` reads a
``SolverParameter`` and builds the class its ``type`` (or the deprecated
``solver_type`` enum) names.
"""

import numpy as np

from netlite import io
from netlite.registry import Registry
from netlite.solvers.errors import SolverParameterError
from netlite.solvers.params import solver_type_name

#: The solver types (filled by :mod:`netlite.solvers.sgd` on import).
SOLVERS = Registry("solver", SolverParameterError)


def register_solver(type_name):
    """Class decorator: register a :class:`netlite.solvers.solver.Solver`
    subclass under ``type``.

    Raises
    ------
    KeyError
        When ``type_name`` is already registered.
    """
    return SOLVERS.register(type_name)


def solver_types():
    """Sorted list of every registered solver ``type`` string."""
    return SOLVERS.types()


def solver_class(type_name):
    """The class registered under ``type_name``.

    Raises
    ------
    SolverParameterError
        For an unknown type (the message lists the known ones).
    """
    return SOLVERS.lookup(type_name)


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
        ``type`` field, e.g. :class:`netlite.solvers.sgd.SGDSolver`.
    """
    type_name = solver_type_name(io.read_solver_param(solver))
    return solver_class(type_name)(solver, dtype=dtype)
