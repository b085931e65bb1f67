"""The Layer base class: Caffe's layer contract in Python.

A layer is driven through four public methods that subclasses do not
override:

``setup(bottom, top)``
    check blob counts -> :meth:`Layer.layer_setup` (one-time: read
    parameters, create and fill parameter blobs) -> :meth:`Layer.reshape`
    (shape tops and buffers) -> set loss weights (fill each weighted top's
    diff with its weight).
``forward(bottom, top)``
    :meth:`Layer.reshape`, then the engine's forward, then return the
    weighted loss ``sum_t dot(top_t.data, top_t.diff)`` over weighted tops.
``backward(top, propagate_down, bottom)``
    the engine's backward.

Subclasses implement ``forward_cpu`` / ``backward_cpu`` (the NumPy
reference, written with the blobs' array module ``self.xp`` so it also runs
on CuPy arrays) and optionally ``forward_numba`` / ``backward_numba`` and
``forward_gpu`` / ``backward_gpu``.  The conventions:

* parameter diffs **accumulate** (``+=``); the solver clears them;
* bottom diffs are **overwritten**; fan-out is summed by Split layers;
* a loss weight lives in the top diff; backward reads it from there;
* honour ``propagate_down[i]`` and ``self.param_propagate_down[j]``.
"""

import numpy as np

from netlite import backend, io
from netlite.blob import Blob
from netlite.errors import LayerSetupError, layer_label
from netlite.proto import netlite_pb2

TRAIN = netlite_pb2.TRAIN
TEST = netlite_pb2.TEST


