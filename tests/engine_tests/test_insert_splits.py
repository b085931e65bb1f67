"""insert_splits: port of the SplitLayerInsertionTest cases of Caffe's
test_split_layer.cpp (expected NetParameters and idempotence), plus netlite's
one deliberate deviation and the error paths.

The deviation: when a top with a loss weight is fanned out, the weight moves
to split top 0 (as in Caffe), but netlite sets only the producer's entry for
that top to an explicit 0 where Caffe clears the producer's whole
``loss_weight`` list.  Clearing drops the weights of the producer's other
tops, and makes a loss layer fall back to its default weight 1, so its loss
would be counted twice.
"""

import numpy as np
import pytest

import netlite
from netlite import io
from netlite.errors import LayerSetupError
from netlite.net_transform import insert_splits, split_blob_name, split_layer_name
from netlite.proto import netlite_pb2


def _net(text):
    return io.parse_text(text, netlite_pb2.NetParameter)


def _check(input_text, expected_text):
    source = _net(input_text)
    snapshot = source.SerializeToString()
    actual = insert_splits(source)
    expected = _net(expected_text)
    # Compare the text first: a failure then shows a readable diff.
    assert io.to_text(actual) == io.to_text(expected)
    assert actual == expected
    assert source.SerializeToString() == snapshot  # the input is not modified
    # Idempotence: splitting a split net changes nothing.
    assert insert_splits(actual) == actual
    return actual


DATA_LAYER = "layer { name: 'data' type: 'Data' top: 'data' top: 'label' }"


def test_names():
    assert split_layer_name("relu1", "ip1", 0) == "ip1_relu1_0_split"
    assert split_blob_name("relu1", "ip1", 0, 2) == "ip1_relu1_0_split_2"


def test_no_insertion_linear_net():
    text = DATA_LAYER + """
        layer { name: 'innerprod' type: 'InnerProduct' bottom: 'data'
                top: 'innerprod' }
        layer { name: 'loss' type: 'SoftmaxWithLoss' bottom: 'innerprod'
                bottom: 'label' }
    """
    _check("name: 'TestNetwork' " + text, "name: 'TestNetwork' " + text)


def test_no_insertion_with_explicit_split():
    text = """name: 'TestNetwork'
        layer { name: 'data' type: 'Data' top: 'data' top: 'label' }
        layer { name: 'data_split' type: 'Split' bottom: 'data'
                top: 'data_split_0' top: 'data_split_1' }
        layer { name: 'innerprod1' type: 'InnerProduct' bottom: 'data_split_0'
                top: 'innerprod1' }
        layer { name: 'innerprod2' type: 'InnerProduct' bottom: 'data_split_1'
                top: 'innerprod2' }
        layer { name: 'loss' type: 'EuclideanLoss' bottom: 'innerprod1'
                bottom: 'innerprod2' }
    """
    _check(text, text)


def test_no_insertion_imagenet_lite():
    # A CaffeNet-shaped chain (conv/relu/pool/norm blocks, in-place ReLUs and
    # Dropouts, fully connected tail, loss): every blob has one consumer.
    blocks = []
    previous = "data"
    for i, (outputs, kernel) in enumerate([(96, 11), (256, 5), (384, 3)], 1):
        blocks.append(f"""
        layer {{ name: 'conv{i}' type: 'Convolution' bottom: '{previous}'
                top: 'conv{i}' param {{ lr_mult: 1 decay_mult: 1 }}
                param {{ lr_mult: 2 decay_mult: 0 }}
                convolution_param {{ num_output: {outputs} kernel_size: {kernel}
                  weight_filler {{ type: 'gaussian' std: 0.01 }}
                  bias_filler {{ type: 'constant' value: 0 }} }} }}
        layer {{ name: 'relu{i}' type: 'ReLU' bottom: 'conv{i}' top: 'conv{i}' }}
        layer {{ name: 'pool{i}' type: 'Pooling' bottom: 'conv{i}' top: 'pool{i}'
                pooling_param {{ pool: MAX kernel_size: 3 stride: 2 }} }}
        layer {{ name: 'norm{i}' type: 'LRN' bottom: 'pool{i}' top: 'norm{i}' }}
        """)
        previous = f"norm{i}"
    for i, outputs in ((6, 4096), (7, 4096)):
        blocks.append(f"""
        layer {{ name: 'fc{i}' type: 'InnerProduct' bottom: '{previous}'
                top: 'fc{i}' inner_product_param {{ num_output: {outputs} }} }}
        layer {{ name: 'relu{i}' type: 'ReLU' bottom: 'fc{i}' top: 'fc{i}' }}
        layer {{ name: 'drop{i}' type: 'Dropout' bottom: 'fc{i}' top: 'fc{i}'
                dropout_param {{ dropout_ratio: 0.5 }} }}
        """)
        previous = f"fc{i}"
    text = ("name: 'CaffeNetLite' layer { name: 'data' type: 'Data' top: 'data' "
            "top: 'label' data_param { source: 'train-lmdb' batch_size: 256 } "
            "transform_param { crop_size: 227 mirror: true } }"
            + "".join(blocks) + f"""
        layer {{ name: 'fc8' type: 'InnerProduct' bottom: '{previous}' top: 'fc8'
                inner_product_param {{ num_output: 1000 }} }}
        layer {{ name: 'loss' type: 'SoftmaxWithLoss' bottom: 'fc8'
                bottom: 'label' }}
        """)
    assert len(_check(text, text).layer) == 21


