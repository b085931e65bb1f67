"""2-D feature nets: netlite's training throughput against PyTorch on the CPU.

Issue 10 section 3: the ``small`` backbone of the 2-D feature experiments
(netlite/tools/feature2d_nets.py; docs/feature2d.md) must train on the
Numba engine at least as fast as the same network in PyTorch on the CPU,
with the same number of threads, in one process.

What is timed: images/s of one solver iteration at batch 64 -- clear the
parameter diffs, forward, loss, backward, Adam update (lr 1e-3, betas 0.9
and 0.999, eps 1e-8, L2 weight decay 1e-3 added to the gradient: the
experiments' solver). netlite runs its own ``AdamSolver`` on the variant's
train net as ``netlite feature2d`` writes it, with an ``Input`` layer in place
of the IDXData layer; PyTorch runs ``torch.optim.Adam(weight_decay=1e-3)``
on the same network written as an ``nn.Module`` built from the same backbone
rows: the same layer shapes, the same initialisation scheme (PyTorch's
default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which the prototxt's uniform
fillers reproduce), the same head maths (the eps of netlite's Normalize
layer and of InnerProduct's weight normalisation, the ArcFace target
logit cos(theta + m)). Both cycle through the same 16 random batches of
pixels in [-1, 1] (the experiments' pixel map) and random labels.

Before timing, the script checks that the two are the same network: equal
parameter counts (trainable and all), and, with netlite's initial weights
(the scale of a NormFace/ArcFace head included) copied into the PyTorch
model, one forward on the same batch gives the same loss (relative
``--loss-rtol``, default 1e-5, float32) on every netlite engine, and one
backward the same parameter gradients (relative to each gradient's largest
entry, ``--grad-rtol``, default 1e-3). PyTorch then trains from those
copied weights, so both start from the same point.

Timing follows bench_lenet.py: every measurement warms up (JIT
compilation, buffers), then all are timed in turns, ``--repeats`` rounds of
one block of at least ``--min-time`` seconds each, and the median is
reported with the ratio to PyTorch. Usage::

    python benchmarks/bench_feature2d.py          # ~1 min on 2 quiet cores
    python benchmarks/bench_feature2d.py --markdown --repeats 7
    python benchmarks/bench_feature2d.py --engines numba --variants 'normface_s*'
    python benchmarks/bench_feature2d.py --repeats 1 --min-time 0.05   # smoke test

The thread count (``--threads``; default ``$NUMBA_NUM_THREADS`` or the
number of CPUs) is set for Numba, OpenBLAS/OMP/MKL and
``torch.set_num_threads`` before any of them starts its thread pool.
"""

import argparse
import datetime
import math
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_lenet import Timed, _machine, _set_thread_env, measure_all  # noqa: E402

BATCH = 64
NUM_BATCHES = 16
#: The variants timed by default: the baseline, a normalised head with a
#: fixed scale and an angular-margin head.
DEFAULT_VARIANTS = "softmax,normface_s10,arcface_m20"
#: Families this script can write in PyTorch (no extra losses, no
#: label-dependent InnerProduct layers).
FAMILIES = ("softmax", "normweight", "normfeature", "normface", "amsoftmax",
            "arcface")


def _parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None,
                   help="threads for Numba, BLAS and PyTorch (default: "
                        "$NUMBA_NUM_THREADS or the number of CPUs)")
    p.add_argument("--backbone", default="small", choices=("small", "seed"),
                   help="backbone of feature2d_nets.py (default small)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help="comma-separated variant names or globs of "
                        f"feature2d_nets.py, families {', '.join(FAMILIES)} "
                        f"(default {DEFAULT_VARIANTS})")
    p.add_argument("--engines", default="numpy,numba",
                   help="comma-separated netlite CPU engines (default numpy,numba)")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed blocks per measurement, median reported (default 5)")
    p.add_argument("--min-time", type=float, default=1.0,
                   help="minimum seconds per timed block (default 1.0)")
    p.add_argument("--loss-rtol", type=float, default=1e-5,
                   help="relative tolerance of the loss check (default 1e-5)")
    p.add_argument("--grad-rtol", type=float, default=1e-3,
                   help="tolerance of the gradient check, relative to each "
                        "gradient's largest entry (default 1e-3)")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    return p.parse_args(argv)