class Layer:
    """Base class of every layer.

    Parameters
    ----------
    layer_param : LayerParameter, str or None
        The layer's parameters (message or prototxt text).
    dtype : numpy dtype, optional
        Dtype of parameter blobs when the layer has no bottom or top to take
        it from at setup (normally it follows ``bottom[0]``).
    device : {"cpu", "gpu"}, optional
        Likewise for the device.

    Attributes
    ----------
    layer_param : LayerParameter
    phase : int
        ``netlite.TRAIN`` or ``netlite.TEST``.
    blobs : list of Blob
        Learnable parameters (``blobs[0]`` weights, ``blobs[1]`` bias).
    param_propagate_down : list of bool
        Whether to compute each parameter's gradient.
    iteration : int
        The solver's iteration, for layers whose behaviour follows a
        schedule; updated by :meth:`netlite.Net.set_iteration`.
    """

    #: The registered type string (set by ``register_layer``).
    type = None
    # Blob-count contract; -1 means "no constraint" (Caffe's virtuals).
    exact_num_bottom_blobs = -1
    min_bottom_blobs = -1
    max_bottom_blobs = -1
    exact_num_top_blobs = -1
    min_top_blobs = -1
    max_top_blobs = -1
    equal_num_bottom_top_blobs = False
    #: The Net creates anonymous tops up to the minimum/exact count.
    auto_top_blobs = False

    def __init__(self, layer_param=None, dtype=np.float32, device=None):
        self.layer_param = netlite_pb2.LayerParameter()
        self.layer_param.CopyFrom(io.parse_layer_param(layer_param))
        if not self.layer_param.type and self.type:
            self.layer_param.type = self.type
        self.phase = self.layer_param.phase  # TRAIN unless set (proto default)
        self.dtype = np.dtype(dtype)
        self.device = device or backend.default_device()
        self.xp = backend.get_array_module(self.device)
        self.blobs = []
        self.param_propagate_down = []
        self.loss_weights = []
        self.iteration = 0

    # ----------------------------------------------------------- contract
    def allow_force_backward(self, bottom_index):
        """Whether ``force_backward`` may send gradients to this bottom."""
        return True

    def loss(self, top_index):
        """The loss weight of top ``top_index`` (0 when it has none)."""
        if top_index < len(self.loss_weights):
            return self.loss_weights[top_index]
        return 0.0

    def set_param_propagate_down(self, index, value):
        """Set ``param_propagate_down[index]``, growing the list with True."""
        while len(self.param_propagate_down) <= index:
            self.param_propagate_down.append(True)
        self.param_propagate_down[index] = bool(value)

    def propagates_param(self, index):
        """``param_propagate_down[index]``; out-of-range reads as False."""
        if index < len(self.param_propagate_down):
            return self.param_propagate_down[index]
        return False

    @property
    def name(self):
        """The layer's name from its parameters."""
        return self.layer_param.name

    def describe(self):
        """``"Type layer 'name'"`` for error messages."""
        return layer_label(self)

    # ---------------------------------------------------------- lifecycle
    def setup(self, bottom, top):
        """Caffe's SetUp; do not override (override ``layer_setup``)."""
        self._check_blob_counts(bottom, top)
        source = bottom[0] if bottom else (top[0] if top else None)
        if source is not None:
            self.dtype, self.device, self.xp = source.dtype, source.device, source.xp
        if self.layer_param.blobs and not self.blobs:
            self.blobs = [
                Blob(dtype=self.dtype, device=self.device).from_proto(p)
                for p in self.layer_param.blobs
            ]
        self.layer_setup(bottom, top)
        while len(self.param_propagate_down) < len(self.blobs):
            self.param_propagate_down.append(True)
        self.reshape(bottom, top)
        self._set_loss_weights(top)

    def layer_setup(self, bottom, top):
        """One-time setup: read parameters, create parameter blobs."""

    def reshape(self, bottom, top):
        """Shape the tops (and internal buffers) from the bottoms."""
        raise NotImplementedError(f"{self.describe()} does not implement reshape")

    def forward(self, bottom, top):
        """Reshape, run the engine's forward, return the weighted loss."""
        self.reshape(bottom, top)
        if self.device == "gpu":
            self.forward_gpu(bottom, top)
        elif backend.cpu_engine() == "numba":
            self.forward_numba(bottom, top)
        else:
            self.forward_cpu(bottom, top)
        loss = 0.0
        for i, t in enumerate(top):
            if self.loss(i):
                loss += float(self.xp.vdot(t.flat_data, t.flat_diff))
        return loss

    def backward(self, top, propagate_down, bottom):
        """Run the engine's backward.

        Parameters
        ----------
        top : list of Blob
            Tops, whose diffs hold dE/dtop.
        propagate_down : list of bool
            One flag per bottom: compute that bottom's diff.
        bottom : list of Blob
            Bottoms; their diffs are overwritten.
        """
        if len(propagate_down) != len(bottom):
            raise ValueError(
                f"{self.describe()}: propagate_down has {len(propagate_down)} "
                f"entries for {len(bottom)} bottoms"
            )
        if self.device == "gpu":
            self.backward_gpu(top, propagate_down, bottom)
        elif backend.cpu_engine() == "numba":
            self.backward_numba(top, propagate_down, bottom)
        else:
            self.backward_cpu(top, propagate_down, bottom)

    # ------------------------------------------------------------ engines
    def forward_cpu(self, bottom, top):
        """The reference forward (array-module generic)."""
        raise NotImplementedError(f"{self.describe()} has no forward")

    def backward_cpu(self, top, propagate_down, bottom):
        """The reference backward (array-module generic)."""
        if any(propagate_down):
            raise NotImplementedError(f"{self.describe()} has no backward")

    def forward_numba(self, bottom, top):
        """Numba forward; defaults to the reference."""
        self.forward_cpu(bottom, top)

    def backward_numba(self, top, propagate_down, bottom):
        """Numba backward; defaults to the reference."""
        self.backward_cpu(top, propagate_down, bottom)

    def forward_gpu(self, bottom, top):
        """GPU forward; defaults to the array-generic reference on CuPy."""
        self.forward_cpu(bottom, top)

    def backward_gpu(self, top, propagate_down, bottom):
        """GPU backward; defaults to the array-generic reference on CuPy."""
        self.backward_cpu(top, propagate_down, bottom)

    # ------------------------------------------------------------ helpers
    def make_blob(self, shape=None):
        """A new Blob with this layer's dtype and device."""
        return Blob(shape, dtype=self.dtype, device=self.device)

    def fill_blob(self, blob, filler_param):
        """Fill ``blob.data`` with the filler that ``filler_param`` describes."""
        from netlite import fillers

        fillers.get_filler(filler_param).fill(blob)

    def _check_blob_counts(self, bottom, top):
        nb, nt = len(bottom), len(top)
        what = self.describe()
        rules = (
            (self.exact_num_bottom_blobs >= 0 and nb != self.exact_num_bottom_blobs,
             f"takes exactly {self.exact_num_bottom_blobs} bottom blob(s)"),
            (self.min_bottom_blobs >= 0 and nb < self.min_bottom_blobs,
             f"takes at least {self.min_bottom_blobs} bottom blob(s)"),
            (self.max_bottom_blobs >= 0 and nb > self.max_bottom_blobs,
             f"takes at most {self.max_bottom_blobs} bottom blob(s)"),
        )
        for bad, expected in rules:
            if bad:
                raise LayerSetupError(f"{what} {expected}, got {nb}")
        rules = (
            (self.exact_num_top_blobs >= 0 and nt != self.exact_num_top_blobs,
             f"produces exactly {self.exact_num_top_blobs} top blob(s)"),
            (self.min_top_blobs >= 0 and nt < self.min_top_blobs,
             f"produces at least {self.min_top_blobs} top blob(s)"),
            (self.max_top_blobs >= 0 and nt > self.max_top_blobs,
             f"produces at most {self.max_top_blobs} top blob(s)"),
        )
        for bad, expected in rules:
            if bad:
                raise LayerSetupError(f"{what} {expected}, got {nt}")
        if self.equal_num_bottom_top_blobs and nb != nt:
            raise LayerSetupError(
                f"{what} needs as many tops as bottoms, got {nb} bottom(s) and "
                f"{nt} top(s)"
            )

    def _set_loss_weights(self, top):
        weights = list(self.layer_param.loss_weight)
        if weights and len(weights) != len(top):
            raise LayerSetupError(
                f"{self.describe()}: loss_weight must be unspecified or given "
                f"once per top blob ({len(top)} tops, {len(weights)} weights)"
            )
        self.loss_weights = [0.0] * len(top)
        for i, w in enumerate(weights):
            if w == 0:
                continue
            self.loss_weights[i] = float(w)
            top[i].diff[...] = w


