"""Naive oracles: slow, obviously correct float64 versions of the layers.

Each function computes a layer's forward from its definition on the docs
page, with explicit loops where the layer vectorises, so that a test can
hold the layer to it (the STUMPY habit).  Inputs and outputs are float64
NumPy arrays; hyper-parameters are keyword arguments with the layer's
defaults.  Nothing here imports the layer under test.
"""

import math

import numpy as np

#: Caffe's probability floor (float32's FLT_MIN, in every dtype).
FLT_MIN = float(np.finfo(np.float32).tiny)

#: Caffe's running maximum starts at -FLT_MAX (float32's, in every dtype).
FLT_MAX = float(np.finfo(np.float32).max)


def _columns(shape, axis):
    """``(outer, C, inner)`` of ``shape`` around ``axis``."""
    axis %= len(shape)
    return (int(np.prod(shape[:axis])), shape[axis],
            int(np.prod(shape[axis + 1:])))


def relu(x, negative_slope=0.0):
    """``y = x`` for ``x > 0``, else ``negative_slope * x``."""
    y = np.empty_like(x)
    for i, v in enumerate(x.flat):
        y.flat[i] = v if v > 0 else negative_slope * v
    return y


def softmax(x, axis=1):
    """Softmax over ``axis``, column by column, max-subtracted."""
    outer, c, inner = _columns(x.shape, axis)
    xv = x.reshape(outer, c, inner)
    y = np.empty_like(xv)
    for i in range(outer):
        for k in range(inner):
            col = xv[i, :, k]
            e = np.array([math.exp(v - max(col)) for v in col])
            y[i, :, k] = e / e.sum()
    return y.reshape(x.shape)


def softmax_with_loss(x, labels, axis=1, ignore_label=None,
                      normalization="VALID"):
    """Caffe's SoftmaxWithLoss: ``(loss, dL/dx)`` for loss weight 1.

    ``normalization`` is one of FULL, VALID, BATCH_SIZE, NONE; the divisor
    is at least 1.
    """
    outer, c, inner = _columns(x.shape, axis)
    p = softmax(x, axis).reshape(outer, c, inner)
    lab = np.asarray(labels).reshape(outer, inner)
    loss, valid = 0.0, 0
    grad = np.zeros_like(p)
    for i in range(outer):
        for k in range(inner):
            label = int(lab[i, k])
            if ignore_label is not None and label == ignore_label:
                continue
            loss -= math.log(max(p[i, label, k], FLT_MIN))
            valid += 1
            grad[i, :, k] = p[i, :, k]
            grad[i, label, k] -= 1
    z = {"FULL": outer * inner, "VALID": valid, "BATCH_SIZE": outer,
         "NONE": 1}[normalization]
    z = max(1, z)
    return loss / z, grad.reshape(x.shape) / z


def inner_product(x, w, b=None, axis=1, transpose=False):
    """``y[m, n] = sum_k x[m, k] W[n, k] + b[n]`` (``W[k, n]`` transposed),
    the axes of ``x`` from ``axis`` on flattened into ``k``."""
    rows = int(np.prod(x.shape[:axis]))
    xm = x.reshape(rows, -1)
    wm = w.T if transpose else w
    n_out = wm.shape[0]
    y = np.zeros((rows, n_out))
    for m in range(rows):
        for n in range(n_out):
            y[m, n] = sum(xm[m, k] * wm[n, k] for k in range(xm.shape[1]))
            if b is not None:
                y[m, n] += b[n]
    return y.reshape(x.shape[:axis] + (n_out,))


def _around(x, operand_ndim, axis):
    """``x`` viewed as ``(outer, D, inner)`` around ``operand_ndim`` axes
    from ``axis`` (Caffe's Bias/Scale rule: a scalar operand means axis 0)."""
    axis = 0 if operand_ndim == 0 else axis % x.ndim
    outer = int(np.prod(x.shape[:axis]))
    d = int(np.prod(x.shape[axis:axis + operand_ndim]))
    return x.reshape(outer, d, -1)


def bias(x, b, axis=1):
    """``y[n, d, i] = x[n, d, i] + b[d]``, ``b`` covering ``b.ndim`` axes of
    ``x`` from ``axis``."""
    b = np.asarray(b, np.float64)
    xv = _around(x, b.ndim, axis)
    bv = b.reshape(-1)
    y = np.empty_like(xv)
    for n in range(xv.shape[0]):
        for d in range(xv.shape[1]):
            for i in range(xv.shape[2]):
                y[n, d, i] = xv[n, d, i] + bv[d]
    return y.reshape(x.shape)


