"""Convolution: N-D cross-correlation with learned filters, as im2col + GEMM.

See docs/layers/convolution.md.
"""

import numpy as np

from netlite.errors import LayerSetupError, ShapeError
from netlite.layer import Layer, cached_reshape
from netlite.layers._im2col import col2im, im2col, window_table
from netlite.registry import register_layer


@register_layer("Convolution")
class ConvolutionLayer(Layer):
    r"""Convolve each bottom with the same learned filter bank.

    Type ``"Convolution"``.  Bottoms: one or more blobs of one shape
    ``(*batch, C, *spatial)``, the channel axis given by ``axis`` (default
    1; the axes before it are batch axes, the ones after it spatial, of
    which there may be any number, zero included).  Tops: one per bottom,
    ``(*batch, num_output, *out)`` with, per spatial axis,

    .. math:: out = \lfloor (in + 2 p - (d (k - 1) + 1)) / s \rfloor + 1 .

    Parameters (``convolution_param``): ``num_output`` (required),
    ``bias_term`` (True), ``kernel_size`` / ``kernel_h``+``kernel_w``
    (required), ``stride`` (1) / ``stride_h``+``stride_w``, ``pad`` (0) /
    ``pad_h``+``pad_w``, ``dilation`` (1), ``group`` (1), ``weight_filler``
    and ``bias_filler`` (constant 0), ``axis`` (1), ``force_nd_im2col``
    (numba engine only: use the N-D reference for 2-D inputs too).  Repeated
    fields are given once for every spatial axis or once per axis; the
    ``_h``/``_w`` forms are for 2-D only.

    Blobs: ``blobs[0]`` weights ``(num_output, C / group, *kernel)``,
    ``blobs[1]`` bias ``(num_output,)``.  With ``G`` groups, output channel
    ``o`` of group ``g`` sees only the input channels of group ``g``:

    .. math::
        y_{n,o,\mathbf{q}} = b_o + \sum_{c \in g(o)} \sum_{\mathbf{k}}
        W_{o,c,\mathbf{k}}\, x_{n,c,\mathbf{q} s - p + \mathbf{k} d}

    (zero outside the input).  The reference forward gathers all patches
    (im2col) and runs one batched GEMM per group; backward accumulates the
    weight and bias diffs over images, groups and bottoms and overwrites
    the bottom diffs (col2im).  See docs/layers/convolution.md.
    """

    min_bottom_blobs = 1
    min_top_blobs = 1
    equal_num_bottom_top_blobs = True

    # ------------------------------------------------------------ set-up
    def layer_setup(self, bottom, top):
        p = self.layer_param.convolution_param
        self.channel_axis = self.canonical_axis(bottom[0], p.axis,
                                                "convolution_param.axis")
        self.num_spatial_axes = bottom[0].num_axes - self.channel_axis - 1
        self.kernel_shape = self._spatial_param("kernel_size", "kernel_h",
                                                "kernel_w", None)
        self.stride = self._spatial_param("stride", "stride_h", "stride_w", 1)
        self.pad = self._spatial_param("pad", "pad_h", "pad_w", 0)
        self.dilation = self._spatial_param("dilation", None, None, 1)
        for name, values in (("kernel", self.kernel_shape),
                             ("stride", self.stride),
                             ("dilation", self.dilation)):
            if any(v <= 0 for v in values):
                raise LayerSetupError(
                    f"{self.describe()}: {name} dimensions must be positive, "
                    f"got {values}"
                )
        self.channels = bottom[0].shape[self.channel_axis]
        self.num_output = int(p.num_output)
        self.group = int(p.group)
        if self.num_output <= 0:
            raise LayerSetupError(
                f"{self.describe()}: convolution_param.num_output must be > 0"
            )
        if self.group <= 0 or self.channels % self.group:
            raise LayerSetupError(
                f"{self.describe()}: the {self.channels} input channels of "
                f"bottom[0] {bottom[0].shape} are not divisible into "
                f"group={self.group} groups"
            )
        if self.num_output % self.group:
            raise LayerSetupError(
                f"{self.describe()}: num_output={self.num_output} is not a "
                f"multiple of group={self.group}"
            )
        self.bias_term = bool(p.bias_term)
        self.force_nd_im2col = bool(p.force_nd_im2col)
        shapes = [(self.num_output, self.channels // self.group, *self.kernel_shape)]
        if self.bias_term:
            shapes.append((self.num_output,))
        if self.blobs:
            self.check_param_blobs(shapes, ["weight", "bias"][:len(shapes)],
                                   f" (bias_term={self.bias_term})")
            return
        self.blobs = [self.make_blob(shape) for shape in shapes]
        self.fill_blob(self.blobs[0], p.weight_filler)
        if self.bias_term:
            self.fill_blob(self.blobs[1], p.bias_filler)

    def _spatial_param(self, name, h_name, w_name, default):
        """Read a repeated spatial field (or its ``_h``/``_w`` pair)."""
        p = self.layer_param.convolution_param
        n = self.num_spatial_axes
        what = self.describe()
        if h_name is not None and (p.HasField(h_name) or p.HasField(w_name)):
            if n != 2:
                raise LayerSetupError(
                    f"{what}: {h_name} & {w_name} can only be used for 2-D "
                    f"convolution ({n} spatial axes)"
                )
            if len(getattr(p, name)):
                raise LayerSetupError(
                    f"{what}: give either {name} or {h_name}/{w_name}, not both"
                )
            if default is None and not (p.HasField(h_name) and p.HasField(w_name)):
                raise LayerSetupError(
                    f"{what}: a non-square kernel needs both {h_name} and {w_name}"
                )
            return (int(getattr(p, h_name)), int(getattr(p, w_name)))
        values = [int(v) for v in getattr(p, name)]
        if not values:
            if default is None and n > 0:
                raise LayerSetupError(
                    f"{what}: convolution_param needs kernel_size or "
                    "kernel_h and kernel_w"
                )
            return (default,) * n
        if len(values) not in (1, n):
            raise LayerSetupError(
                f"{what}: {name} must be given once, or once per spatial "
                f"dimension ({name} given {len(values)} times; {n} spatial dims)"
            )
        return tuple(values) if len(values) == n else (values[0],) * n

    @cached_reshape
    def reshape(self, bottom, top):
        x = bottom[0]
        self._set_geometry(x)
        for i, other in enumerate(bottom[1:], start=1):
            if other.shape != x.shape:
                raise ShapeError(
                    f"{self.describe()}: every bottom must have the shape of "
                    f"bottom[0] {x.shape}; bottom[{i}] is {other.shape}"
                )
        for t in top:
            t.reshape(x.shape[:self.channel_axis] + (self.num_output,)
                      + self.out_shape)

    def _set_geometry(self, x):
        """Check bottom[0]'s shape; derive the output shape and the window
        table (``window_table``: where every tap reads)."""
        what = self.describe()
        axis = self.channel_axis
        if x.num_axes != axis + 1 + self.num_spatial_axes:
            raise ShapeError(
                f"{what}: bottom[0] {x.shape} has {x.num_axes} axes; the layer "
                f"was set up for {axis + 1 + self.num_spatial_axes}"
            )
        if x.shape[axis] != self.channels:
            raise ShapeError(
                f"{what}: bottom[0] {x.shape} has {x.shape[axis]} channels on "
                f"axis {axis}; the weights expect {self.channels}"
            )
        self.in_shape = x.shape[axis + 1:]
        out_shape = []
        for i, size in enumerate(self.in_shape):
            extent = self.dilation[i] * (self.kernel_shape[i] - 1) + 1
            out = (size + 2 * self.pad[i] - extent) // self.stride[i] + 1
            if out <= 0:
                raise ShapeError(
                    f"{what}: spatial axis {i} of bottom[0] {x.shape} (size "
                    f"{size}, pad {self.pad[i]}) is smaller than the dilated "
                    f"kernel extent {extent}"
                )
            out_shape.append(out)
        self.out_shape = tuple(out_shape)
        self.num = x.count_range(0, axis)
        self.plane = int(np.prod(self.in_shape, dtype=np.int64))
        index, valid = window_table(self.in_shape, self.kernel_shape, self.stride,
                                    self.pad, self.dilation, self.out_shape)
        self.win_index = self.xp.asarray(index)
        self.win_outside = self.xp.asarray(~valid) if not valid.all() else None

    # ---------------------------------------------------------- reference
    def im2col(self, x):
        """``x`` ``(*batch, C, *in)`` -> ``col`` ``(N, G, K_g, P)``."""
        planes = x.reshape(self.num, self.channels, self.plane)
        col = im2col(planes, self.win_index, self.win_outside)
        return col.reshape(self.num, self.group, -1, col.shape[-1])

    def col2im(self, dcol, shape):
        """Adjoint of :meth:`im2col`: ``dcol`` ``(N, G, K_g, P)`` -> ``dx``."""
        planes = self.num * self.channels
        dcol = dcol.reshape(planes, *self.win_index.shape)
        keep = None if self.win_outside is None else ~self.win_outside
        return col2im(self.xp, dcol, self.win_index, planes, self.plane,
                      keep).reshape(shape)

    def forward_cpu(self, bottom, top):
        G = self.group
        W = self.blobs[0].data.reshape(G, self.num_output // G, -1)  # W_g
        for x, y in zip(bottom, top):
            col = self.im2col(x.data)                       # (N, G, K_g, P)
            out = self.xp.matmul(W, col).reshape(self.num, self.num_output, -1)
            if self.bias_term:
                out += self.blobs[1].data[:, None]          # + b
            y.data[...] = out.reshape(y.shape)

    def backward_cpu(self, top, propagate_down, bottom):
        xp = self.xp
        G, og = self.group, self.num_output // self.group  # G, O/G
        W = self.blobs[0].data.reshape(G, og, -1)
        want_W = self.propagates_param(0)
        want_b = self.bias_term and self.propagates_param(1)
        for i, (x, y) in enumerate(zip(bottom, top)):
            dy = y.diff.reshape(self.num, G, og, -1)        # (N, G, O/G, P)
            if want_b:
                self.blobs[1].diff += dy.sum(axis=(0, 3)).reshape(-1)
            if want_W:
                col = self.im2col(x.data)
                # One GEMM per group over the whole batch: bring the batch
                # axis next to the spatial one, then contract over both.
                dy_g = dy.transpose(1, 2, 0, 3).reshape(G, og, -1)
                col_g = col.transpose(1, 0, 3, 2).reshape(G, -1, col.shape[2])
                self.blobs[0].diff += xp.matmul(dy_g, col_g).reshape(
                    self.blobs[0].shape
                )
            if propagate_down[i]:
                dcol = xp.matmul(W.transpose(0, 2, 1), dy)  # (N, G, K_g, P)
                x.diff[...] = self.col2im(dcol, x.shape)

    # ------------------------------------------------------------ engines
    def forward_numba(self, bottom, top):
        self.adapter("numba").forward(bottom, top)

    def backward_numba(self, top, propagate_down, bottom):
        self.adapter("numba").backward(top, propagate_down, bottom)
