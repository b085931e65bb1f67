"""The Layer base class: blob-count contract, life-cycle, loss weights,
param_propagate_down and engine dispatch (toy layers, no zoo needed)."""

import os
import subprocess
import sys

import numpy as np
import pytest

import netlite
from netlite import Blob, backend
from netlite.errors import LayerSetupError
from netlite.layer import Layer, LossLayer, NeuronLayer


class RecordingLayer(Layer):
    """Identity layer that records the order of its life-cycle calls."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def layer_setup(self, bottom, top):
        self.calls.append(("layer_setup", None))

    def reshape(self, bottom, top):
        for b, t in zip(bottom, top):
            t.reshape_like(b)
        # What the top diffs hold when reshape runs (the loss-weight seed
        # must not be there yet during setup).
        self.calls.append(("reshape", [t.diff.copy() for t in top]))

    def forward_cpu(self, bottom, top):
        self.calls.append(("forward_cpu", None))
        for b, t in zip(bottom, top):
            t.data[...] = b.data

    def forward_numba(self, bottom, top):
        self.calls.append(("forward_numba", None))
        self.forward_cpu(bottom, top)

    def backward_cpu(self, top, propagate_down, bottom):
        self.calls.append(("backward_cpu", list(propagate_down)))

    def backward_numba(self, top, propagate_down, bottom):
        self.calls.append(("backward_numba", list(propagate_down)))


def _blobs(*shapes, dtype=np.float32):
    return [Blob(s, dtype=dtype) for s in shapes]


def _names(layer):
    return [name for name, _ in layer.calls]


# ------------------------------------------------------------ blob counts
class Exact(RecordingLayer):
    exact_num_bottom_blobs = 2
    exact_num_top_blobs = 1


class MinMax(RecordingLayer):
    min_bottom_blobs = 1
    max_bottom_blobs = 2
    min_top_blobs = 1
    max_top_blobs = 3


class Equal(RecordingLayer):
    equal_num_bottom_top_blobs = True


@pytest.mark.parametrize("cls, nb, nt, expected", [
    (Exact, 1, 1, "takes exactly 2 bottom blob(s), got 1"),
    (Exact, 3, 1, "takes exactly 2 bottom blob(s), got 3"),
    (Exact, 2, 0, "produces exactly 1 top blob(s), got 0"),
    (Exact, 2, 2, "produces exactly 1 top blob(s), got 2"),
    (MinMax, 0, 1, "takes at least 1 bottom blob(s), got 0"),
    (MinMax, 3, 1, "takes at most 2 bottom blob(s), got 3"),
    (MinMax, 1, 0, "produces at least 1 top blob(s), got 0"),
    (MinMax, 1, 4, "produces at most 3 top blob(s), got 4"),
    (Equal, 2, 1, "needs as many tops as bottoms, got 2 bottom(s) and 1 top(s)"),
])
def test_blob_count_contract_errors_name_the_layer(cls, nb, nt, expected):
    layer = cls(f"name: 'toy' type: '{cls.__name__}'")
    with pytest.raises(LayerSetupError) as info:
        layer.setup(_blobs(*[(2,)] * nb), _blobs(*[None] * nt))
    message = str(info.value)
    assert message.startswith(f"{cls.__name__} layer 'toy' ")
    assert expected in message
    assert layer.calls == []  # nothing ran before the check


@pytest.mark.parametrize("cls, nb, nt", [
    (Exact, 2, 1), (MinMax, 1, 1), (MinMax, 2, 3), (Equal, 3, 3),
])
def test_blob_count_contract_accepts_valid_counts(cls, nb, nt):
    layer = cls("name: 'ok'")
    layer.setup(_blobs(*[(2,)] * nb), _blobs(*[None] * nt))
    assert "reshape" in _names(layer)


def test_describe_without_name_or_type():
    assert RecordingLayer().describe() == "RecordingLayer layer '<unnamed>'"
    assert RecordingLayer("name: 'a' type: 'T'").describe() == "T layer 'a'"


# -------------------------------------------------------------- life-cycle
def test_setup_order_and_loss_weight_last(dtype):
    layer = RecordingLayer("name: 'r' loss_weight: 2.5")
    bottom, top = _blobs((2, 3), dtype=dtype), _blobs(None, dtype=dtype)
    layer.setup(bottom, top)
    assert _names(layer) == ["layer_setup", "reshape"]
    # The loss-weight seed is written after reshape, into the shaped top.
    assert not layer.calls[1][1][0].any()
    assert top[0].shape == (2, 3)
    np.testing.assert_array_equal(top[0].diff, np.full((2, 3), 2.5))
    assert layer.loss(0) == 2.5 and layer.loss(1) == 0.0
    assert layer.loss_weights == [2.5]


def test_setup_takes_dtype_and_device_from_bottom():
    layer = RecordingLayer()
    assert layer.dtype == np.float32
    layer.setup(_blobs((2,), dtype=np.float64), _blobs(None, dtype=np.float64))
    assert layer.dtype == np.float64 and layer.device == "cpu" and layer.xp is np


def test_forward_reshapes_first_and_returns_weighted_loss(dtype):
    layer = RecordingLayer("loss_weight: 2 loss_weight: 0 loss_weight: -3")
    bottom = _blobs((3,), (2, 2), (2,), dtype=dtype)
    top = _blobs(None, None, None, dtype=dtype)
    layer.setup(bottom, top)
    bottom[0].data = [1, 2, 3]
    bottom[1].data = [[1, 1], [1, 1]]
    bottom[2].data = [0.5, 1.5]
    layer.calls.clear()
    loss = layer.forward(bottom, top)
    assert _names(layer) == ["reshape", "forward_cpu"]
    # sum_t dot(top_t.data, top_t.diff) over weighted tops only.
    assert loss == pytest.approx(2 * 6 + (-3) * 2)
    assert not top[1].diff.any()  # a zero weight leaves the diff alone
    np.testing.assert_array_equal(top[2].diff, [-3, -3])


def test_forward_without_loss_weight_returns_zero():
    layer = RecordingLayer()
    bottom, top = _blobs((4,)), _blobs(None)
    layer.setup(bottom, top)
    bottom[0].data = [1, 2, 3, 4]
    assert layer.forward(bottom, top) == 0.0


def test_loss_weight_count_mismatch():
    layer = RecordingLayer("name: 'lw' type: 'Toy' loss_weight: 1 loss_weight: 2")
    with pytest.raises(LayerSetupError, match=(
            r"Toy layer 'lw': loss_weight must be unspecified or given once per "
            r"top blob \(1 tops, 2 weights\)")):
        layer.setup(_blobs((2,)), _blobs(None))


def test_backward_checks_propagate_down_length():
    layer = RecordingLayer("name: 'pd'")
    bottom, top = _blobs((2,), (2,)), _blobs(None, None)
    layer.setup(bottom, top)
    with pytest.raises(ValueError, match="propagate_down has 1 entries for 2"):
        layer.backward(top, [True], bottom)
    layer.backward(top, [True, False], bottom)
    assert layer.calls[-1] == ("backward_cpu", [True, False])


def test_base_layer_methods_raise_clearly():
    layer = Layer("name: 'bare' type: 'Bare'")
    with pytest.raises(NotImplementedError, match="Bare layer 'bare'.*reshape"):
        layer.setup([], _blobs(None))
    with pytest.raises(NotImplementedError, match="has no forward"):
        layer.forward_cpu([], [])
    with pytest.raises(NotImplementedError, match="has no backward"):
        layer.backward_cpu([], [True], [])
    layer.backward_cpu([], [False], [])  # nothing asked, nothing to do


def test_params_from_layer_parameter_blobs_are_kept():
    class WithParam(RecordingLayer):
        def layer_setup(self, bottom, top):
            super().layer_setup(bottom, top)
            if not self.blobs:
                self.blobs = [self.make_blob((3,))]
                self.fill_blob(self.blobs[0], netlite.io.FillerParameter(
                    type="constant", value=7))

    fresh = WithParam()
    fresh.setup(_blobs((2,), dtype=np.float64), _blobs(None, dtype=np.float64))
    np.testing.assert_array_equal(fresh.blobs[0].data, [7, 7, 7])
    assert fresh.blobs[0].dtype == np.float64
    assert fresh.param_propagate_down == [True]

    stored = WithParam("blobs { shape { dim: 3 } data: 1 data: 2 data: 3 }")
    stored.setup(_blobs((2,)), _blobs(None))
    np.testing.assert_array_equal(stored.blobs[0].data, [1, 2, 3])
    # A second setup does not recreate (or refill) the parameters.
    stored.blobs[0].data[0] = 9
    stored.setup(_blobs((2,)), _blobs(None))
    assert stored.blobs[0].data[0] == 9


# --------------------------------------------------------------- LossLayer
class ToyLoss(LossLayer):
    max_top_blobs = 2
    exact_num_top_blobs = -1
    min_top_blobs = 1

    def forward_cpu(self, bottom, top):
        top[0].data[...] = bottom[0].data.sum()


def test_loss_layer_default_weight_is_one_on_top_zero():
    layer = ToyLoss("name: 'l'")
    bottom, top = _blobs((2, 3), (2,)), _blobs(None)
    layer.setup(bottom, top)
    assert top[0].shape == ()
    assert layer.loss(0) == 1.0
    assert float(top[0].diff) == 1.0
    bottom[0].data[...] = 0.5
    assert layer.forward(bottom, top) == pytest.approx(3.0)


def test_loss_layer_second_top_gets_weight_zero():
    layer = ToyLoss("name: 'l2'")
    top = _blobs(None, None)
    layer.setup(_blobs((2, 3), (2,)), top)
    assert list(layer.layer_param.loss_weight) == [1.0, 0.0]
    assert layer.loss(0) == 1.0 and layer.loss(1) == 0.0


def test_loss_layer_explicit_weight_wins():
    layer = ToyLoss("loss_weight: 0.25")
    top = _blobs(None)
    layer.setup(_blobs((2, 3), (2,)), top)
    assert layer.loss(0) == 0.25 and float(top[0].diff) == 0.25


def test_loss_layer_checks_batch_size_and_labels():
    layer = ToyLoss("name: 'bad'")
    with pytest.raises(LayerSetupError, match="same first dimension"):
        layer.setup(_blobs((2, 3), (3,)), _blobs(None))
    assert layer.allow_force_backward(0) and not layer.allow_force_backward(1)
    with pytest.raises(ValueError, match="cannot backpropagate to label inputs"):
        layer.check_no_label_backward([True, True])
    layer.check_no_label_backward([True, False])


def test_neuron_layer_reshapes_top_like_bottom():
    class Twice(NeuronLayer):
        def forward_cpu(self, bottom, top):
            top[0].data[...] = 2 * bottom[0].data

    layer = Twice()
    bottom, top = _blobs((2, 5)), _blobs(None)
    layer.setup(bottom, top)
    assert top[0].shape == (2, 5)
    with pytest.raises(LayerSetupError, match="exactly 1 bottom"):
        Twice().setup(_blobs((1,), (1,)), _blobs(None))


# ---------------------------------------------------- param_propagate_down
def test_param_propagate_down_out_of_range_reads_false():
    layer = RecordingLayer()
    assert layer.propagates_param(0) is False
    assert layer.propagates_param(5) is False


def test_set_param_propagate_down_grows_with_true():
    layer = RecordingLayer()
    layer.set_param_propagate_down(3, False)
    assert layer.param_propagate_down == [True, True, True, False]
    assert layer.propagates_param(2) and not layer.propagates_param(3)
    layer.set_param_propagate_down(0, False)
    assert layer.param_propagate_down == [False, True, True, False]


# ------------------------------------------------------------------ engines
@pytest.mark.parametrize("engine, fwd, bwd", [
    ("numpy", "forward_cpu", "backward_cpu"),
    ("numba", "forward_numba", "backward_numba"),
])
def test_engine_dispatch(engine, fwd, bwd):
    if engine == "numba" and not backend.numba_available():
        pytest.skip("numba missing")
    netlite.set_cpu_engine(engine)
    assert netlite.cpu_engine() == engine
    layer = RecordingLayer()
    bottom, top = _blobs((2,)), _blobs(None)
    layer.setup(bottom, top)
    layer.calls.clear()
    layer.forward(bottom, top)
    layer.backward(top, [True], bottom)
    names = _names(layer)
    assert names[:2] == ["reshape", fwd]
    assert names[-1] == bwd
    if engine == "numpy":
        assert "forward_numba" not in names and "backward_numba" not in names
    else:
        assert "backward_cpu" not in names


@pytest.mark.parametrize("forward_engine, later_engine", [
    ("numpy", "numba"), ("numba", "numpy"),
])
def test_backward_uses_the_forward_engine(forward_engine, later_engine):
    """The engine is chosen per forward; its backward follows it whatever
    the global setting is by then (a fast forward may keep intermediates in
    its own layout).  Without a forward, backward uses the current one."""
    if not backend.numba_available():
        pytest.skip("numba missing")
    hook = {"numpy": "backward_cpu", "numba": "backward_numba"}
    layer = RecordingLayer()
    bottom, top = _blobs((2,)), _blobs(None)
    layer.setup(bottom, top)
    assert layer.engine is None
    netlite.set_cpu_engine(later_engine)
    layer.backward(top, [True], bottom)
    assert _names(layer)[-1] == hook[later_engine]
    netlite.set_cpu_engine(forward_engine)
    layer.forward(bottom, top)
    assert layer.engine == forward_engine
    netlite.set_cpu_engine(later_engine)
    layer.backward(top, [True], bottom)
    layer.backward(top, [True], bottom)
    assert _names(layer)[-2:] == [hook[forward_engine]] * 2
    layer.forward(bottom, top)
    layer.backward(top, [True], bottom)
    assert layer.engine == later_engine
    assert _names(layer)[-1] == hook[later_engine]


def test_default_numba_methods_fall_back_to_reference():
    class CpuOnly(NeuronLayer):
        def forward_cpu(self, bottom, top):
            top[0].data[...] = bottom[0].data + 1

        def backward_cpu(self, top, propagate_down, bottom):
            bottom[0].diff[...] = top[0].diff

    if not backend.numba_available():
        pytest.skip("numba missing")
    netlite.set_cpu_engine("numba")
    layer = CpuOnly()
    bottom, top = _blobs((3,)), _blobs(None)
    layer.setup(bottom, top)
    layer.forward(bottom, top)
    np.testing.assert_array_equal(top[0].data, [1, 1, 1])


@pytest.mark.parametrize("name", ["cupy", "numpy2", "", "gpu"])
def test_set_cpu_engine_rejects_unknown_names(name):
    before = netlite.cpu_engine()
    with pytest.raises(ValueError, match="unknown CPU engine"):
        netlite.set_cpu_engine(name)
    assert netlite.cpu_engine() == before


def test_set_cpu_engine_normalises_case():
    netlite.set_cpu_engine(" NumPy ")
    assert netlite.cpu_engine() == "numpy"


def _engine_in_subprocess(value):
    env = dict(os.environ)
    env["NETLITE_CPU_ENGINE"] = value
    return subprocess.run(
        [sys.executable, "-c", "import netlite; print(netlite.cpu_engine())"],
        capture_output=True, text=True, env=env, timeout=120,
    )


@pytest.mark.parametrize("value, expected", [
    ("numpy", "numpy"), ("numba", "numba"), ("NUMBA", "numba"),
])
def test_env_var_selects_the_engine(value, expected):
    if expected == "numba" and not backend.numba_available():
        pytest.skip("numba missing")
    result = _engine_in_subprocess(value)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_env_var_rejects_unknown_engine():
    result = _engine_in_subprocess("fortran")
    assert result.returncode != 0
    assert "NETLITE_CPU_ENGINE='fortran' is not one of numpy, numba" in result.stderr


# The library's default engine, in fresh processes without NETLITE_CPU_ENGINE
# (tests/conftest.py sets it to numpy for the rest of the suite).
_BLOCK_NUMBA = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'numba':
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""


def _default_in_subprocess(prelude="", env_extra=None, engine=None):
    code = prelude + (
        "import sys, netlite\n"
        "imported = 'numba' in sys.modules\n"
        "print(netlite.cpu_engine(), imported)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NETLITE_CPU_ENGINE"}
    if engine is not None:
        env["NETLITE_CPU_ENGINE"] = engine
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True, text=True, env=env, timeout=120,
    )


def test_default_engine_is_numba():
    """The fast engine by default; resolved on first use, so `import
    netlite` still does not import Numba."""
    if not backend.numba_available():
        pytest.skip("numba missing")
    result = _default_in_subprocess()
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["numba", "False"]


def test_empty_env_var_means_the_default():
    if not backend.numba_available():
        pytest.skip("numba missing")
    result = _default_in_subprocess(engine=" ")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["numba", "False"]


def test_default_engine_without_numba_is_numpy():
    result = _default_in_subprocess(prelude=_BLOCK_NUMBA)
    assert result.returncode == 0, result.stderr  # and no warning (-W error)
    assert result.stdout.split() == ["numpy", "False"]


def test_default_engine_with_a_broken_numba_is_numpy_with_a_warning(tmp_path):
    fake = tmp_path / "numba"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "raise ImportError('Numba needs NumPy 1.x (planted)')\n"
    )
    result = _default_in_subprocess(
        prelude="import warnings; warnings.simplefilter('default')\n",
        env_extra={"PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["numpy", "False"]
    assert "RuntimeWarning: Numba is installed but does not import" in result.stderr
    assert "Numba needs NumPy 1.x (planted)" in result.stderr


def test_numpy_is_one_setting_away_from_the_default():
    result = _default_in_subprocess(engine="numpy")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["numpy", "False"]


def test_cli_runs_on_the_default_engine(tmp_path):
    """`netlite` without --engine uses the library default; --engine numpy
    selects the reference."""
    if not backend.numba_available():
        pytest.skip("numba missing")
    model = tmp_path / "tiny.prototxt"
    model.write_text("""
layer { name: "data" type: "DummyData" top: "x" top: "y"
  dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
  inner_product_param { num_output: 2 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "y" top: "loss" }
""")
    env = {k: v for k, v in os.environ.items() if k != "NETLITE_CPU_ENGINE"}
    for extra, expected in (([], "numba"), (["--engine", "numpy"], "numpy")):
        result = subprocess.run(
            [sys.executable, "-c",
             "import sys; from netlite.tools.cli import main; sys.exit(main())",
             "time", "--model", str(model), "--iterations", "1", *extra],
            capture_output=True, text=True, env=env, timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"Use CPU ({expected} engine)." in result.stdout + result.stderr


def test_suite_runs_on_the_engine_of_the_environment():
    """tests/conftest.py pins the suite to NETLITE_CPU_ENGINE, numpy unless
    set: hand-written tests run on the reference by default."""
    name = os.environ["NETLITE_CPU_ENGINE"].strip().lower()
    assert backend.cpu_engine() == (name or backend.default_cpu_engine())
