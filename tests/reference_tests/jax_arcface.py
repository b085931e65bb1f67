"""An ArcFace written in JAX from the paper, held to the corpus by
tests/reference_tests/test_peers.py (docs/validation.md §4).

Deng et al., ArcFace (CVPR 2019), eq. (3) and the combined margin of §2.2:
for the target class the logit cos(theta) becomes
``cos(m1 * theta + m2) - m3`` with ``theta = arccos(cos theta)``; nothing
else.  No clamping, no boundary rule: the paper has neither, so this is
netlite's ``boundary: NONE`` -- and what a reader of the paper writes.

* ``impl`` -- the LabelSpecificMargin layer cases (framework ``jax``);
* ``head_impl`` -- the ``Head/ArcFace`` net: features and class weights
  L2-normalised as netlite's Normalize / InnerProduct{normalize} do
  (``v / sqrt(|v|^2 + 1e-6)``, so only the margin is compared), the margin
  above, the scale s, softmax cross-entropy averaged over the batch.
"""

import math


def _margins(p):
    unit = (lambda v: v) if p.get("unit", "DEGREE") == "RADIAN" else math.radians
    m1 = float(p.get("m1", 1.0))
    m3 = float(p.get("m3", 0.0))
    cm = p.get("class_margin")
    m2 = [unit(float(v)) for v in cm] if cm else unit(float(p.get("margin_base", 0.0)))
    return m1, m2, m3


def arcface_target(c, m1, m2, m3):
    """The paper's target logit: cos(m1 * arccos(c) + m2) - m3."""
    import jax.numpy as jnp

    return jnp.cos(m1 * jnp.arccos(c) + m2) - m3


def _with_margin(x, y, p, ignore):
    import jax.numpy as jnp

    m1, m2, m3 = _margins(p)
    rows = jnp.arange(x.shape[0])
    valid = jnp.ones(y.shape, bool) if ignore is None else y != ignore
    yv = jnp.where(valid, y, 0)
    c = x[rows, yv]
    m2 = jnp.asarray(m2)[yv] if isinstance(m2, list) else m2
    z = jnp.where(valid, arcface_target(c, m1, m2, m3), c)
    return x.at[rows, yv].set(z)


def impl(case):
    import jax.numpy as jnp

    if case.layer_type != "LabelSpecificMargin":
        raise NotImplementedError(case.layer_type)
    p = case.params_text.get("label_specific_margin_param", {})
    ignore = case.params_text.get("loss_param", {}).get("ignore_label")
    x, y = case.inputs["bottom.0"], case.inputs["bottom.1"]
    z = _with_margin(x.reshape(x.shape[0], -1), y, p, ignore).reshape(x.shape)
    outs = [z]
    if len(case.output_names) > 1:  # top.1: the margin, in the prototxt's unit
        outs.append(jnp.asarray([float(p.get("margin_base", 0.0))], x.dtype))
    return outs


def head_impl(case):
    import jax
    import jax.numpy as jnp

    if case.id != "Head/ArcFace":
        raise NotImplementedError(case.id)
    layers = {ly["name"]: ly for ly in case.params_text["layer"]}
    p = layers["margin"]["label_specific_margin_param"]
    x, y = case.inputs["input.x"], case.inputs["input.label"]
    w, s = case.params["param.fc.0"], case.params["param.scale.0"]

    def l2n(v):
        return v / jnp.sqrt((v * v).sum(axis=1, keepdims=True) + 1e-6)

    cos = l2n(x) @ l2n(w).T
    logits = s.reshape(()) * _with_margin(cos, y, p, None)
    logp = jax.nn.log_softmax(logits, axis=1)
    return {"output.loss": -logp[jnp.arange(x.shape[0]), y].mean()}
