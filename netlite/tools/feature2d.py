"""``netlite feature2d``: train the 2-D feature variants and draw them.

::

    netlite feature2d --dataset mnist --backbone small --variants 'normface_s*' \\
        --epochs 10 --seeds 1,2 --jobs 2 --out runs/feature2d

One run is one (variant, seed): :func:`run_one`
(netlite.tools.feature2d_run) writes the run's net and solver prototxt,
trains with the solver (Adam), scores the test split and a fixed part of
the train split after every epoch on the margin-free logits (blob
``scores`` of the TEST net), and writes the run's JSON record, its petal
plots and its curves (netlite.tools.feature2d_report).  :func:`run_grid`,
here, runs many in this process, in ``--jobs`` processes or on a Dask
cluster (``--dask``); each finished run is appended to ``results.jsonl``
(so a grid that stops resumes where it stopped), then the grid's
``results.md`` and ``contact_sheet.png`` are written.  docs/feature2d.md
describes the outputs.

matplotlib (the ``plot`` extra) draws; dask (the ``grid`` extra) is needed
only for ``--dask``.  Neither is imported by ``import netlite``.
"""

import argparse
import concurrent.futures
import contextlib
import multiprocessing
import os
import sys

from netlite.errors import NetliteError
from netlite.tools import feature2d_nets as nets
from netlite.tools.feature2d_report import (
    MAX_POINTS,
    append_record,
    contact_sheet,
    draw_petals,
    plot_run,
    read_results,
    results_table,
    write_summary,
)
from netlite.tools.feature2d_run import (
    RECORD_VERSION,
    TRAIN_EVAL_DEFAULT,
    make_specs,
    run_dir,
    run_key,
    run_one,
)

__all__ = [
    "MAX_POINTS", "RECORD_VERSION", "TRAIN_EVAL_DEFAULT", "append_record",
    "build_parser", "contact_sheet", "draw_petals", "main", "make_specs",
    "plot_run", "read_results", "results_table", "run_dir", "run_grid",
    "run_key", "run_one", "write_summary",
]


# ----------------------------------------------------------------- grid
def _dask_client(address):
    try:
        from dask.distributed import Client
    except ImportError as exc:
        raise ImportError(
            "--dask needs dask.distributed: pip install 'netlite-caffe[grid]'"
        ) from exc
    return Client(address)


@contextlib.contextmanager
def _blas_threads(threads):
    """Give the worker processes ``threads`` BLAS threads each.

    The spawned workers read these variables when they import NumPy.  Left
    unset, every worker's OpenBLAS starts one thread per core, and ``jobs``
    workers oversubscribe the machine: its spinning threads made each run
    several times slower than alone.  A value the user set is kept.
    """
    names = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {n: os.environ.get(n) for n in names}
    for n in names:
        os.environ.setdefault(n, str(threads))
    try:
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)


def run_grid(specs, jobs=1, dask=None, progress=None, log=print):
    """Run every spec not yet in ``<out>/results.jsonl``; append each record
    as it finishes; write the table and the contact sheet.  Returns all the
    grid's records (earlier ones included)."""
    if not specs:
        return []
    out = specs[0]["out"]
    os.makedirs(out, exist_ok=True)
    results = os.path.join(out, "results.jsonl")
    done = {r["key"]: r for r in read_results(results)}
    todo = [s for s in specs if run_key(s) not in done]
    if len(todo) < len(specs):
        log(f"feature2d: {len(specs) - len(todo)} of {len(specs)} runs already "
            f"in {results}; running {len(todo)}")
    from tqdm.auto import tqdm

    bar = tqdm(total=len(specs), initial=len(specs) - len(todo), desc="grid",
               unit="run", position=0, disable=(None if progress is None
                                                 else not progress))
    show_runs = progress is not False and sys.stderr.isatty()

    def finished(record):
        append_record(results, record)
        done[record["key"]] = record
        bar.set_postfix(last=f"{record['settings']['variant']}: "
                             f"{100 * record['best_test_acc']:.2f}%")
        bar.update(1)

    try:
        if dask is not None:
            client = _dask_client(dask)
            try:
                from dask.distributed import as_completed

                futures = client.map(run_one, todo, pure=False)
                for future in as_completed(futures):
                    finished(future.result())
            finally:
                client.close()
        elif jobs <= 1:
            for spec in todo:
                finished(run_one(spec, position=1 if show_runs else None))
        else:
            ctx = multiprocessing.get_context("spawn")
            threads = max(1, int(todo[0]["threads"] or 1)) if todo else 1
            with _blas_threads(threads), concurrent.futures.ProcessPoolExecutor(
                    jobs, mp_context=ctx) as pool:
                futures = [pool.submit(run_one, spec,
                                       1 + i % jobs if show_runs else None)
                           for i, spec in enumerate(todo)]
                for future in concurrent.futures.as_completed(futures):
                    finished(future.result())
    finally:
        bar.close()
    keys = {run_key(s) for s in specs}
    records = [r for r in read_results(results) if r["key"] in keys]
    write_summary(out, records)
    return records


