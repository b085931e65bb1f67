"""Convolution: N-D cross-correlation with learned filters, as im2col + GEMM.

See docs/layers/convolution.md.
"""

import numpy as np

from netlite.errors import LayerSetupError, ShapeError
from netlite.layer import Layer
from netlite.registry import register_layer


def window_table(in_shape, kernel, stride, pad, dilation, out_shape):
    """Where every kernel tap of every output position reads its input.

    Parameters
    ----------
    in_shape, kernel, stride, pad, dilation, out_shape : tuple of int
        One entry per spatial axis (all of the same length ``d >= 0``).

    Returns
    -------
    index : ndarray of int64, shape (prod(kernel), prod(out_shape))
        ``index[k, p]`` is the flat (row-major) position inside one input
        plane read by kernel tap ``k`` at output position ``p``; both are
        raster-order indices.  Taps that fall into the padding read 0.
    valid : ndarray of bool, same shape
        False where the tap falls into the zero padding.

    Notes
    -----
    Along axis ``i`` the tap ``k_i`` of output ``o_i`` reads input
    ``o_i * stride_i - pad_i + k_i * dilation_i``, which is valid when it
    lies in ``[0, in_shape_i)``.
    """
    d = len(in_shape)
    index = np.zeros((1,) * (2 * d), dtype=np.int64)
    valid = np.ones((1,) * (2 * d), dtype=bool)
    for i in range(d):
        taps = np.arange(kernel[i])[:, None]
        outs = np.arange(out_shape[i])[None, :]
        pos = outs * stride[i] - pad[i] + taps * dilation[i]
        shape = [1] * (2 * d)
        shape[i], shape[d + i] = kernel[i], out_shape[i]
        pos = pos.reshape(shape)
        valid = valid & (pos >= 0) & (pos < in_shape[i])
        index = index * in_shape[i] + pos
    index = np.where(valid, index, 0)
    taps, outs = int(np.prod(kernel)), int(np.prod(out_shape))
    return index.reshape(taps, outs), valid.reshape(taps, outs)


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
        try:
            self.channel_axis = bottom[0].canonical_axis_index(p.axis)
        except IndexError as exc:
            raise LayerSetupError(
                f"{self.describe()}: convolution_param.axis: {exc}"
            ) from None
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
        weight_shape = (self.num_output, self.channels // self.group,
                        *self.kernel_shape)
        if self.blobs:
            self._check_given_blobs(weight_shape)
        else:
            self.blobs = [self.make_blob(weight_shape)]
            self.fill_blob(self.blobs[0], p.weight_filler)
            if self.bias_term:
                self.blobs.append(self.make_blob((self.num_output,)))
                self.fill_blob(self.blobs[1], p.bias_filler)
        self.force_nd_im2col = bool(p.force_nd_im2col)
        self._bottom_shape = None
        self._scratch = {}
        self._col_cached = []

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

    def _check_given_blobs(self, weight_shape):
        expected = 1 + self.bias_term
        if len(self.blobs) != expected:
            raise LayerSetupError(
                f"{self.describe()}: expected {expected} parameter blob(s) "
                f"(bias_term={self.bias_term}), got {len(self.blobs)}"
            )
        if self.blobs[0].shape != weight_shape:
            raise ShapeError(
                f"{self.describe()}: incorrect weight shape: expected "
                f"{weight_shape}, got {self.blobs[0].shape}"
            )
        if self.bias_term and self.blobs[1].shape != (self.num_output,):
            raise ShapeError(
                f"{self.describe()}: incorrect bias shape: expected "
                f"{(self.num_output,)}, got {self.blobs[1].shape}"
            )

    def reshape(self, bottom, top):
        x = bottom[0]
        if x.shape != self._bottom_shape:
            self._set_geometry(x)
        for i, b in enumerate(bottom[1:], start=1):
            if b.shape != x.shape:
                raise ShapeError(
                    f"{self.describe()}: every bottom must have the shape of "
                    f"bottom[0] {x.shape}; bottom[{i}] is {b.shape}"
                )
        for t in top:
            if t.shape != self._top_shape:
                t.reshape(self._top_shape)
        # The numba engine's im2col buffers are only reusable in backward
        # when its own forward filled them for these bottoms.
        self._col_cached = [False] * len(bottom)

    def _set_geometry(self, x):
        """Check bottom[0]'s shape; derive the output shape and the window
        table (cached until the bottom shape changes)."""
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
        in_shape = x.shape[axis + 1:]
        out_shape = []
        for i, size in enumerate(in_shape):
            extent = self.dilation[i] * (self.kernel_shape[i] - 1) + 1
            out = (size + 2 * self.pad[i] - extent) // self.stride[i] + 1
            if out <= 0:
                raise ShapeError(
                    f"{what}: spatial axis {i} of bottom[0] {x.shape} (size "
                    f"{size}, pad {self.pad[i]}) is smaller than the dilated "
                    f"kernel extent {extent}"
                )
            out_shape.append(out)
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape)
        self.num = x.count_range(0, axis)
        self._plane = int(np.prod(self.in_shape, dtype=np.int64))
        self._top_shape = x.shape[:axis] + (self.num_output,) + self.out_shape
        index, valid = window_table(self.in_shape, self.kernel_shape, self.stride,
                                    self.pad, self.dilation, self.out_shape)
        self._win_index = self.xp.asarray(index)
        self._win_outside = self.xp.asarray(~valid)
        self._win_any_outside = bool((~valid).any())
        self._bottom_shape = x.shape

    # ---------------------------------------------------------- reference
    def _im2col(self, x):
        """``(*batch, C, *in)`` -> columns ``(num, G, C/G * prod(k), P)``."""
        col = x.reshape(self.num, self.channels, self._plane)[:, :, self._win_index]
        if self._win_any_outside:
            col[:, :, self._win_outside] = 0
        return col.reshape(self.num, self.group, -1, col.shape[-1])

    def _col2im(self, dcol, shape):
        """Adjoint of :meth:`_im2col`: add every column entry back onto the
        input element it was read from (bincount sums the overlaps)."""
        xp = self.xp
        plane, planes = self._plane, self.num * self.channels
        dcol = dcol.reshape(planes, *self._win_index.shape)
        if self._win_any_outside:
            dcol = xp.where(self._win_outside, dcol.dtype.type(0), dcol)
        offsets = xp.arange(planes, dtype=np.int64)[:, None, None] * plane
        target = offsets + self._win_index
        dx = xp.bincount(target.ravel(), weights=dcol.ravel(),
                         minlength=planes * plane)
        return dx.reshape(shape)

    def _weights_by_group(self):
        g = self.group
        return self.blobs[0].data.reshape(g, self.num_output // g, -1)

    def forward_cpu(self, bottom, top):
        xp = self.xp
        w = self._weights_by_group()                    # (G, O/G, Kg)
        for b, t in zip(bottom, top):
            col = self._im2col(b.data)                  # (num, G, Kg, P)
            y = xp.matmul(w, col)                       # (num, G, O/G, P)
            y = y.reshape(self.num, self.num_output, -1)
            if self.bias_term:
                y += self.blobs[1].data[:, None]
            t.data[...] = y.reshape(t.shape)

    def backward_cpu(self, top, propagate_down, bottom):
        xp = self.xp
        g, og = self.group, self.num_output // self.group
        w = self._weights_by_group()
        want_w = self.propagates_param(0)
        want_b = self.bias_term and self.propagates_param(1)
        for i, (b, t) in enumerate(zip(bottom, top)):
            dy = t.diff.reshape(self.num, g, og, -1)   # (num, G, O/G, P)
            if want_b:
                self.blobs[1].diff += dy.sum(axis=(0, 3)).reshape(-1)
            if want_w:
                col = self._im2col(b.data)
                # One GEMM per group over the whole batch: bring the batch
                # axis next to the spatial one, then contract over both.
                dy_g = dy.transpose(1, 2, 0, 3).reshape(g, og, -1)
                col_g = col.transpose(1, 0, 3, 2).reshape(g, -1, col.shape[2])
                self.blobs[0].diff += xp.matmul(dy_g, col_g).reshape(
                    self.blobs[0].shape
                )
            if propagate_down[i]:
                dcol = xp.matmul(w.transpose(0, 2, 1), dy)  # (num, G, Kg, P)
                b.diff[...] = self._col2im(dcol, b.shape)

    # -------------------------------------------------------------- numba
    def _numba_geometry(self):
        """The 2-D view the numba kernels work on, or None to fall back.

        0-D and 1-D convolutions are 2-D ones with unit leading axes; 3-D
        and higher (or ``force_nd_im2col``) use the N-D reference.
        """
        n = self.num_spatial_axes
        if n > 2 or self.force_nd_im2col:
            return None

        def as_2d(values, one):
            return (one,) * (2 - n) + tuple(values)

        return (as_2d(self.in_shape, 1), as_2d(self.kernel_shape, 1),
                as_2d(self.stride, 1), as_2d(self.pad, 0),
                as_2d(self.dilation, 1), as_2d(self.out_shape, 1))

    def _buffer(self, name, shape):
        """A grow-only scratch array, so steady-state passes allocate nothing."""
        size = int(np.prod(shape, dtype=np.int64))
        buf = self._scratch.get(name)
        if buf is None or buf.size < size or buf.dtype != self.dtype:
            buf = np.empty(max(size, 1), dtype=self.dtype)
            self._scratch[name] = buf
        return buf[:size].reshape(shape)

    def _group_rows(self):
        """Per group, its rows of the weight matrix ``(O, kg)`` and of the
        column matrix ``(C * prod(k), N * P)``; ``kg = C/G * prod(k)``."""
        og = self.num_output // self.group
        kg = self.blobs[0].count // self.num_output
        return [(slice(g * og, (g + 1) * og), slice(g * kg, (g + 1) * kg))
                for g in range(self.group)]

    def forward_numba(self, bottom, top):
        geo = self._numba_geometry()
        if geo is None:
            self.forward_cpu(bottom, top)
            return
        from netlite.layers import convolution_numba as kern

        (h, w), k, s, p, d, (oh, ow) = geo
        n, c, o = self.num, self.channels, self.num_output
        wmat = self.blobs[0].data.reshape(o, -1)
        if self.bias_term:
            bias = self.blobs[1].data
        else:
            bias = self._buffer("zero_bias", (o,))
            bias[...] = 0
        ybuf = self._buffer("y", (o, n * oh * ow))
        for i, (b, t) in enumerate(zip(bottom, top)):
            col = self._buffer(f"col{i}", (c * k[0] * k[1], n * oh * ow))
            kern.conv_im2col(b.data.reshape(n, c, h, w), col, *k, *s, *p, *d,
                             oh, ow)
            self._col_cached[i] = True
            for o_rows, k_rows in self._group_rows():
                np.matmul(wmat[o_rows], col[k_rows], out=ybuf[o_rows])
            kern.conv_fwd_output(ybuf, bias, t.data.reshape(n, o, oh * ow))

    def backward_numba(self, top, propagate_down, bottom):
        geo = self._numba_geometry()
        if geo is None:
            self.backward_cpu(top, propagate_down, bottom)
            return
        from netlite.layers import convolution_numba as kern

        (h, w), k, s, p, d, (oh, ow) = geo
        n, c, o = self.num, self.channels, self.num_output
        wmat = self.blobs[0].data.reshape(o, -1)
        want_w = self.propagates_param(0)
        want_b = self.bias_term and self.propagates_param(1)
        groups = self._group_rows()
        for i, (b, t) in enumerate(zip(bottom, top)):
            if not (want_w or want_b or propagate_down[i]):
                continue
            dy3 = t.diff.reshape(n, o, oh * ow)
            if propagate_down[i]:
                dybuf = self._buffer("dy", (o, n * oh * ow))
                kern.conv_bwd_top_diff(dy3, dybuf)
            if want_b:
                db = self._buffer("db", (o,))
                # Sum the (O, N*P) copy's contiguous rows when there is one.
                np.sum(dybuf if propagate_down[i] else dy3,
                       axis=1 if propagate_down[i] else (0, 2), out=db)
                self.blobs[1].diff += db
            if want_w:
                col = self._buffer(f"col{i}", (c * k[0] * k[1], n * oh * ow))
                if not self._col_cached[i]:
                    # The last forward did not fill it (other engine, or a
                    # reshape since): rebuild without marking it cached.
                    kern.conv_im2col(b.data.reshape(n, c, h, w), col, *k, *s, *p,
                                     *d, oh, ow)
                dyt = self._buffer("dyt", (n * oh * ow, o))
                kern.conv_bwd_top_diff_t(dy3, dyt)
                # dW^T = col @ dy^T per group, (kg, N*P) @ (N*P, og): two
                # row-major operands, faster in BLAS than dy @ col.T.
                dwt = self._buffer("dwt", (wmat.shape[1], o))
                for o_rows, k_rows in groups:
                    np.matmul(col[k_rows], dyt[:, o_rows], out=dwt[:, o_rows])
                self.blobs[0].diff.reshape(wmat.shape)[...] += dwt.T
            if propagate_down[i]:
                # The columns are spent: their gradient reuses the buffer,
                # which keeps the working set (and cache misses) smaller.
                dcol = self._buffer(f"col{i}", (c * k[0] * k[1], n * oh * ow))
                self._col_cached[i] = False
                for o_rows, k_rows in groups:
                    np.matmul(wmat[o_rows].T, dybuf[o_rows], out=dcol[k_rows])
                kern.conv_col2im(dcol, b.diff.reshape(n, c, h, w), *k, *s, *p, *d,
                                 oh, ow)
