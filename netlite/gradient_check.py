"""A faithful port of Caffe's GradientChecker (test_gradient_check_util.hpp).

The checker compares a layer's analytic gradients (its ``backward``) with
central finite differences of an objective built from its tops:

* ``top_id < 0``: objective = 1/2 * sum over all tops of sum(top**2), so
  every top diff is set to the top data;
* ``top_id >= 0``: objective = 2 * top[top_id].flat[top_data_id]; all top
  diffs are zeroed and that one element's diff is set to 2.

The layer's own loss and configured ``loss_weight`` are ignored (the
objective overwrites the top diffs).  Before every forward the global RNG
is reseeded with ``seed`` so stochastic layers draw the same masks on the
analytic, +h and -h passes.  Parameter diffs are zeroed before the
analytic pass because layers accumulate into them.

An element passes when ``|analytic - numeric| <= threshold * max(|analytic|,
|numeric|, 1)`` -- relative for large values, absolute below 1.  Elements
whose current value lies in ``[kink - kink_range, kink + kink_range]`` are
skipped (non-differentiable points such as ReLU at 0).

Unlike Caffe, which logs every failure and keeps going, the Python port
collects all failures of a call and raises one :class:`GradientCheckError`
listing the worst entries.
"""

import numpy as np

from netlite import backend, rng


class GradientCheckError(AssertionError):
    """Analytic and numeric gradients disagree.

    Attributes
    ----------
    failures : list of tuple
        ``(blob, index, analytic, numeric, top_id, top_data_id, excess)``
        for every failing element, worst first (``excess`` is the error
        divided by the allowed tolerance).
    """

    def __init__(self, layer, failures, checked, threshold, max_shown=10):
        self.failures = sorted(failures, key=lambda f: -f[6])
        lines = [
            f"{layer}: {len(failures)} of {checked} gradient entries differ by more "
            f"than threshold {threshold:g} * max(|analytic|, |numeric|, 1); worst "
            "first:",
            "  blob            index        analytic         numeric   (top, elem)",
        ]
        for blob, index, a, n, top_id, elem, _ in self.failures[:max_shown]:
            lines.append(
                f"  {blob:<14} {str(index):<12} {a:>15.8g} {n:>15.8g}   "
                f"({top_id}, {elem})"
            )
        if len(failures) > max_shown:
            lines.append(f"  ... and {len(failures) - max_shown} more")
        super().__init__("\n".join(lines))


def _objective(top, top_id, top_data_id):
    """Caffe's GetObjAndGradient: set the top diffs, return the objective."""
    if top_id < 0:
        loss = 0.0
        for blob in top:
            data = blob.flat_data
            blob.flat_diff[...] = data
            loss += float(blob.xp.vdot(data, data))
        return loss / 2.0
    for blob in top:
        blob.flat_diff[...] = 0
    loss_weight = 2.0
    target = top[top_id]
    loss = float(target.flat_data[top_data_id]) * loss_weight
    target.flat_diff[top_data_id] = loss_weight
    return loss


