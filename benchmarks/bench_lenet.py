"""LeNet throughput: netlite's engines against PyTorch on the CPU.

Measures, in one process and with the same thread count everywhere:

* training throughput (images/s) at batch 64: one solver iteration =
  clear the parameter diffs, forward, backward, SGD update with momentum and
  weight decay (netlite's SGDSolver with Caffe's LeNet settings;
  ``torch.optim.SGD`` with the same settings);
* inference throughput (images/s) at batch 1000: forward only, ending in a
  softmax (the deploy net ``examples/mnist/lenet.prototxt``).

Architecture: Caffe's LeNet (conv 20@5x5, max-pool 2, conv 50@5x5, max-pool
2, 500-unit inner product, ReLU, 10-unit inner product), float32.  Inputs
are random images and labels, 16 batches used in turn, identical for both
frameworks.

Every measurement warms up first (JIT compilation, buffer allocation).
Then all of them are timed in turns: ``--repeats`` rounds, each with one
block of at least ``--min-time`` seconds per measurement. The median rate
is reported. Taking turns means a slow period on a shared machine hits
every engine, not only the one that happened to be running.  Usage::

    python benchmarks/bench_lenet.py                 # numpy, numba (+cupy) vs torch
    python benchmarks/bench_lenet.py --threads 2 --engines numba

The thread count must be fixed before NumPy, Numba or PyTorch start their
thread pools, so this script sets OMP/OpenBLAS/MKL/Numba thread variables
from ``--threads`` before importing them.
"""

import argparse
import math
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(REPO, "examples", "mnist", "lenet.prototxt")
TRAIN_BATCH = 64
INFER_BATCH = 1000

# LeNet's TRAIN net with an Input layer in place of the data layer (the
# layers below "data" are Caffe's lenet_train_test.prototxt).
_INPUT = """
name: "LeNet"
layer {{ name: "data" type: "Input" top: "data" top: "label"
  input_param {{ shape {{ dim: {n} dim: 1 dim: 28 dim: 28 }} shape {{ dim: {n} }} }} }}
"""


def _parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2,
                   help="threads for Numba, BLAS and PyTorch (default 2)")
    p.add_argument("--engines", default=None,
                   help="comma-separated subset of numpy,numba,cupy "
                        "(default: numpy,numba, plus cupy with a GPU)")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed blocks per measurement (median reported)")
    p.add_argument("--min-time", type=float, default=1.0,
                   help="minimum seconds per timed block (default 1.0)")
    return p.parse_args(argv)


def _set_thread_env(threads):
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "NUMBA_NUM_THREADS"):
        os.environ[var] = str(threads)


def _batches(gen, count=16):
    """``count`` training batches of random images and labels.

    Cycling through several batches keeps the loss near its starting value;
    one batch repeated would be learnt by heart, and the tiny gradients
    that follow can hit subnormal-number slow paths in any engine.
    """
    import numpy as np

    return [(gen.random((TRAIN_BATCH, 1, 28, 28), dtype=np.float32),
             gen.integers(0, 10, TRAIN_BATCH)) for _ in range(count)]


class Timed:
    """One thing to time: ``step()`` processes ``batch`` images."""

    def __init__(self, step, batch, sync=None, before=None):
        self.step, self.batch, self.sync, self.before = step, batch, sync, before
        self.n, self.rates = 1, []

    def _run(self, n):
        if self.before:
            self.before()
        t = time.perf_counter()
        for _ in range(n):
            self.step()
        if self.sync:
            self.sync()
        return time.perf_counter() - t

    def warm_up(self, min_time):
        """Compile, allocate, then size a block to last ``min_time`` s."""
        self._run(3)
        single = max(self._run(1), 1e-6)
        self.n = max(1, math.ceil(min_time / single))

    def block(self):
        self.rates.append(self.n * self.batch / self._run(self.n))

    @property
    def median(self):
        return statistics.median(self.rates)


def measure_all(timed, repeats, min_time):
    """Warm every entry up, then time them in turns, ``repeats`` rounds.

    Interleaving the blocks spreads any slow period of a shared machine
    over all engines instead of one.
    """
    for t in timed:
        t.warm_up(min_time)
    for _ in range(repeats):
        for t in timed:
            t.block()


# ----------------------------------------------------------------- netlite
def _lenet_train_param():
    from netlite import io

    text = open(os.path.join(REPO, "examples", "mnist", "lenet_train_test.prototxt"),
                encoding="utf-8").read()
    full = io.parse_text(text, io.NetParameter)
    net = io.parse_text(_INPUT.format(n=TRAIN_BATCH), io.NetParameter)
    for layer in full.layer:
        if layer.type in ("IDXData", "Data", "Accuracy"):
            continue
        net.layer.add().CopyFrom(layer)
    return net


