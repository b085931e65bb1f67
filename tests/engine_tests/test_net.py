"""Net: port of the test_net.cpp highlights (lookups, backward planning, loss
weights, weight sharing, propagate_down, partial passes, reshaping, phase and
stage selection) and tests of the pycaffe-shaped Python API.

Nets that draw Gaussian data (DummyData) or weights are built right after
``netlite.set_random_seed(1701)`` so that two builds see the same numbers.
"""

import contextlib
import logging
import re
import warnings

import numpy as np
import pytest

import netlite
from netlite import io

SEED = 1701


def _needs(*types):
    missing = sorted(set(types) - set(netlite.layer_types()))
    return pytest.mark.skipif(bool(missing), reason=f"layers missing: {missing}")


def _net(text, dtype=np.float32, **kwargs):
    netlite.set_random_seed(SEED)
    return netlite.Net(text, dtype=dtype, **kwargs)


def _ip(name, bottom, top, num_output, weight="type: 'gaussian' std: 0.01",
        extra=""):
    return (f"layer {{ name: '{name}' type: 'InnerProduct' bottom: '{bottom}' "
            f"top: '{top}' inner_product_param {{ num_output: {num_output} "
            f"weight_filler {{ {weight} }} bias_filler {{ type: 'constant' "
            f"value: 0 }} }} param {{ lr_mult: 1 decay_mult: 1 }} "
            f"param {{ lr_mult: 2 decay_mult: 0 }} {extra} }}")


_DATA_LABEL = """layer { name: 'data' type: 'DummyData'
    dummy_data_param {
      shape { dim: 5 dim: 2 dim: 3 dim: 4 }
      data_filler { type: 'gaussian' std: 0.01 }
      shape { dim: 5 } data_filler { type: 'constant' value: 0 } }
    top: 'data' top: 'label' }
"""

_DATA_LABEL_LEGACY = """layer { name: 'data' type: 'DummyData'
    dummy_data_param { num: 5 channels: 2 height: 3 width: 4
      num: 5 channels: 1 height: 1 width: 1
      data_filler { type: 'gaussian' std: 0.01 } }
    top: 'data' top: 'label' }
"""


def tiny_net(force_backward=False, accuracy=False, dtype=np.float32):
    text = ("name: 'TinyTestNetwork' " + _DATA_LABEL
            + _ip("innerproduct", "data", "innerproduct", 1000)
            + "layer { name: 'loss' type: 'SoftmaxWithLoss' "
              "bottom: 'innerproduct' bottom: 'label' top: 'top_loss' }")
    if accuracy:
        text += ("layer { name: 'accuracy' type: 'Accuracy' "
                 "bottom: 'innerproduct' bottom: 'label' top: 'accuracy' }")
    if force_backward:
        text += " force_backward: true"
    return _net(text, dtype)


def tiny_net_euclidean(force_backward=False, dtype=np.float32):
    text = ("name: 'TinyTestEuclidLossNetwork' " + _DATA_LABEL_LEGACY
            + _ip("innerproduct", "data", "innerproduct", 1)
            + "layer { name: 'loss' type: 'EuclideanLoss' "
              "bottom: 'innerproduct' bottom: 'label' }")
    if force_backward:
        text += " force_backward: true"
    return _net(text, dtype)


def tricky_net(dtype=np.float32):
    # The label passes through an InnerProduct, so it "needs backward".
    text = ("name: 'TrickyTestNetwork' " + _DATA_LABEL_LEGACY
            + _ip("innerproduct", "data", "transformed_data", 1000)
            + _ip("innerproduct", "label", "transformed_label", 1)
            + "layer { name: 'loss' type: 'SoftmaxWithLoss' "
              "bottom: 'transformed_data' bottom: 'transformed_label' }")
    return _net(text, dtype)


def unshared_weights_net(loss_weight=None, midnet_loss_weight=None,
                         force_backward=False, bias_term=False,
                         lr=(1, 2, 1, 2), dtype=np.float32):
    """Two IPs (weights std 10) on the same data, EuclideanLoss between them.

    ``lr`` = (w1, b1, w2, b2) lr_mults (biases only with ``bias_term``).
    """
    def ip(i, lr_w, lr_b, loss=None):
        bias = f"param {{ lr_mult: {lr_b} }}" if bias_term else ""
        weight = f"loss_weight: {loss}" if loss is not None else ""
        return (f"layer {{ name: 'innerproduct{i}' type: 'InnerProduct' "
                f"inner_product_param {{ num_output: 10 bias_term: "
                f"{str(bias_term).lower()} weight_filler {{ type: 'gaussian' "
                f"std: 10 }} }} param {{ name: 'unsharedweights{i}' "
                f"lr_mult: {lr_w} }} {bias} bottom: 'data' "
                f"top: 'innerproduct{i}' {weight} }}")

    text = ("name: 'UnsharedWeightsNetwork' "
            + ("force_backward: true " if force_backward else "")
            + "layer { name: 'data' type: 'DummyData' dummy_data_param { "
              "num: 5 channels: 2 height: 3 width: 4 data_filler { "
              "type: 'gaussian' std: 0.01 } } top: 'data' }"
            + ip(1, lr[0], lr[1], midnet_loss_weight) + ip(2, lr[2], lr[3])
            + "layer { name: 'loss' type: 'EuclideanLoss' "
            + (f"loss_weight: {loss_weight} " if loss_weight is not None else "")
            + "bottom: 'innerproduct1' bottom: 'innerproduct2' }")
    return _net(text, dtype)


