"""Exceptions raised by netlite.

Every error a user can provoke with a bad prototxt, a wrong shape, a bad
label or a non-finite number is one of these, and its message names the
layer, the blob and what was expected.  They subclass the built-in type a
Python user would expect (``ValueError``, ``KeyError`` ...) so generic
handlers keep working.
"""


class NetliteError(Exception):
    """Base class of every netlite-specific error."""


class PrototxtError(NetliteError, ValueError):
    """A prototxt (or binary model file) could not be read.

    The message carries protobuf's ``line:column`` for text-format errors.
    """


class LayerSetupError(NetliteError, ValueError):
    """A layer's parameters or blob counts/shapes are invalid."""


class ShapeError(LayerSetupError):
    """Two blobs that must agree in shape (or count) do not."""


class LabelError(NetliteError, ValueError):
    """A label is out of range or not an integer value."""


class NonFiniteError(NetliteError, FloatingPointError):
    """A NaN or infinity reached a place where it would make a wrong number."""


class UnknownLayerTypeError(NetliteError, KeyError):
    """No layer is registered under the requested type string."""

    def __str__(self):
        # KeyError quotes its argument; show the message as written.
        return str(self.args[0]) if self.args else ""


class WeightsFileError(NetliteError, ValueError):
    """A weights file is not a .caffemodel/.npz or does not fit the net."""


class NetliteWarning(UserWarning):
    """A call that works but very likely does not do what was meant (a
    backward pass that can compute nothing, say); the message says why and
    what to change."""


def layer_label(layer):
    """Return ``"Type layer 'name'"`` for messages (works on any Layer)."""
    param = getattr(layer, "layer_param", None)
    ltype = getattr(param, "type", "") or type(layer).__name__
    name = getattr(param, "name", "") or "<unnamed>"
    return f"{ltype} layer '{name}'"
