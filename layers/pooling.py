"""Pooling: MAX or AVE over 2-D windows of each channel plane.

See docs/layers/pooling.md.
"""

import numpy as np

from netlite.errors import LayerSetupError, ShapeError
from netlite.layer import Layer, cached_reshape
from netlite.layers._im2col import col2im, im2col, window_table
from netlite.proto import netlite_pb2
from netlite.registry import register_layer

MAX = netlite_pb2.PoolingParameter.MAX
AVE = netlite_pb2.PoolingParameter.AVE
STOCHASTIC = netlite_pb2.PoolingParameter.STOCHASTIC
CEIL = netlite_pb2.PoolingParameter.CEIL
FLOOR = netlite_pb2.PoolingParameter.FLOOR

#: Caffe starts every running maximum at -FLT_MAX (float's, for both dtypes).
FLT_MAX = float(np.finfo(np.float32).max)


def pooled_size(size, kernel, stride, pad, round_mode=CEIL):
    """Caffe's output length of one pooled axis.

    ``ceil`` (or ``floor``) of ``(size + 2 pad - kernel) / stride``, plus 1;
    then, only when ``pad > 0``, one less if the last window would start in
    the bottom/right padding (at or beyond ``size + pad``).
    """
    span = size + 2 * pad - kernel
    pooled = (-(-span // stride) if round_mode == CEIL else span // stride) + 1
    if pad > 0 and (pooled - 1) * stride >= size + pad:
        pooled -= 1
    return pooled


@register_layer("Pooling")
class PoolingLayer(Layer):
    r"""Max or average pooling of 4-D blobs, with Caffe's window rules.

    Type ``"Pooling"``.  Bottom: ``(N, C, H, W)``.  Tops: ``(N, C, PH, PW)``,
    plus, for MAX only, an optional second top of the same shape holding
    the argmax of each window as a float (flat index ``h * W + w`` inside
    its channel plane; -1 for a window that holds no input element).

    Parameters (``pooling_param``): ``pool`` MAX (default) | AVE |
    STOCHASTIC (not implemented, as on Caffe's CPU); ``kernel_size`` or
    ``kernel_h`` + ``kernel_w``; ``stride`` (1) or ``stride_h`` +
    ``stride_w``; ``pad`` (0) or ``pad_h`` + ``pad_w`` (must be below the
    kernel); ``global_pooling`` (False: kernel = the whole plane, with pad 0
    and stride 1); ``round_mode`` CEIL (default) | FLOOR.

    Window ``(i, j)`` starts at ``(i s_h - p_h, j s_w - p_w)``.  MAX takes
    the largest element of the window clipped to the image; ties go to the
    first in raster order.  AVE sums the in-image elements and divides by
    the window area clipped to the padded image ``[-p, H + p)``:

    .. math::
        y_w = \frac{1}{|w \cap [-p, H + p)|}
              \sum_{(h, v) \in w \cap \text{image}} x_{h, v}

    See docs/layers/pooling.md.
    """

    exact_num_bottom_blobs = 1
    min_top_blobs = 1
    max_top_blobs = 2

    def __init__(self, layer_param=None, **kwargs):
        super().__init__(layer_param, **kwargs)
        # Caffe's MaxTopBlobs: the mask top exists for MAX only.
        self.pool = self.layer_param.pooling_param.pool
        self.max_top_blobs = 2 if self.pool == MAX else 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.pooling_param
        what = self.describe()
        if self.pool == STOCHASTIC:
            raise LayerSetupError(
                f"{what}: STOCHASTIC pooling is not implemented (Caffe has it "
                "on the GPU only); use MAX or AVE"
            )
        if self.pool not in (MAX, AVE):
            raise LayerSetupError(f"{what}: unknown pooling method {self.pool}")
        has = p.HasField
        self.global_pooling = bool(p.global_pooling)
        if self.global_pooling:
            if has("kernel_size") or has("kernel_h") or has("kernel_w"):
                raise LayerSetupError(
                    f"{what}: with global_pooling the kernel size cannot be given"
                )
        elif has("kernel_size") == (has("kernel_h") and has("kernel_w")):
            raise LayerSetupError(
                f"{what}: give kernel_size, or both kernel_h and kernel_w "
                "(not both forms)"
            )
        if has("pad") and (has("pad_h") or has("pad_w")) or (
                has("pad_h") != has("pad_w")):
            raise LayerSetupError(f"{what}: give pad, or both pad_h and pad_w")
        if has("stride") and (has("stride_h") or has("stride_w")) or (
                has("stride_h") != has("stride_w")):
            raise LayerSetupError(
                f"{what}: give stride, or both stride_h and stride_w"
            )
        if has("kernel_size"):
            self.kernel = (int(p.kernel_size),) * 2
        else:
            self.kernel = (int(p.kernel_h), int(p.kernel_w))
        self.pad = ((int(p.pad_h), int(p.pad_w)) if has("pad_h")
                    else (int(p.pad),) * 2)
        self.stride = ((int(p.stride_h), int(p.stride_w)) if has("stride_h")
                       else (int(p.stride),) * 2)
        self.round_mode = p.round_mode
        if self.global_pooling:
            if self.pad != (0, 0) or self.stride != (1, 1):
                raise LayerSetupError(
                    f"{what}: with global_pooling only pad = 0 and stride = 1 "
                    f"are allowed (got pad {self.pad}, stride {self.stride})"
                )
        else:
            if min(self.kernel) <= 0:
                raise LayerSetupError(
                    f"{what}: kernel dimensions must be positive, got {self.kernel}"
                )
            if self.pad[0] >= self.kernel[0] or self.pad[1] >= self.kernel[1]:
                raise LayerSetupError(
                    f"{what}: pad {self.pad} must be smaller than the kernel "
                    f"{self.kernel}"
                )
        if min(self.stride) <= 0:
            raise LayerSetupError(
                f"{what}: stride must be positive, got {self.stride}"
            )

    @cached_reshape
    def reshape(self, bottom, top):
        """Check the bottom; derive the output shape, the window tables and
        the argmax buffer; shape the tops."""
        x = bottom[0]
        if x.num_axes != 4:
            raise ShapeError(
                f"{self.describe()}: bottom[0] must have 4 axes (num, channels, "
                f"height, width), got shape {x.shape}"
            )
        n, c, h, w = x.shape
        if self.global_pooling:
            self.kernel = (h, w)
        out = tuple(
            pooled_size(size, k, s, p, self.round_mode)
            for size, k, s, p in zip((h, w), self.kernel, self.stride, self.pad)
        )
        if min(out) <= 0:
            raise ShapeError(
                f"{self.describe()}: bottom[0] {x.shape} is smaller than the "
                f"kernel {self.kernel} (pad {self.pad}, FLOOR rounding): no output"
            )
        self.out_shape = out
        self._build_tables(h, w)
        if self.pool == MAX:
            # Caffe's max_idx_: where each window's maximum was read.
            self.argmax = self.xp.empty((n, c) + out, dtype=np.int32)
        for t in top:
            t.reshape((n, c) + out)

    def _build_tables(self, h, w):
        """Window tables (see ``window_table``) and AVE divisors."""
        index, valid = window_table((h, w), self.kernel, self.stride, self.pad,
                                    (1, 1), self.out_shape)
        self.win_index = self.xp.asarray(index)           # (kh*kw, PH*PW)
        self.win_valid = self.xp.asarray(valid)
        # AVE divides by the window clipped to the padded image [-p, size+p);
        # a window past the data (stride > kernel, CEIL) gets divisor 1.
        sizes = []
        for size, k, s, p, o in zip((h, w), self.kernel, self.stride, self.pad,
                                    self.out_shape):
            start = np.arange(o) * s - p
            sizes.append(np.minimum(start + k, size + p) - start)
        area = np.maximum(sizes[0][:, None] * sizes[1][None, :], 1)
        self.pool_area = self.xp.asarray(area.astype(self.dtype))    # (PH, PW)

    # ---------------------------------------------------------- reference
    def forward_cpu(self, bottom, top):
        xp = self.xp
        x = bottom[0].data
        n, c = x.shape[:2]
        vals = im2col(x.reshape(n, c, -1), self.win_index)   # (N, C, K, P)
        dt = vals.dtype.type
        if self.pool == AVE:
            vals = xp.where(self.win_valid, vals, dt(0))
            y = vals.sum(axis=2) / self.pool_area.reshape(-1)
            top[0].data[...] = y.reshape(top[0].shape)
            return
        # Caffe's running maximum starts at -FLT_MAX and moves only on a
        # strictly larger element: NaN, -inf and the padding never win and
        # the first maximum in raster order keeps ties.  argmax returns the
        # first maximum, so mask the losers with -inf and take it.
        candidate = self.win_valid & (vals > dt(-FLT_MAX))
        vals = xp.where(candidate, vals, dt(-np.inf))
        k = vals.argmax(axis=2)                              # (N, C, P)
        best = vals.max(axis=2)
        where = self.win_index[k, xp.arange(k.shape[-1])]
        empty = best == dt(-np.inf)
        top[0].data[...] = xp.where(empty, dt(-FLT_MAX), best).reshape(
            top[0].shape)
        self.argmax[...] = xp.where(empty, -1, where).reshape(self.argmax.shape)
        if len(top) > 1:
            top[1].data[...] = self.argmax

    def backward_cpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        x = bottom[0]
        n, c, h, w = x.shape
        dy = top[0].diff.reshape(n * c, -1)                 # (N*C, P)
        if self.pool == MAX:
            # dx[argmax] += dy; overlapping windows may share an argmax (the
            # scatter sums them); empty windows (argmax -1) send nothing.
            idx = self.argmax.reshape(n * c, -1)
            dx = col2im(self.xp, dy, idx, n * c, h * w, keep=idx >= 0)
        else:
            # Every in-image element of a window gets dy / area.
            share = (dy / self.pool_area.reshape(-1))[:, None, :]   # (NC, 1, P)
            dx = col2im(self.xp, share, self.win_index, n * c, h * w,
                        keep=self.win_valid)
        x.diff[...] = dx.reshape(x.shape)

    # ------------------------------------------------------------ engines
    def forward_numba(self, bottom, top):
        self.adapter("numba").forward(bottom, top)

    def backward_numba(self, top, propagate_down, bottom):
        self.adapter("numba").backward(top, propagate_down, bottom)
