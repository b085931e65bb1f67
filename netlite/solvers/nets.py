"""The nets of a solver: one train net and its test nets.

:func:`build_train_net` and :func:`build_test_nets` pick the nets from a
``SolverParameter``'s ``net``/``net_param``/``train_net``/``test_net``...
fields, merge the NetStates, copy the ``weights`` files in and make the
test nets share the train net's trained layers.  Relative net paths are
looked up in the current directory, then beside the solver file.  See
docs/engine/solvers.md §2.
"""

import logging
import os

from netlite import io
from netlite.layer import TEST, TRAIN
from netlite.net import Net
from netlite.proto import netlite_pb2
from netlite.solvers.errors import SolverParameterError

logger = logging.getLogger("netlite")

#: The fields that can name the train net (exactly one must be set).
_NET_FIELDS = ("net", "net_param", "train_net", "train_net_param")


def _resolve_net_file(name, solver_file):
    if os.path.isfile(name):
        return name
    tried = [os.path.abspath(name)]
    if solver_file and not os.path.isabs(name):
        candidate = os.path.join(os.path.dirname(solver_file), name)
        if os.path.isfile(candidate):
            return candidate
        tried.append(os.path.abspath(candidate))
    raise FileNotFoundError(
        f"net file '{name}' not found (tried {', '.join(tried)})"
    )


def _read_net_file(name, solver_file):
    return io.read_net_param(_resolve_net_file(name, solver_file))


def _build_net(net_param, phase, state_override, dtype):
    # Caffe's precedence: solver default phase < the net's own state <
    # train_state/test_state.
    state = netlite_pb2.NetState(phase=phase)
    state.MergeFrom(net_param.state)
    if state_override is not None:
        state.MergeFrom(state_override)
    return Net(
        net_param, phase=state.phase, dtype=dtype, level=state.level,
        stages=list(state.stage),
    )


def _load_weights(param, net):
    for entry in param.weights:
        for path in entry.split(","):
            path = path.strip()
            if path:
                logger.info("Finetuning from %s", path)
                net.copy_from(path)


def build_train_net(param, solver_file, dtype):
    """The train net (phase TRAIN) with the ``weights`` files copied in.

    Relative net paths are looked up in the current directory, then beside
    ``solver_file``.
    """
    p = param
    given = [f for f in _NET_FIELDS if p.HasField(f)]
    if len(given) != 1:
        what = "none" if not given else ", ".join(given)
        raise SolverParameterError(
            "SolverParameter must specify exactly one train net with one of "
            f"{', '.join(_NET_FIELDS)}; got {what}"
        )
    field = given[0]
    if field == "train_net_param":
        logger.info("Creating training net specified in train_net_param.")
        net_param = p.train_net_param
    elif field == "train_net":
        logger.info("Creating training net from train_net file: %s", p.train_net)
        net_param = _read_net_file(p.train_net, solver_file)
    elif field == "net_param":
        logger.info("Creating training net specified in net_param.")
        net_param = p.net_param
    else:
        logger.info("Creating training net from net file: %s", p.net)
        net_param = _read_net_file(p.net, solver_file)
    override = p.train_state if p.HasField("train_state") else None
    net = _build_net(net_param, TRAIN, override, dtype)
    _load_weights(p, net)
    return net


def build_test_nets(param, solver_file, dtype, train_net):
    """The test nets (phase TEST), in Caffe's order, sharing ``train_net``'s
    trained layers."""
    p = param
    generic = p.HasField("net_param") or p.HasField("net")
    explicit = len(p.test_net_param) + len(p.test_net)
    if (len(p.test_iter) < explicit) if generic else (len(p.test_iter) != explicit):
        raise SolverParameterError(
            f"test_iter must be given once per test net: {explicit} test "
            f"net(s) from test_net/test_net_param, {len(p.test_iter)} "
            "test_iter value(s)"
        )
    count = len(p.test_iter) if generic else explicit
    if p.test_state and len(p.test_state) != count:
        raise SolverParameterError(
            f"test_state must be unspecified or given once per test net "
            f"({count}), got {len(p.test_state)}"
        )
    if count and p.test_interval <= 0:
        raise SolverParameterError(
            f"{count} test net(s) need test_interval > 0, got {p.test_interval}"
        )
    sources = []
    for net_param in p.test_net_param:
        sources.append(("test_net_param", net_param))
    for name in p.test_net:
        sources.append(
            (f"test_net file: {name}", _read_net_file(name, solver_file))
        )
    remaining = count - len(sources)
    if remaining and p.HasField("net_param"):
        sources += [("net_param", p.net_param)] * remaining
    elif remaining:
        shared = _read_net_file(p.net, solver_file)
        sources += [(f"net file: {p.net}", shared)] * remaining
    test_nets = []
    for i, (what, net_param) in enumerate(sources):
        logger.info("Creating test net (#%d) specified by %s", i, what)
        override = p.test_state[i] if p.test_state else None
        test_net = _build_net(net_param, TEST, override, dtype)
        test_net.debug_info = p.debug_info
        _load_weights(p, test_net)
        test_net.share_trained_layers_with(train_net)
        test_nets.append(test_net)
    return test_nets
