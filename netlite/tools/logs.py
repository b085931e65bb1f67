"""Logging for the command line: Caffe's (glog's) line format, a progress bar.

:func:`configure_logging` sends the ``netlite`` logger (the solver's and
the Net's Caffe-style messages) to stdout as glog-like lines
(:class:`CaffeFormatter`).  :class:`Progress` is the tqdm bar ``netlite
train`` shows on a terminal; while it is shown, log lines are written above
it.  See docs/cli.md.
"""

import logging
import sys
import time as _time

logger = logging.getLogger("netlite")


class CaffeFormatter(logging.Formatter):
    """glog's line layout: ``I1124 14:15:00.123456 solver.py:218] message``."""

    _LETTERS = {"DEBUG": "D", "INFO": "I", "WARNING": "W", "ERROR": "E",
                "CRITICAL": "F"}

    def format(self, record):
        stamp = _time.strftime("%m%d %H:%M:%S", _time.localtime(record.created))
        micros = int((record.created % 1) * 1e6)
        letter = self._LETTERS.get(record.levelname, record.levelname[:1])
        head = f"{letter}{stamp}.{micros:06d} {record.filename}:{record.lineno}]"
        text = f"{head} {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _TqdmAwareHandler(logging.StreamHandler):
    """Write log lines above an active tqdm bar instead of through it."""

    def __init__(self, stream):
        super().__init__(stream)
        self.bar = None

    def emit(self, record):
        if self.bar is None:
            super().emit(record)
            return
        try:
            # One write call per line: an interrupt between the text and
            # its newline would glue the next line onto this one.
            self.bar.write(self.format(record) + "\n", file=self.stream, end="")
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


_handler = None


def configure_logging(level=logging.INFO, stream=None):
    """Send the ``netlite`` logger to ``stream`` (stdout) in glog's format.

    Calling it again replaces the handler it installed before (tests call
    :func:`main` many times in one process).
    """
    global _handler
    if _handler is not None:
        logger.removeHandler(_handler)
    _handler = _TqdmAwareHandler(stream if stream is not None else sys.stdout)
    _handler.setFormatter(CaffeFormatter())
    logger.addHandler(_handler)
    logger.setLevel(level)
    # The CLI owns the output; do not duplicate lines through the root logger.
    logger.propagate = False
    return _handler


def want_progress(progress):
    """Whether to show the progress bar: ``progress`` when given, else
    when stdout is a terminal and tqdm is installed."""
    if progress is not None:
        return bool(progress)
    try:
        tty = sys.stdout.isatty()
    except (AttributeError, ValueError):
        tty = False
    if not tty:
        return False
    import importlib.util

    return importlib.util.find_spec("tqdm") is not None


class Progress:
    """A tqdm bar driven by the solver's callbacks (or nothing).

    Parameters
    ----------
    enabled : bool
        Show a bar at all.
    start, total : int
        The first and the last iteration.
    """

    def __init__(self, enabled, start, total):
        self.bar = None
        if not enabled or total <= start:
            return
        from tqdm import tqdm

        self.bar = tqdm(
            total=total, initial=start, unit="iter", file=sys.stdout,
            dynamic_ncols=True, leave=True, desc="train",
        )
        if _handler is not None:
            _handler.bar = self.bar
        self.postfix = {}

    def iteration(self, smoothed_loss, lr):
        """Advance by one iteration; show the loss and the rate."""
        if self.bar is None:
            return
        self.postfix["loss"] = f"{smoothed_loss:.4g}"
        self.postfix["lr"] = f"{lr:.3g}"
        self.bar.set_postfix(self.postfix, refresh=False)
        self.bar.update(1)

    def test(self, scores):
        """Show the accuracies of a test pass."""
        if self.bar is None:
            return
        for name, value in scores.items():
            if "acc" in name.lower() and isinstance(value, float):
                self.postfix[f"test {name}"] = f"{value:.4f}"
        self.bar.set_postfix(self.postfix)

    def close(self):
        """Remove the bar; log lines go straight to the stream again."""
        if self.bar is None:
            return
        self.bar.close()
        if _handler is not None:
            _handler.bar = None
        self.bar = None
