"""Engine selection and array-module helpers.

netlite has three engines that implement one specification:

* ``numpy`` -- the readable reference (every layer's ``forward_cpu`` /
  ``backward_cpu``);
* ``numba`` -- JIT kernels for the CPU (``forward_numba`` /
  ``backward_numba``, in ``layers/<layer>_numba.py``);
* ``cupy``  -- the GPU (``forward_gpu`` / ``backward_gpu``, in
  ``layers/<layer>_cupy.py``).

The *device* is a property of the data: a net built in GPU mode holds CuPy
arrays, and a layer whose blobs hold CuPy arrays runs its GPU path.  The
*CPU engine* (numpy or numba) is a global choice, made with
:func:`set_cpu_engine` or the ``NETLITE_CPU_ENGINE`` environment variable;
it never changes results beyond floating-point rounding.  The default is
``numba`` (the fast engine; Numba is a required dependency) and ``numpy``
where Numba is missing or does not import (:func:`default_cpu_engine`).

Neither Numba nor CuPy is imported by ``import netlite``: they are imported
the first time their engine is selected or used.
"""

import importlib
import os
import warnings

import numpy as np

CPU_ENGINES = ("numpy", "numba")

_mode = "cpu"
_device_id = 0
_cpu_engine = None  # resolved lazily from the environment


def _resolve_env_engine():
    name = os.environ.get("NETLITE_CPU_ENGINE", "").strip().lower()
    if not name:
        return default_cpu_engine()
    if name not in CPU_ENGINES:
        raise ValueError(
            f"NETLITE_CPU_ENGINE={name!r} is not one of {', '.join(CPU_ENGINES)}"
        )
    return name


def numba_available():
    """True when Numba is installed (found on the path; not imported)."""
    try:
        return importlib.util.find_spec("numba") is not None
    except (ImportError, ValueError):  # a blocked or half-removed package
        return False


def default_cpu_engine():
    """The CPU engine used when none is chosen: ``"numba"``, or ``"numpy"``
    when Numba is missing or does not import.

    Imports Numba (when installed) to make sure the fast engine works; a
    Numba that is installed but fails to import (say, built for another
    NumPy) gives ``"numpy"`` with a ``RuntimeWarning`` that says why.

    Returns
    -------
    str
    """
    if not numba_available():
        return "numpy"
    try:
        importlib.import_module("numba")
    except Exception as exc:  # any import failure: the reference still works
        warnings.warn(
            f"Numba is installed but does not import ({type(exc).__name__}: "
            f"{exc}); the CPU engine defaults to numpy. Set "
            f"NETLITE_CPU_ENGINE=numpy to silence this, or repair Numba.",
            RuntimeWarning, stacklevel=3,
        )
        return "numpy"
    return "numba"


def cupy_available():
    """True when CuPy imports and sees at least one CUDA device."""
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no driver, no device, broken install: all "absent"
        return False


def set_cpu_engine(name):
    """Choose the CPU engine: ``"numba"`` (JIT kernels, the default) or
    ``"numpy"`` (the reference).

    Raises
    ------
    ValueError
        For an unknown name.
    ImportError
        When ``"numba"`` is asked for and Numba is not installed.
    """
    global _cpu_engine
    name = str(name).strip().lower()
    if name not in CPU_ENGINES:
        raise ValueError(
            f"unknown CPU engine {name!r}; choose one of {', '.join(CPU_ENGINES)}"
        )
    if name == "numba" and not numba_available():
        raise ImportError(
            "the numba engine needs Numba: pip install numba "
            "(it is a dependency of netlite's default install)"
        )
    _cpu_engine = name


def cpu_engine():
    """Return the current CPU engine name.

    Until :func:`set_cpu_engine` is called, the first call resolves it from
    ``NETLITE_CPU_ENGINE`` and, when that is unset or empty, from
    :func:`default_cpu_engine`.
    """
    global _cpu_engine
    if _cpu_engine is None:
        _cpu_engine = _resolve_env_engine()
        if _cpu_engine == "numba" and not numba_available():
            raise ImportError("NETLITE_CPU_ENGINE=numba but Numba is not installed")
    return _cpu_engine


def set_mode_cpu():
    """New nets hold NumPy arrays (pycaffe's ``caffe.set_mode_cpu``)."""
    global _mode
    _mode = "cpu"


def set_mode_gpu():
    """New nets hold CuPy arrays on the current device.

    Raises
    ------
    RuntimeError
        When CuPy is missing or no CUDA device is visible.
    """
    global _mode
    if not cupy_available():
        raise RuntimeError(
            "GPU mode needs CuPy and a CUDA device: pip install 'netlite-caffe[gpu]'"
        )
    _mode = "gpu"


def set_device(device_id):
    """Select the CUDA device used by GPU mode (``caffe.set_device``)."""
    global _device_id
    _device_id = int(device_id)
    if _mode == "gpu":
        import cupy

        cupy.cuda.Device(_device_id).use()


def mode():
    """Return ``"cpu"`` or ``"gpu"``."""
    return _mode


def default_device():
    """The device new blobs are created on: ``"cpu"`` or ``"gpu"``."""
    return _mode


def get_array_module(device):
    """Return ``numpy`` for ``"cpu"`` and ``cupy`` for ``"gpu"``."""
    if device == "cpu":
        return np
    if device == "gpu":
        import cupy

        return cupy
    raise ValueError(f"unknown device {device!r}; expected 'cpu' or 'gpu'")


def array_module_of(array):
    """Return the array module (numpy or cupy) that owns ``array``."""
    if isinstance(array, np.ndarray):
        return np
    module = type(array).__module__
    if module.startswith("cupy"):
        import cupy

        return cupy
    return np


def to_numpy(array):
    """Copy/convert any array to a NumPy array (no copy for NumPy input)."""
    if isinstance(array, np.ndarray):
        return array
    if hasattr(array, "get"):
        return array.get()
    return np.asarray(array)
