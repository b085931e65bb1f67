"""filter_net: port of the FilterNetTest cases of Caffe's test_net.cpp
(include/exclude by phase, stage, not_stage, level, multiple rules; every
case also checks idempotence), plus rule semantics and Net-level use."""

import os

import pytest

import netlite
from netlite import io
from netlite.errors import PrototxtError
from netlite.net_transform import filter_net, state_meets_rule
from netlite.proto import netlite_pb2

DATA = os.path.join(os.path.dirname(__file__), "data")

_LAYERS = {
    "data": "name: 'data' type: 'Data' top: 'data' top: 'label'",
    "innerprod": ("name: 'innerprod' type: 'InnerProduct' bottom: 'data' "
                  "top: 'innerprod'"),
    "loss": ("name: 'loss' type: 'SoftmaxWithLoss' bottom: 'innerprod' "
             "bottom: 'label'"),
}


def _text(state="", rules=None, keep=("data", "innerprod", "loss")):
    """The three-layer test net of upstream's FilterNet tests.

    ``rules`` maps a layer name to its include/exclude text; ``keep`` lists
    the layers present (the expected output drops the filtered ones).
    """
    rules = rules or {}
    parts = [f"state: {{ {state} }}"] if state else []
    parts.append("name: 'TestNetwork'")
    for name, body in _LAYERS.items():
        if name in keep:
            parts.append(f"layer {{ {body} {rules.get(name, '')} }}")
    return " ".join(parts)


def _check(input_text, expected_text):
    source = io.parse_text(input_text, netlite_pb2.NetParameter)
    snapshot = source.SerializeToString()
    actual = filter_net(source)
    expected = io.parse_text(expected_text, netlite_pb2.NetParameter)
    assert io.to_text(actual) == io.to_text(expected)
    assert actual == expected
    assert source.SerializeToString() == snapshot
    assert filter_net(actual) == actual  # idempotence
    return actual


def test_no_filter():
    _check(_text(), _text())


def test_filter_lenet_train_test():
    # Caffe's LeNet: two 'mnist' Data layers gated by phase, Accuracy in TEST
    # only.  The filtered nets keep the state that selected them.
    with open(os.path.join(DATA, "lenet_train_test.prototxt"), encoding="utf-8") as f:
        lenet = f.read()
    for phase, name in ((netlite.TRAIN, "TRAIN"), (netlite.TEST, "TEST")):
        source = io.parse_text(lenet + f" state: {{ phase: {name} }}",
                               netlite_pb2.NetParameter)
        kept = [layer for layer in source.layer
                if not layer.include or layer.include[0].phase == phase]
        expected = netlite_pb2.NetParameter()
        expected.CopyFrom(source)
        del expected.layer[:]
        expected.layer.extend(kept)
        actual = _check(io.to_text(source), io.to_text(expected))
        names = [layer.name for layer in actual.layer]
        assert len(names) == (9 if phase == netlite.TRAIN else 10)
        assert ("accuracy" in names) == (phase == netlite.TEST)
        batch = actual.layer[0].data_param.batch_size
        assert batch == (64 if phase == netlite.TRAIN else 100)


def test_filter_out_by_stage():
    rules = {"data": "include: { stage: 'mystage' }"}
    _check(_text(rules=rules), _text(keep=("innerprod", "loss")))


def test_filter_out_by_stage2():
    rules = {"innerprod": "include: { stage: 'mystage' }"}
    _check(_text(rules=rules), _text(keep=("data", "loss")))


def test_filter_in_by_stage():
    text = _text("stage: 'mystage'", {"innerprod": "include: { stage: 'mystage' }"})
    _check(text, text)


def test_filter_in_by_stage2():
    text = _text(rules={"innerprod": "exclude: { stage: 'mystage' }"})
    _check(text, text)


def test_filter_out_by_multiple_stage():
    # Within one rule every stage is required (AND).
    rules = {"innerprod": "include: { stage: 'mystage' stage: 'myotherstage' }",
             "loss": "include: { stage: 'mystage' }"}
    _check(_text("stage: 'mystage'", rules),
           _text("stage: 'mystage'", rules, keep=("data", "loss")))


def test_filter_in_by_multiple_stage():
    # Across rules any one suffices (OR).
    rules = {"innerprod": ("include: { stage: 'myotherstage' } "
                           "include: { stage: 'mystage' }"),
             "loss": "include: { stage: 'mystage' }"}
    text = _text("stage: 'mystage'", rules)
    _check(text, text)


def test_filter_in_by_multiple_stage2():
    rules = {"innerprod": "include: { stage: 'mystage' stage: 'myotherstage' }",
             "loss": "include: { stage: 'mystage' }"}
    text = _text("stage: 'mystage' stage: 'myotherstage'", rules)
    _check(text, text)


def test_filter_in_by_not_stage():
    rules = {"innerprod": "include: { not_stage: 'myotherstage' }",
             "loss": "include: { not_stage: 'myotherstage' }"}
    text = _text("stage: 'mystage'", rules)
    _check(text, text)


def test_filter_out_by_not_stage():
    rules = {"innerprod": "include: { not_stage: 'mystage' }",
             "loss": "include: { not_stage: 'mystage' }"}
    _check(_text("stage: 'mystage'", rules),
           _text("stage: 'mystage'", rules, keep=("data",)))


