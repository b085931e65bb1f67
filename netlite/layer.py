"""The Layer base class: Caffe's layer contract in Python.

A layer is driven through four public methods that subclasses do not
override:

``setup(bottom, top)``
    check blob counts -> :meth:`Layer.layer_setup` (one-time: read
    parameters, create and fill parameter blobs) -> :meth:`Layer.reshape`
    (shape tops and buffers) -> set loss weights (fill each weighted top's
    diff with its weight).
``forward(bottom, top)``
    :meth:`Layer.reshape`, then the forward of the engine chosen now
    (:meth:`Layer.select_engine`), recorded in :attr:`Layer.engine`; returns
    the weighted loss ``sum_t dot(top_t.data, top_t.diff)`` over weighted
    tops.
``backward(top, propagate_down, bottom)``
    the backward of the engine that ran the last forward, whatever the
    global setting is now: a fast forward may keep its intermediates in its
    own layout, and only its own backward reads them.

Subclasses implement ``forward_cpu`` / ``backward_cpu`` (the NumPy
reference, written with the blobs' array module ``self.xp`` so it also runs
on CuPy arrays) and optionally the hooks ``forward_numba`` /
``backward_numba`` and ``forward_gpu`` / ``backward_gpu``, which hand over
to an :class:`EngineAdapter` in the sibling module ``<layer>_numba.py`` /
``<layer>_cupy.py`` (see :meth:`Layer.adapter`).  The conventions:

* parameter diffs **accumulate** (``+=``); the solver clears them;
* bottom diffs are **overwritten**; fan-out is summed by Split layers;
* a loss weight lives in the top diff; backward reads it from there;
* honour ``propagate_down[i]`` and ``self.param_propagate_down[j]``.
"""

import functools
import importlib

import numpy as np

from netlite import backend, io
from netlite.blob import Blob
from netlite.errors import LayerSetupError, ShapeError, layer_label
from netlite.proto import netlite_pb2

TRAIN = netlite_pb2.TRAIN
TEST = netlite_pb2.TEST

#: Engine name -> the (forward, backward) hook pair that runs it.
ENGINE_HOOKS = {
    "numpy": ("forward_cpu", "backward_cpu"),
    "numba": ("forward_numba", "backward_numba"),
    "cupy": ("forward_gpu", "backward_gpu"),
}

#: Engine name -> suffix of its adapter class (``SoftmaxWithLoss`` + suffix).
_ADAPTER_SUFFIX = {"numba": "Numba", "cupy": "CuPy"}


def cached_reshape(reshape):
    """Decorator for ``Layer.reshape``: skip it when nothing it reads changed.

    Caffe reshapes every layer before every forward.  For a layer whose
    reshape does real work (geometry tables, internal layers) that is
    wasted when the bottoms and tops are the same blobs, with the same
    shapes and buffers (:attr:`Blob.layout_id`), as at the end of its last
    reshape.  Decorating the layer's ``reshape`` opts in: the call returns
    at once in that case.  The record is made inside the decorated method,
    so every caller (``forward``, ``Net.reshape``, a user) keeps it true,
    and only after the body succeeded, so a reshape that raised runs (and
    raises) again.  Use it only for a reshape that depends on nothing but
    the blobs' shapes and identities (and on what ``layer_setup`` made:
    :meth:`Layer.setup` clears the record).
    """

    @functools.wraps(reshape)
    def wrapper(self, bottom, top):
        # Layout ids are unique across blobs, so equal id tuples mean the
        # same blobs in the same state.
        if self.__dict__.get("_reshaped_for") == _layout_ids(bottom, top):
            return
        self._reshaped_for = None
        reshape(self, bottom, top)
        self._reshaped_for = _layout_ids(bottom, top)

    return wrapper


