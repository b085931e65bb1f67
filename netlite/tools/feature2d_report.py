"""The drawings and tables of ``netlite feature2d``.

A run's petal plots and curves (:func:`plot_run`), the grid's contact
sheet, ``results.jsonl`` (read and appended), the ``results.md`` table and
:func:`write_summary`.  matplotlib (the ``plot`` extra) is imported only
when drawing, so ``import netlite`` does not pull it in.
"""

import io as _io
import json
import math
import os

import numpy as np

from netlite.tools import feature2d_nets as nets

#: Points drawn per petal panel at most (evenly strided).
MAX_POINTS = 5000


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


def plot_run(folder, record, snapshots):
    """A run's petal plots (per snapshot) and curves; {key: file name}."""
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


def append_record(path, record):
    """Append one record to ``results.jsonl``, durably."""
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
