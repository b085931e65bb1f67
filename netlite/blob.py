"""Blob: the N-D array pair (data, diff) that layers read and write.

A Blob follows Caffe's semantics exactly:

* ``data`` and ``diff`` are two equally sized buffers; ``diff`` holds the
  gradient of the objective with respect to ``data``.
* :meth:`Blob.reshape` reallocates (zero-filled) only when the new count
  exceeds the capacity; capacity never shrinks, and contents stay in place
  when it does not grow.  A 0-axis blob is a scalar with count 1.
* :meth:`Blob.share_data` / :meth:`Blob.share_diff` alias another blob's
  buffer (both see every write); a reallocation breaks the alias.
* :meth:`Blob.update` computes ``data -= diff`` (the solver's only write).
* :meth:`Blob.defer` hands ``data`` and/or ``diff`` to a producer that
  computes them on first access, and :meth:`Blob.release` drops buffers
  that nothing asked for (a fused layer chain's intermediate blobs: see
  docs/engine/fusion.md).

In Python, ``blob.data`` and ``blob.diff`` are views of the first ``count``
elements of the flat buffers, reshaped.  Assigning to them
(``blob.data = x``) *copies* ``x`` into the buffer, so aliases survive;
``blob.data[...] = x`` does the same.
"""

import itertools

import numpy as np

from netlite import backend

#: Caffe's limit on the number of axes.
MAX_BLOB_AXES = 32

#: Source of :attr:`Blob.layout_id` values, unique across all blobs.
_LAYOUT_IDS = itertools.count()

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _as_shape(shape):
    """Normalise ints / sequences / BlobShape messages to a tuple of ints."""
    if shape is None:
        return None
    if hasattr(shape, "dim"):  # a BlobShape protobuf message
        shape = list(shape.dim)
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    shape = tuple(int(d) for d in shape)
    if len(shape) > MAX_BLOB_AXES:
        raise ValueError(
            f"blob shape {shape} has {len(shape)} axes; at most {MAX_BLOB_AXES}"
        )
    for d in shape:
        if d < 0:
            raise ValueError(f"blob shape {shape} has a negative dimension")
    return shape


