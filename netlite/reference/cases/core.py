"""Cases of the Caffe zoo: InnerProduct, Convolution, Pooling, ReLU, PReLU,
Softmax, Scale, Bias, Eltwise, Flatten, Reshape, Split, Dropout, BatchNorm,
BN (docs/reference.md §2).  Inputs avoid the kinks (ReLU and PReLU at 0,
MAX ties) by construction, so every element is finite-difference checked.

Each layer type's cases are one :meth:`CaseList.family` table: rows
``(name, prototxt, inputs[, description[, fields]])``.
"""

import numpy as np

from netlite.reference.cases.spec import (
    CaseList,
    away,
    custom,
    distinct,
    fixed,
    gauss,
    tolerance,
    unif,
)

CASES = CaseList()


def family(layer_type, page, rows, **common):
    """The cases of ``layer_type``, documented at docs/layers/<page>.md §3."""
    CASES.family(layer_type, f"docs/layers/{page}.md#3-backward", rows, **common)


# ---------------------------------------------------------------- InnerProduct
def _ip(n, axis=1, transpose="false", bias="true"):
    return (
        f"inner_product_param {{ num_output: {n} axis: {axis} "
        f"transpose: {transpose} bias_term: {bias} }}"
    )


family(
    "InnerProduct",
    "inner_product",
    [
        ("rows", _ip(4), [gauss((5, 3))], "M=5, K=3, N=4"),
        (
            "nchw_axis1",
            _ip(3),
            [gauss((2, 3, 2, 2))],
            "4-D bottom flattened from axis 1 (K=12)",
        ),
        (
            "transpose_axis2_no_bias",
            _ip(2, 2, "true", "false"),
            [gauss((2, 3, 4))],
            "transposed (K x N) weight blob, axis 2, no bias",
        ),
    ],
    equation="Y = X W^T + 1 b^T; dX = dY W, dW = dY^T X, db = 1^T dY",
)


# ----------------------------------------------------------------- Convolution
def _conv(fields):
    return (
        "convolution_param { "
        + fields
        + ' weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }'
    )


family(
    "Convolution",
    "convolution",
    [
        (
            "stride2",
            _conv("num_output: 2 kernel_size: 3 stride: 2"),
            [gauss((2, 3, 5, 4))],
            "3x3 kernel, stride 2, no padding",
        ),
        (
            "rect_dilated_group",
            _conv(
                "num_output: 2 group: 2 kernel_h: 3 kernel_w: 2 stride_h: 2 "
                "stride_w: 1 pad_h: 2 pad_w: 1 dilation: 2 dilation: 3"
            ),
            [gauss((1, 2, 5, 4))],
            "rectangular kernel and stride, padding, dilation (2, 3), 2 groups",
            {"edges": ("padding", "groups", "dilation")},
        ),
        (
            "conv1d_pad",
            _conv("num_output: 2 kernel_size: 3 stride: 2 pad: 1"),
            [gauss((2, 3, 9))],
            "1-D convolution, padding 1",
        ),
        (
            "pad_exceeds_kernel",
            _conv("num_output: 2 kernel_size: 2 stride: 2 pad: 3"),
            [gauss((1, 2, 3, 4))],
            "padding wider than the kernel: all-pad windows",
            {"edges": ("padding",)},
        ),
    ],
    equation="y = W * x + b (im2col/GEMM); dW = dy * x, dx = W^T * dy (col2im)",
)

