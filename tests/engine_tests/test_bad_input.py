"""Bad input gives a clear netlite error, never a crash or a wrong number.

Every case names what was wrong and where (file:line:column for prototxt,
layer/blob/shape for nets and weights).  Label and NaN errors are tested with
the layers that raise them.
"""

import os
import re

import numpy as np
import pytest

import netlite
from netlite import io
from netlite.errors import (
    LayerSetupError,
    NetliteError,
    PrototxtError,
    ShapeError,
    UnknownLayerTypeError,
    WeightsFileError,
)

INPUT = ("layer { name: 'in' type: 'Input' top: 'x' "
         "input_param { shape { dim: 2 dim: 4 } } }")


def _ip(num_output=3, bottom="x", name="ip", extra=""):
    return (f"layer {{ name: '{name}' type: 'InnerProduct' bottom: '{bottom}' "
            f"top: '{name}' inner_product_param {{ num_output: {num_output} "
            f"weight_filler {{ type: 'gaussian' }} {extra} }} }}")


def _input(dim):
    return INPUT.replace("dim: 4", f"dim: {dim}")


# ----------------------------------------------------------------- prototxt
def test_malformed_prototxt_reports_line_and_column():
    text = "name: 'n'\nlayer {\n  name: 'a'\n  type: 'Input'\n  top 'x'\n}\n"
    with pytest.raises(PrototxtError) as info:
        netlite.Net(text)
    message = str(info.value)
    assert message.startswith("<string>:5:")
    assert "cannot parse NetParameter" in message


def test_malformed_prototxt_file_reports_path(tmp_path):
    path = tmp_path / "broken.prototxt"
    path.write_text("name: 'n'\nlayer {\n  name: 'a'\n")  # unclosed brace
    where = re.escape(str(path))
    with pytest.raises(PrototxtError,
                       match=rf'{where}:3:9: cannot parse.*Expected "}}"'):
        netlite.Net(str(path))
    # PrototxtError is a ValueError for generic handlers.
    assert issubclass(PrototxtError, ValueError)
    assert issubclass(PrototxtError, NetliteError)


def test_unknown_field_is_an_error():
    text = "name: 'n'\nlayer {\n  name: 'a' type: 'Input'\n  tops: 'x'\n}\n"
    with pytest.raises(PrototxtError, match=r"<string>:4:\d+: .*tops"):
        netlite.Net(text)


def test_v1_layers_syntax_is_refused_with_a_hint():
    with pytest.raises(PrototxtError, match=(
            r"<string>:2:1: .*no field named \"layers\".*V1 'layers \{ \}' "
            r"syntax.*upgrade_net_proto_text")):
        netlite.Net("name: 'old'\nlayers { name: 'c' type: CONVOLUTION }")


def test_unknown_nested_field_is_an_error():
    with pytest.raises(PrototxtError, match=r":1:\d+: .*num_outputs"):
        io.parse_layer_param("inner_product_param { num_outputs: 3 }")


def test_bad_enum_value_is_an_error():
    with pytest.raises(PrototxtError, match="SOMETIMES"):
        netlite.Net("name: 'n' state { phase: SOMETIMES }")


def test_singular_field_given_twice_is_an_error():
    with pytest.raises(PrototxtError, match="name"):
        io.parse_layer_param("name: 'a' name: 'b'")


def test_missing_prototxt_path():
    with pytest.raises(FileNotFoundError, match="no_such_net.prototxt"):
        netlite.Net("no_such_net.prototxt")
    with pytest.raises(FileNotFoundError):
        io.read_solver_param(os.path.join("missing", "solver.prototxt"))


# -------------------------------------------------------------- net shape
def test_unknown_layer_type_lists_known_types():
    with pytest.raises(UnknownLayerTypeError) as info:
        netlite.Net(INPUT + " layer { name: 'c' type: 'Convolutoin' bottom: 'x' "
                    "top: 'c' }")
    message = str(info.value)
    assert "unknown layer type 'Convolutoin'" in message
    for known in ("Input", "Split", "InnerProduct"):
        assert known in message


def test_bottom_that_no_layer_produces():
    with pytest.raises(LayerSetupError, match=(
            r"unknown bottom blob 'y' \(layer 'ip', bottom index 0\)")):
        netlite.Net(INPUT + _ip(bottom="y"))


