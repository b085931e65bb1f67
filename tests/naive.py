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


def accuracy(x, labels, top_k=1, axis=1, ignore_label=None,
             min_is_better=False):
    """``(accuracy, per_class)``: a position is correct when at most
    ``top_k`` classes score ``>=`` its label's score (``<=`` with
    ``min_is_better``; ties count against the label); ignored positions
    are skipped; 0 when nothing is valid, and per class 0 for a class
    without valid positions."""
    outer, c, inner = _columns(x.shape, axis)
    xv = x.reshape(outer, c, inner)
    lab = np.asarray(labels).reshape(outer, inner)
    seen, hits = [0] * c, [0] * c
    for n in range(outer):
        for i in range(inner):
            label = int(lab[n, i])
            if ignore_label is not None and label == ignore_label:
                continue
            target = xv[n, label, i]
            if min_is_better:
                rank = sum(1 for j in range(c) if xv[n, j, i] <= target)
            else:
                rank = sum(1 for j in range(c) if xv[n, j, i] >= target)
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


# ------------------------------------------- Normalize, InnerProduct
# ------------------------------------------- (normalize), Scale (clamp),
# ------------------------------------------- Accuracy (min_is_better)

def normalize(x, normalize_type="L2", eps=1e-6):
    """happynear's Normalize: ``(y, norm)``, per sample and spatial
    position across axis 1; ``norm = sqrt(sum x^2 + eps)`` (L2) or
    ``sum |x| + eps`` (L1), ``y = x / norm``; norm has axis 1 of size 1."""
    n_, c = x.shape[0], x.shape[1]
    xv = x.reshape(n_, c, -1)
    y = np.empty_like(xv)
    norm = np.empty((n_, 1, xv.shape[2]))
    for n in range(n_):
        for s in range(xv.shape[2]):
            col = [float(v) for v in xv[n, :, s]]
            if normalize_type == "L2":
                value = math.sqrt(sum(v * v for v in col) + eps)
            else:
                value = sum(abs(v) for v in col) + eps
            norm[n, 0, s] = value
            for k in range(c):
                y[n, k, s] = col[k] / value
    return y.reshape(x.shape), norm.reshape((n_, 1) + x.shape[2:])


def normalize_rows(w, eps=1e-6):
    """Each row ``w_j / sqrt(|w_j|^2 + eps)`` (InnerProduct's ``normalize``)."""
    out = np.empty_like(w)
    for j in range(w.shape[0]):
        out[j] = w[j] / math.sqrt(sum(float(v) * v for v in w[j]) + eps)
    return out


def inner_product_normalized(x, w, b=None, axis=1, transpose=False, eps=1e-6):
    """InnerProduct with ``normalize: true``: the rows of the N x K matrix W
    (the columns of the stored K x N blob when ``transpose``) normalised
    with ``normalize_rows``, then ``inner_product``."""
    wm = w.T if transpose else w
    return inner_product(x, normalize_rows(wm, eps), b, axis, False)


def accuracy_min_is_better(x, labels, top_k=1, axis=1, ignore_label=None):
    """``accuracy`` with happynear's ``min_is_better``: a position is
    correct when at most ``top_k`` classes score ``<=`` its label's score
    (ties count against the label)."""
    return accuracy(x, labels, top_k, axis, ignore_label, min_is_better=True)


def multiplicative_margin_psi(c, m):
    """L-Softmax's ``psi_m`` from the angle: ``theta = acos(c)``,
    ``k = floor(m theta / pi)`` (at most ``m - 1``),
    ``psi = (-1)^k cos(m theta) - 2k``."""
    theta = math.acos(min(1.0, max(-1.0, c)))
    k = min(m - 1, math.floor(m * theta / math.pi))
    return (-1) ** k * math.cos(m * theta) - 2 * k


def margin_lambda(it, base=1.0, gamma=0.0, power=1.0, lambda_min=0.0):
    """``max(lambda_min, base * (1 + gamma * it)^(-power))``."""
    return max(lambda_min, base * (1.0 + gamma * it) ** (-power))


