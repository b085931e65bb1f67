"""Layer fusion: a chain of layers that a fast engine runs as one computation.

A *fuser* (registered with :func:`register_fuser` by the layer module that
implements the fused computation) looks at a built :class:`netlite.Net` and
returns the chains it can fuse, each as a *head*: a
:class:`netlite.layer.Layer` that stands for the layers ``first .. last``
of the net (consecutive), with

* ``first``, ``last`` -- the net's indices of the chain's first and last layer;
* ``bottom_vec``, ``top_vec`` -- the chain's external bottoms and its tops;
* ``fuses_now()`` -- whether the fused computation would run now (fusion
  on, and an engine that has it);
* ``ran_fused`` -- whether its last forward ran fused (then the backward must
  run fused too, or the chain's layers rerun their forwards first:
  :meth:`unfuse`);
* ``describe_chain()`` -- a line for the log.

The Net runs a head in place of its layers when ``fuses_now()``; every blob
of the chain still holds the unfused values when it is read (the head
defers them: :meth:`netlite.Blob.defer`).  See docs/engine/fusion.md.

Fusion is on by default; :func:`set_fusion` or the environment variable
``NETLITE_FUSION=0`` turns it off (the layers then run one by one, as
written).
"""

import logging
import os

logger = logging.getLogger("netlite")

_FUSERS = []
_enabled = None  # resolved lazily from the environment

_OFF = ("0", "off", "no", "false")


def register_fuser(fuser):
    """Register ``fuser(net) -> list of heads`` (a decorator; returns it)."""
    _FUSERS.append(fuser)
    return fuser


def set_fusion(enabled):
    """Turn fusion on or off for every net, from the next forward on.

    A forward that ran fused is followed by a fused backward even when
    fusion was turned off in between (the chain's layers hold no state of
    their own from it)."""
    global _enabled
    _enabled = bool(enabled)


def fusion_enabled():
    """Whether fusion is on (default: on unless ``NETLITE_FUSION`` is 0)."""
    global _enabled
    if _enabled is None:
        value = os.environ.get("NETLITE_FUSION", "").strip().lower()
        _enabled = value not in _OFF
    return _enabled


def plan(net):
    """The heads every registered fuser finds in ``net`` (non-overlapping,
    sorted by position); each is logged."""
    heads = []
    taken = set()
    for fuser in _FUSERS:
        for head in fuser(net):
            span = set(range(head.first, head.last + 1))
            if span & taken:
                continue
            taken |= span
            heads.append(head)
            logger.info("Fusing %s", head.describe_chain())
    return sorted(heads, key=lambda h: h.first)
