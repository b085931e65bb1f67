r"""Caffe's learning-rate policies (``SGDSolver::GetLearningRate``).

:data:`LR_POLICIES` names the policies; :func:`check_lr_policy` checks that
the parameters a policy needs are there and valid (the solver calls it when
it is built).  :func:`learning_rate` is a pure function of the parameters,
the iteration and the ``step``/``multistep`` position (``current_step``,
which the solver keeps and saves in its snapshots); the solver calls it once
per update.  See docs/engine/solvers.md §5.
"""

import logging
import math

from netlite.solvers.errors import SolverParameterError

logger = logging.getLogger("netlite")

#: The learning-rate policies Caffe knows (``SolverParameter.lr_policy``).
LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")


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