def test_no_insertion_with_in_place():
    text = "name: 'TestNetwork' " + DATA_LAYER + """
        layer { name: 'innerprod' type: 'InnerProduct' bottom: 'data'
                top: 'innerprod' }
        layer { name: 'relu' type: 'ReLU' bottom: 'innerprod' top: 'innerprod' }
        layer { name: 'loss' type: 'SoftmaxWithLoss' bottom: 'innerprod'
                bottom: 'label' }
    """
    _check(text, text)


_IP = ("type: 'InnerProduct' inner_product_param { num_output: 10 "
       "bias_term: false weight_filler { type: 'gaussian' std: 10 } }")
_DUMMY = ("layer { name: 'data' type: 'DummyData' dummy_data_param { num: 5 "
          "channels: 2 height: 3 width: 4 data_filler { type: 'gaussian' "
          "std: 0.01 } } top: 'data' }")


def test_loss_insertion():
    # A top with an explicit loss weight that also feeds a layer is split;
    # split top 0 carries the loss and the consumer gets top 1.  (Caffe's
    # expected output has no loss_weight left on innerproduct1; netlite
    # keeps an explicit 0 there, see the module docstring.)
    source = f"""name: 'UnsharedWeightsNetwork' force_backward: true {_DUMMY}
        layer {{ name: 'innerproduct1' {_IP} param {{ name: 'unsharedweights1' }}
                bottom: 'data' top: 'innerproduct1' loss_weight: 2.5 }}
        layer {{ name: 'innerproduct2' {_IP} param {{ name: 'unsharedweights2' }}
                bottom: 'data' top: 'innerproduct2' }}
        layer {{ name: 'loss' type: 'EuclideanLoss' bottom: 'innerproduct1'
                bottom: 'innerproduct2' }}
    """
    expected = f"""name: 'UnsharedWeightsNetwork' force_backward: true {_DUMMY}
        layer {{ name: 'data_data_0_split' type: 'Split' bottom: 'data'
                top: 'data_data_0_split_0' top: 'data_data_0_split_1' }}
        layer {{ name: 'innerproduct1' {_IP} param {{ name: 'unsharedweights1' }}
                bottom: 'data_data_0_split_0' top: 'innerproduct1'
                loss_weight: 0 }}
        layer {{ name: 'innerproduct1_innerproduct1_0_split' type: 'Split'
                bottom: 'innerproduct1'
                top: 'innerproduct1_innerproduct1_0_split_0'
                top: 'innerproduct1_innerproduct1_0_split_1'
                loss_weight: 2.5 loss_weight: 0 }}
        layer {{ name: 'innerproduct2' {_IP} param {{ name: 'unsharedweights2' }}
                bottom: 'data_data_0_split_1' top: 'innerproduct2' }}
        layer {{ name: 'loss' type: 'EuclideanLoss'
                bottom: 'innerproduct1_innerproduct1_0_split_1'
                bottom: 'innerproduct2' }}
    """
    _check(source, expected)


