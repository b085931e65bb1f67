"""Reading and writing Caffe's protobuf formats and netlite's .npz weights.

All parsing goes through the protobuf library (``text_format`` for
prototxt, ``ParseFromString`` for binary files) against netlite's
Caffe-compatible schema, so there is no hand-written parser.  Errors carry
protobuf's ``line:column`` and the file name.
"""

import os
import secrets
import zipfile
import zlib

import numpy as np
from google.protobuf import message as pb_message
from google.protobuf import text_format

from netlite.errors import PrototxtError, WeightsFileError
from netlite.proto import netlite_pb2

NetParameter = netlite_pb2.NetParameter
LayerParameter = netlite_pb2.LayerParameter
SolverParameter = netlite_pb2.SolverParameter
SolverState = netlite_pb2.SolverState
BlobProto = netlite_pb2.BlobProto
FillerParameter = netlite_pb2.FillerParameter
NetState = netlite_pb2.NetState


def _looks_like_path(text):
    # Prototxt text always has a "field:" or "field {"; a bare path has neither.
    return "\n" not in text and "{" not in text and ":" not in text


def parse_text(text, message_type, source="<string>"):
    """Parse prototxt ``text`` into a new ``message_type`` message.

    Raises
    ------
    PrototxtError
        With ``source:line:column`` and protobuf's explanation.
    """
    msg = message_type()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as exc:
        line, col = exc.GetLine(), exc.GetColumn()
        where = f"{source}:{line}:{col}" if line else source
        hint = ""
        if message_type is NetParameter and 'no field named "layers"' in str(exc):
            hint = (
                " (this is Caffe's V1 'layers { }' syntax, which netlite does not "
                "read; convert the file with Caffe's upgrade_net_proto_text tool)"
            )
        raise PrototxtError(
            f"{where}: cannot parse {message_type.DESCRIPTOR.name}: {exc}{hint}"
        ) from None
    return msg


def read_text_message(model, message_type):
    """Return a message from a message, a prototxt path, or prototxt text."""
    if isinstance(model, message_type):
        return model
    if isinstance(model, pb_message.Message):
        raise TypeError(
            f"expected a {message_type.DESCRIPTOR.name}, got "
            f"{model.DESCRIPTOR.name}"
        )
    model = os.fspath(model)
    if os.path.isfile(model):
        with open(model, encoding="utf-8") as f:
            return parse_text(f.read(), message_type, source=model)
    if _looks_like_path(model):
        raise FileNotFoundError(f"prototxt file not found: {model}")
    return parse_text(model, message_type)


def read_net_param(model):
    """Return a NetParameter (legacy inputs upgraded to an Input layer)."""
    param = read_text_message(model, NetParameter)
    return upgrade_net_param(param)


def read_solver_param(solver):
    """Return a SolverParameter from a path, text or message."""
    return read_text_message(solver, SolverParameter)


def parse_layer_param(layer_param):
    """Return a LayerParameter from a message or prototxt text."""
    if isinstance(layer_param, LayerParameter):
        return layer_param
    if layer_param is None:
        return LayerParameter()
    return parse_text(layer_param, LayerParameter)


def upgrade_net_param(param):
    """Upgrade Caffe's legacy ``input``/``input_shape``/``input_dim`` fields.

    They become an ``Input`` layer named "input" in front of the others, as
    Caffe's UpgradeNetInput does.  Returns a new message; the argument is
    not modified.
    """
    if not param.input:
        return param
    if param.input_dim and param.input_shape:
        raise PrototxtError("net gives both input_dim and input_shape")
    n = len(param.input)
    if param.input_dim and len(param.input_dim) != 4 * n:
        raise PrototxtError(
            f"input_dim must list 4 values per input ({4 * n}), got "
            f"{len(param.input_dim)}"
        )
    if param.input_shape and len(param.input_shape) not in (1, n):
        raise PrototxtError("input_shape must be given once or once per input")
    upgraded = NetParameter()
    upgraded.CopyFrom(param)
    del upgraded.input[:]
    del upgraded.input_shape[:]
    del upgraded.input_dim[:]
    del upgraded.layer[:]
    layer = upgraded.layer.add(name="input", type="Input")
    for i, name in enumerate(param.input):
        layer.top.append(name)
        shape = layer.input_param.shape.add()
        if param.input_dim:
            shape.dim.extend(param.input_dim[4 * i: 4 * i + 4])
        elif param.input_shape:
            src = param.input_shape[i if len(param.input_shape) > 1 else 0]
            shape.dim.extend(src.dim)
    upgraded.layer.extend(param.layer)
    return upgraded