# --------------------------------------------------------------------- Pooling
_POOL_MAX = {"equation": "y = max over the window; dx[argmax] += dy"}
_POOL_AVE = {
    "equation": "y = sum over the window / |window incl. padding|; dx += dy / |window|"
}
family(
    "Pooling",
    "pooling",
    [
        (
            "max_pad",
            "pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }",
            [distinct((1, 2, 6, 5))],
            "distinct values 1/8 apart: no ties",
            {**_POOL_MAX, "edges": ("padding",)},
        ),
        (
            "max_overlap_mask",
            "pooling_param { pool: MAX kernel_size: 2 stride: 1 }",
            [distinct((2, 2, 4, 3))],
            "overlapping 2x2 windows; top.1 is the argmax mask (upstream 0)",
            {**_POOL_MAX, "tops": 2, "dead_tops": (1,), "edges": ("mask top",)},
        ),
        (
            "ave_pad",
            "pooling_param { pool: AVE kernel_h: 4 kernel_w: 3 stride: 2 pad: 2 }",
            [gauss((1, 2, 6, 5))],
            "AVE with padding: the divisor counts padded entries (Caffe)",
            {**_POOL_AVE, "edges": ("padding",)},
        ),
        (
            "ave_global",
            "pooling_param { pool: AVE global_pooling: true }",
            [gauss((2, 3, 3, 4))],
            "global average pooling",
            _POOL_AVE,
        ),
    ],
)

# ------------------------------------------------------------------ ReLU, PReLU
family(
    "ReLU",
    "relu",
    [
        ("plain", "", [away((2, 3, 4))], "inputs at least 0.05 from the kink at 0"),
        ("leaky", "relu_param { negative_slope: 0.1 }", [away((3, 5))]),
        (
            "negative_slope_5d",
            "relu_param { negative_slope: -0.5 }",
            [away((2, 3, 2, 1, 2))],
        ),
    ],
    equation="y = max(x, 0) + nu min(x, 0); dx = dy (x > 0 ? 1 : nu)",
)


def _prelu(shared):
    return f"prelu_param {{ channel_shared: {shared} }}"


family(
    "PReLU",
    "prelu",
    [
        ("channels", _prelu("false"), [away((2, 3, 2, 2))], "one slope per channel"),
        ("shared_2d", _prelu("true"), [away((4, 3))], "one shared slope"),
        ("channels_5d", _prelu("false"), [away((2, 3, 2, 1, 2))]),
    ],
    equation="y = max(x, 0) + a_c min(x, 0); dx = dy (x > 0 ? 1 : a_c), "
    "da_c = sum dy min(x, 0)",
)

# --------------------------------------------------------------------- Softmax
family(
    "Softmax",
    "softmax",
    [
        (
            "channels_spatial",
            "softmax_param { axis: 1 }",
            [gauss((2, 4, 2, 3))],
            "",
            {"edges": ("spatial",)},
        ),
        ("rows", "", [gauss((3, 7), std=2.0)]),
        ("axis_last", "softmax_param { axis: -1 }", [gauss((2, 3, 5))]),
        (
            "huge_logits",
            "",
            [gauss((3, 5), std=2.0, mean=1e4)],
            "logits around 1e4: exp without the max shift overflows",
            {
                "tolerance": tolerance(rtol32=1e-2, atol32=2e-3),
                "edges": ("huge logits",),
                "fd_step": 1e-9,
            },
        ),
        (
            "saturated",
            "",
            [gauss((3, 5), std=300.0)],
            "std 300: one-hot probabilities, exp(x - max) underflows",
            {"edges": ("huge logits",), "fd_step": 1e-7},
        ),
        (
            "tiny_logits",
            "",
            [gauss((3, 5), std=1e-6)],
            "std 1e-6: nearly uniform",
            {"edges": ("tiny logits",)},
        ),
    ],
    equation="p = exp(x - max) / sum; dx = p (dy - sum_c dy p)",
)


# ----------------------------------------------------------------- Scale, Bias
def _scale(axis, num_axes, bias="false"):
    return f"scale_param {{ axis: {axis} num_axes: {num_axes} bias_term: {bias} }}"