def large_margin_inner_product(x, w, labels, m=1, lam=1.0, ignore_label=None,
                               axis=1):
    """L-Softmax logits: ``w_j . x_i`` off target, on target
    ``(lam w.x + |w| |x| psi_m(cos theta)) / (1 + lam)``; an ignored row
    (and m = 1) keeps the plain inner product.  Norms below 1e-12 count
    as 1e-12 in the cosine."""
    shape = x.shape[:axis % x.ndim]
    xs = x.reshape(int(np.prod(shape)), -1)
    lab = np.asarray(labels).reshape(-1)
    z = np.zeros((xs.shape[0], w.shape[0]))
    for i, xi in enumerate(xs):
        nx = math.sqrt(sum(v * v for v in xi))
        for j, wj in enumerate(w):
            nw = math.sqrt(sum(v * v for v in wj))
            dot = sum(a * b for a, b in zip(xi, wj))
            z[i, j] = dot
            if m > 1 and lab[i] == j and lab[i] != ignore_label:
                c = dot / (max(nx, 1e-12) * max(nw, 1e-12))
                psi = multiplicative_margin_psi(c, m)
                z[i, j] = (lam * dot + nw * nx * psi) / (1 + lam)
    return z.reshape(shape + (w.shape[0],))


def margin_inner_product(x, w, labels, m=1, lam=1.0, ignore_label=None,
                         axis=1):
    """A-Softmax (SphereFace) logits: with ``w_hat_j = w_j / max(|w_j|,
    1e-12)`` and ``c = x . w_hat / max(|x|, 1e-12)``, ``x . w_hat_j`` off
    target and ``(lam x . w_hat + |x| psi_m(c)) / (1 + lam)`` on it; an
    ignored row (and m = 1) keeps the plain ``x . w_hat_j``."""
    shape = x.shape[:axis % x.ndim]
    xs = x.reshape(int(np.prod(shape)), -1)
    lab = np.asarray(labels).reshape(-1)
    z = np.zeros((xs.shape[0], w.shape[0]))
    for j, wj in enumerate(w):
        w_hat = wj / max(math.sqrt(sum(v * v for v in wj)), 1e-12)
        for i, xi in enumerate(xs):
            nx = math.sqrt(sum(v * v for v in xi))
            dot = sum(a * b for a, b in zip(xi, w_hat))
            z[i, j] = dot
            if m > 1 and lab[i] == j and lab[i] != ignore_label:
                psi = multiplicative_margin_psi(dot / max(nx, 1e-12), m)
                z[i, j] = (lam * dot + nx * psi) / (1 + lam)
    return z.reshape(shape + (w.shape[0],))


def _channel_columns(x):
    """``x`` as ``(N, C, S)``: channels = axis 1 (1 for a 1-D array)."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    c = x.shape[1] if x.ndim >= 2 else 1
    return x.reshape(n, c, -1)


def _channel_moments(xv, k):
    """Mean and biased variance of channel k of an (N, C, S) array, by
    explicit sums."""
    values = [float(v) for v in xv[:, k, :].ravel()]
    mean = math.fsum(values) / len(values)
    var = math.fsum((v - mean) ** 2 for v in values) / len(values)
    return mean, var, len(values)


def batch_norm(x, mean_acc=None, var_acc=None, factor=None,
               use_global_stats=False, eps=1e-5):
    """BVLC BatchNorm's output ``(x - mu) / sqrt(var + eps)`` per channel:
    the batch mean and biased variance, or with ``use_global_stats`` the
    accumulators divided by the scale factor (0 when the factor is 0)."""
    xv = _channel_columns(x)
    y = np.empty_like(xv)
    for k in range(xv.shape[1]):
        if use_global_stats:
            f = float(np.ravel(factor)[0])
            inv = 0.0 if f == 0 else 1.0 / f
            mean, var = float(mean_acc[k]) * inv, float(var_acc[k]) * inv
        else:
            mean, var, _ = _channel_moments(xv, k)
        y[:, k, :] = (xv[:, k, :] - mean) / math.sqrt(var + eps)
    return y.reshape(np.shape(x))


def batch_norm_update(x, mean_acc, var_acc, factor, fraction=0.999):
    """BVLC BatchNorm's accumulators after one TRAIN forward on ``x``:
    ``s' = lambda s + 1``, ``A_mu' = mu + lambda A_mu``,
    ``A_var' = m/(m-1) var + lambda A_var`` (factor 1 when m = 1)."""
    xv = _channel_columns(x)
    mean_out = np.empty(xv.shape[1])
    var_out = np.empty(xv.shape[1])
    for k in range(xv.shape[1]):
        mean, var, m = _channel_moments(xv, k)
        correction = m / (m - 1) if m > 1 else 1.0
        mean_out[k] = mean + fraction * float(mean_acc[k])
        var_out[k] = correction * var + fraction * float(var_acc[k])
    return mean_out, var_out, np.array([fraction * float(np.ravel(factor)[0]) + 1])


