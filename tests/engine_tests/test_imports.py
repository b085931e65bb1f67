"""The import graph of netlite/ and layers/: no cycles, and a core that
depends on nothing above it.

The graph is read from the source with :mod:`ast`, so that a lazy import
inside a function counts as much as one at the top of a module:

* every ``import`` and ``from ... import`` statement is an edge, at module
  level or inside a function;
* ``import a.b.c`` is an edge to ``a.b.c`` only: the parent packages it
  also imports (``a``, ``a.b``) are not edges;
* ``from pkg import name`` is an edge to ``pkg.name`` when that is a module,
  else to ``pkg``;
* ``layers/x.py`` is the module ``netlite.layers.x`` (setup.cfg ships the
  folder under that name); only edges between these modules are kept.

The core is every module directly in netlite/ except the facade
(``netlite/__init__.py``), plus ``netlite.proto``.  It must import neither
the layer zoo (``netlite.layers``), nor the facade (which imports the zoo),
nor the folders built on top of it (``netlite.solvers``, ``netlite.data``,
``netlite.tools``).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FACADE = "netlite"
ZOO = "netlite.layers"
ABOVE_CORE = ("netlite.solvers", "netlite.data", "netlite.tools")


# ------------------------------------------------------------- the graph
def module_names(root):
    """``{module name: path}`` of every .py file under netlite/ and layers/."""
    modules = {}
    for folder, package in (("netlite", "netlite"), ("layers", ZOO)):
        base = Path(root) / folder
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _is_package(path):
    return path.name == "__init__.py"


def _resolve(name, modules):
    """``name`` if it is a module, else its longest prefix that is one."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _targets(node, module, path, modules):
    """The modules one import statement of ``module`` is an edge to."""
    if isinstance(node, ast.Import):
        return {_resolve(alias.name, modules) for alias in node.names}
    if node.level:
        package = module if _is_package(path) else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = ".".join(p for p in (package, node.module) if p)
    else:
        base = node.module
    targets = set()
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        targets.add(submodule if submodule in modules else _resolve(base, modules))
    return targets


def import_graph(root):
    """``{module: set of modules it imports}`` for the tree at ``root``."""
    modules = module_names(root)
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _targets(node, module, path, modules)
        edges.discard(None)  # outside netlite (numpy, the standard library)
        graph[module] = edges
    return graph