def shared_weights_net(dtype=np.float32):
    ip = ("type: 'InnerProduct' inner_product_param { num_output: 10 "
          "bias_term: false weight_filler { type: 'gaussian' std: 10 } } "
          "param { name: 'sharedweights' } bottom: 'data'")
    text = ("name: 'SharedWeightsNetwork' layer { name: 'data' type: 'DummyData' "
            "dummy_data_param { num: 5 channels: 2 height: 3 width: 4 "
            "data_filler { type: 'gaussian' std: 0.01 } } top: 'data' } "
            f"layer {{ name: 'innerproduct1' {ip} top: 'innerproduct1' }} "
            f"layer {{ name: 'innerproduct2' {ip} top: 'innerproduct2' }} "
            "layer { name: 'loss' type: 'EuclideanLoss' bottom: 'innerproduct1' "
            "bottom: 'innerproduct2' }")
    return _net(text, dtype)


def diff_data_net(shared, dtype=np.float32):
    """data1 -> ip1 -> ip2 vs data2; constant 0.5 weights, shared or not."""
    names = ("sharedweights", "sharedweights") if shared else (
        "unsharedweights1", "unsharedweights2")
    ip = ("type: 'InnerProduct' inner_product_param { num_output: 10 "
          "bias_term: false weight_filler { type: 'constant' value: 0.5 } }")
    text = ("name: 'DiffDataNetwork' layer { name: 'data' type: 'DummyData' "
            "dummy_data_param { num: 10 channels: 10 height: 1 width: 1 "
            "num: 10 channels: 10 height: 1 width: 1 data_filler { "
            "type: 'gaussian' std: 10 } } top: 'data1' top: 'data2' } "
            f"layer {{ name: 'innerproduct1' {ip} param {{ name: '{names[0]}' }} "
            "bottom: 'data1' top: 'innerproduct1' } "
            f"layer {{ name: 'innerproduct2' {ip} param {{ name: '{names[1]}' }} "
            "bottom: 'innerproduct1' top: 'innerproduct2' } "
            "layer { name: 'loss' type: 'EuclideanLoss' bottom: 'data2' "
            "bottom: 'innerproduct2' }")
    return _net(text, dtype)


