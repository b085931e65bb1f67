"""Framework adapters of ``netlite validate`` (docs/reference.md §5).

An adapter turns a case's stored arrays into its framework's tensors,
builds the :class:`~netlite.reference.impl.Case` the user's implementation
receives, calls the implementation, and returns the outputs and the
gradients as float64 NumPy arrays:

* ``torch``: tensors are ``torch.float64`` (labels ``torch.int64``);
  inputs and params have ``requires_grad``; gradients come from
  ``torch.autograd.grad(outputs, wrt, grad_outputs=upstream,
  allow_unused=True)``.
* ``jax``: ``jax_enable_x64`` is switched on (``jax.config.update``; without
  it JAX silently computes in float32); gradients come from ``jax.vjp`` of
  a function of (inputs, params), with the stored upstream as cotangent.
* ``netlite``: no autograd.  The implementation computes its own
  gradients; the default one (:func:`netlite.reference.impl.netlite_impl`)
  runs netlite's layer (or net) forward and backward on the engine asked
  for (numpy or numba).

What an implementation receives and how one is loaded live in
:mod:`netlite.reference.impl` (re-exported here).  Each framework is
imported only when its adapter runs: ``import netlite.reference`` needs
neither torch nor jax.
"""

import numpy as np

from netlite.reference.corpus import target_of, upstream_of
from netlite.reference.impl import (  # noqa: F401  (re-exported)
    Case,
    ImplError,
    load_impl,
    netlite_impl,
    parse_prototxt,
)

FRAMEWORKS = ("torch", "jax", "netlite")


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


def _upstream(record, arrays):
    """The stored upstream gradient of every output, by output name."""
    return {
        s.name: arrays[upstream_of(record, s.name).name] for s in record.specs("output")
    }


def _run_result(record, requested, names, outs, gradients, to_numpy=None):
    """The RunResult of the outputs ``outs`` (named ``names``; ``to_numpy``
    converts one to NumPy), as float64 in their stored shapes."""
    shapes = [s.shape for s in record.specs("output")]
    outputs = {
        n: np.asarray(to_numpy(t) if to_numpy else t, dtype=np.float64).reshape(shape)
        for n, t, shape in zip(names, outs, shapes)
    }
    dtype = _ran_dtype(requested, [t.dtype for t in outs])
    return RunResult(outputs, gradients, dtype)


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
        upstream = _upstream(record, arrays)
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

        def to_numpy(t):
            return t.detach().cpu().to(torch.float64).numpy()

        gradients = {
            n: to_numpy(torch.zeros_like(w) if g is None else g)
            for n, w, g in zip(wrt_names, wrt, grads)
        }
        return _run_result(record, self.dtype, names, outs, gradients, to_numpy)


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
        upstream = _upstream(record, arrays)
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
        return _run_result(record, self.dtype, names, outs, gradients)


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
        upstream = _upstream(record, arrays)
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
        return _run_result(record, self.dtype, names, outs, gradients)


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
