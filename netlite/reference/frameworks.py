"""Framework adapters of ``netlite validate`` (docs/reference.md §5).

An adapter turns a case's stored arrays into its framework's tensors,
builds the :class:`Case` the user's implementation receives, calls the
implementation, and returns the outputs and the gradients as float64 NumPy
arrays:

* ``torch``: tensors are ``torch.float64`` (labels ``torch.int64``);
  inputs and params have ``requires_grad``; gradients come from
  ``torch.autograd.grad(outputs, wrt, grad_outputs=upstream,
  allow_unused=True)``.
* ``jax``: ``jax_enable_x64`` is switched on (``jax.config.update``; without
  it JAX silently computes in float32); gradients come from ``jax.vjp`` of
  a function of (inputs, params), with the stored upstream as cotangent.
* ``netlite``: no autograd.  The implementation computes its own
  gradients; the default one (:func:`netlite_impl`) runs netlite's layer
  (or net) forward and backward on the engine asked for (numpy or numba).

Each framework is imported only when its adapter runs: ``import
netlite.reference`` needs neither torch nor jax.
"""

import importlib
import importlib.util
import os
import sys

import numpy as np

from netlite.reference.corpus import target_of, upstream_of

FRAMEWORKS = ("torch", "jax", "netlite")


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


def normalize_outputs(result, names, is_tensor):
    """The implementation's result as a list in ``names`` order.

    Accepted: a mapping with exactly these names (for a net, the bare blob
    names also work: ``loss`` for ``output.loss``), a sequence of
    ``len(names)`` tensors, or one tensor when there is one output.
    """
    if isinstance(result, dict):
        keys = list(result)
        out = []
        for name in names:
            short = name.split(".", 1)[1] if name.startswith("output.") else None
            if name in result:
                out.append(result[name])
            elif short is not None and short in result:
                out.append(result[short])
            else:
                raise ImplError(
                    f"returned outputs {keys}; missing {name!r} (expected {names})"
                )
        extra = [
            k
            for k in keys
            if k not in names
            and not any(n.startswith("output.") and n[7:] == k for n in names)
        ]
        if extra:
            raise ImplError(f"returned unexpected outputs {extra} (expected {names})")
    elif is_tensor(result):
        if len(names) != 1:
            raise ImplError(f"returned 1 output, the case has {len(names)}: {names}")
        out = [result]
    elif isinstance(result, (list, tuple)):
        if len(result) != len(names):
            raise ImplError(
                f"returned {len(result)} outputs, the case has {len(names)}: {names}"
            )
        out = list(result)
    else:
        raise ImplError(f"returned {type(result).__name__}, expected outputs {names}")
    for name, t in zip(names, out):
        if not is_tensor(t):
            raise ImplError(f"output {name!r} is a {type(t).__name__}, not a tensor")
    return out


def check_shapes(record, outs, shape_of):
    """ImplError when an output's shape is not the stored one (a scalar and
    a one-element shape are interchangeable)."""
    for spec, t in zip(record.specs("output"), outs):
        shape = list(shape_of(t))
        if shape != list(spec.shape) and not (
            int(np.prod(shape)) == 1 and int(np.prod(spec.shape)) == 1
        ):
            raise ImplError(
                f"output {spec.name!r} has shape {shape}, expected {list(spec.shape)}"
            )


def _label_array(name, a, case_id):
    a = np.asarray(a)
    if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
        raise ImplError(f"label {name!r} of {case_id} is not integer-valued")
    return a.astype(np.int64)


def _gradient_targets(record):
    """The input and param names that have a stored gradient."""
    return [target_of(g) for g in record.specs("gradient")]


class RunResult:
    """What an adapter hands back: outputs and gradients (float64 NumPy)
    by name, and the dtype the implementation ran in."""

    def __init__(self, outputs, gradients, dtype):
        self.outputs, self.gradients, self.dtype = outputs, gradients, dtype


