"""What a reference case is: :class:`Case` and the input generators the
case modules declare their cases with (see the package docstring)."""


import math
import zlib
from dataclasses import dataclass, field

import numpy as np

#: Layer types that have no backward, and why (they get no cases).
NO_BACKWARD = {
    "Accuracy": "a metric: its backward raises (no gradient)",
    "Data": "a data layer: no bottoms",
    "DummyData": "a data layer: no bottoms",
    "IDXData": "a data layer: no bottoms",
    "Input": "a data layer: no bottoms",
    "Silence": "no tops: nothing to differentiate (its backward writes zeros)",
}

#: The tolerance a case holds at when it does not say otherwise, per dtype:
#: ``|got - ref| <= atol + rtol * |ref|`` element by element.
TOLERANCE = {
    "float64": {"rtol": 1e-9, "atol": 1e-12},
    "float32": {"rtol": 1e-4, "atol": 1e-5},
}


def tolerance(rtol64=1e-9, atol64=1e-12, rtol32=1e-4, atol32=1e-5):
    """A tolerance dict; ``rtol32=None`` marks a case float32 cannot hold
    (``"float32": null`` in the manifest)."""
    f32 = None if rtol32 is None else {"rtol": rtol32, "atol": atol32}
    return {"float64": {"rtol": rtol64, "atol": atol64}, "float32": f32}


# ---------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Gen:
    """How to draw one input: ``fn(rng) -> array`` (float64).

    ``role`` is ``"input"`` or ``"label"``; ``grad`` False marks an input
    that is not differentiated (probability targets).
    """

    shape: tuple
    fn: object
    role: str = "input"
    grad: bool = True

    def draw(self, rng):
        a = np.asarray(self.fn(rng), dtype=np.float64)
        return np.ascontiguousarray(a.reshape(self.shape))


def gauss(shape, std=1.0, mean=0.0):
    return Gen(tuple(shape), lambda r: mean + std * r.standard_normal(shape))


def unif(shape, lo, hi):
    return Gen(tuple(shape), lambda r: r.uniform(lo, hi, shape))


def fixed(values, role="input", grad=True):
    a = np.array(values, dtype=np.float64)
    return Gen(a.shape, lambda r: a, role, grad)


def custom(shape, fn, role="input", grad=True):
    return Gen(tuple(shape), fn, role, grad)


def away(shape, kinks=(0.0,), gap=0.05, std=1.0):
    """Gaussian values moved at least ``gap`` away from every kink, so a
    finite-difference step never straddles one."""

    def fn(r):
        x = std * r.standard_normal(shape)
        for k in kinks:
            near = np.abs(x - k) < gap
            x = np.where(near, k + np.where(x >= k, gap, -gap) * 2, x)
        return x

    return Gen(tuple(shape), fn)


def distinct(shape, spacing=0.125):
    """A random permutation of an evenly spaced grid: no ties, no two
    values closer than ``spacing`` (MAX pooling and MAX eltwise)."""
    n = int(np.prod(shape))
    return Gen(tuple(shape), lambda r: (r.permutation(n) - n / 2) * spacing)


def labels(shape, classes, ignore=None, every=3, values=None):
    """Integer labels in ``[0, classes)`` stored as floats; every
    ``every``-th replaced by ``ignore``; or the given ``values``."""
    shape = tuple(shape)
    if values is not None:
        a = np.array(values, dtype=np.float64).reshape(shape)
        return Gen(shape, lambda r: a, "label", False)

    def fn(r):
        y = r.integers(0, classes, size=shape).astype(np.float64)
        if ignore is not None:
            y.reshape(-1)[::every] = ignore
        return y

    return Gen(shape, fn, "label", False)


def probs(shape, axis=1):
    """Probability targets along ``axis`` (Dirichlet(1) rows); no gradient."""

    def fn(r):
        t = np.moveaxis(r.gamma(1.0, size=shape), axis, -1)
        return np.moveaxis(t / t.sum(axis=-1, keepdims=True), -1, axis)

    return Gen(tuple(shape), fn, "input", False)