def bn(x, slope, bias, running_mean=None, running_inv_std=None,
       batch_stats=True, eps=1e-5):
    """The L-Softmax fork's BN: ``slope * (x - mu) * r + bias`` per channel,
    with the batch mean and ``r = 1/sqrt(biased var + eps)``, or (TEST
    phase, frozen) ``mu`` and ``r`` read from the running blobs."""
    xv = _channel_columns(x)
    y = np.empty_like(xv)
    for k in range(xv.shape[1]):
        if batch_stats:
            mean, var, _ = _channel_moments(xv, k)
            r = 1.0 / math.sqrt(var + eps)
        else:
            mean = float(np.ravel(running_mean)[k])
            r = float(np.ravel(running_inv_std)[k])
        g, b = float(np.ravel(slope)[k]), float(np.ravel(bias)[k])
        y[:, k, :] = g * (xv[:, k, :] - mean) * r + b
    return y.reshape(np.shape(x))


def bn_update(x, running_mean, running_inv_std, momentum=0.9, eps=1e-5):
    """The fork BN's running blobs after one TRAIN forward:
    ``M' = (1 - momentum) mu + momentum M``,
    ``R' = (1 - momentum) / sqrt(var + eps) + momentum R`` (biased var)."""
    xv = _channel_columns(x)
    c = xv.shape[1]
    mean_out, inv_out = np.empty((1, c)), np.empty((1, c))
    for k in range(c):
        mean, var, _ = _channel_moments(xv, k)
        mean_out[0, k] = ((1 - momentum) * mean
                          + momentum * float(np.ravel(running_mean)[k]))
        inv_out[0, k] = ((1 - momentum) / math.sqrt(var + eps)
                         + momentum * float(np.ravel(running_inv_std)[k]))
    return mean_out, inv_out


def ring_loss(x, radius, loss_type="SQUARED", eps=1e-6, per_position=False):
    """Ring loss over the samples of ``x`` (features = everything after
    axis 0): SQUARED ``l_i = (|x_i| - R)^2 / 2``, CHARBONNIER
    ``l_i = sqrt((|x_i| + eps - R)^2 + eps)``; the mean over the samples,
    or the vector ``(l_i)`` with ``per_position``."""
    x = np.asarray(x, dtype=np.float64)
    rows = x.reshape(x.shape[0], -1)
    r = float(np.ravel(radius)[0])
    losses = []
    for row in rows:
        norm = math.sqrt(math.fsum(float(v) * float(v) for v in row))
        if loss_type == "CHARBONNIER":
            losses.append(math.sqrt((norm + eps - r) ** 2 + eps))
        else:
            losses.append(0.5 * (norm - r) ** 2)
    if per_position:
        return np.array(losses)
    return np.array(math.fsum(losses) / max(len(losses), 1))


def _log_softmax_column(col):
    """``log softmax`` of one column (a list of floats), with log1p."""
    m = max(col)
    top = col.index(m)
    rest = math.fsum(math.exp(v - m) for c, v in enumerate(col) if c != top)
    return [v - m - math.log1p(rest) for v in col]


def _reduce_loss(x, axis, losses, grad, normalization, valid, weighted,
                 weight_sum, per_position):
    """``(loss, dloss/dx)`` from the per-position ``losses`` (outer, inner)
    and ``grad`` (outer, C, inner): per position when ``per_position``;
    else the sum divided by ``sum of weights`` when ``weighted``, or by
    Caffe's ``normalization`` divisor (``valid`` positions for VALID)."""
    outer, _, inner = _columns(x.shape, axis)
    if per_position:
        shape = x.shape[:axis % x.ndim] + x.shape[axis % x.ndim + 1:]
        return losses.reshape(shape), grad.reshape(x.shape)
    if weighted:
        z = max(weight_sum, FLT_MIN)
    else:
        z = max(1, {"FULL": outer * inner, "VALID": valid, "BATCH_SIZE": outer,
                    "NONE": 1}[normalization])
    return math.fsum(losses.ravel()) / z, grad.reshape(x.shape) / z


