"""Net: a directed acyclic graph of layers built from a NetParameter.

Construction follows Caffe's ``Net::Init`` step by step: filter layers by
the NetState, insert Split layers for fan-out, create and set up each
layer, wire bottoms to tops (in-place when a top repeats the bottom's name
at the same position), register parameters (owners and sharers, with
``lr_mult``/``decay_mult``), then plan which layers need backward.

The Python API follows pycaffe (its call forms, methods and attributes;
docs/engine/net.md §6 has the mapping)::

    net = netlite.Net("lenet.prototxt", netlite.TEST, weights="lenet.caffemodel")
    net = netlite.Net("lenet.prototxt", "lenet.caffemodel", netlite.TEST)
    out = net.forward(data=images)          # {"prob": array, ...}
    net.blobs["conv1"].data, net.params["conv1"][0].diff
    probs = net.forward_all(data=many_images)["prob"]
"""

import difflib
import logging
import numbers
import os
import warnings
from collections import OrderedDict

import numpy as np

from netlite import backend, fusion, io, registry
from netlite.blob import Blob
from netlite.errors import (
    LayerSetupError,
    NetliteWarning,
    ShapeError,
    WeightsFileError,
)
from netlite.layer import TEST, TRAIN
from netlite.net_transform import filter_net, insert_splits
from netlite.proto import netlite_pb2

logger = logging.getLogger("netlite")

_NPZ_MAGIC = b"PK\x03\x04"


_FORMS = """netlite.Net takes pycaffe's forms:
  Net(model, phase)
  Net(model, phase, level=0, stages=None, weights=None)
  Net(model, weights, phase)              (pycaffe's legacy form)
  Net(network_file=model, phase=phase, weights=None)
plus netlite's keywords dtype=numpy.float32 and device=None. model is a
prototxt path, prototxt text or a NetParameter; phase is netlite.TRAIN (the
default) or netlite.TEST; weights is a .caffemodel or .npz path."""

_KEYWORDS = ("network_file", "model", "phase", "level", "stages", "weights",
             "dtype", "device")


