"""Cases of the Caffe zoo: InnerProduct, Convolution, Pooling, ReLU, PReLU,
Softmax, Scale, Bias, Eltwise, Flatten, Reshape, Split, Dropout, BatchNorm,
BN (docs/reference.md §2).  Inputs avoid the kinks (ReLU and PReLU at 0,
MAX ties) by construction, so every element is finite-difference checked.
"""

import numpy as np

from netlite.reference.cases.spec import (
    Case,
    away,
    custom,
    distinct,
    fixed,
    gauss,
    tolerance,
    unif,
)

CASES = []


def add(layer_type, name, prototxt, inputs, page, **kw):
    kw.setdefault("docs", f"docs/layers/{page}.md#3-backward")
    CASES.append(
        Case(layer_type, name, f'type: "{layer_type}" {prototxt}', inputs, **kw)
    )


# ---------------------------------------------------------------- InnerProduct
_IP = (
    "inner_product_param {{ num_output: {n} axis: {axis} transpose: {t} "
    "bias_term: {b} }}"
)
_IP_EQ = "Y = X W^T + 1 b^T; dX = dY W, dW = dY^T X, db = 1^T dY"
add(
    "InnerProduct",
    "rows",
    _IP.format(n=4, axis=1, t="false", b="true"),
    [gauss((5, 3))],
    "inner_product",
    equation=_IP_EQ,
    description="M=5, K=3, N=4",
)
add(
    "InnerProduct",
    "nchw_axis1",
    _IP.format(n=3, axis=1, t="false", b="true"),
    [gauss((2, 3, 2, 2))],
    "inner_product",
    equation=_IP_EQ,
    description="4-D bottom flattened from axis 1 (K=12)",
)
add(
    "InnerProduct",
    "transpose_axis2_no_bias",
    _IP.format(n=2, axis=2, t="true", b="false"),
    [gauss((2, 3, 4))],
    "inner_product",
    equation=_IP_EQ,
    description="transposed (K x N) weight blob, axis 2, no bias",
)

# ----------------------------------------------------------------- Convolution
_CONV_EQ = "y = W * x + b (im2col/GEMM); dW = dy * x, dx = W^T * dy (col2im)"


def _conv(fields):
    return (
        "convolution_param { "
        + fields
        + ' weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }'
    )


add(
    "Convolution",
    "stride2",
    _conv("num_output: 2 kernel_size: 3 stride: 2"),
    [gauss((2, 3, 5, 4))],
    "convolution",
    equation=_CONV_EQ,
    description="3x3 kernel, stride 2, no padding",
)
add(
    "Convolution",
    "rect_dilated_group",
    _conv(
        "num_output: 2 group: 2 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 "
        "pad_h: 2 pad_w: 1 dilation: 2 dilation: 3"
    ),
    [gauss((1, 2, 5, 4))],
    "convolution",
    equation=_CONV_EQ,
    edges=("padding", "groups", "dilation"),
    description="rectangular kernel and stride, padding, dilation (2, 3), 2 groups",
)
add(
    "Convolution",
    "conv1d_pad",
    _conv("num_output: 2 kernel_size: 3 stride: 2 pad: 1"),
    [gauss((2, 3, 9))],
    "convolution",
    equation=_CONV_EQ,
    description="1-D convolution, padding 1",
)
add(
    "Convolution",
    "pad_exceeds_kernel",
    _conv("num_output: 2 kernel_size: 2 stride: 2 pad: 3"),
    [gauss((1, 2, 3, 4))],
    "convolution",
    equation=_CONV_EQ,
    edges=("padding",),
    description="padding wider than the kernel: all-pad windows",
)

# --------------------------------------------------------------------- Pooling
_POOL_MAX_EQ = "y = max over the window; dx[argmax] += dy"
_POOL_AVE_EQ = "y = sum over the window / |window incl. padding|; dx += dy / |window|"
add(
    "Pooling",
    "max_pad",
    "pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }",
    [distinct((1, 2, 6, 5))],
    "pooling",
    equation=_POOL_MAX_EQ,
    edges=("padding",),
    description="distinct values 1/8 apart: no ties",
)
add(
    "Pooling",
    "max_overlap_mask",
    "pooling_param { pool: MAX kernel_size: 2 stride: 1 }",
    [distinct((2, 2, 4, 3))],
    "pooling",
    tops=2,
    dead_tops=(1,),
    equation=_POOL_MAX_EQ,
    edges=("mask top",),
    description="overlapping 2x2 windows; top.1 is the argmax mask (upstream 0)",
)
add(
    "Pooling",
    "ave_pad",
    "pooling_param { pool: AVE kernel_h: 4 kernel_w: 3 stride: 2 pad: 2 }",
    [gauss((1, 2, 6, 5))],
    "pooling",
    equation=_POOL_AVE_EQ,
    edges=("padding",),
    description="AVE with padding: the divisor counts padded entries (Caffe)",
)
add(
    "Pooling",
    "ave_global",
    "pooling_param { pool: AVE global_pooling: true }",
    [gauss((2, 3, 3, 4))],
    "pooling",
    equation=_POOL_AVE_EQ,
    description="global average pooling",
)

