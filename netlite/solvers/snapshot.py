"""Solver snapshots: the ``.caffemodel`` / ``.solverstate`` pair.

:func:`write_snapshot` writes Caffe's two files (atomically): the train
net's weights as a ``NetParameter`` and a ``SolverState`` with ``iter``,
``current_step``, ``learned_net`` and the history blobs.  netlite adds the
``netlite_state`` bytes field: an ``.npz`` archive (no pickle) holding a
JSON manifest (format, version, RNG state, loss-smoothing window, the
``state_dict()`` of every stateful layer, arrays referenced by name) and
the arrays.  :func:`capture_state` takes that extra state,
:func:`read_solver_state`, :func:`resolve_learned_net` and
:func:`load_netlite_state` read it back, so that a restored solver continues
bit for bit.  A Caffe-written state has no ``netlite_state`` and still
loads.  See docs/engine/solvers.md §7.
"""

import io as _pyio
import json
import logging
import os

import numpy as np
from google.protobuf import message as pb_message

from netlite import backend, io, rng
from netlite.blob import Blob
from netlite.proto import netlite_pb2
from netlite.solvers.errors import SolverStateError
from netlite.solvers.params import snapshot_filename

logger = logging.getLogger("netlite")

#: Version of the ``netlite_state`` archive layout inside a .solverstate.
_STATE_FORMAT = "netlite-solverstate"
_STATE_VERSION = 1


# --------------------------------------------------------- state encoding
def _copy_state(value):
    # Layers may keep mutating the arrays their state_dict returns.
    if isinstance(value, dict):
        return {k: _copy_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy_state(v) for v in value]
    if isinstance(value, np.generic):
        return value
    if hasattr(value, "__array__") and not isinstance(value, (str, bytes)):
        return backend.to_numpy(value).copy()
    return value


