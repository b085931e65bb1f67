r"""Caffe's learning-rate policies (``SGDSolver::GetLearningRate``).

:func:`learning_rate` is a pure function of the parameters, the iteration
and the ``step``/``multistep`` position (``current_step``, which the solver
keeps and saves in its snapshots); the solver calls it once per update.
The policy names and their required fields are checked by
:func:`netlite.solver_param.check_lr_policy`.  See docs/engine/solvers.md §5.
"""

import logging
import math

from netlite.solver_param import LR_POLICIES, check_lr_policy

logger = logging.getLogger("netlite")

__all__ = ["LR_POLICIES", "check_lr_policy", "learning_rate"]


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
