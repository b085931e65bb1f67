"""``netlite feature2d``: train the 2-D feature variants and draw them.

::

    netlite feature2d --dataset mnist --backbone small --variants 'normface_s*' \\
        --epochs 10 --seeds 1,2 --jobs 2 --out runs/feature2d

One run is one (variant, seed): :func:`run_one` writes the run's net and
solver prototxt, trains with the solver (Adam), scores the test split and
a fixed part of the train split after every epoch on the margin-free
logits (blob ``scores`` of the TEST net), and writes the run's JSON record,
its petal plots and its curves.  :func:`run_grid` runs many in this
process, in ``--jobs`` processes or on a Dask cluster (``--dask``); each
finished run is appended to ``results.jsonl`` (so a grid that stops
resumes where it stopped), then the grid's ``results.md`` and
``contact_sheet.png`` are written.  docs/feature2d.md describes the
outputs.

matplotlib (the ``plot`` extra) draws; dask (the ``grid`` extra) is needed
only for ``--dask``.  Neither is imported by ``import netlite``.
"""

import argparse
import concurrent.futures
import contextlib
import io as _io
import json
import math
import multiprocessing
import os
import sys
import time
import warnings

import numpy as np

from netlite.errors import NetliteError
from netlite.tools import feature2d_nets as nets

#: Version of the record layout (bump when a field changes meaning).
RECORD_VERSION = 1
#: Train images scored (and drawn) after each epoch, by default.
TRAIN_EVAL_DEFAULT = 10000
#: Points drawn per petal panel at most (evenly strided).
MAX_POINTS = 5000


# ----------------------------------------------------------------- specs
def run_key(spec):
    """What identifies a run in ``results.jsonl`` (and its folder)."""
    return "|".join(str(spec[k]) for k in (
        "dataset", "backbone", "variant", "seed", "epochs", "train_limit",
        "test_limit", "train_eval"))


def run_dir(spec):
    return os.path.join(spec["out"], "runs", spec["variant"], f"seed{spec['seed']}")


def make_specs(dataset, backbone, variants, seeds, epochs, out, engine="numba",
               train_limit=0, test_limit=0, train_eval=TRAIN_EVAL_DEFAULT,
               threads=0, data_dir=None):
    """One dict per (variant, seed): everything :func:`run_one` needs."""
    if dataset not in ("mnist", "fashion-mnist"):
        raise ValueError(f"dataset must be mnist or fashion-mnist, got {dataset!r}")
    if backbone not in nets.BACKBONES:
        raise ValueError(f"backbone must be one of {', '.join(nets.BACKBONES)}, "
                         f"got {backbone!r}")
    return [{
        "dataset": dataset, "backbone": backbone, "variant": v, "seed": int(s),
        "epochs": int(epochs), "engine": engine, "out": os.path.abspath(out),
        "train_limit": int(train_limit), "test_limit": int(test_limit),
        "train_eval": int(train_eval), "threads": int(threads),
        "data_dir": data_dir,
    } for v in variants for s in seeds]


# ------------------------------------------------------------------ data
def _sources(spec):
    """The net's train and test sources: dataset names, or subsampled IDX
    files (the first N images) written once under ``<out>/data``."""
    from netlite.data import idx, mnist

    sources, sizes = [], []
    for split, limit in (("train", spec["train_limit"]), ("test", spec["test_limit"])):
        images, labels = mnist.load_mnist(spec["dataset"], split,
                                          data_dir=spec["data_dir"])
        n = len(labels) if not limit else min(limit, len(labels))
        sizes.append(n)
        if n == len(labels):
            sources.append(f"{spec['dataset']}:{split}")
            continue
        folder = os.path.join(spec["out"], "data")
        os.makedirs(folder, exist_ok=True)
        stem = os.path.join(folder, f"{spec['dataset']}-{split}-{n}")
        paths = (stem + "-images-idx3-ubyte", stem + "-labels-idx1-ubyte")
        for path, array in zip(paths, (images[:n], labels[:n])):
            if not os.path.exists(path):
                tmp = f"{path}.{os.getpid()}.tmp"
                idx.save_idx(tmp, np.ascontiguousarray(array))
                os.replace(tmp, path)
        sources.append(paths)
    return sources, sizes


