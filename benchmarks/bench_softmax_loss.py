"""Benchmark SoftmaxWithLoss forward + backward (float32).

Engines: netlite's numpy and numba engines (and cupy when a CUDA device is
present), PyTorch's ``cross_entropy`` forward + backward on the CPU (when
torch is installed; same thread count as Numba), and a memory-copy floor:
three ``np.copyto`` passes over a buffer the size of the scores (a fused
loss needs at least: read the scores in the forward, read them again and
write the gradient in the backward).

Everything runs in one process.  Each engine is warmed up first (Numba
compiles), then the engines are timed in interleaved rounds, so a burst of
load from elsewhere on the machine hits all of them alike; each sample
times enough calls to last about ``--sample-seconds`` after an idle gap
(``--gap-seconds``, so that the previous engine's spinning OpenMP threads
have parked), and the table reports the median per-call time.  Timings are
only meaningful on an otherwise idle machine: the header prints the load
average before and after.

Run from the repository root::

    .venv/bin/python benchmarks/bench_softmax_loss.py            # text table
    .venv/bin/python benchmarks/bench_softmax_loss.py --markdown
"""

import argparse
import datetime
import os
import platform
import statistics
import time

import numpy as np

import netlite
from netlite import backend

SIZES = ((64, 10), (1024, 1000), (256, 100000))


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_netlite_step(engine, x, labels):
    """A closure running one forward + backward on ``engine``."""
    device = "gpu" if engine == "cupy" else "cpu"
    if engine != "cupy":
        backend.set_cpu_engine(engine)
    xp = backend.get_array_module(device)
    scores = netlite.Blob(x.shape, dtype=np.float32, device=device)
    scores.data = xp.asarray(x)
    label = netlite.Blob(labels.shape, dtype=np.float32, device=device)
    label.data = xp.asarray(labels.astype(np.float32))
    top = [netlite.Blob(dtype=np.float32, device=device)]
    layer = netlite.create_layer('name: "loss" type: "SoftmaxWithLoss"',
                                 device=device)
    layer.setup([scores, label], top)
    bottom, down = [scores, label], [True, False]

    if engine == "cupy":
        import cupy

        sync = cupy.cuda.Stream.null.synchronize
    else:
        def sync():
            pass

    def step():
        loss = layer.forward(bottom, top)
        layer.backward(top, down, bottom)
        sync()
        return loss

    # The CPU engine is a global setting and the engines are interleaved:
    # select this one before each sample (outside the timed calls).
    step.prepare = lambda: engine == "cupy" or backend.set_cpu_engine(engine)
    return step


def make_torch_step(x, labels):
    import torch
    import torch.nn.functional as F

    xt = torch.from_numpy(x.copy()).requires_grad_()
    lt = torch.from_numpy(labels.astype(np.int64))

    def step():
        xt.grad = None
        loss = F.cross_entropy(xt, lt)
        loss.backward()
        return loss

    return step


def make_floor_step(x):
    buf = np.empty_like(x)

    def step():
        np.copyto(buf, x)
        np.copyto(buf, x)
        np.copyto(buf, x)

    return step


def calls_per_sample(step, target_s):
    """How many calls make one sample last about ``target_s`` seconds."""
    getattr(step, "prepare", lambda: None)()
    start = time.perf_counter()
    step()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, int(target_s / once))


def measure(steps, rounds, target_s, gap_s):
    """Median per-call seconds of each step, timed in interleaved rounds.

    Before each sample the process idles for ``gap_s``: OpenMP worker
    threads (Numba's and PyTorch's pools are distinct) spin for a while
    after a parallel region, and would otherwise steal the cores from the
    next engine's first calls.
    """
    reps = {name: calls_per_sample(step, target_s) for name, step in steps.items()}
    samples = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            n = reps[name]
            getattr(step, "prepare", lambda: None)()
            time.sleep(gap_s)
            start = time.perf_counter()
            for _ in range(n):
                step()
            samples[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(s) for name, s in samples.items()}


def format_time(seconds):
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1e3:.2f} ms"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21,
                        help="timed samples per engine and size (default 21)")
    parser.add_argument("--sample-seconds", type=float, default=0.01,
                        help="target length of one sample (default 0.01)")
    parser.add_argument("--gap-seconds", type=float, default=0.05,
                        help="idle time before each sample (default 0.05)")
    parser.add_argument("--markdown", action="store_true",
                        help="print the table as Markdown")
    args = parser.parse_args(argv)

    import numba

    threads = numba.get_num_threads()
    try:
        import torch

        torch.set_num_threads(threads)
        torch_version = torch.__version__
    except ImportError:
        torch = None
        torch_version = "not installed"
    engines = ["numpy", "numba"] + (["cupy"] if backend.cupy_available() else [])

    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(1701)
    rows = []
    for n, c in SIZES:
        x = rng.standard_normal((n, c), dtype=np.float32) * 3
        labels = rng.integers(0, c, size=n)
        steps = {e: make_netlite_step(e, x, labels) for e in engines}
        if torch is not None:
            steps["torch"] = make_torch_step(x, labels)
        steps["copy floor"] = make_floor_step(x)
        losses = {}
        for name, step in steps.items():  # warm-up (and Numba compilation)
            getattr(step, "prepare", lambda: None)()
            for _ in range(3):
                value = step()
            if value is not None:
                losses[name] = float(value.detach() if hasattr(value, "detach")
                                     else value)
        ref = losses.get("torch", losses["numpy"])
        for name in engines:
            if not np.isclose(losses[name], ref, rtol=1e-4):
                raise SystemExit(f"{name} loss {losses[name]} != {ref} at {(n, c)}")
        times = measure(steps, args.rounds, args.sample_seconds, args.gap_seconds)
        floor = times["copy floor"]
        for name, t in times.items():
            vs_torch = t / times["torch"] if "torch" in times else float("nan")
            rows.append(((n, c), name, t, t / floor, vs_torch))

    print(f"date: {datetime.date.today().isoformat()}")
    print(f"machine: nproc={os.cpu_count()}, CPU: {cpu_model()}")
    print(f"versions: python {platform.python_version()}, numpy {np.__version__}, "
          f"numba {numba.__version__} ({threads} threads, "
          f"{numba.threading_layer()} threading layer), torch {torch_version}")
    print(f"rounds: {args.rounds}, sample length: {args.sample_seconds} s, "
          f"gap: {args.gap_seconds} s, "
          f"1-min load average before/after: {load_before:.2f}/"
          f"{os.getloadavg()[0]:.2f}")
    print()
    header = ("(N, C)", "engine", "time", "/ floor", "/ torch")
    cells = [(str(size), name, format_time(t), f"{f:.2f}", f"{v:.2f}")
             for size, name, t, f, v in rows]
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join(["---", "---", "---:", "---:", "---:"]) + "|")
        for row in cells:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(r[i]) for r in cells + [header]) for i in range(5)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for row in cells:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


if __name__ == "__main__":
    main()
