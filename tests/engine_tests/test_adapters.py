"""The layer pattern, enforced: engines are adapters beside their layer.

* every engine module ``layers/<m>_numba.py`` / ``<m>_cupy.py`` defines the
  adapter class :meth:`netlite.layer.Layer.adapter` looks for
  (``<Type>Numba`` / ``<Type>CuPy``, an ``EngineAdapter``), and every layer
  whose class overrides an engine hook has that module;
* no code in ``layers/`` reads or writes another object's private
  attributes (``obj._name`` where ``obj`` is not ``self``);
* a layer file hands an engine over in two lines per hook.
"""

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import netlite
from netlite.layer import ENGINE_HOOKS, EngineAdapter, Layer

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ROOT / "layers"
SUFFIX = {"numba": "Numba", "cupy": "CuPy"}


def _zoo():
    """(type, class, module stem) of every layer of netlite.layers."""
    out = []
    for name in netlite.layer_types():
        cls = netlite.layer_class(name)
        if cls.__module__.startswith("netlite.layers."):
            out.append((name, cls, cls.__module__.rsplit(".", 1)[1]))
    return out


def _hooked(engine):
    """The classes that define that engine's forward hook, as ``(type,
    class, module stem)``: a subclass that inherits the hook (FocalLoss from
    SoftmaxWithLoss) is served by its owner's adapter (``Layer.adapter``)."""
    hook = ENGINE_HOOKS[engine][0]
    owners = {}
    for _, cls, _ in _zoo():
        owner = next(c for c in cls.__mro__ if hook in vars(c))
        if owner is not Layer:
            owners[owner] = (owner.type, owner, owner.__module__.rsplit(".", 1)[1])
    return sorted(owners.values(), key=lambda t: t[0])


@pytest.mark.parametrize("type_name, cls, stem", _hooked("numba"),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_numba_hooks_have_their_adapter(type_name, cls, stem):
    module = importlib.import_module(f"netlite.layers.{stem}_numba")
    adapter = getattr(module, f"{type_name}Numba", None)
    assert adapter is not None, f"layers/{stem}_numba.py lacks {type_name}Numba"
    assert issubclass(adapter, EngineAdapter)


def test_cupy_modules_define_their_adapter():
    # CuPy may be absent: import each module against a stub that records
    # the kernels it would build (nothing is built at import time).
    hooked = {stem: name for name, _, stem in _hooked("cupy")}
    modules = sorted(p.stem for p in LAYERS.glob("*_cupy.py"))
    assert sorted(f"{s}_cupy" for s in hooked) == modules
    code = (
        "import sys, types\n"
        "stub = types.ModuleType('cupy')\n"
        "stub.ElementwiseKernel = lambda *a, **k: None\n"
        "sys.modules['cupy'] = stub\n"
        "import importlib\n"
        "from netlite.layer import EngineAdapter\n"
        f"for stem, name in {sorted(hooked.items())!r}:\n"
        "    m = importlib.import_module(f'netlite.layers.{stem}_cupy')\n"
        "    assert issubclass(getattr(m, name + 'CuPy'), EngineAdapter), stem\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                            text=True, cwd=ROOT / "tests")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_every_engine_module_serves_a_hooked_layer():
    for engine in SUFFIX:
        hooked = {stem for _, _, stem in _hooked(engine)}
        for path in LAYERS.glob(f"*_{engine}.py"):
            stem = path.stem[: -len(engine) - 1]
            assert stem in hooked, (
                f"{path.name}: layers/{stem}.py does not hand its {engine} "
                "hooks to an adapter")


def _private_accesses(path):
    """``(line, text)`` of every ``x._name`` in a file where ``x`` is not
    ``self`` (nor ``cls``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name)
                         and node.value.id in ("self", "cls"))):
            found.append((node.lineno, ast.unparse(node)))
    return found


@pytest.mark.parametrize("path", sorted(LAYERS.glob("*.py")), ids=lambda p: p.name)
def test_no_private_attribute_of_another_object(path):
    assert _private_accesses(path) == []


def test_the_private_access_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f(self, other):\n    return other._buffers, self._ok\n")
    assert _private_accesses(bad) == [(2, "other._buffers")]


@pytest.mark.parametrize("type_name, cls, stem", _hooked("numba") + _hooked("cupy"),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_hooks_are_two_lines(type_name, cls, stem):
    for hooks in ENGINE_HOOKS.values():
        for hook in hooks:
            if hook.endswith("_cpu") or hook not in vars(cls):
                continue
            source = inspect.getsource(getattr(cls, hook)).strip().splitlines()
            assert len(source) == 2 and "self.adapter(" in source[1], (
                f"{cls.__name__}.{hook} should hand over to its adapter in "
                f"two lines:\n" + "\n".join(source))
