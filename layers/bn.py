"""BN: the batch normalization of the L-Softmax fork's Caffe (learned slope
and bias inside the layer).

See docs/layers/bn.md.
"""

from netlite.layer import TEST, Layer
from netlite.layers._batch_stats import (
    batch_moments,
    channel_dims,
    check_eps,
    check_fraction,
    normalize,
    normalize_backward,
    pin_statistics,
    reshape_channels,
)
from netlite.registry import register_layer

_BLOBS = ("slope", "bias", "running mean", "running inverse std")


@register_layer("BN")
class BNLayer(Layer):
    r"""Batch normalization with a per-channel slope and bias.

    Type ``"BN"`` (wy1iu/LargeMargin_Softmax_Loss).  With ``bottom[0]``
    viewed as ``(N, C, S)`` (``C = shape[1]``, 1 for a 1-D blob),

    .. math:: y = \gamma_c \, (x - \mu_c)\, r_c + \beta_c .

    TRAIN phase, not ``frozen``: :math:`\mu` the batch mean,
    :math:`r = 1/\sqrt{\sigma^2 + \epsilon}` with the **biased** batch
    variance; the forward then moves the running blobs,
    ``M <- (1 - momentum) mu + momentum M`` and
    ``R <- (1 - momentum) r + momentum R`` (R averages the *inverse
    standard deviation*, eps included).  TEST phase or ``frozen``:
    :math:`\mu = M`, :math:`r = R`, read as they are.

    Bottoms / tops
        ``bottom[0]`` x, at least 1 axis; ``top[0]`` y, shaped like x
        (in-place allowed).

    Parameters (``bn_param``)
        ``slope_filler`` (absent: constant 0, as in the fork),
        ``bias_filler`` (constant 0), ``momentum`` (0.9, in [0, 1]),
        ``eps`` (1e-5, >= 0), ``frozen`` (false: use M, R in TRAIN too and
        learn nothing), ``engine`` (read and ignored).

    Blobs ``[gamma, beta, M, R]``, each of shape ``(1, C)``; M starts at 0
    and R at 1.  The layer adds ``lr_mult: 0`` param specs for M and R (a
    given spec must say 0); the backward never writes their diffs, and
    writes no diff at all into gamma and beta when ``frozen``.
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.bn_param
        self.frozen = bool(p.frozen)
        self.momentum = float(p.momentum)
        self.eps = float(p.eps)
        check_fraction(self, self.momentum, "momentum")
        check_eps(self, self.eps)
        # Batch statistics only while training an unfrozen layer.
        self.batch_stats = not (self.frozen or self.phase == TEST)
        _, self.channels, _ = channel_dims(self, bottom[0])
        shape = (1, self.channels)
        if self.blobs:
            self.check_param_blobs([shape] * 4, list(_BLOBS),
                                   f" for {self.channels} channel(s)")
        else:
            self.blobs = [self.make_blob(shape) for _ in _BLOBS]
            self.fill_blob(self.blobs[0], p.slope_filler)
            self.fill_blob(self.blobs[1], p.bias_filler)
            self.blobs[2].data[...] = 0
            self.blobs[3].data[...] = 1
        pin_statistics(self, (2, 3), _BLOBS)
        self.x_norm = None  # xhat of the last forward
        self.inv_std = None  # r of the last forward

    def reshape(self, bottom, top):
        reshape_channels(self, bottom, top)

    def _view(self, array):
        return array.reshape(self.num, self.channels, self.spatial)

    def _channel(self, blob):
        return blob.data.reshape(self.channels)

    def forward_cpu(self, bottom, top):
        xp, dt = self.xp, self.dtype.type
        x = self._view(bottom[0].data)
        running_mean, running_inv_std = (self._channel(b) for b in self.blobs[2:])
        if self.batch_stats:
            mean, var = batch_moments(self, x)
            inv_std = 1 / xp.sqrt(var + dt(self.eps))
            keep = dt(self.momentum)
            running_mean[...] = (1 - keep) * mean + keep * running_mean
            running_inv_std[...] = (1 - keep) * inv_std + keep * running_inv_std
        else:
            mean, inv_std = running_mean.copy(), running_inv_std.copy()
        self.inv_std = inv_std
        self.x_norm = normalize(x, mean, inv_std)
        slope = self._channel(self.blobs[0])[None, :, None]
        bias = self._channel(self.blobs[1])[None, :, None]
        self._view(top[0].data)[...] = slope * self.x_norm + bias

    def backward_cpu(self, top, propagate_down, bottom):
        dy = self._view(top[0].diff)
        if not self.frozen:
            # Read dy before an in-place bottom diff overwrites it.
            if self.propagates_param(0):
                self._channel_diff(0)[...] += (dy * self.x_norm).sum(axis=(0, 2))
            if self.propagates_param(1):
                self._channel_diff(1)[...] += dy.sum(axis=(0, 2))
        if not propagate_down[0]:
            return
        g = dy * self._channel(self.blobs[0])[None, :, None]  # dE/dxhat
        if self.batch_stats:
            dx = normalize_backward(g, self.x_norm, self.inv_std)
        else:
            dx = g * self.inv_std[None, :, None]
        self._view(bottom[0].diff)[...] = dx

    def _channel_diff(self, index):
        return self.blobs[index].diff.reshape(self.channels)