# ------------------------------------------------------------------ CLI
def _seeds(text):
    try:
        seeds = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected seeds separated by commas, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"seeds must be >= 0, got {text!r}")
    return seeds


def _count(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser():
    p = argparse.ArgumentParser(
        prog="netlite feature2d", allow_abbrev=False,
        description="Train the 2-D feature variants (softmax, NormFace, "
                    "AM-Softmax, ArcFace, ring loss, L-/A-Softmax, ...) and draw "
                    "their petal plots. See docs/feature2d.md.",
    )
    p.add_argument("--dataset", choices=("mnist", "fashion-mnist"), default="mnist")
    p.add_argument("--backbone", choices=tuple(nets.BACKBONES), default="small")
    p.add_argument("--variants", action="append", default=[], metavar="NAMES",
                   help="variant names or globs, comma-separated or repeated "
                        "(default: all; --list shows them)")
    p.add_argument("--epochs", type=_count, default=40,
                   help="epochs per run (default 40, as the study)")
    p.add_argument("--seeds", type=_seeds, default=[1], metavar="S1,S2",
                   help="solver random seeds, one run each (default 1)")
    p.add_argument("--engine", choices=("numpy", "numba"), default=None,
                   help="CPU engine (default: netlite.cpu_engine())")
    p.add_argument("--jobs", type=_count, default=1,
                   help="runs in parallel local processes (default 1)")
    p.add_argument("--threads", type=_count, default=0,
                   help="Numba threads per run (default: cores / jobs)")
    p.add_argument("--dask", metavar="ADDRESS", default=None,
                   help="submit the runs to this Dask scheduler "
                        "(tcp://host:8786); the workers need netlite, the "
                        "datasets and --out on a shared file system")
    p.add_argument("--out", default="runs/feature2d", metavar="DIR",
                   help="grid folder (default runs/feature2d); rerunning with "
                        "the same folder skips the runs already recorded")
    p.add_argument("--train-limit", type=_count, default=0, metavar="N",
                   help="train on the first N images only (0: all)")
    p.add_argument("--test-limit", type=_count, default=0, metavar="N",
                   help="test on the first N images only (0: all)")
    p.add_argument("--train-eval", type=_count, default=TRAIN_EVAL_DEFAULT,
                   metavar="N",
                   help="train images scored and drawn after each epoch "
                        f"(default {TRAIN_EVAL_DEFAULT}; 0: all)")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="look for the datasets here first")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--list", action="store_true",
                   help="print the selected variants and exit")
    p.add_argument("--write-prototxt", metavar="DIR", default=None,
                   help="write every selected variant's net prototxt "
                        "(full datasets) to DIR/<backbone>/ and exit")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        variants = nets.select_variants(args.variants)
    except ValueError as exc:
        print(f"netlite feature2d: error: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for v in variants:
            print(v)
        return 0
    if args.write_prototxt:
        from netlite import io

        for v in variants:
            path = os.path.join(args.write_prototxt, args.backbone, f"{v}.prototxt")
            io.atomic_write_bytes(path, nets.net_prototxt(
                v, args.backbone, f"{args.dataset}:train",
                f"{args.dataset}:test").encode())
        print(f"wrote {len(variants)} prototxt files to "
              f"{os.path.join(args.write_prototxt, args.backbone)}")
        return 0
    if args.epochs < 1:
        print("netlite feature2d: error: --epochs must be >= 1", file=sys.stderr)
        return 2
    engine = args.engine
    if engine is None:
        from netlite import backend

        engine = backend.cpu_engine()
    jobs = max(1, args.jobs)
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    specs = make_specs(args.dataset, args.backbone, variants, args.seeds,
                       args.epochs, args.out, engine=engine,
                       train_limit=args.train_limit, test_limit=args.test_limit,
                       train_eval=args.train_eval, threads=threads,
                       data_dir=args.data)
    try:
        run_grid(specs, jobs=jobs, dask=args.dask,
                 progress=False if args.no_progress else None)
    except KeyboardInterrupt:
        print("netlite feature2d: interrupted; rerun the same command to resume",
              file=sys.stderr)
        return 130
    except (NetliteError, OSError, ValueError, ImportError, RuntimeError) as exc:
        print(f"netlite feature2d: error: {exc}", file=sys.stderr)
        return 1
    out = os.path.abspath(args.out)
    print(f"Results: {os.path.join(out, 'results.md')}")
    print(f"Records: {os.path.join(out, 'results.jsonl')}")
    print(f"Contact sheet: {os.path.join(out, 'contact_sheet.png')}")
    return 0


if __name__ == "__main__":  # python -m netlite.tools.feature2d
    sys.exit(main())
