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

This module holds the :class:`Solver` class (construction, the main loop,
test nets, display, callbacks); its parts live beside it in
:mod:`netlite.solvers`:

* :mod:`netlite.solvers.params`: reading, upgrading and checking the
  ``SolverParameter``;
* :mod:`netlite.solvers.nets`: building the train and test nets;
* :mod:`netlite.solvers.update`: the shared update (``apply_update``:
  clipping, normalisation, weight decay) and the history blobs;
* :mod:`netlite.solvers.lr_policy`: the learning-rate policies;
* :mod:`netlite.solvers.snapshot`: the ``.caffemodel``/``.solverstate``
  files;
* :mod:`netlite.solvers.registry`: :func:`register_solver` and
  :func:`get_solver`, which picks the class from the ``type`` field;
* :mod:`netlite.solvers.sgd`: the update rule of each solver type.

See docs/engine/solvers.md for the formulas and what the snapshot files
hold.

The pycaffe-shaped API::

    solver = netlite.get_solver("lenet_solver.prototxt")
    solver.step(100)            # or solver.solve(resume_file=None)
    solver.net, solver.test_nets, solver.iter, solver.lr
    path = solver.snapshot()    # "<prefix>_iter_<N>.solverstate"
    solver.restore(path)
    solver = netlite.SGDSolver("lenet_solver.prototxt")   # a given class
"""

import logging
import os
import time

import numpy as np

from netlite import backend, io, rng
from netlite.proto import netlite_pb2
from netlite.solvers.lr_policy import learning_rate
from netlite.solvers.nets import build_test_nets, build_train_net
from netlite.solvers.params import check_solver_param, read_solver
from netlite.solvers.snapshot import (
    capture_state,
    load_netlite_state,
    read_solver_state,
    resolve_learned_net,
    write_snapshot,
)
from netlite.solvers.update import SolverUpdate, sigint_deferred

logger = logging.getLogger("netlite")


# ----------------------------------------------------------------- Solver
class Solver(SolverUpdate):
    """Base class: Caffe's ``Solver`` plus the shared part of ``SGDSolver``
    (inherited from :class:`netlite.solvers.update.SolverUpdate`).

    Subclasses (:mod:`netlite.solvers.sgd`) set :attr:`num_history_sets`,
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

    #: The registered ``type`` string (set by
    #: :func:`netlite.solvers.registry.register_solver`).
    type = None

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
        check_solver_param(param)
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
        self.net = build_train_net(param, solver_file, self.dtype)
        self.test_nets = build_test_nets(param, solver_file, self.dtype, self.net)
        logger.info("Solver scaffolding done.")
        self._losses, self._smoothed_loss, self._window_start = [], 0.0, 0
        self._keep_window = False
        self._resume_point = None
        self._init_history()

    def check_param(self):
        """Type-specific checks (Caffe's ``constructor_sanity_check``)."""

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
                with sigint_deferred():
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

    @property
    def lr(self):
        """The learning rate the next update will use (pycaffe's
        ``solver.lr``); reading it changes nothing."""
        return learning_rate(self.param, self.iter, self.current_step)[0]

    def share_weights(self, net):
        """Make ``net``'s same-named layers use the train net's parameters
        (pycaffe's ``solver.share_weights(net)``)."""
        net.share_trained_layers_with(self.net)

    def _output_arrays(self, net=None):
        net = net or self.net
        return [(name, backend.to_numpy(net.blobs[name].data))
                for name in net.outputs]

    def _log_outputs(self, net, kind, outputs):
        weights = net.blob_loss_weights
        index = 0
        for name, values in outputs:
            weight = weights.get(name, 0.0)
            for v in np.ravel(values):
                suffix = f" (* {weight:g} = {weight * v:g} loss)" if weight else ""
                logger.info(
                    "    %s net output #%d: %s = %g%s", kind, index, name, v, suffix
                )
                index += 1

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
    def snapshot(self):
        """Write ``<prefix>_iter_<N>.caffemodel`` and ``.solverstate``.

        Returns
        -------
        str
            The path of the ``.solverstate`` file.
        """
        return self._write_snapshot(self._extra_state())

    def _write_snapshot(self, extra):
        model_path, state_path = write_snapshot(
            self.param, self.net, self.iter, self.current_step, self.history,
            extra,
        )
        self._fire("on_snapshot", self.iter, model_path, state_path)
        return state_path

    def _extra_state(self):
        """What a bit-exact resume needs beyond Caffe's SolverState."""
        return capture_state(
            [self.net, *self.test_nets],
            {
                "losses": list(self._losses),
                "smoothed_loss": self._smoothed_loss,
                "window_start": self._window_start,
            },
        )

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
        state = read_solver_state(path, self.history, self.type)
        if state.HasField("learned_net"):
            self.net.copy_from(resolve_learned_net(state.learned_net, path))
        for proto, blob in zip(state.history, self.history):
            blob.from_proto(proto, reshape=False)
        self.iter = state.iter
        self.current_step = state.current_step
        if state.HasField("netlite_state"):
            smoothing = load_netlite_state(
                state.netlite_state, path, [self.net, *self.test_nets]
            )
            self._losses = smoothing["losses"]
            self._smoothed_loss = smoothing["smoothed_loss"]
            self._window_start = smoothing["window_start"]
            self._keep_window = True
        else:
            logger.info(
                "%s has no netlite state: data-layer positions and the RNG are "
                "not restored (as in Caffe)", path,
            )
        self._resume_point = None
        logger.info("%s: restored iteration %d", type(self).__name__, self.iter)
