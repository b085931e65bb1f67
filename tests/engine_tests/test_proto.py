"""The Caffe-compatible schema: generated module in sync, Caffe's own files
parse unchanged, field numbers match caffe.proto, binary round trips, and
the legacy net-input upgrade."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import text_format

import netlite
from netlite import io
from netlite.errors import PrototxtError
from netlite.net_transform import filter_net
from netlite.proto import netlite_pb2

HERE = os.path.dirname(__file__)
DATA = os.path.join(HERE, "data")
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
PROTO_DIR = os.path.join(REPO_ROOT, "netlite", "proto")


def _data(name):
    return os.path.join(DATA, name)


# ------------------------------------------------------- generated module
@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None,
                    reason="grpcio-tools is not installed (pip install -e .[dev])")
def test_generated_module_is_in_sync_with_the_schema(tmp_path):
    # `make proto` must have been run after the last edit of netlite.proto.
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}",
         f"--python_out={tmp_path}", os.path.join(PROTO_DIR, "netlite.proto")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    fresh = (tmp_path / "netlite_pb2.py").read_bytes()
    with open(os.path.join(PROTO_DIR, "netlite_pb2.py"), "rb") as f:
        checked_in = f.read()
    assert fresh == checked_in, (
        "netlite/proto/netlite_pb2.py is out of date: run `make proto` and "
        "commit the result"
    )


def test_package_is_netlite_not_caffe():
    # A real caffe_pb2 can then share the process (no descriptor clash).
    assert netlite_pb2.DESCRIPTOR.package == "netlite"
    assert netlite_pb2.LayerParameter.DESCRIPTOR.full_name == "netlite.LayerParameter"


# ---------------------------------------------------------- Caffe's files
def test_lenet_train_test_parses_unchanged():
    param = io.read_net_param(_data("lenet_train_test.prototxt"))
    assert param.name == "LeNet"
    assert [layer.name for layer in param.layer] == [
        "mnist", "mnist", "conv1", "pool1", "conv2", "pool2", "ip1", "relu1",
        "ip2", "accuracy", "loss",
    ]
    assert [layer.type for layer in param.layer][2:] == [
        "Convolution", "Pooling", "Convolution", "Pooling", "InnerProduct",
        "ReLU", "InnerProduct", "Accuracy", "SoftmaxWithLoss",
    ]
    train, test = param.layer[0], param.layer[1]
    assert train.include[0].phase == netlite.TRAIN
    assert test.include[0].phase == netlite.TEST
    assert train.data_param.batch_size == 64 and test.data_param.batch_size == 100
    assert train.data_param.backend == netlite_pb2.DataParameter.LMDB
    assert train.transform_param.scale == pytest.approx(1 / 256)
    conv1 = param.layer[2]
    assert conv1.convolution_param.num_output == 20
    assert list(conv1.convolution_param.kernel_size) == [5]
    assert list(conv1.convolution_param.stride) == [1]
    assert conv1.convolution_param.weight_filler.type == "xavier"
    assert [p.lr_mult for p in conv1.param] == [1, 2]
    pool1 = param.layer[3]
    assert pool1.pooling_param.pool == netlite_pb2.PoolingParameter.MAX
    assert (pool1.pooling_param.kernel_size, pool1.pooling_param.stride) == (2, 2)
    assert param.layer[6].inner_product_param.num_output == 500
    relu1 = param.layer[7]
    assert list(relu1.bottom) == list(relu1.top) == ["ip1"]  # in place
    assert param.layer[9].include[0].phase == netlite.TEST


def test_lenet_train_test_filters_by_phase():
    param = io.read_net_param(_data("lenet_train_test.prototxt"))
    for phase, batch, has_accuracy in ((netlite.TRAIN, 64, False),
                                       (netlite.TEST, 100, True)):
        state = netlite_pb2.NetParameter()
        state.CopyFrom(param)
        state.state.phase = phase
        kept = filter_net(state)
        names = [layer.name for layer in kept.layer]
        assert names.count("mnist") == 1
        assert kept.layer[0].data_param.batch_size == batch
        assert ("accuracy" in names) == has_accuracy
        assert len(names) == 9 + has_accuracy


def test_lenet_deploy_parses_unchanged():
    param = io.read_net_param(_data("lenet.prototxt"))
    assert param.layer[0].type == "Input"
    assert list(param.layer[0].input_param.shape[0].dim) == [64, 1, 28, 28]
    assert param.layer[-1].type == "Softmax"
    assert [layer.name for layer in param.layer] == [
        "data", "conv1", "pool1", "conv2", "pool2", "ip1", "relu1", "ip2", "prob",
    ]


def test_lenet_solver_parses_unchanged():
    solver = io.read_solver_param(_data("lenet_solver.prototxt"))
    assert solver.net == "examples/mnist/lenet_train_test.prototxt"
    assert list(solver.test_iter) == [100]
    assert solver.test_interval == 500
    assert solver.base_lr == pytest.approx(0.01)
    assert solver.momentum == pytest.approx(0.9)
    assert solver.weight_decay == pytest.approx(0.0005)
    assert solver.lr_policy == "inv"
    assert solver.gamma == pytest.approx(0.0001)
    assert solver.power == pytest.approx(0.75)
    assert (solver.display, solver.max_iter, solver.snapshot) == (100, 10000, 5000)
    assert solver.snapshot_prefix == "examples/mnist/lenet"
    assert solver.solver_mode == netlite_pb2.SolverParameter.GPU
    assert solver.type == "SGD"  # the default


@pytest.mark.parametrize("name, message", [
    ("lenet_train_test.prototxt", netlite_pb2.NetParameter),
    ("lenet.prototxt", netlite_pb2.NetParameter),
    ("lenet_solver.prototxt", netlite_pb2.SolverParameter),
])
def test_text_round_trip(name, message):
    with open(_data(name), encoding="utf-8") as f:
        original = io.parse_text(f.read(), message)
    again = io.parse_text(io.to_text(original), message)
    assert again == original
    assert original.SerializeToString() == again.SerializeToString()


def test_path_text_and_message_inputs_agree():
    path = _data("lenet.prototxt")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    from_path = io.read_net_param(path)
    assert io.read_net_param(text) == from_path
    assert io.read_net_param(from_path) is from_path
    with pytest.raises(TypeError, match="expected a NetParameter"):
        io.read_net_param(netlite_pb2.SolverParameter())


# ---------------------------------------------------------- field numbers
# Checked against BVLC Caffe's src/caffe/proto/caffe.proto (commit 9b89154):
# the wire format depends only on these numbers and the types.
CAFFE_FIELD_NUMBERS = {
    "BlobShape": {"dim": 1},
    "BlobProto": {"num": 1, "channels": 2, "height": 3, "width": 4, "data": 5,
                  "diff": 6, "shape": 7, "double_data": 8, "double_diff": 9},
    "FillerParameter": {"type": 1, "value": 2, "min": 3, "max": 4, "mean": 5,
                        "std": 6, "sparse": 7, "variance_norm": 8},
    "NetParameter": {"name": 1, "input": 3, "input_dim": 4, "force_backward": 5,
                     "state": 6, "debug_info": 7, "input_shape": 8, "layer": 100},
    "NetState": {"phase": 1, "level": 2, "stage": 3},
    "NetStateRule": {"phase": 1, "min_level": 2, "max_level": 3, "stage": 4,
                     "not_stage": 5},
    "ParamSpec": {"name": 1, "share_mode": 2, "lr_mult": 3, "decay_mult": 4},
    "LayerParameter": {
        "name": 1, "type": 2, "bottom": 3, "top": 4, "loss_weight": 5,
        "param": 6, "blobs": 7, "include": 8, "exclude": 9, "phase": 10,
        "propagate_down": 11, "transform_param": 100, "loss_param": 101,
        "accuracy_param": 102, "convolution_param": 106, "data_param": 107,
        "dropout_param": 108, "dummy_data_param": 109, "eltwise_param": 110,
        "hinge_loss_param": 114, "inner_product_param": 117,
        "pooling_param": 121, "relu_param": 123, "softmax_param": 125,
        "flatten_param": 135, "bias_param": 141, "scale_param": 142,
        "input_param": 143,
    },
    "LossParameter": {"ignore_label": 1, "normalize": 2, "normalization": 3},
    "InnerProductParameter": {"num_output": 1, "bias_term": 2,
                              "weight_filler": 3, "bias_filler": 4, "axis": 5,
                              "transpose": 6},
    "SolverParameter": {
        "train_net": 1, "test_net": 2, "test_iter": 3, "test_interval": 4,
        "base_lr": 5, "display": 6, "max_iter": 7, "lr_policy": 8, "gamma": 9,
        "power": 10, "momentum": 11, "weight_decay": 12, "stepsize": 13,
        "snapshot": 14, "snapshot_prefix": 15, "snapshot_diff": 16,
        "solver_mode": 17, "device_id": 18, "test_compute_loss": 19,
        "random_seed": 20, "debug_info": 23, "net": 24, "net_param": 25,
        "regularization_type": 29, "delta": 31, "test_initialization": 32,
        "average_loss": 33, "stepvalue": 34, "clip_gradients": 35,
        "iter_size": 36, "snapshot_format": 37, "rms_decay": 38,
        "momentum2": 39, "type": 40,
    },
    "SolverState": {"iter": 1, "learned_net": 2, "history": 3,
                    "current_step": 4},
}


@pytest.mark.parametrize("message", sorted(CAFFE_FIELD_NUMBERS))
def test_field_numbers_match_caffe(message):
    descriptor = netlite_pb2.DESCRIPTOR.message_types_by_name[message]
    actual = {name: descriptor.fields_by_name[name].number
              for name in CAFFE_FIELD_NUMBERS[message]}
    assert actual == CAFFE_FIELD_NUMBERS[message]


def test_key_field_numbers():
    layer = netlite_pb2.LayerParameter.DESCRIPTOR
    assert layer.fields_by_name["inner_product_param"].number == 117
    assert netlite_pb2.NetParameter.DESCRIPTOR.fields_by_name["layer"].number == 100
    assert netlite_pb2.BlobProto.DESCRIPTOR.fields_by_name["shape"].number == 7


def test_enum_values_match_caffe():
    assert (netlite.TRAIN, netlite.TEST) == (0, 1)
    filler = netlite_pb2.FillerParameter
    assert (filler.FAN_IN, filler.FAN_OUT, filler.AVERAGE) == (0, 1, 2)
    loss = netlite_pb2.LossParameter
    assert (loss.FULL, loss.VALID, loss.BATCH_SIZE, loss.NONE) == (0, 1, 2, 3)
    spec = netlite_pb2.ParamSpec
    assert (spec.STRICT, spec.PERMISSIVE) == (0, 1)


def test_netlite_extensions_live_above_10000():
    # Caffe's numbers stay below 2000 (1001/1002 only in its legacy V0/V1
    # layer messages); anything netlite adds must be >= 10000 so a file from
    # Caffe (or its forks) can never collide.
    for message in netlite_pb2.DESCRIPTOR.message_types_by_name.values():
        stack = [message]
        while stack:
            descriptor = stack.pop()
            stack.extend(descriptor.nested_types)
            for field in descriptor.fields:
                assert field.number < 2000 or field.number >= 10000, (
                    f"{descriptor.full_name}.{field.name} = {field.number}"
                )
    layer = netlite_pb2.LayerParameter.DESCRIPTOR.fields_by_name
    assert layer["idx_data_param"].number >= 10000


def test_defaults_follow_caffe():
    assert netlite_pb2.NetState().phase == netlite.TEST
    assert netlite_pb2.ParamSpec().lr_mult == 1.0
    assert netlite_pb2.ParamSpec().decay_mult == 1.0
    filler = netlite_pb2.FillerParameter()
    assert (filler.type, filler.std, filler.max, filler.sparse) == (
        "constant", 1.0, 1.0, -1)
    assert netlite_pb2.SolverParameter().solver_mode == netlite_pb2.SolverParameter.GPU
    assert netlite_pb2.LossParameter().normalization == netlite_pb2.LossParameter.VALID
    # Presence is tracked (proto2), which several semantics depend on.
    assert not netlite_pb2.LossParameter().HasField("normalize")


# ------------------------------------------------------------ wire format
def test_wire_encoding_uses_caffe_field_numbers():
    # NetParameter.layer is field 100, length-delimited: tag (100 << 3) | 2 =
    # 802, varint b"\xa2\x06"; LayerParameter.name is field 1: b"\n".
    net = netlite_pb2.NetParameter()
    net.layer.add(name="a")
    assert net.SerializeToString() == b"\xa2\x06\x03\n\x01a"
    blob = netlite_pb2.BlobProto()
    blob.shape.dim.append(3)
    # BlobProto.shape = 7 -> tag 0x3a; BlobShape.dim = 1, packed -> 0x0a.
    assert blob.SerializeToString() == b"\x3a\x03\x0a\x01\x03"


def test_binary_net_parameter_round_trip(tmp_path, dtype):
    net = io.parse_text(
        "name: 'tiny' layer { name: 'ip' type: 'InnerProduct' bottom: 'x' "
        "top: 'y' param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 } "
        "inner_product_param { num_output: 3 } }",
        netlite_pb2.NetParameter,
    )
    weights = netlite.Blob((3, 4), dtype=dtype)
    weights.data = np.arange(12).reshape(3, 4) / 7.0
    bias = netlite.Blob((3,), dtype=dtype)
    bias.data = [-1.5, 0.0, 2.25]
    net.layer[0].blobs.add().CopyFrom(weights.to_proto())
    net.layer[0].blobs.add().CopyFrom(bias.to_proto())
    path = tmp_path / "tiny.caffemodel"
    io.atomic_write_bytes(path, net.SerializeToString())
    restored = io.read_binary_net_param(path)
    assert restored == net
    layer = restored.layer[0]
    loaded = netlite.Blob(dtype=dtype).from_proto(layer.blobs[0])
    np.testing.assert_array_equal(loaded.data, weights.data)
    assert layer.param[1].decay_mult == 0
    assert layer.param[1].HasField("decay_mult")
    assert not layer.param[0].HasField("decay_mult")


def test_unknown_binary_fields_are_kept_not_fatal():
    # A caffemodel from a Caffe fork may carry fields netlite does not know.
    payload = netlite_pb2.NetParameter(name="n").SerializeToString()
    payload += b"\xf8\x07\x01"  # field 127 (unused), varint 1
    net = netlite_pb2.NetParameter.FromString(payload)
    assert net.name == "n"
    assert net.SerializeToString() == payload


# --------------------------------------------------- legacy input upgrade
def test_input_dim_upgrades_to_input_layer():
    original = io.parse_text(
        "name: 'legacy' input: 'data' input_dim: 64 input_dim: 3 input_dim: 32 "
        "input_dim: 32 layer { name: 'r' type: 'ReLU' bottom: 'data' top: 'r' }",
        netlite_pb2.NetParameter,
    )
    snapshot = original.SerializeToString()
    upgraded = io.upgrade_net_param(original)
    assert original.SerializeToString() == snapshot  # argument untouched
    expected = io.parse_text(
        "name: 'legacy' layer { name: 'input' type: 'Input' top: 'data' "
        "input_param { shape { dim: 64 dim: 3 dim: 32 dim: 32 } } } "
        "layer { name: 'r' type: 'ReLU' bottom: 'data' top: 'r' }",
        netlite_pb2.NetParameter,
    )
    assert upgraded == expected


def test_input_shape_upgrades_per_input():
    upgraded = io.upgrade_net_param(io.parse_text(
        "input: 'a' input: 'b' input_shape { dim: 2 dim: 3 } "
        "input_shape { dim: 4 }",
        netlite_pb2.NetParameter,
    ))
    assert len(upgraded.layer) == 1
    layer = upgraded.layer[0]
    assert (layer.name, layer.type, list(layer.top)) == ("input", "Input", ["a", "b"])
    assert [list(s.dim) for s in layer.input_param.shape] == [[2, 3], [4]]
    assert not upgraded.input and not upgraded.input_shape and not upgraded.input_dim


def test_single_input_shape_is_shared():
    upgraded = io.upgrade_net_param(io.parse_text(
        "input: 'a' input: 'b' input_shape { dim: 5 }", netlite_pb2.NetParameter))
    assert [list(s.dim) for s in upgraded.layer[0].input_param.shape] == [[5], [5]]


def test_input_without_shape_becomes_unshaped_input_layer():
    # Caffe drops a shapeless `input` (legacy caffemodels); netlite keeps
    # the name as an Input top that the caller shapes.
    upgraded = io.upgrade_net_param(
        io.parse_text("input: 'data'", netlite_pb2.NetParameter))
    assert list(upgraded.layer[0].top) == ["data"]
    assert not upgraded.layer[0].input_param.shape[0].dim


def test_net_without_legacy_inputs_is_returned_as_is():
    param = io.parse_text("name: 'n'", netlite_pb2.NetParameter)
    assert io.upgrade_net_param(param) is param


@pytest.mark.parametrize("text, message", [
    ("input: 'a' input_dim: 1 input_dim: 2 input_dim: 3",
     "input_dim must list 4 values per input"),
    ("input: 'a' input_dim: 1 input_dim: 2 input_dim: 3 input_dim: 4 "
     "input_shape { dim: 1 }", "both input_dim and input_shape"),
    ("input: 'a' input: 'b' input: 'c' input_shape { dim: 1 } "
     "input_shape { dim: 2 }", "once or once per input"),
])
def test_bad_legacy_inputs(text, message):
    with pytest.raises(PrototxtError, match=message):
        io.upgrade_net_param(io.parse_text(text, netlite_pb2.NetParameter))


def test_net_from_legacy_inputs(dtype):
    net = netlite.Net(
        "name: 'legacy' input: 'data' input_dim: 2 input_dim: 1 input_dim: 3 "
        "input_dim: 3", dtype=dtype,
    )
    assert net.layer_names == ["input"]
    assert net.inputs == ["data"]
    assert net.blobs["data"].shape == (2, 1, 3, 3)
    assert net.blobs["data"].dtype == dtype


def test_text_format_accepts_caffe_spellings():
    # Single-quoted strings, colon before a message, separators, comments,
    # enum names and numeric enum values.
    param = io.parse_text(
        "name: 'x'  # comment\n"
        "state: { phase: TRAIN, stage: 'a'; stage: \"b\" }\n"
        "layer { name: 'l' type: 'Pooling' pooling_param { pool: 1 } }",
        netlite_pb2.NetParameter,
    )
    assert param.state.phase == netlite.TRAIN
    assert list(param.state.stage) == ["a", "b"]
    assert param.layer[0].pooling_param.pool == netlite_pb2.PoolingParameter.AVE
    assert text_format.MessageToString(param.state).startswith("phase: TRAIN")
