"""The cases of the reference corpus (docs/reference.md §2).

One module per family of layers declares its cases as :class:`Case`
values: ``core`` (the Caffe zoo), ``losses`` (SoftmaxWithLoss, FocalLoss,
EuclideanLoss, HingeLoss), ``margins`` (the margin family and the
normalisation layers), ``heads`` (the composed heads of
docs/layers/margin_family.md, as nets).  :func:`cases` collects them;
:func:`netlite.reference.write` turns each into tensors.

A case is a pure declaration: its prototxt, how to draw its inputs and
parameters from its seed (:class:`Gen`), which outputs carry no gradient,
which documented surrogate backwards to record, and how its gradient is
finite-difference checked.  Everything is deterministic given the seed,
which is derived from the case id (CRC-32), so adding or reordering cases
never changes another case's numbers.
"""

from netlite.reference.cases.spec import (  # noqa: F401  (re-exported)
    NO_BACKWARD,
    TOLERANCE,
    Case,
    Gen,
    away,
    custom,
    distinct,
    fixed,
    gauss,
    labels,
    probs,
    tolerance,
    unif,
)
from netlite.reference.corpus import select_layers


def _collect():
    from netlite.reference.cases import core, heads, losses, margins

    out = []
    for module in (core, losses, margins, heads):
        out.extend(module.CASES)
    seen = set()
    for c in out:
        if c.id in seen:
            raise ValueError(f"duplicate reference case {c.id}")
        seen.add(c.id)
    return sorted(out, key=lambda c: c.id)


def cases(layers=None):
    """The corpus's cases, sorted by id; ``layers``: only those types (an
    iterable of type strings; an unknown one raises ValueError)."""
    every = _collect()
    if layers is None:
        return every
    wanted = [layers] if isinstance(layers, str) else list(layers)
    known = sorted({c.layer_type for c in every})

    def error(unknown):
        return ValueError(
            f"no reference cases for layer type(s) {unknown}; types with cases: "
            f"{', '.join(known)}"
        )

    return select_layers(every, wanted, known, error)
