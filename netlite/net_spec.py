"""NetSpec: write a net in Python and get its prototxt (pycaffe's
``caffe.net_spec``).

A layer is a call on the :data:`layers` pseudo-module: its positional
arguments are its bottoms (tops of earlier calls), its keywords its
parameters.  Naming the tops on a :class:`NetSpec` names the blobs and
layers; :meth:`NetSpec.to_proto` returns the ``NetParameter`` of every layer
the named tops need, in order::

    from netlite.net_spec import NetSpec, layers as L, params as P

    n = NetSpec()
    n.data, n.label = L.DummyData(shape=[dict(dim=[64, 1, 28, 28]),
                                         dict(dim=[64])], ntop=2)
    n.conv = L.Convolution(n.data, kernel_size=5, num_output=20,
                           weight_filler=dict(type="xavier"))
    n.pool = L.Pooling(n.conv, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.ip = L.InnerProduct(n.pool, num_output=10)
    n.relu = L.ReLU(n.ip, in_place=True)
    n.loss = L.SoftmaxWithLoss(n.relu, n.label)
    net_param = n.to_proto()        # a netlite_pb2.NetParameter
    text = str(net_param)           # its prototxt
    net = netlite.Net(net_param, netlite.TRAIN)

Keywords are assigned as in pycaffe: one that names a field of the layer
type's own parameter message (``num_output`` of ``InnerProductParameter``)
goes there; any other (``loss_weight``, ``include``, ``param``,
``transform_param``, ``*_param`` ...) goes to the ``LayerParameter``.  A
dict becomes a message, a list (or tuple) a repeated field, and a single
value given for a repeated field a one-element list.  Two keywords are
NetSpec's own: ``ntop`` (how many tops; 0 returns the layer itself, e.g. a
Silence) and ``in_place`` (the tops are the bottoms).  Tops that are not
named get pycaffe's automatic names (``<Type><k>``).

The schema is netlite's (``netlite/proto/netlite.proto``, Caffe's plus
netlite's fields); a keyword it lacks raises a ``TypeError`` that names the
layer type, the keyword and the messages searched.  The layer type itself is
not checked here (a spec may be meant for Caffe); ``netlite.Net`` checks it.
See docs/engine/net.md §10.
"""

import operator
from collections import Counter, OrderedDict

from netlite.proto import netlite_pb2

__all__ = ["NetSpec", "Top", "Function", "layers", "params", "to_proto",
           "param_name_dict"]


def param_name_dict():
    """Layer type -> the ``LayerParameter`` field of its parameters.

    Read from the schema: ``convolution_param`` holds a
    ``ConvolutionParameter``, so type ``"Convolution"`` maps to
    ``"convolution_param"``.
    """
    out = {}
    for field in netlite_pb2.LayerParameter.DESCRIPTOR.fields:
        if field.name.endswith("_param") and field.message_type is not None:
            type_name = field.message_type.name
            if type_name.endswith("Parameter"):
                out[type_name[: -len("Parameter")]] = field.name
    return out


_PARAM_FIELDS = param_name_dict()


def to_proto(*tops):
    """The ``NetParameter`` of every layer needed to compute ``tops``
    (blobs named automatically)."""
    layer_params = OrderedDict()
    autonames = Counter()
    for top in tops:
        top._to_proto(layer_params, {}, autonames)
    net = netlite_pb2.NetParameter()
    net.layer.extend(layer_params.values())
    return net


def assign_proto(proto, name, value, where=None):
    """Set field ``name`` of message ``proto`` from a Python value.

    A dict fills a message field, a list or tuple a repeated field (of
    messages when its items are dicts), a single value for a repeated
    field is a one-element list, anything else is assigned as is.

    Raises
    ------
    TypeError
        When the field does not exist or does not take the value; the
        message names ``where`` (the layer) and the field.
    """
    where = where or type(proto).__name__
    field = proto.DESCRIPTOR.fields_by_name.get(name)
    if field is None:
        raise TypeError(
            f"{where}: {type(proto).__name__} has no field {name!r}"
        )
    repeated = _is_repeated(field)
    try:
        if repeated:
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            target = getattr(proto, name)
            for item in values:
                if isinstance(item, dict):
                    message = target.add()
                    for key, sub in item.items():
                        assign_proto(message, key, sub, f"{where}, {name}")
                else:
                    target.append(item)
        elif isinstance(value, dict):
            message = getattr(proto, name)
            # A message field given as an empty dict is still set.
            message.SetInParent()
            for key, sub in value.items():
                assign_proto(message, key, sub, f"{where}, {name}")
        else:
            setattr(proto, name, value)
    except (AttributeError, ValueError) as exc:
        raise TypeError(
            f"{where}: cannot set {type(proto).__name__}.{name} to {value!r}: "
            f"{exc}"
        ) from None


def _is_repeated(field):
    # protobuf >= 5 has FieldDescriptor.is_repeated; older ones only label.
    flag = getattr(field, "is_repeated", None)
    if flag is not None:
        return flag
    return field.label == field.LABEL_REPEATED


class Top:
    """One top blob of a layer (the ``n``-th of :class:`Function` ``fn``)."""

    def __init__(self, fn, n):
        self.fn = fn
        self.n = n

    def to_proto(self):
        """The ``NetParameter`` of every layer needed to compute this top."""
        return to_proto(self)

    def _to_proto(self, layer_params, names, autonames):
        return self.fn._to_proto(layer_params, names, autonames)

    def __repr__(self):
        return f"<Top {self.n} of {self.fn.type_name}>"