@contextlib.contextmanager
def _quiet():
    """Any warning is an error here (the suite's default, stated where a
    test relies on it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _diffs(net):
    return {name: blob.diff.copy() for name, blob in net.blobs.items()}


def _param_diffs(net):
    return [blob.diff.copy() for blob in net.all_params]


# ------------------------------------------------------------------ lookups
@_needs("DummyData", "InnerProduct", "SoftmaxWithLoss")
def test_has_and_get_blob(dtype):
    net = tiny_net(dtype=dtype)
    for name in ("data", "label", "innerproduct", "top_loss"):
        assert net.has_blob(name)
    assert not net.has_blob("loss")  # a layer, not a blob
    assert list(net.blobs) == ["data", "label", "innerproduct", "top_loss"]
    assert net.blobs["innerproduct"] is net.top_vecs[1][0]
    assert net.blobs["data"].dtype == dtype


@_needs("DummyData", "InnerProduct", "SoftmaxWithLoss")
def test_has_and_get_layer():
    net = tiny_net()
    for name in ("data", "innerproduct", "loss"):
        assert net.has_layer(name)
    assert not net.has_layer("label")
    assert [net.layer_by_name(n) for n in ("data", "innerproduct", "loss")] == (
        net.layers)
    with pytest.raises(KeyError, match="no layer named 'label'"):
        net.layer_by_name("label")
    assert net.layer_index("loss") == 2


# ------------------------------------------------------- backward planning
@_needs("DummyData", "InnerProduct", "SoftmaxWithLoss")
def test_bottom_need_backward():
    net = tiny_net()
    assert net.bottom_need_backward == [[], [False], [True, False]]
    assert net.layer_need_backward == [False, True, True]


@_needs("DummyData", "InnerProduct", "SoftmaxWithLoss")
def test_bottom_need_backward_force():
    # force_backward reaches the data but never a loss layer's labels.
    net = tiny_net(force_backward=True)
    assert net.bottom_need_backward == [[], [True], [True, False]]


@_needs("DummyData", "InnerProduct", "EuclideanLoss")
def test_bottom_need_backward_euclidean_force():
    # EuclideanLoss allows forcing a gradient into its second bottom.
    net = tiny_net_euclidean(force_backward=True)
    assert net.bottom_need_backward == [[], [True], [True, True]]


@_needs("DummyData", "InnerProduct", "SoftmaxWithLoss")
def test_bottom_need_backward_tricky():
    net = tricky_net()
    # The label "needs backward" since weights lie under it (a real backward
    # would then be refused by the loss layer).
    assert net.bottom_need_backward == [[], [False], [False], [True, True]]


@_needs("DummyData", "InnerProduct", "SoftmaxWithLoss", "Accuracy")
def test_backward_with_accuracy_layer(monkeypatch):
    net = tiny_net(accuracy=True)
    assert net.has_blob("accuracy")
    accuracy = net.layer_by_name("accuracy")
    assert not net.layer_need_backward[net.layer_index("accuracy")]

    def refuse(*args):
        raise AssertionError("Accuracy.backward must not run")

    monkeypatch.setattr(accuracy, "backward", refuse)
    loss = net.forward_backward()
    assert loss == pytest.approx(np.log(1000), rel=1e-3)
    assert net.outputs == ["accuracy", "top_loss"]


def _skip_prop_net(skip_label):
    propagate = "propagate_down: true propagate_down: " + (
        "false" if skip_label else "true")
    # Upstream uses SigmoidCrossEntropyLoss with an ArgMax on fake labels;
    # EuclideanLoss and a ReLU play the same roles here.
    text = ("name: 'SkipPropTestNetwork' " + _DATA_LABEL
            + "layer { name: 'silence' bottom: 'label' type: 'Silence' }"
            + _ip("innerproduct", "data", "innerproduct", 1)
            + _ip("ip_fake_labels", "data", "fake_labels", 1)
            + "layer { name: 'argmax' bottom: 'fake_labels' top: 'label_argmax' "
              "type: 'ReLU' }"
            + "layer { name: 'loss' bottom: 'innerproduct' bottom: 'label_argmax' "
            + propagate + " top: 'cross_entropy_loss' type: 'EuclideanLoss' "
              "loss_weight: 0.1 }")
    return _net(text)


@_needs("DummyData", "InnerProduct", "EuclideanLoss", "Silence", "ReLU")
def test_skip_propagate_down():
    net = _skip_prop_net(skip_label=False)
    flags = dict(zip(net.layer_names, net.layer_need_backward))
    assert net.bottom_need_backward[net.layer_index("loss")] == [True, True]
    assert flags == {"data": False, "data_data_0_split": False, "silence": False,
                     "innerproduct": True, "ip_fake_labels": True, "argmax": True,
                     "loss": True}
    net = _skip_prop_net(skip_label=True)
    flags = dict(zip(net.layer_names, net.layer_need_backward))
    assert net.bottom_need_backward[net.layer_index("loss")] == [True, False]
    assert flags == {"data": False, "data_data_0_split": False, "silence": False,
                     "innerproduct": True, "ip_fake_labels": False, "argmax": False,
                     "loss": True}
    assert net.bottom_need_backward[net.layer_index("argmax")] == [False]


@_needs("DummyData", "InnerProduct", "EuclideanLoss")
@pytest.mark.parametrize("force", [False, True])
def test_force_propagate_down(force):
    text = ("name: 'ForcePropTestNetwork' " + _DATA_LABEL
            + "layer { name: 'innerproduct' type: 'InnerProduct' "
              "inner_product_param { num_output: 1 weight_filler { "
              "type: 'gaussian' std: 0.01 } } bottom: 'data' top: 'innerproduct' "
            + ("propagate_down: true " if force else "") + "} "
            + "layer { name: 'loss' bottom: 'innerproduct' bottom: 'label' "
              "top: 'cross_entropy_loss' type: 'EuclideanLoss' }")
    net = _net(text)
    assert net.layer_need_backward == [False, True, True]
    assert net.bottom_need_backward == [[], [force], [True, False]]


# -------------------------------------------------------------- loss weights
LOSS_WEIGHTS = (2, 0, 1, -1, -2.5, 3.7)


@_needs("DummyData", "InnerProduct", "EuclideanLoss")
def test_loss_weight(dtype):
    # Without loss_weight the EuclideanLoss weighs 1; with weight w the loss
    # and every blob and parameter gradient scale by w.
    net = unshared_weights_net(force_backward=True, dtype=dtype)
    loss = net.forward_backward()
    assert abs(loss) >= 1e-2
    blob_grads, param_grads = _diffs(net), _param_diffs(net)
    assert any(np.abs(g).sum() > 0 for g in blob_grads.values())
    for w in LOSS_WEIGHTS:
        net = unshared_weights_net(loss_weight=w, force_backward=True, dtype=dtype)
        margin = 1e-4 * abs(w)
        assert net.forward_backward() == pytest.approx(loss * w, abs=margin)
        assert list(net.blobs) == list(blob_grads)
        for name, blob in net.blobs.items():
            np.testing.assert_allclose(blob.diff, blob_grads[name] * w, rtol=0,
                                       atol=margin, err_msg=name)
        for mine, base in zip(net.all_params, param_grads):
            np.testing.assert_allclose(mine.diff, base * w, rtol=0, atol=margin)


@_needs("DummyData", "InnerProduct", "EuclideanLoss")
def test_loss_weight_mid_net(dtype):
    # A loss weight on an intermediate blob (fanned out through a split).
    net = unshared_weights_net(loss_weight=0, midnet_loss_weight=1,
                               force_backward=True, dtype=dtype)
    loss = net.forward_backward()
    assert abs(loss) >= 1e-2
    data_grad = net.blobs["data"].diff.copy()
    assert np.abs(data_grad).sum() > 0
    for w in LOSS_WEIGHTS:
        net = unshared_weights_net(loss_weight=0, midnet_loss_weight=w,
                                   force_backward=True, dtype=dtype)
        margin = 1e-4 * abs(w)
        assert net.forward_backward() == pytest.approx(loss * w, abs=margin)
        np.testing.assert_allclose(net.blobs["data"].diff, data_grad * w, rtol=0,
                                   atol=margin)


@_needs("DummyData", "InnerProduct", "EuclideanLoss")
def test_combo_loss_weight(dtype):
    def run(main, mid):
        net = unshared_weights_net(main, mid, force_backward=True, dtype=dtype)
        return net.forward_backward(), _diffs(net)

    loss, base = run(1, 1)
    margin = 1e-4

    # Vary the main loss weight: every gradient changes linearly except the
    # split top that carries only the mid-net loss.
    loss2, grads2 = run(2, 1)
    loss3, grads3 = run(3, 1)
    for name in base:
        d2, d3 = grads2[name] - base[name], grads3[name] - base[name]
        if name == "innerproduct1_innerproduct1_0_split_0":
            assert not d2.any() and not d3.any(), name
        else:
            assert np.all(np.abs(d2) > 1e-4), name
            np.testing.assert_allclose(d3, 2 * d2, rtol=0, atol=margin, err_msg=name)
    assert abs(loss2 - loss) > 1e-4
    assert loss3 - loss == pytest.approx(2 * (loss2 - loss), abs=margin)

    # Vary the mid-net weight: only what lies under innerproduct1 changes.
    loss2, grads2 = run(1, 2)
    loss3, grads3 = run(1, 3)
    under_mid = {"innerproduct1", "innerproduct1_innerproduct1_0_split_0",
                 "data_data_0_split_0", "data"}
    assert under_mid <= set(base)
    for name in base:
        d2, d3 = grads2[name] - base[name], grads3[name] - base[name]
        if name in under_mid:
            assert np.all(np.abs(d2) > 1e-4), name
            np.testing.assert_allclose(d3, 2 * d2, rtol=0, atol=margin, err_msg=name)
        else:
            assert not d2.any() and not d3.any(), name
    assert abs(loss2 - loss) > 1e-4
    assert loss3 - loss == pytest.approx(2 * (loss2 - loss), abs=margin)


# ------------------------------------------------------------ weight sharing
@_needs("DummyData", "InnerProduct", "EuclideanLoss")
def test_unshared_weights_data_net():
    net = unshared_weights_net()
    net.forward()
    assert net.loss > 0


@_needs("DummyData", "InnerProduct", "EuclideanLoss")
def test_shared_weights_data_net(dtype):
    net = shared_weights_net(dtype)
    net.forward()
    assert net.loss == pytest.approx(0.0, abs=1e-12)
    assert net.param_owners == [-1, 0]
    assert len(net.learnable_params) == 1 and len(net.all_params) == 2


@_needs("DummyData", "InnerProduct", "EuclideanLoss")
def test_unshared_weights_diff_net(dtype):
    net = unshared_weights_net(dtype=dtype)
    net.forward()
    net.backward()
    grad1 = net.layer_by_name("innerproduct1").blobs[0].diff
    grad2 = net.layer_by_name("innerproduct2").blobs[0].diff
    assert np.all(np.abs(grad1) > 0)
    np.testing.assert_allclose(-grad1, grad2, rtol=1e-6)


@_needs("DummyData", "InnerProduct", "EuclideanLoss")
def test_shared_weights_diff_net(dtype):
    net = shared_weights_net(dtype)
    net.forward()
    net.backward()
    assert net.loss == pytest.approx(0.0, abs=1e-12)
    for name in ("innerproduct1", "innerproduct2"):
        np.testing.assert_array_equal(net.layer_by_name(name).blobs[0].diff, 0)


@_needs("DummyData", "InnerProduct", "EuclideanLoss")
def test_shared_weights_update(dtype):
    net = diff_data_net(shared=True, dtype=dtype)
    assert net.layer_names[1:3] == ["innerproduct1", "innerproduct2"]
    w1, w2 = net.layers[1].blobs[0], net.layers[2].blobs[0]
    assert w1.shares_data_with(w2) and w1.shares_diff_with(w2)
    net.forward()
    net.backward()
    shared_data, shared_diff = w1.data.copy(), w1.diff.copy()
    assert np.all(shared_diff != 0)
    net.update()
    np.testing.assert_array_equal(w1.data, shared_data - shared_diff)
    assert w1.shares_data_with(w2)
    assert net.learnable_params == [w1]

    net = diff_data_net(shared=False, dtype=dtype)
    u1, u2 = net.layers[1].blobs[0], net.layers[2].blobs[0]
    assert not u1.shares_data_with(u2) and not u1.shares_diff_with(u2)
    net.forward()
    net.backward()
    d1, d2 = u1.diff.copy(), u2.diff.copy()
    assert np.all(d1 != 0) and np.all(d2 != 0) and np.all(d1 != d2)
    # The shared diff is the sum of both users' gradients.
    np.testing.assert_allclose(d1 + d2, shared_diff, rtol=1e-5)
    data1, data2 = u1.data.copy(), u2.data.copy()
    net.update()
    np.testing.assert_array_equal(u1.data, data1 - d1)
    np.testing.assert_array_equal(u2.data, data2 - d2)
    assert np.all(u1.data != u2.data)


@_needs("DummyData", "InnerProduct", "EuclideanLoss")
@pytest.mark.parametrize("how", ["to_proto", ".caffemodel", ".npz"])
def test_shared_weights_resume(how, tmp_path, dtype):
    net = diff_data_net(shared=True, dtype=dtype)
    net.forward_backward()
    net.update()
    trained = net.layers[1].blobs[0].data.copy()
    fresh = diff_data_net(shared=True, dtype=dtype)
    if how == "to_proto":
        fresh.copy_trained_layers_from(net.to_proto())
    else:
        path = tmp_path / f"shared{how}"
        net.save(path)
        fresh.copy_from(path)
    w1, w2 = fresh.layers[1].blobs[0], fresh.layers[2].blobs[0]
    assert w1 is not w2
    assert w1.shares_data_with(w2) and w1.shares_diff_with(w2)
    np.testing.assert_allclose(w1.data, trained, rtol=1e-6)


# ------------------------------------------------------- param propagation
@_needs("DummyData", "InnerProduct", "EuclideanLoss")
def test_param_propagate_down(dtype):
    def asums(lr):
        net = unshared_weights_net(bias_term=True, lr=lr, dtype=dtype)
        net.forward()
        net.backward()
        assert len(net.all_params) == 4
        return [blob.asum_diff() for blob in net.all_params]

    base = asums((1, 2, 1, 2))
    assert all(a > 1e-3 for a in base)
    # lr_mult is the solver's business: other nonzero values, same gradients.
    np.testing.assert_allclose(asums((2, 4, 2, 4)), base, rtol=1e-6)
    # lr_mult 0 turns a gradient off (params ordered w1, b1, w2, b2).
    got = asums((1, 0, 0, 1))
    assert got[1] == 0 and got[2] == 0
    np.testing.assert_allclose([got[0], got[3]], [base[0], base[3]], rtol=1e-6)
    got = asums((0, 1, 1, 0))
    assert got[0] == 0 and got[3] == 0
    np.testing.assert_allclose([got[1], got[2]], [base[1], base[2]], rtol=1e-6)


# ------------------------------------------------------------ partial passes
@_needs("DummyData", "InnerProduct", "SoftmaxWithLoss")
def test_from_to(dtype):
    # force_backward so that the data diff is non-trivial (upstream compares
    # a diff that is never written).
    net = tiny_net(force_backward=True, dtype=dtype)
    net.forward()
    net.backward()
    data_diff = net.blobs["data"].diff.copy()
    assert np.abs(data_diff).sum() > 0
    loss = float(net.blobs["top_loss"].data)
    last = len(net.layers) - 1
    # Combined partial forwards (layer 0 skipped: it would redraw the data)
    # give the same loss.  (Upstream always runs ForwardFromTo(1, 1).)
    for i in range(1, last + 1):
        net.forward_from_to(1, i)
        if i < last:
            net.forward_from_to(i + 1, last)
        assert float(net.blobs["top_loss"].data) == loss
    # Backward to i, then from i - 1: the same data diff, since bottom diffs
    # are overwritten, not accumulated.
    for i in range(1, last + 1):
        net.backward_from_to(last, i)
        net.backward_from_to(i - 1, 0)
        np.testing.assert_array_equal(net.blobs["data"].diff, data_diff)


@_needs("DummyData", "InnerProduct", "SoftmaxWithLoss")
def test_forward_and_backward_by_layer_name():
    net = tiny_net(force_backward=True)
    out = net.forward(end="innerproduct")
    assert list(out) == ["innerproduct"]
    before = net.blobs["top_loss"].data.copy()
    out = net.forward(start="loss")
    assert list(out) == ["top_loss"]
    assert float(out["top_loss"]) != float(before)  # the loss layer ran
    diffs = net.backward(start="loss", end="innerproduct")
    assert list(diffs) == ["data"]
    assert np.abs(diffs["data"]).sum() > 0


# ------------------------------------------------------------------ reshape
_RESHAPABLE = """name: 'ReshapableNetwork'
    layer { name: 'data' type: 'Input' top: 'data'
            input_param { shape { dim: 1 dim: 3 dim: 100 dim: 100 } } }
    layer { name: 'conv1' type: 'Convolution' bottom: 'data' top: 'conv1'
            convolution_param { num_output: 5 kernel_size: 3 stride: 2
              weight_filler { type: 'gaussian' std: 0.01 }
              bias_filler { type: 'constant' value: 0.2 } } }
    layer { name: 'relu1' type: 'ReLU' bottom: 'conv1' top: 'conv1' }
    layer { name: 'pool1' type: 'Pooling' bottom: 'conv1' top: 'pool1'
            pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
    layer { name: 'softmax' type: 'Softmax' bottom: 'pool1' top: 'softmax' }
"""


@_needs("Input", "Convolution", "ReLU", "Pooling", "Softmax")
def test_reshape(dtype):
    # Upstream also has an LRN layer after the pooling; netlite has none.
    netlite.set_random_seed(SEED)
    small = netlite.rng.get_rng().normal(size=(2, 3, 12, 10))
    large = netlite.rng.get_rng().normal(size=(4, 3, 9, 11))
    net = _net(_RESHAPABLE, dtype)
    data = net.blobs["data"]
    outputs = []
    for x in (small, large):
        # The C++ way: reshape the input blob, fill it, forward.
        data.reshape(x.shape)
        data.data = x
        net.forward()
        # No loss, no force_backward: a backward that computes nothing
        # (upstream runs it all the same); netlite warns.
        with pytest.warns(netlite.NetliteWarning) if x is small else _quiet():
            net.backward()
        outputs.append(net.blobs["softmax"].data.copy())
    for x, expected in zip((small, large), outputs):
        # The pycaffe way: forward(data=...) reshapes the input itself.
        out = net.forward(data=x)
        np.testing.assert_array_equal(out["softmax"], expected)
        assert data.shape == x.shape
    assert outputs[0].shape[0] == 2 and outputs[1].shape[0] == 4
    assert outputs[0].shape[2:] != outputs[1].shape[2:]
    np.testing.assert_allclose(outputs[1].sum(axis=1), 1.0, rtol=1e-5)


# ------------------------------------------------------- phases and stages
_ALL_IN_ONE = """name: 'All-in-one Network'
    layer { name: 'train-data' type: 'DummyData' top: 'data' top: 'label'
            dummy_data_param { shape { dim: 1 dim: 10 } shape { dim: 1 dim: 1 } }
            include { phase: TRAIN stage: 'train' } }
    layer { name: 'val-data' type: 'DummyData' top: 'data' top: 'label'
            dummy_data_param { shape { dim: 1 dim: 10 } shape { dim: 1 dim: 1 } }
            include { phase: TEST stage: 'val' } }
    layer { name: 'deploy-data' type: 'Input' top: 'data'
            input_param { shape { dim: 1 dim: 10 } }
            include { phase: TEST stage: 'deploy' } }
    layer { name: 'ip' type: 'InnerProduct' bottom: 'data' top: 'ip'
            inner_product_param { num_output: 2 } }
    layer { name: 'loss' type: 'SoftmaxWithLoss' bottom: 'ip' bottom: 'label'
            top: 'loss'
            include { phase: TRAIN stage: 'train' }
            include { phase: TEST stage: 'val' } }
"""


@_needs("DummyData", "Input", "InnerProduct", "SoftmaxWithLoss")
@pytest.mark.parametrize("phase, stage, expected", [
    (netlite.TRAIN, "train", ["train-data", "ip", "loss"]),
    (netlite.TEST, "val", ["val-data", "ip", "loss"]),
    (netlite.TEST, "deploy", ["deploy-data", "ip"]),
])
def test_all_in_one_net(phase, stage, expected, tmp_path):
    path = tmp_path / "all_in_one.prototxt"
    path.write_text(_ALL_IN_ONE)
    net = netlite.Net(str(path), phase, stages=[stage])
    assert net.layer_names == expected
    assert net.inputs == (["data"] if stage == "deploy" else [])
    assert net.outputs == (["ip"] if stage == "deploy" else ["loss"])


# --------------------------------------------------------------- pycaffe API
_API_NET = """name: 'api' force_backward: true
    layer { name: 'input' type: 'Input' top: 'data' top: 'target'
            input_param { shape { dim: 2 dim: 4 } shape { dim: 2 dim: 3 } } }
    layer { name: 'ip1' type: 'InnerProduct' bottom: 'data' top: 'ip1'
            inner_product_param { num_output: 5
              weight_filler { type: 'gaussian' std: 0.5 }
              bias_filler { type: 'gaussian' std: 0.5 } } }
    layer { name: 'relu1' type: 'ReLU' bottom: 'ip1' top: 'ip1' }
    layer { name: 'ip2' type: 'InnerProduct' bottom: 'ip1' top: 'ip2'
            inner_product_param { num_output: 3
              weight_filler { type: 'gaussian' std: 0.5 } } }
    layer { name: 'loss' type: 'EuclideanLoss' bottom: 'ip2' bottom: 'target'
            top: 'loss' }
"""


def _api_inputs(batch=2):
    gen = netlite.rng.get_rng()
    return {"data": gen.normal(size=(batch, 4)), "target": gen.normal(size=(batch, 3))}


def _numpy_api_net(net, data, target):
    """The API net's loss and gradients, by hand."""
    w1, b1 = (b.data.astype(np.float64) for b in net.params["ip1"])
    w2, b2 = (b.data.astype(np.float64) for b in net.params["ip2"])
    h = np.maximum(data @ w1.T + b1, 0)
    y = h @ w2.T + b2
    n = data.shape[0]
    loss = ((y - target) ** 2).sum() / (2 * n)
    dy = (y - target) / n
    dw2, db2 = dy.T @ h, dy.sum(0)
    dh = (dy @ w2) * (h > 0)
    dw1, db1 = dh.T @ data, dh.sum(0)
    return loss, {"ip1": [dw1, db1], "ip2": [dw2, db2]}, dh @ w1, -dy


API_LAYERS = ("Input", "InnerProduct", "ReLU", "EuclideanLoss")


@_needs(*API_LAYERS)
def test_api_attributes(dtype):
    net = _net(_API_NET, dtype)
    assert net.name == "api" and net.phase == netlite.TRAIN
    assert net.layer_names == ["input", "ip1", "relu1", "ip2", "loss"]
    assert [layer.type for layer in net.layers] == [
        "Input", "InnerProduct", "ReLU", "InnerProduct", "EuclideanLoss"]
    assert list(net.blobs) == ["data", "target", "ip1", "ip2", "loss"]
    assert net.inputs == ["data", "target"]
    assert net.outputs == ["loss"]
    assert list(net.params) == ["ip1", "ip2"]
    assert [b.shape for b in net.params["ip1"]] == [(5, 4), (5,)]
    assert [b.shape for b in net.params["ip2"]] == [(3, 5), (3,)]
    assert all(b.dtype == dtype for b in net.all_params)
    # bottom_vecs/top_vecs hold the very blobs of net.blobs (in place: same).
    assert net.bottom_vecs[2][0] is net.top_vecs[2][0] is net.blobs["ip1"]
    assert net.bottom_vecs[4] == [net.blobs["ip2"], net.blobs["target"]]
    assert net.top_names["ip1"] == ["ip1"]
    assert net.bottom_names["loss"] == ["ip2", "target"]
    assert list(net.top_names) == list(net.bottom_names) == net.layer_names
    assert net.blob_loss_weights == {"data": 0, "target": 0, "ip1": 0, "ip2": 0,
                                     "loss": 1}
    assert net.params_lr == [1.0] * 4 and net.params_weight_decay == [1.0] * 4


@_needs(*API_LAYERS)
def test_outputs_are_sorted_by_name():
    text = ("layer { name: 'in' type: 'Input' top: 'x' "
            "input_param { shape { dim: 2 dim: 3 } } } "
            + _ip("z_first", "x", "zeta", 2) + _ip("a_second", "x", "alpha", 2))
    net = _net(text)
    assert net.outputs == ["alpha", "zeta"]
    assert list(net.forward()) == ["alpha", "zeta"]


@_needs(*API_LAYERS)
def test_split_insertion_is_visible():
    text = ("layer { name: 'in' type: 'Input' top: 'x' "
            "input_param { shape { dim: 2 dim: 3 } } } "
            + _ip("a", "x", "a", 2) + _ip("b", "x", "b", 2))
    net = _net(text)
    assert net.layer_names == ["in", "x_in_0_split", "a", "b"]
    assert net.layers[1].type == "Split"
    assert list(net.blobs) == ["x", "x_in_0_split_0", "x_in_0_split_1", "a", "b"]
    assert net.blobs["x_in_0_split_0"].shares_data_with(net.blobs["x"])
    assert net.inputs == ["x"]


@_needs(*API_LAYERS)
def test_forward_returns_outputs_and_reshapes_inputs(dtype):
    net = _net(_API_NET, dtype)
    inputs = _api_inputs(batch=7)
    out = net.forward(**inputs)
    assert list(out) == ["loss"]
    assert net.blobs["data"].shape == (7, 4) and net.blobs["ip2"].shape == (7, 3)
    loss, *_ = _numpy_api_net(net, inputs["data"], inputs["target"])
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert float(out["loss"]) == pytest.approx(loss, rel=tol)
    assert net.loss == pytest.approx(loss, rel=tol)
    extra = net.forward(blobs=["ip1"], **inputs)
    assert list(extra) == ["loss", "ip1"]
    # Outputs are views of the blobs (copy them to keep them).
    assert np.shares_memory(extra["ip1"], net.blobs["ip1"].data)


@_needs(*API_LAYERS)
def test_backward_returns_input_diffs(dtype):
    net = _net(_API_NET, dtype)
    inputs = _api_inputs()
    net.forward(**inputs)
    diffs = net.backward()
    assert list(diffs) == ["data", "target"]
    loss, grads, ddata, dtarget = _numpy_api_net(net, **inputs)
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-10)
    np.testing.assert_allclose(diffs["data"], ddata, **tol)
    np.testing.assert_allclose(diffs["target"], dtarget, **tol)
    for name, expected in grads.items():
        for blob, g in zip(net.params[name], expected):
            np.testing.assert_allclose(blob.diff, g, **tol)