def scale(x, s, b=None, axis=1):
    """``y[n, d, i] = x[n, d, i] * s[d] (+ b[d])``, ``s`` (and ``b``, of the
    same shape) covering ``s.ndim`` axes of ``x`` from ``axis``."""
    s = np.asarray(s, np.float64)
    xv = _around(x, s.ndim, axis)
    sv = s.reshape(-1)
    bv = None if b is None else np.asarray(b, np.float64).reshape(-1)
    y = np.empty_like(xv)
    for n in range(xv.shape[0]):
        for d in range(xv.shape[1]):
            for i in range(xv.shape[2]):
                y[n, d, i] = xv[n, d, i] * sv[d]
                if bv is not None:
                    y[n, d, i] += bv[d]
    return y.reshape(x.shape)


def prelu(x, a, channel_shared=False):
    """``y = x`` for ``x > 0``, else ``a[c] * x`` with ``c`` the channel
    (axis 1); one shared slope ``a`` when ``channel_shared``."""
    a = np.asarray(a, np.float64).reshape(-1)
    y = np.empty_like(x)
    for index in np.ndindex(*x.shape):
        v = x[index]
        slope = a[0] if channel_shared else a[index[1]]
        y[index] = v if v > 0 else slope * v
    return y


def eltwise(xs, operation="SUM", coeffs=None):
    """Element by element: ``SUM`` ``sum_k c_k x_k`` (all ``c_k = 1`` when
    ``coeffs`` is None), ``PROD`` ``prod_k x_k``, ``MAX`` ``max_k x_k``."""
    coeffs = [1.0] * len(xs) if coeffs is None else list(coeffs)
    y = np.empty_like(xs[0])
    for index in np.ndindex(*y.shape):
        values = [x[index] for x in xs]
        if operation == "SUM":
            y[index] = sum(c * v for c, v in zip(coeffs, values))
        elif operation == "PROD":
            y[index] = math.prod(values)
        else:
            y[index] = max(values)
    return y


def euclidean_loss(a, b):
    """``E = sum_i (a_i - b_i)^2 / (2 N)``, ``N = a.shape[0]``."""
    total = sum((u - v) ** 2 for u, v in zip(a.flat, b.flat))
    return total / (2 * a.shape[0])


def hinge_loss(x, labels, norm="L1"):
    """Caffe's one-vs-all HingeLoss: ``(loss, dL/dx)`` for loss weight 1.

    ``m[n, k] = max(0, 1 - t[n, k] x[n, k])`` with ``t = +1`` on the label and
    ``-1`` elsewhere; ``E = sum m / N`` (L1) or ``sum m^2 / N`` (L2, no 1/2);
    at ``m = 0`` the derivative is 0.  ``x`` is read as ``(N, count / N)``.
    """
    n_rows = x.shape[0]
    xm = x.reshape(n_rows, -1)
    lab = np.asarray(labels).reshape(-1)
    loss, grad = 0.0, np.zeros_like(xm)
    for n in range(n_rows):
        for k in range(xm.shape[1]):
            t = 1.0 if k == int(lab[n]) else -1.0
            m = max(0.0, 1.0 - t * xm[n, k])
            if norm == "L1":
                loss += m
                grad[n, k] = -t if m > 0 else 0.0
            else:
                loss += m * m
                grad[n, k] = -t * 2 * m
    return loss / n_rows, grad.reshape(x.shape) / n_rows


def accuracy(x, labels, top_k=1, axis=1, ignore_label=None):
    """``(accuracy, per_class)``: a position is correct when at most
    ``top_k`` classes score ``>=`` its label's score (ties count against
    the label); ignored positions are skipped; 0 when nothing is valid, and
    per class 0 for a class without valid positions."""
    outer, c, inner = _columns(x.shape, axis)
    xv = x.reshape(outer, c, inner)
    lab = np.asarray(labels).reshape(outer, inner)
    seen, hits = [0] * c, [0] * c
    for n in range(outer):
        for i in range(inner):
            label = int(lab[n, i])
            if ignore_label is not None and label == ignore_label:
                continue
            rank = sum(1 for j in range(c) if xv[n, j, i] >= xv[n, label, i])
            seen[label] += 1
            if rank <= top_k:
                hits[label] += 1
    valid = sum(seen)
    per_class = np.array([h / s if s else 0.0 for h, s in zip(hits, seen)])
    return (sum(hits) / valid if valid else 0.0), per_class