family(
    "Scale",
    "scale",
    [
        (
            "learned_channels",
            _scale(1, 1),
            [gauss((2, 3, 2, 2))],
            "learned per-channel scale",
        ),
        (
            "learned_middle_bias",
            _scale(1, 2, "true"),
            [gauss((2, 3, 2, 2))],
            "learned (3, 2) scale and bias",
        ),
        (
            "learned_scalar",
            _scale(1, 0),
            [gauss((4, 3))],
            "one learned scalar (the s of NormFace heads)",
        ),
        (
            "bottom_operand",
            "scale_param { axis: 1 }",
            [gauss((2, 3, 2, 2)), gauss((3, 2))],
            "the scale is bottom.1 (3, 2)",
        ),
    ],
    equation="y = x * s (+ b) broadcast over axes [axis, axis+num_axes); ds = sum dy x",
)
family(
    "Bias",
    "bias",
    [
        (
            "learned_channels",
            "bias_param { axis: 1 num_axes: 1 }",
            [gauss((2, 3, 2, 2))],
        ),
        ("learned_scalar", "bias_param { axis: 1 num_axes: 0 }", [gauss((4, 3))]),
        (
            "bottom_operand",
            "bias_param { axis: 1 }",
            [gauss((2, 3, 2, 2)), gauss((3, 2))],
            "the bias is bottom.1 (3, 2)",
        ),
    ],
    equation="y = x + b broadcast; db = sum dy, dx = dy",
)


# --------------------------------------------------------------------- Eltwise
def _tie_free(k, shape, spacing=0.05):
    """``k`` inputs whose values are all distinct, ``spacing`` apart across
    the inputs (one permutation of k * count grid values, drawn from a fixed
    generator: the same in every case)."""
    n = int(np.prod(shape))
    order = np.random.default_rng(1701).permutation(k * n)
    values = (order - k * n / 2) * spacing
    return [fixed(values[j * n : (j + 1) * n].reshape(shape)) for j in range(k)]


def _eltwise(op):
    return f"eltwise_param {{ operation: {op} }}"


family(
    "Eltwise",
    "eltwise",
    [
        (
            "sum_coeff",
            "eltwise_param { operation: SUM coeff: 1 coeff: -0.5 coeff: 2 }",
            [gauss((2, 3, 2)), gauss((2, 3, 2)), gauss((2, 3, 2))],
            "",
            {"equation": "y = sum_i c_i x_i; dx_i = c_i dy"},
        ),
        (
            "prod",
            _eltwise("PROD"),
            [unif((2, 3, 2), 0.2, 1.0)] * 3,
            "",
            {"equation": "y = prod_i x_i; dx_i = dy prod_{j != i} x_j"},
        ),
        (
            "prod_unstable",
            _eltwise("PROD stable_prod_grad: false"),
            [unif((4, 3), 0.2, 1.0)] * 2,
            "",
            {"equation": "y = prod_i x_i; dx_i = dy y / x_i"},
        ),
        (
            "max",
            _eltwise("MAX"),
            _tie_free(3, (2, 3, 2)),
            "tie-free values",
            {"equation": "y = max_i x_i; dx_i = dy [i = argmax]"},
        ),
    ],
)

# -------------------------------------------------- Flatten, Reshape, Split, Dropout
_IDENTITY = "y = x; dx = dy"
family(
    "Flatten",
    "flatten",
    [
        ("default", "", [gauss((2, 3, 4, 2))]),
        ("end_axis", "flatten_param { axis: 0 end_axis: -2 }", [gauss((2, 3, 2))]),
    ],
    equation=_IDENTITY,
)
family(
    "Reshape",
    "reshape",
    [
        (
            "infer",
            "reshape_param { shape { dim: 0 dim: 4 dim: -1 } }",
            [gauss((2, 3, 4, 2))],
        ),
        (
            "insert_middle",
            "reshape_param { shape { dim: 1 dim: 1 } axis: 2 num_axes: 0 }",
            [gauss((2, 3, 2))],
        ),
    ],
    equation=_IDENTITY,
)
family(
    "Split",
    "split",
    [
        ("two", "", [gauss((2, 3, 4))], "", {"tops": 2}),
        ("three", "", [gauss((3, 5))], "", {"tops": 3}),
    ],
    equation="y_k = x; dx = sum_k dy_k",
)
family(
    "Dropout",
    "dropout",
    [
        (
            "test_phase",
            "phase: TEST dropout_param { dropout_ratio: 0.5 }",
            [gauss((2, 3, 4))],
            "TEST phase: the identity (a TRAIN mask is drawn from netlite's RNG, "
            "which no other framework reproduces)",
            {"equation": "TEST: y = x; dx = dy"},
        ),
        (
            "train_ratio_0",
            "dropout_param { dropout_ratio: 0 }",
            [gauss((3, 5))],
            "",
            {
                "equation": "TRAIN, ratio 0: mask all ones, scale 1",
                "edges": ("ratio 0",),
            },
        ),
    ],
)

