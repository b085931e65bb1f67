"""DataTransformer: Caffe's ``transform_param`` preprocessing for data layers.

For every image of a batch, ``value = (pixel - mean) * scale``, then an
optional square crop and an optional horizontal mirror:

* ``scale`` (default 1) multiplies after the mean is subtracted;
* ``mean_file`` (a binary ``BlobProto`` of shape (1, C, H, W) or (C, H, W),
  subtracted pixel by pixel *before* cropping) or ``mean_value`` (one value,
  or one per channel) -- not both;
* ``crop_size`` > 0 cuts a ``crop_size`` square: at a random offset in the
  TRAIN phase, centred (rounding the offset down) in TEST;
* ``mirror`` flips each image left-right with probability 1/2 -- in **both**
  phases, as Caffe does (only the crop position is phase-dependent).

Random draws come from the global generator (:func:`netlite.rng.get_rng`),
so ``netlite.set_random_seed`` makes them reproducible.  ``force_color`` and
``force_gray`` only concern encoded (JPEG/PNG) images, which netlite does
not decode; like Caffe for raw data, they are ignored.
"""

import numpy as np

from netlite import rng
from netlite.errors import LayerSetupError, ShapeError
from netlite.layer import TRAIN
from netlite.proto import netlite_pb2


class DataTransformer:
    """Apply a ``TransformationParameter`` to batches of images.

    Parameters
    ----------
    param : TransformationParameter
    phase : {netlite.TRAIN, netlite.TEST}
        Chooses random (TRAIN) or centred (TEST) crops.
    owner : str
        Named in error messages (the layer's ``describe()``).
    """

    def __init__(self, param=None, phase=TRAIN, owner="DataTransformer"):
        self.param = param if param is not None else (
            netlite_pb2.TransformationParameter()
        )
        self.phase = phase
        self.owner = owner
        self.scale = float(self.param.scale)
        self.crop_size = int(self.param.crop_size)
        self.mirror = bool(self.param.mirror)
        self.mean_values = np.asarray(self.param.mean_value, dtype=np.float32)
        self.mean = None
        if self.param.HasField("mean_file"):
            if self.mean_values.size:
                raise LayerSetupError(
                    f"{owner}: transform_param cannot give both mean_file and "
                    "mean_value"
                )
            self.mean = _read_mean_file(self.param.mean_file, owner)

    def infer_shape(self, shape):
        """The (C, H, W) of one transformed image of shape ``(C, H, W)``.

        Raises
        ------
        ShapeError
            When the image is smaller than ``crop_size`` or the mean does not
            fit it.
        """
        c, h, w = (int(d) for d in shape)
        if c <= 0:
            raise ShapeError(f"{self.owner}: images need at least one channel")
        if h < self.crop_size or w < self.crop_size:
            raise ShapeError(
                f"{self.owner}: crop_size {self.crop_size} is larger than the "
                f"{h}x{w} images"
            )
        if self.mean is not None and self.mean.shape != (c, h, w):
            raise ShapeError(
                f"{self.owner}: mean_file '{self.param.mean_file}' has shape "
                f"{self.mean.shape}, the images are {(c, h, w)}"
            )
        if self.mean_values.size not in (0, 1, c):
            raise LayerSetupError(
                f"{self.owner}: give either 1 mean_value or one per channel "
                f"({c}), got {self.mean_values.size}"
            )
        if self.crop_size:
            return c, self.crop_size, self.crop_size
        return c, h, w

    def transform(self, batch, dtype=np.float32):
        """Transform a batch of images.

        Parameters
        ----------
        batch : numpy.ndarray, shape (N, C, H, W)
            Raw pixels (uint8) or floats.
        dtype : numpy dtype
            Output dtype; the arithmetic is done in it, as Caffe does in
            ``Dtype``.

        Returns
        -------
        numpy.ndarray, shape (N, C, H', W')
            ``(x - mean) * scale``, cropped and mirrored.
        """
        dtype = np.dtype(dtype)
        n = batch.shape[0]
        c, out_h, out_w = self.infer_shape(batch.shape[1:])
        x = batch.astype(dtype)
        if self.mean is not None:
            x -= self.mean.astype(dtype)
        elif self.mean_values.size:
            x -= self.mean_values.astype(dtype).reshape(-1, 1, 1)
        if self.scale != 1:
            x *= dtype.type(self.scale)
        if not (self.crop_size or self.mirror):
            return x
        gen = rng.get_rng()
        flips = (
            gen.integers(0, 2, size=n).astype(bool) if self.mirror
            else np.zeros(n, dtype=bool)
        )
        h, w = batch.shape[2], batch.shape[3]
        if self.crop_size and self.phase == TRAIN:
            h_off = gen.integers(0, h - out_h + 1, size=n)
            w_off = gen.integers(0, w - out_w + 1, size=n)
        else:
            h_off = np.full(n, (h - out_h) // 2)
            w_off = np.full(n, (w - out_w) // 2)
        out = np.empty((n, c, out_h, out_w), dtype=dtype)
        for i in range(n):
            patch = x[i, :, h_off[i]:h_off[i] + out_h, w_off[i]:w_off[i] + out_w]
            out[i] = patch[:, :, ::-1] if flips[i] else patch
        return out


def _read_mean_file(path, owner):
    """Read a binary BlobProto mean image as a float32 (C, H, W) array."""
    from netlite.blob import Blob

    try:
        with open(path, "rb") as f:
            proto = netlite_pb2.BlobProto.FromString(f.read())
    except OSError as exc:
        raise LayerSetupError(f"{owner}: cannot read mean_file: {exc}") from None
    except Exception as exc:  # protobuf's DecodeError
        raise LayerSetupError(
            f"{owner}: mean_file '{path}' is not a binary BlobProto: {exc}"
        ) from None
    shape = Blob.proto_shape(proto)
    values = np.asarray(proto.data or proto.double_data, dtype=np.float32)
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3 or values.size != int(np.prod(shape)):
        raise LayerSetupError(
            f"{owner}: mean_file '{path}' must hold one (1, C, H, W) image; it "
            f"has shape {shape} and {values.size} values"
        )
    return values.reshape(shape)
