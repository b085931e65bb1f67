"""Data: Caffe's database data layer, reading Datum records from an LMDB.

See docs/layers/data.md.
"""

import logging
import os
import weakref

import numpy as np

from netlite import rng
from netlite.data.lmdb import acquire_env, decode_datum, release_env
from netlite.data.transform import DataTransformer
from netlite.errors import LayerSetupError, ShapeError
from netlite.layer import Layer
from netlite.proto import netlite_pb2
from netlite.registry import register_layer

logger = logging.getLogger("netlite")

LEVELDB = netlite_pb2.DataParameter.LEVELDB
LMDB = netlite_pb2.DataParameter.LMDB


@register_layer("Data")
class DataLayer(Layer):
    """Read Caffe Datum records from an LMDB, in key order, wrapping around.

    Tops
    ----
    data : (batch_size, C, H', W')
        ``(pixel - mean) * scale``, cropped/mirrored per ``transform_param``.
    label : (batch_size,), optional
        ``Datum.label`` as floats.

    Parameters (``data_param``)
    ---------------------------
    source : str
        The LMDB directory (e.g. written by ``netlite convert-mnist``).
    batch_size : uint32
        Required, > 0.
    backend : {LEVELDB, LMDB}, default LEVELDB
        Only LMDB is supported; an unset backend is accepted when the source
        is an LMDB.
    rand_skip : uint32, default 0
        Skip a random number in ``[0, rand_skip)`` of records at setup.

    Records are read synchronously (``prefetch`` is ignored).  The batch
    shape follows the first record of each batch, as in Caffe.
    :meth:`state_dict` / :meth:`load_state_dict` save and restore the
    reading position.
    """

    exact_num_bottom_blobs = 0
    min_top_blobs = 1
    max_top_blobs = 2

    def layer_setup(self, bottom, top):
        p = self.layer_param.data_param
        what = self.describe()
        if not p.batch_size:
            raise LayerSetupError(f"{what}: data_param.batch_size must be > 0")
        self.batch_size = int(p.batch_size)
        if not p.source:
            raise LayerSetupError(f"{what}: data_param.source is required")
        self.source = p.source
        is_lmdb = os.path.isfile(os.path.join(p.source, "data.mdb"))
        if p.backend == LEVELDB and (p.HasField("backend") or not is_lmdb):
            raise LayerSetupError(
                f"{what}: the LEVELDB backend is not supported; write an LMDB "
                "(netlite convert-mnist does) and set data_param.backend: LMDB"
                + ("" if is_lmdb else f" ('{p.source}' is not an LMDB)")
            )
        if not is_lmdb:
            raise LayerSetupError(
                f"{what}: data_param.source '{p.source}' is not an LMDB directory "
                "(no data.mdb in it)"
            )
        if self.__dict__.get("_env_key") is None:
            self._env_key, self._env = acquire_env(p.source, what)
            weakref.finalize(self, release_env, self._env_key)
        with self._env.begin() as txn:
            self._keys = list(txn.cursor().iternext(keys=True, values=False))
        if not self._keys:
            raise LayerSetupError(f"{what}: the LMDB '{p.source}' has no records")
        self.transformer = DataTransformer(
            _merged_transform_param(self.layer_param, what), self.phase, what
        )
        self.cursor = 0
        if p.rand_skip:
            skip = int(rng.get_rng().integers(0, p.rand_skip))
            logger.info("Skipping first %d data points.", skip)
            self.cursor = skip % len(self._keys)
        with self._env.begin() as txn:
            first, _ = decode_datum(txn.get(self._keys[self.cursor]), what)
        top[0].reshape((self.batch_size,) + self.transformer.infer_shape(first.shape))
        if len(top) > 1:
            top[1].reshape((self.batch_size,))

    @property
    def num_records(self):
        """Number of records in the database."""
        return len(self._keys)

    def reshape(self, bottom, top):
        # The batch shape comes from the records: forward reshapes.
        pass

    def forward_cpu(self, bottom, top):
        what = self.describe()
        images, labels = [], []
        with self._env.begin() as txn:
            for _ in range(self.batch_size):
                image, label = decode_datum(txn.get(self._keys[self.cursor]), what)
                if images and image.shape != images[0].shape:
                    raise ShapeError(
                        f"{what}: record {self._keys[self.cursor]!r} has shape "
                        f"{image.shape}, the batch started with "
                        f"{images[0].shape}; use batch_size 1 for records of "
                        "varying shape"
                    )
                images.append(image)
                labels.append(label)
                self.cursor = (self.cursor + 1) % len(self._keys)
        batch = self.transformer.transform(np.stack(images), top[0].dtype)
        top[0].reshape(batch.shape)
        top[0].data = batch
        if len(top) > 1:
            top[1].reshape((self.batch_size,))
            top[1].data = np.asarray(labels, dtype=top[1].dtype)

    def backward_cpu(self, top, propagate_down, bottom):
        pass  # no bottoms

    # ------------------------------------------------------- snapshots
    def state_dict(self):
        """``{"cursor": int, "num_records": int}``: the next record to read."""
        return {"cursor": int(self.cursor), "num_records": len(self._keys)}

    def load_state_dict(self, state):
        """Restore a position saved by :meth:`state_dict`."""
        what = self.describe()
        try:
            cursor = int(state["cursor"])
        except (KeyError, TypeError, ValueError) as exc:
            raise LayerSetupError(f"{what}: bad saved state: {exc}") from None
        n = int(state["num_records"]) if "num_records" in state else len(self._keys)
        if n != len(self._keys) or not 0 <= cursor < n:
            raise LayerSetupError(
                f"{what}: saved state is for {n} records at cursor {cursor}; "
                f"'{self.source}' has {len(self._keys)}"
            )
        self.cursor = cursor


_LEGACY_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")


def _merged_transform_param(layer_param, owner):
    """transform_param with the deprecated data_param fields folded in."""
    merged = netlite_pb2.TransformationParameter()
    merged.CopyFrom(layer_param.transform_param)
    legacy = layer_param.data_param
    for name in _LEGACY_TRANSFORM_FIELDS:
        if not legacy.HasField(name):
            continue
        if merged.HasField(name) and getattr(merged, name) != getattr(legacy, name):
            raise LayerSetupError(
                f"{owner}: data_param.{name} (deprecated) and transform_param."
                f"{name} disagree; keep only transform_param.{name}"
            )
        setattr(merged, name, getattr(legacy, name))
    return merged