@_needs("Input", "InnerProduct")
def test_backward_with_top_diffs():
    # pycaffe's net.backward(ip=grad): seed an output's diff directly.
    text = ("force_backward: true layer { name: 'in' type: 'Input' top: 'x' "
            "input_param { shape { dim: 2 dim: 3 } } } " + _ip("ip", "x", "ip", 4))
    net = _net(text, np.float64)
    x = netlite.rng.get_rng().normal(size=(2, 3))
    net.forward(x=x)
    dy = netlite.rng.get_rng().normal(size=(2, 4))
    diffs = net.backward(ip=dy)
    w = net.params["ip"][0].data
    np.testing.assert_allclose(diffs["x"], dy @ w)
    np.testing.assert_allclose(net.params["ip"][0].diff, dy.T @ x)
    # Without force_backward no layer is under a loss: nothing is computed,
    # and the net says so.
    quiet = _net(text.replace("force_backward: true", ""), np.float64)
    quiet.forward(x=x)
    with pytest.warns(netlite.NetliteWarning, match="force_backward: true"):
        assert not quiet.backward(ip=dy)["x"].any()


@_needs(*API_LAYERS)
def test_forward_backward_and_clear_param_diffs(dtype):
    net = _net(_API_NET, dtype)
    inputs = _api_inputs()
    for name, value in inputs.items():
        net.blobs[name].data = value
    loss = net.forward_backward()
    assert loss == pytest.approx(net.loss)
    first = [b.diff.copy() for b in net.learnable_params]
    # Parameter diffs accumulate across passes until cleared.
    net.forward_backward()
    for blob, g in zip(net.learnable_params, first):
        np.testing.assert_allclose(blob.diff, 2 * g, rtol=1e-5)
    net.clear_param_diffs()
    assert all(not b.diff.any() for b in net.learnable_params)
    net.forward_backward()
    for blob, g in zip(net.learnable_params, first):
        np.testing.assert_allclose(blob.diff, g, rtol=1e-6)


