"""BatchNorm: BVLC Caffe's batch normalization (no affine part).

See docs/layers/batch_norm.md.
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

_STATISTICS = ("mean accumulator", "variance accumulator", "scale factor")


@register_layer("BatchNorm")
class BatchNormLayer(Layer):
    r"""Normalize each channel to zero mean and unit variance.

    Type ``"BatchNorm"``.  With ``bottom[0]`` viewed as ``(N, C, S)``
    (``C = shape[1]``, 1 for a 1-D blob; ``S`` every further axis) and
    per-channel statistics over the ``m = N S`` values of a channel,

    .. math:: y = \frac{x - \mu_c}{\sqrt{\sigma_c^2 + \epsilon}} .

    Batch statistics (``use_global_stats`` false): :math:`\mu` the batch
    mean, :math:`\sigma^2` the **biased** batch variance; the forward then
    updates the three blobs (Caffe's unnormalised accumulators):
    ``s <- lambda s + 1``, ``A_mu <- mu + lambda A_mu``,
    ``A_var <- m / (m - 1) var + lambda A_var`` (factor 1 when m = 1).
    Global statistics: :math:`\mu = A_\mu / s`, :math:`\sigma^2 = A_{var} / s`
    (both 0 while s = 0).

    Bottoms / tops
        ``bottom[0]`` x, at least 1 axis; ``top[0]`` y, shaped like x
        (in-place allowed).

    Parameters (``batch_norm_param``)
        ``use_global_stats`` (default: true in the TEST phase, false in
        TRAIN), ``moving_average_fraction`` lambda (0.999, in [0, 1]),
        ``eps`` (1e-5, >= 0).

    Blobs ``[A_mu (C,), A_var (C,), s (1,)]``, zero at setup; the layer
    adds ``lr_mult: 0`` param specs for them (a given spec must say 0), and
    the backward never writes their diffs.  Follow it with
    ``Scale { bias_term: true }`` for the affine part.
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.batch_norm_param
        self.use_global_stats = (p.use_global_stats if p.HasField("use_global_stats")
                                 else self.phase == TEST)
        self.moving_average_fraction = float(p.moving_average_fraction)
        self.eps = float(p.eps)
        check_fraction(self, self.moving_average_fraction, "moving_average_fraction")
        check_eps(self, self.eps)
        _, self.channels, _ = channel_dims(self, bottom[0])
        shapes = [(self.channels,), (self.channels,), (1,)]
        if self.blobs:
            self.check_param_blobs(shapes, list(_STATISTICS),
                                   f" for {self.channels} channel(s)")
        else:
            self.blobs = [self.make_blob(shape) for shape in shapes]
            for blob in self.blobs:
                blob.data[...] = 0
        pin_statistics(self, range(3), _STATISTICS)
        self.x_norm = None  # xhat of the last forward
        self.inv_std = None  # 1 / sqrt(var + eps) of the last forward

    def reshape(self, bottom, top):
        reshape_channels(self, bottom, top)

    def _view(self, array):
        return array.reshape(self.num, self.channels, self.spatial)

    def forward_cpu(self, bottom, top):
        xp, dt = self.xp, self.dtype.type
        x = self._view(bottom[0].data)
        mean_acc, var_acc, factor = (b.data for b in self.blobs)
        if self.use_global_stats:
            # 1/s, or 0 while nothing has been accumulated (s = 0).
            scale = (factor != 0) / xp.where(factor == 0, dt(1), factor)
            mean, var = mean_acc * scale, var_acc * scale
        else:
            mean, var = batch_moments(self, x)
            lam = dt(self.moving_average_fraction)
            m = self.num * self.spatial
            correction = dt(m / (m - 1) if m > 1 else 1)
            factor *= lam
            factor += 1
            mean_acc[...] = mean + lam * mean_acc
            var_acc[...] = correction * var + lam * var_acc
        self.inv_std = 1 / xp.sqrt(var + dt(self.eps))
        # Kept for the backward: a later in-place layer may overwrite top.
        self.x_norm = normalize(x, mean, self.inv_std)
        self._view(top[0].data)[...] = self.x_norm

    def backward_cpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = self._view(top[0].diff)
        if self.use_global_stats:
            dx = dy * self.inv_std[None, :, None]
        else:
            dx = normalize_backward(dy, self.x_norm, self.inv_std)
        self._view(bottom[0].diff)[...] = dx