@pytest.mark.parametrize("layer, expected", [
    ("layer { name: 'ip' type: 'InnerProduct' bottom: 'x' bottom: 'x2' top: 'ip' "
     "inner_product_param { num_output: 2 } }",
     "InnerProduct layer 'ip' takes exactly 1 bottom blob(s), got 2"),
    ("layer { name: 'ip' type: 'InnerProduct' bottom: 'x' top: 'a' top: 'b' "
     "inner_product_param { num_output: 2 } }",
     "InnerProduct layer 'ip' produces exactly 1 top blob(s), got 2"),
    ("layer { name: 'ip' type: 'InnerProduct' bottom: 'x' "
     "inner_product_param { num_output: 2 } }",
     "InnerProduct layer 'ip' produces exactly 1 top blob(s), got 0"),
    ("layer { name: 's' type: 'Split' top: 'a' }",
     "Split layer 's' takes exactly 1 bottom blob(s), got 0"),
])
def test_wrong_number_of_bottoms_or_tops(layer, expected):
    two_inputs = INPUT.replace("top: 'x'", "top: 'x' top: 'x2'")
    with pytest.raises(LayerSetupError) as info:
        netlite.Net(two_inputs + layer)
    assert expected in str(info.value)


def test_top_produced_by_multiple_sources():
    with pytest.raises(LayerSetupError, match=(
            "top blob 'x' of layer 'again' is produced by multiple sources")):
        netlite.Net(INPUT + INPUT.replace("'in'", "'again'"))


def test_loss_weight_count_mismatch():
    with pytest.raises(LayerSetupError, match=(
            r"Input layer 'in': loss_weight must be unspecified or given once per "
            r"top blob \(1 tops, 2 weights\)")):
        netlite.Net(INPUT.replace("top: 'x'", "top: 'x' loss_weight: 1 "
                                  "loss_weight: 2"))


def test_too_many_param_specs():
    with pytest.raises(LayerSetupError, match=(
            r"layer 'ip' \(InnerProduct\) lists 3 param specs but has only 2 "
            r"parameter blob\(s\)")):
        netlite.Net(INPUT + _ip().replace(
            "inner_product_param", "param { } param { } param { } "
            "inner_product_param"))


def test_propagate_down_count_mismatch():
    with pytest.raises(LayerSetupError, match=(
            "layer 'ip': propagate_down must be unspecified or given once per "
            r"bottom \(1\)")):
        netlite.Net(INPUT + _ip().replace(
            "inner_product_param", "propagate_down: true propagate_down: false "
            "inner_product_param"))


def test_shared_param_shape_mismatch():
    text = (_input(4) + _ip(name="a", extra="").replace(
        "inner_product_param", "param { name: 'w' } inner_product_param")
        + _ip(num_output=5, name="b").replace(
            "inner_product_param", "param { name: 'w' } inner_product_param"))
    with pytest.raises(ShapeError, match=(
            "cannot share param 'w' owned by layer 'a' with layer 'b': shape "
            r"mismatch \(owner 3 4 \(12\), sharer 5 4 \(20\)\).*PERMISSIVE")):
        netlite.Net(text)


def test_shared_param_count_mismatch_in_permissive_mode():
    spec = "param { name: 'w' share_mode: PERMISSIVE } inner_product_param"
    text = (_input(4) + _ip(name="a").replace("inner_product_param", spec)
            + _ip(num_output=5, name="b").replace("inner_product_param", spec))
    with pytest.raises(ShapeError, match="count mismatch"):
        netlite.Net(text)


def test_shared_param_lr_mult_mismatch():
    text = (_input(4) + _ip(name="a").replace(
        "inner_product_param", "param { name: 'w' lr_mult: 1 } inner_product_param")
        + _ip(name="b").replace(
            "inner_product_param", "param { name: 'w' lr_mult: 2 } "
            "inner_product_param"))
    with pytest.raises(LayerSetupError,
                       match="shared param 'w' has mismatched lr_mult"):
        netlite.Net(text)


def test_bad_phase():
    with pytest.raises(ValueError, match="phase must be netlite.TRAIN or netlite.TEST"):
        netlite.Net(INPUT, phase="train")