def _encode(value, arrays, where):
    """JSON-able description of ``value``; arrays go into ``arrays``."""
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(
                    f"{where}: state keys must be strings, got {key!r}"
                )
        return {"dict": {k: _encode(v, arrays, f"{where}.{k}")
                         for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return {"list": [_encode(v, arrays, f"{where}[{i}]")
                         for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"json": value}
    if isinstance(value, np.generic) or hasattr(value, "__array__"):
        array = np.asarray(backend.to_numpy(value))
        if array.dtype.hasobject:
            raise TypeError(f"{where}: object arrays cannot be stored without pickle")
        name = f"array_{len(arrays)}"
        arrays[name] = array
        return {"scalar" if isinstance(value, np.generic) else "array": name}
    raise TypeError(
        f"{where}: cannot store a {type(value).__name__} in a solver state "
        "(use arrays, numbers, strings, None, lists and dicts)"
    )


def _decode(spec, archive):
    kind, payload = next(iter(spec.items()))
    if kind == "dict":
        return {k: _decode(v, archive) for k, v in payload.items()}
    if kind == "list":
        return [_decode(v, archive) for v in payload]
    if kind == "json":
        return payload
    if kind == "array":
        return archive[payload]
    if kind == "scalar":
        return archive[payload][()]
    raise SolverStateError(f"unknown entry kind {kind!r} in netlite_state")


def _json_array(obj):
    return np.frombuffer(json.dumps(obj).encode("utf-8"), dtype=np.uint8)


def encode_netlite_state(extra):
    """The ``netlite_state`` bytes for a :func:`capture_state` dict."""
    arrays = {}
    manifest = {
        "format": _STATE_FORMAT,
        "version": _STATE_VERSION,
        "rng": extra["rng"],
        "smoothing": extra["smoothing"],
        "layers": [
            {"net": net_index, "layer": name,
             "state": _encode(state, arrays, f"layer '{name}' state")}
            for net_index, name, state in extra["layers"]
        ],
    }
    buf = _pyio.BytesIO()
    np.savez(buf, manifest=_json_array(manifest), **arrays)
    return buf.getvalue()


# ---------------------------------------------------------------- capture
def stateful_layers(nets):
    """``(net_index, name, layer)`` for every layer with a ``state_dict``."""
    for net_index, net in enumerate(nets):
        for name, layer in zip(net.layer_names, net.layers):
            if callable(getattr(layer, "state_dict", None)):
                yield net_index, name, layer


def capture_state(nets, smoothing):
    """What a bit-exact resume needs beyond Caffe's SolverState.

    Parameters
    ----------
    nets : list of Net
        The train net followed by the test nets.
    smoothing : dict
        The solver's loss window: ``losses``, ``smoothed_loss``,
        ``window_start``.

    Returns
    -------
    dict
        ``rng`` (the global generator's state), ``smoothing`` and
        ``layers``: ``(net_index, name, state)`` with copies of the arrays.
    """
    layers = []
    for net_index, name, layer in stateful_layers(nets):
        state = layer.state_dict()
        if state:
            layers.append((net_index, name, _copy_state(state)))
    return {"rng": rng.get_state(), "smoothing": smoothing, "layers": layers}


# ---------------------------------------------------------------- writing
def write_snapshot(param, net, iteration, current_step, history, extra):
    """Write ``<prefix>_iter_<N>.caffemodel`` and ``.solverstate``.

    Parameters
    ----------
    param : SolverParameter
        ``snapshot_prefix`` and ``snapshot_diff``.
    net : Net
        The train net.
    iteration, current_step : int
        The solver's position.
    history : list of Blob
        The solver's history blobs.
    extra : dict
        A :func:`capture_state` dict for ``netlite_state``.

    Returns
    -------
    model_path, state_path : str
    """
    model_path = snapshot_filename(param, iteration, ".caffemodel")
    logger.info("Snapshotting to binary proto file %s", model_path)
    net_param = net.to_proto(write_diff=param.snapshot_diff)
    io.atomic_write_bytes(model_path, net_param.SerializeToString())
    state = netlite_pb2.SolverState(
        iter=iteration, learned_net=model_path, current_step=current_step
    )
    for blob in history:
        state.history.add().CopyFrom(blob.to_proto())
    state.netlite_state = encode_netlite_state(extra)
    state_path = snapshot_filename(param, iteration, ".solverstate")
    logger.info(
        "Snapshotting solver state to binary proto file %s", state_path
    )
    io.atomic_write_bytes(state_path, state.SerializeToString())
    return model_path, state_path


# ---------------------------------------------------------------- reading
def read_solver_state(path, history, solver_type):
    """Parse ``path`` and check its history against the solver's blobs.

    Raises
    ------
    SolverStateError
        For an HDF5 or unparsable file, or history blobs whose count or
        shapes differ from ``history`` (e.g. an SGD state into Adam).
    """
    if path.endswith(".h5"):
        raise SolverStateError(
            f"{path}: HDF5 solver states are not supported; use a binary "
            ".solverstate"
        )
    with open(path, "rb") as f:
        payload = f.read()
    state = netlite_pb2.SolverState()
    try:
        state.ParseFromString(payload)
    except pb_message.DecodeError as exc:
        raise SolverStateError(f"{path}: not a SolverState: {exc}") from None
    if len(state.history) != len(history):
        raise SolverStateError(
            f"{path}: {len(state.history)} history blob(s), this "
            f"{solver_type} solver has {len(history)}"
        )
    for i, (proto, blob) in enumerate(zip(state.history, history)):
        shape = Blob.proto_shape(proto)
        if not blob.shape_equals_proto_shape(shape):
            raise SolverStateError(
                f"{path}: history blob {i} has shape {tuple(shape)}, the "
                f"solver expects {blob.shape}"
            )
    return state


def resolve_learned_net(learned_net, state_path):
    """The weights file a SolverState's ``learned_net`` names."""
    # Caffe stores the model path as written; look beside the state
    # file too, so snapshots can be moved or resumed from elsewhere.
    if os.path.isfile(learned_net):
        return learned_net
    beside = os.path.join(
        os.path.dirname(os.path.abspath(state_path)),
        os.path.basename(learned_net),
    )
    if os.path.isfile(beside):
        return beside
    raise SolverStateError(
        f"{state_path}: learned_net '{learned_net}' not found (also tried "
        f"{beside})"
    )


def load_netlite_state(payload, path, nets):
    """Give every stateful layer of ``nets`` its saved state and restore
    the RNG from a ``netlite_state`` payload.

    Returns
    -------
    dict
        The saved loss window: ``losses``, ``smoothed_loss``,
        ``window_start``.
    """
    try:
        archive = np.load(_pyio.BytesIO(payload), allow_pickle=False)
        with archive:
            arrays = {k: archive[k] for k in archive.files}
        manifest = json.loads(arrays.pop("manifest").tobytes().decode("utf-8"))
    except (ValueError, OSError, KeyError, UnicodeDecodeError) as exc:
        raise SolverStateError(f"{path}: unreadable netlite_state: {exc}") from None
    if manifest.get("format") != _STATE_FORMAT or manifest.get(
        "version"
    ) != _STATE_VERSION:
        raise SolverStateError(
            f"{path}: netlite_state format {manifest.get('format')!r} version "
            f"{manifest.get('version')!r} is not {_STATE_FORMAT!r} version "
            f"{_STATE_VERSION}"
        )
    restored = set()
    for entry in manifest["layers"]:
        net_index, name = entry["net"], entry["layer"]
        if net_index >= len(nets) or not nets[net_index].has_layer(name):
            logger.warning(
                "%s: state of layer '%s' (net #%d) has no layer to go to; "
                "ignored", path, name, net_index,
            )
            continue
        layer = nets[net_index].layer_by_name(name)
        if not callable(getattr(layer, "load_state_dict", None)):
            logger.warning(
                "%s: layer '%s' cannot load its saved state; ignored", path, name
            )
            continue
        layer.load_state_dict(_decode(entry["state"], arrays))
        restored.add((net_index, name))
    for net_index, name, layer in stateful_layers(nets):
        if (net_index, name) not in restored and layer.state_dict():
            logger.warning(
                "%s: no saved state for layer '%s' (net #%d); it starts "
                "afresh", path, name, net_index,
            )
    rng.set_state(manifest["rng"])
    smoothing = manifest["smoothing"]
    return {
        "losses": [float(v) for v in smoothing["losses"]],
        "smoothed_loss": float(smoothing["smoothed_loss"]),
        "window_start": int(smoothing["window_start"]),
    }
