"""CUDA devices for the command line: Caffe's ``-gpu`` flag and ``device_query``.

:func:`select_device` applies ``--engine`` and ``-gpu`` (an id, ``"0,2"``
or ``"all"``); :func:`device_query` reports the devices as ``caffe
device_query`` does.  CuPy is imported only here, and only when a device is
asked for.  See docs/cli.md.
"""

import logging

from netlite import backend

logger = logging.getLogger("netlite")


def visible_gpu_count():
    """Number of CUDA devices CuPy sees.

    Raises
    ------
    RuntimeError
        When CuPy is missing or sees no device, saying which.
    """
    try:
        import cupy
    except ImportError:
        raise RuntimeError(
            "no CUDA device is visible: CuPy is not installed "
            "(pip install 'netlite-caffe[gpu]')"
        ) from None
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # no driver, no device: CUDA's own words
        raise RuntimeError(f"no CUDA device is visible: {exc}") from None
    if count < 1:
        raise RuntimeError("no CUDA device is visible (CuPy counts 0 devices)")
    return count


def resolve_gpus(gpu):
    """The CUDA device ids ``gpu`` names, as Caffe's ``-gpu`` flag.

    Parameters
    ----------
    gpu : None, bool, int, str or sequence of int
        None/False: none (CPU).  True: device 0.  An int: that device.
        ``"all"``: every visible device.  ``"0,2"`` or ``[0, 2]``: those.

    Returns
    -------
    list of int

    Raises
    ------
    RuntimeError
        ``"all"`` with no visible device (whether the other ids exist is
        checked where they are used).
    ValueError
        A negative or unparsable id.
    """
    if gpu is None or gpu is False:
        return []
    if gpu is True:
        return [0]
    if isinstance(gpu, str):
        text = gpu.strip().lower()
        if text == "all":
            return list(range(visible_gpu_count()))
        try:
            ids = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(
                f"gpu must be a device id, a comma-separated list of ids or "
                f"'all', got {gpu!r}"
            ) from None
    elif isinstance(gpu, int):
        ids = [gpu]
    else:
        ids = [int(g) for g in gpu]
    if any(i < 0 for i in ids):
        raise ValueError(f"device ids must be >= 0, got {gpu!r}")
    return ids


def select_device(engine=None, gpu=None, train=False):
    """Apply ``--engine`` and ``--gpu``.

    Parameters
    ----------
    engine : {"numpy", "numba"}, optional
        The CPU engine; unchanged (the library's default) when None.
    gpu : None, bool, int, str or sequence of int
        See :func:`resolve_gpus`.  netlite runs on one device: of several,
        the first is used and the others are logged as unused (Caffe's
        ``test`` and ``time`` do the same; its ``train`` would use them all).
    train : bool
        Several devices for training: say (as a warning) that netlite
        does not train on several devices at once.

    Returns
    -------
    int or None
        The CUDA device used, or None for the CPU.
    """
    if engine is not None:
        backend.set_cpu_engine(engine)
    gpus = resolve_gpus(gpu)
    if not gpus:
        backend.set_mode_cpu()
        logger.info("Use CPU (%s engine).", backend.cpu_engine())
        return None
    if len(gpus) > 1 and train:
        logger.warning(
            "netlite trains on one device: using GPU %d, not GPUs %s (Caffe "
            "would train on all of them, multiplying the batch size)",
            gpus[0], ", ".join(map(str, gpus[1:])),
        )
    elif len(gpus) > 1:
        for unused in reversed(gpus[1:]):
            logger.info("Not using GPU #%d for single-GPU function", unused)
    device_id = gpus[0]
    count = visible_gpu_count()
    if device_id >= count:
        raise RuntimeError(
            f"GPU {device_id} does not exist: {count} CUDA device(s) visible "
            f"(ids 0 to {count - 1})"
        )
    backend.set_mode_gpu()
    backend.set_device(device_id)
    logger.info("Use GPU with device ID %d", device_id)
    return device_id


# ------------------------------------------------------------ device_query
#: Caffe's ``Caffe::DeviceQuery`` lines: (label, cudaDeviceProp field).
_DEVICE_FIELDS = (
    ("Major revision number", "major"),
    ("Minor revision number", "minor"),
    ("Name", "name"),
    ("Total global memory", "totalGlobalMem"),
    ("Total shared memory per block", "sharedMemPerBlock"),
    ("Total registers per block", "regsPerBlock"),
    ("Warp size", "warpSize"),
    ("Maximum memory pitch", "memPitch"),
    ("Maximum threads per block", "maxThreadsPerBlock"),
    ("Maximum dimension of block", "maxThreadsDim"),
    ("Maximum dimension of grid", "maxGridSize"),
    ("Clock rate", "clockRate"),
    ("Total constant memory", "totalConstMem"),
    ("Texture alignment", "textureAlignment"),
    ("Concurrent copy and execution", "deviceOverlap"),
    ("Number of multiprocessors", "multiProcessorCount"),
    ("Kernel execution timeout", "kernelExecTimeoutEnabled"),
)
_YES_NO_FIELDS = ("deviceOverlap", "kernelExecTimeoutEnabled")


def _device_value(key, value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace").rstrip("\x00")
    if key in _YES_NO_FIELDS:
        return "Yes" if value else "No"
    if isinstance(value, (tuple, list)):
        return ", ".join(str(v) for v in value)
    return str(value)


def device_query(gpu="all"):
    """Report CUDA devices like ``caffe device_query``.

    Parameters
    ----------
    gpu : int, str or sequence of int
        The devices to query (see :func:`resolve_gpus`); default every
        visible one (Caffe's tool needs ``-gpu``; netlite queries all
        without it).

    Returns
    -------
    list of dict
        Per device: ``"id"`` and the fields Caffe prints (CuPy's
        ``getDeviceProperties`` names, e.g. ``"name"``,
        ``"totalGlobalMem"``).

    Raises
    ------
    RuntimeError
        When CuPy is missing, no device is visible, or a requested device
        does not exist.
    """
    logger.info("Querying GPUs %s", gpu if gpu is not None else "all")
    count = visible_gpu_count()
    ids = resolve_gpus("all" if gpu is None else gpu)
    missing = [i for i in ids if i >= count]
    if missing:
        raise RuntimeError(
            f"GPU {', '.join(map(str, missing))} does not exist: {count} CUDA "
            f"device(s) visible (ids 0 to {count - 1})"
        )
    import cupy

    devices = []
    for device_id in ids:
        props = cupy.cuda.runtime.getDeviceProperties(device_id)
        logger.info("%-30s %d", "Device id:", device_id)
        info = {"id": device_id}
        for label, key in _DEVICE_FIELDS:
            if key not in props:
                continue
            info[key] = props[key]
            logger.info("%-30s %s", f"{label}:", _device_value(key, props[key]))
        devices.append(info)
    return devices
