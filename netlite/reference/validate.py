"""Holding an implementation to the corpus (docs/reference.md §4-5).

:func:`validate` runs an implementation of each case (through a framework
adapter, :mod:`netlite.reference.frameworks`), then compares its outputs
and its gradients with the stored ones:

* figure of merit per tensor: the maximum relative error
  ``max|a - b| / max(max|b|, tiny)`` over the positions where both are
  finite (``b`` the stored tensor, ``tiny`` the smallest normal float64);
* NaN and Inf are counted; a non-finite value where the stored tensor has
  another value (or a finite one) is a mismatch;
* verdict per tensor: ``|a - b| <= atol + rtol * |b|`` element by element
  (the manifest's meaning of a tolerance) with the case's tolerance for the
  dtype the implementation ran in (float64 unless it returned float32
  outputs, or was asked to run in float32).  A case whose tolerance for
  that dtype is null (not expected to hold there) is skipped: its errors
  are reported, its verdict is "skip", neither pass nor failure;
* a case passes when every output and gradient does; when the only
  failures are gradients that each match a stored surrogate of one mode
  (``surrogate.<MODE>.grad.<name>``) within the same tolerance, the case
  "matches surrogate <MODE>" (counted apart, not a failure); an
  implementation that raises or returns the wrong outputs is an error for
  that case and the run goes on.
"""

import json
import math
import os
import traceback
from dataclasses import asdict, dataclass, field

import numpy as np

from netlite.reference import frameworks
from netlite.reference.corpus import (
    Corpus,
    CorpusError,
    load,
    parse_layers,
    select_layers,
    surrogate_mode,
    target_of,
    unknown_layers_error,
)
from netlite.reference.impl import ImplError, load_impl, netlite_impl

TINY = np.finfo(np.float64).tiny
PASS, FAIL, SURROGATE, ERROR, SKIP = "pass", "fail", "surrogate", "error", "skip"


@dataclass
class TensorResult:
    """One compared tensor: an output or the gradient of an input/param."""

    name: str  # the output name, or the input/param the gradient is of
    kind: str  # "output", "input" or "param"
    err: float  # max relative error (finite positions)
    abs_err: float
    nan: int
    inf: int
    ok: bool
    surrogate: str = None  # the mode whose surrogate it matches, if it fails
    note: str = ""

    @property
    def label(self):
        return self.name if self.kind == "output" else f"d{self.name}"


@dataclass
class CaseResult:
    """The outcome of one case."""

    id: str
    layer_type: str
    kind: str
    verdict: str  # pass, fail, surrogate or error
    dtype: str = "float64"
    tensors: list = field(default_factory=list)
    surrogate: str = None
    message: str = ""

    @property
    def forward_err(self):
        errs = [t.err for t in self.tensors if t.kind == "output"]
        return max(errs) if errs else None

    @property
    def nonfinite(self):
        return sum(t.nan + t.inf for t in self.tensors)

    def verdict_text(self):
        if self.verdict == PASS:
            return "pass"
        if self.verdict == SURROGATE:
            return f"matches surrogate {self.surrogate}"
        if self.verdict == ERROR:
            return f"ERROR: {self.message}"
        if self.verdict == SKIP:
            return f"skip: {self.message}"
        bad = [t.label for t in self.tensors if not t.ok]
        return "FAIL: " + ", ".join(bad)

    def to_json(self):
        out = asdict(self)
        out["verdict_text"] = self.verdict_text()
        return out


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _fmt(err):
    if err is None:
        return "-"
    return f"{err:.1e}" if math.isfinite(err) else str(err)