def netlite_engine(engine):
    """(train, inference) :class:`Timed` entries for one netlite engine."""
    import numpy as np

    import netlite
    from netlite import io

    netlite.set_random_seed(1701)
    if engine == "cupy":
        netlite.set_mode_gpu()
        import cupy

        def sync():
            cupy.cuda.Device().synchronize()

        before = None
    else:
        netlite.set_mode_cpu()

        def before():
            # The CPU engine is a process-wide choice: re-select it before
            # each block, since blocks of different engines take turns.
            netlite.set_cpu_engine(engine)

        before()
        sync = None

    solver_param = io.SolverParameter(
        base_lr=0.01, momentum=0.9, weight_decay=0.0005, lr_policy="inv",
        gamma=0.0001, power=0.75, max_iter=10**9, display=0,
        snapshot_after_train=False,
    )
    solver_param.train_net_param.CopyFrom(_lenet_train_param())
    solver = netlite.get_solver(solver_param)
    net = solver.net
    xp = net.blobs["data"].xp
    batches = [(xp.asarray(x), xp.asarray(y.astype(np.float32)))
               for x, y in _batches(np.random.default_rng(0))]
    position = [0]

    def train_step():
        # A new batch every iteration, as a data layer would provide.
        x, y = batches[position[0] % len(batches)]
        position[0] += 1
        net.blobs["data"].data[...] = x
        net.blobs["label"].data[...] = y
        solver.step(1)

    deploy = netlite.Net(DEPLOY, netlite.TEST)
    images = xp.asarray(
        np.random.default_rng(1).random((INFER_BATCH, 1, 28, 28), dtype=np.float32))
    deploy.forward(data=images)  # reshape once to the batch
    if engine == "cupy":
        netlite.set_mode_cpu()
    return (Timed(train_step, TRAIN_BATCH, sync, before),
            Timed(deploy.forward, INFER_BATCH, sync, before))


# ----------------------------------------------------------------- PyTorch
def torch_lenet(threads):
    """(train, inference) :class:`Timed` entries for PyTorch on the CPU."""
    import numpy as np
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.MaxPool2d(2, 2, ceil_mode=True),
        nn.Conv2d(20, 50, 5), nn.MaxPool2d(2, 2, ceil_mode=True),
        nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9,
                          weight_decay=0.0005)
    loss_fn = nn.CrossEntropyLoss()
    batches = [(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))
               for x, y in _batches(np.random.default_rng(0))]
    position = [0]

    def train_step():
        x, y = batches[position[0] % len(batches)]
        position[0] += 1
        opt.zero_grad(set_to_none=False)
        loss_fn(model(x), y).backward()
        opt.step()

    xi = torch.rand(INFER_BATCH, 1, 28, 28)

    def infer_step():
        with torch.inference_mode():
            torch.softmax(model(xi), dim=1)

    # train() / eval() change nothing in this model (no dropout or batch
    # norm), so one model serves both measurements.
    return Timed(train_step, TRAIN_BATCH), Timed(infer_step, INFER_BATCH)


def _machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}"


def main(argv=None):
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    _set_thread_env(args.threads)

    import numpy as np

    from netlite import backend

    if args.engines:
        engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    else:
        engines = ["numpy"]
        if backend.numba_available():
            engines.append("numba")
        if backend.cupy_available():
            engines.append("cupy")
    if "numba" in engines:
        import numba

        numba.set_num_threads(args.threads)

    entries = []  # (name, train Timed, inference Timed)
    versions = [f"NumPy {np.__version__}"]
    for engine in engines:
        print(f"setting up netlite {engine} ...", file=sys.stderr, flush=True)
        entries.append((f"netlite {engine}",) + netlite_engine(engine))
    if "numba" in engines:
        versions.append(f"Numba {numba.__version__}")
    has_torch = False
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print("PyTorch is not installed: skipping it", file=sys.stderr)
        else:
            entries.append((f"PyTorch {torch.__version__} (CPU)",)
                           + torch_lenet(args.threads))
            versions.append(f"PyTorch {torch.__version__}")
            has_torch = True
    print("timing ...", file=sys.stderr, flush=True)
    measure_all([t for _, train, infer in entries for t in (train, infer)],
                args.repeats, args.min_time)
    rows = [(name, train.median, infer.median) for name, train, infer in entries]
    reference = rows[-1][1:] if has_torch else None

    print(f"# LeNet throughput, {args.threads} threads; {_machine()}")
    print(f"# {', '.join(versions)}; median of {args.repeats} interleaved blocks "
          f"of >= {args.min_time:g} s")
    head = ("| engine | train img/s (batch 64) | vs PyTorch | "
            "inference img/s (batch 1000) | vs PyTorch |")
    print(head)
    print("|---|---:|---:|---:|---:|")
    for name, train, infer in rows:
        if reference:
            rel_t = f"{train / reference[0]:.2f}x"
            rel_i = f"{infer / reference[1]:.2f}x"
        else:
            rel_t = rel_i = "-"
        print(f"| {name} | {train:,.0f} | {rel_t} | {infer:,.0f} | {rel_i} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
