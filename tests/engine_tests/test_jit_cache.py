"""The Numba kernels' disk cache (netlite/jit.py, docs/engine/backends.md).

Most checks run fresh Python processes, because what matters is what a
*second* process gets: the compiled kernels loaded from disk, never a stale
build after a source changed, and no warning or error when the cache
folder is unusable.  Each test has its own cache folder
(``NETLITE_NUMBA_CACHE_DIR``); compilations are counted with Numba's
``numba:compile`` events, which fire for real compilations only, not for
builds loaded from the cache.
"""

import ast
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import netlite
from netlite import jit

pytest.importorskip("numba")

ROOT = Path(__file__).resolve().parents[2]
LAYERS = Path(netlite.layers.__path__[0])

#: Prepended to every child script: records what Numba compiles.
_COUNT_COMPILES = """
import json, sys
from numba.core import event
COMPILED = []
class _Count(event.Listener):
    def on_start(self, ev):
        pass
    def on_end(self, ev):
        COMPILED.append(ev.data["dispatcher"].py_func.__qualname__)
event.register("numba:compile", _Count())
"""


def _env(cache_dir, **extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NETLITE_NUMBA", "NUMBA_CACHE"))}
    env["NETLITE_NUMBA_CACHE_DIR"] = str(cache_dir)
    env.update(extra)
    return env


def _run(code, env, cwd=None):
    """Run ``code`` (after the compile counter) with warnings as errors;
    return the JSON object it prints last."""
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", _COUNT_COMPILES + code],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == "", result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _cache_files(folder, pattern="*.nb[ic]"):
    return sorted(p.name for p in Path(folder).rglob(pattern))


# -------------------------------------------------------- netlite's kernels
_LENET_LIKE = """
import numpy as np
import netlite
netlite.set_cpu_engine("numba")
netlite.set_random_seed(1701)
net = netlite.Net('''
layer { name: "in" type: "Input" top: "x" top: "label"
        input_param { shape { dim: 4 dim: 2 dim: 8 dim: 8 }
                      shape { dim: 4 dim: 2 dim: 2 } } }
layer { name: "conv" type: "Convolution" bottom: "x" top: "conv"
        convolution_param { num_output: 3 kernel_size: 3
                            weight_filler { type: "xavier" } } }
layer { name: "maxp" type: "Pooling" bottom: "conv" top: "maxp"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "avep" type: "Pooling" bottom: "maxp" top: "avep"
        pooling_param { pool: AVE kernel_size: 2 stride: 1 } }
layer { name: "prob" type: "Softmax" bottom: "avep" top: "prob" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "prob" bottom: "label"
        top: "loss" }
''', netlite.TRAIN)
rng = np.random.default_rng(0)
x, label = rng.standard_normal((4, 2, 8, 8)), np.arange(16).reshape(4, 2, 2) % 3
out = net.forward(x=x, label=label)
net.backward()
print(json.dumps({"loss": float(out["loss"]), "compiled": COMPILED}))
"""


def test_second_process_loads_every_kernel_from_the_cache(tmp_path):
    """Convolution, Pooling (MAX, AVE), Softmax and SoftmaxWithLoss, forward
    and backward: compiled once, then loaded, with the same numbers."""
    env = _env(tmp_path)
    first = _run(_LENET_LIKE, env)
    assert first["compiled"], "nothing was compiled on an empty cache"
    (build,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert build.name == jit.build_key()
    second = _run(_LENET_LIKE, env)
    assert second["compiled"] == []
    assert second["loss"] == first["loss"]


# ------------------------------------------- toy kernels in a package copy
_HELPER = """
from netlite.jit import njit

SCALE = 2.0


@njit
def helper(x):
    return x + 1.0
"""

_KERNELS = """
import numba
from numba import prange

from netlite.jit import build, njit
from netlite.layers._toy_helper import SCALE, helper


@njit
def kernel(x):
    return helper(x) * SCALE


def fill_thread_ids(out):
    for i in prange(out.size):
        out[i] = numba.get_thread_id()
"""

_CALL_TOY = """
import netlite
assert netlite.__file__.startswith(sys.argv[1]), netlite.__file__
from netlite.layers import toy_numba
print(json.dumps({"value": toy_numba.kernel(1.0), "compiled": COMPILED}))
"""


@pytest.fixture
def package(tmp_path):
    """A copy of netlite (layers/ inside, as installed) with a toy kernel
    module ``toy_numba.py`` whose helper and constant live in another file,
    ``_toy_helper.py``."""
    dest = tmp_path / "site" / "netlite"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(Path(netlite.__file__).parent, dest, ignore=ignore)
    shutil.copytree(LAYERS, dest / "layers", ignore=ignore, dirs_exist_ok=True)
    (dest / "layers" / "_toy_helper.py").write_text(_HELPER)
    (dest / "layers" / "toy_numba.py").write_text(_KERNELS)
    return dest


def _run_toy(package, cache, code=_CALL_TOY):
    site = package.parent
    env = _env(cache, PYTHONPATH=str(site))
    return _run(code.replace("sys.argv[1]", repr(str(site))), env, cwd=site)


def _edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_a_change_in_another_file_is_never_served_stale(package, tmp_path):
    """Numba checks a cached function against its own file only; netlite's
    build key covers every kernel source, so editing the helper a kernel
    calls, or a constant it imports, from another file recompiles it."""
    cache = tmp_path / "cache"
    helper = package / "layers" / "_toy_helper.py"
    first = _run_toy(package, cache)
    assert first["value"] == (1.0 + 1.0) * 2.0
    assert "kernel" in first["compiled"]
    second = _run_toy(package, cache)
    assert second == {"value": first["value"], "compiled": []}

    _edit(helper, "return x + 1.0", "return x + 5.0")  # the called helper
    third = _run_toy(package, cache)
    assert third["value"] == (1.0 + 5.0) * 2.0
    assert "kernel" in third["compiled"]

    _edit(helper, "SCALE = 2.0", "SCALE = 3.0")  # an imported constant
    fourth = _run_toy(package, cache)
    assert fourth["value"] == (1.0 + 5.0) * 3.0
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 3  # one per source


_CALL_BUILDS = """
import numpy as np
import numba
from netlite.layers import toy_numba
from netlite.jit import build
ids = {}
for parallel in (True, False):
    out = np.zeros(64, np.int64)
    build(toy_numba.fill_thread_ids, parallel)(out)
    ids[str(parallel)] = sorted(set(out.tolist()))
print(json.dumps({"ids": ids, "compiled": COMPILED,
                  "threads": numba.get_num_threads()}))
"""


def test_parallel_and_serial_builds_are_cached_apart(package, tmp_path):
    """Numba's cache index ignores ``parallel=``: the two builds of one
    function get distinct names, and each process loads the right one."""
    cache = tmp_path / "cache"
    first = _run_toy(package, cache, _CALL_BUILDS)
    assert sorted(n for n in first["compiled"] if n.startswith("fill")) == [
        "fill_thread_ids__parallel", "fill_thread_ids__serial"]
    names = _cache_files(cache, "*.nbi")
    assert any(n.startswith("toy_numba.fill_thread_ids__parallel-") for n in names)
    assert any(n.startswith("toy_numba.fill_thread_ids__serial-") for n in names)
    second = _run_toy(package, cache, _CALL_BUILDS)
    assert second["compiled"] == []
    assert second["ids"]["False"] == [0]  # one thread
    if second["threads"] > 1:
        assert len(second["ids"]["True"]) > 1  # the parallel build, not the serial


_CALL_AFTER_BLOCKING = """
import os, shutil
import netlite
from netlite import jit
from netlite.layers import toy_numba  # decorated: the cache folder is chosen
folder = jit.cache_dir()
shutil.rmtree(folder)
open(folder, "w").close()  # saving will fail: a file where the folder was
value = toy_numba.kernel(1.0)
print(json.dumps({"value": value, "compiled": COMPILED}))
"""


def test_a_failing_save_costs_a_compilation_not_an_error(package, tmp_path):
    result = _run_toy(package, tmp_path / "cache", _CALL_AFTER_BLOCKING)
    assert result["value"] == 4.0
    assert "kernel" in result["compiled"]


def test_a_corrupt_cache_entry_is_recompiled(package, tmp_path):
    cache = tmp_path / "cache"
    first = _run_toy(package, cache)
    for path in cache.rglob("toy_numba.kernel-*"):
        path.write_bytes(b"not a pickle")
    second = _run_toy(package, cache)
    assert second["value"] == first["value"]
    assert "kernel" in second["compiled"]
    third = _run_toy(package, cache)  # the entry was rewritten
    assert third["compiled"] == []


def test_an_unusable_cache_folder_compiles_in_memory_silently(package, tmp_path):
    """No warning (the children run with -W error), no error, and no
    fallback to Numba's other places (``__pycache__`` beside the sources),
    which the build key would not cover."""
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    for _ in range(2):
        result = _run_toy(package, blocker / "sub")
        assert result["value"] == 4.0
        assert "kernel" in result["compiled"]  # every time: nothing was cached
    assert _cache_files(package) == []


def test_a_folder_that_refuses_files_turns_the_cache_off(tmp_path, monkeypatch):
    """Writability is tried, not read from permission bits (root, ACLs,
    network file systems); a refusal also keeps Numba from its fallbacks."""
    monkeypatch.setenv("NETLITE_NUMBA_CACHE_DIR", str(tmp_path))

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system (planted)")

    monkeypatch.setattr(jit.tempfile, "TemporaryFile", refuse)
    assert jit.cache_dir() is None

    def twice(x):
        return 2 * x

    kernel = jit.njit(twice)
    assert kernel(2) == 4
    assert kernel.stats.cache_path is None  # no disk cache anywhere


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="needs POSIX permissions that bind (not root)")
def test_a_read_only_cache_folder_compiles_in_memory(package, tmp_path):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o555)
    try:
        for _ in range(2):
            assert "kernel" in _run_toy(package, root)["compiled"]
        assert _cache_files(package) == [] and _cache_files(root) == []
    finally:
        root.chmod(0o755)