@_needs(*API_LAYERS)
@pytest.mark.parametrize("suffix", [".caffemodel", ".npz"])
def test_save_and_copy_from_round_trip(suffix, tmp_path, dtype):
    net = _net(_API_NET, dtype)
    path = tmp_path / f"weights{suffix}"
    net.save(path)
    assert path.exists() and not list(tmp_path.glob(".tmp-*"))
    netlite.set_random_seed(99)  # a differently initialised net
    other = netlite.Net(_API_NET, dtype=dtype)
    assert not np.array_equal(other.params["ip1"][0].data, net.params["ip1"][0].data)
    other.copy_from(path)
    for name in net.params:
        for mine, theirs in zip(other.params[name], net.params[name]):
            np.testing.assert_array_equal(mine.data, theirs.data)
    # The weights argument does the same at construction.
    loaded = netlite.Net(_API_NET, netlite.TEST, weights=str(path), dtype=dtype)
    np.testing.assert_array_equal(loaded.params["ip2"][0].data,
                                  net.params["ip2"][0].data)
    inputs = _api_inputs()
    assert float(loaded.forward(**inputs)["loss"]) == pytest.approx(
        float(net.forward(**inputs)["loss"]))


@_needs(*API_LAYERS)
def test_float64_weights_into_float32_net(tmp_path):
    source = _net(_API_NET, np.float64)
    path = tmp_path / "double.caffemodel"
    source.save(path)
    stored = io.read_binary_net_param(path)
    assert len(stored.layer[1].blobs[0].double_data) == 20
    target = netlite.Net(_API_NET, weights=path, dtype=np.float32)
    np.testing.assert_allclose(target.params["ip1"][0].data,
                               source.params["ip1"][0].data, rtol=1e-6)


