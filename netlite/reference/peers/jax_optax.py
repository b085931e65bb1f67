"""``SoftmaxWithLoss`` through optax 0.2.8 (framework ``jax``;
docs/validation.md §3).

The per-position cross-entropy is optax's:
``optax.softmax_cross_entropy_with_integer_labels`` for hard labels without
smoothing, ``optax.softmax_cross_entropy`` (with ``optax.smooth_labels``)
for smoothed labels and probability targets, both along the class axis
(``axis=``).  Everything optax leaves out is written here in JAX, as
netlite defines it (docs/layers/softmax_loss.md §2, §8): ignored labels
(replaced by 0 for the look-up, their loss masked to 0 -- optax has no
ignore index), class weights (the weighted target ``w * t`` for the soft
form, ``w[y] * loss`` for the integer form), the temperature (``T**2 *
CE(x / T)``) and every normaliser: VALID ``max(#valid, 1)``, FULL, BATCH_SIZE,
NONE, WEIGHTED ``max(sum w_bar, FLT_MIN)``, LABEL_WEIGHTED ``max(sum w_y,
FLT_MIN)``, per position.  Not written: Caffe's FLT_MIN clamp of the
probability (optax's log-softmax has none).
"""

import numpy as np

from netlite.reference.peers._common import output_shape, softmax_loss_settings

FLT_MIN = float(np.finfo(np.float32).tiny)


def impl(case):
    """The implementation for ``netlite validate --framework jax``."""
    import jax
    import jax.numpy as jnp
    import optax

    s = softmax_loss_settings(case)
    x = case.inputs["bottom.0"]
    target = case.inputs["bottom.1"]
    C = x.shape[s.axis]
    T = s.temperature
    xt = x / T if T != 1 else x
    w = None if s.class_weight is None else jnp.asarray(s.class_weight, x.dtype)
    if s.soft:
        valid = jnp.ones(x.shape[: s.axis] + x.shape[s.axis + 1 :], bool)
        t = target
    else:
        y = target
        valid = (
            jnp.ones(y.shape, bool) if s.ignore_label is None else y != s.ignore_label
        )
        y = jnp.where(valid, y, 0)
        t = None
    if s.soft or s.label_smoothing:
        if t is None:
            t = jnp.moveaxis(jax.nn.one_hot(y, C, dtype=x.dtype), -1, s.axis)
        if s.label_smoothing:
            t = jnp.moveaxis(
                optax.smooth_labels(jnp.moveaxis(t, s.axis, -1), s.label_smoothing),
                -1,
                s.axis,
            )
        wt = t if w is None else t * _along(w, s.axis, x.ndim)
        ell = optax.softmax_cross_entropy(xt, wt, axis=s.axis)
        wbar = wt.sum(axis=s.axis)
    else:
        ell = optax.softmax_cross_entropy_with_integer_labels(xt, y, axis=s.axis)
        wbar = jnp.ones(y.shape, x.dtype) if w is None else w[y]
        ell = ell * wbar
    if T != 1:
        ell = ell * (T * T)
    ell = jnp.where(valid, ell, 0.0)
    wbar = jnp.where(valid, wbar, 0.0)
    if s.per_position:
        loss = ell
    else:
        loss = ell.sum() / _normalizer(s, x, valid, wbar, w, y if not s.soft else None)
    outs = [loss.reshape(output_shape(case, 0))]
    if s.prob_top:
        outs.append(jax.nn.softmax(xt, axis=s.axis))
    return outs


def _along(v, axis, ndim):
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _normalizer(s, x, valid, wbar, w, y):
    import jax.numpy as jnp

    if s.weight_normalization == "WEIGHTED":
        return jnp.maximum(wbar.sum(), FLT_MIN)
    if s.weight_normalization == "LABEL_WEIGHTED":
        wl = jnp.where(valid, 1.0 if w is None else w[y], 0.0)
        return jnp.maximum(wl.sum(), FLT_MIN)
    if s.normalization == "VALID":
        return jnp.maximum(valid.sum(), 1).astype(x.dtype)
    if s.normalization == "FULL":
        return float(valid.size)
    if s.normalization == "BATCH_SIZE":
        return float(np.prod(x.shape[: s.axis], dtype=np.int64))
    return 1.0  # NONE
