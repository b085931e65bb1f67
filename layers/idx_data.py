"""IDXData: batches of MNIST-style IDX images and labels, held in memory.

See docs/layers/idx_data.md.
"""

import numpy as np

from netlite import rng
from netlite.data import catalog, idx, lookup, mnist, verify
from netlite.data.transform import DataTransformer
from netlite.errors import LayerSetupError
from netlite.layer import Layer
from netlite.registry import register_layer


@register_layer("IDXData")
class IDXDataLayer(Layer):
    """Read an IDX images/labels pair (MNIST, Fashion-MNIST) into batches.

    Tops
    ----
    data : (batch_size, C, H', W')
        ``(pixel - mean) * scale``, cropped/mirrored per ``transform_param``;
        ``C = 1`` for 3-D image files ``(N, H, W)``.
    label : (batch_size,), optional
        The labels as floats.

    Parameters (``idx_data_param``)
    -------------------------------
    source : str
        ``"<dataset>:<split>"``, e.g. ``"mnist:train"`` or
        ``"fashion-mnist:test"``, found with :mod:`netlite.data.lookup`.
    image_source, label_source : str
        Explicit IDX file paths (instead of ``source``).
    batch_size : uint32
        Required, > 0.
    shuffle : bool, default False
        Draw a new order with the global RNG at setup and at every epoch.

    The whole dataset is loaded once per process (cached by path), and the
    reading position wraps around at the end, like Caffe's data layers.
    :meth:`state_dict` / :meth:`load_state_dict` save and restore the
    position so a resumed run continues with the same batches.
    """

    exact_num_bottom_blobs = 0
    min_top_blobs = 1
    max_top_blobs = 2

    def layer_setup(self, bottom, top):
        p = self.layer_param.idx_data_param
        what = self.describe()
        if not p.batch_size:
            raise LayerSetupError(f"{what}: idx_data_param.batch_size must be > 0")
        self.batch_size = int(p.batch_size)
        self.shuffle = bool(p.shuffle)
        self.images, self.labels = self._load(p)
        if len(top) > 1 and self.labels is None:
            raise LayerSetupError(
                f"{what} has a label top but no label_source"
            )
        self.num_samples = int(self.images.shape[0])
        if self.num_samples == 0:
            raise LayerSetupError(f"{what}: the dataset has no images")
        image_shape = self.images.shape[1:]
        if len(image_shape) == 2:
            image_shape = (1,) + image_shape
        elif len(image_shape) != 3:
            raise LayerSetupError(
                f"{what}: images must be (N, H, W) or (N, C, H, W), got "
                f"{self.images.shape}"
            )
        self._image_shape = image_shape
        self.transformer = DataTransformer(
            self.layer_param.transform_param, self.phase, what
        )
        self._top_shape = (self.batch_size,) + self.transformer.infer_shape(
            image_shape
        )
        self.cursor = 0
        self.epoch = 0
        self.permutation = None
        if self.shuffle:
            self._reshuffle()

    def _load(self, p):
        what = self.describe()
        if p.source and (p.image_source or p.label_source):
            raise LayerSetupError(
                f"{what}: give either idx_data_param.source or "
                "image_source/label_source, not both"
            )
        if not (p.source or p.image_source):
            raise LayerSetupError(
                f"{what}: idx_data_param needs source (e.g. 'mnist:train') or "
                "image_source"
            )
        try:
            if p.source:
                name, split = catalog.parse_source(p.source)
                return mnist.load_mnist(name, split)
            if p.label_source:
                return mnist.load_idx_pair(p.image_source, p.label_source)
            return mnist.load_idx_cached(p.image_source), None
        except (idx.IDXFormatError, verify.ChecksumError,
                lookup.DatasetNotFoundError, FileNotFoundError) as exc:
            # Same type, with the layer named first.
            raise type(exc)(f"{what}: {exc}") from None
        except ValueError as exc:  # a malformed source string
            raise LayerSetupError(f"{what}: {exc}") from exc

    def _reshuffle(self):
        self.permutation = rng.get_rng().permutation(self.num_samples)

    def _next_indices(self):
        """The next ``batch_size`` sample indices, wrapping at the end."""
        out = np.empty(self.batch_size, dtype=np.int64)
        filled = 0
        while filled < self.batch_size:
            take = min(self.batch_size - filled, self.num_samples - self.cursor)
            span = slice(self.cursor, self.cursor + take)
            out[filled:filled + take] = (
                self.permutation[span] if self.permutation is not None
                else np.arange(span.start, span.stop)
            )
            filled += take
            self.cursor += take
            if self.cursor == self.num_samples:
                self.cursor = 0
                self.epoch += 1
                if self.shuffle:
                    self._reshuffle()
        return out

    def reshape(self, bottom, top):
        top[0].reshape(self._top_shape)
        if len(top) > 1:
            top[1].reshape((self.batch_size,))

    def forward_cpu(self, bottom, top):
        # Host-side gather and transform; assigning to the blob copies to
        # the blob's device (a CuPy array on the GPU engine).
        index = self._next_indices()
        images = self.images[index].reshape((self.batch_size,) + self._image_shape)
        top[0].data = self.transformer.transform(images, top[0].dtype)
        if len(top) > 1:
            top[1].data = self.labels[index].astype(top[1].dtype)

    def backward_cpu(self, top, propagate_down, bottom):
        pass  # no bottoms

    # ------------------------------------------------------- snapshots
    def state_dict(self):
        """The reading position: enough to continue with the same batches.

        Returns
        -------
        dict
            ``cursor`` (int, position within the epoch), ``epoch`` (int),
            ``num_samples`` (int) and ``permutation`` (int64 array of the
            current epoch's order; empty when not shuffling).
        """
        perm = (
            self.permutation.astype(np.int64) if self.permutation is not None
            else np.zeros(0, dtype=np.int64)
        )
        return {
            "cursor": int(self.cursor),
            "epoch": int(self.epoch),
            "num_samples": int(self.num_samples),
            "permutation": perm,
        }

    def load_state_dict(self, state):
        """Restore a position saved by :meth:`state_dict`.

        Raises
        ------
        LayerSetupError
            When the state does not fit this layer's dataset.
        """
        what = self.describe()
        try:
            cursor, epoch = int(state["cursor"]), int(state["epoch"])
            perm = np.asarray(state["permutation"], dtype=np.int64).reshape(-1)
        except (KeyError, TypeError, ValueError) as exc:
            raise LayerSetupError(
                f"{what}: bad saved state (needs cursor, epoch, permutation): {exc}"
            ) from None
        n = int(state.get("num_samples", self.num_samples))
        if n != self.num_samples or not 0 <= cursor < self.num_samples:
            raise LayerSetupError(
                f"{what}: saved state is for {n} samples at cursor {cursor}; "
                f"this dataset has {self.num_samples}"
            )
        if bool(perm.size) != self.shuffle:
            raise LayerSetupError(
                f"{what}: the saved state was taken with shuffle "
                f"{'on' if perm.size else 'off'}; this layer has shuffle "
                f"{'on' if self.shuffle else 'off'}"
            )
        if perm.size and (
            perm.size != self.num_samples
            or not np.array_equal(np.sort(perm), np.arange(self.num_samples))
        ):
            raise LayerSetupError(
                f"{what}: saved permutation is not a permutation of "
                f"{self.num_samples} samples"
            )
        self.permutation = perm.copy() if perm.size else None
        self.cursor, self.epoch = cursor, epoch