# ------------------------------------------------------------------- run
def _evaluate(net, n, has_ring):
    """Forward ``ceil(n / batch)`` batches; the first ``n`` rows' features,
    labels, margin-free logits, and accuracy and cross-entropy on them."""
    for layer in net.layers:
        if layer.layer_param.type == "IDXData":
            layer.cursor = 0  # the same images every epoch
    feats, labels, scores = [], [], []
    got, ring = 0, []
    while got < n:
        net.forward()
        feats.append(np.asarray(net.blobs["feature"].data, dtype=np.float64).copy())
        labels.append(np.asarray(net.blobs["label"].data).astype(np.int64))
        scores.append(np.asarray(net.blobs["scores"].data, dtype=np.float64).copy())
        if has_ring:
            ring.append(float(net.blobs["ring_loss"].data))
        got += feats[-1].shape[0]
    f = np.concatenate(feats)[:n]
    y = np.concatenate(labels)[:n]
    z = np.concatenate(scores)[:n]
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    out = {
        "acc": float((z.argmax(axis=1) == y).mean()),
        "ce": float(-logp[np.arange(n), y].mean()),
    }
    if has_ring:
        out["ring"] = float(np.mean(ring))
    return out, f, y


def _weights(solver):
    return np.asarray(solver.net.params["pred"][0].data, dtype=np.float64).copy()


def _learned(solver):
    """The scale s and ring radius R, where the net has them."""
    out = {}
    for name, key in (("scale", "scale"), ("ring", "radius")):
        if name in solver.net.params:
            out[key] = float(np.asarray(solver.net.params[name][0].data).ravel()[0])
    return out


def _norm_stats(values):
    return {"mean": float(values.mean()), "min": float(values.min()),
            "max": float(values.max())}


def run_one(spec, position=None):
    """Train and score one (variant, seed); write its files; return its record.

    ``position`` places the per-run progress bar (None: no bar).
    """
    import netlite
    from netlite import backend, io
    from netlite.data import catalog

    if spec["data_dir"]:
        catalog.set_data_dir(spec["data_dir"])
    netlite.set_mode_cpu()
    netlite.set_cpu_engine(spec["engine"])
    if spec["threads"] and spec["engine"] == "numba":
        import numba

        numba.set_num_threads(min(spec["threads"], numba.config.NUMBA_NUM_THREADS))
    folder = run_dir(spec)
    os.makedirs(folder, exist_ok=True)
    (train_src, test_src), (n_train, n_test) = _sources(spec)
    ipe = math.ceil(n_train / nets.TRAIN_BATCH)
    net_file = os.path.join(folder, "net.prototxt")
    solver_file = os.path.join(folder, "solver.prototxt")
    io.atomic_write_bytes(net_file, nets.net_prototxt(
        spec["variant"], spec["backbone"], train_src, test_src).encode())
    io.atomic_write_bytes(solver_file, nets.solver_prototxt(
        "net.prototxt", ipe, spec["epochs"], spec["seed"],
        math.ceil(n_test / nets.TEST_BATCH)).encode())

    n_train_eval = min(spec["train_eval"], n_train) if spec["train_eval"] else n_train
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", netlite.NetliteWarning)
        param = io.read_solver_param(solver_file)
        # The runner scores each epoch itself (features included); the
        # solver's own test pass would repeat the test forward.  Testing
        # draws no random numbers, so training is the same either way.
        param.test_interval = 2 ** 31 - 1
        param.display = 0
        param.net = net_file  # the file's "net.prototxt", made absolute
        solver = netlite.get_solver(param)
        test_net = solver.test_nets[0]
        train_net = netlite.Net(net_file, netlite.TEST,
                                stages=[nets.TRAIN_SET_STAGE])
        has_ring = "ring" in solver.net.params
        losses = []
        solver.add_callback(on_iteration=lambda it, loss, smooth, lr:
                            losses.append(float(loss)))
        bar = None
        if position is not None:
            from tqdm.auto import tqdm

            bar = tqdm(total=ipe * spec["epochs"], position=position, leave=False,
                       desc=f"{spec['variant']} s{spec['seed']}", unit="it",
                       disable=None, dynamic_ncols=True)
            solver.add_callback(on_iteration=lambda *a: bar.update(1))
        epochs, best, snapshots = [], None, {}
        t0 = time.perf_counter()
        for epoch in range(1, spec["epochs"] + 1):
            start = len(losses)
            t_epoch = time.perf_counter()
            solver.step(ipe)
            train_seconds = time.perf_counter() - t_epoch
            for net in (test_net, train_net):
                net.share_trained_layers_with(solver.net)
            test, f_test, y_test = _evaluate(test_net, n_test, has_ring)
            train, f_train, y_train = _evaluate(train_net, n_train_eval, has_ring)
            w = _weights(solver)
            row = {
                "epoch": epoch, "iteration": solver.iter,
                "train_objective": float(np.mean(losses[start:])),
                "train_acc": train["acc"], "train_ce": train["ce"],
                "test_acc": test["acc"], "test_ce": test["ce"],
                "weight_norm": _norm_stats(np.linalg.norm(w, axis=1)),
                "feature_norm_test": _norm_stats(np.linalg.norm(f_test, axis=1)),
                "train_seconds": train_seconds,
                **_learned(solver),
            }
            if has_ring:
                row["test_ring"] = test["ring"]
            if not all(np.isfinite(v) for v in (row["train_objective"],
                                                row["test_ce"])):
                row["non_finite"] = True
            epochs.append(row)
            snap = {"epoch": epoch, "w": w, "f_test": f_test, "y_test": y_test,
                    "f_train": f_train, "y_train": y_train}
            if best is None or test["acc"] > best["test_acc"]:
                best = row
                snapshots["best"] = snap
            snapshots["last"] = snap
            if bar is not None:
                bar.set_postfix(epoch=epoch, test_acc=f"{test['acc']:.4f}")
            if row.get("non_finite"):
                break  # the study aborted on NaN too
        wall = time.perf_counter() - t0
        if bar is not None:
            bar.close()
    record = {
        "record_version": RECORD_VERSION, "key": run_key(spec),
        "settings": {k: v for k, v in spec.items() if k not in ("out", "data_dir")},
        "variant_params": nets.VARIANTS[spec["variant"]],
        "n_train": n_train, "n_test": n_test, "n_train_eval": n_train_eval,
        "iters_per_epoch": ipe, "epochs": epochs,
        "best_epoch": best["epoch"], "best_test_acc": best["test_acc"],
        "last_test_acc": epochs[-1]["test_acc"], "wall_seconds": wall,
        "engine": spec["engine"], "netlite_version": netlite.__version__,
        "numba_threads": _numba_threads(spec["engine"]),
        "device": backend.mode(),
        "warnings": sorted({str(w.message) for w in caught}),
        "files": {"net": "net.prototxt", "solver": "solver.prototxt"},
        "run_dir": os.path.relpath(folder, spec["out"]),
    }
    for which, snap in snapshots.items():
        name = f"features_{which}.npz"
        buf = _io.BytesIO()
        np.savez_compressed(buf, epoch=snap["epoch"], weights=snap["w"],
                            test_features=snap["f_test"].astype(np.float32),
                            test_labels=snap["y_test"].astype(np.uint8),
                            train_features=snap["f_train"].astype(np.float32),
                            train_labels=snap["y_train"].astype(np.uint8))
        io.atomic_write_bytes(os.path.join(folder, name), buf.getvalue())
        record["files"][f"features_{which}"] = name
    try:
        record["files"].update(_plot_run(folder, record, snapshots))
    except ImportError as exc:
        record["plot_error"] = str(exc)
    io.atomic_write_bytes(os.path.join(folder, "record.json"),
                          (json.dumps(record, indent=1) + "\n").encode())
    return record