def softmax_loss_ext(x, target, axis=1, ignore_label=None, normalization="VALID",
                     class_weight=None, weighted=False, smoothing=0.0,
                     temperature=1.0, per_position=False):
    """SoftmaxWithLoss with netlite's loss_param extensions: ``(loss,
    dloss/dx)`` for loss weight 1 (``dloss`` = d(sum of the per-position
    losses) with ``per_position``, whose ``loss`` is the array of them).

    ``target``: labels (outer * inner values) or, with the shape of ``x``,
    target probabilities.  One position: ``t`` its (smoothed) target,
    ``q = softmax(x / T)``, ``l = -T^2 sum_c w_c t_c log max(q_c,
    FLT_MIN)``, ``dl/dx_c = T (sum_j w_j t_j q_c - w_c t_c)``; the divisor
    is ``max(sum over positions of sum_c w_c t_c, FLT_MIN)`` when
    ``weighted``, else Caffe's (at least 1).
    """
    outer, n, inner = _columns(x.shape, axis)
    xv = x.reshape(outer, n, inner)
    soft = np.shape(target) == x.shape and n > 1
    tv = (np.asarray(target, np.float64).reshape(outer, n, inner) if soft
          else np.asarray(target, np.float64).reshape(outer, inner))
    w = [1.0] * n if class_weight is None else [float(v) for v in class_weight]
    big_t = float(temperature)
    losses = np.zeros((outer, inner))
    grad = np.zeros((outer, n, inner))
    valid, weight_sum = 0, 0.0
    for i in range(outer):
        for k in range(inner):
            if soft:
                t = [float(v) for v in tv[i, :, k]]
            else:
                label = float(tv[i, k])
                if ignore_label is not None and label == ignore_label:
                    continue
                t = [1.0 if c == int(label) else 0.0 for c in range(n)]
            t = [(1 - smoothing) * v + smoothing / n for v in t]
            log_q = _log_softmax_column([float(v) / big_t for v in xv[i, :, k]])
            wt = [w[c] * t[c] for c in range(n)]
            wbar = math.fsum(wt)
            losses[i, k] = -big_t * big_t * math.fsum(
                wt[c] * max(log_q[c], math.log(FLT_MIN)) for c in range(n))
            for c in range(n):
                grad[i, c, k] = big_t * (wbar * math.exp(log_q[c]) - wt[c])
            valid += 1
            weight_sum += wbar
    return _reduce_loss(x, axis, losses, grad, normalization, valid, weighted,
                        weight_sum, per_position)


def focal_loss(x, labels, axis=1, ignore_label=None, normalization="VALID",
               gamma=2.0, alpha=1.0, class_weight=None, weighted=False,
               per_position=False, one_add_p=False):
    """Softmax focal loss ``-alpha w_l (1 -+ p_l)^gamma log max(p_l,
    FLT_MIN)`` (ONEADDP: ``1 + p``) per position: ``(loss, dloss/dx)`` as
    :func:`softmax_loss_ext`; the divisor is ``sum of w_l`` when
    ``weighted``.  The gradient is the derivative of the unclamped loss,
    ``d/dp`` times the softmax Jacobian."""
    outer, n, inner = _columns(x.shape, axis)
    xv = x.reshape(outer, n, inner)
    lab = np.asarray(labels, np.float64).reshape(outer, inner)
    w = [1.0] * n if class_weight is None else [float(v) for v in class_weight]
    losses = np.zeros((outer, inner))
    grad = np.zeros((outer, n, inner))
    valid, weight_sum = 0, 0.0
    for i in range(outer):
        for k in range(inner):
            label = float(lab[i, k])
            if ignore_label is not None and label == ignore_label:
                continue
            y = int(label)
            log_p = _log_softmax_column([float(v) for v in xv[i, :, k]])
            lp = log_p[y]
            p = math.exp(lp)
            a = alpha * w[y]
            v = 1 + p if one_add_p else -math.expm1(lp)
            losses[i, k] = -a * v ** gamma * max(lp, math.log(FLT_MIN))
            # The chain rule as written: dl/dp = -a (s gamma v^(gamma-1)
            # log p + v^gamma / p), s = +-1 (v = 1 + s p), times dp/dx_c =
            # p ([c = y] - p_c).  For 0 < p < 1 only (the layer's limits
            # at p -> 0 and 1 are tested against closed forms).
            s = 1.0 if one_add_p else -1.0
            dl_dp = -a * (s * gamma * v ** (gamma - 1) * lp + v ** gamma / p)
            for c in range(n):
                pc = math.exp(log_p[c])
                grad[i, c, k] = dl_dp * p * ((c == y) - pc)
            valid += 1
            weight_sum += w[y]
    return _reduce_loss(x, axis, losses, grad, normalization, valid, weighted,
                        weight_sum, per_position)


