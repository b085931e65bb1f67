"""The solvers: Caffe's training loop, its update rules and snapshots.

* :mod:`netlite.solvers.solver`: the :class:`~netlite.solvers.solver.Solver`
  base (the main loop, test nets, display, callbacks, snapshot/restore);
* :mod:`netlite.solvers.params`: reading, upgrading and checking a
  ``SolverParameter``; :mod:`netlite.solvers.nets`: building its nets;
* :mod:`netlite.solvers.update`: the update every solver type shares;
* :mod:`netlite.solvers.lr_policy`: the learning-rate policies;
* :mod:`netlite.solvers.snapshot`: the ``.caffemodel``/``.solverstate`` pair;
* :mod:`netlite.solvers.registry`: :func:`register_solver`,
  :func:`get_solver`;
* :mod:`netlite.solvers.sgd`: the SGD family (``SGD``, ``Nesterov``,
  ``AdaGrad``, ``RMSProp``, ``AdaDelta``, ``Adam``);
* :mod:`netlite.solvers.errors`: :class:`SolverParameterError`,
  :class:`SolverStateError`.

Importing this package imports :mod:`netlite.solvers.sgd`, which registers
the built-in solver types (as importing :mod:`netlite.layers` registers the
layers); ``import netlite`` does both.  See docs/engine/solvers.md.
"""

from netlite.solvers import sgd  # noqa: F401  (registers the solver types)
