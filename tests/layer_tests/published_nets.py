"""Equivalents of four published softmax-loss prototxts, built for the tests.

The originals are not committed (they belong to their authors):

- wy1iu/LargeMargin_Softmax_Loss ``myexamples/mnist/model/mnist_train_test.prototxt``
  (L-Softmax on MNIST: ``BN`` after every convolution, a TRAIN
  ``LargeMarginInnerProduct`` and a TEST one sharing its weights);
- wy1iu/sphereface ``train/code/sphereface_model.prototxt`` (SphereFace-20:
  strided convolutions, PReLU, residual ``Eltwise`` sums, ``MarginInnerProduct``);
- happynear/AMSoftmax ``prototxt/face_train_test.prototxt`` (the same trunk,
  ``Normalize``, ``InnerProduct { normalize }``, ``LabelSpecificAdd``, a fixed
  ``Scale``);
- happynear/NormFace ``prototxt/scaled_cosine_softmax.prototxt`` (``Normalize``,
  ``InnerProduct`` with the ``gaussian_unitball`` filler, an in-place learned
  ``Scale`` with ``min_value``, ``Accuracy { min_is_better }``).

Each equivalent here is written from scratch with fewer channels, classes and
pixels so that it runs in a test, and with the data layers replaced by an
``Input`` with the same tops.  :data:`ORIGINAL` lists, for every original, the
layer types and the (nested) parameter fields it sets outside its data layers
— read off the originals with netlite's own schema — and
``test_published_prototxts.py`` checks that each equivalent sets all of them.
"""

# The SphereFace-20 trunk (SphereFace and AM-Softmax share it): its layer
# types and parameter fields.
_TRUNK_TYPES = {"Convolution", "Eltwise", "InnerProduct", "PReLU", "SoftmaxWithLoss"}
_TRUNK_FIELDS = {
    "convolution_param.bias_filler.type",
    "convolution_param.bias_filler.value",
    "convolution_param.kernel_size",
    "convolution_param.num_output",
    "convolution_param.pad",
    "convolution_param.stride",
    "convolution_param.weight_filler.std",
    "convolution_param.weight_filler.type",
    "eltwise_param.operation",
}

# Layer types and parameter fields the originals use (data layers excluded).
ORIGINAL = {
    "lsoftmax_mnist": (
        {
            "Accuracy",
            "BN",
            "Convolution",
            "InnerProduct",
            "LargeMarginInnerProduct",
            "Pooling",
            "ReLU",
            "SoftmaxWithLoss",
        },
        {
            "bn_param.bias_filler.type",
            "bn_param.bias_filler.value",
            "bn_param.slope_filler.type",
            "bn_param.slope_filler.value",
            "convolution_param.bias_filler.type",
            "convolution_param.kernel_size",
            "convolution_param.num_output",
            "convolution_param.pad",
            "convolution_param.stride",
            "convolution_param.weight_filler.type",
            "include.phase",
            "inner_product_param.bias_filler.type",
            "inner_product_param.num_output",
            "inner_product_param.weight_filler.type",
            "largemargin_inner_product_param.base",
            "largemargin_inner_product_param.gamma",
            "largemargin_inner_product_param.iteration",
            "largemargin_inner_product_param.lambda_min",
            "largemargin_inner_product_param.num_output",
            "largemargin_inner_product_param.power",
            "largemargin_inner_product_param.type",
            "largemargin_inner_product_param.weight_filler.type",
            "param.decay_mult",
            "param.lr_mult",
            "param.name",
            "pooling_param.kernel_size",
            "pooling_param.pool",
            "pooling_param.stride",
        },
    ),
    "sphereface": (
        _TRUNK_TYPES | {"MarginInnerProduct"},
        _TRUNK_FIELDS | {
            "inner_product_param.bias_filler.type",
            "inner_product_param.bias_filler.value",
            "inner_product_param.num_output",
            "inner_product_param.weight_filler.type",
            "margin_inner_product_param.base",
            "margin_inner_product_param.gamma",
            "margin_inner_product_param.iteration",
            "margin_inner_product_param.lambda_min",
            "margin_inner_product_param.num_output",
            "margin_inner_product_param.power",
            "margin_inner_product_param.type",
            "margin_inner_product_param.weight_filler.type",
            "param.decay_mult",
            "param.lr_mult",
        },
    ),
    "amsoftmax": (
        _TRUNK_TYPES | {"Accuracy", "LabelSpecificAdd", "Normalize", "Scale"},
        _TRUNK_FIELDS | {
            "include.phase",
            "inner_product_param.bias_filler.type",
            "inner_product_param.bias_filler.value",
            "inner_product_param.bias_term",
            "inner_product_param.normalize",
            "inner_product_param.num_output",
            "inner_product_param.weight_filler.type",
            "label_specific_add_param.bias",
            "loss_weight",
            "param.decay_mult",
            "param.lr_mult",
            "scale_param.filler.type",
            "scale_param.filler.value",
        },
    ),
    "normface": (
        {"Accuracy", "InnerProduct", "Normalize", "Scale", "SoftmaxWithLoss"},
        {
            "accuracy_param.min_is_better",
            "include.phase",
            "inner_product_param.bias_term",
            "inner_product_param.normalize",
            "inner_product_param.num_output",
            "inner_product_param.weight_filler.type",
            "loss_weight",
            "param.decay_mult",
            "param.lr_mult",
            "scale_param.bias_filler.value",
            "scale_param.bias_term",
            "scale_param.filler.value",
            "scale_param.min_value",
            "scale_param.num_axes",
        },
    ),
}