class Report:
    """The results of :func:`validate`.

    Attributes
    ----------
    rows : list of CaseResult
    framework, engine, dtype, corpus : str
    """

    def __init__(self, rows, framework, dtype="float64", engine=None, corpus=""):
        self.rows, self.framework = rows, framework
        self.dtype, self.engine, self.corpus = dtype, engine, corpus

    def counts(self):
        c = {PASS: 0, FAIL: 0, SURROGATE: 0, ERROR: 0, SKIP: 0}
        for r in self.rows:
            c[r.verdict] += 1
        return c

    @property
    def ok(self):
        """No case failed or errored (surrogate matches are not failures)."""
        c = self.counts()
        return c[FAIL] == 0 and c[ERROR] == 0

    def summary(self):
        c = self.counts()
        what = self.framework + (f" ({self.engine} engine)" if self.engine else "")
        return (
            f"{len(self.rows)} cases, {what}, {self.dtype}: {c[PASS]} passed, "
            f"{c[FAIL]} failed, {c[SURROGATE]} matched a surrogate, "
            f"{c[ERROR]} errored" + (f", {c[SKIP]} skipped" if c[SKIP] else "")
        )

    def table(self):
        """The per-layer tables and the summary line, as text."""
        lines = []
        by_layer = {}
        for r in self.rows:
            by_layer.setdefault(r.layer_type, []).append(r)
        for layer_type, rows in by_layer.items():
            grads = []
            for r in rows:
                for t in r.tensors:
                    if t.kind != "output" and t.label not in grads:
                        grads.append(t.label)
            header = ["case", "forward", *grads, "nan/inf", "verdict"]
            body = []
            for r in rows:
                errs = {t.label: t for t in r.tensors}
                cells = [r.id.split("/", 1)[1], _fmt(r.forward_err)]
                for g in grads:
                    t = errs.get(g)
                    cells.append(
                        "-" if t is None else _fmt(t.err) + ("" if t.ok else "!")
                    )
                cells += [str(r.nonfinite), r.verdict_text()]
                body.append(cells)
            widths = [
                max(len(row[i]) for row in [header, *body])
                for i in range(len(header) - 1)
            ]
            lines.append(f"== {layer_type} ({len(rows)} case{'s' * (len(rows) != 1)})")
            for row in [header, *body]:
                lines.append(
                    "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1]
                )
            lines.append("")
        lines.append(self.summary())
        return "\n".join(lines)

    __str__ = table

    def to_json(self):
        """A JSON-serialisable dict (non-finite numbers as strings)."""
        return _json_safe(
            {
                "framework": self.framework,
                "engine": self.engine,
                "dtype": self.dtype,
                "corpus": self.corpus,
                "ok": self.ok,
                "summary": self.summary(),
                "counts": self.counts(),
                "cases": [r.to_json() for r in self.rows],
            }
        )

    def dumps(self):
        return json.dumps(self.to_json(), indent=1, sort_keys=True)


def compare(actual, expected, tol):
    """``(err, abs_err, nan, inf, ok, note)`` of ``actual`` against the
    stored ``expected`` at ``tol`` (``{"rtol", "atol"}``)."""
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    if a.shape != b.shape:
        return (
            math.inf,
            math.inf,
            0,
            0,
            False,
            f"shape {list(a.shape)}, expected {list(b.shape)}",
        )
    nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
    fa, fb = np.isfinite(a), np.isfinite(b)
    same_nonfinite = (~fa & ~fb) & ((a == b) | (np.isnan(a) & np.isnan(b)))
    bad_nonfinite = int(((~fa | ~fb) & ~same_nonfinite).sum())
    both = fa & fb
    diff = float(np.max(np.abs(a[both] - b[both]), initial=0.0))
    scale = float(np.max(np.abs(b[fb]), initial=0.0))
    with np.errstate(over="ignore"):
        err = diff / max(scale, TINY)
    bound = tol["atol"] + tol["rtol"] * np.abs(b[both])
    ok = bad_nonfinite == 0 and bool(np.all(np.abs(a[both] - b[both]) <= bound))
    note = f"{bad_nonfinite} non-finite mismatch(es)" if bad_nonfinite else ""
    return float(err), diff, nan, inf, bool(ok), note


