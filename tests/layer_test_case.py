"""LayerTestCase: a layer's standard tests, generated from a declaration.

A layer test module declares what the layer is, what it is fed and what
it should compute, and inherits the tests every layer must pass (the idea
of Chainer's function test cases, with Caffe's checks)::

    class TestReLULayer(LayerTestCase):
        layer = 'type: "ReLU"'
        bottoms = [((2, 3, 4, 5), filler("gaussian"))]
        kink_range = 1e-3                      # ReLU's kink at 0

        def oracle(self, bottoms, blobs):
            return [naive.relu(bottoms[0])]

Generated tests (each once per entry of :attr:`LayerTestCase.cases`; the
forward and the contract tests also once per CPU engine the layer
implements: ``numpy``, and ``numba`` for a layer with its own Numba
hooks):

``test_forward``
    float32 and float64: the tops against the float64 oracle, at
    ``TOLERANCES["oracle"][dtype]``; for a loss layer the returned loss is
    ``loss_weight * top[0]``.  The bottoms are left unchanged.
``test_gradient``
    float64: Caffe's exhaustive check (``GRADIENT_CHECK``, or the class's
    ``stepsize`` / ``threshold`` / ``kink`` / ``kink_range``) on every
    bottom that propagates and every parameter blob.
``test_propagate_down``
    no bottom, then each bottom alone; each parameter alone, then none:
    the diffs not asked for are untouched, the ones asked for are those of
    a full backward.
``test_param_diffs_accumulate``
    a second backward adds the same parameter diffs again.
``test_bottom_diffs_overwritten``
    bottom diffs that held garbage end up equal to a clean backward's.
``test_backward_float32``
    float32 bottom and parameter diffs against the float64 ones of the same
    inputs, at ``TOLERANCES["oracle"][float32]``.
``test_loss_weight``
    loss layers: ``loss_weight: 3`` triples the returned loss and every
    diff.
``test_engine_parity``
    every engine the layer implements (``numba`` when the class has its
    own ``forward_numba``; ``cupy`` on a GPU, which every layer runs on)
    against the NumPy reference, forward and backward, at
    ``TOLERANCES["parity"][dtype]``.

Everything a case may override is a class attribute; :attr:`cases` maps
a case id to the attributes it changes (any names, which the oracle can
read from ``self``).
"""

import numpy as np
import pytest
from layer_testing import (
    GRADIENT_CHECK,
    assert_close,
    make_blob,
    requires_gpu,
    requires_numba,
    run_engine,
    tolerance,
)

import netlite
from netlite import backend, io
from netlite.io import FillerParameter
from netlite.layer import Layer, LossLayer


def labels(num_classes, ignore=None, every=None):
    """A bottom filler for integer labels in ``[0, num_classes)`` (stored as
    floats, as Caffe stores them); with ``ignore``, every ``every``-th
    label is replaced by it."""

    def fill(shape, dtype):
        values = netlite.rng.get_rng().integers(0, num_classes, size=shape)
        values = values.astype(np.float64)
        if ignore is not None:
            values.reshape(-1)[::every or 3] = ignore
        return values.astype(dtype)

    return fill


#: The engines the contract tests run on.  The GPU is left to the parity
#: tests, whose comparisons copy to the host.
CPU_ENGINES = ("numpy", "numba")

#: (test case class, case id) -> (configured instance, layer, bottoms),
#: the set-up :meth:`LayerTestCase.applies` decides from.
_PROBES = {}