# ------------------------------------------- Convolution, Pooling, Dropout,
# ------------------------------------------- Flatten, Reshape, Split


def convolution(x, w, b=None, stride=None, pad=None, dilation=None, group=1,
                axis=1):
    """Caffe's convolution (a cross-correlation), loop by loop.

    ``x`` is ``(*batch, C, *in)`` around the channel ``axis``; ``w`` is
    ``(O, C / group, *kernel)``; ``stride``, ``pad``, ``dilation`` give one
    value per spatial axis (defaults 1, 0, 1).  With output channel ``o`` in
    group ``g``, input channel ``c = g C/G + c'``::

        y[n, o, q] = b[o] + sum_{c', k} w[o, c', k] x[n, c, q s - p + k d]

    where ``x`` reads 0 outside the input (the padding).
    """
    axis %= x.ndim
    batch, channels, in_shape = x.shape[:axis], x.shape[axis], x.shape[axis + 1:]
    d = len(in_shape)
    kernel = w.shape[2:]
    stride = tuple(stride or (1,) * d)
    pad = tuple(pad or (0,) * d)
    dilation = tuple(dilation or (1,) * d)
    out_shape = tuple(
        (in_shape[i] + 2 * pad[i] - (dilation[i] * (kernel[i] - 1) + 1))
        // stride[i] + 1
        for i in range(d)
    )
    xv = x.reshape((-1, channels) + in_shape)
    n_out = w.shape[0]
    o_g, c_g = n_out // group, channels // group
    y = np.zeros((xv.shape[0], n_out) + out_shape)
    for n in range(xv.shape[0]):
        for o in range(n_out):
            g = o // o_g
            for q in np.ndindex(*out_shape):
                total = 0.0 if b is None else b[o]
                for cp in range(c_g):
                    for k in np.ndindex(*kernel):
                        pos = tuple(q[i] * stride[i] - pad[i] + k[i] * dilation[i]
                                    for i in range(d))
                        if all(0 <= pos[i] < in_shape[i] for i in range(d)):
                            total += w[(o, cp) + k] * xv[(n, g * c_g + cp) + pos]
                y[(n, o) + q] = total
    return y.reshape(batch + (n_out,) + out_shape)


def pooled_size(size, kernel, stride, pad, round_mode="CEIL"):
    """Caffe's pooled length: ``ceil`` (or ``floor``) of ``(size + 2 pad -
    kernel) / stride``, plus 1; with ``pad > 0``, one less when the last
    window would start at or beyond ``size + pad``."""
    span = size + 2 * pad - kernel
    out = (math.ceil(span / stride) if round_mode == "CEIL"
           else math.floor(span / stride)) + 1
    if pad > 0 and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def pooling(x, pool="MAX", kernel=None, stride=(1, 1), pad=(0, 0),
            round_mode="CEIL", global_pooling=False):
    """Caffe's 2-D pooling of ``(N, C, H, W)``: ``(y, argmax)``.

    Window ``(i, j)`` starts at ``(i s_h - p_h, j s_w - p_w)``.  MAX: a
    running maximum from -FLT_MAX over the window clipped to the image, in
    raster order, moving only on a strictly larger element; ``argmax`` is
    the flat in-plane index ``h W + w`` of the winner (-1 when none).  AVE:
    the sum over the window clipped to the image, divided by the window's
    area clipped to the padded image (at least 1); ``argmax`` is None.
    """
    n_img, channels, height, width = x.shape
    if global_pooling:
        kernel = (height, width)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    out_h = pooled_size(height, kh, sh, ph, round_mode)
    out_w = pooled_size(width, kw, sw, pw, round_mode)
    y = np.zeros((n_img, channels, out_h, out_w))
    argmax = np.full(y.shape, -1.0)
    for n, c, i, j in np.ndindex(*y.shape):
        h0, w0 = i * sh - ph, j * sw - pw
        rows = range(max(h0, 0), min(h0 + kh, height))
        cols = range(max(w0, 0), min(w0 + kw, width))
        if pool == "MAX":
            best = -FLT_MAX
            for h in rows:
                for w in cols:
                    if x[n, c, h, w] > best:
                        best = x[n, c, h, w]
                        argmax[n, c, i, j] = h * width + w
            y[n, c, i, j] = best
        else:
            area = (min(h0 + kh, height + ph) - h0) * (min(w0 + kw, width + pw) - w0)
            total = sum(x[n, c, h, w] for h in rows for w in cols)
            y[n, c, i, j] = total / max(area, 1)
    return y, (argmax if pool == "MAX" else None)


