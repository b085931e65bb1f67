"""Training curves: record what the solver reports and draw it as PNG.

:class:`TrainingHistory` collects the training loss of every iteration and
the test-net outputs of every test pass (it is fed by the solver's
callbacks, see :func:`netlite.tools.commands.train`).  :func:`plot_history`
draws two figures, the training loss and the test accuracy, and writes them as PNG.

Matplotlib is optional (``pip install 'netlite-caffe[plot]'``).  It is
imported only when a plot is drawn, and through its object-oriented API
with the Agg canvas: no GUI backend is selected and pyplot's global state
is left alone, so plotting works on headless machines and inside programs
that use matplotlib themselves.
"""

import io as _io
import math
import os

import numpy as np

from netlite import io


class TrainingHistory:
    """Training loss per iteration and test outputs per test pass.

    Attributes
    ----------
    train_iters, train_loss : list
        Iteration and (unsmoothed) training loss of every recorded
        iteration.
    tests : dict of int -> dict of str -> list of (int, float)
        ``tests[test_net_id][output_name]`` lists ``(iteration, mean value)``
        for each test pass (scalar outputs only).
    test_iters : dict of int -> list of int
        ``test_iters[test_net_id]``: the iteration of every test pass that
        ran, whatever its outputs.
    """

    def __init__(self):
        self.train_iters = []
        self.train_loss = []
        self.tests = {}
        self.test_iters = {}

    def add_train(self, iteration, loss):
        """Record the training loss of ``iteration``."""
        self.train_iters.append(int(iteration))
        self.train_loss.append(float(loss))

    def add_test(self, iteration, outputs, test_net_id=0):
        """Record one test pass: ``outputs`` maps output names to means.

        Outputs with more than one element (a per-class accuracy, say) are
        not curves; they are left out.
        """
        self.test_iters.setdefault(int(test_net_id), []).append(int(iteration))
        net = self.tests.setdefault(int(test_net_id), {})
        for name, value in outputs.items():
            value = np.asarray(value)
            if value.size != 1:
                continue
            net.setdefault(name, []).append((int(iteration), float(value)))

    def final_test(self, name="accuracy", test_net_id=0):
        """The last recorded value of a test output, or None."""
        series = self.tests.get(test_net_id, {}).get(name)
        return series[-1][1] if series else None

    def last_test(self, test_net_id=0):
        """``(iteration, {output name: value})`` of the last test pass of
        ``test_net_id``, or None when none ran (scalar outputs only)."""
        iters = self.test_iters.get(test_net_id)
        if not iters:
            return None
        iteration = iters[-1]
        outputs = {
            name: series[-1][1]
            for name, series in self.tests.get(test_net_id, {}).items()
            if series and series[-1][0] == iteration
        }
        return iteration, outputs

    def accuracy_outputs(self):
        """``(test_net_id, name)`` of every output whose name says accuracy."""
        return [
            (net_id, name)
            for net_id, outputs in sorted(self.tests.items())
            for name in outputs
            if "acc" in name.lower()
        ]


def _import_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "plotting needs matplotlib: pip install matplotlib "
            "(or pip install 'netlite-caffe[plot]')"
        ) from exc
    return Figure, FigureCanvasAgg


def moving_average(values, window):
    """Trailing mean over the last ``window`` values (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_history(history, out_dir, prefix="", title=None):
    """Write the training-loss and test-accuracy curves as PNG files.

    Parameters
    ----------
    history : TrainingHistory
    out_dir : str or path
        Created when missing.
    prefix : str
        Put in front of the file names (``"<prefix>loss.png"``).
    title : str, optional
        Figure title (for example the net's name).

    Returns
    -------
    list of str
        The paths written: the loss plot, then the accuracy plot when the
        history holds any test output named like "accuracy".

    Raises
    ------
    ImportError
        When matplotlib is not installed.
    """
    Figure, FigureCanvasAgg = _import_matplotlib()
    os.makedirs(out_dir, exist_ok=True)
    paths = []

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if history.train_iters:
        window = max(1, len(history.train_loss) // 50)
        ax.plot(history.train_iters, history.train_loss, color="tab:blue",
                alpha=0.3, linewidth=0.8, label="train loss")
        if window > 1:
            ax.plot(history.train_iters,
                    moving_average(history.train_loss, window),
                    color="tab:blue", linewidth=1.5,
                    label=f"train loss ({window}-iteration mean)")
    for net_id, outputs in sorted(history.tests.items()):
        for name, series in outputs.items():
            if "loss" not in name.lower():
                continue
            its, vals = zip(*series)
            ax.plot(its, vals, marker="o", color="tab:red",
                    label=f"test net #{net_id} {name}")
    positive = [v for v in history.train_loss if v > 0 and math.isfinite(v)]
    if positive and max(positive) / min(positive) > 30:
        # Losses fall over orders of magnitude; a log axis keeps the tail
        # of the curve readable.
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(f"{title}: loss" if title else "loss")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, f"{prefix}loss.png")
    _save(fig, path)
    paths.append(path)

    accuracy = history.accuracy_outputs()
    if accuracy:
        # The first test usually runs on the untrained net (chance level);
        # a second panel leaves it out, so that the differences that
        # matter late in training (0.98 vs 0.99) are visible.
        zoom = any(len(history.tests[n][name]) >= 3 for n, name in accuracy)
        fig = Figure(figsize=(11 if zoom else 7, 4.5), dpi=100)
        FigureCanvasAgg(fig)
        axes = [fig.add_subplot(1, 2 if zoom else 1, i + 1)
                for i in range(2 if zoom else 1)]
        for panel, ax in enumerate(axes):
            for net_id, name in accuracy:
                series = history.tests[net_id][name]
                if panel == 1:
                    series = series[1:]
                its, vals = zip(*series)
                ax.plot(its, vals, marker="o", label=f"test net #{net_id} {name}")
                ax.annotate(f"{vals[-1]:.4f}", (its[-1], vals[-1]),
                            textcoords="offset points", xytext=(-10, -15))
            ax.set_xlabel("iteration")
            ax.set_ylabel("accuracy")
            ax.grid(True, alpha=0.3)
            ax.legend(loc="lower right")
        name = f"{title}: test accuracy" if title else "test accuracy"
        axes[0].set_title(name)
        if zoom:
            axes[1].set_title("without the first test")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{prefix}accuracy.png")
        _save(fig, path)
        paths.append(path)
    return paths


def _save(fig, path):
    """Write ``fig`` as PNG through :func:`netlite.io.atomic_write_bytes`:
    never a half-written plot after Ctrl-C, and the same permissions as
    every other output file."""
    buf = _io.BytesIO()
    fig.savefig(buf, format="png")
    io.atomic_write_bytes(path, buf.getvalue())