def check_case(record, arrays, run):
    """The CaseResult of ``run`` (a frameworks.RunResult) against ``arrays``."""
    result = CaseResult(record.id, record.layer_type, record.kind, PASS, run.dtype)
    tol = record.tolerance.get(run.dtype)
    if tol is None:  # the case is not expected to hold in this dtype
        result.verdict = SKIP
        result.message = f"the case holds no {run.dtype} tolerance"
        tol = {"rtol": 0.0, "atol": 0.0}
    for spec in record.specs("output"):
        err, diff, nan, inf, ok, note = compare(
            run.outputs[spec.name], arrays[spec.name], tol
        )
        result.tensors.append(
            TensorResult(spec.name, "output", err, diff, nan, inf, ok, note=note)
        )
    roles = {s.name: s.role for s in record.tensors}
    surrogates = {}
    for s in record.specs("surrogate"):
        surrogates.setdefault(surrogate_mode(s), {})[target_of(s)] = s.name

    def matches(name, by_target):  # the gradient of name is its stored surrogate
        return (
            name in by_target
            and compare(run.gradients[name], arrays[by_target[name]], tol)[4]
        )

    for g in record.specs("gradient"):
        name = target_of(g)
        err, diff, nan, inf, ok, note = compare(
            run.gradients[name], arrays[g.name], tol
        )
        t = TensorResult(name, roles[name], err, diff, nan, inf, ok, note=note)
        if not ok:
            for mode, by_target in surrogates.items():
                if matches(name, by_target):
                    t.surrogate = mode if t.surrogate is None else t.surrogate
                    t.note = (t.note + "; " if t.note else "") + (
                        f"matches surrogate {mode}"
                    )
        result.tensors.append(t)
    failing = [t for t in result.tensors if not t.ok]
    if not failing or result.verdict == SKIP:
        return result
    if all(t.kind != "output" for t in failing):
        for mode, by_target in surrogates.items():
            if all(matches(t.name, by_target) for t in failing):
                result.verdict, result.surrogate = SURROGATE, mode
                return result
    result.verdict = FAIL
    return result


def _error_text(exc):
    text = f"{type(exc).__name__}: {exc}".strip()
    return " ".join(text.split())[:500]


def _error(record, dtype, message):
    """The CaseResult of a case that could not be run or checked."""
    return CaseResult(
        record.id, record.layer_type, record.kind, ERROR, dtype, message=message
    )


def _run_case(corpus, record, adapter, impl, dtype):
    """The CaseResult of one case: its arrays read, ``impl`` run through
    ``adapter``, the results checked; any failure is an ERROR result."""
    try:
        arrays = corpus.arrays(record)
    except CorpusError as exc:
        return _error(record, dtype, str(exc))
    try:
        run = adapter.run(record, arrays, impl)
    except ImplError as exc:
        return _error(record, dtype, f"implementation: {exc}")
    except Exception as exc:  # the implementation's own error, any type
        tb = traceback.extract_tb(exc.__traceback__)
        where = (
            f" (at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno})" if tb else ""
        )
        return _error(record, dtype, _error_text(exc) + where)
    try:
        return check_case(record, arrays, run)
    except CorpusError as exc:
        return _error(record, run.dtype, str(exc))


def validate(
    corpus, impl=None, framework="torch", layers=None, dtype="float64", engine=None
):
    """Validate ``impl`` against ``corpus``; returns a :class:`Report`.

    Parameters
    ----------
    corpus : Corpus, str or path
        A loaded corpus or its directory (loaded and checked here).
    impl : callable or str
        ``impl(case) -> outputs`` (see docs/reference.md §5), or
        ``"module:function"``.  For ``framework="netlite"`` it returns
        ``(outputs, gradients)`` and defaults to netlite's own layer
        (:func:`netlite.reference.impl.netlite_impl`).
    framework : {"torch", "jax", "netlite"}
    layers : str or sequence of str, optional
        Only these layer types.
    dtype : {"float64", "float32"}
        The dtype the inputs and params are given in (the tolerance of
        that dtype applies).
    engine : {"numpy", "numba"}, optional
        The CPU engine of the ``netlite`` framework (default numpy).
    """
    if framework not in frameworks.FRAMEWORKS:
        raise ValueError(
            f"unknown framework {framework!r}; choose one of "
            f"{', '.join(frameworks.FRAMEWORKS)}"
        )
    if dtype not in ("float64", "float32"):
        raise ValueError(f"dtype must be float64 or float32, got {dtype!r}")
    if not isinstance(corpus, Corpus):
        corpus = load(corpus, layers=layers)
        records = corpus.records
    else:
        known = corpus.layer_types
        records = select_layers(
            corpus.records,
            parse_layers(layers),
            known,
            unknown_layers_error(corpus.directory, known),
        )
    if impl is None:
        if framework != "netlite":
            raise ValueError(f"framework {framework}: give an implementation (impl)")
        impl = netlite_impl
    elif isinstance(impl, str):
        impl = load_impl(impl)
    if framework == "netlite":
        engine = engine or "numpy"
    elif engine is not None:
        raise ValueError("engine applies to the netlite framework only")
    adapter = frameworks.adapter(framework, dtype=dtype, engine=engine)
    rows = [_run_case(corpus, record, adapter, impl, dtype) for record in records]
    return Report(rows, framework, dtype=dtype, engine=engine, corpus=corpus.directory)