# ---------------------------------------------------------- BatchNorm, BN
_BATCH_NORM_STORED = (
    "blobs { shape { dim: 2 } data: 0.3 data: -0.6 } "
    "blobs { shape { dim: 2 } data: 1.7 data: 0.4 } "
    "blobs { shape { dim: 1 } data: 1.9 }"
)


def _constant_channel(shape):
    def fn(r):
        x = r.standard_normal(shape)
        x[:, 0] = 0.5
        return x

    return custom(shape, fn)


family(
    "BatchNorm",
    "batch_norm",
    [
        (
            "batch_4d",
            "batch_norm_param { eps: 1e-5 }",
            [gauss((3, 2, 2, 2))],
            "TRAIN, batch statistics; the accumulator blobs are stored but "
            "not read and get no gradient",
        ),
        ("batch_2d", "batch_norm_param { eps: 0.5 }", [gauss((5, 3))]),
        (
            "constant_channel",
            "batch_norm_param { eps: 1e-5 }",
            [_constant_channel((4, 2, 3))],
            "channel 0 constant: var = 0, 1/sqrt(eps) = 316 amplifies rounding",
            {
                "edges": ("zero variance",),
                "fd_step": 1e-7,
                "tolerance": tolerance(
                    rtol64=1e-7, atol64=1e-10, rtol32=1e-2, atol32=1e-3
                ),
            },
        ),
        (
            "global_stats",
            "batch_norm_param { use_global_stats: true eps: 0.01 } "
            + _BATCH_NORM_STORED,
            [gauss((3, 2, 2))],
            "use_global_stats: the stored accumulators are constants",
            {
                "equation": "y = (x - A_mu/s) / sqrt(A_var/s + eps); "
                "dx = dy / sqrt(A_var/s + eps)"
            },
        ),
    ],
    params="keep",
    frozen_params=(0, 1, 2),
    equation="y = (x - mu) / sqrt(var + eps); "
    "dx = (dy - mean(dy) - y mean(dy y)) / sqrt(var + eps)",
)

_BN_STORED = (
    "blobs { shape { dim: 1 dim: 2 } data: 1.3 data: -0.7 } "
    "blobs { shape { dim: 1 dim: 2 } data: 0.2 data: 0.5 } "
    "blobs { shape { dim: 1 dim: 2 } data: 0.3 data: -0.6 } "
    "blobs { shape { dim: 1 dim: 2 } data: 0.8 data: 1.6 } "
)
_BN_FILLERS = 'slope_filler { type: "gaussian" } bias_filler { type: "gaussian" }'


def _bn_params(rng, shapes):
    # slope, bias: gaussian; running mean 0, running inverse std 1 (unused in TRAIN)
    return [
        rng.standard_normal(shapes[0]),
        rng.standard_normal(shapes[1]),
        np.zeros(shapes[2]),
        np.ones(shapes[3]),
    ]


_BN_TRAIN = {
    "params": _bn_params,
    "equation": "y = slope * xhat + bias with batch statistics",
}
family(
    "BN",
    "bn",
    [
        (
            "batch_4d",
            f"bn_param {{ {_BN_FILLERS} }}",
            [gauss((3, 2, 2, 2))],
            "",
            _BN_TRAIN,
        ),
        (
            "batch_2d",
            f"bn_param {{ {_BN_FILLERS} eps: 0.5 }}",
            [gauss((5, 3))],
            "",
            _BN_TRAIN,
        ),
        (
            "test_phase",
            "phase: TEST bn_param { } " + _BN_STORED,
            [gauss((3, 2, 2))],
            "TEST phase reads the stored running statistics (constants)",
            {
                "params": "keep",
                "equation": "TEST: y = slope * (x - mean) * inv_std + bias",
            },
        ),
    ],
    frozen_params=(2, 3),
)