# ------------------------------------------------------------ the checks
def find_cycles(graph):
    """One cycle per strongly connected component of more than one module
    (or a module importing itself), as lists ``[a, b, ..., a]``."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def connect(v):
        # Tarjan's algorithm; the graph has a few hundred nodes at most.
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for component in components:
        start = min(component)
        if len(component) > 1 or start in graph.get(start, ()):
            cycles.append(_cycle_through(start, component, graph))
    return cycles


def _cycle_through(start, component, graph):
    """A shortest path ``start -> ... -> start`` inside ``component``."""
    parents, frontier = {}, [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if w in component and w not in parents:
                    parents[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # pragma: no cover


def in_package(module, *packages):
    """True when ``module`` is one of ``packages`` or inside one of them."""
    return any(module == p or module.startswith(p + ".") for p in packages)


def core_modules(root):
    """The modules directly in netlite/ but the facade, and netlite.proto."""
    netlite_dir = Path(root) / "netlite"
    return {
        module for module, path in module_names(root).items()
        if in_package(module, "netlite.proto")
        or (path.parent == netlite_dir and not _is_package(path))
    }


def edges_into(graph, sources, is_target):
    """Sorted ``(source, target)`` edges from ``sources`` to modules
    ``is_target`` accepts."""
    return sorted(
        (source, target)
        for source in sources for target in graph[source] if is_target(target)
    )


def _zoo_or_facade(module):
    return module == FACADE or in_package(module, ZOO)


def _above_core(module):
    return in_package(module, *ABOVE_CORE)


def assert_no_cycles(graph):
    """Fail, printing every cycle found."""
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(
        "    " + " -> ".join(cycle) for cycle in cycles
    )


def assert_no_edges(graph, sources, is_target, what):
    """Fail, printing every edge from ``sources`` into ``is_target``."""
    edges = edges_into(graph, sources, is_target)
    assert not edges, f"{what}:\n" + "\n".join(f"    {a} -> {b}" for a, b in edges)


# ------------------------------------------------------- the repository
@pytest.fixture(scope="module")
def graph():
    return import_graph(ROOT)


@pytest.fixture(scope="module")
def core():
    return core_modules(ROOT)


def test_the_graph_covers_both_folders(graph, core):
    assert {FACADE, ZOO, "netlite.net", "netlite.registry", "netlite.proto",
            "netlite.layers.softmax", *ABOVE_CORE} <= set(graph)
    assert {"netlite.blob", "netlite.layer", "netlite.net", "netlite.registry",
            "netlite.proto", "netlite.proto.netlite_pb2"} <= core
    assert not any(_zoo_or_facade(m) or _above_core(m) for m in core)
    assert {ZOO, "netlite.solvers"} <= graph[FACADE]


def test_no_import_cycles(graph):
    assert_no_cycles(graph)


def test_core_imports_neither_the_zoo_nor_the_facade(graph, core):
    assert_no_edges(graph, core, _zoo_or_facade, "the core imports the layer zoo")


def test_core_imports_no_folder_built_on_it(graph, core):
    assert_no_edges(graph, core, _above_core,
                    "the core imports netlite.solvers/data/tools")


def test_only_the_facade_and_the_zoo_import_the_zoo(graph):
    sources = [m for m in graph if not _zoo_or_facade(m)]
    assert_no_edges(graph, sources, lambda m: in_package(m, ZOO),
                    "only the facade may import the layer zoo")


def test_layers_do_not_import_the_facade(graph):
    sources = [m for m in graph if in_package(m, ZOO)]
    assert_no_edges(graph, sources, lambda m: m == FACADE,
                    "layers must import netlite's modules, not the facade")


# ---------------------------------------------- the checks can fail
def _tree(root, files):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return import_graph(root)


CLEAN = {
    "netlite/__init__.py": "from netlite import layers, solvers\n"
                           "from netlite.blob import Blob\n",
    "netlite/rng.py": "import numpy as np\n",
    "netlite/blob.py": "from netlite import rng\n",
    "netlite/registry.py": "import netlite.blob\n",
    "netlite/proto/__init__.py": "",
    "netlite/proto/netlite_pb2.py": "from google.protobuf import message\n",
    "netlite/solvers/__init__.py": "from netlite.solvers import sgd\n",
    "netlite/solvers/sgd.py": "from .solver import Solver\n",
    "netlite/solvers/solver.py": "from netlite import blob, rng\n",
    "netlite/tools/__init__.py": "",
    "netlite/tools/cli.py": "from netlite import __version__\n",
    "layers/__init__.py": "",
    "layers/relu.py": "from netlite.registry import register_layer\n",
}


def test_edge_rules_on_a_synthetic_tree(tmp_path):
    graph = _tree(tmp_path, CLEAN)
    # `from pkg import name`: the module pkg.name, else pkg itself.
    assert graph["netlite"] == {
        "netlite.layers", "netlite.solvers", "netlite.blob",
    }
    assert graph["netlite.tools.cli"] == {"netlite"}
    # `import netlite.blob` imports netlite too, but that is no edge.
    assert graph["netlite.registry"] == {"netlite.blob"}
    # Relative imports, external packages, layers/ as netlite.layers.
    assert graph["netlite.solvers.sgd"] == {"netlite.solvers.solver"}
    assert graph["netlite.rng"] == set()
    assert graph["netlite.layers.relu"] == {"netlite.registry"}
    assert core_modules(tmp_path) == {
        "netlite.rng", "netlite.blob", "netlite.registry", "netlite.proto",
        "netlite.proto.netlite_pb2",
    }
    core = core_modules(tmp_path)
    assert_no_cycles(graph)
    assert_no_edges(graph, core, _zoo_or_facade, "core -> zoo")
    assert_no_edges(graph, core, _above_core, "core -> solvers/data/tools")


def test_planted_cycle_and_core_to_zoo_edge_are_caught(tmp_path):
    files = dict(CLEAN)
    # A cycle hidden behind a function-level import ...
    files["netlite/rng.py"] = "def seed():\n    from netlite.blob import Blob\n"
    # ... and the core importing the zoo (and, through it, a second cycle).
    files["netlite/registry.py"] = (
        "def builtin():\n    import netlite.layers.relu  # noqa: F401\n"
    )
    graph = _tree(tmp_path, files)
    cycles = find_cycles(graph)
    assert ["netlite.blob", "netlite.rng", "netlite.blob"] in cycles
    assert ["netlite.layers.relu", "netlite.registry",
            "netlite.layers.relu"] in cycles
    with pytest.raises(AssertionError, match=(
            r"import cycles:\s+netlite.blob -> netlite.rng -> netlite.blob\s+"
            r"netlite.layers.relu -> netlite.registry -> netlite.layers.relu")):
        assert_no_cycles(graph)
    core = core_modules(tmp_path)
    assert edges_into(graph, core, _zoo_or_facade) == [
        ("netlite.registry", "netlite.layers.relu"),
    ]
    with pytest.raises(AssertionError,
                       match=r"core -> zoo:\s+netlite.registry -> netlite.layers"):
        assert_no_edges(graph, core, _zoo_or_facade, "core -> zoo")
    # The core importing the facade, or a folder built on the core.
    files["netlite/blob.py"] = (
        "import netlite\nfrom netlite.solvers.solver import Solver\n"
    )
    graph = _tree(tmp_path, files)
    assert edges_into(graph, core, _zoo_or_facade) == [
        ("netlite.blob", "netlite"), ("netlite.registry", "netlite.layers.relu"),
    ]
    assert edges_into(graph, core, _above_core) == [
        ("netlite.blob", "netlite.solvers.solver"),
    ]
    with pytest.raises(AssertionError, match="netlite.blob -> netlite.solvers"):
        assert_no_edges(graph, core, _above_core, "core -> solvers/data/tools")
