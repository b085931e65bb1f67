"""The implementation side of ``netlite validate`` (docs/reference.md §5):
the :class:`Case` an implementation receives, loading an implementation
by name (``--impl module:function``), and netlite's own implementation
(:func:`netlite_impl`, the default of the ``netlite`` framework).  The
framework adapters that call implementations are in
:mod:`netlite.reference.frameworks`.
"""

import importlib
import importlib.util
import os
import sys

import numpy as np

from netlite.reference.corpus import target_of


class ImplError(Exception):
    """The implementation returned something the harness cannot use (wrong
    number, names or shapes of outputs, not a tensor)."""


def _widen_floats(message, d):
    """Replace, in ``d`` (``message`` as MessageToDict wrote it), every float32
    field by its exact value widened to float64: MessageToDict writes a
    float field at its shortest float32 repr (0.1), not the value netlite
    computes with (0.10000000149011612)."""
    for fd, value in message.ListFields():
        if fd.name not in d:
            continue
        if fd.type == fd.TYPE_FLOAT:
            if fd.is_repeated:
                d[fd.name] = [float(np.float32(float(v))) for v in d[fd.name]]
            else:
                d[fd.name] = float(np.float32(float(d[fd.name])))
        elif fd.type == fd.TYPE_MESSAGE and not fd.message_type.GetOptions().map_entry:
            if fd.is_repeated:
                for m, sub in zip(value, d[fd.name]):
                    _widen_floats(m, sub)
            else:
                _widen_floats(value, d[fd.name])


class Case:
    """What an implementation receives: one case of the corpus.

    Attributes
    ----------
    id : str
        ``<Type>/<name>``.
    layer_type : str
    kind : {"layer", "net"}
    prototxt : str
        A ``LayerParameter`` (kind layer) or ``NetParameter`` (kind net) text.
    message : protobuf message
        ``prototxt`` parsed.
    params_text : dict
        ``message`` as a dict
        (``json_format.MessageToDict(message, preserving_proto_field_name=True)``):
        ``case.params_text["inner_product_param"]["num_output"]``.  Floats are
        the proto's float32 values widened exactly; 64-bit integers are
        strings (protobuf's JSON mapping).
    inputs : dict name -> tensor
        ``bottom.<i>`` / ``input.<blob>`` in manifest order: inputs as
        floating tensors (differentiable), labels as integer tensors.
    params : dict name -> tensor
        ``param.<i>`` / ``param.<layer>.<i>`` (differentiable).
    output_names : list of str
        The outputs the implementation must return, in order.
    labels : list of str
        The names in ``inputs`` that are labels.
    upstream : dict output name -> ndarray
        The stored upstream gradients (float64 NumPy).  Only the ``netlite``
        framework's implementations need them; for torch and jax the
        harness applies them.
    dtype : str
        The floating dtype of ``inputs`` and ``params``.
    tolerance, edges, description, docs, equation, seed
        From the manifest.
    record : CaseRecord
    """

    def __init__(self, record, inputs, params, upstream, dtype):
        from google.protobuf import json_format

        self.record = record
        self.id = record.id
        self.layer_type = record.layer_type
        self.kind = record.kind
        self.prototxt = record.prototxt
        self.message = parse_prototxt(record)
        self.params_text = json_format.MessageToDict(
            self.message, preserving_proto_field_name=True
        )
        _widen_floats(self.message, self.params_text)
        self.inputs = inputs
        self.params = params
        self.output_names = [s.name for s in record.specs("output")]
        self.labels = [s.name for s in record.specs("label")]
        self.upstream = upstream
        self.dtype = dtype
        self.tolerance = record.tolerance
        self.edges = list(record.edges)
        self.description = record.description
        self.docs = record.docs
        self.equation = record.equation
        self.seed = record.seed

    def __repr__(self):
        return f"Case({self.id!r})"


def parse_prototxt(record):
    """The case's prototxt as a LayerParameter or NetParameter message."""
    from netlite import io
    from netlite.proto.netlite_pb2 import LayerParameter, NetParameter

    kind = LayerParameter if record.kind == "layer" else NetParameter
    return io.parse_text(record.prototxt, kind, source=f"case {record.id}")


def load_impl(spec):
    """``module:function`` (or ``path/to/file.py:function``) -> the callable.

    A module that is not importable is also looked for in the working
    directory (console scripts do not put it on ``sys.path``).
    """
    module_name, sep, attr = str(spec).rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"--impl {spec!r}: expected module:function or file.py:function"
        )
    if module_name.endswith(".py") or os.sep in module_name:
        path = os.path.abspath(module_name)
        if not os.path.isfile(path):
            raise ValueError(f"--impl {spec!r}: no file {module_name}")
        name = "_netlite_impl_" + os.path.splitext(os.path.basename(path))[0]
        loader_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name.split(".")[0] or os.getcwd() in sys.path:
                raise
            sys.path.insert(0, os.getcwd())
            try:
                module = importlib.import_module(module_name)
            finally:
                sys.path.remove(os.getcwd())
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(
                f"--impl {spec!r}: {module_name} has no {attr!r}"
            ) from None
    if not callable(obj):
        raise ValueError(f"--impl {spec!r}: {attr} is not callable")
    return obj


