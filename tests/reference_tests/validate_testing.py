"""Small hand-computed corpora for the corpus / validate / CLI tests.

Built with netlite.reference.format's writers from NumPy formulas (not
from netlite's layers), so the tests hold netlite to independent numbers:

* ``InnerProduct/basic``: y = x W^T + b, with a surrogate ``HALF`` that
  stores half the true input gradient (to test surrogate matching);
* ``SoftmaxWithLoss/basic``: loss = -mean log softmax(x)[label];
* ``Head/ip_softmax`` (kind net): x -> InnerProduct -> fc -> SoftmaxWithLoss,
  outputs fc (an intermediate blob) and loss.
"""

import numpy as np

from netlite.reference import format as fmt
from netlite.reference.format import CaseRecord, TensorSpec

TOL = {
    "float64": {"rtol": 1e-12, "atol": 1e-14},
    "float32": {"rtol": 1e-5, "atol": 1e-7},
}

IP_PROTO = 'name: "ip" type: "InnerProduct" inner_product_param { num_output: 2 }'
LOSS_PROTO = 'name: "loss" type: "SoftmaxWithLoss"'
NET_PROTO = """
name: "head"
layer { name: "data" type: "Input" top: "x" top: "label"
        input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "fc"
        inner_product_param { num_output: 5 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss"
        include { phase: TRAIN } }
"""


#: The role of a tensor, by the prefix of its name (labels are named apart).
_ROLES = {
    "bottom": "input",
    "input": "input",
    "param": "param",
    "top": "output",
    "output": "output",
    "top_diff": "upstream",
    "output_diff": "upstream",
    "grad": "gradient",
    "surrogate": "surrogate",
}


def _spec(name, a, labels):
    """The TensorSpec of ``name``: role from the prefix, ``of`` the tensor it
    belongs to (``top_diff.0`` -> ``top.0``, ``grad.x`` -> ``x``,
    ``surrogate.M.grad.x`` -> ``x``, mode ``M``)."""
    prefix, _, rest = name.partition(".")
    role = "label" if name in labels else _ROLES[prefix]
    of = surrogate = None
    if role == "upstream":
        of = prefix[: -len("_diff")] + "." + rest
    elif role == "gradient":
        of = rest
    elif role == "surrogate":
        surrogate, _, grad = rest.partition(".")
        of = grad.partition(".")[2]
    return TensorSpec(name, role, list(a.shape), str(a.dtype), of, surrogate)


def _record(case_id, kind, prototxt, seed, arrays, labels=(), **meta):
    """The CaseRecord of ``arrays`` (roles from the names, ``labels`` the
    label tensors), at tolerance TOL."""
    return CaseRecord(
        id=case_id,
        kind=kind,
        layer_type=case_id.split("/")[0],
        prototxt=prototxt,
        seed=seed,
        tensors=[_spec(n, a, labels) for n, a in arrays.items()],
        tolerance=TOL,
        **meta,
    )


def _softmax_loss(x, label):
    z = x - x.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    n = x.shape[0]
    loss = -np.mean(np.log(p[np.arange(n), label.astype(int)]))
    onehot = np.zeros_like(p)
    onehot[np.arange(n), label.astype(int)] = 1
    return loss, (p - onehot) / n


def inner_product_case(rng):
    x, w, b = rng.normal(size=(3, 4)), rng.normal(size=(2, 4)), rng.normal(size=2)
    up = rng.normal(size=(3, 2))
    arrays = {
        "bottom.0": x,
        "param.0": w,
        "param.1": b,
        "top.0": x @ w.T + b,
        "top_diff.0": up,
        "grad.bottom.0": up @ w,
        "grad.param.0": up.T @ x,
        "grad.param.1": up.sum(0),
        "surrogate.HALF.grad.bottom.0": 0.5 * (up @ w),
    }
    record = _record(
        "InnerProduct/basic",
        "layer",
        IP_PROTO,
        1,
        arrays,
        docs="docs/layers/inner_product.md#forward",
        edges=["spatial"],
        description="y = x W^T + b",
    )
    return record, arrays


