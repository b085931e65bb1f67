r"""The solver types: Caffe's update rules, one class each.

Every class turns the regularised gradient $g$ (the parameter's diff after
``iter_size`` normalisation and weight decay) into the step that
``net.update()`` subtracts, with $\eta$ = ``rate * lr_mult`` (the local
rate), $\mu$ = ``momentum`` and $\delta$ = ``delta``:

* ``SGD``: $h \leftarrow \mu h + \eta g$; step $= h$.  Caffe folds the
  rate into the history, so a rate change does not rescale the momentum.
* ``Nesterov``: $h' = \mu h + \eta g$; step $= (1+\mu) h' - \mu h$.
* ``AdaGrad`` (momentum must be 0): $h \leftarrow h + g^2$;
  step $= \eta g / (\sqrt h + \delta)$.
* ``RMSProp`` (momentum must be 0, $0 \le \rho$ = ``rms_decay`` $< 1$):
  $h \leftarrow \rho h + (1-\rho) g^2$; step $= \eta g / (\sqrt h + \delta)$.
* ``AdaDelta`` ($\mu$ is the decay): $h_1 \leftarrow \mu h_1 + (1-\mu) g^2$;
  $u = g \sqrt{(h_2+\delta)/(h_1+\delta)}$;
  $h_2 \leftarrow \mu h_2 + (1-\mu) u^2$; step $= \eta u$.
* ``Adam`` ($\beta_1$ = ``momentum``, $\beta_2$ = ``momentum2``,
  $t$ = ``iter + 1``): $m \leftarrow \beta_1 m + (1-\beta_1) g$;
  $v \leftarrow \beta_2 v + (1-\beta_2) g^2$;
  step $= \eta \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
  \frac{m}{\sqrt v + \delta}$.

The element-wise operations follow Caffe's sequence of BLAS calls (same
operands, same order, scalars rounded to the solver dtype), so results
agree with Caffe's CPU path up to the rounding of its BLAS.  The code is
written with the blob's array module, so it runs on NumPy and CuPy.  See
docs/engine/solvers.md.
"""

import math

from netlite.solvers.errors import SolverParameterError
from netlite.solvers.registry import register_solver
from netlite.solvers.solver import Solver


@register_solver("SGD")
class SGDSolver(Solver):
    """Stochastic gradient descent with momentum (Caffe's ``SGDSolver``)."""

    def compute_update_value(self, param_id, rate):
        blob = self.net.learnable_params[param_id]
        xp, g = blob.xp, blob.flat_diff
        h = self.history[param_id].flat_data
        tmp = self._update[param_id]
        # h = momentum * h + local_rate * g (Caffe's axpby), then diff = h.
        xp.multiply(g, self.local_rate(param_id, rate), out=tmp)
        h *= self.dtype.type(self.param.momentum)
        h += tmp
        g[...] = h


@register_solver("Nesterov")
class NesterovSolver(SGDSolver):
    """Nesterov's accelerated gradient (Caffe's ``NesterovSolver``)."""

    def compute_update_value(self, param_id, rate):
        blob = self.net.learnable_params[param_id]
        xp, g = blob.xp, blob.flat_diff
        h = self.history[param_id].flat_data
        previous, tmp = self._update[param_id], self._temp[param_id]
        dt = self.dtype.type
        momentum = dt(self.param.momentum)
        xp.copyto(previous, h)
        xp.multiply(g, self.local_rate(param_id, rate), out=tmp)
        h *= momentum
        h += tmp
        # step back, then over-step: (1 + m) h_new - m h_old
        previous *= -momentum
        xp.multiply(h, dt(1) + momentum, out=tmp)
        previous += tmp
        g[...] = previous


@register_solver("AdaGrad")
class AdaGradSolver(SGDSolver):
    """Per-element rates from the sum of squared gradients (Duchi et al.)."""

    def check_param(self):
        if self.param.momentum != 0:
            raise SolverParameterError(
                f"momentum cannot be used with AdaGrad (got {self.param.momentum:g}); "
                "set momentum: 0"
            )

    def compute_update_value(self, param_id, rate):
        blob = self.net.learnable_params[param_id]
        xp, g = blob.xp, blob.flat_diff
        h = self.history[param_id].flat_data
        upd = self._update[param_id]
        xp.multiply(g, g, out=upd)
        h += upd
        xp.sqrt(h, out=upd)
        upd += self.dtype.type(self.param.delta)
        xp.divide(g, upd, out=upd)
        xp.multiply(upd, self.local_rate(param_id, rate), out=g)


