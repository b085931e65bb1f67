"""Registries: Caffe type strings -> classes, for layers and solvers.

A :class:`Registry` maps the ``type`` strings of one kind of object to the
classes that implement them.  As in Caffe, a duplicate type is an error,
and asking for an unknown type raises an error that lists every known type.

The layer registry lives here: layers register themselves with the
:func:`register_layer` decorator at import time (``import netlite`` imports
``netlite.layers``, which imports every layer module).  The solver registry
is :data:`netlite.solvers.registry.SOLVERS`.
"""

from netlite import io
from netlite.errors import UnknownLayerTypeError


class Registry:
    """Caffe ``type`` strings -> classes, for one kind of object.

    Parameters
    ----------
    kind : str
        What is registered (``"layer"``, ``"solver"``); named in messages.
    unknown_error : type
        The exception class :meth:`lookup` raises for an unknown type.
    """

    def __init__(self, kind, unknown_error):
        self.kind = kind
        self.unknown_error = unknown_error
        self._classes = {}

    def register(self, type_name):
        """Class decorator: register ``cls`` under ``type_name``.

        Sets ``cls.type`` to ``type_name``.

        Raises
        ------
        KeyError
            When ``type_name`` is already registered (the message names the
            class that holds it).
        """

        def decorator(cls):
            other = self._classes.get(type_name)
            if other is not None:
                raise KeyError(
                    f"{self.kind} type {type_name!r} is already registered by "
                    f"{other.__module__}.{other.__qualname__}"
                )
            cls.type = type_name
            self._classes[type_name] = cls
            return cls

        return decorator

    def lookup(self, type_name):
        """Return the class registered under ``type_name``.

        Raises
        ------
        Exception
            ``unknown_error`` for an unknown type; the message lists the
            known ones.
        """
        try:
            return self._classes[type_name]
        except KeyError:
            known = ", ".join(sorted(self._classes))
            raise self.unknown_error(
                f"unknown {self.kind} type {type_name!r}; known types: {known}"
            ) from None

    def types(self):
        """Sorted list of every registered type string."""
        return sorted(self._classes)


#: The layer types (filled by ``netlite.layers`` on ``import netlite``).
LAYERS = Registry("layer", UnknownLayerTypeError)


def register_layer(type_name):
    """Class decorator: register a :class:`~netlite.layer.Layer` subclass.

    Parameters
    ----------
    type_name : str
        The Caffe ``type`` string, e.g. ``"SoftmaxWithLoss"``.

    Raises
    ------
    KeyError
        When ``type_name`` is already registered.
    """
    return LAYERS.register(type_name)


def layer_class(type_name):
    """Return the class registered under ``type_name``.

    Raises
    ------
    UnknownLayerTypeError
        For an unknown type (the message lists the known ones).
    """
    return LAYERS.lookup(type_name)


def layer_types():
    """Sorted list of every registered type string."""
    return LAYERS.types()


def create_layer(layer_param, **kwargs):
    """Instantiate the layer that ``layer_param.type`` names.

    Parameters
    ----------
    layer_param : LayerParameter or str
        A ``LayerParameter`` message or its prototxt text.
    **kwargs
        Passed to the layer constructor (``dtype``, ``device``).
    """
    layer_param = io.parse_layer_param(layer_param)
    return layer_class(layer_param.type)(layer_param, **kwargs)