class Blob:
    """A pair of equally shaped arrays, ``data`` and ``diff``, on one device.

    Parameters
    ----------
    shape : tuple of int, int, BlobShape or None
        Initial shape.  ``None`` gives Caffe's default blob (no axes, count
        0, no memory); ``()`` gives a scalar (count 1).
    dtype : {numpy.float32, numpy.float64}
        Element type of both buffers.
    device : {"cpu", "gpu"} or None
        Where the buffers live; ``None`` uses the current mode
        (:func:`netlite.set_mode_cpu` / :func:`netlite.set_mode_gpu`).

    Examples
    --------
    >>> b = Blob((2, 3))
    >>> b.data = np.arange(6).reshape(2, 3)
    >>> b.diff[...] = 1
    >>> b.update()
    >>> b.data[0]
    array([-1.,  0.,  1.], dtype=float32)
    """

    def __init__(self, shape=None, dtype=np.float32, device=None):
        dtype = np.dtype(dtype)
        if dtype not in _FLOAT_DTYPES:
            raise TypeError(f"Blob dtype must be float32 or float64, got {dtype}")
        self._dtype = dtype
        self._device = device or backend.default_device()
        self._xp = backend.get_array_module(self._device)
        self._shape = None
        self._count = 0
        self._capacity = 0
        self._data = self._xp.zeros(0, dtype=dtype)
        self._diff = self._xp.zeros(0, dtype=dtype)
        self._layout_id = next(_LAYOUT_IDS)
        # "data" / "diff" -> the callable that fills it on first access.
        self._pending = {}
        if shape is not None:
            self.reshape(shape)

    # ------------------------------------------------------------------ shape
    def reshape(self, *shape):
        """Change the shape; reallocate (zero-filled) only when growing.

        Accepts ``reshape((2, 3))``, ``reshape(2, 3)``, ``reshape([])`` or a
        ``BlobShape`` message.
        """
        if len(shape) == 1 and not isinstance(shape[0], (int, np.integer)):
            shape = shape[0]
        shape = _as_shape(shape)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if count > np.iinfo(np.int32).max:
            raise ValueError(f"blob shape {shape} has {count} elements (> INT_MAX)")
        if shape != self._shape:
            self._layout_id = next(_LAYOUT_IDS)
        self._shape = shape
        self._count = count
        if count > self._capacity:
            self._capacity = count
            self._data = self._xp.zeros(count, dtype=self._dtype)
            self._diff = self._xp.zeros(count, dtype=self._dtype)
            self._layout_id = next(_LAYOUT_IDS)
            self._pending.clear()  # new buffers: nothing left to produce
        return self

    # --------------------------------------------------------- deferral
    def defer(self, data=None, diff=None):
        """Let a producer compute ``data`` and/or ``diff`` on first access.

        The first read or write of that side (``data``, ``flat_data``,
        :meth:`share_data` by another blob, ...) calls ``producer(array)``
        with the side's view in the blob's current shape (allocating a
        released buffer first); the producer writes the values.  A fused
        layer chain defers the intermediate blobs it never materialises;
        deferring again replaces an earlier producer not yet called.

        Parameters
        ----------
        data, diff : callable or None
            The producers; None leaves that side as it is.
        """
        if data is not None:
            self._pending["data"] = data
        if diff is not None:
            self._pending["diff"] = diff

    def release(self):
        """Drop both buffers and any producer; the capacity stays, and the
        next access allocates zero-filled ones.
        Frees the memory of an intermediate blob that a fused chain
        computes without it."""
        self._data = self._xp.zeros(0, dtype=self._dtype)
        self._diff = self._xp.zeros(0, dtype=self._dtype)
        self._pending.clear()
        self._layout_id = next(_LAYOUT_IDS)

    @property
    def nbytes(self):
        """Bytes of the buffers held now (0 for released ones)."""
        return int(self._data.nbytes + self._diff.nbytes)

    @property
    def deferred(self):
        """The sides (``"data"``, ``"diff"``) whose producer has not run."""
        return tuple(sorted(self._pending))

    def _buffer(self, side):
        buffer = self._data if side == "data" else self._diff
        if buffer.size >= self._capacity and not self._pending:
            return buffer  # the common case
        if buffer.size < self._capacity:  # released
            buffer = self._xp.zeros(self._capacity, dtype=self._dtype)
            if side == "data":
                self._data = buffer
            else:
                self._diff = buffer
        producer = self._pending.pop(side, None)
        if producer is not None:
            producer(self._view(buffer))
        return buffer

    def reshape_like(self, other):
        """Reshape to ``other.shape``."""
        return self.reshape(other.shape)

    @property
    def shape(self):
        """Tuple of dimensions (``()`` for a scalar or a default blob)."""
        return self._shape if self._shape is not None else ()

    @property
    def layout_id(self):
        """A number that changes whenever the shape or a buffer changes.

        :meth:`reshape` to another shape, a reallocation, :meth:`share_data`
        and :meth:`share_diff` each give the blob a new id, unique across
        all blobs; writing values does not.  Layers compare ids to skip a
        reshape that would change nothing (:func:`netlite.layer.cached_reshape`).
        """
        return self._layout_id

    @property
    def num_axes(self):
        """Number of axes."""
        return len(self.shape)

    @property
    def count(self):
        """Number of elements (product of the dimensions; 1 for a scalar)."""
        return self._count

    @property
    def capacity(self):
        """Allocated elements; never shrinks."""
        return self._capacity

    def count_range(self, start, end=None):
        """Product of the dimensions in ``[start, end)`` (Caffe's count(s, e)).

        ``end`` defaults to ``num_axes``.  Both bounds must lie in
        ``[0, num_axes]`` and ``start <= end``; an empty range gives 1.
        """
        n = self.num_axes
        end = n if end is None else end
        if not (0 <= start <= end <= n):
            raise IndexError(
                f"count_range({start}, {end}) out of range for shape {self.shape}"
            )
        return int(np.prod(self.shape[start:end], dtype=np.int64))

    def canonical_axis_index(self, axis):
        """Map ``axis`` in ``[-num_axes, num_axes)`` to ``[0, num_axes)``."""
        n = self.num_axes
        axis = int(axis)
        if not -n <= axis < n:
            raise IndexError(
                f"axis {axis} out of range for a {n}-axis blob with shape "
                f"{self.shape}"
            )
        return axis + n if axis < 0 else axis

    def legacy_shape(self, index):
        """Caffe's LegacyShape: axes beyond ``num_axes`` read as 1."""
        if self.num_axes > 4:
            raise ValueError(
                f"legacy accessors need at most 4 axes; shape is {self.shape}"
            )
        if not -4 <= index < 4:
            raise IndexError(f"legacy axis {index} out of range [-4, 4)")
        if index >= self.num_axes or index < -self.num_axes:
            return 1
        return self.shape[index]

    num = property(lambda self: self.legacy_shape(0), doc="Legacy axis 0.")
    channels = property(lambda self: self.legacy_shape(1), doc="Legacy axis 1.")
    height = property(lambda self: self.legacy_shape(2), doc="Legacy axis 2.")
    width = property(lambda self: self.legacy_shape(3), doc="Legacy axis 3.")

    def shape_string(self):
        """``"2 3 4 (24)"`` as in Caffe's logs."""
        return " ".join(str(d) for d in self.shape) + f" ({self.count})"

    # ------------------------------------------------------------- buffers
    @property
    def dtype(self):
        """Element dtype."""
        return self._dtype

    @property
    def device(self):
        """``"cpu"`` or ``"gpu"``."""
        return self._device

    @property
    def xp(self):
        """The array module of the buffers (numpy or cupy)."""
        return self._xp

    @property
    def data(self):
        """The data array (a view; writes go to the blob)."""
        return self._view(self._buffer("data"))

    @data.setter
    def data(self, value):
        self._assign(self.data, value, "data")

    @property
    def diff(self):
        """The diff array (a view; writes go to the blob)."""
        return self._view(self._buffer("diff"))

    def _view(self, buffer):
        if self._shape is None:
            # Caffe's default blob (never reshaped) has no axes and count 0;
            # a 0-axis view would claim one element, so give an empty 1-D one.
            return buffer[:0]
        return buffer[: self._count].reshape(self._shape)

    @diff.setter
    def diff(self, value):
        self._assign(self.diff, value, "diff")

    def _assign(self, view, value, what):
        value = self._xp.asarray(value)
        if value.shape != view.shape and value.size != 1:
            raise ValueError(
                f"cannot assign an array of shape {value.shape} to blob {what} "
                f"of shape {self.shape}; reshape the blob first"
            )
        view[...] = value

    @property
    def flat_data(self):
        """1-D view of the data (length ``count``)."""
        return self._buffer("data")[: self._count]

    @property
    def flat_diff(self):
        """1-D view of the diff (length ``count``)."""
        return self._buffer("diff")[: self._count]

    def share_data(self, other):
        """Alias ``other``'s data buffer (counts must match)."""
        self._check_share(other, "share_data")
        self._data = other._buffer("data")
        self._pending.pop("data", None)
        self._layout_id = next(_LAYOUT_IDS)
        self._capacity = min(self._data.size, self._diff.size)

    def share_diff(self, other):
        """Alias ``other``'s diff buffer (counts must match)."""
        self._check_share(other, "share_diff")
        self._diff = other._buffer("diff")
        self._pending.pop("diff", None)
        self._layout_id = next(_LAYOUT_IDS)
        self._capacity = min(self._data.size, self._diff.size)

    def _check_share(self, other, what):
        if other.count != self.count:
            raise ValueError(
                f"{what}: counts differ ({self.shape_string()} vs "
                f"{other.shape_string()})"
            )
        if other.dtype != self.dtype or other.device != self.device:
            raise TypeError(
                f"{what}: blobs differ in dtype/device ({self.dtype}/"
                f"{self.device} vs {other.dtype}/{other.device})"
            )

    def shares_data_with(self, other):
        """True when both blobs use the same data buffer."""
        return self._data is other._data

    def shares_diff_with(self, other):
        """True when both blobs use the same diff buffer."""
        return self._diff is other._diff

    # --------------------------------------------------------------- maths
    def update(self):
        """``data -= diff`` (how the solver applies a step)."""
        d = self.flat_data
        d -= self.flat_diff

    def asum_data(self):
        """L1 norm of the data."""
        return float(self._xp.abs(self.flat_data).sum())

    def asum_diff(self):
        """L1 norm of the diff."""
        return float(self._xp.abs(self.flat_diff).sum())

    def sumsq_data(self):
        """Squared L2 norm of the data."""
        d = self.flat_data
        return float(d @ d)

    def sumsq_diff(self):
        """Squared L2 norm of the diff."""
        d = self.flat_diff
        return float(d @ d)

    def scale_data(self, factor):
        """``data *= factor``."""
        d = self.flat_data
        d *= self._dtype.type(factor)

    def scale_diff(self, factor):
        """``diff *= factor``."""
        d = self.flat_diff
        d *= self._dtype.type(factor)

    # ----------------------------------------------------------- copying
    def copy_from(self, source, copy_diff=False, reshape=False):
        """Copy ``source``'s data (or diff) into this blob.

        Raises
        ------
        ValueError
            When the shapes differ and ``reshape`` is False.
        """
        if source.shape != self.shape:
            if not reshape:
                raise ValueError(
                    f"copy_from: shape mismatch ({source.shape_string()} into "
                    f"{self.shape_string()}); pass reshape=True"
                )
            self.reshape_like(source)
        src = source.diff if copy_diff else source.data
        dst = self.diff if copy_diff else self.data
        dst[...] = self._xp.asarray(src)

    def to_proto(self, write_diff=False):
        """Return a ``BlobProto`` (float32 -> data/diff, float64 -> double_*)."""
        from netlite.proto import netlite_pb2

        proto = netlite_pb2.BlobProto()
        proto.shape.dim.extend(self.shape)
        data = backend.to_numpy(self.flat_data)
        if self._dtype == np.float64:
            proto.double_data.extend(data.tolist())
            if write_diff:
                proto.double_diff.extend(backend.to_numpy(self.flat_diff).tolist())
        else:
            proto.data.extend(data.tolist())
            if write_diff:
                proto.diff.extend(backend.to_numpy(self.flat_diff).tolist())
        return proto

    @staticmethod
    def proto_shape(proto):
        """The shape a BlobProto describes (legacy 4-D fields honoured)."""
        if proto.HasField("shape"):
            return tuple(int(d) for d in proto.shape.dim)
        if any(proto.HasField(f) for f in ("num", "channels", "height", "width")):
            return (proto.num, proto.channels, proto.height, proto.width)
        return (len(proto.data) or len(proto.double_data),)

    def from_proto(self, proto, reshape=True):
        """Load data (and diff, when present) from a ``BlobProto``."""
        shape = self.proto_shape(proto)
        if reshape:
            self.reshape(shape)
        elif not self.shape_equals_proto_shape(shape):
            raise ValueError(
                f"blob shape {self.shape} does not match stored shape {shape}"
            )
        for values, dvalues, target in (
            (proto.double_data, proto.data, "data"),
            (proto.double_diff, proto.diff, "diff"),
        ):
            src = values if len(values) else dvalues
            if not len(src):
                continue
            if len(src) != self.count:
                raise ValueError(
                    f"stored {target} has {len(src)} values, blob has {self.count}"
                )
            arr = np.asarray(src, dtype=self._dtype).reshape(self.shape)
            getattr(self, target)[...] = self._xp.asarray(arr)
        return self

    def shape_equals_proto_shape(self, shape):
        """Caffe's ShapeEquals: exact, or legacy 4-D against the last axes.

        ``shape`` is a ``BlobProto`` (compared exactly as Caffe does: the
        legacy num/channels/height/width fields against the blob's last four
        legacy axes when the proto uses them, else ``shape.dim`` exactly) or
        a tuple (a 4-tuple may also match the legacy way).
        """
        if hasattr(shape, "DESCRIPTOR"):  # a BlobProto message
            legacy = ("num", "channels", "height", "width")
            if any(shape.HasField(f) for f in legacy):
                return self.num_axes <= 4 and all(
                    getattr(shape, f) == self.legacy_shape(i - 4)
                    for i, f in enumerate(legacy)
                )
            return tuple(int(d) for d in shape.shape.dim) == self.shape
        if tuple(shape) == self.shape:
            return True
        if len(shape) == 4 and self.num_axes <= 4:
            return all(
                shape[i] == self.legacy_shape(i - 4) for i in range(4)
            )
        return False

    def __repr__(self):
        return (
            f"Blob(shape={self.shape}, dtype={self._dtype.name}, "
            f"device={self._device!r})"
        )
