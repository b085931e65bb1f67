"""Benchmark the margin heads (forward + backward, float32) at face-recognition scale.

Heads (docs/layers/margin_family.md §1), each a prototxt chain of netlite's
small layers, float32, TRAIN phase, fixed scale (``lr_mult: 0``):

* ArcFace:    Normalize → InnerProduct{normalize, TRUE_GRADIENT}
              → LabelSpecificMargin{28.6°} → Scale{64} → SoftmaxWithLoss
* CosFace:    … → LabelSpecificAdd{bias −0.35} → Scale{64} → SoftmaxWithLoss
* NormFace:   … → InnerProduct{normalize} → Scale{20} → SoftmaxWithLoss
* L-Softmax:  LargeMarginInnerProduct{QUADRUPLE, base 0 so λ = 0} → SoftmaxWithLoss
* SphereFace: MarginInnerProduct{QUADRUPLE, base 0 so λ = 0} → SoftmaxWithLoss

The hyper-parameters are pytorch-metric-learning's defaults, so each netlite
head computes the same loss as its pml counterpart (ArcFaceLoss, CosFaceLoss,
NormalizedSoftmaxLoss with temperature 0.05, LargeMarginSoftmaxLoss and
SphereFaceLoss with margin 4); the script checks that first, from the same
features, labels and weights.

One step is what a training iteration spends in the head: clear the
parameter diffs, forward, backward with the gradient to the features and to
the weights.  Engines:

* netlite ``numpy`` (the reference, layer by layer), ``numba-unfused`` (the
  layers one by one on their Numba kernels: ``netlite.set_fusion(False)``),
  ``numba`` (the default: the chain run as one fused head,
  docs/layers/fused_margin_head.md), and ``cupy`` when a CUDA device is
  present;
* ``pml``: pytorch-metric-learning on PyTorch's CPU backend, loss forward +
  ``backward()`` to the embeddings and ``W``, with ``torch.set_num_threads``
  equal to Numba's thread count (skipped when torch or pml is absent);
* ``3-GEMM floor``: the three N×D×C GEMMs any head needs, with NumPy's BLAS
  into preallocated outputs: logits ``X Wᵀ``, gradient to the features
  ``G W``, gradient to the weights ``Gᵀ X``.

Everything runs in one process.  Each step is warmed up first (Numba
compiles), then all steps are timed in interleaved rounds (each sample
lasts at least ``--sample-seconds``, 0.2 s: a few steps back to back, as in
training; after an idle gap of ``--gap-seconds``, 0.3 s, so that the
previous engine's spinning threads have parked: OpenBLAS's spin for up to
~0.1 s, PyTorch's OpenMP pool longer); the table shows the median time per
step.  Memory is what a netlite head needs beyond its
weights and inputs, with tracemalloc on a net of its own: what the net
holds after two steps (its blobs, internal blobs and engine workspaces)
plus the peak a third step allocates on top (NumPy's allocations are
traced; memory that Numba kernels allocate inside compiled code and
PyTorch's allocations are not, so it is not shown for pml or for the floor,
which allocates nothing).

Run from the repository root::

    .venv/bin/python benchmarks/bench_margin_heads.py             # (256, 512, 10000)
    .venv/bin/python benchmarks/bench_margin_heads.py --large     # + (256, 512, 100000)
    .venv/bin/python benchmarks/bench_margin_heads.py --sizes 8,16,50 --markdown
    .venv/bin/python benchmarks/bench_margin_heads.py --profile   # + per-layer times
"""

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
import tracemalloc

import numpy as np

import netlite
from netlite import backend

# The interleaved timing of the SoftmaxWithLoss benchmark (same directory).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_softmax_loss import cpu_model, format_time, measure  # noqa: E402

DEFAULT_SIZE = (256, 512, 10000)
LARGE_SIZE = (256, 512, 100000)
HEADS = ("ArcFace", "CosFace", "L-Softmax", "SphereFace", "NormFace")

# pytorch-metric-learning 2.9.0 defaults.
ARC_MARGIN_DEG, ARC_SCALE = 28.6, 64.0
COS_MARGIN, COS_SCALE = 0.35, 64.0
NORM_SCALE = 20.0  # 1 / temperature 0.05
L_MARGIN = 4