def to_text(message):
    """Prototxt text of a message."""
    return text_format.MessageToString(message)


def make_temp_file(directory, prefix=".tmp-", suffix=""):
    """Create a new empty file in ``directory``; return ``(fd, path)``.

    Like :func:`tempfile.mkstemp`, except for the permissions: the file is
    created with mode ``0o666`` less the process umask, as ``open()``
    creates files, instead of mkstemp's ``0o600``.  The temporary file
    becomes an output (a snapshot, a weights file, a plot) once renamed,
    and outputs must be readable by whoever the umask lets read the rest.

    Raises
    ------
    FileExistsError
        When no unused name was found (100 random names tried).
    """
    flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL
             | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0))
    for _ in range(100):
        path = os.path.join(directory, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no unused temporary file name in {directory}")


def make_temp_dir(directory, prefix=".tmp-"):
    """Create a new empty directory in ``directory``; return its path.

    Like :func:`tempfile.mkdtemp`, except that the mode is ``0o777`` less
    the process umask, as ``os.mkdir`` creates directories (mkdtemp's
    ``0o700`` would hide a database renamed into place from everyone else).
    """
    for _ in range(100):
        path = os.path.join(directory, f"{prefix}{secrets.token_hex(6)}")
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no unused temporary directory name in {directory}")


def atomic_write_bytes(path, payload):
    """Write ``payload`` to ``path`` atomically (temporary file + rename).

    A crash or Ctrl-C leaves either the old file or the new one, never a
    truncated file.  The file gets the permissions ``open()`` gives a new
    file, ``0o666`` less the umask (:func:`make_temp_file`), also when it
    replaces one: it is a new file, and a snapshot that an older netlite
    wrote with mode 0600 does not keep that mode when it is rewritten.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = make_temp_file(directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_binary_net_param(path):
    """Decode a binary ``.caffemodel`` (a serialized NetParameter)."""
    with open(path, "rb") as f:
        payload = f.read()
    param = NetParameter()
    try:
        param.ParseFromString(payload)
    except pb_message.DecodeError as exc:
        raise WeightsFileError(
            f"{path}: not a Caffe .caffemodel (binary NetParameter): {exc}"
        ) from None
    if not any(layer.blobs for layer in param.layer):
        # Random bytes (or an empty file) can decode into an empty message; a
        # caffemodel without a single weight blob is not something to load.
        raise WeightsFileError(f"{path}: decodes as a NetParameter with no weights")
    return param


def load_npz_weights(path):
    """Read netlite ``.npz`` weights: ``{layer_name: [array, ...]}``.

    Keys are ``"<layer>/<index>"``.  Never unpickles (``allow_pickle=False``).

    Raises
    ------
    WeightsFileError
        When the file is not a readable .npz of numeric arrays with such keys.
    """
    # Open the file here so that it is closed even when NumPy fails half-way
    # through (np.load leaks its own handle on a corrupt zip).
    with open(path, "rb") as f:
        try:
            archive = np.load(f, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise WeightsFileError(
                f"{path}: not a netlite .npz weights file: {exc}"
            ) from None
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise WeightsFileError(f"{path}: a .npy array, not an .npz archive")
        with archive:
            return _read_npz_members(path, archive)


def _read_npz_members(path, archive):
    weights = {}
    for key in archive.files:
        layer, sep, index = key.rpartition("/")
        if not sep or not index.isdigit():
            raise WeightsFileError(
                f"{path}: key {key!r} is not '<layer>/<blob index>'"
            )
        # Members are read lazily: an object (pickled) array is refused here,
        # at access time, with a ValueError; a damaged member fails to inflate.
        try:
            array = archive[key]
        except ValueError as exc:
            raise WeightsFileError(
                f"{path}: member {key!r} cannot be read without unpickling "
                f"({exc}); netlite .npz weights hold plain numeric arrays"
            ) from None
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise WeightsFileError(
                f"{path}: member {key!r} is damaged: {exc}"
            ) from None
        if array.dtype.kind not in "fiu":
            raise WeightsFileError(
                f"{path}: member {key!r} has dtype {array.dtype}; weights "
                "must be numeric"
            )
        weights.setdefault(layer, {})[int(index)] = array
    return {
        name: [blobs[i] for i in sorted(blobs)] for name, blobs in weights.items()
    }


def save_npz_weights(path, weights):
    """Write ``{layer_name: [array, ...]}`` as a netlite ``.npz`` atomically."""
    import io as _io

    arrays = {
        f"{name}/{i}": np.asarray(a) for name, blobs in weights.items()
        for i, a in enumerate(blobs)
    }
    buf = _io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
