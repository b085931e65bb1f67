"""Implementations of netlite's layers in other frameworks ("peers"), held to
the reference corpus by :func:`netlite.reference.validate` (docs/validation.md).

Each module imports its framework inside its functions, so importing this
package needs neither torch, pytorch-metric-learning, jax nor optax:

* :mod:`.torch_nn` -- ``SoftmaxWithLoss`` through
  ``torch.nn.functional.cross_entropy`` (framework ``torch``);
* :mod:`.pml` -- the composed heads (``Head/...``) and the margin layers
  through pytorch-metric-learning 2.9.0 (framework ``torch``);
* :mod:`.jax_optax` -- ``SoftmaxWithLoss`` through optax's cross-entropies
  (framework ``jax``).

An implementation raises :class:`Unsupported` (a ``NotImplementedError``)
for a case its peer cannot express; the harness reports it as an error row
whose message starts with ``Unsupported:``.
"""

from netlite.reference.peers._common import Unsupported

__all__ = ["Unsupported"]
