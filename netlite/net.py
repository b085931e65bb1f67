"""Net: a directed acyclic graph of layers built from a NetParameter.

Construction follows Caffe's ``Net::Init`` step by step: filter layers by
the NetState, insert Split layers for fan-out, create and set up each
layer, wire bottoms to tops (in-place when a top repeats the bottom's name
at the same position), register parameters (owners and sharers, with
``lr_mult``/``decay_mult``), then plan which layers need backward.

The Python API follows pycaffe::

    net = netlite.Net("lenet.prototxt", netlite.TEST, weights="lenet.caffemodel")
    out = net.forward(data=images)          # {"prob": array, ...}
    net.blobs["conv1"].data, net.params["conv1"][0].diff
"""

import logging
from collections import OrderedDict

import numpy as np

from netlite import backend, io, registry
from netlite.blob import Blob
from netlite.errors import LayerSetupError, ShapeError, WeightsFileError
from netlite.layer import TEST, TRAIN
from netlite.net_transform import filter_net, insert_splits
from netlite.proto import netlite_pb2

logger = logging.getLogger("netlite")

_NPZ_MAGIC = b"PK\x03\x04"


class Net:
    """A network of layers, built from a prototxt.

    Parameters
    ----------
    model : str, path or NetParameter
        A prototxt path, prototxt text, or a ``NetParameter`` message.
    phase : {netlite.TRAIN, netlite.TEST}
        Overwrites ``state.phase`` (include/exclude rules use it).
    weights : str or path, optional
        A ``.caffemodel`` or ``.npz`` file to copy weights from.
    dtype : {numpy.float32, numpy.float64}
        Dtype of every blob.
    level : int
        NetState level.
    stages : sequence of str
        NetState stages, added to any the prototxt's ``state`` lists.
    device : {"cpu", "gpu"}, optional
        Defaults to the current mode.

    Attributes
    ----------
    blobs : OrderedDict of str -> Blob
        Every named blob, in creation order.
    params : OrderedDict of str -> list of Blob
        The parameter blobs of every layer that has some.
    layers : list of Layer
    layer_names : list of str
    bottom_vecs, top_vecs : list of list of Blob
        The bottoms/tops of layer i.
    inputs, outputs : list of str
        Input-layer tops; blobs no layer consumes (sorted, as Caffe).
    """

    def __init__(self, model, phase=TRAIN, weights=None, dtype=np.float32,
                 level=0, stages=(), device=None):
        param = io.read_net_param(model)
        param = _with_state(param, phase, level, stages)
        self.dtype = np.dtype(dtype)
        self.device = device or backend.default_device()
        self.name = param.name
        self.phase = param.state.phase
        self.debug_info = param.debug_info
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
        self.blob_loss_weights = []
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
                self.blob_loss_weights[blob_id] = weight
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
        self._share_weights()
        logger.info("Network initialization done.")

    def _new_blob(self, name):
        self._blobs.append(Blob(dtype=self.dtype, device=self.device))
        self._blob_names.append(name)
        self.blob_need_backward.append(False)
        self.blob_loss_weights.append(0.0)
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
        """Forward layers ``start``..``end`` (inclusive); return the loss."""
        loss = 0.0
        for i in range(start, end + 1):
            loss += self.layers[i].forward(self.bottom_vecs[i], self.top_vecs[i])
            if self.debug_info:
                self._forward_debug_info(i)
        return loss

    def backward_from_to(self, start, end):
        """Backward layers ``start`` down to ``end`` (inclusive)."""
        for i in range(start, end - 1, -1):
            if self.layer_need_backward[i]:
                self.layers[i].backward(
                    self.top_vecs[i], self.bottom_need_backward[i], self.bottom_vecs[i]
                )
                if self.debug_info:
                    self._backward_debug_info(i)

    def forward(self, blobs=None, start=None, end=None, **inputs):
        """Run the forward pass and return the output blobs' data.

        Parameters
        ----------
        blobs : list of str, optional
            Extra blob names to return besides the outputs.
        start, end : str, optional
            Names of the first and last layer to run.
        **inputs : array_like
            Data for input blobs (reshaped to fit when needed).

        Returns
        -------
        dict of str -> ndarray
            Views of the blobs' data (copy them to keep them).
        """
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
        start_id = 0 if start is None else self.layer_index(start)
        end_id = len(self.layers) - 1 if end is None else self.layer_index(end)
        self.loss = self.forward_from_to(start_id, end_id)
        names = list(self.outputs if end is None else self.top_names(end_id))
        names += [b for b in (blobs or ()) if b not in names]
        return {name: self.blobs[name].data for name in names}

    def backward(self, diffs=None, start=None, end=None, **top_diffs):
        """Run the backward pass and return the input blobs' diffs.

        ``**top_diffs`` sets the diffs of output blobs first (pycaffe's
        ``net.backward(prob=grad)``).
        """
        for name, value in top_diffs.items():
            if name not in self.outputs:
                raise KeyError(
                    f"'{name}' is not an output of this net; outputs: {self.outputs}"
                )
            self.blobs[name].diff = value
        start_id = len(self.layers) - 1 if start is None else self.layer_index(start)
        end_id = 0 if end is None else self.layer_index(end)
        self.backward_from_to(start_id, end_id)
        if self.debug_info:
            self._params_debug_info()
        names = list(self.inputs if end is None else self.bottom_names(end_id))
        names += [b for b in (diffs or ()) if b not in names]
        return {name: self.blobs[name].diff for name in names}

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

    def top_names(self, layer_id):
        """Names of layer ``layer_id``'s named tops."""
        return [self._blob_names[b] for b in self.top_id_vecs[layer_id]
                if self._blob_names[b] is not None]

    def bottom_names(self, layer_id):
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


def _with_state(param, phase, level, stages):
    out = netlite_pb2.NetParameter()
    out.CopyFrom(param)
    if phase not in (TRAIN, TEST):
        raise ValueError(f"phase must be netlite.TRAIN or netlite.TEST, got {phase!r}")
    out.state.phase = phase
    out.state.level = int(level)
    # As Caffe's Net(file, phase, level, stages): the stages are added to
    # those the prototxt's own state lists (phase and level are replaced).
    if isinstance(stages, str):
        stages = [stages]
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
