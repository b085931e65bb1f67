"""The global, seedable random number generator (Caffe's ``Caffe::rng``).

Fillers, Dropout masks, data shuffling and test fixtures all draw from one
generator so that ``netlite.set_random_seed(s)`` makes a whole run
reproducible, and so that the gradient checker can reseed it before every
forward pass (stochastic layers then draw identical masks on the +h, -h
and analytic passes).

The generator is NumPy's PCG64.  On the GPU engine, layers draw on the host
and copy: masks are small next to the work, and one stream keeps CPU and
GPU runs bit-identical.
"""

import numpy as np

_generator = np.random.Generator(np.random.PCG64(1701))


def set_random_seed(seed):
    """Reseed the global generator (``caffe.set_random_seed``).

    Parameters
    ----------
    seed : int
        Non-negative seed.
    """
    global _generator
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"random seed must be >= 0, got {seed}")
    _generator = np.random.Generator(np.random.PCG64(seed))


def get_rng():
    """Return the global ``numpy.random.Generator``.

    Do not keep the returned object across calls to :func:`set_random_seed`:
    reseeding replaces it.
    """
    return _generator


def get_state():
    """Return the generator state as a JSON-serialisable dict (snapshots)."""
    return _generator.bit_generator.state


def set_state(state):
    """Restore a state returned by :func:`get_state`."""
    _generator.bit_generator.state = state