# ------------------------------------------------------------------ ReLU, PReLU
_RELU_EQ = "y = max(x, 0) + nu min(x, 0); dx = dy (x > 0 ? 1 : nu)"
add(
    "ReLU",
    "plain",
    "",
    [away((2, 3, 4))],
    "relu",
    equation=_RELU_EQ,
    description="inputs at least 0.05 from the kink at 0",
)
add(
    "ReLU",
    "leaky",
    "relu_param { negative_slope: 0.1 }",
    [away((3, 5))],
    "relu",
    equation=_RELU_EQ,
)
add(
    "ReLU",
    "negative_slope_5d",
    "relu_param { negative_slope: -0.5 }",
    [away((2, 3, 2, 1, 2))],
    "relu",
    equation=_RELU_EQ,
)

_PRELU_EQ = (
    "y = max(x, 0) + a_c min(x, 0); dx = dy (x > 0 ? 1 : a_c), da_c = sum dy min(x, 0)"
)
add(
    "PReLU",
    "channels",
    "prelu_param { channel_shared: false }",
    [away((2, 3, 2, 2))],
    "prelu",
    equation=_PRELU_EQ,
    description="one slope per channel",
)
add(
    "PReLU",
    "shared_2d",
    "prelu_param { channel_shared: true }",
    [away((4, 3))],
    "prelu",
    equation=_PRELU_EQ,
    description="one shared slope",
)
add(
    "PReLU",
    "channels_5d",
    "prelu_param { channel_shared: false }",
    [away((2, 3, 2, 1, 2))],
    "prelu",
    equation=_PRELU_EQ,
)

# --------------------------------------------------------------------- Softmax
_SM_EQ = "p = exp(x - max) / sum; dx = p (dy - sum_c dy p)"
add(
    "Softmax",
    "channels_spatial",
    "softmax_param { axis: 1 }",
    [gauss((2, 4, 2, 3))],
    "softmax",
    equation=_SM_EQ,
    edges=("spatial",),
)
add("Softmax", "rows", "", [gauss((3, 7), std=2.0)], "softmax", equation=_SM_EQ)
add(
    "Softmax",
    "axis_last",
    "softmax_param { axis: -1 }",
    [gauss((2, 3, 5))],
    "softmax",
    equation=_SM_EQ,
)
add(
    "Softmax",
    "huge_logits",
    "",
    [gauss((3, 5), std=2.0, mean=1e4)],
    "softmax",
    equation=_SM_EQ,
    tolerance=tolerance(rtol32=1e-2, atol32=2e-3),
    edges=("huge logits",),
    fd_step=1e-9,
    description="logits around 1e4: exp without the max shift overflows",
)
add(
    "Softmax",
    "saturated",
    "",
    [gauss((3, 5), std=300.0)],
    "softmax",
    equation=_SM_EQ,
    edges=("huge logits",),
    fd_step=1e-7,
    description="std 300: one-hot probabilities, exp(x - max) underflows",
)
add(
    "Softmax",
    "tiny_logits",
    "",
    [gauss((3, 5), std=1e-6)],
    "softmax",
    equation=_SM_EQ,
    edges=("tiny logits",),
    description="std 1e-6: nearly uniform",
)

# ----------------------------------------------------------------- Scale, Bias
_SCALE_EQ = "y = x * s (+ b) broadcast over axes [axis, axis+num_axes); ds = sum dy x"


def _scale(axis, num_axes, bias="false"):
    return f"scale_param {{ axis: {axis} num_axes: {num_axes} bias_term: {bias} }}"


