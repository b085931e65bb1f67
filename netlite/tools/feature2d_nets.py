"""The 2-D feature experiments: every variant as prototxt text.

A variant is a row of :data:`VARIANTS` (name, family, parameters); a
backbone is a row of :data:`BACKBONES`.  :func:`net_prototxt` turns the two
into the text of a train/test net built only from netlite layers, and
:func:`solver_prototxt` writes the study's optimiser (Adam, lr 1e-3,
coupled L2 1e-3, batch 64) as a solver file.  docs/feature2d.md explains
the choices; ../shared/reference/seed-experiments.md is the study.

Blob names every variant shares, which the runner reads:

``feature``
    the 2-D feature (``InnerProduct(-> 2)`` with bias, no activation).
``scores``
    in TEST, the logits with no margin (the prediction the study used:
    ``W x``, ``|x| cos``, ``s x_hat W``, ``s cos``); ``Accuracy`` reads it.
``label``
    the labels.

The layer ``pred`` holds the class weights (``C x 2``, or ``C K x 2`` for
sub-center ArcFace).  Three data layers: TRAIN (shuffled, batch 64), TEST
(the test split) and TEST with the stage ``train-set`` (the train split in
file order, which the runner uses to draw and score the training
features).
"""

import fnmatch
import math

#: Classes of MNIST and Fashion-MNIST.
NUM_CLASSES = 10
#: Batch size of the study (train); the test batch only sets memory.
TRAIN_BATCH = 64
TEST_BATCH = 100
#: The study's pixel map: ToTensor() then Normalize(0.5, 0.5), i.e.
#: (pixel / 255 - 0.5) / 0.5 = (pixel - 127.5) / 127.5.
PIXEL_MEAN = 127.5
PIXEL_SCALE = 1.0 / 127.5
#: The stage of the TEST-phase data layer that reads the training split.
TRAIN_SET_STAGE = "train-set"


# ------------------------------------------------------------- variants
def _variants():
    rows = [("softmax", "softmax", {}), ("normweight", "normweight", {})]
    for s in (1, 5, 10, 20, 50):
        rows.append((f"normfeature_s{s}", "normfeature", {"s": s}))
    for s in (1, 5, 10, 20, 50):
        rows.append((f"normface_s{s}", "normface", {"s": s, "learned": False}))
    for s in (1, 5, 10, 20, 50):
        rows.append((f"normface_learned_s{s}", "normface",
                     {"s": s, "learned": True}))
    for m in ("0", "0.01", "0.1", "0.2", "0.3"):
        rows.append((f"amsoftmax_m{m}", "amsoftmax", {"s": 10, "m": float(m)}))
    for m in (0, 10, 20, 30):
        rows.append((f"arcface_m{m}", "arcface", {"s": 10, "m": m}))
    for lam in ("1", "0.1", "0.01"):
        rows.append((f"ringloss_l{lam}", "ringloss",
                     {"lambda": float(lam), "normweight": False}))
    for lam in ("1", "0.1", "0.01"):
        rows.append((f"normweight_ringloss_l{lam}", "ringloss",
                     {"lambda": float(lam), "normweight": True}))
    for m in (1, 2, 3, 4):
        rows.append((f"lsoftmax_m{m}", "lsoftmax", {"m": m}))
    for m in (1, 2, 3, 4):
        rows.append((f"asoftmax_m{m}", "asoftmax", {"m": m}))
    rows.append(("subcenter_arcface_k3_m10", "subcenter_arcface",
                 {"s": 10, "m": 10, "k": 3}))
    return {name: {"name": name, "family": family, **params}
            for name, family, params in rows}


#: name -> {"name", "family", parameters}; in the order of the tables.
VARIANTS = _variants()


def select_variants(patterns):
    """The variant names matching any of ``patterns`` (names or shell
    globs, or comma-separated lists of them), in table order.

    Raises
    ------
    ValueError
        A pattern that matches nothing (the message lists the names).
    """
    wanted = [p.strip() for item in patterns for p in item.split(",") if p.strip()]
    if not wanted:
        return list(VARIANTS)
    chosen = set()
    for pattern in wanted:
        hits = fnmatch.filter(VARIANTS, pattern)
        if not hits:
            raise ValueError(
                f"no variant matches {pattern!r}; variants: {', '.join(VARIANTS)}"
            )
        chosen.update(hits)
    return [name for name in VARIANTS if name in chosen]