def test_the_cache_stays_out_of_the_source_tree(package, tmp_path):
    _run_toy(package, tmp_path / "cache")
    assert _cache_files(tmp_path / "cache")
    assert _cache_files(package) == []


def test_cache_can_be_turned_off(package, tmp_path):
    cache = tmp_path / "cache"
    site = package.parent
    env = _env(cache, PYTHONPATH=str(site), NETLITE_NUMBA_CACHE="off")
    code = _CALL_TOY.replace("sys.argv[1]", repr(str(site)))
    for _ in range(2):
        assert "kernel" in _run(code, env, cwd=site)["compiled"]
    assert not cache.exists()


# ------------------------------------------------------------- in-process
def test_cache_root_resolution(monkeypatch, tmp_path):
    for name in ("NETLITE_NUMBA_CACHE_DIR", "NUMBA_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert jit.cache_root() == tmp_path / "home" / ".cache" / "netlite" / "numba"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert jit.cache_root() == tmp_path / "home" / ".cache" / "netlite" / "numba"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert jit.cache_root() == tmp_path / "xdg" / "netlite" / "numba"
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    assert jit.cache_root() == tmp_path / "numba" / "netlite"
    monkeypatch.setenv("NETLITE_NUMBA_CACHE_DIR", "~/mine")
    assert jit.cache_root() == tmp_path / "home" / "mine"


@pytest.mark.parametrize("value, enabled", [
    ("", True), ("1", True), ("on", True),
    ("0", False), ("off", False), (" No ", False), ("false", False),
])
def test_cache_switch(monkeypatch, value, enabled):
    monkeypatch.setenv("NETLITE_NUMBA_CACHE", value)
    assert jit.cache_enabled() is enabled
    if not enabled:
        assert jit.cache_dir() is None


def test_build_key_covers_every_kernel_source():
    sources = set(jit.kernel_sources())
    assert Path(jit.__file__) in sources
    for path in LAYERS.glob("*.py"):
        assert path in sources, path.name
    assert len(jit.build_key()) == 16


def test_kernel_modules_import_only_what_the_build_key_covers():
    """A kernel may freeze what it imports into its machine code, so a
    kernel module imports from netlite only what :func:`jit.kernel_sources`
    hashes (netlite.layers, netlite.jit) and netlite.layer (EngineAdapter,
    the adapters' base class, never called from jitted code)."""
    allowed = {"netlite.jit", "netlite.layer"}
    for path in LAYERS.glob("*_numba.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                pytest.fail(f"{path.name}: relative import")
            names = ([node.module] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names]
                     if isinstance(node, ast.Import) else [])
            for name in names:
                if name == "netlite" or name.startswith("netlite."):
                    assert name in allowed or name.startswith("netlite.layers."), (
                        f"{path.name} imports {name}, which the build key misses"
                    )


def test_kernel_modules_build_through_netlite_jit():
    """No kernel bypasses the cache (or caches without its invalidation)."""
    for path in LAYERS.glob("*_numba.py"):
        text = path.read_text(encoding="utf-8")
        for bypass in ("numba.njit", "numba.jit", "@jit", "cache="):
            assert bypass not in text, f"{path.name} uses {bypass}"


def test_njit_leaves_numbas_cache_setting_alone(tmp_path, monkeypatch):
    import numba

    monkeypatch.setenv("NETLITE_NUMBA_CACHE_DIR", str(tmp_path))
    before = numba.config.CACHE_DIR

    def twice(x):
        return 2 * x

    kernel = jit.njit(twice)
    assert numba.config.CACHE_DIR == before
    assert kernel(3) == 6
    assert Path(kernel.stats.cache_path).is_relative_to(tmp_path / jit.build_key())


def test_njit_refuses_a_cache_option():
    with pytest.raises(TypeError, match="manages Numba's cache itself"):
        jit.njit(cache=True)


def test_njit_without_a_source_file_compiles_in_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("NETLITE_NUMBA_CACHE_DIR", str(tmp_path))
    namespace = {}
    exec("def plus_one(x):\n    return x + 1\n", namespace)  # no file: "<string>"
    assert jit.njit(namespace["plus_one"])(1) == 2
    assert not list(tmp_path.rglob("*.nb[ic]"))


def _build_folders(root, ages_in_days):
    """Build-like folders (16 hex digits) last used ``ages`` days ago."""
    names = []
    for i, age in enumerate(ages_in_days):
        name = f"{i:016x}"
        (root / name).mkdir()
        (root / name / "x.nbi").write_bytes(b"")
        used = time.time() - age * 86400
        os.utime(root / name, (used, used))
        names.append(name)
    return names


def test_build_folders_unused_for_a_month_are_pruned(tmp_path):
    stale, recent, current = _build_folders(
        tmp_path, [jit.PRUNE_AFTER_DAYS + 1, 2, jit.PRUNE_AFTER_DAYS + 5])
    foreign = tmp_path / "not-a-build"
    foreign.mkdir()
    os.utime(foreign, (0, 0))
    jit._prune(tmp_path, keep=current)
    assert {p.name for p in tmp_path.iterdir()} == {recent, current, foreign.name}


def test_only_the_most_recently_used_builds_are_kept(tmp_path):
    # 12 folders used 1..12 days ago, one used a minute ago, and the current.
    names = _build_folders(tmp_path, [1 + i for i in range(12)] + [0.0007, 40])
    *by_age, just_used, current = names
    jit._prune(tmp_path, keep=current)
    kept = {p.name for p in tmp_path.iterdir()}
    # The current, the one in use, and the newest of the rest up to KEEP_BUILDS.
    assert kept == {current, just_used, *by_age[:jit.KEEP_BUILDS - 2]}


def test_a_new_build_folder_prunes_the_others(tmp_path, monkeypatch):
    monkeypatch.setenv("NETLITE_NUMBA_CACHE_DIR", str(tmp_path))
    (stale,) = _build_folders(tmp_path, [jit.PRUNE_AFTER_DAYS + 1])
    assert jit.cache_dir() == tmp_path / jit.build_key()
    assert not (tmp_path / stale).exists()


def test_clear_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NETLITE_NUMBA_CACHE_DIR", str(tmp_path / "root"))
    assert jit.cache_dir() == tmp_path / "root" / jit.build_key()
    jit.clear_cache()
    assert not (tmp_path / "root").exists()
    assert jit.cache_dir().is_dir()  # recreated on next use
