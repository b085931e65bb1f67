"""Numba builds of netlite's kernels, cached on disk.

Every kernel in ``layers/<layer>_numba.py`` is built with :func:`njit` (a
``numba.njit`` that manages the cache) or, for a kernel that comes in a
multi-threaded and a single-threaded build, with :func:`build`.  The
compiled machine code is kept in a per-user folder, so only the first run
of a given netlite, Numba and CPU pays for compilation:

* ``$NETLITE_NUMBA_CACHE_DIR`` when set; else
* ``$NUMBA_CACHE_DIR/netlite`` when Numba's own variable is set; else
* ``$XDG_CACHE_HOME/netlite/numba`` or ``~/.cache/netlite/numba`` (beside
  the dataset cache of :func:`netlite.data.catalog.cache_dir`).

``NETLITE_NUMBA_CACHE=0`` (or ``off``, ``no``, ``false``) compiles in
memory only, as Numba does without ``cache=True``.

**Never stale.**  Numba validates a cached function against its own
source file only: a change in a helper it calls from another file, or in a
constant it imports, would be served stale.  The builds therefore live in
a sub-folder named by :func:`build_key`, a hash of every source a kernel
can reach (all of ``netlite.layers`` and this module) and of the Python,
NumPy, Numba and llvmlite versions, the CPU and Numba's code-generation
settings; any change selects a fresh folder.  Numba also keys its index by
a function's qualified name and signature, not by ``parallel=``, so
:func:`build` gives the two builds of one function distinct qualified
names.  When a new folder is created, the others are pruned to the
:data:`KEEP_BUILDS` most recently used, none of them unused for
:data:`PRUNE_AFTER_DAYS` days (a folder per kernel edit piles up during
development, about 4 MB each).

**Never in the way.**  A cache folder that cannot be created or written
(read-only home, a file in the way, a full disk) turns caching off for the
process without a warning: kernels are compiled in memory, as before.
Numba is never pointed at any other folder (its in-tree ``__pycache__``
fallback would defeat the invalidation above).

This module imports Numba only when a kernel is built; ``import netlite``
does not import it.
"""

import functools
import hashlib
import importlib.util
import inspect
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

logger = logging.getLogger(__name__)

#: Overrides the cache folder.
ENV_CACHE_DIR = "NETLITE_NUMBA_CACHE_DIR"
#: ``0``, ``off``, ``no`` or ``false`` turns the disk cache off.
ENV_CACHE_SWITCH = "NETLITE_NUMBA_CACHE"
#: Build folders not used for this many days are pruned.
PRUNE_AFTER_DAYS = 30
#: At most this many build folders are kept (the most recently used).
KEEP_BUILDS = 8
#: A folder used this recently (seconds) is never pruned: another process
#: may be loading from it.
_IN_USE_SECONDS = 3600

_OFF = ("0", "off", "no", "false")
_KEY_LENGTH = 16
_lock = threading.Lock()
_BUILDS = {}