class GradientChecker:
    """Finite-difference gradient checker (Caffe's GradientChecker).

    Parameters
    ----------
    stepsize : float
        Finite-difference step h (central differences).
    threshold : float
        Relative tolerance; absolute below 1.
    seed : int
        RNG seed set before every forward.
    kink, kink_range : float
        Skip elements with ``kink - kink_range <= |x| <= kink + kink_range``.
        The default ``kink_range = -1`` skips nothing.

    Examples
    --------
    >>> checker = GradientChecker(1e-2, 1e-2, 1701)
    >>> checker.check_gradient_exhaustive(layer, bottom, top, check_bottom=0)
    """

    def __init__(self, stepsize, threshold, seed=1701, kink=0.0, kink_range=-1.0):
        self.stepsize = float(stepsize)
        self.threshold = float(threshold)
        self.seed = int(seed)
        self.kink = float(kink)
        self.kink_range = float(kink_range)

    # ------------------------------------------------------------ entries
    def check_gradient(self, layer, bottom, top, check_bottom=-1):
        """Set up ``layer``, then check the sum-of-squares objective."""
        layer.setup(bottom, top)
        self._raise(layer, *self._single(layer, bottom, top, check_bottom, -1, -1))

    def check_gradient_exhaustive(self, layer, bottom, top, check_bottom=-1,
                                  param_ids=None):
        """Set up ``layer``, then check every top element in turn.

        Parameters
        ----------
        check_bottom : int or sequence of int
            ``-1``: all bottoms; ``i >= 0``: only bottom i; ``< -1``: none
            (parameters only).  A sequence of indices (a netlite extension)
            checks those bottoms.
        param_ids : sequence of int, optional
            netlite extension: compare only these parameter blobs (Caffe
            always checks all of them).  For blobs that are not a function's
            argument: running statistics, or weights that the forward
            renormalises in place.
        """
        layer.setup(bottom, top)
        self._exhaustive(layer, bottom, top, check_bottom, param_ids)

    def check_gradient_eltwise(self, layer, bottom, top):
        """Check an element-wise layer: only the Jacobian diagonal is
        finite-differenced; off-diagonal analytic entries must be ~0."""
        layer.setup(bottom, top)
        if not top:
            raise ValueError("check_gradient_eltwise needs at least one top")
        failures, checked = [], 0
        for top_id, blob in enumerate(top):
            for j in range(blob.count):
                f, c = self._single(layer, bottom, top, -1, top_id, j, True)
                failures += f
                checked += c
        self._raise(layer, failures, checked)

    def check_gradient_single(self, layer, bottom, top, check_bottom, top_id,
                              top_data_id, element_wise=False):
        """Check one objective (no setup), raising on any failure."""
        self._raise(
            layer,
            *self._single(
                layer, bottom, top, check_bottom, top_id, top_data_id, element_wise
            ),
        )

    def check_gradient_net(self, net, **inputs):
        """Check every layer of ``net`` that needs backward, in place.

        For each such layer the net is forwarded (with ``inputs``), then the
        layer is checked exhaustively on its own bottom and top vectors,
        over its parameters and the bottoms the net backpropagates to.
        Unlike Caffe's CheckGradientNet, the layers are not set up again,
        label bottoms are left alone, parameters the net does not learn
        (``lr_mult: 0``, so ``param_propagate_down`` is False) are not
        checked, and the loss-weight seeds in the top diffs, which the
        checker's objective overwrites, are restored afterwards so the net
        can go on training.
        """
        for name, value in inputs.items():
            net.blobs[name].data = value
        try:
            for i, layer in enumerate(net.layers):
                if not net.layer_need_backward[i]:
                    continue
                bottoms = [
                    j for j, need in enumerate(net.bottom_need_backward[i]) if need
                ]
                params = [
                    j for j in range(len(layer.blobs)) if layer.propagates_param(j)
                ]
                if not bottoms and not params:
                    continue
                net.forward_from_to(0, len(net.layers) - 1)
                self._exhaustive(
                    layer, net.bottom_vecs[i], net.top_vecs[i], bottoms, params
                )
        finally:
            for layer, top in zip(net.layers, net.top_vecs):
                for j, blob in enumerate(top):
                    if layer.loss(j):
                        blob.diff[...] = layer.loss(j)

    # ---------------------------------------------------------- internals
    def _exhaustive(self, layer, bottom, top, check_bottom, param_ids=None):
        if not top:
            raise ValueError(
                f"{layer.describe()}: exhaustive mode needs at least one top"
            )
        failures, checked = [], 0
        for top_id, blob in enumerate(top):
            for j in range(blob.count):
                f, c = self._single(
                    layer, bottom, top, check_bottom, top_id, j, param_ids=param_ids
                )
                failures += f
                checked += c
        self._raise(layer, failures, checked)

    def _raise(self, layer, failures, checked):
        if failures:
            raise GradientCheckError(
                layer.describe(), failures, checked, self.threshold
            )

    def _blobs_to_check(self, layer, bottom, check_bottom, param_ids=None):
        labels, blobs = [], []
        propagate_down = [False] * len(bottom)
        for i, blob in enumerate(layer.blobs):
            # Every parameter diff is zeroed (layers accumulate into them),
            # but only the requested ones are compared.
            blob.flat_diff[...] = 0
            if param_ids is not None and i not in param_ids:
                continue
            labels.append(f"param[{i}]")
            blobs.append(blob)
        if isinstance(check_bottom, (list, tuple)):
            indices = list(check_bottom)
        elif check_bottom == -1:
            indices = list(range(len(bottom)))
        elif check_bottom >= 0:
            if check_bottom >= len(bottom):
                raise IndexError(
                    f"check_bottom {check_bottom} but the layer has {len(bottom)} "
                    "bottoms"
                )
            indices = [check_bottom]
        else:
            indices = []
        for i in indices:
            propagate_down[i] = True
            labels.append(f"bottom[{i}]")
            blobs.append(bottom[i])
        if not blobs:
            raise ValueError(f"{layer.describe()}: no blobs to check")
        return labels, blobs, propagate_down

    def _forward_objective(self, layer, bottom, top, top_id, top_data_id):
        rng.set_random_seed(self.seed)
        layer.forward(bottom, top)
        return _objective(top, top_id, top_data_id)

    def _single(self, layer, bottom, top, check_bottom, top_id, top_data_id,
                element_wise=False, param_ids=None):
        if element_wise:
            if layer.blobs:
                raise ValueError("element-wise checks need a layer without params")
            if top_id < 0 or top_data_id < 0:
                raise ValueError("element-wise checks need top_id, top_data_id >= 0")
            for blob in bottom:
                if blob.count != top[top_id].count:
                    raise ValueError(
                        "element-wise checks need bottoms as large as the top"
                    )
        labels, blobs, propagate_down = self._blobs_to_check(
            layer, bottom, check_bottom, param_ids
        )
        self._forward_objective(layer, bottom, top, top_id, top_data_id)
        layer.backward(top, propagate_down, bottom)
        analytic = [backend.to_numpy(b.flat_diff).astype(np.float64) for b in blobs]

        h = self.stepsize
        failures, checked = [], 0
        for label, blob, computed in zip(labels, blobs, analytic):
            flat = blob.flat_data
            for k in range(blob.count):
                estimate = 0.0
                if not element_wise or k == top_data_id:
                    original = flat[k].item()
                    flat[k] = original + h
                    plus = self._forward_objective(layer, bottom, top, top_id,
                                                   top_data_id)
                    # Caffe steps back by 2h from the perturbed value (in
                    # the blob's dtype) rather than from the original.
                    flat[k] = flat[k] - 2 * h
                    minus = self._forward_objective(layer, bottom, top, top_id,
                                                    top_data_id)
                    flat[k] = flat[k] + h
                    estimate = (plus - minus) / h / 2.0
                feature = abs(float(flat[k]))
                if (self.kink - self.kink_range <= feature
                        <= self.kink + self.kink_range):
                    continue
                checked += 1
                a = float(computed[k])
                scale = max(abs(a), abs(estimate), 1.0)
                tolerance = self.threshold * scale
                if not abs(a - estimate) <= tolerance:
                    index = np.unravel_index(k, blob.shape) if blob.shape else ()
                    failures.append((
                        label, tuple(int(i) for i in index), a, estimate, top_id,
                        top_data_id, abs(a - estimate) / tolerance
                    ))
        return failures, checked
