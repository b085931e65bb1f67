"""Helpers of the tests of the multiplicative-margin layers
(LargeMarginInnerProduct, MarginInnerProduct): independent float64
formulations to hold the layers to.

* ``fork_psi`` / ``fork_coefficients``: the forks' sign-function forms of
  psi_m and of the backward's coefficient pair (a_m, b_m), written from
  the tables of margin-losses.md §2.1-2.2 (Caffe's ``sign(0) = 0``);
* ``torch_logits``: a PyTorch autograd formulation (Chebyshev by the
  binomial sum of the paper's Eq. 7, k from ``acos`` under no_grad);
* ``softmax_cross_entropy``: mean cross-entropy and its gradient;
* ``blob_text``: a BlobProto in prototxt, to give a layer fixed weights.
"""

import math

import numpy as np

#: Proto type names by margin m.
TYPES = {1: "SINGLE", 2: "DOUBLE", 3: "TRIPLE", 4: "QUADRUPLE"}


def blob_text(w):
    """``blobs { shape { dim .. } data: .. }`` holding ``w`` exactly (repr
    of float64 values; the layer rounds them to its dtype)."""
    dims = " ".join(f"dim: {d}" for d in np.shape(w))
    data = " ".join(f"data: {float(v)!r}" for v in np.ravel(w))
    return f"blobs {{ shape {{ {dims} }} {data} }}"


def fork_psi(m, c):
    """psi_m(c) as the forks compute it, with numpy's sign (sign(0) = 0)."""
    c = np.asarray(c, dtype=np.float64)
    s0 = np.sign(c)
    if m == 1:
        return c.copy()
    if m == 2:
        return 2 * s0 * c**2 - 1
    if m == 3:
        s1 = np.sign(np.abs(c) - 0.5)
        s2 = s0 * (1 + s1) - 2
        return s1 * (4 * c**3 - 3 * c) + s2
    s3 = s0 * np.sign(2 * c**2 - 1)
    s4 = 2 * s0 + s3 - 3
    return s3 * (8 * c**4 - 8 * c**2 + 1) + s4


def fork_coefficients(m, c):
    """The forks' backward pair ``(a_m, b_m)`` = (psi'(c), c psi'(c) -
    psi(c)), from their sign forms (m >= 2)."""
    c = np.asarray(c, dtype=np.float64)
    s0 = np.sign(c)
    if m == 2:
        return 4 * s0 * c, 2 * s0 * c**2 + 1
    if m == 3:
        s1 = np.sign(np.abs(c) - 0.5)
        s2 = s0 * (1 + s1) - 2
        return s1 * (12 * c**2 - 3), 8 * s1 * c**3 - s2
    s3 = s0 * np.sign(2 * c**2 - 1)
    s4 = 2 * s0 + s3 - 3
    return s3 * (32 * c**3 - 16 * c), s3 * (24 * c**4 - 8 * c**2 - 1) - s4


def torch_logits(torch, x, w, labels, m, lam, normalize_weights=False,
                 ignore_label=None):
    """The layers' logits as a PyTorch float64 autograd graph.

    ``x`` (M, K) and ``w`` (N, K) are leaf tensors; ``normalize_weights``
    gives A-Softmax (rows of ``w`` divided by ``max(|w|, 1e-12)``).  The
    target cosine goes through ``T_m(c) = sum_n (-1)^n C(m, 2n) c^(m-2n)
    (1 - c^2)^n``; ``k = floor(m acos(c) / pi)`` is computed without a
    gradient.
    """
    F = torch.nn.functional
    if normalize_weights:
        w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    dot = x @ w.T
    if m == 1:
        return dot
    x_norm, w_norm = x.norm(dim=1), w.norm(dim=1)
    rows = [i for i, y in enumerate(labels) if y != ignore_label]
    cols = [int(labels[i]) for i in rows]
    if not rows:
        return dot
    c = (F.normalize(x[rows], dim=1, eps=1e-12)
         * F.normalize(w[cols], dim=1, eps=1e-12)).sum(dim=1)
    t = sum((-1) ** n * math.comb(m, 2 * n) * c ** (m - 2 * n) * (1 - c**2) ** n
            for n in range(m // 2 + 1))
    with torch.no_grad():
        theta = torch.acos(c.clamp(-1, 1))
        k = torch.clamp(torch.floor(m * theta / math.pi), max=m - 1)
    psi = (-1) ** k * t - 2 * k
    target = (lam * dot[rows, cols] + x_norm[rows] * w_norm[cols] * psi) / (1 + lam)
    mask = torch.zeros_like(dot, dtype=torch.bool)
    mask[rows, cols] = True
    full = torch.zeros_like(dot)
    full = full.index_put((torch.tensor(rows), torch.tensor(cols)), target)
    return torch.where(mask, full, dot)


def softmax_cross_entropy(z, labels):
    """``(mean_i -log softmax(z_i)[y_i], dL/dz)`` in float64."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    rows = np.arange(len(z))
    lab = np.asarray(labels, dtype=np.int64)
    loss = -np.log(p[rows, lab]).mean()
    grad = p.copy()
    grad[rows, lab] -= 1
    return loss, grad / len(z)


def rel_err(a, b):
    """``max |a - b| / max(max |b|, 1e-300)``: the worst error relative to
    the largest reference value."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))