def _ran_dtype(requested, dtypes):
    """The least precise float dtype among ``dtypes`` (and ``requested``)."""
    names = {str(d).replace("torch.", "") for d in dtypes} | {requested}
    for name in ("float16", "bfloat16", "float32"):
        if name in names:
            return name
    return "float64"


# ---------------------------------------------------------------- torch
class TorchAdapter:
    name = "torch"

    def __init__(self, dtype="float64", **_):
        import torch

        self.torch = torch
        self.dtype = dtype
        self.tdtype = getattr(torch, dtype)

    def run(self, record, arrays, impl):
        torch = self.torch
        targets = set(_gradient_targets(record))
        inputs, params = {}, {}
        for spec in record.tensors:
            a = arrays[spec.name]
            if spec.role == "label":
                inputs[spec.name] = torch.from_numpy(
                    _label_array(spec.name, a, record.id)
                )
            elif spec.role in ("input", "param"):
                t = torch.tensor(a, dtype=self.tdtype, requires_grad=True)
                (inputs if spec.role == "input" else params)[spec.name] = t
        upstream = {
            s.name: arrays[upstream_of(record, s.name).name]
            for s in record.specs("output")
        }
        case = Case(record, inputs, params, upstream, self.dtype)
        result = impl(case)
        names = case.output_names
        outs = normalize_outputs(result, names, torch.is_tensor)
        check_shapes(record, outs, lambda t: t.shape)
        wrt_names = [n for n in list(inputs) + list(params) if n in targets]
        wrt = [inputs.get(n, params.get(n)) for n in wrt_names]
        diff_outs, grad_outs = [], []
        for name, t in zip(names, outs):
            if t.requires_grad:
                diff_outs.append(t)
                grad_outs.append(
                    torch.as_tensor(upstream[name], dtype=t.dtype).reshape(t.shape)
                )
        grads = [None] * len(wrt)
        if diff_outs and wrt:
            grads = torch.autograd.grad(
                diff_outs, wrt, grad_outputs=grad_outs, allow_unused=True
            )
        gradients = {}
        for n, w, g in zip(wrt_names, wrt, grads):
            g = torch.zeros_like(w) if g is None else g
            gradients[n] = g.detach().cpu().to(torch.float64).numpy()
        outputs = {
            n: t.detach()
            .cpu()
            .to(torch.float64)
            .numpy()
            .reshape(record.specs("output")[i].shape)
            for i, (n, t) in enumerate(zip(names, outs))
        }
        dtype = _ran_dtype(self.dtype, [t.dtype for t in outs])
        return RunResult(outputs, gradients, dtype)


# ------------------------------------------------------------------ jax
class JaxAdapter:
    name = "jax"

    def __init__(self, dtype="float64", **_):
        import jax
        import jax.numpy as jnp

        # Without x64 JAX silently makes every float64 array float32.
        jax.config.update("jax_enable_x64", True)
        self.jax, self.jnp = jax, jnp
        self.dtype = dtype

    def run(self, record, arrays, impl):
        jax, jnp = self.jax, self.jnp
        targets = set(_gradient_targets(record))
        labels, primals, order = {}, {}, []
        for spec in record.tensors:
            a = arrays[spec.name]
            if spec.role == "label":
                labels[spec.name] = jnp.asarray(_label_array(spec.name, a, record.id))
                order.append(spec.name)
            elif spec.role in ("input", "param"):
                primals[spec.name] = jnp.asarray(a, dtype=self.dtype)
                order.append(spec.name)
        roles = {s.name: s.role for s in record.tensors}
        upstream = {
            s.name: arrays[upstream_of(record, s.name).name]
            for s in record.specs("output")
        }
        names = [s.name for s in record.specs("output")]
        diff_names = list(primals)

        def is_tensor(t):
            return isinstance(t, jax.Array) or hasattr(t, "aval")

        def f(values):
            vals = dict(zip(diff_names, values))
            inputs = {
                n: labels[n] if n in labels else vals[n]
                for n in order
                if roles[n] in ("input", "label")
            }
            params = {n: vals[n] for n in order if roles[n] == "param"}
            case = Case(record, inputs, params, upstream, self.dtype)
            return tuple(normalize_outputs(impl(case), names, is_tensor))

        outs, vjp = jax.vjp(f, tuple(primals[n] for n in diff_names))
        check_shapes(record, outs, lambda t: t.shape)
        cot = tuple(
            jnp.asarray(upstream[n], dtype=t.dtype).reshape(t.shape)
            for n, t in zip(names, outs)
        )
        (grads,) = vjp(cot)
        gradients = {
            n: np.asarray(g, dtype=np.float64)
            for n, g in zip(diff_names, grads)
            if n in targets
        }
        outputs = {
            n: np.asarray(t, dtype=np.float64).reshape(record.specs("output")[i].shape)
            for i, (n, t) in enumerate(zip(names, outs))
        }
        dtype = _ran_dtype(self.dtype, [t.dtype for t in outs])
        return RunResult(outputs, gradients, dtype)