def _batches():
    """``NUM_BATCHES`` batches of images in [-1, 1] and labels (float32)."""
    import numpy as np

    gen = np.random.default_rng(0)
    return [(gen.uniform(-1, 1, (BATCH, 1, 28, 28)).astype(np.float32),
             gen.integers(0, 10, BATCH).astype(np.float32))
            for _ in range(NUM_BATCHES)]


# ----------------------------------------------------------------- netlite
def train_net_param(variant, backbone):
    """The variant's TRAIN net with an Input layer for data and label."""
    from netlite import io
    from netlite.tools import feature2d_nets

    full = io.parse_text(feature2d_nets.net_prototxt(variant, backbone),
                         io.NetParameter)
    net = io.parse_text(
        f'name: "{full.name}"\nlayer {{ name: "data" type: "Input" top: "data" '
        f'top: "label" input_param {{ shape {{ dim: {BATCH} dim: 1 dim: 28 '
        f'dim: 28 }} shape {{ dim: {BATCH} }} }} }}', io.NetParameter)
    for layer in full.layer:
        if layer.type in ("IDXData", "Accuracy"):
            continue
        net.layer.add().CopyFrom(layer)
    return net


def netlite_solver(variant, backbone, engine, seed=1701):
    """A netlite solver of the experiments' settings on the variant's net."""
    import netlite
    from netlite import io

    netlite.set_mode_cpu()
    netlite.set_cpu_engine(engine)
    netlite.set_random_seed(seed)
    param = io.SolverParameter(
        type="Adam", base_lr=0.001, momentum=0.9, momentum2=0.999, delta=1e-8,
        lr_policy="fixed", weight_decay=0.001, regularization_type="L2",
        max_iter=10**9, display=0, snapshot_after_train=False,
    )
    param.train_net_param.CopyFrom(train_net_param(variant, backbone))
    return netlite.get_solver(param)


def netlite_timed(solver, engine, batches):
    import netlite

    net = solver.net
    position = [0]

    def before():
        # The CPU engine is process-wide: re-select it before each block.
        netlite.set_cpu_engine(engine)

    def step():
        x, y = batches[position[0] % len(batches)]
        position[0] += 1
        net.blobs["data"].data[...] = x
        net.blobs["label"].data[...] = y
        solver.step(1)

    return Timed(step, BATCH, before=before)


def netlite_counts(net):
    """(trainable, total) parameter element counts."""
    trainable = sum(b.count for b, lr in zip(net.learnable_params, net.params_lr)
                    if lr != 0)
    return trainable, sum(b.count for b in net.learnable_params)