# ------------------------------------------------- additive margins (H3)
def _per_class(value, num_classes):
    """A scalar or a length-C sequence as C float64 values."""
    return np.broadcast_to(np.asarray(value, dtype=np.float64), (num_classes,))


def label_specific_add(x, labels, bias, only_above=False, ignore_label=None):
    """LabelSpecificAdd: ``bias`` (scalar or one per class) added to each
    row's target; ``only_above``: only where the target exceeds -bias."""
    z = np.array(x, dtype=np.float64).reshape(np.shape(x)[0], -1)
    b = _per_class(bias, z.shape[1])
    for i, y in enumerate(np.asarray(labels, dtype=np.float64).reshape(-1)):
        if ignore_label is not None and y == ignore_label:
            continue
        y = int(y)
        if not only_above or z[i, y] > -b[y]:
            z[i, y] += b[y]
    return z.reshape(np.shape(x))


def arc_margin_psi(c, m1=1.0, m2=0.0, m3=0.0, boundary="THMM"):
    """psi(c) of the combined margin for one cosine (m2 in radians), from
    the definitions: cos(m1 acos c + m2) - m3; THMM past m1 theta + m2 > pi:
    c - delta sin(delta) - m3 with delta = pi - (pi - m2) / m1; EASY: c
    where c <= 0."""
    c = float(c)
    if m1 == 1 and m2 == 0 and m3 == 0:
        return c
    cb = min(1.0, max(-1.0, c))
    theta = math.acos(cb)
    if boundary == "EASY" and not cb > 0:
        return c
    if boundary == "THMM" and m1 * theta + m2 > math.pi:
        delta = math.pi - (math.pi - m2) / m1
        return cb - delta * math.sin(delta) - m3
    return math.cos(m1 * theta + m2) - m3


def arc_margin_slope(c, m1=1.0, m2=0.0, boundary="THMM"):
    """d psi / dc for one cosine with |c| < 1: m1 sin(m1 theta + m2) /
    sin(theta) on the margin branch, 1 elsewhere."""
    c = float(c)
    theta = math.acos(c)
    if (m1 == 1 and m2 == 0) or (boundary == "EASY" and not c > 0) or (
            boundary == "THMM" and m1 * theta + m2 > math.pi):
        return 1.0
    return m1 * math.sin(m1 * theta + m2) / math.sin(theta)


def label_specific_margin(x, labels, m1=1.0, m2=0.0, m3=0.0, boundary="THMM",
                          ignore_label=None):
    """LabelSpecificMargin: each row's target cosine replaced by
    arc_margin_psi; ``m1``, ``m2`` scalars or one per class."""
    z = np.array(x, dtype=np.float64).reshape(np.shape(x)[0], -1)
    m1s, m2s = _per_class(m1, z.shape[1]), _per_class(m2, z.shape[1])
    for i, y in enumerate(np.asarray(labels, dtype=np.float64).reshape(-1)):
        if ignore_label is not None and y == ignore_label:
            continue
        y = int(y)
        z[i, y] = arc_margin_psi(z[i, y], m1s[y], m2s[y], m3, boundary)
    return z.reshape(np.shape(x))


def sub_center_max(x, k, axis=1):
    """SubCenterMax: the max over each class's k consecutive columns."""
    x = np.asarray(x, dtype=np.float64)
    axis = axis % x.ndim
    shape = x.shape[:axis] + (x.shape[axis] // k, k) + x.shape[axis + 1:]
    return x.reshape(shape).max(axis=axis + 1)