def test_forward_and_backward_reject_unknown_blob_names():
    net = netlite.Net(INPUT + _ip())
    with pytest.raises(KeyError, match="'ip' is not an input of this net"):
        net.forward(ip=np.zeros((2, 3)))
    with pytest.raises(KeyError, match="'x' is not an output of this net"):
        net.backward(x=np.zeros((2, 4)))
    with pytest.raises(KeyError, match="no layer named 'nope'"):
        net.forward(end="nope")


def test_changed_input_size_is_a_shape_error():
    net = netlite.Net(INPUT + _ip())
    with pytest.raises(ShapeError, match="input size incompatible with the weights"):
        net.forward(x=np.zeros((2, 5)))


# ------------------------------------------------------------------ weights
def _saved(tmp_path, text, name):
    net = netlite.Net(text)
    path = tmp_path / name
    net.save(path)
    return path


@pytest.mark.parametrize("suffix", [".caffemodel", ".npz"])
def test_weights_of_another_shape_name_layer_blob_and_shapes(tmp_path, suffix):
    path = _saved(tmp_path, _input(4) + _ip(), "four" + suffix)
    target = netlite.Net(_input(5) + _ip())
    with pytest.raises(WeightsFileError) as info:
        target.copy_from(path)
    message = str(info.value)
    assert str(path) in message
    assert "blob 0 of layer 'ip' (InnerProduct)" in message
    assert "the file has shape (3, 4), the net expects (3, 5)" in message
    with pytest.raises(WeightsFileError, match="layer 'ip'"):
        netlite.Net(_input(5) + _ip(), weights=path)


@pytest.mark.parametrize("suffix", [".caffemodel", ".npz"])
def test_weights_with_another_blob_count(tmp_path, suffix):
    path = _saved(tmp_path, _input(4) + _ip(), "with_bias" + suffix)
    target = netlite.Net(_input(4) + _ip(extra="bias_term: false"))
    with pytest.raises(WeightsFileError, match=(
            "layer 'ip' has 2 blob.s. in the file but 1 in the net")):
        target.copy_from(path)


@pytest.mark.parametrize("payload", [
    b"name: 'LeNet'\nlayer { name: 'a' }\n",   # a prototxt, not a caffemodel
    b"\x89HDF\r\n\x1a\n" + bytes(range(256)),  # an HDF5 signature and noise
    bytes(range(255, -1, -1)) * 4,
    b"",                                        # an empty file
])
def test_file_that_is_neither_caffemodel_nor_npz(tmp_path, payload):
    path = tmp_path / "weights.bin"
    path.write_bytes(payload)
    net = netlite.Net(INPUT + _ip())
    before = net.params["ip"][0].data.copy()
    with pytest.raises(WeightsFileError, match=re.escape(str(path))):
        net.copy_from(path)
    np.testing.assert_array_equal(net.params["ip"][0].data, before)


def test_truncated_npz(tmp_path):
    path = _saved(tmp_path, INPUT + _ip(), "w.npz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFileError, match="w.npz"):
        netlite.Net(INPUT + _ip()).copy_from(path)


class _Tripwire:
    """Unpickling this object creates a file: proof that pickle ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_npz_with_object_array_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.npz"
    np.savez(path, **{"ip/0": np.array([_Tripwire(str(marker))], dtype=object)})
    net = netlite.Net(INPUT + _ip())
    with pytest.raises(WeightsFileError, match=r"evil.npz: member 'ip/0'.*unpickling"):
        net.copy_from(path)
    assert not marker.exists()
    with pytest.raises(WeightsFileError):
        io.load_npz_weights(path)
    assert not marker.exists()


def test_npz_with_bad_keys_or_non_numeric_arrays(tmp_path):
    bad_key = tmp_path / "bad_key.npz"
    np.savez(bad_key, weights=np.zeros(3))
    with pytest.raises(WeightsFileError, match="key 'weights' is not '<layer>/<blob"):
        io.load_npz_weights(bad_key)
    strings = tmp_path / "strings.npz"
    np.savez(strings, **{"ip/0": np.array(["a", "b"])})
    with pytest.raises(WeightsFileError, match="must be numeric"):
        io.load_npz_weights(strings)


def test_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        netlite.Net(INPUT + _ip(), weights=tmp_path / "nothing.caffemodel")
