"""The LayerTestCase harness catches the bugs it exists to catch.

A small correct layer ``y = a * x`` (one parameter ``a`` per channel)
passes every generated test; each broken variant below plants one bug, and
the test it breaks must fail.
"""

import numpy as np
import pytest
from layer_test_case import LayerTestCase
from layer_testing import filler

from netlite.layer import Layer, LossLayer
from netlite.registry import register_layer


@register_layer("HarnessChannelScale")
class ChannelScale(Layer):
    """``y[n, c] = a[c] * x[n, c]``, learned ``a`` (initialised to 1.5)."""

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        if not self.blobs:
            self.blobs = [self.make_blob((bottom[0].shape[1],))]
            self.blobs[0].data[...] = np.linspace(0.5, 1.5, bottom[0].shape[1])

    def reshape(self, bottom, top):
        top[0].reshape_like(bottom[0])

    def forward_cpu(self, bottom, top):
        top[0].data[...] = bottom[0].data * self.blobs[0].data

    def backward_cpu(self, top, propagate_down, bottom):
        dy, x = top[0].diff, bottom[0].data
        if self.propagates_param(0):
            self.blobs[0].diff += (dy * x).sum(axis=0)
        if propagate_down[0]:
            bottom[0].diff[...] = dy * self.blobs[0].data


@register_layer("HarnessSquareLoss")
class SquareLoss(LossLayer):
    """``L = sum(x^2) / 2``; the second bottom is ignored."""

    def forward_cpu(self, bottom, top):
        top[0].data[...] = 0.5 * np.sum(bottom[0].data ** 2)

    def backward_cpu(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = bottom[0].data * top[0].diff


class WrongForward(ChannelScale):
    def forward_cpu(self, bottom, top):
        super().forward_cpu(bottom, top)
        top[0].data[0, 0] += 1e-3


class WrongGradient(ChannelScale):
    def backward_cpu(self, top, propagate_down, bottom):
        super().backward_cpu(top, propagate_down, bottom)
        if propagate_down[0]:
            bottom[0].diff[1, 1] *= 1.001


class IgnoresPropagateDown(ChannelScale):
    def backward_cpu(self, top, propagate_down, bottom):
        super().backward_cpu(top, [True], bottom)


class AccumulatesBottomDiff(ChannelScale):
    def backward_cpu(self, top, propagate_down, bottom):
        before = bottom[0].diff.copy()
        super().backward_cpu(top, propagate_down, bottom)
        bottom[0].diff[...] += before


class OverwritesParamDiff(ChannelScale):
    def backward_cpu(self, top, propagate_down, bottom):
        self.blobs[0].diff[...] = 0
        super().backward_cpu(top, propagate_down, bottom)


class WrongInFloat32(ChannelScale):
    def backward_cpu(self, top, propagate_down, bottom):
        super().backward_cpu(top, propagate_down, bottom)
        if self.dtype == np.float32:
            self.blobs[0].diff[0] += 1e-3


class IgnoresOneParamFlag(ChannelScale):
    def backward_cpu(self, top, propagate_down, bottom):
        self.param_propagate_down = [True]
        super().backward_cpu(top, propagate_down, bottom)


class IgnoresLossWeight(SquareLoss):
    def backward_cpu(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = bottom[0].data


class ChannelScaleCase(LayerTestCase):
    layer = 'type: "HarnessChannelScale"'
    bottoms = [((3, 4), filler("gaussian"))]

    def oracle(self, bottoms, blobs):
        return [bottoms[0] * blobs[0]]


class SquareLossCase(LayerTestCase):
    layer = 'type: "HarnessSquareLoss"'
    bottoms = [((3, 4), filler("gaussian")), ((3,), filler("constant"))]

    def oracle(self, bottoms, blobs):
        return [np.array(0.5 * np.sum(bottoms[0] ** 2))]


def _run(case_class, test, layer_class=None, monkeypatch=None):
    case = case_class()
    if layer_class is not None:
        # Build the broken variant in place of the registered layer.
        monkeypatch.setattr(case, "make_layer", lambda dtype, extra="": (
            layer_class(f'name: "layer" {case.layer} {extra}', dtype=dtype)))
    method = getattr(case, test)
    args = method.__code__.co_varnames[1:method.__code__.co_argcount]
    values = {"engine": "numpy", "case": "default",
              "dtype": np.dtype(np.float64)}
    method(*[values[a] for a in args])


GENERATED = ["test_forward", "test_gradient", "test_propagate_down",
             "test_param_diffs_accumulate", "test_bottom_diffs_overwritten",
             "test_backward_float32"]


@pytest.mark.parametrize("test", GENERATED)
def test_a_correct_layer_passes(test):
    _run(ChannelScaleCase, test)


@pytest.mark.parametrize("test", ["test_forward", "test_gradient",
                                  "test_loss_weight"])
def test_a_correct_loss_passes(test):
    _run(SquareLossCase, test)


@pytest.mark.parametrize("layer_class, test", [
    (WrongForward, "test_forward"),
    (WrongGradient, "test_gradient"),
    (IgnoresPropagateDown, "test_propagate_down"),
    (AccumulatesBottomDiff, "test_bottom_diffs_overwritten"),
    (OverwritesParamDiff, "test_param_diffs_accumulate"),
    (WrongInFloat32, "test_backward_float32"),
    (IgnoresOneParamFlag, "test_propagate_down"),
])
def test_each_planted_bug_is_caught(layer_class, test, monkeypatch):
    with pytest.raises(AssertionError):
        _run(ChannelScaleCase, test, layer_class, monkeypatch)


def test_an_ignored_loss_weight_is_caught(monkeypatch):
    with pytest.raises(AssertionError):
        _run(SquareLossCase, "test_loss_weight", IgnoresLossWeight, monkeypatch)


def test_inapplicable_tests_are_known():
    case = ChannelScaleCase()
    assert case.applies("test_param_diffs_accumulate", "default")
    assert not case.applies("test_loss_weight", "default")
    assert not case.applies("test_engine_parity_numba", "default")
    assert SquareLossCase().applies("test_loss_weight", "default")
    assert not SquareLossCase().applies("test_param_diffs_accumulate", "default")