add(
    "Scale",
    "learned_channels",
    _scale(1, 1),
    [gauss((2, 3, 2, 2))],
    "scale",
    equation=_SCALE_EQ,
    description="learned per-channel scale",
)
add(
    "Scale",
    "learned_middle_bias",
    _scale(1, 2, "true"),
    [gauss((2, 3, 2, 2))],
    "scale",
    equation=_SCALE_EQ,
    description="learned (3, 2) scale and bias",
)
add(
    "Scale",
    "learned_scalar",
    _scale(1, 0),
    [gauss((4, 3))],
    "scale",
    equation=_SCALE_EQ,
    description="one learned scalar (the s of NormFace heads)",
)
add(
    "Scale",
    "bottom_operand",
    "scale_param { axis: 1 }",
    [gauss((2, 3, 2, 2)), gauss((3, 2))],
    "scale",
    equation=_SCALE_EQ,
    description="the scale is bottom.1 (3, 2)",
)

_BIAS_EQ = "y = x + b broadcast; db = sum dy, dx = dy"
add(
    "Bias",
    "learned_channels",
    "bias_param { axis: 1 num_axes: 1 }",
    [gauss((2, 3, 2, 2))],
    "bias",
    equation=_BIAS_EQ,
)
add(
    "Bias",
    "learned_scalar",
    "bias_param { axis: 1 num_axes: 0 }",
    [gauss((4, 3))],
    "bias",
    equation=_BIAS_EQ,
)
add(
    "Bias",
    "bottom_operand",
    "bias_param { axis: 1 }",
    [gauss((2, 3, 2, 2)), gauss((3, 2))],
    "bias",
    equation=_BIAS_EQ,
    description="the bias is bottom.1 (3, 2)",
)

# --------------------------------------------------------------------- Eltwise
add(
    "Eltwise",
    "sum_coeff",
    "eltwise_param { operation: SUM coeff: 1 coeff: -0.5 coeff: 2 }",
    [gauss((2, 3, 2)), gauss((2, 3, 2)), gauss((2, 3, 2))],
    "eltwise",
    equation="y = sum_i c_i x_i; dx_i = c_i dy",
)
add(
    "Eltwise",
    "prod",
    "eltwise_param { operation: PROD }",
    [unif((2, 3, 2), 0.2, 1.0)] * 3,
    "eltwise",
    equation="y = prod_i x_i; dx_i = dy prod_{j != i} x_j",
)
add(
    "Eltwise",
    "prod_unstable",
    "eltwise_param { operation: PROD stable_prod_grad: false }",
    [unif((4, 3), 0.2, 1.0)] * 2,
    "eltwise",
    equation="y = prod_i x_i; dx_i = dy y / x_i",
)


def _tie_free(k, shape, spacing=0.05):
    """``k`` inputs whose values are all distinct, ``spacing`` apart across
    the inputs (one permutation of k * count grid values, drawn from a fixed
    generator: the same in every case)."""
    n = int(np.prod(shape))
    order = np.random.default_rng(1701).permutation(k * n)
    values = (order - k * n / 2) * spacing
    return [fixed(values[j * n : (j + 1) * n].reshape(shape)) for j in range(k)]


add(
    "Eltwise",
    "max",
    "eltwise_param { operation: MAX }",
    _tie_free(3, (2, 3, 2)),
    "eltwise",
    equation="y = max_i x_i; dx_i = dy [i = argmax]",
    description="tie-free values",
)

# -------------------------------------------------- Flatten, Reshape, Split, Dropout
add(
    "Flatten",
    "default",
    "",
    [gauss((2, 3, 4, 2))],
    "flatten",
    equation="y = x; dx = dy",
)
add(
    "Flatten",
    "end_axis",
    "flatten_param { axis: 0 end_axis: -2 }",
    [gauss((2, 3, 2))],
    "flatten",
    equation="y = x; dx = dy",
)
add(
    "Reshape",
    "infer",
    "reshape_param { shape { dim: 0 dim: 4 dim: -1 } }",
    [gauss((2, 3, 4, 2))],
    "reshape",
    equation="y = x; dx = dy",
)
add(
    "Reshape",
    "insert_middle",
    "reshape_param { shape { dim: 1 dim: 1 } axis: 2 num_axes: 0 }",
    [gauss((2, 3, 2))],
    "reshape",
    equation="y = x; dx = dy",
)
add(
    "Split",
    "two",
    "",
    [gauss((2, 3, 4))],
    "split",
    tops=2,
    equation="y_k = x; dx = sum_k dy_k",
)
add(
    "Split",
    "three",
    "",
    [gauss((3, 5))],
    "split",
    tops=3,
    equation="y_k = x; dx = sum_k dy_k",
)
add(
    "Dropout",
    "test_phase",
    "phase: TEST dropout_param { dropout_ratio: 0.5 }",
    [gauss((2, 3, 4))],
    "dropout",
    equation="TEST: y = x; dx = dy",
    description="TEST phase: the identity (a TRAIN mask is drawn from netlite's RNG, "
    "which no other framework reproduces)",
)
add(
    "Dropout",
    "train_ratio_0",
    "dropout_param { dropout_ratio: 0 }",
    [gauss((3, 5))],
    "dropout",
    equation="TRAIN, ratio 0: mask all ones, scale 1",
    edges=("ratio 0",),
)