class Net:
    """A network of layers, built from a prototxt.

    Every call form of pycaffe's ``caffe.Net`` works::

        Net(model, phase)
        Net(model, phase, level=0, stages=None, weights=None)
        Net(model, weights, phase)          # pycaffe's legacy form
        Net(network_file=model, phase=phase, weights=None)

    A string (or path) right after the model is the weights file of the
    legacy form, so the phase must follow it; otherwise the positional
    arguments after the model are pycaffe's ``phase, level, stages,
    weights``.  Anything else raises a ``TypeError`` that lists the forms.

    Parameters
    ----------
    model : str, path or NetParameter
        A prototxt path, prototxt text, or a ``NetParameter`` message
        (keyword ``network_file=``, pycaffe's name, or ``model=``).
    phase : {netlite.TRAIN, netlite.TEST}
        Overwrites ``state.phase`` (include/exclude rules use it); TRAIN
        when not given (pycaffe requires it).
    level : int
        NetState level (default 0).
    stages : str or sequence of str, optional
        NetState stages, added to any the prototxt's ``state`` lists.
    weights : str or path, optional
        A ``.caffemodel`` or ``.npz`` file to copy weights from.
    dtype : {numpy.float32, numpy.float64}
        Dtype of every blob (keyword only).
    device : {"cpu", "gpu"}, optional
        Defaults to the current mode (keyword only).

    Attributes
    ----------
    blobs : OrderedDict of str -> Blob
        Every named blob, in creation order.
    params : OrderedDict of str -> list of Blob
        The parameter blobs of every layer that has some.
    layers : list of Layer
    layer_names : list of str
    layer_dict : OrderedDict of str -> Layer
    top_names, bottom_names : OrderedDict of str -> list of str
        Layer name -> the names of its tops / bottoms (pycaffe's).
    blob_loss_weights : OrderedDict of str -> float
        The loss weight of every named blob (0 for most).
    bottom_vecs, top_vecs : list of list of Blob
        The bottoms/tops of layer i.
    inputs, outputs : list of str
        Input-layer tops; blobs no layer consumes (sorted, as Caffe).
    """

    def __init__(self, *args, network_file=None, model=None, phase=None,
                 level=None, stages=None, weights=None, dtype=np.float32,
                 device=None, **unknown):
        if unknown:
            name = next(iter(unknown))
            close = difflib.get_close_matches(name, _KEYWORDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(
                f"Net() got an unexpected keyword argument {name!r}{hint}.\n"
                + _FORMS
            )
        model, phase, level, stages, weights = _net_arguments(args, {
            "network_file": network_file, "model": model, "phase": phase,
            "level": level, "stages": stages, "weights": weights,
        })
        param = io.read_net_param(model)
        param = _with_state(param, phase, level, stages)
        self.dtype = np.dtype(dtype)
        self.device = device or backend.default_device()
        self.name = param.name
        self.phase = param.state.phase
        self.debug_info = param.debug_info
        self._warned_no_backward = False
        self._build(param)
        if weights is not None:
            self.copy_from(weights)

    # ------------------------------------------------------------ building
    def _build(self, param):
        param = insert_splits(filter_net(param))
        self.net_param = param
        self.layers, self.layer_names = [], []
        self.bottom_vecs, self.top_vecs = [], []
        self.bottom_id_vecs, self.top_id_vecs = [], []
        self.bottom_need_backward, self.layer_need_backward = [], []
        self._blobs, self._blob_names = [], []  # includes anonymous tops
        self.blob_need_backward = []
        self._blob_loss_weights = []  # per blob id, anonymous tops included
        self._input_ids = []
        # parameters
        self._params, self.param_owners, self.param_display_names = [], [], []
        self._param_layer_indices, self.param_id_vecs = [], []
        self.learnable_params, self.learnable_param_ids = [], []
        self.params_lr, self.params_weight_decay = [], []
        self._has_params_lr, self._has_params_decay = [], []
        self._param_names_index = {}

        name_to_id, available = {}, set()
        for layer_id, layer_param in enumerate(param.layer):
            layer_param = _with_phase(layer_param, self.phase)
            if layer_param.propagate_down and len(layer_param.propagate_down) != len(
                layer_param.bottom
            ):
                raise LayerSetupError(
                    f"layer '{layer_param.name}': propagate_down must be unspecified "
                    f"or given once per bottom ({len(layer_param.bottom)})"
                )
            layer = registry.layer_class(layer_param.type)(
                layer_param, dtype=self.dtype, device=self.device
            )
            self.layers.append(layer)
            self.layer_names.append(layer_param.name)
            logger.info("Creating Layer %s", layer_param.name)
            need_backward = False
            bottoms, bottom_ids, bottom_nb = [], [], []
            for j, name in enumerate(layer_param.bottom):
                if name not in available:
                    raise LayerSetupError(
                        f"unknown bottom blob '{name}' (layer '{layer_param.name}', "
                        f"bottom index {j}): it is not produced by an earlier "
                        "layer, or it was already consumed"
                    )
                blob_id = name_to_id[name]
                logger.info("%s <- %s", layer_param.name, name)
                bottoms.append(self._blobs[blob_id])
                bottom_ids.append(blob_id)
                nb = self.blob_need_backward[blob_id]
                if layer_param.propagate_down:
                    nb = layer_param.propagate_down[j]
                bottom_nb.append(bool(nb))
                need_backward |= self.blob_need_backward[blob_id]
                available.discard(name)
            tops, top_ids = [], []
            for j, name in enumerate(layer_param.top):
                if j < len(layer_param.bottom) and layer_param.bottom[j] == name:
                    logger.info("%s -> %s (in-place)", layer_param.name, name)
                    blob_id = bottom_ids[j]
                elif name in name_to_id:
                    raise LayerSetupError(
                        f"top blob '{name}' of layer '{layer_param.name}' is "
                        "produced by multiple sources"
                    )
                else:
                    logger.info("%s -> %s", layer_param.name, name)
                    blob_id = self._new_blob(name)
                    name_to_id[name] = blob_id
                tops.append(self._blobs[blob_id])
                top_ids.append(blob_id)
                available.add(name)
                if layer_param.type == "Input":
                    self._input_ids.append(blob_id)
            if layer.auto_top_blobs:
                needed = max(layer.min_top_blobs, layer.exact_num_top_blobs)
                while len(tops) < needed:
                    blob_id = self._new_blob(None)
                    tops.append(self._blobs[blob_id])
                    top_ids.append(blob_id)
            self.bottom_vecs.append(bottoms)
            self.bottom_id_vecs.append(bottom_ids)
            self.bottom_need_backward.append(bottom_nb)
            self.top_vecs.append(tops)
            self.top_id_vecs.append(top_ids)

            layer.setup(bottoms, tops)
            for j, blob_id in enumerate(top_ids):
                weight = layer.loss(j)
                # An in-place layer overwrites its producer's weight (Caffe's
                # blob_loss_weights_ holds the last writer's).
                self._blob_loss_weights[blob_id] = weight
                logger.info("Top shape: %s", self._blobs[blob_id].shape_string())
                if weight:
                    logger.info("    with loss weight %g", weight)

            n_params = len(layer.blobs)
            if len(layer_param.param) > n_params:
                raise LayerSetupError(
                    f"layer '{layer_param.name}' ({layer_param.type}) lists "
                    f"{len(layer_param.param)} param specs but has only {n_params} "
                    "parameter blob(s)"
                )
            for param_id in range(n_params):
                spec = _param_spec(layer_param, param_id)
                param_need_backward = spec.lr_mult != 0
                need_backward |= param_need_backward
                layer.set_param_propagate_down(param_id, param_need_backward)
            self.param_id_vecs.append([])
            for param_id in range(n_params):
                self._append_param(layer_id, param_id)
            self.layer_need_backward.append(need_backward)
            if need_backward:
                for blob_id in top_ids:
                    self.blob_need_backward[blob_id] = True

        self._plan_backward(param)
        self.outputs = sorted(available)
        self._name_to_id = name_to_id
        self.blobs = OrderedDict(
            (n, b) for n, b in zip(self._blob_names, self._blobs) if n is not None
        )
        self.inputs = [self._blob_names[i] for i in self._input_ids]
        self.params = OrderedDict(
            (name, layer.blobs)
            for name, layer in zip(self.layer_names, self.layers)
            if layer.blobs
        )
        self._layer_index = {n: i for i, n in enumerate(self.layer_names)}
        # pycaffe's name-keyed views (the layers and blobs never change after
        # construction, so they are built once).
        self.layer_dict = OrderedDict(zip(self.layer_names, self.layers))
        self.top_names = OrderedDict(
            (name, self._top_names_of(i)) for i, name in enumerate(self.layer_names)
        )
        self.bottom_names = OrderedDict(
            (name, self._bottom_names_of(i))
            for i, name in enumerate(self.layer_names)
        )
        self.blob_loss_weights = OrderedDict(
            (n, w) for n, w in zip(self._blob_names, self._blob_loss_weights)
            if n is not None
        )
        self._share_weights()
        # Chains a fast engine runs as one computation (netlite.fusion).
        self._head_of = {j: head for head in fusion.plan(self)
                         for j in range(head.first, head.last + 1)}
        logger.info("Network initialization done.")

    def _new_blob(self, name):
        self._blobs.append(Blob(dtype=self.dtype, device=self.device))
        self._blob_names.append(name)
        self.blob_need_backward.append(False)
        self._blob_loss_weights.append(0.0)
        return len(self._blobs) - 1

    def _append_param(self, layer_id, param_id):
        layer = self.layers[layer_id]
        layer_param = layer.layer_param
        spec = _param_spec(layer_param, param_id)
        name = spec.name
        self.param_display_names.append(name or str(param_id))
        net_param_id = len(self._params)
        self._params.append(layer.blobs[param_id])
        self.param_id_vecs[layer_id].append(net_param_id)
        self._param_layer_indices.append((layer_id, param_id))
        if not name or name not in self._param_names_index:
            self.param_owners.append(-1)
            if name:
                self._param_names_index[name] = net_param_id
            self.learnable_param_ids.append(len(self.learnable_params))
            self.learnable_params.append(self._params[net_param_id])
            self._has_params_lr.append(spec.HasField("lr_mult"))
            self._has_params_decay.append(spec.HasField("decay_mult"))
            self.params_lr.append(float(spec.lr_mult))
            self.params_weight_decay.append(float(spec.decay_mult))
            return
        owner_id = self._param_names_index[name]
        self.param_owners.append(owner_id)
        owner_layer, owner_index = self._param_layer_indices[owner_id]
        owner = self.layers[owner_layer].blobs[owner_index]
        mine = layer.blobs[param_id]
        what = (
            f"cannot share param '{name}' owned by layer "
            f"'{self.layer_names[owner_layer]}' with layer '{layer_param.name}'"
        )
        if spec.share_mode == netlite_pb2.ParamSpec.PERMISSIVE:
            if owner.count != mine.count:
                raise ShapeError(
                    f"{what}: count mismatch (owner {owner.shape_string()}, sharer "
                    f"{mine.shape_string()})"
                )
        elif owner.shape != mine.shape:
            raise ShapeError(
                f"{what}: shape mismatch (owner {owner.shape_string()}, sharer "
                f"{mine.shape_string()}); use share_mode: PERMISSIVE to share by "
                "count"
            )
        lid = self.learnable_param_ids[owner_id]
        self.learnable_param_ids.append(lid)
        for has_field, has_list, values, field in (
            (spec.HasField("lr_mult"), self._has_params_lr, self.params_lr,
             "lr_mult"),
            (spec.HasField("decay_mult"), self._has_params_decay,
             self.params_weight_decay, "decay_mult"),
        ):
            if not has_field:
                continue
            value = float(getattr(spec, field))
            if has_list[lid]:
                if value != values[lid]:
                    raise LayerSetupError(
                        f"shared param '{name}' has mismatched {field}"
                    )
            else:
                has_list[lid] = True
                values[lid] = value

    def _plan_backward(self, param):
        under_loss, skip = set(), set()
        for layer_id in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[layer_id]
            contributes, skip_down = False, True
            for j, blob_id in enumerate(self.top_id_vecs[layer_id]):
                name = self._blob_key(blob_id)
                if layer.loss(j) or name in under_loss:
                    contributes = True
                if name not in skip:
                    skip_down = False
                if contributes and not skip_down:
                    break
            nb = self.bottom_need_backward[layer_id]
            if self.layer_need_backward[layer_id] and skip_down:
                self.layer_need_backward[layer_id] = False
                nb[:] = [False] * len(nb)
            if not contributes:
                self.layer_need_backward[layer_id] = False
            for j, blob_id in enumerate(self.bottom_id_vecs[layer_id]):
                name = self._blob_key(blob_id)
                if contributes:
                    under_loss.add(name)
                else:
                    nb[j] = False
                if not nb[j]:
                    skip.add(name)
            logger.info(
                "%s %s backward computation.", self.layer_names[layer_id],
                "needs" if self.layer_need_backward[layer_id] else "does not need",
            )
        if param.force_backward:
            for layer_id, layer in enumerate(self.layers):
                self.layer_need_backward[layer_id] = True
                nb = self.bottom_need_backward[layer_id]
                for j, blob_id in enumerate(self.bottom_id_vecs[layer_id]):
                    nb[j] = nb[j] or layer.allow_force_backward(j)
                    self.blob_need_backward[blob_id] |= nb[j]
                for param_id in range(len(layer.blobs)):
                    layer.set_param_propagate_down(param_id, True)

    def _blob_key(self, blob_id):
        # Anonymous blobs get a unique key so they never collide by name.
        name = self._blob_names[blob_id]
        return name if name is not None else ("(automatic)", blob_id)

    def _share_weights(self):
        for i, owner in enumerate(self.param_owners):
            if owner < 0:
                continue
            self._params[i].share_data(self._params[owner])
            self._params[i].share_diff(self._params[owner])

    # ------------------------------------------------------------- running
    def forward_from_to(self, start, end):
        """Forward layers ``start``..``end`` (inclusive); return the loss.

        A fused chain (:mod:`netlite.fusion`) that lies wholly in the range
        runs as one computation when it can; its blobs still read as the
        layers would have written them."""
        loss = 0.0
        i = start
        while i <= end:
            head = self._head_of.get(i)
            if (head is not None and head.first == i and head.last <= end
                    and head.fuses_now()):
                loss += head.forward(head.bottom_vec, head.top_vec)
                if self.debug_info:
                    logger.info("    [Forward] Fused %s", head.describe_chain())
                    for j in range(head.first, head.last + 1):
                        self._forward_debug_info(j)
                i = head.last + 1
                continue
            if head is not None and head.ran_fused:
                head.unfuse()  # a layer of a fused chain runs on its own
            loss += self.layers[i].forward(self.bottom_vecs[i], self.top_vecs[i])
            if self.debug_info:
                self._forward_debug_info(i)
            i += 1
        return loss

    def fused_heads(self):
        """The layer chains this net runs fused when it can
        (:mod:`netlite.fusion`), in layer order."""
        return list(dict.fromkeys(self._head_of.values()))

    def backward_from_to(self, start, end):
        """Backward layers ``start`` down to ``end`` (inclusive).

        A chain whose last forward ran fused runs its fused backward when
        it lies wholly in the range; otherwise its layers first rerun their
        own forwards (:meth:`netlite.fusion` heads' ``unfuse``)."""
        for head in self.fused_heads():
            overlaps = head.first <= start and head.last >= end
            inside = head.first >= end and head.last <= start
            if head.ran_fused and overlaps and not inside:
                head.unfuse()
        i = start
        while i >= end:
            head = self._head_of.get(i)
            if head is not None and head.last == i and head.ran_fused:
                if any(self.layer_need_backward[head.first:head.last + 1]):
                    head.backward(head.top_vec, head.propagate_down, head.bottom_vec)
                    if self.debug_info:
                        logger.info("    [Backward] Fused %s", head.describe_chain())
                        for j in range(head.last, head.first - 1, -1):
                            self._backward_debug_info(j)
                i = head.first - 1
                continue
            if self.layer_need_backward[i]:
                self.layers[i].backward(
                    self.top_vecs[i], self.bottom_need_backward[i], self.bottom_vecs[i]
                )
                if self.debug_info:
                    self._backward_debug_info(i)
            i -= 1

    def forward(self, blobs=None, start=None, end=None, **inputs):
        """Run the forward pass and return the output blobs' data.

        pycaffe's ``net.forward``.

        Parameters
        ----------
        blobs : list of str, optional
            Extra blob names to return besides the outputs.
        start, end : str, optional
            Names of the first and last layer to run (inclusive).
        **inputs : array_like
            Data for input blobs (reshaped to fit when needed; pycaffe
            needs the batch size to match).

        Returns
        -------
        dict of str -> ndarray
            The outputs (or, with ``end``, that layer's tops) and ``blobs``:
            views of the blobs' data (copy them to keep them).
        """
        start_id, end_id = self._span(start, end, forward=True)
        for name, value in inputs.items():
            if name not in self.inputs:
                raise KeyError(
                    f"'{name}' is not an input of this net; inputs: {self.inputs}"
                )
            blob = self.blobs[name]
            value = blob.xp.asarray(value)
            if value.shape != blob.shape:
                blob.reshape(value.shape)
            blob.data[...] = value
        self.loss = self.forward_from_to(start_id, end_id)
        names = self._result_names(
            self.outputs if end is None else self._top_names_of(end_id), blobs
        )
        return {name: self.blobs[name].data for name in names}

    def backward(self, diffs=None, start=None, end=None, **top_diffs):
        """Run the backward pass and return the input blobs' diffs.

        pycaffe's ``net.backward``.  Only layers that need backward run
        (see docs/engine/net.md §5): on a net without a loss and without
        ``force_backward: true`` none does, every diff stays zero, and the
        first such call warns (:class:`netlite.NetliteWarning`).

        Parameters
        ----------
        diffs : list of str, optional
            Extra blob names whose diffs to return besides the inputs'.
        start, end : str, optional
            Names of the first (topmost) and last layer to run (inclusive).
        **top_diffs : array_like
            Diffs for output blobs, set before the pass (pycaffe's
            ``net.backward(prob=grad)``).

        Returns
        -------
        dict of str -> ndarray
            The inputs' diffs (or, with ``end``, that layer's bottoms') and
            ``diffs``: views of the blobs' diffs.
        """
        start_id, end_id = self._span(start, end, forward=False)
        for name, value in top_diffs.items():
            if name not in self.outputs:
                raise KeyError(
                    f"'{name}' is not an output of this net; outputs: {self.outputs}"
                )
            self.blobs[name].diff = value
        self._warn_if_backward_is_empty(start_id, end_id, start, end)
        self.backward_from_to(start_id, end_id)
        if self.debug_info:
            self._params_debug_info()
        names = self._result_names(
            self.inputs if end is None else self._bottom_names_of(end_id), diffs
        )
        return {name: self.blobs[name].diff for name in names}

    def forward_all(self, blobs=None, **inputs):
        """Forward inputs of any length, batch by batch (pycaffe's
        ``net.forward_all``).

        The inputs are cut into batches of the net's batch size (the first
        axis of the input blobs); a last, partial batch is padded with zeros
        and the padding's results are dropped.

        Parameters
        ----------
        blobs : list of str, optional
            Extra blob names to return besides the outputs.
        **inputs : array_like
            Data for input blobs, all with the same length along axis 0.
            Without any, one forward pass runs (on the data layers).

        Returns
        -------
        dict of str -> ndarray
            Copies.  A blob whose first axis is the batch gets the items of
            every batch concatenated (one row per input item); any other
            blob (a loss, an accuracy) gets one value per batch, stacked,
            and the last batch's value includes the padding.
        """
        if not inputs:
            out = self.forward(blobs=blobs)
            return {name: backend.to_numpy(v).copy() for name, v in out.items()}
        for name in inputs:
            if name not in self.inputs:
                raise KeyError(
                    f"'{name}' is not an input of this net; inputs: {self.inputs}"
                )
        names = self._result_names(self.outputs, blobs)
        collected = {name: [] for name in names}
        batches, count, batch_size = self._batches(inputs, "forward_all")
        for batch in batches:
            out = self.forward(blobs=blobs, **batch)
            for name in names:
                collected[name].append(backend.to_numpy(out[name]).copy())
        return _join_batches(collected, count, batch_size)

    def forward_backward_all(self, blobs=None, diffs=None, **arrays):
        """Forward and backward, batch by batch (pycaffe's
        ``net.forward_backward_all``).

        Parameters
        ----------
        blobs : list of str, optional
            Extra blobs whose data to return besides the outputs.
        diffs : list of str, optional
            Extra blobs whose diffs to return besides the inputs'.
        **arrays : array_like
            Input data (keys in :attr:`inputs`) and output diffs (keys in
            :attr:`outputs`), all with the same length along axis 0;
            batched and padded as in :meth:`forward_all`.

        Returns
        -------
        outs, in_diffs : dict of str -> ndarray
            The outputs (and ``blobs``) and the inputs' diffs (and
            ``diffs``), joined over batches as in :meth:`forward_all`.
        """
        unknown = [k for k in arrays if k not in self.inputs + self.outputs]
        if unknown:
            raise KeyError(
                f"{unknown[0]!r} is neither an input nor an output of this net; "
                f"inputs: {self.inputs}, outputs: {self.outputs}"
            )
        out_names = self._result_names(self.outputs, blobs)
        diff_names = self._result_names(self.inputs, diffs)
        if not arrays:
            self.forward(blobs=blobs)
            self.backward(diffs=diffs)
            return (
                {n: backend.to_numpy(self.blobs[n].data).copy() for n in out_names},
                {n: backend.to_numpy(self.blobs[n].diff).copy() for n in diff_names},
            )
        outs = {name: [] for name in out_names}
        in_diffs = {name: [] for name in diff_names}
        batches, count, batch_size = self._batches(arrays, "forward_backward_all")
        for batch in batches:
            forward = {k: v for k, v in batch.items() if k in self.inputs}
            backward = {k: v for k, v in batch.items() if k in self.outputs}
            got = self.forward(blobs=blobs, **forward)
            for name in out_names:
                outs[name].append(backend.to_numpy(got[name]).copy())
            got = self.backward(diffs=diffs, **backward)
            for name in diff_names:
                in_diffs[name].append(backend.to_numpy(got[name]).copy())
        return (_join_batches(outs, count, batch_size),
                _join_batches(in_diffs, count, batch_size))

    def _span(self, start, end, forward):
        """Layer indices of a pass named by pycaffe's ``start``/``end``."""
        last = len(self.layers) - 1
        if forward:
            first = 0 if start is None else self.layer_index(start)
            stop = last if end is None else self.layer_index(end)
            if start is not None and end is not None and first > stop:
                raise ValueError(
                    f"forward runs upwards: start layer '{start}' (index {first}) "
                    f"comes after end layer '{end}' (index {stop})"
                )
        else:
            first = last if start is None else self.layer_index(start)
            stop = 0 if end is None else self.layer_index(end)
            if start is not None and end is not None and first < stop:
                raise ValueError(
                    f"backward runs downwards: start layer '{start}' (index "
                    f"{first}) comes before end layer '{end}' (index {stop})"
                )
        return first, stop

    def _result_names(self, names, extra):
        if isinstance(extra, str):
            extra = [extra]
        names = list(names)
        for name in extra or ():
            if name not in self.blobs:
                raise KeyError(f"no blob named '{name}' in net '{self.name}'")
            if name not in names:
                names.append(name)
        return names

    def _batches(self, arrays, what):
        """Cut ``arrays`` into the net's batches; pad the last with zeros.

        Returns the batches (a generator), the number of items and the
        batch size.
        """
        arrays = {k: backend.to_numpy(v) for k, v in arrays.items()}
        lengths = {k: (len(v) if v.ndim else None) for k, v in arrays.items()}
        if None in lengths.values() or len(set(lengths.values())) != 1:
            raise ValueError(
                f"{what} needs arrays of one length along axis 0, got "
                + ", ".join(f"{k}: shape {arrays[k].shape}" for k in arrays)
            )
        count = next(iter(lengths.values()))
        if count == 0:
            raise ValueError(f"{what} needs at least one item, got empty arrays")
        sizes = {}
        for name in arrays:
            shape = self.blobs[name].shape
            if not shape:
                raise ValueError(
                    f"{what}: blob '{name}' has no batch axis (shape {shape})"
                )
            sizes[name] = shape[0]
        if len(set(sizes.values())) != 1:
            raise ValueError(
                f"{what}: the blobs disagree on the batch size: "
                + ", ".join(f"{k}: {v}" for k, v in sizes.items())
            )
        batch_size = next(iter(sizes.values()))
        if batch_size < 1:
            raise ValueError(f"{what}: the net's batch size is {batch_size}")

        def generate():
            for i in range(0, count, batch_size):
                batch = {}
                for name, value in arrays.items():
                    part = value[i:i + batch_size]
                    if len(part) < batch_size:
                        pad = np.zeros((batch_size - len(part),) + part.shape[1:],
                                       dtype=part.dtype)
                        part = np.concatenate([part, pad])
                    batch[name] = part
                yield batch

        return generate(), count, batch_size

    def _warn_if_backward_is_empty(self, start_id, end_id, start, end):
        """Warn (once per net) when no layer of a backward pass needs
        backward, so the pass leaves every diff as it was."""
        if self._warned_no_backward or any(
                self.layer_need_backward[end_id:start_id + 1]):
            return
        self._warned_no_backward = True
        if start is not None or end is not None:
            where = (f"no layer from '{self.layer_names[start_id]}' down to "
                     f"'{self.layer_names[end_id]}' needs backward")
        elif any(self._blob_loss_weights):
            where = ("no layer needs backward: no parameter under the loss "
                     "has lr_mult != 0 and no input below it needs a gradient")
        else:
            where = "no layer needs backward: the net has no loss"
        warnings.warn(
            f"net '{self.name}': backward() computes nothing, {where}, and the "
            "prototxt does not say `force_backward: true`. Every diff it "
            "returns stays zero (as in Caffe). Add `force_backward: true` to "
            "the prototxt (top level) to get the gradients of the inputs and "
            "parameters for the top diffs you set.",
            NetliteWarning, stacklevel=3,
        )

    def forward_backward(self):
        """Forward then backward; return the loss (Caffe's ForwardBackward)."""
        loss = self.forward_from_to(0, len(self.layers) - 1)
        self.backward_from_to(len(self.layers) - 1, 0)
        if self.debug_info:
            self._params_debug_info()
        self.loss = loss
        return loss

    def reshape(self):
        """Reshape every layer (after an input blob changed shape)."""
        for layer, bottom, top in zip(self.layers, self.bottom_vecs, self.top_vecs):
            layer.reshape(bottom, top)

    def clear_param_diffs(self):
        """Zero the diffs of all learnable parameters."""
        for blob in self.learnable_params:
            blob.diff[...] = 0

    def update(self):
        """``data -= diff`` for every learnable (owner) parameter."""
        for blob in self.learnable_params:
            blob.update()

    def set_iteration(self, iteration):
        """Tell every layer the solver's iteration (schedule-driven layers)."""
        for layer in self.layers:
            layer.iteration = int(iteration)

    # ------------------------------------------------------------ lookups
    def layer_index(self, name):
        """Index of the layer called ``name``."""
        try:
            return self._layer_index[name]
        except KeyError:
            raise KeyError(f"no layer named '{name}' in net '{self.name}'") from None

    def layer_by_name(self, name):
        """The layer called ``name``."""
        return self.layers[self.layer_index(name)]

    def has_layer(self, name):
        """True when a layer is called ``name``."""
        return name in self._layer_index

    def has_blob(self, name):
        """True when a blob is called ``name``."""
        return name in self.blobs

    def _top_names_of(self, layer_id):
        """Names of layer ``layer_id``'s named tops."""
        return [self._blob_names[b] for b in self.top_id_vecs[layer_id]
                if self._blob_names[b] is not None]

    def _bottom_names_of(self, layer_id):
        """Names of layer ``layer_id``'s bottoms."""
        return [self._blob_names[b] for b in self.bottom_id_vecs[layer_id]]

    @property
    def all_params(self):
        """Every parameter blob, sharers included (Caffe's ``params()``)."""
        return list(self._params)

    # ------------------------------------------------------------- weights
    def copy_from(self, path):
        """Copy weights from a ``.caffemodel`` or netlite ``.npz`` file.

        Layers are matched by name; source layers absent from this net are
        ignored.  Every matched layer must have the same number of blobs of
        the same shapes (Caffe's legacy 4-D shapes are accepted).
        """
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == _NPZ_MAGIC:
            self._copy_weights(io.load_npz_weights(path), str(path))
        else:
            self.copy_trained_layers_from(io.read_binary_net_param(path), str(path))

    def copy_trained_layers_from(self, net_param, source="NetParameter"):
        """Copy blobs from a ``NetParameter`` holding weights, by layer name."""
        weights = {}
        for layer in net_param.layer:
            if layer.blobs:
                weights[layer.name] = list(layer.blobs)
        self._copy_weights(weights, source)

    def _copy_weights(self, weights, source):
        for name, blobs in weights.items():
            if name not in self._layer_index:
                logger.info("Ignoring source layer %s", name)
                continue
            target = self.layers[self._layer_index[name]]
            if len(blobs) != len(target.blobs):
                raise WeightsFileError(
                    f"{source}: layer '{name}' has {len(blobs)} blob(s) in the file "
                    f"but {len(target.blobs)} in the net"
                )
            for j, (src, dst) in enumerate(zip(blobs, target.blobs)):
                if isinstance(src, np.ndarray):
                    shape = src.shape
                else:
                    shape = Blob.proto_shape(src)
                if not dst.shape_equals_proto_shape(shape):
                    raise WeightsFileError(
                        f"{source}: cannot copy blob {j} of layer '{name}' "
                        f"({target.layer_param.type}): the file has shape "
                        f"{tuple(shape)}, the net expects {dst.shape}"
                    )
                if isinstance(src, np.ndarray):
                    dst.data[...] = dst.xp.asarray(src.reshape(dst.shape))
                else:
                    dst.from_proto(src, reshape=False)

    def to_proto(self, write_diff=False):
        """A ``NetParameter`` with every layer's parameters and blobs."""
        out = netlite_pb2.NetParameter(name=self.name)
        for layer in self.layers:
            lp = out.layer.add()
            lp.CopyFrom(layer.layer_param)
            del lp.blobs[:]
            for blob in layer.blobs:
                lp.blobs.add().CopyFrom(blob.to_proto(write_diff))
        return out

    def save(self, path, write_diff=False):
        """Write weights atomically: ``.npz`` by extension, else ``.caffemodel``."""
        path = str(path)
        if path.endswith(".npz"):
            io.save_npz_weights(
                path,
                {
                    name: [backend.to_numpy(b.data) for b in blobs]
                    for name, blobs in self.params.items()
                },
            )
        else:
            payload = self.to_proto(write_diff).SerializeToString()
            io.atomic_write_bytes(path, payload)

    def share_with(self, other):
        """pycaffe's name for :meth:`share_trained_layers_with`."""
        self.share_trained_layers_with(other)

    def share_trained_layers_with(self, other):
        """Alias the data of every same-named layer's params to ``other``'s."""
        for name, layer in zip(other.layer_names, other.layers):
            if name not in self._layer_index or not layer.blobs:
                continue
            mine = self.layers[self._layer_index[name]]
            if len(mine.blobs) != len(layer.blobs):
                raise ShapeError(
                    f"layer '{name}': {len(mine.blobs)} blob(s) here, "
                    f"{len(layer.blobs)} in the source net"
                )
            for j, (dst, src) in enumerate(zip(mine.blobs, layer.blobs)):
                if dst.shape != src.shape:
                    raise ShapeError(
                        f"layer '{name}' blob {j}: shape {dst.shape} here, "
                        f"{src.shape} in the source net"
                    )
                dst.share_data(src)

    # ---------------------------------------------------------- debugging
    def _forward_debug_info(self, layer_id):
        name = self.layer_names[layer_id]
        for blob_id in self.top_id_vecs[layer_id]:
            blob = self._blobs[blob_id]
            logger.info(
                "    [Forward] Layer %s, top blob %s data: %g", name,
                self._blob_names[blob_id], blob.asum_data() / max(blob.count, 1),
            )
        for j, blob in enumerate(self.layers[layer_id].blobs):
            logger.info(
                "    [Forward] Layer %s, param blob %d data: %g", name, j,
                blob.asum_data() / max(blob.count, 1),
            )

    def _backward_debug_info(self, layer_id):
        name = self.layer_names[layer_id]
        layer = self.layers[layer_id]
        for j, blob_id in enumerate(self.bottom_id_vecs[layer_id]):
            if not self.bottom_need_backward[layer_id][j]:
                continue
            blob = self._blobs[blob_id]
            logger.info(
                "    [Backward] Layer %s, bottom blob %s diff: %g", name,
                self._blob_names[blob_id], blob.asum_diff() / max(blob.count, 1),
            )
        for j, blob in enumerate(layer.blobs):
            if layer.propagates_param(j):
                logger.info(
                    "    [Backward] Layer %s, param blob %d diff: %g", name, j,
                    blob.asum_diff() / max(blob.count, 1),
                )

    def _params_debug_info(self):
        asum_data = sum(b.asum_data() for b in self.learnable_params)
        asum_diff = sum(b.asum_diff() for b in self.learnable_params)
        sumsq_data = sum(b.sumsq_data() for b in self.learnable_params)
        sumsq_diff = sum(b.sumsq_diff() for b in self.learnable_params)
        logger.info(
            "    [Backward] All net params (data, diff): L1 norm = (%g, %g); "
            "L2 norm = (%g, %g)", asum_data, asum_diff, np.sqrt(sumsq_data),
            np.sqrt(sumsq_diff),
        )


def _is_path(value):
    return isinstance(value, (str, os.PathLike))


def _net_arguments(args, given):
    """``(model, phase, level, stages, weights)`` from ``Net``'s arguments.

    ``given`` holds the keyword values (None: not given).  The rules are
    pycaffe's: a string right after the model is the weights file of the
    legacy ``Net(model, weights, phase)``; otherwise the positional
    arguments after the model are ``phase, level, stages, weights``.
    """
    given = dict(given)
    models = [(k, given.pop(k)) for k in ("network_file", "model")]
    models = [(k, v) for k, v in models if v is not None]
    if len(models) + bool(args) > 1:
        how = [f"{k}=" for k, _ in models] + (["positionally"] if args else [])
        raise TypeError(f"Net() got the model twice ({' and '.join(how)}).\n"
                        + _FORMS)
    if args:
        model, rest = args[0], list(args[1:])
    elif models:
        model, rest = models[0][1], []
    else:
        raise TypeError("Net() needs a model.\n" + _FORMS)

    if rest and _is_path(rest[0]):
        # pycaffe's legacy Net(model, weights, phase).
        if len(rest) > 2 or given["weights"] is not None:
            raise TypeError(
                f"Net(model, {rest[0]!r}, ...): a path right after the model "
                "is the weights file of pycaffe's legacy form Net(model, "
                "weights, phase), which takes nothing else.\n" + _FORMS
            )
        given["weights"] = rest[0]
        if len(rest) == 2:
            if given["phase"] is not None:
                raise TypeError("Net() got the phase twice (positional and "
                                "phase=).\n" + _FORMS)
            given["phase"] = rest[1]
        elif given["phase"] is None:
            raise TypeError(
                f"Net(model, {rest[0]!r}): a path right after the model is "
                "the weights file of pycaffe's legacy form Net(model, weights, "
                "phase), and the phase must follow it.\n" + _FORMS
            )
    else:
        names = ("phase", "level", "stages", "weights")
        if len(rest) > len(names):
            raise TypeError(
                f"Net() takes at most {len(names) + 1} positional arguments "
                f"(model, phase, level, stages, weights), got {len(args)}.\n"
                + _FORMS
            )
        for name, value in zip(names, rest):
            if given[name] is not None:
                raise TypeError(f"Net() got {name} twice (positional and "
                                f"{name}=).\n" + _FORMS)
            given[name] = value

    phase, level = given["phase"], given["level"]
    stages, weights = given["stages"], given["weights"]
    if phase is None:
        phase = TRAIN
    if level is None:
        level = 0
    elif isinstance(level, bool) or not isinstance(level, numbers.Integral):
        raise TypeError(
            f"Net(): level must be an int, got {level!r} (the positional "
            "arguments after the model are phase, level, stages, weights; "
            "pass a weights file as weights=...).\n" + _FORMS
        )
    if stages is None:
        stages = ()
    elif isinstance(stages, str):
        stages = (stages,)
    else:
        try:
            stages = tuple(stages)
        except TypeError:
            stages = (stages,)
        if not all(isinstance(stage, str) for stage in stages):
            raise TypeError(
                f"Net(): stages must be a string or a list of strings, got "
                f"{given['stages']!r}.\n" + _FORMS
            )
    if weights is not None and not _is_path(weights):
        raise TypeError(
            f"Net(): weights must be a file path, got {weights!r}.\n" + _FORMS
        )
    return model, phase, int(level), stages, weights


def _join_batches(collected, count, batch_size):
    """Join per-batch results: concatenate batch-major arrays (dropping the
    padding), stack anything else (one entry per batch)."""
    out = {}
    for name, parts in collected.items():
        if all(p.ndim and p.shape[0] == batch_size for p in parts):
            out[name] = np.concatenate(parts)[:count]
        else:
            out[name] = np.stack(parts)
    return out


def _with_state(param, phase, level, stages):
    out = netlite_pb2.NetParameter()
    out.CopyFrom(param)
    if isinstance(phase, bool) or phase not in (TRAIN, TEST):
        raise ValueError(
            f"phase must be netlite.TRAIN or netlite.TEST, got {phase!r}.\n"
            + _FORMS
        )
    out.state.phase = phase
    out.state.level = int(level)
    # As Caffe's Net(file, phase, level, stages): the stages are added to
    # those the prototxt's own state lists (phase and level are replaced).
    out.state.stage.extend(s for s in stages if s not in out.state.stage)
    return out


def _with_phase(layer_param, phase):
    if layer_param.HasField("phase"):
        return layer_param
    out = netlite_pb2.LayerParameter()
    out.CopyFrom(layer_param)
    out.phase = phase
    return out


def _param_spec(layer_param, param_id):
    if param_id < len(layer_param.param):
        return layer_param.param[param_id]
    return netlite_pb2.ParamSpec()
