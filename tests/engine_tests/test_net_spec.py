"""NetSpec: pycaffe's python/caffe/test/test_net_spec.py ported onto
netlite's names (``TestNetSpec``: the same ``lenet``, ``anon_lenet`` and
``silent_net`` specs, the same checks; ``assertRaisesRegexp`` becomes
``pytest.raises``), then the prototxt it writes, its errors and the
pseudo-modules.
"""

import numpy as np
import pytest

import netlite
from netlite import io
from netlite.net_spec import NetSpec, param_name_dict, to_proto
from netlite.net_spec import layers as L
from netlite.net_spec import params as P
from netlite.proto import netlite_pb2


def lenet(batch_size):
    n = NetSpec()
    n.data, n.label = L.DummyData(shape=[dict(dim=[batch_size, 1, 28, 28]),
                                         dict(dim=[batch_size, 1, 1, 1])],
                                  transform_param=dict(scale=1. / 255), ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20,
                            weight_filler=dict(type="xavier"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv2 = L.Convolution(n.pool1, kernel_size=5, num_output=50,
                            weight_filler=dict(type="xavier"))
    n.pool2 = L.Pooling(n.conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.ip1 = L.InnerProduct(n.pool2, num_output=500,
                           weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.relu1, num_output=10,
                           weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.ip2, n.label)
    return n.to_proto()


def anon_lenet(batch_size):
    data, label = L.DummyData(shape=[dict(dim=[batch_size, 1, 28, 28]),
                                     dict(dim=[batch_size, 1, 1, 1])],
                              transform_param=dict(scale=1. / 255), ntop=2)
    conv1 = L.Convolution(data, kernel_size=5, num_output=20,
                          weight_filler=dict(type="xavier"))
    pool1 = L.Pooling(conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    conv2 = L.Convolution(pool1, kernel_size=5, num_output=50,
                          weight_filler=dict(type="xavier"))
    pool2 = L.Pooling(conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    ip1 = L.InnerProduct(pool2, num_output=500,
                         weight_filler=dict(type="xavier"))
    relu1 = L.ReLU(ip1, in_place=True)
    ip2 = L.InnerProduct(relu1, num_output=10,
                         weight_filler=dict(type="xavier"))
    loss = L.SoftmaxWithLoss(ip2, label)
    return loss.to_proto()


def silent_net():
    n = NetSpec()
    n.data, n.data2 = L.DummyData(shape=dict(dim=3), ntop=2)
    n.silence_data = L.Silence(n.data, ntop=0)
    n.silence_data2 = L.Silence(n.data2, ntop=0)
    return n.to_proto()


class TestNetSpec:
    @pytest.fixture(autouse=True)
    def _tmp(self, tmp_path):
        self.tmp_path = tmp_path

    def load_net(self, net_proto):
        f = self.tmp_path / "net.prototxt"
        f.write_text(str(net_proto))
        return netlite.Net(str(f), netlite.TEST)

    def test_lenet(self):
        """Construct and build the Caffe version of LeNet."""

        net_proto = lenet(50)
        # check that relu is in-place
        assert net_proto.layer[6].bottom == net_proto.layer[6].top
        net = self.load_net(net_proto)
        # check that all layers are present
        assert len(net.layers) == 9

        # now the check the version with automatically-generated layer names
        net_proto = anon_lenet(50)
        assert net_proto.layer[6].bottom == net_proto.layer[6].top
        net = self.load_net(net_proto)
        assert len(net.layers) == 9

    def test_zero_tops(self):
        """Test net construction for top-less layers."""

        net_proto = silent_net()
        net = self.load_net(net_proto)
        assert len(net.forward()) == 0

    def test_type_error(self):
        """Test that a TypeError is raised when a Function input isn't a Top."""
        data = L.DummyData(ntop=2)  # data is a 2-tuple of Tops
        r = r"^Silence input 0 is not a Top \(type is <(type|class) 'tuple'>\)$"
        with pytest.raises(TypeError, match=r):
            L.Silence(data, ntop=0)  # should raise: data is a tuple, not a Top
        L.Silence(*data, ntop=0)  # shouldn't raise: each elt of data is a Top


# ------------------------------------------------------------ the prototxt
_EXPECTED = """\
layer {
  name: "data"
  type: "Input"
  top: "data"
  top: "label"
  input_param {
    shape {
      dim: 4
      dim: 6
    }
    shape {
      dim: 4
    }
  }
}
layer {
  name: "ip"
  type: "InnerProduct"
  bottom: "data"
  top: "ip"
  param {
    lr_mult: 1.0
  }
  param {
    lr_mult: 2.0
    decay_mult: 0.0
  }
  inner_product_param {
    num_output: 3
    weight_filler {
      type: "gaussian"
      std: 0.5
    }
  }
}
layer {
  name: "relu"
  type: "ReLU"
  bottom: "ip"
  top: "ip"
}
layer {
  name: "loss"
  type: "SoftmaxWithLoss"
  bottom: "ip"
  bottom: "label"
  top: "loss"
  loss_weight: 2.0
  include {
    phase: TRAIN
  }
  loss_param {
    normalization: BATCH_SIZE
  }
}
"""


def _small_spec():
    n = NetSpec()
    n.data, n.label = L.Input(shape=[dict(dim=[4, 6]), dict(dim=4)], ntop=2)
    n.ip = L.InnerProduct(n.data, num_output=3,
                          weight_filler=dict(type="gaussian", std=0.5),
                          param=[dict(lr_mult=1), dict(lr_mult=2, decay_mult=0)])
    n.relu = L.ReLU(n.ip, in_place=True)
    n.loss = L.SoftmaxWithLoss(n.relu, n.label, loss_weight=2,
                               include=dict(phase=netlite.TRAIN),
                               loss_param=dict(normalization="BATCH_SIZE"))
    return n


def test_to_proto_writes_caffes_prototxt():
    # Named tops name the blobs and layers; a single value for a repeated
    # field is a one-element list; an enum is taken by name too.
    net_param = _small_spec().to_proto()
    assert isinstance(net_param, netlite_pb2.NetParameter)
    assert io.to_text(net_param) == _EXPECTED


def test_spec_builds_a_working_net():
    net = netlite.Net(_small_spec().to_proto(), netlite.TRAIN, dtype=np.float64)
    assert net.layer_names == ["data", "ip", "relu", "loss"]
    assert net.params_lr == [1.0, 2.0] and net.params_weight_decay == [1.0, 0.0]
    net.params["ip"][0].data[...] = 0
    out = net.forward(data=np.ones((4, 6)), label=np.arange(4) % 3)
    # Zero weights and bias: a uniform softmax; the net's loss is weighted
    # by 2, the blob holds the layer's own value.
    assert float(out["loss"]) == pytest.approx(np.log(3))
    assert net.loss == pytest.approx(2 * np.log(3))
    # TEST drops the TRAIN-only loss.
    assert netlite.Net(_small_spec().to_proto(), netlite.TEST).outputs == [
        "ip", "label"]


def test_automatic_names():
    data = L.Input(shape=dict(dim=[2, 3]))
    ip = L.InnerProduct(data, num_output=2)
    out = L.InnerProduct(ip, num_output=1)
    net_param = to_proto(out)
    assert [layer.name for layer in net_param.layer] == [
        "Input1", "InnerProduct1", "InnerProduct2"]
    assert [list(layer.top) for layer in net_param.layer] == [
        ["Input1"], ["InnerProduct1"], ["InnerProduct2"]]
    assert out.to_proto() == net_param


def test_layers_a_spec_does_not_need_are_left_out():
    n = NetSpec()
    data = L.Input(shape=dict(dim=[2, 3]))
    L.InnerProduct(data, num_output=7)  # never named nor used
    n.out = L.ReLU(data)
    assert [layer.type for layer in n.to_proto().layer] == ["Input", "ReLU"]


def test_param_name_dict_reads_the_schema():
    names = param_name_dict()
    assert names["Convolution"] == "convolution_param"
    assert names["InnerProduct"] == "inner_product_param"
    assert names["PReLU"] == "prelu_param"
    assert names["IDXData"] == "idx_data_param"


def test_params_pseudo_module():
    assert P.Pooling.MAX == netlite_pb2.PoolingParameter.MAX
    assert P.Pooling.AVE == netlite_pb2.PoolingParameter.AVE
    assert P.Eltwise.SUM == netlite_pb2.EltwiseParameter.SUM
    with pytest.raises(AttributeError, match=r"PoolingParameter has no constant "
                       r"'AVERAGE'; it has \['AVE', .*'MAX'"):
        _ = P.Pooling.AVERAGE
    with pytest.raises(AttributeError, match="netlite's schema has no "
                       "LRNParameter"):
        _ = P.LRN


def test_unknown_keyword_names_layer_and_field():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3]))
    n.ip = L.InnerProduct(n.data, num_outputs=3)
    with pytest.raises(TypeError, match=r"InnerProduct layer 'ip': unknown "
                       r"parameter 'num_outputs' \(looked in inner_product_param "
                       r"and in LayerParameter\)"):
        n.to_proto()
    n.ip = L.InnerProduct(n.data, num_output=3, weight_filler=dict(typ="xavier"))
    with pytest.raises(TypeError, match=r"InnerProduct layer 'ip', weight_filler: "
                       r"FillerParameter has no field 'typ'"):
        n.to_proto()
    n.ip = L.LRN(n.data, local_size=5)
    with pytest.raises(TypeError, match=r"no LRNParameter in the schema"):
        n.to_proto()


def test_wrong_value_names_the_field():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3]))
    n.ip = L.InnerProduct(n.data, num_output=3, weight_filler="xavier")
    with pytest.raises(TypeError, match=r"InnerProduct layer 'ip': cannot set "
                       r"InnerProductParameter.weight_filler to 'xavier'"):
        n.to_proto()


def test_netspec_attribute_rules():
    n = NetSpec()
    n["data"] = L.Input(shape=dict(dim=[2]))
    assert n.data is n["data"] and "data" in n and hasattr(n, "data")
    assert not hasattr(n, "missing")
    with pytest.raises(AttributeError, match=r"NetSpec has no top 'missing'; "
                       r"named so far: \['data'\]"):
        _ = n.missing
    with pytest.raises(KeyError, match="NetSpec has no top 'missing'"):
        n["missing"]
    with pytest.raises(TypeError, match="NetSpec.x must be a Top"):
        n.x = 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(ntop=-1), "ntop must be an int >= 0, got -1"),
    (dict(ntop="2"), "ntop must be an int >= 0, got '2'"),
    (dict(ntop=2, in_place=True), r"ntop \(2\) must equal the number of bottoms"),
])
def test_bad_ntop(kwargs, message):
    data = L.Input(shape=dict(dim=[2]))
    with pytest.raises(TypeError, match=message):
        L.ReLU(data, **kwargs)


def test_exported_from_netlite():
    assert netlite.NetSpec is NetSpec
    assert netlite.net_spec.layers is L and netlite.net_spec.params is P
