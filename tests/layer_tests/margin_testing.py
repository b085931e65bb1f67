"""Helpers of the tests of the multiplicative-margin layers
(LargeMarginInnerProduct, MarginInnerProduct): independent float64
formulations to hold the layers to, and the shared test fixtures.

* ``fork_psi`` / ``fork_coefficients``: the forks' sign-function forms of
  psi_m and of the backward's coefficient pair (a_m, b_m), written from
  the tables of margin-losses.md §2.1-2.2 (Caffe's ``sign(0) = 0``);
* ``torch_logits``: a PyTorch autograd formulation (Chebyshev by the
  binomial sum of the paper's Eq. 7, k from ``acos`` under no_grad);
* ``softmax_cross_entropy``: mean cross-entropy and its gradient;
* ``blob_text``: a BlobProto in prototxt, to give a layer fixed weights;
* ``schedule_lambda``, ``schedule_text``: the lambda schedule's float64
  value and its prototxt;
* ``W_0_PI``, ``LABELS_0_PI``, ``features_0_pi``, ``zero_feature_row``,
  ``W_ZERO_ROW``: the degenerate inputs of the standard cases;
* ``MarginCase``, ``SHARED_CASES``: the case defaults, bottoms and optional
  prototxt, and the cases both layers run;
* ``pml_loss``, ``pml_margin_loss``: a pytorch-metric-learning loss and
  its loss and gradients for given embeddings and weights.
"""

import math
import warnings

import naive
import numpy as np
from layer_test_case import labels
from layer_testing import f32, filler

import netlite

#: Proto type names by margin m.
TYPES = {1: "SINGLE", 2: "DOUBLE", 3: "TRIPLE", 4: "QUADRUPLE"}


def blob_text(w):
    """``blobs { shape { dim .. } data: .. }`` holding ``w`` exactly (repr
    of float64 values; the layer rounds them to its dtype)."""
    dims = " ".join(f"dim: {d}" for d in np.shape(w))
    data = " ".join(f"data: {float(v)!r}" for v in np.ravel(w))
    return f"blobs {{ shape {{ {dims} }} {data} }}"


def schedule_lambda(sched, solver_iteration=0):
    """The float64 lambda of a schedule dict at a solver iteration."""
    return naive.margin_lambda(
        sched.get("iteration", 0) + solver_iteration + 1,
        base=f32(sched.get("base", 1)), gamma=f32(sched.get("gamma", 0)),
        power=f32(sched.get("power", 1)), lambda_min=f32(sched.get("lambda_min", 0)))


def schedule_text(sched):
    """The schedule dict as prototxt fields."""
    return " ".join(f"{k}: {v}" for k, v in sched.items())


# Fixed weights (N = 4, K = 3) and features at theta ~ 0 and ~ pi.
W_0_PI = np.array([[0.9, -0.4, 0.3], [0.2, 1.1, -0.5], [-0.7, 0.1, 0.8],
                   [0.5, 0.6, 0.4]])
LABELS_0_PI = np.array([0, 1, 2, 3, 0, 1, 2, 3])


def features_0_pi(shape, dtype):
    """Rows 0-3 exactly (anti)parallel to their class's row of ``W_0_PI``
    (c = +-1 up to rounding), rows 4-7 within ~1e-3 rad of it."""
    gen = np.random.default_rng(3)
    x = np.empty(shape)
    for i, y in enumerate(LABELS_0_PI):
        sign = 1.0 if i % 2 == 0 else -1.0
        x[i] = sign * (1.5 + 0.25 * i) * W_0_PI[y]
        if i >= 4:
            x[i] += 1e-3 * gen.standard_normal(3)
    return x


def zero_feature_row(shape, dtype):
    """Gaussian features with row 1 zero."""
    x = netlite.rng.get_rng().standard_normal(shape)
    x[1] = 0
    return x


#: ``W_0_PI`` with the weight row of class 2 zero.
W_ZERO_ROW = W_0_PI.copy()
W_ZERO_ROW[2] = 0


class MarginCase:
    """Mixin of the multiplicative-margin layers' LayerTestCase classes
    (listed before LayerTestCase): the defaults of the case attributes,
    features of :attr:`shape` (gaussian, or :attr:`features`) and labels
    over ``shape[:axis]`` (random with every third one :attr:`ignore`, or
    :attr:`label_values`)."""

    m, sched, shape, axis, ignore, tops = 4, {"base": 0}, (6, 3), 1, None, 2
    num_output = 5
    weights, features, label_values = None, None, None

    @property
    def bottoms(self):
        label_shape = self.shape[:self.axis]
        if self.label_values is not None:
            lab = self.label_values.reshape(label_shape)
        else:
            lab = labels(self.num_output, self.ignore, 3)
        feat = self.features if self.features is not None else filler("gaussian")
        return [(self.shape, feat), (label_shape, lab)]

    def extra_text(self):
        """``(loss_param text, blobs text)``: the ignore label and the fixed
        weights, each empty when not set."""
        loss = (f"loss_param {{ ignore_label: {self.ignore} }}"
                if self.ignore is not None else "")
        blobs = blob_text(self.weights) if self.weights is not None else ""
        return loss, blobs


#: The cases both layers run (m = 1..4, lambda 0 and 1, several shapes,
#: one top, ignored labels, theta 0 and pi, a zero feature); each test
#: class adds its own.
SHARED_CASES = {
    "single": {"m": 1, "sched": {}},
    "double": {"m": 2},
    "triple_lambda_1": {"m": 3, "sched": {}},
    "quadruple": {},
    "triple_spatial": {"m": 3, "shape": (4, 2, 1, 3)},
    "quadruple_axis_2": {"shape": (2, 3, 4), "axis": 2},
    "double_one_top": {"m": 2, "tops": 1},
    "ignore": {"ignore": -1, "sched": {"base": 0.5}},
    "all_ignored": {"ignore": 7, "label_values": np.full(6, 7.0)},
    "theta_0_and_pi": {"weights": W_0_PI, "num_output": 4, "shape": (8, 3),
                       "features": features_0_pi, "label_values": LABELS_0_PI},
    "zero_feature": {"features": zero_feature_row, "kink_range": 1e-3},
}


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


def pml_loss(cls, **kwargs):
    """A PML loss; its constructor's scipy call warns under NumPy 2 (a
    DeprecationWarning of torch's ``__array_wrap__``, not ours)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cls(**kwargs)


def pml_margin_loss(torch, cls, m, x, w, y):
    """PML's loss ``cls`` (margin ``m``, scale 1) and its autograd gradients
    for embeddings ``x`` and our ``w`` (PML's W is (embedding_size,
    num_classes), i.e. W^T): ``(loss, dx, dW)``."""
    loss_fn = pml_loss(cls, num_classes=w.shape[0], embedding_size=w.shape[1],
                       margin=m, scale=1)
    loss_fn.W.data = torch.tensor(w.T.copy())
    xt = torch.tensor(x, requires_grad=True)
    loss = loss_fn(xt, torch.tensor(y, dtype=torch.int64))
    loss.backward()
    return loss.item(), xt.grad.numpy(), loss_fn.W.grad.numpy().T