class Function:
    """A layer: its type, its bottoms (:class:`Top` objects) and its
    parameters."""

    def __init__(self, type_name, inputs, params):
        self.type_name = type_name
        for index, bottom in enumerate(inputs):
            if not isinstance(bottom, Top):
                raise TypeError(
                    f"{type_name} input {index} is not a Top (type is "
                    f"{type(bottom)})"
                )
        self.inputs = inputs
        params = dict(params)
        ntop = params.pop("ntop", 1)
        self.in_place = params.pop("in_place", False)
        try:
            self.ntop = operator.index(ntop)
        except TypeError:
            self.ntop = -1
        if self.ntop < 0:
            raise TypeError(f"{type_name}: ntop must be an int >= 0, got {ntop!r}")
        if self.in_place and self.ntop != len(inputs):
            raise TypeError(
                f"{type_name}: in_place=True makes the tops the bottoms, so "
                f"ntop ({self.ntop}) must equal the number of bottoms "
                f"({len(inputs)})"
            )
        self.params = params
        self.tops = tuple(Top(self, n) for n in range(self.ntop))

    def _get_name(self, names, autonames):
        if self not in names and self.ntop > 0:
            names[self] = self._get_top_name(self.tops[0], names, autonames)
        elif self not in names:
            autonames[self.type_name] += 1
            names[self] = self.type_name + str(autonames[self.type_name])
        return names[self]

    def _get_top_name(self, top, names, autonames):
        if top not in names:
            autonames[top.fn.type_name] += 1
            names[top] = top.fn.type_name + str(autonames[top.fn.type_name])
        return names[top]

    def _to_proto(self, layer_params, names, autonames):
        if self in layer_params:
            return
        bottom_names = []
        for bottom in self.inputs:
            bottom._to_proto(layer_params, names, autonames)
            bottom_names.append(layer_params[bottom.fn].top[bottom.n])
        layer = netlite_pb2.LayerParameter(type=self.type_name)
        layer.bottom.extend(bottom_names)
        if self.in_place:
            layer.top.extend(layer.bottom)
        else:
            for top in self.tops:
                layer.top.append(self._get_top_name(top, names, autonames))
        layer.name = self._get_name(names, autonames)
        where = f"{self.type_name} layer '{layer.name}'"
        own = _PARAM_FIELDS.get(self.type_name)
        for key, value in self.params.items():
            # pycaffe's rule: the type's own parameter message first, unless
            # the keyword is a *param field of the LayerParameter itself.
            if not key.endswith("param") and own is not None and (
                    key in getattr(layer, own).DESCRIPTOR.fields_by_name):
                assign_proto(getattr(layer, own), key, value, where)
            elif key in layer.DESCRIPTOR.fields_by_name:
                assign_proto(layer, key, value, where)
            else:
                searched = (f"{own}" if own else f"no {self.type_name}Parameter"
                            " in the schema")
                raise TypeError(
                    f"{where}: unknown parameter {key!r} (looked in "
                    f"{searched} and in LayerParameter)"
                )
        layer_params[self] = layer

    def __repr__(self):
        return f"<{self.type_name} layer with {self.ntop} top(s)>"


class NetSpec:
    """Named tops: assign them as attributes (or items); :meth:`to_proto`
    builds every layer they need, with those names."""

    def __init__(self):
        super().__setattr__("tops", OrderedDict())

    def __setattr__(self, name, value):
        if not isinstance(value, (Top, Function)):
            raise TypeError(
                f"NetSpec.{name} must be a Top (or a layer with ntop=0), got "
                f"{type(value)}"
            )
        self.tops[name] = value

    def __getattr__(self, name):
        tops = self.__dict__.get("tops", {})
        try:
            return tops[name]
        except KeyError:
            raise AttributeError(
                f"NetSpec has no top {name!r}; named so far: {list(tops)}"
            ) from None

    def __setitem__(self, key, value):
        self.__setattr__(key, value)

    def __getitem__(self, item):
        try:
            return self.tops[item]
        except KeyError:
            raise KeyError(
                f"NetSpec has no top {item!r}; named so far: {list(self.tops)}"
            ) from None

    def __contains__(self, item):
        return item in self.tops

    def to_proto(self):
        """A ``NetParameter`` with every layer the named tops need."""
        names = {value: key for key, value in self.tops.items()}
        autonames = Counter()
        layer_params = OrderedDict()
        for top in self.tops.values():
            top._to_proto(layer_params, names, autonames)
        net = netlite_pb2.NetParameter()
        net.layer.extend(layer_params.values())
        return net


class Layers:
    """The ``layers`` pseudo-module: ``layers.Convolution(bottom, ...)``
    specifies a Convolution layer and returns its top (a tuple of tops for
    ``ntop > 1``, the layer itself for ``ntop=0``)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def layer_fn(*args, **kwargs):
            fn = Function(name, args, kwargs)
            if fn.ntop == 0:
                return fn
            if fn.ntop == 1:
                return fn.tops[0]
            return fn.tops

        layer_fn.__name__ = name
        return layer_fn


class _EnumValues:
    """The constants of one ``<Name>Parameter`` message."""

    def __init__(self, message):
        self._message = message

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return getattr(self._message, name)
        except AttributeError:
            known = sorted(
                value.name for enum in self._message.DESCRIPTOR.enum_types
                for value in enum.values
            )
            raise AttributeError(
                f"{self._message.DESCRIPTOR.name} has no constant {name!r}; "
                f"it has {known}"
            ) from None


class Parameters:
    """The ``params`` pseudo-module: ``params.Pooling.MAX`` is the value of
    ``PoolingParameter.MAX``."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        message = getattr(netlite_pb2, name + "Parameter", None)
        if message is None:
            known = sorted(k[: -len("Parameter")] for k in dir(netlite_pb2)
                           if k.endswith("Parameter"))
            raise AttributeError(
                f"netlite's schema has no {name}Parameter; it has {known}"
            )
        return _EnumValues(message)


layers = Layers()
params = Parameters()