def _index(name):
    return int(name.rsplit(".", 1)[1])


def netlite_impl(case):
    """netlite's own implementation (for the ``netlite`` framework): the
    layer (kind layer) or net (kind net) built in ``case.dtype``, forward,
    the stored upstream gradients as top diffs, backward; returns
    ``(outputs, gradients)``.  Runs on the current CPU engine."""
    if case.kind == "net":
        return _netlite_net(case)
    return _netlite_layer(case)


def _netlite_layer(case):
    from netlite.blob import Blob
    from netlite.registry import create_layer

    dtype = np.dtype(case.dtype)
    layer = create_layer(case.message, dtype=dtype)
    bottom_names = sorted(case.inputs, key=_index)
    bottoms = []
    for name in bottom_names:
        value = case.inputs[name]
        b = Blob(value.shape, dtype=dtype)
        b.data[...] = value
        bottoms.append(b)
    top_names = sorted(case.output_names, key=_index)
    tops = [Blob(dtype=dtype) for _ in top_names]
    layer.setup(bottoms, tops)
    for name, value in case.params.items():
        i = _index(name)
        if i >= len(layer.blobs) or tuple(layer.blobs[i].shape) != value.shape:
            have = [tuple(b.shape) for b in layer.blobs]
            raise ImplError(
                f"{layer.describe()}: param {name} {value.shape}; layer has {have}"
            )
        layer.blobs[i].data[...] = value
    layer.forward(bottoms, tops)
    outputs = {n: np.array(t.data) for n, t in zip(top_names, tops)}
    for n, t in zip(top_names, tops):
        t.diff[...] = case.upstream[n]
    for b in layer.blobs:
        b.diff[...] = 0
    wanted = {target_of(g) for g in case.record.specs("gradient")}
    propagate = [n in wanted and n not in case.labels for n in bottom_names]
    if any(propagate) or layer.blobs:
        layer.backward(tops, propagate, bottoms)
    grads = {
        n: np.array(b.diff) for n, b, p in zip(bottom_names, bottoms, propagate) if p
    }
    for name in case.params:
        grads[name] = np.array(layer.blobs[_index(name)].diff)
    return outputs, grads


def _netlite_net(case):
    from netlite.layer import TRAIN
    from netlite.net import Net
    from netlite.proto.netlite_pb2 import NetParameter

    param = NetParameter()
    param.CopyFrom(case.message)
    param.force_backward = True
    # NetState's proto default phase is TEST (Caffe's); a case net is a TRAIN
    # net unless its prototxt sets a phase.
    has_phase = param.HasField("state") and param.state.HasField("phase")
    phase = param.state.phase if has_phase else TRAIN
    net = Net(param, phase, dtype=np.dtype(case.dtype))
    for name, value in case.params.items():
        _, layer, i = name.split(".", 2)
        if layer not in net.params or int(i) >= len(net.params[layer]):
            raise ImplError(f"net has no param {name}")
        net.params[layer][int(i)].data[...] = value
    feeds = {name.split(".", 1)[1]: v for name, v in case.inputs.items()}
    net.forward(**feeds)
    blob_of = {n: n.split(".", 1)[1] for n in case.output_names}
    outputs = {n: np.array(net.blobs[b].data) for n, b in blob_of.items()}
    # Backward with an upstream gradient on every stored output, whether a
    # net output or an intermediate blob: zero every diff, then, going down,
    # put the upstream into a blob's diff just before the last layer that
    # produced it runs its backward (added to what its consumers wrote).
    net.clear_param_diffs()
    for vec in net.top_vecs + net.bottom_vecs:
        for b in vec:
            b.diff[...] = 0
    pending = {b: case.upstream[n] for n, b in blob_of.items()}
    for i in range(len(net.layers) - 1, -1, -1):
        tops = net.top_vecs[i]
        for j, blob_id in enumerate(net.top_id_vecs[i]):
            name = net._blob_names[blob_id]
            if name is not None and name in pending:
                tops[j].diff[...] += pending.pop(name)
        if net.layer_need_backward[i]:
            net.layers[i].backward(
                tops, net.bottom_need_backward[i], net.bottom_vecs[i]
            )
    grads = {}
    for name in case.inputs:
        if name not in case.labels:
            grads[name] = np.array(net.blobs[name.split(".", 1)[1]].diff)
    for name in case.params:
        _, layer, i = name.split(".", 2)
        grads[name] = np.array(net.params[layer][int(i)].diff)
    return outputs, grads