# ----------------------------------------------------------------- places
def cache_root():
    """The folder that holds netlite's compiled kernels.

    It holds one sub-folder per :func:`build_key`.  Resolved from the
    environment on every call (see the module docstring).

    Returns
    -------
    pathlib.Path
    """
    explicit = os.environ.get(ENV_CACHE_DIR, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    numba_dir = os.environ.get("NUMBA_CACHE_DIR", "").strip()
    if numba_dir:
        return Path(numba_dir).expanduser() / "netlite"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says to ignore relative paths.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "netlite" / "numba"


def cache_enabled():
    """False when ``NETLITE_NUMBA_CACHE`` turns the disk cache off."""
    return os.environ.get(ENV_CACHE_SWITCH, "").strip().lower() not in _OFF


def kernel_sources():
    """Every source file a netlite kernel can reach, sorted.

    All modules of ``netlite.layers`` (the kernels, the layers whose
    constants they import, the shared private helpers) and this module.
    tests/engine_tests/test_jit_cache.py checks that the kernel modules
    import from nothing else in netlite but :mod:`netlite.layer` (the
    adapters' base class, which no kernel calls).
    """
    # Located, not imported: the core does not import the zoo
    # (tests/engine_tests/test_imports.py).
    zoo = importlib.util.find_spec("netlite.layers").submodule_search_locations
    files = [p for folder in zoo for p in Path(folder).glob("*.py")]
    return sorted(files) + [Path(__file__)]


@functools.cache
def build_key():
    """The name of this build's cache folder: a hash of what the compiled
    code depends on.

    The contents of :func:`kernel_sources`, the Python, NumPy, Numba and
    llvmlite versions, the CPU (name and features, or Numba's
    ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES``) and the Numba settings
    that change the generated code (``NUMBA_OPT``, ``NUMBA_BOUNDSCHECK``,
    ``NUMBA_DEBUGINFO``, ``NUMBA_ENABLE_AVX``, SVML).  Computed once per
    process.

    Returns
    -------
    str
        Hexadecimal digits.
    """
    import llvmlite
    import numba
    import numpy
    from llvmlite import binding

    digest = hashlib.sha256()
    for path in kernel_sources():
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    config = numba.config
    cpu = config.CPU_NAME or binding.get_host_cpu_name()
    features = config.CPU_FEATURES
    if features is None:
        try:
            features = binding.get_host_cpu_features().flatten()
        except RuntimeError:  # not available on this platform
            features = ""
    facts = (
        sys.implementation.cache_tag, sys.version, platform.machine(),
        numpy.__version__, numba.__version__, llvmlite.__version__, cpu,
        features,
        *(repr(getattr(config, name, None)) for name in (
            "OPT", "BOUNDSCHECK", "DEBUGINFO_DEFAULT", "CPU_NAME",
            "ENABLE_AVX", "DISABLE_INTEL_SVML", "USING_SVML",
        )),
    )
    digest.update(repr(facts).encode())
    return digest.hexdigest()[:_KEY_LENGTH]


@functools.cache
def _cache_dir_for(root):
    """The writable build folder under ``root``, or None (memoised per
    root: checked once per process)."""
    try:
        path = root / build_key()
        fresh = not path.is_dir()
        path.mkdir(parents=True, exist_ok=True)
        # Numba writes through temporary files in the folder: prove that
        # works, rather than trusting permission bits (root, ACLs, NFS).
        with tempfile.TemporaryFile(dir=path):
            pass
        os.utime(path)  # "last used", for pruning
    except (OSError, RuntimeError) as exc:  # RuntimeError: no home folder
        logger.debug("Numba disk cache off: %s is not writable (%s)", root, exc)
        return None
    if fresh:
        _prune(root, keep=path.name)
    logger.debug("Numba disk cache: %s", path)
    return path


def cache_dir():
    """The folder this process's kernels are cached in, or None.

    None when the cache is turned off (``NETLITE_NUMBA_CACHE=0``) or its
    folder cannot be written.  Imports Numba (the folder's name depends on
    its version).

    Returns
    -------
    pathlib.Path or None
    """
    if not cache_enabled():
        return None
    try:
        root = cache_root()
    except RuntimeError as exc:  # Path.home() without a home folder
        logger.debug("Numba disk cache off: %s", exc)
        return None
    return _cache_dir_for(root)


def _prune(root, keep):
    """Remove build folders under ``root`` other than ``keep``: those not
    among the :data:`KEEP_BUILDS` most recently used, and those unused for
    :data:`PRUNE_AFTER_DAYS` days; never one used in the last hour."""
    now = time.time()
    try:
        builds = []
        for entry in os.scandir(root):
            if (entry.name != keep and len(entry.name) == _KEY_LENGTH
                    and all(c in "0123456789abcdef" for c in entry.name)
                    and entry.is_dir(follow_symlinks=False)):
                builds.append((entry.stat().st_mtime, entry.path))
    except OSError:
        return
    builds.sort(reverse=True)  # most recently used first
    for rank, (used, path) in enumerate(builds, start=2):  # keep is the first
        if now - used < _IN_USE_SECONDS:
            continue
        if rank > KEEP_BUILDS or now - used > PRUNE_AFTER_DAYS * 86400:
            shutil.rmtree(path, ignore_errors=True)


def clear_cache():
    """Delete every cached build under :func:`cache_root` (what
    ``rm -rf ~/.cache/netlite/numba`` does for the default folder).

    Kernels already loaded in this process keep working; later processes
    compile afresh.
    """
    root = cache_root()
    if root.is_dir():
        shutil.rmtree(root, ignore_errors=True)
    _cache_dir_for.cache_clear()


# --------------------------------------------------------------- builders
def njit(fn=None, **options):
    """``numba.njit`` with netlite's disk cache: a decorator, with or
    without options (``@njit``, ``@njit(inline="always")``).

    Parameters
    ----------
    fn : function, optional
        The Python function to compile.
    **options
        Passed to ``numba.njit``; ``cache`` is not accepted (this function
        decides it).

    Returns
    -------
    numba Dispatcher (or ``fn`` itself under ``NUMBA_DISABLE_JIT=1``)
    """
    if "cache" in options:
        raise TypeError(
            "netlite.jit.njit manages Numba's cache itself; drop cache="
        )
    if fn is None:
        return functools.partial(njit, **options)
    import numba

    folder = cache_dir()
    if folder is None or not _has_source_file(fn):
        return numba.njit(cache=False, **options)(fn)
    with _lock:
        # Numba picks the cache folder when caching is enabled (in the
        # decorator) and keeps it; restoring the setting leaves the user's
        # own cached functions where they were.
        saved = numba.config.CACHE_DIR
        numba.config.CACHE_DIR = str(folder)
        try:
            dispatcher = numba.njit(cache=True, **options)(fn)
        finally:
            numba.config.CACHE_DIR = saved
    _guard(dispatcher, folder)
    return dispatcher


def build(fn, parallel):
    """The multi-threaded (``parallel=True``) or the single-threaded build
    of the kernel ``fn``, built on first request and kept.

    The two builds are compiled from copies of ``fn`` named
    ``<name>__parallel`` / ``<name>__serial``: Numba's cache tells cached
    functions apart by qualified name and signature only.

    Parameters
    ----------
    fn : function
        A plain Python function (not yet jitted) whose loops may use
        ``numba.prange``.
    parallel : bool

    Returns
    -------
    numba Dispatcher
    """
    parallel = bool(parallel)
    key = (fn, parallel)
    dispatcher = _BUILDS.get(key)
    if dispatcher is None:
        suffix = "__parallel" if parallel else "__serial"
        copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix,
                                  fn.__defaults__, fn.__closure__)
        copy.__qualname__ = fn.__qualname__ + suffix
        copy.__kwdefaults__ = fn.__kwdefaults__
        copy.__module__ = fn.__module__
        copy.__doc__ = fn.__doc__
        dispatcher = _BUILDS.setdefault(key, njit(parallel=parallel)(copy))
    return dispatcher


