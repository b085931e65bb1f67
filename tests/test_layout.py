"""The project's layout rules, enforced.

* every registered layer type has its module in layers/, a test file
  tests/layer_tests/test_<module>.py and a derivation page
  docs/layers/<module>.md;
* every kernel module (<m>_numba.py, <m>_cupy.py) sits beside a layer <m>.py;
* every package under netlite/ and layers/ is listed in setup.cfg (an
  unlisted sub-package is silently left out of the wheel), so layers/ stays
  flat unless its sub-package is listed;
* `import netlite` pulls in neither numba nor cupy.
"""

import configparser
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

import netlite

ROOT = Path(__file__).resolve().parent.parent


def _layer_modules():
    """{type: module stem} for the zoo's layers.

    Test modules may register their own toy layers (a solver test's array
    data layer, say); those live outside netlite.layers and are not part of
    the zoo, so they are left out here.
    """
    out = {}
    for type_name in netlite.layer_types():
        module = inspect.getmodule(netlite.layer_class(type_name)).__name__
        if module.startswith("netlite.layers."):
            out[type_name] = module.rsplit(".", 1)[1]
    return out


def test_every_layer_module_registers_a_layer():
    registered = set(_layer_modules().values())
    for path in (ROOT / "layers").glob("*.py"):
        stem = path.stem
        if stem.startswith("_") or stem.endswith(("_numba", "_cupy")):
            continue
        assert stem in registered, f"layers/{path.name} registers no layer type"


@pytest.mark.parametrize("type_name", sorted(_layer_modules()))
def test_layer_has_module_test_and_page(type_name):
    module = _layer_modules()[type_name]
    assert (ROOT / "layers" / f"{module}.py").is_file()
    test_file = ROOT / "tests" / "layer_tests" / f"test_{module}.py"
    assert test_file.is_file(), f"{type_name}: missing {test_file.relative_to(ROOT)}"
    page = ROOT / "docs" / "layers" / f"{module}.md"
    assert page.is_file(), f"{type_name}: missing {page.relative_to(ROOT)}"
    text = page.read_text(encoding="utf-8")
    assert type_name in text, f"{page.name} never names the type {type_name!r}"


def test_kernel_modules_sit_beside_their_layer():
    for path in (ROOT / "layers").glob("*.py"):
        for suffix in ("_numba", "_cupy"):
            if path.stem.endswith(suffix):
                layer = path.stem[: -len(suffix)]
                assert (ROOT / "layers" / f"{layer}.py").is_file(), path.name


def test_every_package_is_listed_in_setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    for folder, name in (("netlite", "netlite"), ("layers", "netlite.layers")):
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            package = ".".join([name, *rel.parts])
            assert package in listed, f"{package} is not listed in setup.cfg"


def test_import_netlite_needs_neither_numba_nor_cupy():
    code = (
        "import sys, netlite; "
        "bad = [m for m in ('numba', 'cupy') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True,
        env={**os.environ, "NETLITE_CPU_ENGINE": "numpy"}, cwd=ROOT / "tests",
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_netlite_works_with_only_numpy_and_protobuf():
    # Simulate an install without the optional packages: block their import
    # and build and run a small net on the NumPy engine.
    code = """
import sys
OPTIONAL = ('numba', 'cupy', 'matplotlib', 'tqdm', 'lmdb', 'torch')
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in OPTIONAL:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import numpy as np, netlite
net = netlite.Net('''
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "s" type: "Split" bottom: "x" top: "a" top: "b" }
''', netlite.TRAIN)
out = net.forward(x=np.ones((2, 3)))
assert sorted(out) == ['a', 'b']
print('ok')
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True,
        env={**os.environ, "NETLITE_CPU_ENGINE": "numpy"}, cwd=ROOT / "tests",
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