# ----------------------------------------------------------------- PyTorch
def torch_model(variant, backbone):
    """The same network as an ``nn.Module``: ``model(x, y)`` is the loss."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from netlite.layers.inner_product import WEIGHT_NORM_EPS
    from netlite.proto import netlite_pb2
    from netlite.tools import feature2d_nets

    v = feature2d_nets.VARIANTS[variant]
    if v["family"] not in FAMILIES:
        raise SystemExit(f"variant {variant}: family {v['family']} is not "
                         f"written in PyTorch here (only {', '.join(FAMILIES)})")
    norm_eps = float(netlite_pb2.NormalizeParameter().eps)
    rows = feature2d_nets.backbone_layers(backbone, variant)

    class Feature2d(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleDict()
            self.plan = []  # (kind, name, relu)
            channels, size = 1, 28
            for kind, name, p in rows:
                if kind == "conv":
                    num, k, stride, pad, relu = p
                    self.layers[name] = nn.Conv2d(channels, num, k, stride, pad)
                    channels, size = num, (size + 2 * pad - k) // stride + 1
                    self.plan.append(("conv", name, relu))
                elif kind == "pool":
                    method, k, stride = p  # round_mode FLOOR = PyTorch's default
                    pool = nn.MaxPool2d if method == "MAX" else nn.AvgPool2d
                    self.layers[name] = pool(k, stride)
                    size = (size - k) // stride + 1
                    self.plan.append(("pool", name, False))
                else:
                    num, relu = p
                    self.layers[name] = nn.Linear(channels * size * size, num)
                    channels, size = num, 1
                    self.plan.append(("ip", name, relu))
            self.layers["feature"] = nn.Linear(channels * size * size, 2)
            self.layers["pred"] = nn.Linear(2, feature2d_nets.NUM_CLASSES, bias=False)
            if "s" in v:
                learned = bool(v.get("learned"))
                self.scale = nn.Parameter(torch.tensor(float(v["s"])),
                                          requires_grad=learned)
            if "m" in v:
                m = float(v["m"])
                self.m = math.radians(m) if v["family"] == "arcface" else m

        def forward(self, x, y):
            for kind, name, relu in self.plan:
                if kind == "ip":
                    x = x.flatten(1)
                x = self.layers[name](x)
                if relu:
                    x = F.relu(x, inplace=True)
            f = self.layers["feature"](x.flatten(1))
            family = v["family"]
            w = self.layers["pred"].weight
            if family == "softmax":
                return F.cross_entropy(f @ w.T, y)
            if family == "normweight":
                return F.cross_entropy(f @ _hat(w, WEIGHT_NORM_EPS).T, y)
            if v.get("learned"):
                with torch.no_grad():  # Scale's min_value: 0.01, in place
                    self.scale.clamp_(min=0.01)
            f_hat = _hat(f, norm_eps)
            if family == "normfeature":
                return F.cross_entropy((self.scale * f_hat) @ w.T, y)
            cos = f_hat @ _hat(w, WEIGHT_NORM_EPS).T
            if family == "amsoftmax":
                cos = cos - self.m * F.one_hot(y, cos.shape[1])
            elif family == "arcface":
                c = cos.gather(1, y[:, None]).clamp(-1, 1)
                sin = (1 - c * c).clamp_min(1e-8).sqrt()
                cos = cos.scatter(1, y[:, None],
                                  c * math.cos(self.m) - sin * math.sin(self.m))
            return F.cross_entropy(self.scale * cos, y)

    def _hat(a, eps):
        return a / (a * a).sum(1, keepdim=True).add(eps).sqrt()

    return Feature2d()


def torch_counts(model):
    """(trainable, total) parameter element counts."""
    params = list(model.parameters())
    return (sum(p.numel() for p in params if p.requires_grad),
            sum(p.numel() for p in params))


def copy_weights(net, model):
    """netlite's parameters into the PyTorch model, by layer name."""
    import torch

    with torch.no_grad():
        for name, blobs in net.params.items():
            if name == "scale":
                model.scale.copy_(torch.from_numpy(blobs[0].data.reshape(())))
                continue
            module = model.layers[name]
            module.weight.copy_(torch.from_numpy(blobs[0].data))
            if len(blobs) > 1:
                module.bias.copy_(torch.from_numpy(blobs[1].data))


def torch_grads(model):
    """Parameter gradients keyed like netlite's ``net.params``."""
    out = {}
    for name, module in model.layers.items():
        grads = [p.grad for p in (getattr(module, "weight", None),
                                  getattr(module, "bias", None)) if p is not None]
        if grads:
            out[name] = [g.numpy().copy() for g in grads]
    if hasattr(model, "scale") and model.scale.requires_grad:
        out["scale"] = [model.scale.grad.numpy().reshape(1).copy()]
    return out


def torch_timed(model, batches):
    import numpy as np
    import torch

    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                           lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-3)
    data = [(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))
            for x, y in batches]
    position = [0]

    def step():
        x, y = data[position[0] % len(data)]
        position[0] += 1
        opt.zero_grad(set_to_none=False)
        model(x, y).backward()
        opt.step()

    return Timed(step, BATCH)


# ------------------------------------------------------------------ checks
def check_same_network(variant, net, model, batch, engine, args):
    """Parameter counts, loss and gradients of one forward/backward on the
    same weights and batch; raises SystemExit on a mismatch.  Returns
    (loss difference, worst gradient difference), both relative."""
    import numpy as np
    import torch

    counts = netlite_counts(net), torch_counts(model)
    if counts[0] != counts[1]:
        raise SystemExit(f"{variant}: parameter counts differ: netlite "
                         f"(trainable, total) {counts[0]}, PyTorch {counts[1]}")
    copy_weights(net, model)
    x, y = batch
    net.blobs["data"].data[...] = x
    net.blobs["label"].data[...] = y
    net.clear_param_diffs()
    ours = float(net.forward_backward())
    model.zero_grad(set_to_none=True)
    loss = model(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))
    loss.backward()
    theirs = float(loss.detach())
    loss_err = abs(ours - theirs) / abs(theirs)
    if loss_err > args.loss_rtol:
        raise SystemExit(f"{variant} ({engine}): netlite loss {ours!r} != PyTorch "
                         f"{theirs!r} (relative {loss_err:.2e} > {args.loss_rtol:g})")
    grads, worst = torch_grads(model), 0.0
    for name, blobs in net.params.items():
        for i, g in enumerate(grads.get(name, [])):
            ref = np.abs(g).max()
            err = float(np.abs(blobs[i].diff - g).max() / ref) if ref > 0 else 0.0
            worst = max(worst, err)
            if err > args.grad_rtol:
                raise SystemExit(f"{variant} ({engine}): gradient of {name}[{i}] "
                                 f"differs from PyTorch's by {err:.2e} of its "
                                 f"largest entry (> {args.grad_rtol:g})")
    net.clear_param_diffs()
    return loss_err, worst