def test_insertion():
    source = "name: 'TestNetwork' " + DATA_LAYER + """
        layer { name: 'innerprod1' type: 'InnerProduct' bottom: 'data'
                top: 'innerprod1' }
        layer { name: 'innerprod2' type: 'InnerProduct' bottom: 'data'
                top: 'innerprod2' }
        layer { name: 'innerprod3' type: 'InnerProduct' bottom: 'data'
                top: 'innerprod3' }
        layer { name: 'loss1' type: 'EuclideanLoss' bottom: 'innerprod1'
                bottom: 'innerprod2' }
        layer { name: 'loss2' type: 'EuclideanLoss' bottom: 'innerprod2'
                bottom: 'innerprod3' }
    """
    expected = "name: 'TestNetwork' " + DATA_LAYER + """
        layer { name: 'data_data_0_split' type: 'Split' bottom: 'data'
                top: 'data_data_0_split_0' top: 'data_data_0_split_1'
                top: 'data_data_0_split_2' }
        layer { name: 'innerprod1' type: 'InnerProduct'
                bottom: 'data_data_0_split_0' top: 'innerprod1' }
        layer { name: 'innerprod2' type: 'InnerProduct'
                bottom: 'data_data_0_split_1' top: 'innerprod2' }
        layer { name: 'innerprod2_innerprod2_0_split' type: 'Split'
                bottom: 'innerprod2' top: 'innerprod2_innerprod2_0_split_0'
                top: 'innerprod2_innerprod2_0_split_1' }
        layer { name: 'innerprod3' type: 'InnerProduct'
                bottom: 'data_data_0_split_2' top: 'innerprod3' }
        layer { name: 'loss1' type: 'EuclideanLoss' bottom: 'innerprod1'
                bottom: 'innerprod2_innerprod2_0_split_0' }
        layer { name: 'loss2' type: 'EuclideanLoss'
                bottom: 'innerprod2_innerprod2_0_split_1' bottom: 'innerprod3' }
    """
    _check(source, expected)


def test_insertion_two_top():
    # Both tops of one layer fan out: two splits, in top order, right after it.
    source = "name: 'TestNetwork' " + DATA_LAYER + """
        layer { name: 'innerprod1' type: 'InnerProduct' bottom: 'data'
                top: 'innerprod1' }
        layer { name: 'innerprod2' type: 'InnerProduct' bottom: 'label'
                top: 'innerprod2' }
        layer { name: 'innerprod3' type: 'InnerProduct' bottom: 'data'
                top: 'innerprod3' }
        layer { name: 'innerprod4' type: 'InnerProduct' bottom: 'label'
                top: 'innerprod4' }
        layer { name: 'loss1' type: 'EuclideanLoss' bottom: 'innerprod1'
                bottom: 'innerprod3' }
        layer { name: 'loss2' type: 'EuclideanLoss' bottom: 'innerprod2'
                bottom: 'innerprod4' }
    """
    expected = "name: 'TestNetwork' " + DATA_LAYER + """
        layer { name: 'data_data_0_split' type: 'Split' bottom: 'data'
                top: 'data_data_0_split_0' top: 'data_data_0_split_1' }
        layer { name: 'label_data_1_split' type: 'Split' bottom: 'label'
                top: 'label_data_1_split_0' top: 'label_data_1_split_1' }
        layer { name: 'innerprod1' type: 'InnerProduct'
                bottom: 'data_data_0_split_0' top: 'innerprod1' }
        layer { name: 'innerprod2' type: 'InnerProduct'
                bottom: 'label_data_1_split_0' top: 'innerprod2' }
        layer { name: 'innerprod3' type: 'InnerProduct'
                bottom: 'data_data_0_split_1' top: 'innerprod3' }
        layer { name: 'innerprod4' type: 'InnerProduct'
                bottom: 'label_data_1_split_1' top: 'innerprod4' }
        layer { name: 'loss1' type: 'EuclideanLoss' bottom: 'innerprod1'
                bottom: 'innerprod3' }
        layer { name: 'loss2' type: 'EuclideanLoss' bottom: 'innerprod2'
                bottom: 'innerprod4' }
    """
    _check(source, expected)