# ------------------------------------------------------------------ netlite
def head_prototxt(head, n, d, c):
    """The head's TRAIN net: Input x (N, D) and label (N,), loss on top."""
    text = (
        "force_backward: true\n"
        'layer { name: "in" type: "Input" top: "x" top: "label" '
        f"input_param {{ shape {{ dim: {n} dim: {d} }} shape {{ dim: {n} }} }} }}\n"
    )
    # (The weights are set afterwards; a constant filler allocates nothing.)
    filler = 'weight_filler { type: "constant" }'
    if head in ("L-Softmax", "SphereFace"):
        kind, field = {
            "L-Softmax": ("LargeMarginInnerProduct", "largemargin_inner_product_param"),
            "SphereFace": ("MarginInnerProduct", "margin_inner_product_param"),
        }[head]
        text += (
            f'layer {{ name: "fc" type: "{kind}" bottom: "x" bottom: "label" '
            f'top: "logits" {field} {{ num_output: {c} type: QUADRUPLE '
            f"base: 0 {filler} }} }}\n"
        )
    else:
        text += (
            'layer { name: "norm" type: "Normalize" bottom: "x" top: "xn" }\n'
            'layer { name: "fc" type: "InnerProduct" bottom: "xn" top: "cos" '
            f"inner_product_param {{ num_output: {c} bias_term: false "
            f"normalize: true weight_norm_mode: TRUE_GRADIENT {filler} }} }}\n"
        )
        after, scale = "cos", NORM_SCALE
        if head == "ArcFace":
            text += (
                'layer { name: "margin" type: "LabelSpecificMargin" bottom: "cos" '
                'bottom: "label" top: "cos_m" label_specific_margin_param { '
                f"margin_base: {ARC_MARGIN_DEG} gamma: 0 }} }}\n"
            )
            after, scale = "cos_m", ARC_SCALE
        elif head == "CosFace":
            text += (
                'layer { name: "margin" type: "LabelSpecificAdd" bottom: "cos" '
                'bottom: "label" top: "cos_m" label_specific_add_param { '
                f"bias: {-COS_MARGIN} }} }}\n"
            )
            after, scale = "cos_m", COS_SCALE
        text += (
            f'layer {{ name: "scale" type: "Scale" bottom: "{after}" top: "logits" '
            "param { lr_mult: 0 } scale_param { num_axes: 0 "
            f'filler {{ type: "constant" value: {scale} }} }} }}\n'
        )
    text += (
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "logits" '
        'bottom: "label" top: "loss" }\n'
    )
    return text


def make_netlite_step(engine, head, x, w, labels):
    """A closure running one clear-diffs + forward + backward on ``engine``."""
    n, d = x.shape
    fuse = engine != "numba-unfused"
    cpu = "numba" if engine.startswith("numba") else engine
    if engine == "cupy":
        netlite.set_mode_gpu()
    else:
        netlite.set_mode_cpu()
        backend.set_cpu_engine(cpu)
    net = netlite.Net(head_prototxt(head, n, d, w.shape[0]), netlite.TRAIN,
                      dtype=np.float32)
    xp = net.blobs["x"].xp
    net.params["fc"][0].data[...] = xp.asarray(w)
    net.blobs["x"].data[...] = xp.asarray(x)
    net.blobs["label"].data[...] = xp.asarray(labels.astype(np.float32))
    if engine == "cupy":
        netlite.set_mode_cpu()
        import cupy

        sync = cupy.cuda.Stream.null.synchronize
    else:
        def sync():
            pass

    def step():
        net.clear_param_diffs()
        loss = net.forward_backward()
        sync()
        return loss

    # The CPU engine is process-wide and the engines take turns: select this
    # one before each sample (outside the timed calls).
    def prepare():
        netlite.set_fusion(fuse)
        if engine != "cupy":
            backend.set_cpu_engine(cpu)

    step.prepare = prepare
    step.net = net
    return step


