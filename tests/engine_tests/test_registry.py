"""The registries: the generic Registry, layer registration and lookup errors,
the solver registry, and the zoo's import rule."""

import os
import subprocess
import sys

import pytest

import netlite
from netlite import registry
from netlite.errors import UnknownLayerTypeError
from netlite.layer import Layer
from netlite.registry import create_layer, layer_class, layer_types, register_layer
from netlite.solvers import registry as solvers_registry

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


@pytest.fixture
def scratch_registry(monkeypatch):
    """Let a test register toy types without leaking them into other tests."""
    monkeypatch.setattr(registry.LAYERS, "_classes", dict(registry.LAYERS._classes))


def test_builtin_types_are_registered():
    types = layer_types()
    assert types == sorted(types)
    assert {"Input", "Split"} <= set(types)
    assert layer_class("Split").type == "Split"
    assert netlite.layer_types() == types


def test_decorator_registers_and_sets_type(scratch_registry):
    @register_layer("ToyRegistered")
    class ToyLayer(Layer):
        pass

    assert layer_class("ToyRegistered") is ToyLayer
    assert ToyLayer.type == "ToyRegistered"
    assert "ToyRegistered" in layer_types()


def test_duplicate_type_is_an_error(scratch_registry):
    @register_layer("ToyDuplicate")
    class First(Layer):
        pass

    with pytest.raises(KeyError, match="ToyDuplicate.*already registered.*First"):
        @register_layer("ToyDuplicate")
        class Second(Layer):
            pass

    assert layer_class("ToyDuplicate") is First


def test_builtin_type_cannot_be_replaced(scratch_registry):
    with pytest.raises(KeyError, match="'Split' is already registered"):
        @register_layer("Split")
        class MySplit(Layer):
            pass


def test_unknown_type_lists_known_types():
    with pytest.raises(UnknownLayerTypeError) as info:
        layer_class("NoSuchLayer")
    message = str(info.value)
    assert "unknown layer type 'NoSuchLayer'" in message
    assert "known types:" in message
    for known in layer_types():
        assert known in message
    # A KeyError subclass, but printed without KeyError's extra quotes.
    assert isinstance(info.value, KeyError)
    assert not message.startswith('"')


def test_create_layer_from_prototxt_text():
    layer = create_layer(
        "name: 'in' type: 'Input' top: 'x' "
        "input_param { shape { dim: 2 dim: 3 } }"
    )
    assert type(layer) is layer_class("Input")
    assert layer.name == "in"
    assert layer.layer_param.input_param.shape[0].dim == [2, 3]
    top = [netlite.Blob()]
    layer.setup([], top)
    assert top[0].shape == (2, 3)


def test_create_layer_from_message_and_kwargs():
    param = netlite.io.LayerParameter(name="s", type="Split")
    layer = create_layer(param, dtype="float64")
    assert layer.name == "s" and layer.dtype == "float64"
    with pytest.raises(UnknownLayerTypeError, match="'Bogus'"):
        create_layer("name: 'b' type: 'Bogus'")


def test_zoo_refuses_to_be_imported_as_top_level_layers():
    # From the repository root, `import layers` would find the source folder
    # and register every layer a second time; it must fail clearly instead.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "try:\n"
        "    import layers\n"
        "except ImportError as exc:\n"
        "    print('ImportError:', exc)\n"
        "else:\n"
        "    print('imported')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, REPO_ROOT],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("ImportError:"), out
    assert "netlite.layers" in out and "'layers'" in out


def test_registry_class_names_its_kind():
    widgets = registry.Registry("widget", LookupError)

    @widgets.register("Knob")
    class Knob:
        pass

    assert Knob.type == "Knob" and widgets.lookup("Knob") is Knob
    assert widgets.types() == ["Knob"]
    with pytest.raises(KeyError, match=r"widget type 'Knob' is already registered "
                                       r"by .*\.Knob"):
        widgets.register("Knob")(type("Other", (), {}))
    assert widgets.lookup("Knob") is Knob
    with pytest.raises(LookupError,
                       match="unknown widget type 'Dial'; known types: Knob"):
        widgets.lookup("Dial")


def test_layers_and_solvers_use_the_same_registry_class():
    assert type(registry.LAYERS) is registry.Registry
    assert type(solvers_registry.SOLVERS) is registry.Registry
    assert solvers_registry.solver_types() == netlite.solver_types()
    with pytest.raises(netlite.SolverParameterError,
                       match="unknown solver type 'Nope'; known types: AdaDelta, "):
        solvers_registry.solver_class("Nope")
    with pytest.raises(KeyError, match="solver type 'SGD' is already registered by "
                                       "netlite.solvers.sgd.SGDSolver"):
        netlite.register_solver("SGD")(type("MySGD", (netlite.Solver,), {}))
    assert solvers_registry.solver_class("SGD") is netlite.SGDSolver
