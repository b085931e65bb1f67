"""Start-up time on the Numba engine: first run (empty kernel cache) against
second run (kernels loaded from netlite's disk cache, netlite/jit.py).

Every measurement is a fresh Python process with its own, initially empty
cache folder (``NETLITE_NUMBA_CACHE_DIR``), so the user's cache is neither
used nor touched.  Three measurements, each ``--repeats`` times:

* **make train**: seconds from the start of the README's main command to
  its first training-iteration log line ("Iteration 0 (...)"), which comes
  after the iteration-0 test on 10,000 images.  The command is ``make
  train`` itself with ``--make`` (then it includes the set-up check), else
  the ``netlite train`` line of scripts/train.sh.  The process is stopped
  at that line.
* **JIT overhead**: in one process, the time to that first iteration of a
  one-iteration run of the same solver, then of a second run in the same
  process, whose kernels are all compiled already.  The difference is what
  start-up costs beyond the work itself (compiling or loading kernels, and
  the first read of the data files, which the NumPy engine pays too: its
  row is the baseline).  Numba's compile events count real compilations.
  The time spent in Numba's dispatcher on first calls (compiling, or
  loading from the cache) is reported on its own.
* **quick start**: the wall time of a process that runs the README's
  Python quick start (8 x 20 net, forward and backward).

Usage (repository root, MNIST available as for ``make train``)::

    source scripts/data-env.sh
    .venv/bin/python benchmarks/bench_startup.py [--make] [--repeats 3]
"""

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOLVER = "examples/mnist/lenet_quick_solver.prototxt"
FIRST_ITERATION = "Iteration 0 ("

_IN_PROCESS = """
import json, logging, sys, time
import netlite
from netlite import io
from numba.core import event

from numba.core.dispatcher import Dispatcher

jit_time = [0.0]
_compile_for_args = Dispatcher._compile_for_args
def timed(self, *args, **kws):
    # A kernel's first call with new argument types: compiles it or loads
    # it from the disk cache (and, once per process, sets Numba's target
    # context up).
    t = time.perf_counter()
    try:
        return _compile_for_args(self, *args, **kws)
    finally:
        jit_time[0] += time.perf_counter() - t
Dispatcher._compile_for_args = timed

compiled = []
class Count(event.Listener):
    def on_start(self, ev):
        pass
    def on_end(self, ev):
        compiled.append(ev)
event.register("numba:compile", Count())

class Clock(logging.Handler):
    def __init__(self):
        super().__init__()
        self.t = None
    def emit(self, record):
        if self.t is None and record.getMessage().startswith("Iteration 0 ("):
            self.t = time.perf_counter()

def run():
    log = logging.getLogger("netlite")
    clock = Clock()
    log.addHandler(clock)
    log.setLevel(logging.INFO)
    n = len(compiled)
    jit_time[0] = 0.0
    t = time.perf_counter()
    param = io.read_solver_param(SOLVER)
    param.max_iter = 1
    param.snapshot_after_train = False
    param.display = 1
    netlite.get_solver(param).solve()
    log.removeHandler(clock)
    return clock.t - t, len(compiled) - n, jit_time[0]

netlite.set_cpu_engine(sys.argv[1])
first, c1, jit = run()
again, c2, _ = run()
print(json.dumps({"first": first, "again": again, "compiled": c1, "jit": jit}))
"""

_QUICK_START = """
import numpy as np
import netlite

netlite.set_random_seed(1701)
netlite.set_cpu_engine(ENGINE)
net = netlite.Net('''
layer { name: "data" type: "Input" top: "x" top: "label"
        input_param { shape { dim: 8 dim: 20 } shape { dim: 8 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "score"
        inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss"
        loss_param { ignore_label: -1 } }
''', netlite.TRAIN, dtype=np.float64)
x, label = np.random.randn(8, 20), np.arange(8) % 5
out = net.forward(x=x, label=label)
net.backward()
"""


def _env(cache):
    env = dict(os.environ, NETLITE_NUMBA_CACHE_DIR=cache)
    env.pop("NETLITE_NUMBA_CACHE", None)
    return env


def time_to_first_iteration(command, cache):
    """Seconds until ``command`` prints the first iteration line."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, env=_env(cache), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        for line in proc.stdout:
            if FIRST_ITERATION in line:
                return time.perf_counter() - start
        raise RuntimeError(f"{command[0]} ended without {FIRST_ITERATION!r}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()


def run_json(code, cache, *args):
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO,
                         env=_env(cache), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def wall_time(code, cache):
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(cache),
                   check=True, capture_output=True)
    return time.perf_counter() - start


def _median(values):
    return f"{statistics.median(values):.2f} s" + (
        f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--make", action="store_true",
                   help="time `make train` itself (default: its netlite command)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.make:
        train = ["make", "train"]
    else:
        netlite_cli = os.path.join(os.path.dirname(sys.executable), "netlite")
        train = [netlite_cli, "train", "--solver", SOLVER, "--engine", "numba",
                 "--plot", os.path.join(tempfile.gettempdir(), "bench_startup")]

    rows = {}

    def add(name, value):
        rows.setdefault(name, []).append(value)

    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            add("train: to iteration 0, 1st run", time_to_first_iteration(train, cache))
            add("train: to iteration 0, 2nd run", time_to_first_iteration(train, cache))
        code = _IN_PROCESS.replace("SOLVER", repr(SOLVER))
        for engine in ("numba", "numpy"):
            with tempfile.TemporaryDirectory() as cache:
                for run in ("1st", "2nd"):
                    if engine == "numpy" and run == "1st":
                        continue  # nothing to cache
                    r = run_json(code, cache, engine)
                    add(f"{engine}: overhead, {run} run ({r['compiled']} compiled)",
                        r["first"] - r["again"])
                    if engine == "numba":
                        add(f"numba: in Numba's dispatcher, {run} run", r["jit"])
        with tempfile.TemporaryDirectory() as cache:
            for run in ("1st", "2nd"):
                add(f"quick start, numba, {run} run",
                    wall_time(_QUICK_START.replace("ENGINE", "'numba'"), cache))
            add("quick start, numpy",
                wall_time(_QUICK_START.replace("ENGINE", "'numpy'"), cache))

    import numba
    import numpy

    print(f"Python {platform.python_version()}, NumPy {numpy.__version__}, "
          f"Numba {numba.__version__}, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}; "
          f"train command: {' '.join(train)}")
    print("\n| measurement | median (min-max) |\n|---|---:|")
    for name, values in rows.items():
        print(f"| {name} | {_median(values)} |")


if __name__ == "__main__":
    main()