# ------------------------------------------------------------ backbones
# (kind, name, parameters).  conv: (out, kernel, stride, pad, relu);
# pool: (method, kernel, stride); ip: (out, relu).
_SEED = [
    ("conv", "conv1", (64, 7, 2, 3, False)),   # 28 -> 14, no ReLU (as the study)
    ("conv", "conv2", (128, 5, 1, 2, True)),   # 14
    ("pool", "pool2", ("MAX", 2, 2)),          # 14 -> 7
    ("conv", "conv3", (256, 3, 2, 1, True)),   # 7 -> 4
    ("conv", "conv4", (512, 3, 1, 1, True)),   # 4
    ("pool", "pool4", ("AVE", 4, 4)),          # 4 -> 1: 512
]
_SEED_RING = [
    ("conv", "conv1", (16, 7, 2, 3, False)),
    ("conv", "conv2", (32, 5, 1, 2, True)),
    ("pool", "pool2", ("MAX", 2, 2)),
    ("conv", "conv3", (64, 3, 2, 1, True)),
    ("conv", "conv4", (64, 3, 1, 1, True)),
    # k3 s3 on 4x4: PyTorch floors to 1x1 (the top-left 3x3 window);
    # Caffe's default CEIL would give 2x2.
    ("pool", "pool4", ("AVE", 3, 3)),
]
_SMALL = [
    ("conv", "conv1", (20, 5, 1, 0, True)),    # 28 -> 24
    ("pool", "pool1", ("MAX", 2, 2)),          # 12
    ("conv", "conv2", (50, 5, 1, 0, True)),    # 8
    ("pool", "pool2", ("MAX", 2, 2)),          # 4: 800
    ("ip", "ip1", (128, True)),                # 128
]

#: backbone name -> (layers, layers for the ring-loss rows).  The study ran
#: its ring-loss rows on a smaller net (channels 16-32-64-64, AvgPool k3);
#: ``seed`` does the same, ``small`` uses one net for every row.
BACKBONES = {"seed": (_SEED, _SEED_RING), "small": (_SMALL, _SMALL)}


def backbone_layers(backbone, variant):
    """The backbone rows a variant trains with."""
    try:
        plain, ring = BACKBONES[backbone]
    except KeyError:
        raise ValueError(
            f"unknown backbone {backbone!r}; expected one of {', '.join(BACKBONES)}"
        ) from None
    return ring if VARIANTS[variant]["family"] == "ringloss" else plain


# ------------------------------------------------------------- prototxt
def _num(value):
    """A float for prototxt: shortest text that reads back as itself."""
    return repr(float(value)) if not float(value).is_integer() else f"{value:g}"


def _uniform(fan_in):
    """PyTorch's default init of Conv2d/Linear weights and biases,
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as a Caffe uniform filler."""
    bound = 1.0 / math.sqrt(fan_in)
    return f'{{ type: "uniform" min: {-bound!r} max: {bound!r} }}'


def _layer(name, type_, bottoms, tops, body="", include=None):
    lines = [f'layer {{\n  name: "{name}"\n  type: "{type_}"']
    lines += [f'  bottom: "{b}"' for b in bottoms]
    lines += [f'  top: "{t}"' for t in tops]
    if include:
        lines.append(f"  include {{ {include} }}")
    if body:
        lines += ["  " + line for line in body.strip().splitlines()]
    return "\n".join(lines) + "\n}\n"


def _data_layers(train_source, test_source):
    """IDXData layers; a source is ``"mnist:train"`` or ``(images, labels)``."""

    def source(src):
        if isinstance(src, str):
            return f'source: "{src}"'
        return f'image_source: "{src[0]}" label_source: "{src[1]}"'

    transform = (f"transform_param {{ mean_value: {PIXEL_MEAN} "
                 f"scale: {PIXEL_SCALE!r} }}")
    out = []
    for include, src, batch, shuffle in (
        ("phase: TRAIN", train_source, TRAIN_BATCH, True),
        (f'phase: TEST not_stage: "{TRAIN_SET_STAGE}"', test_source, TEST_BATCH,
         False),
        (f'phase: TEST stage: "{TRAIN_SET_STAGE}"', train_source, TEST_BATCH,
         False),
    ):
        shuffle_text = " shuffle: true" if shuffle else ""
        out.append(_layer(
            "data", "IDXData", [], ["data", "label"],
            f"{transform}\nidx_data_param {{ {source(src)} batch_size: {batch}"
            f"{shuffle_text} }}",
            include=include,
        ))
    return out