def head_memory_bytes(engine, head, x, w, labels):
    """What a netlite head needs beyond its parameters and inputs: the
    bytes its net holds after two steps (blobs, internal blobs, engine
    workspaces; tracemalloc's current size against the size before the net
    was built, less the weights' and the inputs' data and diff), plus the
    peak that a third step allocates on top."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        step = make_netlite_step(engine, head, x, w, labels)
        step.prepare()
        step()
        step()
        net = step.net
        own = sum(b.nbytes for params in net.params.values() for b in params)
        own += net.blobs["x"].nbytes + net.blobs["label"].nbytes
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        step()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return before - base - own + (peak - before)


# ---------------------------------------------------------------------- pml
def make_pml_step(head, x, w, labels):
    import torch
    from pytorch_metric_learning import losses

    n, d = x.shape
    c = w.shape[0]
    loss_fn = {
        "ArcFace": lambda: losses.ArcFaceLoss(c, d, margin=ARC_MARGIN_DEG,
                                              scale=ARC_SCALE),
        "CosFace": lambda: losses.CosFaceLoss(c, d, margin=COS_MARGIN,
                                              scale=COS_SCALE),
        "L-Softmax": lambda: losses.LargeMarginSoftmaxLoss(c, d, margin=L_MARGIN),
        "SphereFace": lambda: losses.SphereFaceLoss(c, d, margin=L_MARGIN),
        "NormFace": lambda: losses.NormalizedSoftmaxLoss(
            c, d, temperature=1.0 / NORM_SCALE),
    }[head]()
    loss_fn.W.data = torch.from_numpy(np.ascontiguousarray(w.T))
    xt = torch.from_numpy(x.copy()).requires_grad_()
    lt = torch.from_numpy(labels.astype(np.int64))

    def step():
        xt.grad = None
        loss_fn.W.grad = None
        loss = loss_fn(xt, lt)
        loss.backward()
        return loss.detach()

    return step


# -------------------------------------------------------------------- floor
def make_floor_step(x, w):
    """The three N×D×C GEMMs of any head, into preallocated outputs."""
    logits = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
    dx = np.empty_like(x)
    dw = np.empty_like(w)

    def step():
        np.matmul(x, w.T, out=logits)
        np.matmul(logits, w, out=dx)
        np.matmul(logits.T, x, out=dw)

    return step


# ------------------------------------------------------------------- timing
def profile_layers(step, repeats=5):
    """Median seconds per layer of the warmed-up net: (name, type, fwd, bwd)."""
    net = step.net
    step.prepare()
    step()
    rows = []
    for i, (name, layer) in enumerate(zip(net.layer_names, net.layers)):
        fwd, bwd = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            net.forward_from_to(i, i)
            fwd.append(time.perf_counter() - t)
            t = time.perf_counter()
            net.backward_from_to(i, i)
            bwd.append(time.perf_counter() - t)
        rows.append((name, layer.type, statistics.median(fwd), statistics.median(bwd)))
    t = time.perf_counter()
    net.clear_param_diffs()
    rows.append(("(clear_param_diffs)", "", time.perf_counter() - t, 0.0))
    return rows




def format_bytes(n):
    return f"{n / 2**20:.1f} MiB"


def parse_size(text):
    parts = tuple(int(v) for v in text.split(","))
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError("expected N,D,C (three positive integers)")
    return parts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=parse_size, action="append", default=None,
                        metavar="N,D,C",
                        help=f"a size to run (repeatable; default "
                             f"{','.join(map(str, DEFAULT_SIZE))})")
    parser.add_argument("--large", action="store_true",
                        help=f"also run {','.join(map(str, LARGE_SIZE))}")
    parser.add_argument("--heads", default=",".join(HEADS),
                        help="comma-separated subset of " + ",".join(HEADS))
    parser.add_argument("--engines", default=None,
                        help="comma-separated subset of numpy,numba,cupy "
                             "(default numpy,numba, plus cupy with a GPU)")
    parser.add_argument("--no-pml", action="store_true",
                        help="skip pytorch-metric-learning")
    parser.add_argument("--rounds", type=int, default=7,
                        help="timed samples per step at the default size (7)")
    parser.add_argument("--large-rounds", type=int, default=3,
                        help="timed samples per step when C >= 50000 (3)")
    parser.add_argument("--sample-seconds", type=float, default=0.2,
                        help="minimum length of one sample (default 0.2)")
    parser.add_argument("--gap-seconds", type=float, default=0.3,
                        help="idle time before each sample (default 0.3)")
    parser.add_argument("--profile", action="store_true",
                        help="also print per-layer times of the numba chains")
    parser.add_argument("--markdown", action="store_true",
                        help="print the table as Markdown")
    args = parser.parse_args(argv)

    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    unknown = set(heads) - set(HEADS)
    if unknown:
        parser.error(f"unknown heads {sorted(unknown)}; choose from {HEADS}")
    sizes = list(args.sizes or [DEFAULT_SIZE])
    if args.large:
        sizes.append(LARGE_SIZE)
    if args.engines:
        engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    else:
        engines = (["numpy", "numba-unfused", "numba"]
                   + (["cupy"] if backend.cupy_available() else []))

    import numba

    threads = numba.get_num_threads()
    torch = None
    versions = (f"python {platform.python_version()}, numpy {np.__version__}, "
                f"numba {numba.__version__} ({threads} threads, "
                f"{numba.threading_layer()} threading layer)")
    if not args.no_pml:
        try:
            import pytorch_metric_learning
            import torch

            torch.set_num_threads(threads)
            versions += (f", torch {torch.__version__} ({torch.get_num_threads()} "
                         f"threads), pytorch-metric-learning "
                         f"{pytorch_metric_learning.__version__}")
        except ImportError as exc:
            torch = None
            versions += f", pml skipped ({exc})"

    load_before = os.getloadavg()[0]
    cpu_before = os.times()
    rng = np.random.default_rng(1701)
    rows, checks, profiles = [], [], []
    for n, d, c in sizes:
        print(f"size {(n, d, c)}: setting up ...", file=sys.stderr, flush=True)
        x = rng.standard_normal((n, d), dtype=np.float32)
        w = rng.standard_normal((c, d), dtype=np.float32) * np.float32(0.01)
        labels = rng.integers(0, c, size=n)
        steps = {}
        for head in heads:
            for engine in engines:
                steps[(head, engine)] = make_netlite_step(engine, head, x, w, labels)
            if torch is not None:
                steps[(head, "pml")] = make_pml_step(head, x, w, labels)
        steps[("-", "3-GEMM floor")] = make_floor_step(x, w)
        # Warm up (Numba compiles) and check the losses against pml's (or
        # numpy's) on the same features, labels and weights.
        losses = {}
        for key, step in steps.items():
            getattr(step, "prepare", lambda: None)()
            for _ in range(2):
                value = step()
            if value is not None:
                losses[key] = float(value)
        for head in heads:
            ref_engine = "pml" if (head, "pml") in losses else "numpy"
            ref = losses.get((head, ref_engine))
            for engine in engines + ["pml"]:
                if (head, engine) in losses and engine != ref_engine and ref:
                    rel = abs(losses[(head, engine)] - ref) / abs(ref)
                    checks.append(((n, d, c), head, engine, ref_engine,
                                   losses[(head, engine)], rel))
                    if rel > 1e-3:
                        raise SystemExit(f"{head} {engine} loss "
                                         f"{losses[(head, engine)]} != {ref_engine} "
                                         f"{ref} at {(n, d, c)}")
        memory = {(head, engine): head_memory_bytes(engine, head, x, w, labels)
                  for head in heads for engine in engines if engine != "cupy"}
        if args.profile and "numba" in engines:
            for head in heads:
                profiles.append(((n, d, c), head,
                                 profile_layers(steps[(head, "numba-unfused")])))
        rounds = args.large_rounds if c >= 50000 else args.rounds
        print(f"size {(n, d, c)}: timing {len(steps)} steps, {rounds} rounds ...",
              file=sys.stderr, flush=True)
        times = measure(steps, rounds, args.sample_seconds, args.gap_seconds)
        floor = times[("-", "3-GEMM floor")]
        for (head, engine), t in times.items():
            pml = times.get((head, "pml"))
            rows.append(((n, d, c), head, engine, t, t / floor,
                         t / pml if pml else None, memory.get((head, engine))))
        del steps
    cpu_after = os.times()
    cpu_used = (cpu_after.user + cpu_after.system
                - cpu_before.user - cpu_before.system)

    print(f"date: {datetime.date.today().isoformat()}")
    print(f"machine: nproc={os.cpu_count()}, CPU: {cpu_model()}")
    print(f"versions: {versions}")
    print(f"timing: median of {args.rounds} interleaved samples "
          f"({args.large_rounds} when C >= 50000) of >= {args.sample_seconds} s, "
          f"gap {args.gap_seconds} s; 1-min load average before/after "
          f"{load_before:.2f}/{os.getloadavg()[0]:.2f}; this process used "
          f"{cpu_used:.1f} s CPU in {cpu_after.elapsed - cpu_before.elapsed:.1f} s")
    print("step: clear param diffs + forward + backward (features and weights); "
          "memory: what the head holds and allocates beyond its weights and "
          "inputs (tracemalloc: NumPy's allocations; 1 N x C float32 array = "
          f"{format_bytes(4 * sizes[0][0] * sizes[0][2])} at the first size)")
    for size, head, engine, ref_engine, value, rel in checks:
        print(f"check {size} {head}: {engine} loss {value:.6g}, relative "
              f"difference to {ref_engine} {rel:.1e}")
    print()
    header = ("(N, D, C)", "head", "engine", "time", "/ floor", "/ pml",
              "peak extra memory")
    cells = [(str(size), head, engine, format_time(t), f"{f:.2f}",
              "-" if p is None else f"{p:.2f}",
              "-" if m is None else format_bytes(m))
             for size, head, engine, t, f, p, m in rows]
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join(["---"] * 3 + ["---:"] * 4) + "|")
        for row in cells:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(r[i]) for r in cells + [header]) for i in range(len(header))]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for row in cells:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    for size, head, layer_rows in profiles:
        total = sum(f + b for _, _, f, b in layer_rows)
        print(f"\nprofile numba {head} {size} (median of 5 per layer; "
              f"sum {format_time(total)}):")
        for name, kind, f, b in layer_rows:
            print(f"  {name:20s} {kind:24s} fwd {format_time(f):>10s}  "
                  f"bwd {format_time(b):>10s}  {100 * (f + b) / total:5.1f} %")


if __name__ == "__main__":
    main()