@pytest.mark.parametrize("state, rule, kept", [
    ("", "min_level: 3", False),        # TestFilterOutByMinLevel
    ("", "max_level: -3", False),       # TestFilterOutByMaxLevel
    ("", "min_level: 0", True),         # TestFilterInByMinLevel
    ("level: 7", "min_level: 3", True),     # TestFilterInByMinLevel2
    ("", "max_level: 0", True),         # TestFilterInByMaxLevel
    ("level: -7", "max_level: -3", True),   # TestFilterInByMaxLevel2
])
def test_filter_by_level(state, rule, kept):
    rules = {"innerprod": f"include: {{ {rule} }}"}
    keep = ("data", "innerprod", "loss") if kept else ("data", "loss")
    _check(_text(state, rules), _text(state, rules, keep))


def test_filter_in_out_by_include_multi_rule():
    rules = {"innerprod": "include: { min_level: 2 phase: TRAIN }",
             "loss": "include: { min_level: 2 phase: TEST }"}
    train, test = "level: 4 phase: TRAIN", "level: 4 phase: TEST"
    _check(_text(train, rules), _text(train, rules, keep=("data", "innerprod")))
    _check(_text(test, rules), _text(test, rules, keep=("data", "loss")))


def test_filter_in_by_include_multi_rule():
    rules = {"innerprod": ("include: { min_level: 2 phase: TRAIN } "
                           "include: { phase: TEST }"),
             "loss": ("include: { min_level: 2 phase: TEST } "
                      "include: { phase: TRAIN }")}
    for state in ("level: 2 phase: TRAIN", "level: 2 phase: TEST"):
        text = _text(state, rules)
        _check(text, text)


def test_filter_in_out_by_exclude_multi_rule():
    rules = {"innerprod": "exclude: { min_level: 2 phase: TRAIN }",
             "loss": "exclude: { min_level: 2 phase: TEST }"}
    train, test = "level: 4 phase: TRAIN", "level: 4 phase: TEST"
    _check(_text(train, rules), _text(train, rules, keep=("data", "loss")))
    _check(_text(test, rules), _text(test, rules, keep=("data", "innerprod")))


def test_default_state_phase_is_test():
    rules = {"innerprod": "include: { phase: TRAIN }",
             "loss": "include: { phase: TEST }"}
    _check(_text(rules=rules), _text(rules=rules, keep=("data", "loss")))


def test_include_and_exclude_together_is_an_error():
    text = _text(rules={"innerprod": ("include: { phase: TRAIN } "
                                      "exclude: { stage: 'x' }")})
    with pytest.raises(PrototxtError, match=(
            "layer 'innerprod' specifies both include and exclude rules")):
        filter_net(io.parse_text(text, netlite_pb2.NetParameter))


# --------------------------------------------------------- rule semantics
def _state(text):
    return io.parse_text(text, netlite_pb2.NetState)


def _rule(text):
    return io.parse_text(text, netlite_pb2.NetStateRule)


@pytest.mark.parametrize("state, rule, met", [
    ("", "", True),
    ("phase: TRAIN", "phase: TRAIN", True),
    ("phase: TRAIN", "phase: TEST", False),
    ("level: 2", "min_level: 2 max_level: 2", True),
    ("level: 1", "min_level: 2", False),
    ("level: 3", "max_level: 2", False),
    ("stage: 'a' stage: 'b'", "stage: 'b' stage: 'a'", True),
    ("stage: 'a'", "stage: 'a' stage: 'b'", False),
    ("stage: 'a'", "not_stage: 'b'", True),
    ("stage: 'a' stage: 'b'", "not_stage: 'b'", False),
    ("phase: TRAIN level: 5 stage: 's'",
     "phase: TRAIN min_level: 5 stage: 's' not_stage: 't'", True),
])
def test_state_meets_rule(state, rule, met):
    assert state_meets_rule(_state(state), _rule(rule)) is met


# ------------------------------------------------------------ in a Net
_INPUTS = """name: 'gated'
    layer { name: 'always' type: 'Input' top: 'a' input_param { shape { dim: 1 } } }
    layer { name: 'train_only' type: 'Input' top: 't'
            input_param { shape { dim: 2 } } include { phase: TRAIN } }
    layer { name: 'not_deploy' type: 'Input' top: 'n'
            input_param { shape { dim: 3 } } exclude { stage: 'deploy' } }
    layer { name: 'deep' type: 'Input' top: 'd'
            input_param { shape { dim: 4 } } include { min_level: 2 } }
"""


@pytest.mark.parametrize("phase, level, stages, expected", [
    (netlite.TRAIN, 0, (), ["always", "train_only", "not_deploy"]),
    (netlite.TEST, 0, (), ["always", "not_deploy"]),
    (netlite.TEST, 0, ("deploy",), ["always"]),
    (netlite.TRAIN, 3, ("deploy",), ["always", "train_only", "deep"]),
])
def test_net_filters_with_its_state(phase, level, stages, expected):
    net = netlite.Net(_INPUTS, phase, level=level, stages=stages)
    assert net.layer_names == expected
    assert net.phase == phase
    assert net.net_param.state.level == level
    assert net.layers[0].phase == phase  # layers inherit the net phase


def test_net_adds_stages_to_the_prototxt_state():
    # As Caffe's Net(file, phase, level, stages): given stages are added to
    # the ones in the file's state; phase and level are replaced.
    text = _INPUTS + " state { stage: 'deploy' level: 9 phase: TRAIN }"
    net = netlite.Net(text, netlite.TEST, stages=["extra"])
    assert list(net.net_param.state.stage) == ["deploy", "extra"]
    assert net.layer_names == ["always"]
    assert netlite.Net(text, netlite.TEST, stages="deploy").layer_names == ["always"]