# -------------------------------------------------------------- netlite
class NetliteAdapter:
    """netlite's own engines.  The implementation returns ``(outputs,
    gradients)``: outputs as for the other frameworks, ``gradients`` a
    dict from input/param name to d(sum upstream * outputs)/d(that) —
    computed by the implementation from ``case.upstream``."""

    name = "netlite"

    def __init__(self, dtype="float64", engine="numpy", **_):
        from netlite import backend

        self.backend = backend
        self.dtype = dtype
        self.engine = engine or "numpy"
        previous = backend.cpu_engine()
        backend.set_cpu_engine(self.engine)  # checks the name, and Numba
        backend.set_cpu_engine(previous)

    def run(self, record, arrays, impl):
        backend = self.backend
        inputs, params = {}, {}
        for spec in record.tensors:
            if spec.role in ("input", "label"):
                inputs[spec.name] = np.array(arrays[spec.name], dtype=self.dtype)
            elif spec.role == "param":
                params[spec.name] = np.array(arrays[spec.name], dtype=self.dtype)
        upstream = {
            s.name: arrays[upstream_of(record, s.name).name]
            for s in record.specs("output")
        }
        case = Case(record, inputs, params, upstream, self.dtype)
        previous = backend.cpu_engine()
        backend.set_cpu_engine(self.engine)
        try:
            result = impl(case)
        finally:
            backend.set_cpu_engine(previous)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise ImplError("a netlite implementation returns (outputs, gradients)")
        result, grads = result
        names = case.output_names
        outs = normalize_outputs(result, names, lambda t: isinstance(t, np.ndarray))
        check_shapes(record, outs, np.shape)
        if not isinstance(grads, dict):
            raise ImplError("gradients must be a dict from input/param name to array")
        gradients = {}
        for n in _gradient_targets(record):
            if n not in grads:
                raise ImplError(f"returned no gradient for {n!r}")
            gradients[n] = np.asarray(grads[n], dtype=np.float64)
        outputs = {
            n: np.asarray(t, dtype=np.float64).reshape(record.specs("output")[i].shape)
            for i, (n, t) in enumerate(zip(names, outs))
        }
        dtype = _ran_dtype(self.dtype, [t.dtype for t in outs])
        return RunResult(outputs, gradients, dtype)


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


ADAPTERS = {"torch": TorchAdapter, "jax": JaxAdapter, "netlite": NetliteAdapter}


def adapter(framework, **options):
    """An adapter instance for ``framework`` (imports the framework)."""
    try:
        cls = ADAPTERS[framework]
    except KeyError:
        raise ValueError(
            f"unknown framework {framework!r}; choose one of {', '.join(FRAMEWORKS)}"
        ) from None
    return cls(**options)