# ---------------------------------------------------------- BatchNorm, BN
_BATCH_NORM_STORED = (
    "blobs { shape { dim: 2 } data: 0.3 data: -0.6 } "
    "blobs { shape { dim: 2 } data: 1.7 data: 0.4 } "
    "blobs { shape { dim: 1 } data: 1.9 }"
)
_BN_EQ = (
    "y = (x - mu) / sqrt(var + eps); "
    "dx = (dy - mean(dy) - y mean(dy y)) / sqrt(var + eps)"
)


def _constant_channel(shape):
    def fn(r):
        x = r.standard_normal(shape)
        x[:, 0] = 0.5
        return x

    return custom(shape, fn)


add(
    "BatchNorm",
    "batch_4d",
    "batch_norm_param { eps: 1e-5 }",
    [gauss((3, 2, 2, 2))],
    "batch_norm",
    params="keep",
    frozen_params=(0, 1, 2),
    equation=_BN_EQ,
    description="TRAIN, batch statistics; the accumulator blobs are stored but "
    "not read and get no gradient",
)
add(
    "BatchNorm",
    "batch_2d",
    "batch_norm_param { eps: 0.5 }",
    [gauss((5, 3))],
    "batch_norm",
    params="keep",
    frozen_params=(0, 1, 2),
    equation=_BN_EQ,
)
add(
    "BatchNorm",
    "constant_channel",
    "batch_norm_param { eps: 1e-5 }",
    [_constant_channel((4, 2, 3))],
    "batch_norm",
    params="keep",
    frozen_params=(0, 1, 2),
    equation=_BN_EQ,
    edges=("zero variance",),
    fd_step=1e-7,
    tolerance=tolerance(rtol64=1e-7, atol64=1e-10, rtol32=1e-2, atol32=1e-3),
    description="channel 0 constant: var = 0, 1/sqrt(eps) = 316 amplifies rounding",
)
add(
    "BatchNorm",
    "global_stats",
    "batch_norm_param { use_global_stats: true eps: 0.01 } " + _BATCH_NORM_STORED,
    [gauss((3, 2, 2))],
    "batch_norm",
    params="keep",
    frozen_params=(0, 1, 2),
    equation="y = (x - A_mu/s) / sqrt(A_var/s + eps); dx = dy / sqrt(A_var/s + eps)",
    description="use_global_stats: the stored accumulators are constants",
)

_BN_STORED = (
    "blobs { shape { dim: 1 dim: 2 } data: 1.3 data: -0.7 } "
    "blobs { shape { dim: 1 dim: 2 } data: 0.2 data: 0.5 } "
    "blobs { shape { dim: 1 dim: 2 } data: 0.3 data: -0.6 } "
    "blobs { shape { dim: 1 dim: 2 } data: 0.8 data: 1.6 } "
)


def _bn_params(rng, shapes):
    # slope, bias: gaussian; running mean 0, running inverse std 1 (unused in TRAIN)
    return [
        rng.standard_normal(shapes[0]),
        rng.standard_normal(shapes[1]),
        np.zeros(shapes[2]),
        np.ones(shapes[3]),
    ]


add(
    "BN",
    "batch_4d",
    'bn_param { slope_filler { type: "gaussian" } bias_filler { type: "gaussian" } }',
    [gauss((3, 2, 2, 2))],
    "bn",
    params=_bn_params,
    frozen_params=(2, 3),
    equation="y = slope * xhat + bias with batch statistics",
)
add(
    "BN",
    "batch_2d",
    'bn_param { slope_filler { type: "gaussian" } '
    'bias_filler { type: "gaussian" } eps: 0.5 }',
    [gauss((5, 3))],
    "bn",
    params=_bn_params,
    frozen_params=(2, 3),
    equation="y = slope * xhat + bias with batch statistics",
)
add(
    "BN",
    "test_phase",
    "phase: TEST bn_param { } " + _BN_STORED,
    [gauss((3, 2, 2))],
    "bn",
    params="keep",
    frozen_params=(2, 3),
    equation="TEST: y = slope * (x - mean) * inv_std + bias",
    description="TEST phase reads the stored running statistics (constants)",
)