@_needs(*API_LAYERS)
def test_copy_from_ignores_unknown_layers_and_accepts_legacy_shapes(tmp_path):
    net = _net(_API_NET, np.float64)
    stored = net.to_proto()
    extra = stored.layer.add(name="not_in_net", type="InnerProduct")
    extra.blobs.add().CopyFrom(netlite.Blob((2, 2)).to_proto())
    # Caffe's old 4-D shapes: (1, 1, N, K) weights, (1, 1, 1, N) biases.
    ip2 = next(layer for layer in stored.layer if layer.name == "ip2")
    for blob, legacy in zip(ip2.blobs, ((1, 1, 3, 5), (1, 1, 1, 3))):
        blob.ClearField("shape")
        blob.num, blob.channels, blob.height, blob.width = legacy
    path = tmp_path / "legacy.caffemodel"
    io.atomic_write_bytes(path, stored.SerializeToString())
    fresh = netlite.Net(_API_NET, dtype=np.float64)
    fresh.copy_from(path)
    np.testing.assert_array_equal(fresh.params["ip2"][0].data,
                                  net.params["ip2"][0].data)
    assert fresh.params["ip2"][0].shape == (3, 5)


@_needs(*API_LAYERS)
def test_debug_info_logs(caplog):
    net = _net("debug_info: true " + _API_NET, np.float64)
    inputs = _api_inputs()
    with caplog.at_level(logging.INFO, logger="netlite"):
        net.forward(**inputs)
        net.backward()
    lines = [r.getMessage() for r in caplog.records if r.name == "netlite"]

    def value(pattern):
        matches = [m for line in lines if (m := re.fullmatch(pattern, line.strip()))]
        assert len(matches) == 1, (pattern, lines)
        return float(matches[0].group(1))

    # Mean absolute values; relu1 runs in place on ip1, so its lines carry
    # the final values of that blob.
    ip1, data = net.blobs["ip1"], net.blobs["data"]
    assert value(r"\[Forward\] Layer relu1, top blob ip1 data: (\S+)") == (
        pytest.approx(np.abs(ip1.data).mean(), rel=1e-5))
    w2 = net.params["ip2"][0]
    assert value(r"\[Forward\] Layer ip2, param blob 0 data: (\S+)") == (
        pytest.approx(np.abs(w2.data).mean(), rel=1e-5))
    assert value(r"\[Backward\] Layer relu1, bottom blob ip1 diff: (\S+)") == (
        pytest.approx(np.abs(ip1.diff).mean(), rel=1e-5))
    assert value(r"\[Backward\] Layer ip1, bottom blob data diff: (\S+)") == (
        pytest.approx(np.abs(data.diff).mean(), rel=1e-5))
    assert value(r"\[Backward\] Layer ip2, param blob 0 diff: (\S+)") == (
        pytest.approx(np.abs(w2.diff).mean(), rel=1e-5))
    # The Input layer needs no backward: no line for it.
    assert not [line for line in lines if "[Backward] Layer input" in line]
    params = net.learnable_params
    expected = (sum(np.abs(b.data).sum() for b in params),
                sum(np.abs(b.diff).sum() for b in params),
                np.sqrt(sum((b.data ** 2).sum() for b in params)),
                np.sqrt(sum((b.diff ** 2).sum() for b in params)))
    number = r"([-+\d.e]+)"
    norms = [re.fullmatch(
        r"\[Backward\] All net params \(data, diff\): L1 norm = "
        rf"\({number}, {number}\); L2 norm = \({number}, {number}\)",
        line.strip()) for line in lines]
    norms = [m for m in norms if m]
    assert len(norms) == 1
    got = [float(v) for v in norms[0].groups()]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@_needs(*API_LAYERS)