def _backbone(rows):
    """The backbone's layers (data -> ``top``) and the width of ``top``."""
    out, bottom, channels, size = [], "data", 1, 28
    for kind, name, p in rows:
        if kind == "conv":
            num, k, stride, pad, relu = p
            fan_in = channels * k * k
            out.append(_layer(name, "Convolution", [bottom], [name], (
                f"convolution_param {{\n  num_output: {num} kernel_size: {k} "
                f"stride: {stride} pad: {pad}\n"
                f"  weight_filler {_uniform(fan_in)}\n"
                f"  bias_filler {_uniform(fan_in)}\n}}")))
            channels, size = num, (size + 2 * pad - k) // stride + 1
        elif kind == "pool":
            method, k, stride = p
            out.append(_layer(name, "Pooling", [bottom], [name], (
                f"pooling_param {{ pool: {method} kernel_size: {k} "
                f"stride: {stride} round_mode: FLOOR }}")))
            size = (size - k) // stride + 1
        else:  # ip
            num, relu = p
            fan_in = channels * size * size
            out.append(_layer(name, "InnerProduct", [bottom], [name], (
                f"inner_product_param {{\n  num_output: {num}\n"
                f"  weight_filler {_uniform(fan_in)}\n"
                f"  bias_filler {_uniform(fan_in)}\n}}")))
            channels, size = num, 1
        if kind != "pool" and p[-1]:
            out.append(_layer(f"relu_{name}", "ReLU", [name], [name]))
        bottom = name
    return out, bottom, channels * size * size


def _pred(bottom, top, num, normalize, test_only=False):
    """The class-weight layer ``pred`` (no bias, PyTorch's init on 2 inputs)."""
    norm = ("\n  normalize: true weight_norm_mode: TRUE_GRADIENT"
            if normalize else "")
    return _layer("pred", "InnerProduct", [bottom], [top], (
        f"inner_product_param {{\n  num_output: {num} bias_term: false{norm}\n"
        f"  weight_filler {_uniform(2)}\n}}"),
        include="phase: TEST" if test_only else None)


def _scale(bottom, top, s, learned):
    """Multiply by a scalar s: fixed (lr_mult 0) or learned (min 0.01)."""
    mults = "" if learned else "param { lr_mult: 0 decay_mult: 0 }\n"
    clamp = " min_value: 0.01" if learned else ""
    return _layer("scale", "Scale", [bottom], [top], (
        f"{mults}scale_param {{ axis: 0 num_axes: 0 "
        f"filler {{ type: \"constant\" value: {_num(s)} }}{clamp} }}"))


def _normalize(bottom, top):
    return _layer("feature_norm", "Normalize", [bottom], [top])


