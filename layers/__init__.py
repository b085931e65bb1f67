"""netlite's layer zoo, installed as ``netlite.layers``.

The source folder is the repository's top-level ``layers/``; setup.cfg maps
it onto ``netlite.layers``.  Importing it under any other name (for example
``import layers`` from the repository root) would execute every module a
second time and register every layer type twice, so it is refused.

Importing this package imports every layer module, which registers the
layer types with :func:`netlite.register_layer`.  Kernel modules
(``*_numba.py``, ``*_cupy.py``) are not imported here: their layer imports
them when that engine first runs.
"""

if __name__ != "netlite.layers":
    raise ImportError(
        f"the layer zoo must be imported as 'netlite.layers', not {__name__!r}; "
        "install netlite with `pip install -e .` and `import netlite`"
    )

import importlib
import pkgutil

_KERNEL_SUFFIXES = ("_numba", "_cupy")


def _import_layer_modules():
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name.endswith(_KERNEL_SUFFIXES):
            continue
        importlib.import_module(f"{__name__}.{info.name}")


_import_layer_modules()
