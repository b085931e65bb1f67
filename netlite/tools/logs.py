"""Logging for the command line: Caffe's (glog's) line format, progress.

:func:`configure_logging` sends the ``netlite`` logger (the solver's and
the Net's Caffe-style messages) to stdout as glog-like lines
(:class:`CaffeFormatter`).  :class:`Progress` shows how far ``netlite
train`` is: a tqdm bar on a terminal (log lines are written above it), and
in a log file or a pipe, where a bar would be a mess of carriage returns,
a one-line progress record every :data:`PROGRESS_INTERVAL` seconds and
one at the end.  See docs/cli.md.
"""

import importlib.util
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


#: Seconds between two progress records when the output is not a terminal.
PROGRESS_INTERVAL = 10.0

#: The ways :class:`Progress` can show progress (None: not at all).
PROGRESS_MODES = ("bar", "log")


def _isatty(stream):
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no such method, or closed
        return False


def progress_mode(progress=None, stream=None):
    """How to show training progress: ``"bar"``, ``"log"`` or None.

    Parameters
    ----------
    progress : {None, True, False, "bar", "log"}
        None chooses: a tqdm bar when ``stream`` is a terminal and tqdm is
        installed, else progress records in the log.  True means ``"bar"``,
        False means no progress at all.
    stream : file, optional
        Where the output goes (default: ``sys.stdout``).

    Raises
    ------
    ValueError
        For any other ``progress``.
    """
    if progress is None:
        stream = sys.stdout if stream is None else stream
        if _isatty(stream) and importlib.util.find_spec("tqdm") is not None:
            return "bar"
        return "log"
    if progress is True:
        return "bar"
    if progress is False:
        return None
    if progress in PROGRESS_MODES:
        return progress
    raise ValueError(
        f"progress must be None, True, False, 'bar' or 'log', got {progress!r}"
    )


def format_duration(seconds):
    """``H:MM:SS`` (``"1:02:03"``); ``"?"`` when unknown or infinite."""
    if seconds is None or not seconds < float("inf") or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """Training progress driven by the solver's callbacks.

    Parameters
    ----------
    mode : {"bar", "log", None} or bool
        ``"bar"``: a tqdm bar.  ``"log"``: a progress record (iteration,
        iterations and images per second, smoothed loss, ETA) logged every
        ``interval`` seconds and when training ends.  None/False: nothing.
        True means ``"bar"`` (see :func:`progress_mode`).
    start, total : int
        The first iteration and ``max_iter``.
    images_per_iteration : int, optional
        Batch size times ``iter_size``; adds an images/s rate to records.
    interval : float
        Seconds between two records (``"log"``); 0 logs every iteration.
    clock : callable, optional
        Returns seconds (default :func:`time.monotonic`); tests pass a fake.
    """

    def __init__(self, mode, start, total, images_per_iteration=None,
                 interval=PROGRESS_INTERVAL, clock=None):
        if mode is True:
            mode = "bar"
        if mode is False:
            mode = None
        if mode is not None and mode not in PROGRESS_MODES:
            raise ValueError(f"unknown progress mode {mode!r}; expected "
                             f"{', '.join(PROGRESS_MODES)} or None")
        if interval < 0:
            raise ValueError(f"progress interval must be >= 0 s, got {interval}")
        self.mode = mode if total > start else None
        self.bar = None
        self.start, self.total, self.done = int(start), int(total), int(start)
        self.images_per_iteration = images_per_iteration
        self.interval = float(interval)
        self._clock = clock or _time.monotonic
        self._t0 = self._last_time = self._clock()
        self._last_done = self.done
        self._smoothed_loss = None
        self.postfix = {}
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=start, unit="iter", file=sys.stdout,
                dynamic_ncols=True, leave=True, desc="train",
            )
            if _handler is not None:
                _handler.bar = self.bar

    def iteration(self, smoothed_loss, lr):
        """One more iteration done; update the bar or maybe log a record."""
        self.done += 1
        self._smoothed_loss = smoothed_loss
        if self.bar is not None:
            self.postfix["loss"] = f"{smoothed_loss:.4g}"
            self.postfix["lr"] = f"{lr:.3g}"
            self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.update(1)
        elif self.mode == "log":
            now = self._clock()
            if now - self._last_time >= self.interval:
                self._record(now)

    def test(self, scores):
        """Show the accuracies of a test pass on the bar."""
        if self.bar is None:
            return
        for name, value in scores.items():
            if "acc" in name.lower() and isinstance(value, float):
                self.postfix[f"test {name}"] = f"{value:.4f}"
        self.bar.set_postfix(self.postfix)

    def _rates(self, iterations, seconds):
        if iterations <= 0 or seconds <= 0:
            return None, ""
        per_s = iterations / seconds
        text = f"{per_s:.0f} iter/s" if per_s >= 100 else f"{per_s:.3g} iter/s"
        if self.images_per_iteration:
            text += f", {per_s * self.images_per_iteration:.0f} images/s"
        return per_s, text

    def _record(self, now):
        """Log ``Progress: iteration i/N (p%), r iter/s, ..., ETA h:mm:ss``."""
        # The rate of the last interval, as Caffe's display lines: it
        # follows the speed as it changes (JIT warm-up, test passes).
        per_s, rates = self._rates(self.done - self._last_done,
                                   now - self._last_time)
        parts = [f"iteration {self.done}/{self.total} "
                 f"({100.0 * self.done / self.total:.0f}%)"]
        if rates:
            parts.append(rates)
        if self._smoothed_loss is not None:
            parts.append(f"loss {self._smoothed_loss:.4g}")
        eta = (self.total - self.done) / per_s if per_s else None
        parts.append(f"ETA {format_duration(eta)}")
        logger.info("Progress: %s", ", ".join(parts))
        self._last_time, self._last_done = now, self.done

    def close(self):
        """Remove the bar, or log the closing record; idempotent."""
        if self.bar is not None:
            self.bar.close()
            if _handler is not None:
                _handler.bar = None
            self.bar = None
        elif self.mode == "log":
            now = self._clock()
            _, rates = self._rates(self.done - self.start, now - self._t0)
            verb = "done" if self.done >= self.total else "stopped"
            logger.info(
                "Progress: %s at iteration %d/%d after %s%s", verb, self.done,
                self.total, format_duration(now - self._t0),
                f" ({rates})" if rates else "",
            )
        self.mode = None