class LayerTestCase:
    """Base of the declarative layer test cases (see the module docstring).

    Subclass it as ``Test<Something>`` in ``tests/layer_tests/test_<m>.py``
    and set the attributes below; override :meth:`oracle`.
    """

    #: The layer's prototxt (a LayerParameter without ``name``).
    layer = None
    #: One ``(shape, fill)`` per bottom; ``fill`` is a FillerParameter, an
    #: array, or a callable ``(shape, dtype) -> array`` such as
    #: :func:`labels`.
    bottoms = ()
    #: Number of tops.
    tops = 1
    #: Bottoms whose gradient is checked; None: every bottom the layer
    #: lets ``force_backward`` reach (a loss layer's labels are not).
    grad_bottoms = None
    #: Parameter blobs whose gradient is checked; None: all of them.  Blobs
    #: that are no argument of the forward (running statistics, weights a
    #: forward renormalises in place) are left out.
    grad_params = None
    #: Gradient-check settings (float64).
    stepsize = GRADIENT_CHECK["stepsize"]
    threshold = GRADIENT_CHECK["threshold"]
    kink = 0.0
    kink_range = -1.0
    #: False for layers without a backward (metrics, data).
    has_backward = True
    #: True for layers whose top diff *is* the bottom diff (an alias made in
    #: reshape, as Flatten and Reshape do): ``propagate_down`` cannot keep
    #: dy out of the bottom diff, so that test checks the alias instead.
    aliases_diff = False
    #: Case id -> attribute overrides.
    cases = {"default": {}}

    # ------------------------------------------------------------ declare
    def oracle(self, bottoms, blobs):
        """The float64 naive forward: list of top arrays.

        Parameters
        ----------
        bottoms : list of float64 arrays
            The bottoms' data, widened exactly.
        blobs : list of float64 arrays
            The layer's parameter blobs after setup, widened exactly.
        """
        raise NotImplementedError(f"{type(self).__name__} declares no oracle")

    # ------------------------------------------------------------- pytest
    def pytest_generate_tests(self, metafunc):
        """Run every test once per case, and the contract tests (those with
        an ``engine`` argument) once per CPU engine the layer implements.
        A test that does not apply (parameter tests of a layer without
        parameters, the numba engine of a layer without one) carries the
        ``inapplicable`` mark, and conftest deselects it."""
        if "case" not in metafunc.fixturenames:
            return
        name = metafunc.function.__name__
        if "engine" not in metafunc.fixturenames:
            metafunc.parametrize("case", [
                pytest.param(case, id=case, marks=self._marks(name, case))
                for case in type(self).cases])
            return
        params = []
        for engine in CPU_ENGINES:
            for case in type(self).cases:
                marks = self._marks(name, case, engine)
                params.append(pytest.param(engine, case, marks=marks,
                                           id=f"{engine}-{case}"))
        metafunc.parametrize("engine, case", params)

    def _marks(self, name, case, engine="numpy"):
        applies = self.applies(name, case) and (
            engine == "numpy" or self.applies("test_engine_parity_numba", case))
        marks = [] if applies else [pytest.mark.inapplicable]
        if engine == "numba":
            marks.append(pytest.mark.skipif(not backend.numba_available(),
                                            reason="numba missing"))
        return marks

    def applies(self, test_name, case):
        """Whether the generated test ``test_name`` applies to ``case``
        (decided from a float64 set-up of the layer, once per case)."""
        key = (type(self), case)
        if key not in _PROBES:
            probe = type(self)()
            probe.configure(case)
            layer = probe.make_layer(np.float64)
            bottom = probe.make_bottoms(np.float64)
            layer.setup(bottom, probe.make_tops(np.float64))
            _PROBES[key] = probe, layer, bottom
        probe, layer, bottom = _PROBES[key]
        backward = probe.has_backward
        rules = {
            "test_gradient": backward and bool(
                probe.propagating(layer, bottom) or layer.blobs),
            "test_propagate_down": backward,
            "test_param_diffs_accumulate": backward and bool(layer.blobs),
            "test_bottom_diffs_overwritten": backward and bool(
                probe.propagating(layer, bottom)),
            "test_backward_float32": backward and bool(
                probe.propagating(layer, bottom) or layer.blobs),
            "test_loss_weight": probe.is_loss(layer),
            "test_engine_parity_numba":
                type(layer).forward_numba is not Layer.forward_numba,
        }
        return rules.get(test_name, True)

    def configure(self, case):
        """Apply the overrides of ``case`` to this instance."""
        for name, value in type(self).cases[case].items():
            setattr(self, name, value)

    # ----------------------------------------------------------- building
    def make_layer(self, dtype, extra=""):
        """A fresh layer from :attr:`layer` (plus prototxt ``extra``)."""
        param = io.parse_layer_param(f'name: "layer" {self.layer} {extra}')
        return netlite.create_layer(param, dtype=dtype)

    def make_bottoms(self, dtype, device="cpu"):
        """The bottoms, filled from a freshly seeded RNG (deterministic)."""
        netlite.set_random_seed(1701)
        out = []
        for shape, fill in self.bottoms:
            if callable(fill) and not isinstance(fill, FillerParameter):
                blob = make_blob(shape, dtype, fill(shape, dtype), device)
            else:
                blob = make_blob(shape, dtype, fill, device)
            out.append(blob)
        return out

    def make_tops(self, dtype):
        return [netlite.Blob(dtype=dtype) for _ in range(self.tops)]

    def is_loss(self, layer):
        return isinstance(layer, LossLayer) or any(layer.loss_weights)

    def propagating(self, layer, bottom):
        if self.grad_bottoms is not None:
            return list(self.grad_bottoms)
        return [i for i in range(len(bottom)) if layer.allow_force_backward(i)]

    def setup(self, case, dtype, extra=""):
        """Configure, build, set up and forward; return
        ``(layer, bottom, top, loss)``."""
        self.configure(case)
        layer = self.make_layer(dtype, extra)
        bottom, top = self.make_bottoms(dtype), self.make_tops(dtype)
        layer.setup(bottom, top)
        netlite.set_random_seed(1701)
        loss = layer.forward(bottom, top)
        return layer, bottom, top, loss

    def backward(self, layer, bottom, top, propagate_down=None, seed=7):
        """Backward with a seeded random top diff (loss tops keep their
        weight: it lives in the diff; with ``seed=None`` the other tops get
        0); return the bottom and param diffs."""
        gen = np.random.default_rng(seed)
        for j, t in enumerate(top):
            if not layer.loss(j):
                t.diff = 0 if seed is None else gen.standard_normal(t.shape)
        if propagate_down is None:
            wanted = self.propagating(layer, bottom)
            propagate_down = [i in wanted for i in range(len(bottom))]
        layer.backward(top, propagate_down, bottom)
        return ([b.diff.copy() for b in bottom],
                [p.diff.copy() for p in layer.blobs])

    # -------------------------------------------------------------- tests
    def test_forward(self, engine, case, dtype):
        netlite.set_cpu_engine(engine)
        self.configure(case)
        layer = self.make_layer(dtype)
        bottom, top = self.make_bottoms(dtype), self.make_tops(dtype)
        before = [b.data.copy() for b in bottom]
        layer.setup(bottom, top)
        netlite.set_random_seed(1701)
        loss = layer.forward(bottom, top)
        netlite.set_random_seed(1701)
        expected = self.oracle([np.asarray(b.data, np.float64) for b in bottom],
                               [np.asarray(p.data, np.float64) for p in layer.blobs])
        assert len(expected) == len(top)
        for j, (t, e) in enumerate(zip(top, expected)):
            assert t.dtype == dtype
            assert t.shape == np.shape(e), f"top[{j}]"
            assert_close(t.data, e, "oracle", dtype, f"top[{j}]")
        weighted = sum(layer.loss(j) * float(np.sum(t.data, dtype=np.float64))
                       for j, t in enumerate(top))
        tol = tolerance("oracle", dtype)
        assert loss == pytest.approx(weighted, rel=tol["rtol"], abs=tol["atol"])
        for b, x in zip(bottom, before):
            if not any(b is t for t in top):
                np.testing.assert_array_equal(b.data, x)

    def test_gradient(self, case):
        self.configure(case)
        dtype = np.float64
        layer = self.make_layer(dtype)
        bottom, top = self.make_bottoms(dtype), self.make_tops(dtype)
        layer.setup(bottom, top)
        checked = self.propagating(layer, bottom)
        checker = netlite.GradientChecker(self.stepsize, self.threshold, 1701,
                                          self.kink, self.kink_range)
        checker.check_gradient_exhaustive(layer, bottom, top,
                                          checked if checked else -2,
                                          param_ids=self.grad_params)

    def test_propagate_down(self, engine, case, dtype):
        netlite.set_cpu_engine(engine)
        layer, bottom, top, _ = self.setup(case, dtype)
        if self.aliases_diff:
            self._check_diff_alias(layer, bottom, top)
            return
        full_bottom, full_param = self.backward(layer, bottom, top)
        wanted = self.propagating(layer, bottom)
        for i in [None, *wanted]:  # None: no bottom at all
            for b in bottom:
                b.diff[...] = 7
            for p in layer.blobs:
                p.diff[...] = 0
            self.backward(layer, bottom, top,
                          [j == i for j in range(len(bottom))])
            for j, b in enumerate(bottom):
                if j == i:
                    assert_close(b.diff, full_bottom[j], "parity", dtype,
                                 f"bottom[{j}] alone")
                elif not any(b is t for t in top):
                    assert np.all(b.diff == 7), f"bottom[{j}] diff was written"
        # Each parameter alone, then none: the others' diffs are untouched,
        # the bottom diffs unchanged.
        n = len(layer.blobs)
        for only in [*range(n), None] if n else []:
            for j in range(n):
                layer.set_param_propagate_down(j, j == only)
            for p in layer.blobs:
                p.diff[...] = 7 if only is None else 0
            diffs, params = self.backward(layer, bottom, top)
            for j, p in enumerate(params):
                if j == only:
                    assert_close(p, full_param[j], "parity", dtype,
                                 f"param[{j}] alone")
                else:
                    assert np.all(p == (7 if only is None else 0)), (
                        f"param[{j}] diff was written")
            for j, (d, f) in enumerate(zip(diffs, full_bottom)):
                if j in wanted:
                    assert_close(d, f, "parity", dtype, f"bottom[{j}]")

    def _check_diff_alias(self, layer, bottom, top):
        # The top's diff is the bottom's: every propagate_down pattern
        # leaves dx = dy exactly, and backward writes nothing else.
        assert top[0].shares_diff_with(bottom[0])
        for flag in (False, True):
            dx, _ = self.backward(layer, bottom, top, [flag])
            dy = np.random.default_rng(7).standard_normal(top[0].shape)
            np.testing.assert_array_equal(
                dx[0], dy.astype(bottom[0].dtype).reshape(bottom[0].shape))

    def test_param_diffs_accumulate(self, engine, case, dtype):
        netlite.set_cpu_engine(engine)
        layer, bottom, top, _ = self.setup(case, dtype)
        for p in layer.blobs:
            p.diff[...] = 0
        _, once = self.backward(layer, bottom, top)
        assert any(np.any(d != 0) for d in once), "all parameter diffs are 0"
        _, twice = self.backward(layer, bottom, top)
        for j, (a, b) in enumerate(zip(once, twice)):
            assert_close(b, 2 * a.astype(np.float64), "parity", dtype,
                         f"param[{j}]")

    def test_bottom_diffs_overwritten(self, engine, case, dtype):
        netlite.set_cpu_engine(engine)
        layer, bottom, top, _ = self.setup(case, dtype)
        wanted = self.propagating(layer, bottom)
        clean, _ = self.backward(layer, bottom, top)
        for i in wanted:
            assert np.any(clean[i] != 0), f"bottom[{i}] diff is all 0"
            bottom[i].diff[...] = 1e3
        dirty, _ = self.backward(layer, bottom, top)
        for i in wanted:
            np.testing.assert_array_equal(dirty[i], clean[i])

    def test_loss_weight(self, engine, case, dtype):
        netlite.set_cpu_engine(engine)
        layer, bottom, top, loss = self.setup(case, dtype)
        # Only the loss is weighted: the other tops' diffs are 0 here.
        one_bottom, one_param = self.backward(layer, bottom, top, seed=None)
        layer3, bottom3, top3, loss3 = self.setup(
            case, dtype, "loss_weight: 3" + " loss_weight: 0" * (self.tops - 1)
        )
        assert loss3 == pytest.approx(3 * loss, rel=1e-6)
        for j, (t, t3) in enumerate(zip(top, top3)):
            # The tops hold the unweighted values; the weight is in the diff.
            np.testing.assert_array_equal(t3.data, t.data, f"top[{j}]")
        if not self.has_backward:
            return
        three_bottom, three_param = self.backward(layer3, bottom3, top3, seed=None)
        for i in self.propagating(layer, bottom):
            assert_close(three_bottom[i], 3 * one_bottom[i].astype(np.float64),
                         "parity", dtype, f"bottom[{i}]")
        for j, (a, b) in enumerate(zip(one_param, three_param)):
            assert_close(b, 3 * a.astype(np.float64), "parity", dtype,
                         f"param[{j}]")

    def test_backward_float32(self, case):
        """float32 diffs against the float64 diffs of the same inputs (which
        test_gradient holds to finite differences), at the float32 oracle
        tolerance."""
        self.configure(case)
        runs = []
        for dtype in (np.float32, np.float64):
            layer = self.make_layer(dtype)
            bottom = self.make_bottoms(np.float32)
            if dtype == np.float64:  # the same values, widened exactly
                bottom = [make_blob(b.shape, dtype, b.data) for b in bottom]
            top = self.make_tops(dtype)
            layer.setup(bottom, top)
            if runs:  # the float32 layer's parameters, widened
                for p, p32 in zip(layer.blobs, runs[0][0].blobs):
                    p.data[...] = p32.data
            netlite.set_random_seed(1701)
            layer.forward(bottom, top)
            runs.append((layer, self.backward(layer, bottom, top)))
        (_, (b32, p32)), (_, (b64, p64)) = runs
        for what, lo, hi in (("bottom", b32, b64), ("param", p32, p64)):
            for j, (x, y) in enumerate(zip(lo, hi)):
                assert_close(x, y, "oracle", np.float32, f"{what}[{j}]")

    @requires_numba()
    def test_engine_parity_numba(self, case, dtype):
        self._parity("numba", case, dtype)

    @requires_gpu()
    def test_engine_parity_cupy(self, case, dtype):
        self._parity("cupy", case, dtype)

    def _parity(self, engine, case, dtype):
        self.configure(case)
        inputs = [np.asarray(b.data) for b in self.make_bottoms(dtype)]
        probe = self.make_layer(dtype)
        probe_top = self.make_tops(dtype)
        probe.setup(self.make_bottoms(dtype), probe_top)
        gen = np.random.default_rng(7)
        diffs = [gen.standard_normal(t.shape) if not probe.loss(j)
                 else np.full(t.shape, probe.loss(j))
                 for j, t in enumerate(probe_top)]
        wanted = self.propagating(probe, inputs)
        pd = [i in wanted for i in range(len(inputs))]
        diffs = diffs if self.has_backward else None
        ref = run_engine("numpy", lambda: self.make_layer(dtype), inputs, diffs,
                         pd, dtype, self.tops)
        got = run_engine(engine, lambda: self.make_layer(dtype), inputs, diffs,
                         pd, dtype, self.tops)
        for what, a, b in zip(("tops", "bottom diffs", "param diffs"), ref, got):
            assert len(a) == len(b)
            for j, (x, y) in enumerate(zip(a, b)):
                assert_close(y, x, "parity", dtype, f"{what}[{j}] ({engine})")

