"""One run of ``netlite feature2d``: a (variant, seed) trained and scored.

:func:`make_specs` builds the run descriptions; :func:`run_one` writes the
run's net and solver prototxt (the data sources subsampled under
``<out>/data`` when asked), trains with the solver (Adam), scores the test
split and a fixed part of the train split after every epoch on the
margin-free logits (blob ``scores`` of the TEST net), and writes the run's
feature snapshots, its JSON record and (netlite.tools.feature2d_report) its
petal plots and curves.  run_one is a module-level function, so spawned
worker processes and Dask workers can import it.
"""

import io as _io
import json
import math
import os
import time
import warnings

import numpy as np

from netlite.tools import feature2d_nets as nets
from netlite.tools import feature2d_report as report

#: Version of the record layout (bump when a field changes meaning).
RECORD_VERSION = 1
#: Train images scored (and drawn) after each epoch, by default.
TRAIN_EVAL_DEFAULT = 10000


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
        record["files"].update(report.plot_run(folder, record, snapshots))
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