class LossLayer(Layer):
    """Base of loss layers: two bottoms (prediction, target), scalar top.

    A loss layer without an explicit ``loss_weight`` gets weight 1 on its
    first top (Caffe's LossLayer default) and 0 on any further top.  Caffe
    adds a single weight and then aborts when a second top exists (issue
    #2968); netlite fills the rest with 0 instead.
    """

    exact_num_bottom_blobs = 2
    exact_num_top_blobs = 1
    auto_top_blobs = True

    def __init__(self, layer_param=None, **kwargs):
        super().__init__(layer_param, **kwargs)
        self._default_loss_weights = not self.layer_param.loss_weight

    def allow_force_backward(self, bottom_index):
        # Labels never receive a gradient, even with force_backward.
        return bottom_index != 1

    def layer_setup(self, bottom, top):
        if self._default_loss_weights:
            del self.layer_param.loss_weight[:]
            self.layer_param.loss_weight.extend([1.0] + [0.0] * (len(top) - 1))

    def reshape(self, bottom, top):
        if bottom[0].shape[:1] != bottom[1].shape[:1]:
            raise LayerSetupError(
                f"{self.describe()}: the data and label blobs must have the same "
                f"first dimension (batch size); got {bottom[0].shape} and "
                f"{bottom[1].shape}"
            )
        top[0].reshape(())

    def check_no_label_backward(self, propagate_down):
        """Raise when asked to backpropagate into the label bottom."""
        if len(propagate_down) > 1 and propagate_down[1]:
            raise ValueError(
                f"{self.describe()} cannot backpropagate to label inputs"
            )


class NeuronLayer(Layer):
    """Element-wise layers: one bottom, one top of the same shape (in-place OK)."""

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def reshape(self, bottom, top):
        top[0].reshape_like(bottom[0])