def _has_source_file(fn):
    """True when ``fn`` comes from a file (Numba caches nothing else:
    ``python -c``, an interactive prompt)."""
    try:
        return os.path.isfile(inspect.getfile(fn))
    except TypeError:
        return False


def _guard(dispatcher, folder):
    """Keep the cache of ``dispatcher`` in ``folder`` or nowhere, and make
    its input/output failures cost a recompilation, not an exception."""
    cache = getattr(dispatcher, "_cache", None)
    if cache is None or not hasattr(cache, "save_overload"):
        return  # NUMBA_DISABLE_JIT, or a Numba without a disk cache
    try:
        inside = Path(cache.cache_path).resolve().is_relative_to(folder.resolve())
    except (AttributeError, OSError, TypeError):
        inside = False
    if not inside:
        # Numba chose a fallback place (its in-tree __pycache__, say),
        # which our build key does not cover.
        logger.debug("Numba disk cache off for %s: Numba chose %s",
                     dispatcher, getattr(cache, "cache_path", None))
        cache.disable()
        return
    load, save = cache.load_overload, cache.save_overload

    def load_overload(sig, target_context):
        try:
            return load(sig, target_context)
        except Exception as exc:  # unreadable or corrupt entry: recompile
            logger.debug("Numba disk cache: cannot load %s%s (%s)",
                         dispatcher, sig, exc)
            return None

    def turn_off(error):
        logger.debug("Numba disk cache off for %s: %s", dispatcher, error)
        cache.disable()

    def save_overload(sig, data):
        try:
            save(sig, data)
        except OSError as exc:  # full disk, folder removed, read-only
            turn_off(exc)
        except Exception:
            # An unreadable index file (Numba rereads it to add the entry):
            # start it afresh, once.
            try:
                os.unlink(cache._cache_file._index_path)
                save(sig, data)
            except Exception as exc:
                turn_off(exc)

    cache.load_overload = load_overload
    cache.save_overload = save_overload