def dropout(x, u=None, ratio=0.5):
    """Inverted dropout: ``y = x [u >= ratio] / (1 - ratio)`` for the
    uniforms ``u`` of a TRAIN pass; ``u=None`` is the TEST pass, ``y = x``."""
    y = np.empty_like(x)
    for i, v in enumerate(x.flat):
        if u is None:
            y.flat[i] = v
        else:
            y.flat[i] = v / (1.0 - ratio) if u.flat[i] >= ratio else 0.0
    return y


def _relabel(x, shape):
    """``x``'s values in C order under ``shape`` (same count), element by
    element."""
    y = np.empty(shape)
    assert y.size == x.size
    for i, v in enumerate(x.flat):
        y.flat[i] = v
    return y


def flatten(x, axis=1, end_axis=-1):
    """Axes ``axis .. end_axis`` (inclusive) merged into one; ``end_axis =
    axis - 1`` inserts an axis of 1."""
    a, e = axis % x.ndim, end_axis % x.ndim
    merged = 1
    for d in x.shape[a:e + 1]:
        merged *= d
    return _relabel(x, x.shape[:a] + (merged,) + x.shape[e + 1:])


def reshape(x, dims, axis=0, num_axes=-1):
    """Axes ``[axis, axis + num_axes)`` replaced by ``dims``: a 0 copies the
    bottom's dim at that position, one -1 is inferred from the count;
    a negative ``axis`` counts from after the last axis."""
    start = axis if axis >= 0 else x.ndim + axis + 1
    end = x.ndim if num_axes == -1 else start + num_axes
    shape = list(x.shape[:start]) + list(dims) + list(x.shape[end:])
    for j, d in enumerate(dims):
        if d == 0:
            shape[start + j] = x.shape[start + j]
    if -1 in shape:
        known = 1
        for d in shape:
            known *= d if d != -1 else 1
        shape[shape.index(-1)] = x.size // known
    return _relabel(x, tuple(shape))


def split(x, count):
    """``count`` copies of ``x``."""
    return [_relabel(x, x.shape) for _ in range(count)]


def _once_or_per_top(values, k):
    """Caffe's rule for repeated fields given once for every top or once
    per top: the value for top ``k``."""
    return values[k if len(values) > 1 else 0]


def input_tops(num_tops, shapes=(), fed=None):
    """Input's tops after setup and a forward.

    With ``shapes`` (given once for every top or once per top) each top is
    the zeros setup allocated; without, the arrays the caller ``fed``.
    Forward writes nothing either way.
    """
    if not shapes:
        return [np.array(a, dtype=np.float64) for a in fed]
    return [np.zeros(_once_or_per_top(shapes, k)) for k in range(num_tops)]


def bilinear_kernel(shape):
    """Caffe's bilinear filler for ``(N, C, K, K)``: element ``(n, c, y, x)``
    is ``(1 - |x/f - c0|) (1 - |y/f - c0|)``, ``f = ceil(K/2)``,
    ``c0 = (K - 1) / (2f)``."""
    k = shape[3]
    f = math.ceil(k / 2)
    c0 = (k - 1) / (2.0 * f)
    out = np.empty(shape)
    for i in range(out.size):
        x, y = i % k, (i // k) % shape[2]
        out.flat[i] = (1 - abs(x / f - c0)) * (1 - abs(y / f - c0))
    return out


def dummy_data(num_tops, shapes=(), fillers=(), num=(), channels=(), height=(),
               width=()):
    """DummyData's tops after a forward, for the deterministic fillers.

    Top ``k`` has the shape ``shapes`` gives for it, or else the legacy
    ``(num, channels, height, width)``, each given once or once per top.
    ``fillers`` holds none (constant 0), one for every top or one per top,
    each ``("constant", value)`` or ``("bilinear",)``.
    """
    out = []
    for k in range(num_tops):
        if shapes:
            shape = tuple(_once_or_per_top(shapes, k))
        else:
            shape = tuple(_once_or_per_top(v, k)
                          for v in (num, channels, height, width))
        kind = _once_or_per_top(fillers, k) if fillers else ("constant", 0.0)
        if kind[0] == "constant":
            out.append(np.full(shape, float(kind[1])))
        elif kind[0] == "bilinear":
            out.append(bilinear_kernel(shape))
        else:
            raise ValueError(f"no oracle for the {kind[0]!r} filler")
    return out