# ----------------------------------------------------------------- cases
@dataclass
class Case:
    """One case of the corpus.

    Attributes
    ----------
    layer_type, name : str
        The case id is ``<layer_type>/<name>``.
    prototxt : str
        A LayerParameter text (kind ``"layer"``: built alone, bottoms
        ``bottom.<i>``) or a NetParameter text (kind ``"net"``: an Input
        layer whose tops are the inputs, ``input.<blob>``).
    inputs : list of Gen (layer) or of (blob name, Gen) (net)
    docs, equation : str
        ``docs/layers/x.md#anchor`` and the equation that defines the case.
    tops : int
        Number of tops of a layer case.
    params : "random", "keep" or callable
        "random": every parameter blob gaussian(0, ``param_std``) from the
        seed; "keep": as the prototxt's ``blobs`` or fillers set them;
        callable ``(rng, shapes) -> list of arrays``.
    frozen_params : tuple of int
        Parameter blobs stored as ``param`` but with no gradient (running
        statistics, ``lr_mult: 0``).
    dead_tops : tuple of int
        Tops with no gradient path (a loss layer's probability top, a
        pooling mask): their upstream gradient is stored as zeros.
    surrogates : tuple of (mode, prototxt)
        Documented non-gradient backwards, rerun from the same tensors.
    warmup : str or None
        A prototxt to run one forward with before the parameters are
        stored (in-place renormalising layers: the stored weights are those
        after a forward).
    fd_step, fd_threshold : float
        Central-difference step (relative to max(1, |x|)) and the relative
        threshold of the check (docs/reference.md §3).
    fd_skip : callable or None
        ``arrays -> {tensor name: bool mask}``: elements where the forward
        is not differentiable (documented convention); each must be
        covered by ``closed_form`` or named in ``fd_skip_reason``.
    closed_form : callable or None
        ``arrays -> {gradient name: expected array}``, checked at 1e-9.
    """

    layer_type: str
    name: str
    prototxt: str
    inputs: list
    docs: str
    equation: str = ""
    edges: tuple = ()
    description: str = ""
    kind: str = "layer"
    tops: int = 1
    params: object = "random"
    param_std: float = 1.0
    frozen_params: tuple = ()
    dead_tops: tuple = ()
    surrogates: tuple = ()
    warmup: str = None
    tolerance: dict = field(default_factory=lambda: tolerance())
    fd_step: float = 1e-5
    fd_threshold: float = 1e-6
    fd_skip: object = None
    fd_skip_reason: str = ""
    closed_form: object = None
    seed: int = None

    def __post_init__(self):
        if self.seed is None:
            self.seed = zlib.crc32(self.id.encode()) & 0x7FFFFFFF

    @property
    def id(self):
        return f"{self.layer_type}/{self.name}"


class CaseList(list):
    """The cases a case module declares (its ``CASES``), with the two ways
    it declares them."""

    def add(self, layer_type, name, prototxt, inputs, docs, **kw):
        """One layer case: ``prototxt`` is the LayerParameter text after
        ``type: "<layer_type>"``; ``kw``: the other :class:`Case` fields."""
        self.append(
            Case(
                layer_type,
                name,
                f'type: "{layer_type}" {prototxt}',
                inputs,
                docs=docs,
                **kw,
            )
        )

    def family(self, layer_type, docs, rows, **common):
        """Several cases of one layer type that share ``docs`` and the
        :class:`Case` fields ``common``: one per row ``(name, prototxt,
        inputs[, description[, fields]])``, ``fields`` a dict of further
        (or overriding) Case fields."""
        for name, prototxt, inputs, *more in rows:
            kw = dict(common)
            if more:
                kw["description"] = more[0]
            kw.update(*more[1:])
            self.add(layer_type, name, prototxt, inputs, docs, **kw)


# Shared numbers for the case modules.
FLT_MIN = float(np.finfo(np.float32).tiny)
LOG_FLT_MIN = -math.log(FLT_MIN)  # 87.3365...
