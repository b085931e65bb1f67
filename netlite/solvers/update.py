"""The update every solver type shares: Caffe's ``SGDSolver::ApplyUpdate``.

:class:`SolverUpdate` is the half of :class:`netlite.solvers.solver.Solver`
that turns the accumulated gradients into a parameter step, in Caffe's
order: the learning rate from the policy (:mod:`netlite.solvers.lr_policy`),
global gradient clipping, ``iter_size`` normalisation, L2/L1 weight decay,
the solver type's ``compute_update_value`` (:mod:`netlite.solvers.sgd`),
``W -= diff`` and ``iter += 1``.  It also owns the history blobs the
update rules keep and their work buffers.  :func:`sigint_deferred` keeps
Ctrl-C from landing in the middle of an update.  See docs/engine/solvers.md
§4.
"""

import contextlib
import logging
import math
import signal
import threading

from netlite.blob import Blob
from netlite.solvers.lr_policy import learning_rate

logger = logging.getLogger("netlite")


@contextlib.contextmanager
def sigint_deferred():
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


class SolverUpdate:
    """Mixin of :class:`netlite.solvers.solver.Solver`: the update and its
    history.

    Uses the solver's ``param``, ``net``, ``dtype``, ``iter`` and
    ``current_step``; subclasses set :attr:`num_history_sets` and
    implement :meth:`compute_update_value`.
    """

    #: History blobs per learnable parameter.
    num_history_sets = 1

    def _init_history(self):
        params = self.net.learnable_params
        self.history = [
            Blob(p.shape, dtype=self.dtype, device=p.device)
            for _ in range(self.num_history_sets) for p in params
        ]
        # Work buffers, as Caffe's update_/temp_ (no allocation per update).
        self._update = [p.xp.zeros(p.count, dtype=self.dtype) for p in params]
        self._temp = [p.xp.zeros(p.count, dtype=self.dtype) for p in params]

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