def softmax_loss_case(rng):
    x = rng.normal(size=(4, 3)) * 2
    label = np.array([0.0, 2.0, 1.0, 2.0])
    loss, g = _softmax_loss(x, label)
    up = np.array(rng.normal() + 2.0)  # a random scalar, not 1
    arrays = {
        "bottom.0": x,
        "bottom.1": label,
        "top.0": np.array(loss),
        "top_diff.0": up,
        "grad.bottom.0": up * g,
    }
    record = _record(
        "SoftmaxWithLoss/basic",
        "layer",
        LOSS_PROTO,
        2,
        arrays,
        labels=("bottom.1",),
        docs="docs/layers/softmax_loss.md#forward",
        description="mean cross-entropy",
    )
    return record, arrays


def net_case(rng):
    x, label = rng.normal(size=(4, 3)), np.array([4.0, 0.0, 2.0, 2.0])
    w, b = rng.normal(size=(5, 3)), rng.normal(size=5)
    fc = x @ w.T + b
    loss, g = _softmax_loss(fc, label)
    up_fc, up_loss = rng.normal(size=(4, 5)), np.array(rng.normal() - 2.0)
    dfc = up_fc + up_loss * g
    arrays = {
        "input.x": x,
        "input.label": label,
        "param.ip.0": w,
        "param.ip.1": b,
        "output.fc": fc,
        "output.loss": np.array(loss),
        "output_diff.fc": up_fc,
        "output_diff.loss": up_loss,
        "grad.input.x": dfc @ w,
        "grad.param.ip.0": dfc.T @ x,
        "grad.param.ip.1": dfc.sum(0),
    }
    record = _record(
        "Head/ip_softmax",
        "net",
        NET_PROTO,
        3,
        arrays,
        labels=("input.label",),
        docs="docs/layers/margin_family.md#heads",
        description="fc + softmax loss",
    )
    return record, arrays


BUILDERS = {
    "InnerProduct": inner_product_case,
    "SoftmaxWithLoss": softmax_loss_case,
    "Head": net_case,
}


def write_corpus(
    directory, which=("InnerProduct", "SoftmaxWithLoss"), seed=0, mutate=None
):
    """Write a small corpus; ``mutate(record, arrays)`` may change a case
    before it is written.  Returns the records."""
    rng = np.random.default_rng(seed)
    records = []
    for name in which:
        record, arrays = BUILDERS[name](rng)
        if mutate is not None:
            mutate(record, arrays)
        fmt.write_case(str(directory), record, arrays)
        records.append(record)
    fmt.write_manifest(str(directory), "test", "float64", records)
    return records


# ------------------------------------------------------ torch impls
def torch_impl(case, scale=1.0, flip=False, half=False):
    """A correct torch implementation of the three cases; ``scale``
    multiplies the weight gradient, ``flip`` negates the input gradient,
    ``half`` halves it (the HALF surrogate) - all without changing the
    forward."""
    import torch

    def bend(t, factor):  # value t, gradient factor * (that of t)
        return factor * t + (1 - factor) * t.detach()

    if case.kind == "net":
        x, label = case.inputs["input.x"], case.inputs["input.label"]
        fc = x @ case.params["param.ip.0"].T + case.params["param.ip.1"]
        loss = torch.nn.functional.cross_entropy(fc, label)
        return {"fc": fc, "loss": loss}
    if case.layer_type == "InnerProduct":
        x = case.inputs["bottom.0"]
        if flip:
            x = bend(x, -1.0)
        if half:
            x = bend(x, 0.5)
        w = bend(case.params["param.0"], scale)
        return {"top.0": x @ w.T + case.params["param.1"]}
    x, label = case.inputs["bottom.0"], case.inputs["bottom.1"]
    if flip:
        x = bend(x, -1.0)
    return [torch.nn.functional.cross_entropy(x, label)]


def jax_impl(case):
    import jax
    import jax.numpy as jnp

    def xent(x, label):
        logp = jax.nn.log_softmax(x, axis=1)
        return -jnp.mean(jnp.take_along_axis(logp, label[:, None], axis=1))

    if case.kind == "net":
        x, label = case.inputs["input.x"], case.inputs["input.label"]
        fc = x @ case.params["param.ip.0"].T + case.params["param.ip.1"]
        return {"fc": fc, "loss": xent(fc, label)}
    if case.layer_type == "InnerProduct":
        x = case.inputs["bottom.0"]
        return {"top.0": x @ case.params["param.0"].T + case.params["param.1"]}
    return xent(case.inputs["bottom.0"], case.inputs["bottom.1"])
