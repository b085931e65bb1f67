"""DummyData: tops of a fixed shape filled by fillers (constant or random).

See docs/layers/dummy_data.md.
"""

from netlite.errors import LayerSetupError
from netlite.fillers import get_filler
from netlite.layer import Layer
from netlite.proto import netlite_pb2
from netlite.registry import register_layer

_LEGACY_FIELDS = ("num", "channels", "height", "width")


@register_layer("DummyData")
class DummyDataLayer(Layer):
    """Produce tops of declared shapes, filled by fillers.

    Type ``"DummyData"``.  Useful for tests, benchmarks and nets that need a
    constant blob.

    Bottoms
        none.
    Tops
        ``top[k]`` : one blob per top, of the declared shape.

    Parameters (``dummy_data_param``)
        ``shape`` (BlobShape, given once for all tops or once per top), or
        the legacy 4-D ``num``/``channels``/``height``/``width`` (each given
        once or once per top; not together with ``shape``);
        ``data_filler`` (none = constant 0; one shared by all tops; or one
        per top).

    A top whose filler is ``constant`` is filled once, at setup, and never
    touched again; every other top is refilled at every forward, drawing
    from the global RNG (:func:`netlite.set_random_seed`).  Reshape does
    nothing: the shapes are fixed by the parameters.
    See docs/layers/dummy_data.md.
    """

    exact_num_bottom_blobs = 0
    min_top_blobs = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.dummy_data_param
        n = len(top)
        if len(p.data_filler) not in (0, 1, n):
            raise LayerSetupError(
                f"{self.describe()}: data_filler must be given 0, 1 or {n} (once "
                f"per top) times, got {len(p.data_filler)}"
            )
        if len(p.data_filler) == 0:
            params = [netlite_pb2.FillerParameter(type="constant", value=0)] * n
        elif len(p.data_filler) == 1:
            params = [p.data_filler[0]] * n
        else:
            params = list(p.data_filler)
        try:
            self.fillers = [get_filler(fp) for fp in params]
        except LayerSetupError as exc:
            raise LayerSetupError(f"{self.describe()}: data_filler: {exc}") from None
        # Constant tops are filled once here; the rest at every forward.
        self.refill = [fp.type != "constant" for fp in params]
        for i, blob in enumerate(top):
            shape = self._top_shape(p, i, n)
            try:
                blob.reshape(shape)
            except ValueError as exc:
                raise LayerSetupError(
                    f"{self.describe()}: bad shape {shape} for top[{i}]: {exc}"
                ) from None
            if not self.refill[i]:
                self.fillers[i].fill(blob)

    def _top_shape(self, p, i, n):
        legacy = any(len(getattr(p, f)) for f in _LEGACY_FIELDS)
        if legacy:
            if p.shape:
                raise LayerSetupError(
                    f"{self.describe()}: give either shape or the legacy "
                    "num/channels/height/width fields, not both"
                )
            dims = []
            for field in _LEGACY_FIELDS:
                values = getattr(p, field)
                if len(values) not in (1, n):
                    raise LayerSetupError(
                        f"{self.describe()}: '{field}' must be given once or once "
                        f"per top blob ({n}), got {len(values)}"
                    )
                dims.append(values[0] if len(values) == 1 else values[i])
            return tuple(dims)
        if len(p.shape) not in (1, n):
            raise LayerSetupError(
                f"{self.describe()}: shape must be given once or once per top "
                f"blob ({n}), got {len(p.shape)}"
            )
        return tuple(p.shape[0 if len(p.shape) == 1 else i].dim)

    def reshape(self, bottom, top):
        # The shapes come from the parameters and never change.
        pass

    def forward_cpu(self, bottom, top):
        for blob, filler, refill in zip(top, self.fillers, self.refill):
            if refill:
                filler.fill(blob)

    def backward_cpu(self, top, propagate_down, bottom):
        pass