def _layout_ids(bottom, top):
    return (*[b.layout_id for b in bottom], None, *[t.layout_id for t in top])


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
    engine : str or None
        The engine that ran the last forward (``"numpy"``, ``"numba"`` or
        ``"cupy"``); the backward runs on it.  None before any forward.
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
        self.engine = None
        self._adapters = {}
        #: The fused head (netlite.fusion) whose chain holds this layer, if any.
        self.fused_head = None

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
        # A new setup starts afresh: no cached reshape, no engine state.
        self._reshaped_for = None
        self._adapters = {}
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

    def select_engine(self):
        """The engine a forward would run on now.

        ``"cupy"`` when the layer's blobs live on the GPU, else the global
        CPU engine (:func:`netlite.cpu_engine`: ``"numpy"`` or ``"numba"``).
        """
        return "cupy" if self.device == "gpu" else backend.cpu_engine()

    def forward(self, bottom, top):
        """Reshape, run the engine's forward, return the weighted loss.

        The engine is chosen here (:meth:`select_engine`) and recorded in
        :attr:`engine`, which the next :meth:`backward` follows.
        """
        self.reshape(bottom, top)
        self.engine = self.select_engine()
        getattr(self, ENGINE_HOOKS[self.engine][0])(bottom, top)
        loss = 0.0
        for i, t in enumerate(top):
            if self.loss(i):
                loss += float(self.xp.vdot(t.flat_data, t.flat_diff))
        return loss

    def backward(self, top, propagate_down, bottom):
        """Run the backward of the engine that ran the last forward.

        Without an earlier forward (a layer whose backward needs none of
        its intermediates) the engine is chosen as :meth:`forward` would.

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
        head = self.fused_head
        if head is not None and head.ran_fused:
            # The last forward ran inside a fused chain (netlite.fusion),
            # which kept no state of this layer's own: rerun the chain's
            # forwards one by one first.
            head.unfuse()
        engine = self.engine or self.select_engine()
        getattr(self, ENGINE_HOOKS[engine][1])(top, propagate_down, bottom)

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

    def adapter(self, engine):
        """This layer's :class:`EngineAdapter` for ``"numba"`` or ``"cupy"``.

        Built on first use and kept: it owns that engine's state (kernels,
        workspaces, caches).  By convention the hook ``forward_numba`` of a
        layer defined in ``netlite.layers.<m>`` is served by the class
        ``<Type>Numba`` of ``netlite.layers.<m>_numba`` (``<Type>CuPy`` of
        ``<m>_cupy`` for ``forward_gpu``), ``<Type>`` being the registered
        type string of the class that defines the hook.  Importing the
        module here keeps Numba and CuPy out of ``import netlite``.
        """
        adapter = self._adapters.get(engine)
        if adapter is None:
            hook = ENGINE_HOOKS[engine][0]
            owner = next(c for c in type(self).__mro__ if hook in vars(c))
            module = importlib.import_module(f"{owner.__module__}_{engine}")
            adapter = getattr(module, owner.type + _ADAPTER_SUFFIX[engine])(self)
            self._adapters[engine] = adapter
        return adapter

    # ------------------------------------------------------------ helpers
    def canonical_axis(self, blob, axis, field="axis"):
        """``blob.canonical_axis_index(axis)``, raising a LayerSetupError that
        names this layer and the parameter ``field`` when out of range."""
        try:
            return blob.canonical_axis_index(axis)
        except IndexError as exc:
            raise LayerSetupError(f"{self.describe()}: {field}: {exc}") from None

    def check_param_blobs(self, shapes, names, context=""):
        """Check parameter blobs that were given (a model file, an earlier
        setup) against the shapes this setup expects.

        Parameters
        ----------
        shapes : list of tuple of int
            The expected shape of each blob, in order.
        names : list of str
            What each blob is (``"weight"``, ``"bias"``), for messages.
        context : str, optional
            Why those shapes are expected, appended to a shape message.

        Raises
        ------
        ShapeError
            When the number of blobs differs, or a blob's shape is neither
            the expected one nor its legacy 4-D form ``(1, ..., 1, *shape)``
            (which Caffe's old BlobProto fields give; it is reshaped).
        """
        if len(self.blobs) != len(shapes):
            raise ShapeError(
                f"{self.describe()}: expected {len(shapes)} parameter blob(s) "
                f"({', '.join(names)}), got {len(self.blobs)}"
            )
        for j, (blob, shape, name) in enumerate(zip(self.blobs, shapes, names)):
            shape = tuple(shape)
            pad = 4 - len(shape)
            legacy = (blob.num_axes == 4 and pad >= 0 and blob.shape[pad:] == shape
                      and all(d == 1 for d in blob.shape[:pad]))
            if blob.shape != shape and not legacy:
                raise ShapeError(
                    f"{self.describe()}: {name} blob {j} has shape {blob.shape}: "
                    f"incorrect {name} shape, expected {shape}{context}"
                )
            blob.reshape(shape)

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


class EngineAdapter:
    """Base of the engine adapters that sit beside a layer.

    An adapter is the one piece of code that touches a layer's blobs on a
    fast engine: :meth:`forward` / :meth:`backward` take the same arguments
    as the layer's hooks, read the layer's geometry and parameters (its
    public attributes), call the pure kernels of their module, and keep
    that engine's state (workspaces, caches, strategy constants) on
    themselves.  :meth:`Layer.adapter` builds one per layer and engine.

    Parameters
    ----------
    layer : Layer
        The layer served.
    """

    def __init__(self, layer):
        self.layer = layer

    def forward(self, bottom, top):
        """The engine's forward."""
        raise NotImplementedError

    def backward(self, top, propagate_down, bottom):
        """The engine's backward."""
        raise NotImplementedError


class LabelledLayer(Layer):
    """Base of layers with two bottoms (data, label); the label gets no gradient.

    ``allow_force_backward(1)`` is False, so ``force_backward`` never sends
    a gradient to the labels, and :meth:`check_no_label_backward` raises
    when a backward is asked for them.  The base of :class:`LossLayer` and
    of the margin layers (``LargeMarginInnerProduct``, ``LabelSpecificAdd``,
    ...), which declare their own top counts.
    """

    exact_num_bottom_blobs = 2

    def allow_force_backward(self, bottom_index):
        # Labels never receive a gradient, even with force_backward.
        return bottom_index != 1

    def check_no_label_backward(self, propagate_down):
        """Raise when asked to backpropagate into the label bottom."""
        if len(propagate_down) > 1 and propagate_down[1]:
            raise ValueError(
                f"{self.describe()} cannot backpropagate to label inputs"
            )


class LossLayer(LabelledLayer):
    """Base of loss layers: two bottoms (prediction, target), scalar top.

    A loss layer without an explicit ``loss_weight`` gets weight 1 on its
    first top (Caffe's LossLayer default) and 0 on any further top.  Caffe
    adds a single weight and then aborts when a second top exists (issue
    #2968); netlite fills the rest with 0 instead.
    """

    exact_num_top_blobs = 1
    auto_top_blobs = True

    def __init__(self, layer_param=None, **kwargs):
        super().__init__(layer_param, **kwargs)
        self._default_loss_weights = not self.layer_param.loss_weight

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


class NeuronLayer(Layer):
    """Element-wise layers: one bottom, one top of the same shape (in-place OK)."""

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def reshape(self, bottom, top):
        top[0].reshape_like(bottom[0])
