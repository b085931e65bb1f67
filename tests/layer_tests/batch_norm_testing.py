"""Helpers of the tests of the batch-normalization layers (BatchNorm, BN):
the constant-channel bottom, a seeded gaussian blob, a run of TRAIN
forwards, and ``ChannelCase``, what their LayerTestCase classes share.
"""

import numpy as np
from layer_testing import filler, make_blob

import netlite


def constant_channel(shape, dtype):
    """Gaussian values, channel 0 all 0.5 (its variance is exactly 0)."""
    x = netlite.rng.get_rng().standard_normal(shape)
    x[:, 0] = 0.5
    return x.astype(dtype)


def gaussian(shape, dtype=np.float64, seed=None):
    """A gaussian blob, from the global RNG reseeded with ``seed`` if given."""
    if seed is not None:
        netlite.set_random_seed(seed)
    return make_blob(shape, dtype, filler("gaussian"))


def training_forwards(layer, top, dtype, seeds=(1, 2, 3)):
    """Run TRAIN forwards of ``layer`` (set up on the first), one per seed,
    on gaussian ``(4, 3, 5)`` bottoms with channel means 1, -2 and 0;
    yield each bottom after its forward."""
    for seed in seeds:
        x = gaussian((4, 3, 5), dtype, seed)
        x.data[...] += np.array([1.0, -2.0, 0.0])[:, None]
        if seed == seeds[0]:
            layer.setup([x], [top])
        layer.forward([x], [top])
        yield x


class ChannelCase:
    """Mixin of the batch-normalization LayerTestCase classes (listed
    before LayerTestCase): one gaussian bottom of :attr:`shape`, with a
    constant channel when :attr:`constant`."""

    @property
    def bottoms(self):
        fill = constant_channel if self.constant else filler("gaussian")
        return [(self.shape, fill)]

    def assert_param_diffs_untouched(self, engine, case, dtype):
        """Two backwards leave every parameter diff as it was (7): for
        blobs that have no gradient (statistics, a frozen layer)."""
        netlite.set_cpu_engine(engine)
        layer, bottom, top, _ = self.setup(case, dtype)
        for p in layer.blobs:
            p.diff[...] = 7
        self.backward(layer, bottom, top)
        self.backward(layer, bottom, top)
        for p in layer.blobs:
            assert np.all(p.diff == 7)
