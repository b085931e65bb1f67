"""Weight fillers, as Caffe's ``filler.hpp`` defines them.

``get_filler(FillerParameter)`` returns a filler whose ``fill(blob)`` writes
``blob.data``.  Every random draw comes from the global generator
(:mod:`netlite.rng`), so ``netlite.set_random_seed`` makes initialisation
reproducible.  Values are drawn in float64 on the host and cast to the
blob's dtype, so a float32 and a float64 net seeded alike start from the
same weights (up to rounding).

Caffe's conventions, kept on purpose:

* a missing filler is ``constant`` 0 (an InnerProduct with no
  ``weight_filler`` starts at zero);
* ``xavier`` draws from U(-sqrt(3/n), +sqrt(3/n)) -- variance 1/n with
  n = fan_in by default -- which is Glorot's formula only with
  ``variance_norm: AVERAGE``;
* ``msra`` draws from N(0, 2/n) with the same n;
* fan_in = count / shape[0] and fan_out = count / shape[1] (count for a
  1-D blob).

``gaussian_unitball`` (happynear/caffe-windows, used by NormFace's
normalised InnerProduct) draws N(0, 1) -- ``mean`` and ``std`` are ignored,
as in happynear's filler -- and divides each of the ``shape[0]`` rows
(``count / shape[0]`` values each) by ``sqrt(sum of squares + 1e-12)``, so
every row is a uniformly random unit vector.  For an InnerProduct weight
``(N, K)`` these are the rows of W; a ``transpose: true`` blob ``(K, N)``
gets unit rows of length N instead (happynear's rule, kept: the layer's
``normalize`` fixes the columns on the first forward anyway).
"""

import math

import numpy as np

from netlite import rng
from netlite.errors import LayerSetupError
from netlite.proto import netlite_pb2

FAN_IN = netlite_pb2.FillerParameter.FAN_IN
FAN_OUT = netlite_pb2.FillerParameter.FAN_OUT
AVERAGE = netlite_pb2.FillerParameter.AVERAGE


def _write(blob, values):
    blob.data[...] = blob.xp.asarray(values.astype(blob.dtype, copy=False))


def _fans(blob):
    if blob.count == 0:
        raise LayerSetupError("cannot fill an empty blob")
    shape = blob.shape or (1,)
    fan_in = blob.count // shape[0]
    fan_out = blob.count // shape[1] if len(shape) > 1 else blob.count
    return fan_in, fan_out


def _variance_n(param, blob):
    fan_in, fan_out = _fans(blob)
    if param.variance_norm == AVERAGE:
        return (fan_in + fan_out) / 2.0
    if param.variance_norm == FAN_OUT:
        return float(fan_out)
    return float(fan_in)


class Filler:
    """Base class: ``fill(blob)`` writes ``blob.data`` in place."""

    def __init__(self, param):
        self.param = param

    def fill(self, blob):
        raise NotImplementedError


class ConstantFiller(Filler):
    """All elements equal ``value``."""

    def fill(self, blob):
        blob.data[...] = self.param.value


class UniformFiller(Filler):
    """U[min, max]."""

    def fill(self, blob):
        p = self.param
        if p.min > p.max:
            raise LayerSetupError(f"uniform filler: min {p.min} > max {p.max}")
        _write(blob, rng.get_rng().uniform(p.min, p.max, size=blob.shape))


class GaussianFiller(Filler):
    """N(mean, std^2); with ``sparse`` >= 0 each element survives with
    probability sparse / shape[0] (Caffe's sparse Gaussian for IP weights)."""

    def fill(self, blob):
        p = self.param
        gen = rng.get_rng()
        values = gen.normal(p.mean, p.std, size=blob.shape)
        if p.sparse >= 0:
            if blob.num_axes < 1:
                raise LayerSetupError("sparse gaussian filler needs >= 1 axis")
            keep = p.sparse / blob.shape[0]
            if not 0.0 <= keep <= 1.0:
                raise LayerSetupError(
                    f"sparse gaussian filler: sparse/num_outputs = {keep} is not "
                    "a probability"
                )
            values *= gen.random(size=blob.shape) < keep
        _write(blob, values)


class PositiveUnitballFiller(Filler):
    """U[0, 1], then each of the shape[0] rows is divided by its sum."""

    def fill(self, blob):
        values = rng.get_rng().uniform(0.0, 1.0, size=blob.shape)
        rows = values.reshape(blob.shape[0] if blob.shape else 1, -1)
        rows /= rows.sum(axis=1, keepdims=True)
        _write(blob, values)


class GaussianUnitballFiller(Filler):
    """N(0, 1), then each of the shape[0] rows divided by its L2 norm
    (``sqrt(sum x^2 + 1e-12)``); happynear's ``gaussian_unitball``."""

    def fill(self, blob):
        values = rng.get_rng().standard_normal(size=blob.shape)
        rows = values.reshape(blob.shape[0] if blob.shape else 1, -1)
        rows /= np.sqrt((rows * rows).sum(axis=1, keepdims=True) + 1e-12)
        _write(blob, values)


class XavierFiller(Filler):
    """U(-sqrt(3/n), +sqrt(3/n)); n from ``variance_norm`` (default fan_in)."""

    def fill(self, blob):
        scale = math.sqrt(3.0 / _variance_n(self.param, blob))
        _write(blob, rng.get_rng().uniform(-scale, scale, size=blob.shape))


class MSRAFiller(Filler):
    """N(0, 2/n); n from ``variance_norm`` (default fan_in)."""

    def fill(self, blob):
        std = math.sqrt(2.0 / _variance_n(self.param, blob))
        _write(blob, rng.get_rng().normal(0.0, std, size=blob.shape))


class BilinearFiller(Filler):
    """Bilinear upsampling kernel for a 4-D blob with square spatial axes."""

    def fill(self, blob):
        if blob.num_axes != 4 or blob.shape[2] != blob.shape[3]:
            raise LayerSetupError(
                f"bilinear filler needs a 4-D blob with height == width, got "
                f"{blob.shape}"
            )
        k = blob.shape[3]
        f = math.ceil(k / 2.0)
        c = (k - 1) / (2.0 * f)
        axis = 1.0 - np.abs(np.arange(k) / f - c)
        kernel = np.outer(axis, axis)
        _write(blob, np.broadcast_to(kernel, blob.shape))


_FILLERS = {
    "constant": ConstantFiller,
    "uniform": UniformFiller,
    "gaussian": GaussianFiller,
    "positive_unitball": PositiveUnitballFiller,
    "gaussian_unitball": GaussianUnitballFiller,
    "xavier": XavierFiller,
    "msra": MSRAFiller,
    "bilinear": BilinearFiller,
}


def get_filler(param=None):
    """Return the filler for a ``FillerParameter`` (``None`` -> constant 0).

    Raises
    ------
    LayerSetupError
        For an unknown type, or ``sparse`` on anything but gaussian.
    """
    if param is None:
        param = netlite_pb2.FillerParameter()
    try:
        cls = _FILLERS[param.type]
    except KeyError:
        raise LayerSetupError(
            f"unknown filler type {param.type!r}; known: {', '.join(sorted(_FILLERS))}"
        ) from None
    if cls is not GaussianFiller and param.sparse != -1:
        raise LayerSetupError(f"filler {param.type!r} does not support sparse")
    return cls(param)