def test_with_in_place():
    # The split of innerprod1 follows its last writer, the in-place relu1,
    # and is named after it; data's consumers keep their order.
    source = "name: 'TestNetwork' " + DATA_LAYER + """
        layer { name: 'innerprod1' type: 'InnerProduct' bottom: 'data'
                top: 'innerprod1' }
        layer { name: 'relu1' type: 'ReLU' bottom: 'innerprod1' top: 'innerprod1' }
        layer { name: 'innerprod2' type: 'InnerProduct' bottom: 'innerprod1'
                top: 'innerprod2' }
        layer { name: 'loss1' type: 'EuclideanLoss' bottom: 'innerprod1'
                bottom: 'label' }
        layer { name: 'loss2' type: 'EuclideanLoss' bottom: 'innerprod2'
                bottom: 'data' }
    """
    expected = "name: 'TestNetwork' " + DATA_LAYER + """
        layer { name: 'data_data_0_split' type: 'Split' bottom: 'data'
                top: 'data_data_0_split_0' top: 'data_data_0_split_1' }
        layer { name: 'innerprod1' type: 'InnerProduct'
                bottom: 'data_data_0_split_0' top: 'innerprod1' }
        layer { name: 'relu1' type: 'ReLU' bottom: 'innerprod1' top: 'innerprod1' }
        layer { name: 'innerprod1_relu1_0_split' type: 'Split'
                bottom: 'innerprod1' top: 'innerprod1_relu1_0_split_0'
                top: 'innerprod1_relu1_0_split_1' }
        layer { name: 'innerprod2' type: 'InnerProduct'
                bottom: 'innerprod1_relu1_0_split_0' top: 'innerprod2' }
        layer { name: 'loss1' type: 'EuclideanLoss'
                bottom: 'innerprod1_relu1_0_split_1' bottom: 'label' }
        layer { name: 'loss2' type: 'EuclideanLoss' bottom: 'innerprod2'
                bottom: 'data_data_0_split_1' }
    """
    _check(source, expected)


# ------------------------------------------------------ beyond upstream
def test_loss_weight_without_consumer_is_not_split():
    text = "name: 'n' " + DATA_LAYER + """
        layer { name: 'ip' type: 'InnerProduct' bottom: 'data' top: 'ip'
                loss_weight: 3 }
        layer { name: 'silence' type: 'Silence' bottom: 'label' }
    """
    _check(text, text)


def test_zero_loss_weight_is_not_a_consumer():
    text = "name: 'n' " + DATA_LAYER + """
        layer { name: 'ip' type: 'InnerProduct' bottom: 'data' top: 'ip'
                loss_weight: 0 }
        layer { name: 'relu' type: 'ReLU' bottom: 'ip' top: 'r' }
        layer { name: 'silence' type: 'Silence' bottom: 'label' }
    """
    _check(text, text)


def test_loss_weight_for_an_automatic_top_is_accepted():
    # A loss layer may list no top and still carry a weight for its
    # automatic top (Caffe's TestLossWeight nets do this); the count is
    # checked by the layer's own setup, not here.
    text = "name: 'n' " + DATA_LAYER + """
        layer { name: 'loss' type: 'EuclideanLoss' bottom: 'data'
                bottom: 'label' loss_weight: 2 }
    """
    _check(text, text)


_TWO_TOP = """name: 'n'
    layer { name: 'pair' type: 'DummyData' top: 'a' top: 'b'
            loss_weight: LW_A loss_weight: LW_B }
    layer { name: 'use_a' type: 'ReLU' bottom: 'a' top: 'ra' }
"""
_USE_B = "layer { name: 'use_b' type: 'ReLU' bottom: 'b' top: 'rb' }"


def test_deviation_multi_top_keeps_other_tops_loss_weights():
    # Top a (weight 1.5) feeds a layer and is split; top b (weight 2) is
    # only a loss.  Caffe clears the producer's whole loss_weight list here,
    # silently dropping b's weight; netlite zeroes only the moved entry.
    # (Caffe's output would have no loss_weight on 'pair' at all.)
    source = _TWO_TOP.replace("LW_A", "1.5").replace("LW_B", "2")
    expected = """name: 'n'
        layer { name: 'pair' type: 'DummyData' top: 'a' top: 'b'
                loss_weight: 0 loss_weight: 2 }
        layer { name: 'a_pair_0_split' type: 'Split' bottom: 'a'
                top: 'a_pair_0_split_0' top: 'a_pair_0_split_1'
                loss_weight: 1.5 loss_weight: 0 }
        layer { name: 'use_a' type: 'ReLU' bottom: 'a_pair_0_split_1' top: 'ra' }
    """
    actual = _check(source, expected)
    total = sum(w for layer in actual.layer for w in layer.loss_weight)
    assert total == pytest.approx(3.5)  # no weight lost or duplicated