#: Input shapes (data, without the batch axis) and class counts of the
#: equivalents.
INPUT = {
    "lsoftmax_mnist": (1, 28, 28),
    "sphereface": (3, 28, 24),
    "amsoftmax": (3, 28, 24),
    "normface": (12,),
}
CLASSES = {"lsoftmax_mnist": 10, "sphereface": 7, "amsoftmax": 7, "normface": 7}


def _input(batch, name):
    dims = " ".join(f"dim: {d}" for d in (batch, *INPUT[name]))
    return (
        'layer { name: "data" type: "Input" top: "data" top: "label" '
        f"input_param {{ shape {{ {dims} }} shape {{ dim: {batch} }} }} }}\n"
    )


_LEARNED = "param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }"


def _conv(name, bottom, num_output, stride, filler):
    return (
        f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
        f"{_LEARNED} convolution_param {{ num_output: {num_output} kernel_size: 3 "
        f"stride: {stride} pad: 1 weight_filler {{ {filler} }} "
        'bias_filler { type: "constant" value: 0 } } }\n'
    )


def _lsoftmax_block(name, bottom):
    """Convolution → BN → in-place ReLU, as every unit of the L-Softmax net."""
    return (
        f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
        f"{_LEARNED} convolution_param {{ num_output: 4 kernel_size: 3 stride: 1 pad: "
        "1 "
        'weight_filler { type: "msra" } bias_filler { type: "constant" } } }\n'
        + _bn(f"{name}_bn", name)
        + f'layer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}_bn" '
        f'top: "{name}_bn" }}\n'
    )


def _bn(name, bottom):
    return (
        f'layer {{ name: "{name}" type: "BN" bottom: "{bottom}" top: "{name}" '
        "param { lr_mult: 1 decay_mult: 0 } param { lr_mult: 1 decay_mult: 0 } "
        'bn_param { slope_filler { type: "constant" value: 1 } '
        'bias_filler { type: "constant" value: 0 } } }\n'
    )


def _lsoftmax_head(phase, margin, base, lr_mult, classes):
    return (
        'layer { name: "ip2" type: "LargeMarginInnerProduct" bottom: "bn_ip" '
        f'bottom: "label" top: "ip2" top: "lambda" param {{ name: "ip2" lr_mult: '
        f'{lr_mult} }} '
        f"largemargin_inner_product_param {{ num_output: {classes} type: {margin} "
        f"base: {base} gamma: {'0.000025' if phase == 'TRAIN' else '1'} "
        f"{'power: 35 ' if phase == 'TRAIN' else ''}iteration: 0 lambda_min: 0 "
        f'weight_filler {{ type: "msra" }} }} include {{ phase: {phase} }} }}\n'
    )


def lsoftmax_mnist(batch=4):
    classes = CLASSES["lsoftmax_mnist"]
    text = 'name: "LSoftmaxMNIST"\n' + _input(batch, "lsoftmax_mnist")
    text += _lsoftmax_block("pre_conv", "data")
    bottom = "pre_conv_bn"
    for stage in (1, 2, 3):
        for unit in (1, 2, 3):
            text += _lsoftmax_block(f"conv{stage}_{unit}", bottom)
            bottom = f"conv{stage}_{unit}_bn"
        text += (
            f'layer {{ name: "pool{stage}" type: "Pooling" bottom: "{bottom}" '
            f'top: "pool{stage}" pooling_param {{ pool: MAX kernel_size: 2 stride: 2 '
            '} }\n'
        )
        bottom = f"pool{stage}"
    text += (
        f'layer {{ name: "ip1" type: "InnerProduct" bottom: "{bottom}" top: "ip1" '
        f"{_LEARNED} inner_product_param {{ num_output: 8 "
        'weight_filler { type: "msra" } bias_filler { type: "constant" } } }\n'
        + _bn("bn_ip", "ip1")
        + 'layer { name: "relu_ip" type: "ReLU" bottom: "bn_ip" top: "bn_ip" }\n'
        + _lsoftmax_head("TRAIN", "QUADRUPLE", 1000, 1, classes)
        + _lsoftmax_head("TEST", "SINGLE", 0, 0, classes)
        + 'layer { name: "accuracy" type: "Accuracy" bottom: "ip2" bottom: "label" '
        'top: "accuracy" include { phase: TEST } }\n'
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" '
        'top: "loss" }\n'
    )
    return text


