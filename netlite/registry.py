"""The layer registry: Caffe type strings -> Layer classes.

Layers register themselves with the :func:`register_layer` decorator at
import time (``netlite.layers`` imports every layer module).  As in Caffe, a
duplicate type is an error, and asking for an unknown type raises an error
that lists every known type.
"""

from netlite.errors import UnknownLayerTypeError

_REGISTRY = {}


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

    def decorator(cls):
        if type_name in _REGISTRY:
            other = _REGISTRY[type_name]
            raise KeyError(
                f"layer type {type_name!r} is already registered by "
                f"{other.__module__}.{other.__qualname__}"
            )
        cls.type = type_name
        _REGISTRY[type_name] = cls
        return cls

    return decorator


def _ensure_builtin_layers():
    # Importing netlite.layers registers the zoo; deferred so that the
    # engine modules can be imported on their own.
    import netlite.layers  # noqa: F401


def layer_class(type_name):
    """Return the class registered under ``type_name``."""
    _ensure_builtin_layers()
    try:
        return _REGISTRY[type_name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownLayerTypeError(
            f"unknown layer type {type_name!r}; known types: {known}"
        ) from None


def layer_types():
    """Sorted list of every registered type string."""
    _ensure_builtin_layers()
    return sorted(_REGISTRY)


def create_layer(layer_param, **kwargs):
    """Instantiate the layer that ``layer_param.type`` names.

    Parameters
    ----------
    layer_param : LayerParameter or str
        A ``LayerParameter`` message or its prototxt text.
    **kwargs
        Passed to the layer constructor (``dtype``, ``device``).
    """
    from netlite import io

    layer_param = io.parse_layer_param(layer_param)
    return layer_class(layer_param.type)(layer_param, **kwargs)