def test_no_debug_lines_without_debug_info(caplog):
    net = _net(_API_NET, np.float64)
    with caplog.at_level(logging.INFO, logger="netlite"):
        net.forward(**_api_inputs())
        net.backward()
    assert not [r for r in caplog.records if "[Forward]" in r.getMessage()]


@_needs(*API_LAYERS)
def test_construction_log(caplog):
    with caplog.at_level(logging.INFO, logger="netlite"):
        _net(_API_NET)
    messages = [r.getMessage() for r in caplog.records if r.name == "netlite"]
    assert "Creating Layer ip1" in messages
    assert "relu1 -> ip1 (in-place)" in messages
    assert "    with loss weight 1" in messages
    assert "input does not need backward computation." in messages
    assert messages[-1] == "Network initialization done."


@_needs(*API_LAYERS)
def test_net_from_path_and_message(tmp_path):
    path = tmp_path / "api.prototxt"
    path.write_text(_API_NET)
    from_path = _net(str(path))
    from_message = _net(io.read_net_param(_API_NET))
    from_text = _net(_API_NET)
    for net in (from_message, from_text):
        assert net.layer_names == from_path.layer_names
        np.testing.assert_array_equal(net.params["ip1"][0].data,
                                      from_path.params["ip1"][0].data)


@_needs(*API_LAYERS)
def test_reshape_after_input_change():
    net = _net(_API_NET)
    net.blobs["data"].reshape(6, 4)
    net.blobs["target"].reshape(6, 3)
    net.reshape()
    assert net.blobs["ip2"].shape == (6, 3)
