"""netlite: a NumPy-from-scratch, Caffe-style layer engine.

The pycaffe-shaped entry points (pycaffe's names: a ``caffe.`` script runs
with ``netlite.`` in its place; docs/engine/net.md §6 has the mapping)::

    import netlite
    netlite.set_mode_cpu()
    netlite.set_cpu_engine("numba")
    net = netlite.Net("lenet_train_test.prototxt", netlite.TRAIN)
    net = netlite.Net("lenet.prototxt", "lenet.caffemodel", netlite.TEST)
    out = net.forward()
    solver = netlite.SGDSolver("lenet_solver.prototxt")
    from netlite.net_spec import NetSpec, layers as L, params as P

(``netlite.layers`` is the layer zoo; pycaffe's ``caffe.layers`` pseudo-module
is :data:`netlite.net_spec.layers`.)

``import netlite`` needs only NumPy and protobuf; Numba and CuPy are
imported when their engine is first used.  It imports the layer zoo
(:mod:`netlite.layers`) and the solvers (:mod:`netlite.solvers`), which
registers every built-in layer and solver type.

The package is organised in folders: the core (blob, layer, registry, net,
fillers, gradient checker, backend, rng, io, errors, proto) sits directly
in ``netlite/``; :mod:`netlite.solvers` trains, :mod:`netlite.data` reads
and finds datasets, :mod:`netlite.tools` is the command line.
"""

from netlite import layers, net_spec, solvers  # noqa: F401  (fill the registries)
from netlite.backend import (
    cpu_engine,
    set_cpu_engine,
    set_device,
    set_mode_cpu,
    set_mode_gpu,
)
from netlite.blob import Blob
from netlite.errors import (
    LabelError,
    LayerSetupError,
    NetliteError,
    NetliteWarning,
    NonFiniteError,
    PrototxtError,
    ShapeError,
    UnknownLayerTypeError,
    WeightsFileError,
)
from netlite.fusion import fusion_enabled, set_fusion
from netlite.gradient_check import GradientChecker, GradientCheckError
from netlite.layer import TEST, TRAIN, Layer, LossLayer, NeuronLayer
from netlite.net import Net
from netlite.net_spec import NetSpec
from netlite.registry import create_layer, layer_class, layer_types, register_layer
from netlite.rng import set_random_seed
from netlite.solvers.errors import SolverParameterError, SolverStateError
from netlite.solvers.registry import get_solver, register_solver, solver_types
from netlite.solvers.sgd import (
    AdaDeltaSolver,
    AdaGradSolver,
    AdamSolver,
    NesterovSolver,
    RMSPropSolver,
    SGDSolver,
)
from netlite.solvers.solver import Solver

#: pycaffe's name for :func:`layer_types` (sorted registered type strings).
layer_type_list = layer_types

__version__ = "0.1.0"

__all__ = [
    "Blob", "GradientCheckError", "GradientChecker", "LabelError", "Layer",
    "LayerSetupError", "LossLayer", "Net", "NetSpec", "NetliteError",
    "NetliteWarning", "NeuronLayer", "NonFiniteError", "PrototxtError",
    "ShapeError", "TEST", "TRAIN", "UnknownLayerTypeError", "WeightsFileError",
    "cpu_engine", "create_layer", "fusion_enabled", "layer_class", "layer_type_list",
    "layer_types", "register_layer", "set_cpu_engine",
    "set_device", "set_fusion", "set_mode_cpu", "set_mode_gpu", "set_random_seed",
    "AdaDeltaSolver", "AdaGradSolver", "AdamSolver", "NesterovSolver",
    "RMSPropSolver", "SGDSolver", "Solver", "SolverParameterError",
    "SolverStateError", "get_solver", "register_solver", "solver_types",
]
