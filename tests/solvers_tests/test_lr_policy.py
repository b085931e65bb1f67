"""Learning-rate policies (Caffe's ``SGDSolver::GetLearningRate``).

Every policy is checked against its closed form.  The SolverParameter
fields are float32 in the schema, so the closed forms use the float32
values of base_lr/gamma/power (what Caffe's double solver sees as well);
rates are computed in double, so the comparisons are to 1e-15 relative.
"""

import logging
import math

import numpy as np
import pytest

import netlite
from netlite.io import parse_text
from netlite.proto import netlite_pb2
from netlite.solvers.lr_policy import learning_rate

REL = 1e-15


def f32(x):
    return float(np.float32(x))


def param(text):
    return parse_text(text, netlite_pb2.SolverParameter)


def test_fixed():
    p = param("lr_policy: 'fixed' base_lr: 0.01")
    for it in (0, 1, 999, 123456):
        rate, step = learning_rate(p, it)
        assert rate == f32(0.01)
        assert step == 0


def test_step():
    p = param("lr_policy: 'step' base_lr: 0.01 gamma: 0.1 stepsize: 100")
    for it in (0, 1, 99, 100, 101, 250, 1000):
        rate, step = learning_rate(p, it)
        assert step == it // 100
        assert rate == pytest.approx(f32(0.01) * f32(0.1) ** (it // 100), rel=REL)


def test_exp():
    p = param("lr_policy: 'exp' base_lr: 0.5 gamma: 0.99")
    for it in (0, 1, 10, 500):
        rate, _ = learning_rate(p, it)
        assert rate == pytest.approx(f32(0.5) * f32(0.99) ** it, rel=REL)


_LENET = "lr_policy: 'inv' base_lr: 0.01 gamma: 0.0001 power: 0.75"


def test_inv_lenet_values():
    """LeNet's solver: Caffe's MNIST log shows lr = 0.00992565 at 100."""
    p = param(_LENET)
    for it in (0, 100, 5000, 10000):
        rate, _ = learning_rate(p, it)
        expected = f32(0.01) * (1 + f32(0.0001) * it) ** -f32(0.75)
        assert rate == pytest.approx(expected, rel=REL)
    assert f"{learning_rate(p, 100)[0]:g}" == "0.00992565"
    assert f"{learning_rate(p, 5000)[0]:g}" == "0.00737788"
    assert f"{learning_rate(p, 10000)[0]:g}" == "0.00594604"


_MULTISTEP = """lr_policy: 'multistep' base_lr: 0.01 gamma: 0.9
stepvalue: 5000 stepvalue: 7000 stepvalue: 8000 stepvalue: 9000
stepvalue: 9500"""


def test_multistep_lenet_schedule():
    """lenet_multistep_solver: the rate drops by 0.9 at each step value."""
    p = param(_MULTISTEP)
    values = list(p.stepvalue)
    step = 0
    for it in range(10001):
        rate, step = learning_rate(p, it, step)
        passed = sum(v <= it for v in values)
        assert step == passed, it
        assert rate == pytest.approx(f32(0.01) * f32(0.9) ** passed, rel=REL)


def test_multistep_advances_at_most_one_step_per_call():
    """Caffe's multistep is stateful: a solver that starts (or resumes
    without current_step) past several step values catches up one step per
    iteration."""
    p = param(_MULTISTEP)
    step = 0
    seen = []
    for it in range(9600, 9606):
        rate, step = learning_rate(p, it, step)
        seen.append(step)
        assert rate == pytest.approx(f32(0.01) * f32(0.9) ** step, rel=REL)
    assert seen == [1, 2, 3, 4, 5, 5]


def test_multistep_logs_each_step(caplog):
    p = param(_MULTISTEP)
    with caplog.at_level(logging.INFO, logger="netlite"):
        learning_rate(p, 5000, 0)
    assert "MultiStep Status: Iteration 5000, step = 1" in caplog.text


def test_poly():
    p = param("lr_policy: 'poly' base_lr: 0.1 power: 0.5 max_iter: 1000")
    for it in (0, 1, 250, 999, 1000):
        rate, _ = learning_rate(p, it)
        assert rate == pytest.approx(f32(0.1) * (1 - it / 1000) ** 0.5, rel=REL)
    assert learning_rate(p, 1000)[0] == 0.0


def test_sigmoid():
    p = param("lr_policy: 'sigmoid' base_lr: 0.1 gamma: 0.01 stepsize: 500")
    for it in (0, 250, 500, 750, 5000):
        rate, _ = learning_rate(p, it)
        expected = f32(0.1) / (1 + math.exp(-f32(0.01) * (it - 500)))
        assert rate == pytest.approx(expected, rel=REL)
    assert learning_rate(p, 500)[0] == pytest.approx(f32(0.1) / 2, rel=REL)


@pytest.mark.parametrize("text, message", [
    ("base_lr: 0.1", "lr_policy is not set"),
    ("lr_policy: 'Fixed'", "unknown lr_policy 'Fixed'"),
    ("lr_policy: 'step'", "needs stepsize > 0"),
    ("lr_policy: 'step' stepsize: 10 gamma: -1", "needs gamma >= 0"),
    ("lr_policy: 'inv' gamma: -1", "needs gamma >= 0"),
    ("lr_policy: 'poly'", "needs max_iter > 0"),
    ("lr_policy: 'sigmoid' gamma: 1", "needs stepsize > 0"),
    ("lr_policy: 'multistep' stepvalue: 5 stepvalue: 5",
     "strictly increasing"),
])
def test_bad_policies(text, message):
    with pytest.raises(netlite.SolverParameterError, match=message):
        learning_rate(param(text), 0)


# -------------------------------------------------- through a real solver
_NO_PARAMS_NET = """net_param {
  name: 'empty'
  layer { name: 'in' type: 'Input' top: 'x' input_param { shape { dim: 1 } } }
}"""


def _solver(policy_text, extra=""):
    return netlite.get_solver(
        f"{policy_text} {extra} max_iter: 10000 {_NO_PARAMS_NET}"
    )


def test_solver_logs_lenet_rate_at_iteration_100(caplog):
    solver = _solver(_LENET, "display: 100 momentum: 0.9 weight_decay: 0.0005")
    with caplog.at_level(logging.INFO, logger="netlite"):
        solver.step(101)
    assert "Iteration 100, lr = 0.00992565" in caplog.text
    assert "Iteration 0, lr = 0.01" in caplog.text


@pytest.mark.parametrize("policy_text", [
    "lr_policy: 'fixed' base_lr: 0.01",
    "lr_policy: 'step' base_lr: 0.01 gamma: 0.5 stepsize: 3",
    "lr_policy: 'exp' base_lr: 0.01 gamma: 0.9",
    _LENET,
    "lr_policy: 'multistep' base_lr: 0.01 gamma: 0.5 stepvalue: 2 stepvalue: 5",
    "lr_policy: 'poly' base_lr: 0.01 power: 2",
    "lr_policy: 'sigmoid' base_lr: 0.01 gamma: 0.3 stepsize: 4",
], ids=["fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid"])
def test_solver_uses_the_policy_each_iteration(policy_text):
    """The rate the solver applies at iteration i is the policy's rate at i
    (starting from 0), and current_step follows it."""
    solver = _solver(policy_text)
    rates = []
    solver.add_callback(on_iteration=lambda it, loss, sm, lr: rates.append((it, lr)))
    solver.step(8)
    step = 0
    for it, rate in rates:
        expected, step = learning_rate(solver.param, it, step)
        assert rate == expected
    assert [it for it, _ in rates] == list(range(8))
    assert solver.current_step == step