def _numba_threads(engine):
    if engine != "numba":
        return None
    import numba

    return int(numba.get_num_threads())


# ---------------------------------------------------------------- plots
def _figure(width, height):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=80)


def _save(fig, path):
    from netlite import io

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    io.atomic_write_bytes(path, buf.getvalue())


def draw_petals(ax, features, labels, weights, title):
    """Scatter 2-D features coloured by class; draw each class weight's
    direction from the origin (sub-centers: every row, in its class colour)."""
    step = max(1, len(labels) // MAX_POINTS)
    f, y = features[::step], labels[::step]
    colors = _colors()
    ax.scatter(f[:, 0], f[:, 1], c=colors[y % 10], s=1.5, linewidths=0,
               rasterized=True)
    reach = float(np.percentile(np.linalg.norm(f, axis=1), 99)) if len(f) else 1.0
    reach = reach if np.isfinite(reach) and reach > 0 else 1.0
    per_class = max(1, weights.shape[0] // nets.NUM_CLASSES)
    for j, wj in enumerate(weights):
        n = float(np.linalg.norm(wj))
        if n > 0 and np.isfinite(n):
            end = wj / n * reach * 1.1
            ax.plot([0, end[0]], [0, end[1]], color=colors[(j // per_class) % 10],
                    lw=1.0)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_title(title, fontsize=7)
    ax.tick_params(labelsize=5)


def _colors():
    from matplotlib import colormaps

    return np.asarray(colormaps["tab10"].colors)


def _plot_run(folder, record, snapshots):
    files = {}
    name = record["settings"]["variant"]
    for which, snap in snapshots.items():
        fig = _figure(4, 2.2)
        axes = fig.subplots(1, 2)
        for ax, split in zip(axes, ("train", "test")):
            draw_petals(ax, snap[f"f_{split}"], snap[f"y_{split}"], snap["w"],
                        f"{name} {split}, epoch {snap['epoch']} ({which})")
        fig.tight_layout()
        path = f"petals_{which}.png"
        _save(fig, os.path.join(folder, path))
        files[f"petals_{which}"] = path
    ep = [r["epoch"] for r in record["epochs"]]
    fig = _figure(4, 2.0)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(ep, [r["train_objective"] for r in record["epochs"]], "o-",
                 ms=2, label="train objective")
    ax_loss.plot(ep, [r["test_ce"] for r in record["epochs"]], "o-", ms=2,
                 label="test CE (no margin)")
    ax_acc.plot(ep, [r["train_acc"] for r in record["epochs"]], "o-", ms=2,
                label="train")
    ax_acc.plot(ep, [r["test_acc"] for r in record["epochs"]], "o-", ms=2,
                label="test")
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch", fontsize=6)
        ax.set_title(f"{name}: {title}", fontsize=7)
        ax.tick_params(labelsize=5)
        ax.legend(fontsize=5)
    fig.tight_layout()
    _save(fig, os.path.join(folder, "curves.png"))
    files["curves"] = "curves.png"
    return files


def contact_sheet(out, records, path, which="last"):
    """Every variant's test petals (its first seed's run) side by side."""
    by_variant = {}
    for rec in sorted(records, key=lambda r: r["settings"]["seed"]):
        by_variant.setdefault(rec["settings"]["variant"], rec)
    order = [v for v in nets.VARIANTS if v in by_variant]
    if not order:
        return None
    cols = min(6, len(order))
    rows = math.ceil(len(order) / cols)
    fig = _figure(1.4 * cols, 1.5 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes[len(order):]:
        ax.set_axis_off()
    for ax, variant in zip(axes, order):
        rec = by_variant[variant]
        data = np.load(os.path.join(out, rec["run_dir"],
                                    rec["files"][f"features_{which}"]))
        acc = rec["epochs"][int(data["epoch"]) - 1]["test_acc"]
        draw_petals(ax, data["test_features"], data["test_labels"],
                    data["weights"], f"{variant}\n{100 * acc:.2f}%")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.title.set_fontsize(5)
    fig.tight_layout(pad=0.3)
    _save(fig, path)
    return path


# ---------------------------------------------------------------- table
def _mean_spread(values):
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return f"{values.mean():.2f}"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def results_table(records):
    """The grid's Markdown table: one row per variant, seeds aggregated."""
    groups = {}
    for rec in records:
        s = rec["settings"]
        groups.setdefault((s["dataset"], s["backbone"], s["variant"]), []).append(rec)
    lines = [
        "| dataset | backbone | variant | seeds | epochs | best test acc % | "
        "last test acc % | epochs to best | learned s / R (last) | wall s / run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {v: i for i, v in enumerate(nets.VARIANTS)}
    for (dataset, backbone, variant), recs in sorted(
            groups.items(), key=lambda kv: (kv[0][0], kv[0][1], order[kv[0][2]])):
        recs = sorted(recs, key=lambda r: r["settings"]["seed"])
        learned = [r["epochs"][-1].get("scale", r["epochs"][-1].get("radius"))
                   for r in recs]
        v = nets.VARIANTS[variant]
        has_learned = v["family"] == "ringloss" or v.get("learned", False)
        learned_text = (_mean_spread(learned)
                        if has_learned and learned[0] is not None else "-")
        lines.append(
            f"| {dataset} | {backbone} | {variant} | "
            f"{','.join(str(r['settings']['seed']) for r in recs)} | "
            f"{recs[0]['settings']['epochs']} | "
            f"{_mean_spread([100 * r['best_test_acc'] for r in recs])} | "
            f"{_mean_spread([100 * r['last_test_acc'] for r in recs])} | "
            f"{_mean_spread([r['best_epoch'] for r in recs])} | {learned_text} | "
            f"{_mean_spread([r['wall_seconds'] for r in recs])} |"
        )
    return "\n".join(lines) + "\n"


def read_results(path):
    """The records of ``results.jsonl`` (a torn last line is skipped)."""
    records = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a crash; that run reruns
    return records


def _append(path, record):
    torn = False
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with open(path, "a", encoding="utf-8") as f:
        if torn:  # a line cut by a crash: end it, so it stays one bad line
            f.write("\n")
        f.write(json.dumps(record, separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_summary(out, records):
    """``results.md`` and ``contact_sheet.png`` (and one per dataset/backbone
    when the folder holds several)."""
    from netlite import io

    head = (
        "# feature2d results\n\n"
        "Test accuracy on the margin-free logits. *best*: the maximum over "
        "the epochs (the study's selection, optimistic); *last*: the final "
        "epoch. Mean ± sample standard deviation over the seeds.\n\n"
    )
    io.atomic_write_bytes(os.path.join(out, "results.md"),
                          (head + results_table(records)).encode())
    try:
        contact_sheet(out, records, os.path.join(out, "contact_sheet.png"))
    except ImportError:
        return False
    return True


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
        _append(results, record)
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
