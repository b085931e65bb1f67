"""The exceptions of the solvers: bad parameters and bad snapshot files."""

from netlite.errors import NetliteError


class SolverParameterError(NetliteError, ValueError):
    """A ``SolverParameter`` is invalid (Caffe would CHECK-fail on it)."""


class SolverStateError(NetliteError, ValueError):
    """A ``.solverstate`` file cannot be read or does not fit the solver."""