def _head(v):
    """The layers from ``feature`` to ``scores`` (and extra losses)."""
    family, C = v["family"], NUM_CLASSES
    if family == "softmax":
        return [_pred("feature", "scores", C, False)]
    if family == "normweight":
        return [_pred("feature", "scores", C, True)]
    if family == "normfeature":
        return [_normalize("feature", "feature_hat"),
                _scale("feature_hat", "feature_s", v["s"], False),
                _pred("feature_s", "scores", C, False)]
    if family == "normface":
        return [_normalize("feature", "feature_hat"),
                _pred("feature_hat", "cos", C, True),
                _scale("cos", "scores", v["s"], v["learned"])]
    if family == "amsoftmax":
        return [_normalize("feature", "feature_hat"),
                _pred("feature_hat", "cos", C, True),
                _layer("margin", "LabelSpecificAdd", ["cos", "label"], ["cos_m"],
                       f"label_specific_add_param {{ bias: {_num(-v['m'])} }}"),
                _scale("cos_m", "scores", v["s"], False)]
    if family in ("arcface", "subcenter_arcface"):
        out = [_normalize("feature", "feature_hat")]
        if family == "arcface":
            out.append(_pred("feature_hat", "cos", C, True))
        else:
            out += [_pred("feature_hat", "cos_all", C * v["k"], True),
                    _layer("subcenter", "SubCenterMax", ["cos_all"], ["cos"],
                           f"sub_center_param {{ num_subcenters: {v['k']} }}")]
        out += [_layer("margin", "LabelSpecificMargin", ["cos", "label"],
                       ["cos_m"], (
                           f"label_specific_margin_param {{ margin_base: "
                           f"{_num(v['m'])} gamma: 0 unit: DEGREE "
                           f"boundary: NONE }}")),
                _scale("cos_m", "scores", v["s"], False)]
        return out
    if family == "ringloss":
        return [_pred("feature", "scores", C, v["normweight"]),
                _layer("ring", "RingLoss", ["feature"], ["ring_loss"], (
                    f"loss_weight: {_num(v['lambda'])}\n"
                    "ring_loss_param { type: CHARBONNIER radius: 1 eps: 1e-06 }"))]
    if family in ("lsoftmax", "asoftmax"):
        kind = ("SINGLE", "DOUBLE", "TRIPLE", "QUADRUPLE")[v["m"] - 1]
        if family == "lsoftmax":
            # wy1iu/LargeMargin_Softmax_Loss's MNIST schedule.
            type_, msg = "LargeMarginInnerProduct", "largemargin_inner_product_param"
            schedule = "base: 1000 gamma: 2.5e-05 power: 35 lambda_min: 0"
        else:
            # wy1iu/sphereface's schedule.
            type_, msg = "MarginInnerProduct", "margin_inner_product_param"
            schedule = "base: 1000 gamma: 0.12 power: 1 lambda_min: 5"
        train = _layer("pred", type_, ["feature", "label"], ["scores"], (
            f"{msg} {{\n  num_output: {C} type: {kind}\n  {schedule} "
            f"iteration: 0\n  weight_filler {_uniform(2)}\n}}"),
            include="phase: TRAIN")
        # In TEST the same weights (shared by the layer name) without the
        # margin, which these layers would apply in TEST too.
        return [train, _pred("feature", "scores", C, family == "asoftmax",
                             test_only=True)]
    raise ValueError(f"unknown family {family!r}")


def net_prototxt(variant, backbone, train_source="mnist:train",
                 test_source="mnist:test"):
    """The train/test net of one variant on one backbone, as prototxt text."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; variants: "
                         f"{', '.join(VARIANTS)}")
    v = VARIANTS[variant]
    rows = backbone_layers(backbone, variant)
    trunk, top, width = _backbone(rows)
    header = (
        f"# netlite feature2d: variant {variant} ({v['family']}), backbone "
        f"{backbone}{' (the ring-loss net)' if rows is _SEED_RING else ''}.\n"
        "# Generated by netlite/tools/feature2d_nets.py; docs/feature2d.md.\n"
        f'name: "feature2d_{variant}"\n'
    )
    feature = _layer("feature", "InnerProduct", [top], ["feature"], (
        "inner_product_param {\n  num_output: 2\n"
        f"  weight_filler {_uniform(width)}\n  bias_filler {_uniform(width)}\n}}"))
    tail = [
        _layer("loss", "SoftmaxWithLoss", ["scores", "label"], ["loss"]),
        _layer("accuracy", "Accuracy", ["scores", "label"], ["accuracy"],
               include="phase: TEST"),
    ]
    return header + "".join(_data_layers(train_source, test_source) + trunk
                            + [feature] + _head(v) + tail)


def solver_prototxt(net_file, iters_per_epoch, epochs, seed, test_iter):
    """The study's optimiser as a solver file: Adam (lr 1e-3, betas 0.9 and
    0.999, eps 1e-8), L2 weight decay 1e-3 added to the gradient (on every
    parameter), no schedule; one test pass per epoch."""
    return (
        "# netlite feature2d: the study's optimiser (torch.optim.Adam, "
        "weight_decay=1e-3).\n"
        f'net: "{net_file}"\n'
        'type: "Adam"\n'
        "base_lr: 0.001\nmomentum: 0.9\nmomentum2: 0.999\ndelta: 1e-08\n"
        'lr_policy: "fixed"\n'
        'weight_decay: 0.001\nregularization_type: "L2"\n'
        f"max_iter: {iters_per_epoch * epochs}\n"
        f"test_iter: {test_iter}\ntest_interval: {iters_per_epoch}\n"
        "test_initialization: false\n"
        f"display: {min(100, iters_per_epoch)}\n"
        "snapshot: 0\nsnapshot_after_train: false\n"
        f"random_seed: {seed}\n"
    )