@register_solver("RMSProp")
class RMSPropSolver(SGDSolver):
    """Rates from a running mean of squared gradients (Tieleman & Hinton)."""

    def check_param(self):
        p = self.param
        if p.momentum != 0:
            raise SolverParameterError(
                f"momentum cannot be used with RMSProp (got {p.momentum:g}); "
                "set momentum: 0"
            )
        if not 0 <= p.rms_decay < 1:
            raise SolverParameterError(
                f"rms_decay should lie in [0, 1), got {p.rms_decay:g}"
            )

    def compute_update_value(self, param_id, rate):
        blob = self.net.learnable_params[param_id]
        xp, g = blob.xp, blob.flat_diff
        h = self.history[param_id].flat_data
        upd = self._update[param_id]
        dt = self.dtype.type
        decay = dt(self.param.rms_decay)
        xp.multiply(g, g, out=upd)
        upd *= dt(1) - decay
        h *= decay
        h += upd
        xp.sqrt(h, out=upd)
        upd += dt(self.param.delta)
        xp.divide(g, upd, out=upd)
        xp.multiply(upd, self.local_rate(param_id, rate), out=g)


@register_solver("AdaDelta")
class AdaDeltaSolver(SGDSolver):
    """Zeiler's AdaDelta: ``history[i]`` holds the mean squared gradient and
    ``history[P + i]`` the mean squared update (``momentum`` is the decay)."""

    num_history_sets = 2

    def compute_update_value(self, param_id, rate):
        blob = self.net.learnable_params[param_id]
        xp, g = blob.xp, blob.flat_diff
        n_params = len(self.net.learnable_params)
        h_grad = self.history[param_id].flat_data
        h_update = self.history[n_params + param_id].flat_data
        upd, tmp = self._update[param_id], self._temp[param_id]
        dt = self.dtype.type
        momentum, delta = dt(self.param.momentum), dt(self.param.delta)
        xp.multiply(g, g, out=upd)
        upd *= dt(1) - momentum
        h_grad *= momentum
        h_grad += upd
        xp.add(h_update, delta, out=upd)
        xp.add(h_grad, delta, out=tmp)
        xp.divide(upd, tmp, out=upd)
        xp.sqrt(upd, out=upd)
        g *= upd
        xp.multiply(g, g, out=upd)
        upd *= dt(1) - momentum
        h_update *= momentum
        h_update += upd
        g *= self.local_rate(param_id, rate)


@register_solver("Adam")
class AdamSolver(SGDSolver):
    r"""Kingma & Ba's Adam: ``history[i]`` is $m$, ``history[P + i]`` is $v$.

    Weight decay is added to the gradient (L2 in the gradient, not AdamW's
    decoupled decay), and the bias correction multiplies the step with
    $t$ = ``iter + 1``; $\delta$ is not corrected (as Caffe).
    """

    num_history_sets = 2

    def compute_update_value(self, param_id, rate):
        blob = self.net.learnable_params[param_id]
        xp, g = blob.xp, blob.flat_diff
        n_params = len(self.net.learnable_params)
        m = self.history[param_id].flat_data
        v = self.history[n_params + param_id].flat_data
        tmp = self._temp[param_id]
        dt = self.dtype.type
        beta1, beta2 = dt(self.param.momentum), dt(self.param.momentum2)
        t = self.iter + 1
        # Caffe computes the correction in double (pow promotes) and then
        # rounds it to the solver dtype.
        correction = dt(
            math.sqrt(1.0 - float(beta2) ** t) / (1.0 - float(beta1) ** t)
        )
        xp.multiply(g, dt(1) - beta1, out=tmp)
        m *= beta1
        m += tmp
        xp.multiply(g, g, out=tmp)
        tmp *= dt(1) - beta2
        v *= beta2
        v += tmp
        xp.sqrt(v, out=tmp)
        tmp += dt(self.param.delta)
        xp.divide(m, tmp, out=tmp)
        xp.multiply(tmp, self.local_rate(param_id, rate) * correction, out=g)