def test_deviation_zeroes_are_kept_when_nothing_is_left():
    # Caffe would clear the list; an explicit [0, 0] keeps a loss layer from
    # falling back to its default weight 1.
    source = _TWO_TOP.replace("LW_A", "1.5").replace("LW_B", "0") + _USE_B
    expected = """name: 'n'
        layer { name: 'pair' type: 'DummyData' top: 'a' top: 'b'
                loss_weight: 0 loss_weight: 0 }
        layer { name: 'a_pair_0_split' type: 'Split' bottom: 'a'
                top: 'a_pair_0_split_0' top: 'a_pair_0_split_1'
                loss_weight: 1.5 loss_weight: 0 }
        layer { name: 'use_a' type: 'ReLU' bottom: 'a_pair_0_split_1' top: 'ra' }
        layer { name: 'use_b' type: 'ReLU' bottom: 'b' top: 'rb' }
    """
    _check(source, expected)


def test_deviation_both_weighted_tops_fanned_out():
    source = _TWO_TOP.replace("LW_A", "1.5").replace("LW_B", "2") + _USE_B
    source += "layer { name: 'again_b' type: 'ReLU' bottom: 'b' top: 'rb2' }"
    actual = _check(source, """name: 'n'
        layer { name: 'pair' type: 'DummyData' top: 'a' top: 'b'
                loss_weight: 0 loss_weight: 0 }
        layer { name: 'a_pair_0_split' type: 'Split' bottom: 'a'
                top: 'a_pair_0_split_0' top: 'a_pair_0_split_1'
                loss_weight: 1.5 loss_weight: 0 }
        layer { name: 'b_pair_1_split' type: 'Split' bottom: 'b'
                top: 'b_pair_1_split_0' top: 'b_pair_1_split_1'
                top: 'b_pair_1_split_2' loss_weight: 2 loss_weight: 0
                loss_weight: 0 }
        layer { name: 'use_a' type: 'ReLU' bottom: 'a_pair_0_split_1' top: 'ra' }
        layer { name: 'use_b' type: 'ReLU' bottom: 'b_pair_1_split_1' top: 'rb' }
        layer { name: 'again_b' type: 'ReLU' bottom: 'b_pair_1_split_2'
                top: 'rb2' }
    """)
    assert len(actual.layer) == 6


def test_unknown_bottom_is_an_error():
    with pytest.raises(LayerSetupError, match=(
            r"unknown bottom blob 'nope' \(layer 'ip', bottom index 1\)")):
        insert_splits(_net(DATA_LAYER + """
            layer { name: 'ip' type: 'InnerProduct' bottom: 'data'
                    bottom: 'nope' top: 'ip' }"""))


def test_bottom_produced_later_is_unknown():
    with pytest.raises(LayerSetupError, match="unknown bottom blob 'later'"):
        insert_splits(_net("""
            layer { name: 'use' type: 'ReLU' bottom: 'later' top: 'x' }
            layer { name: 'make' type: 'Input' top: 'later' }"""))


def test_loss_layer_top_fanned_out_is_counted_once():
    # The loss layer's top 'l' (weight 2) also feeds a ReLU.  After the split,
    # the loss is carried by split top 0 alone; the loss layer keeps an
    # explicit weight 0 instead of its default 1.
    net = netlite.Net("""
        layer { name: 'in' type: 'Input' top: 'a' top: 'b'
                input_param { shape { dim: 2 dim: 3 } } }
        layer { name: 'loss' type: 'EuclideanLoss' bottom: 'a' bottom: 'b'
                top: 'l' loss_weight: 2 }
        layer { name: 'r' type: 'ReLU' bottom: 'l' top: 'r' }""")
    assert net.layer_names == ["in", "loss", "l_loss_0_split", "r"]
    net.forward(a=np.ones((2, 3)), b=np.zeros((2, 3)))
    value = float(net.blobs["l"].data)
    assert value == 1.5  # 6 / (2 * 2)
    assert net.loss == 2 * value
    assert net.layers[1].loss(0) == 0.0 and net.layers[2].loss(0) == 2.0