# -------------------------------------------------------------------- main
def main(argv=None):
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    threads = args.threads or int(os.environ.get("NUMBA_NUM_THREADS", 0)) \
        or os.cpu_count()
    _set_thread_env(threads)

    import numpy as np

    from netlite import backend
    from netlite.tools import feature2d_nets

    try:
        variants = feature2d_nets.select_variants([args.variants])
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if "numba" in engines and not backend.numba_available():
        print("Numba is not installed: skipping the numba engine", file=sys.stderr)
        engines.remove("numba")
    versions = [f"NumPy {np.__version__}"]
    if backend.numba_available():
        import numba

        numba.set_num_threads(threads)
        threads = numba.get_num_threads()
        versions.append(f"Numba {numba.__version__} ({threads} threads)")
    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print("PyTorch is not installed: skipping it", file=sys.stderr)
        else:
            torch.set_num_threads(threads)
            versions.append(f"PyTorch {torch.__version__} "
                            f"({torch.get_num_threads()} threads)")

    # ArcFace with boundary NONE warns (once per net) that cos(theta + m)
    # rises again past 180 deg - m: expected for these variants.
    warnings.filterwarnings("ignore", message=r".*rises again for theta")
    batches = _batches()
    entries = []  # (variant, name, Timed)
    checks = []
    for variant in variants:
        print(f"setting up {variant} ...", file=sys.stderr, flush=True)
        model = None
        if torch is not None:
            torch.manual_seed(0)
            model = torch_model(variant, args.backbone)
        for engine in engines:
            solver = netlite_solver(variant, args.backbone, engine)
            if model is not None:
                errs = check_same_network(variant, solver.net, model, batches[0],
                                          engine, args)
                checks.append((variant, engine) + errs)
            entries.append((variant, f"netlite {engine}",
                            netlite_timed(solver, engine, batches)))
        if model is not None:
            # Trained from netlite's initial weights (the check copied them;
            # every engine draws the same ones from the same seed).
            entries.append((variant, "PyTorch", torch_timed(model, batches)))

    load_before = os.getloadavg()[0]
    cpu_before = os.times()
    print("timing ...", file=sys.stderr, flush=True)
    measure_all([t for _, _, t in entries], args.repeats, args.min_time)
    cpu_after = os.times()
    cpu_used = (cpu_after.user + cpu_after.system
                - cpu_before.user - cpu_before.system)

    rates = {(v, name): t.median for v, name, t in entries}
    rows = []
    for v, name, t in entries:
        ref = rates.get((v, "PyTorch"))
        spread = f"{min(t.rates):,.0f}-{max(t.rates):,.0f}"
        ratio = f"{t.median / ref:.2f}x" if ref else "-"
        rows.append((v, name, f"{t.median:,.0f}", spread, ratio))

    print(f"# feature2d {args.backbone} backbone, training at batch {BATCH} "
          f"(Adam, L2 1e-3), {threads} threads; {_machine()}")
    print(f"# {', '.join(versions)}; date {datetime.date.today().isoformat()}")
    print(f"# median of {args.repeats} interleaved blocks of >= {args.min_time:g} s; "
          f"1-min load average before/after timing {load_before:.2f}/"
          f"{os.getloadavg()[0]:.2f}; this process used "
          f"{cpu_used:.1f} s CPU in {cpu_after.elapsed - cpu_before.elapsed:.1f} s")
    for v, engine, loss_err, grad_err in checks:
        print(f"# check {v} {engine}: same parameter counts; loss relative "
              f"difference {loss_err:.1e}, gradients {grad_err:.1e}")
    header = ("variant", "engine", "train img/s", "min-max", "vs PyTorch")
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|---|---|---:|---:|---:|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(5)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