def _sphere_trunk(name, batch):
    """SphereFace's pattern: a strided convolution and PReLU per stage, then
    residual units (two convolutions with PReLU, summed by Eltwise), then fc5."""
    text = _input(batch, name)
    bottom = "data"
    for stage, units in ((1, 1), (2, 1)):
        conv = f"conv{stage}_1"
        text += _conv(conv, bottom, 4 * stage, 2, 'type: "xavier"')
        text += _prelu(f"relu{stage}_1", conv)
        bottom = conv
        for unit in range(units):
            a, b = f"conv{stage}_{2 + 2 * unit}", f"conv{stage}_{3 + 2 * unit}"
            gaussian = 'type: "gaussian" std: 0.01'
            text += _conv(a, bottom, 4 * stage, 1, gaussian) + _prelu(f"relu_{a}", a)
            text += _conv(b, a, 4 * stage, 1, gaussian) + _prelu(f"relu_{b}", b)
            res = f"res{stage}_{unit + 3}"
            text += (
                f'layer {{ name: "{res}" type: "Eltwise" bottom: "{bottom}" bottom: '
                f'"{b}" '
                f'top: "{res}" eltwise_param {{ operation: 1 }} }}\n'
            )
            bottom = res
    text += (
        f'layer {{ name: "fc5" type: "InnerProduct" bottom: "{bottom}" top: "fc5" '
        f"{_LEARNED} inner_product_param {{ num_output: 8 weight_filler {{ "
        'type: "xavier" } bias_filler { type: "constant" value: 0 } } }\n'
    )
    return text


def _prelu(name, blob):
    return f'layer {{ name: "{name}" type: "PReLU" bottom: "{blob}" top: "{blob}" }}\n'


def sphereface(batch=4):
    return (
        'name: "SpherefaceNet"\n'
        + _sphere_trunk("sphereface", batch)
        + (
            'layer { name: "fc6" type: "MarginInnerProduct" bottom: "fc5" bottom: '
            '"label" '
            'top: "fc6" top: "lambda" param { lr_mult: 1 decay_mult: 1 } '
            f"margin_inner_product_param {{ num_output: {CLASSES['sphereface']} "
            'type: QUADRUPLE weight_filler { type: "xavier" } base: 1000 gamma: 0.12 '
            "power: 1 lambda_min: 5 iteration: 0 } }\n"
            'layer { name: "softmax_loss" type: "SoftmaxWithLoss" bottom: "fc6" '
            'bottom: "label" top: "softmax_loss" }\n'
        )
    )


def amsoftmax(batch=4):
    return (
        'name: "AMSoftmaxNet"\n'
        + _sphere_trunk("amsoftmax", batch)
        + (
            'layer { name: "norm1" type: "Normalize" bottom: "fc5" top: "norm1" }\n'
            'layer { name: "fc6_l2" type: "InnerProduct" bottom: "norm1" top: "fc6" '
            "param { lr_mult: 1 } inner_product_param { "
            f"num_output: {CLASSES['amsoftmax']} normalize: true "
            'weight_filler { type: "xavier" } bias_term: false } }\n'
            'layer { name: "label_specific_margin" type: "LabelSpecificAdd" bottom: '
            '"fc6" '
            'bottom: "label" top: "fc6_margin" label_specific_add_param { bias: -0.35 '
            '} }\n'
            'layer { name: "fc6_margin_scale" type: "Scale" bottom: "fc6_margin" '
            'top: "fc6_margin_scale" param { lr_mult: 0 decay_mult: 0 } '
            'scale_param { filler { type: "constant" value: 30 } } }\n'
            'layer { name: "softmax_loss" type: "SoftmaxWithLoss" bottom: '
            '"fc6_margin_scale" '
            'bottom: "label" top: "softmax_loss" loss_weight: 1 }\n'
            'layer { name: "Accuracy" type: "Accuracy" bottom: "fc6" bottom: "label" '
            'top: "accuracy" include { phase: TEST } }\n'
        )
    )


def normface(batch=4):
    return (
        'name: "NormFaceHead"\n'
        + _input(batch, "normface")
        + (
            'layer { name: "normalize1" type: "Normalize" bottom: "data" top: "norm1" '
            '}\n'
            'layer { name: "cosine_layer" type: "InnerProduct" bottom: "norm1" top: '
            '"cosine" '
            "param { lr_mult: 100 decay_mult: 0 } inner_product_param { bias_term: "
            "false "
            f"normalize: true num_output: {CLASSES['normface']} "
            'weight_filler { type: "gaussian_unitball" } } }\n'
            'layer { name: "cosine_scale" type: "Scale" bottom: "cosine" top: "cosine" '
            "scale_param { num_axes: 0 bias_term: false min_value: 0.01 "
            "filler { value: 10 } bias_filler { value: 0 } } }\n"
            'layer { name: "softmax_loss" type: "SoftmaxWithLoss" bottom: "cosine" '
            'bottom: "label" top: "softmax_loss" loss_weight: 1 }\n'
            'layer { name: "Accuracy" type: "Accuracy" bottom: "cosine" bottom: '
            '"label" '
            'top: "accuracy" include { phase: TEST } accuracy_param { min_is_better: '
            'false } }\n'
        )
    )


NETS = {
    "lsoftmax_mnist": lsoftmax_mnist,
    "sphereface": sphereface,
    "amsoftmax": amsoftmax,
    "normface": normface,
}
