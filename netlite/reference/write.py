"""Write the reference corpus: every case of :mod:`netlite.reference.cases`
run through netlite's float64 engine, its gradients checked by finite
differences, saved with :mod:`netlite.reference.format` (docs/reference.md
§3).

For each case (sorted by id), from the case's seed:

1. build the layer (or net) in float64 from the prototxt;
2. draw the inputs, then the parameters, with ``numpy.random.default_rng
   (seed)`` (``netlite.set_random_seed(seed)`` before the setup and before
   every forward, for layers that draw);
3. forward; draw one upstream gradient per output (a scalar loss gets a
   random scalar in [0.5, 1.5], other outputs standard normal, outputs with
   no gradient path zeros);
4. backward with ``propagate_down`` for every differentiable input and the
   parameter diffs zeroed first; collect the gradients;
5. rerun the backward of each documented surrogate from the same tensors;
6. check every gradient against central finite differences of
   ``phi = sum(upstream * output)`` (and the case's closed form where it
   has one), raising :class:`ReferenceCheckError` naming the case;
7. write the case file, then the manifest.
"""

import os
import time
import warnings

import numpy as np

from netlite.errors import NetliteError, NetliteWarning
from netlite.reference import format as fmt
from netlite.reference.cases import Case, cases

#: Outputs whose upstream is a scalar (a loss) get a value in this range.
SCALAR_UPSTREAM = (0.5, 1.5)
#: Relative agreement required between a case's closed form and the backward.
CLOSED_FORM_RTOL = 1e-9


class ReferenceCheckError(NetliteError, AssertionError):
    """A stored gradient disagrees with finite differences (or its closed
    form): the corpus would carry a wrong backward."""


# ------------------------------------------------------------------ runs
def filler_seed(seed):
    """The seed of netlite's generator while a case's layer or net is set up
    (its fillers draw the "keep" parameters): not the case seed itself, whose
    ``default_rng`` stream the inputs are drawn from -- with the same seed a
    gaussian filler repeats the inputs (weight row i = feature row i, so the
    head cases' targets sat at cos = 1)."""
    return (seed + 0x9E3779B9) % 2**32


class _LayerRun:
    """One layer built alone: bottoms ``bottom.<i>``, params ``param.<j>``,
    tops ``top.<i>``."""

    def __init__(self, case, prototxt, shapes):
        import netlite
        from netlite import io

        self.case = case
        param = io.parse_layer_param(prototxt)
        self.layer = netlite.create_layer(param, dtype=np.float64)
        self.bottom = [netlite.Blob(s, dtype=np.float64) for s in shapes]
        self.top = [netlite.Blob(dtype=np.float64) for _ in range(case.tops)]
        netlite.set_random_seed(filler_seed(case.seed))
        self.layer.setup(self.bottom, self.top)
        self.inputs = [f"bottom.{i}" for i in range(len(shapes))]
        self.param_blobs = {f"param.{j}": b for j, b in enumerate(self.layer.blobs)}
        self.learnable = {
            f"param.{j}"
            for j in range(len(self.layer.blobs))
            if self.layer.propagates_param(j)
        }

    def blob(self, name):
        if name.startswith("bottom."):
            return self.bottom[int(name.split(".")[1])]
        return self.param_blobs[name]

    def forward(self):
        import netlite

        netlite.set_random_seed(self.case.seed)
        self.layer.forward(self.bottom, self.top)
        return {f"top.{i}": t.data.copy() for i, t in enumerate(self.top)}

    def backward(self, upstream, diff_inputs):
        for b in self.layer.blobs:
            b.diff[...] = 0
        for i, t in enumerate(self.top):
            t.diff[...] = upstream[f"top.{i}"]
        down = [name in diff_inputs for name in self.inputs]
        self.layer.backward(self.top, down, self.bottom)


class _NetRun:
    """A net: inputs ``input.<blob>``, params ``param.<layer>.<j>``,
    outputs ``output.<blob>`` (the net's outputs)."""

    def __init__(self, case, prototxt, shapes):
        import netlite

        self.case = case
        netlite.set_random_seed(filler_seed(case.seed))
        self.net = netlite.Net(prototxt, netlite.TRAIN, dtype=np.float64)
        self.inputs = [f"input.{n}" for n, _ in case.inputs]
        for (n, _), shape in zip(case.inputs, shapes):
            self.net.blobs[n].reshape(shape)
        self.net.reshape()
        self.param_blobs, self.learnable = {}, set()
        for lname, blobs in self.net.params.items():
            layer = self.net.layer_by_name(lname)
            for j, b in enumerate(blobs):
                self.param_blobs[f"param.{lname}.{j}"] = b
                if layer.propagates_param(j):
                    self.learnable.add(f"param.{lname}.{j}")

    def blob(self, name):
        if name.startswith("input."):
            return self.net.blobs[name[len("input.") :]]
        return self.param_blobs[name]

    def forward(self):
        import netlite

        netlite.set_random_seed(self.case.seed)
        self.net.forward()
        return {f"output.{n}": self.net.blobs[n].data.copy() for n in self.net.outputs}

    def backward(self, upstream, diff_inputs):
        for b in self.param_blobs.values():
            b.diff[...] = 0
        self.net.backward(**{n: upstream[f"output.{n}"] for n in self.net.outputs})


def _run(case, prototxt, shapes):
    return (_NetRun if case.kind == "net" else _LayerRun)(case, prototxt, shapes)


def _load(run, arrays, names):
    for name in names:
        run.blob(name).data[...] = arrays[name]


def _upstream_name(out):
    kind, rest = out.split(".", 1)
    return f"{kind}_diff.{rest}"


# -------------------------------------------------------------- one case
def compute(case):
    """Run ``case``: ``(arrays, specs, info)`` with every tensor, its
    TensorSpec, and the FD-check statistics (unchecked)."""
    rng = np.random.default_rng(case.seed)
    gens = [g for _, g in case.inputs] if case.kind == "net" else list(case.inputs)
    inputs = [g.draw(rng) for g in gens]
    run = _run(case, case.warmup or case.prototxt, [a.shape for a in inputs])
    arrays, specs = {}, []
    for name, g, a in zip(run.inputs, gens, inputs):
        arrays[name] = a
        specs.append(fmt.TensorSpec(name, g.role, list(a.shape)))
        run.blob(name).data[...] = a
    # Parameters: drawn after the inputs, from the same generator.
    names = list(run.param_blobs)
    if callable(case.params):
        values = case.params(rng, [run.param_blobs[n].shape for n in names])
        for n, v in zip(names, values):
            run.param_blobs[n].data[...] = np.asarray(v, dtype=np.float64)
    elif case.params == "random":
        for n in names:
            b = run.param_blobs[n]
            b.data[...] = case.param_std * rng.standard_normal(b.shape)
    elif case.params != "keep":
        raise ValueError(f"case {case.id}: params must be 'random', 'keep' or callable")
    if case.warmup:
        run.forward()  # the in-place renormalisation the stored weights went through
        params = {n: run.param_blobs[n].data.copy() for n in names}
        run = _run(case, case.prototxt, [a.shape for a in inputs])
        _load(run, {**arrays, **params}, run.inputs + names)
    for n in names:
        arrays[n] = run.param_blobs[n].data.copy()
        specs.append(fmt.TensorSpec(n, "param", list(arrays[n].shape)))
    frozen = {names[j] if case.kind == "layer" else None for j in case.frozen_params}
    diff_params = [n for n in names if n in run.learnable and n not in frozen]
    diff_inputs = [n for n, g in zip(run.inputs, gens) if g.role == "input" and g.grad]

    outputs = run.forward()
    upstream = {}
    for name, out in outputs.items():
        arrays[name] = out
        specs.append(fmt.TensorSpec(name, "output", list(out.shape)))
    for i, (name, out) in enumerate(outputs.items()):
        if case.kind == "layer" and i in case.dead_tops:
            up = np.zeros_like(out)
        elif out.size == 1 and _is_loss(run, name):
            up = np.full(out.shape, rng.uniform(*SCALAR_UPSTREAM))
        else:
            up = rng.standard_normal(out.shape)
        upstream[name] = up
        arrays[_upstream_name(name)] = up
        specs.append(fmt.TensorSpec(_upstream_name(name), "upstream", list(up.shape)))
    _check_finite(case, arrays)
    grads = _gradients(run, upstream, diff_inputs + diff_params)
    for n in diff_inputs + diff_params:
        arrays[f"grad.{n}"] = grads[n]
        specs.append(
            fmt.TensorSpec(f"grad.{n}", "gradient", list(grads[n].shape), of=n)
        )
    for mode, text in case.surrogates:
        srun = _run(case, text, [a.shape for a in inputs])
        _load(srun, arrays, srun.inputs + names)
        sout = srun.forward()
        for name, out in sout.items():
            if not np.allclose(out, arrays[name], rtol=1e-12, atol=1e-14):
                raise ReferenceCheckError(
                    f"case {case.id}: surrogate {mode} changes the forward ({name})"
                )
        sgrads = _gradients(srun, upstream, diff_inputs + diff_params)
        for n in diff_inputs + diff_params:
            key = f"surrogate.{mode}.grad.{n}"
            arrays[key] = sgrads[n]
            specs.append(
                fmt.TensorSpec(
                    key, "surrogate", list(sgrads[n].shape), of=n, surrogate=mode
                )
            )
    _check_finite(case, arrays)
    return (
        arrays,
        specs,
        {
            "run": run,
            "diff": diff_inputs + diff_params,
            "names": run.inputs + names,
            "upstream": upstream,
        },
    )


def _is_loss(run, name):
    if isinstance(run, _NetRun):
        return True  # every scalar output of the heads is a loss
    return bool(run.layer.loss(int(name.split(".")[1])))


def _gradients(run, upstream, diff):
    run.forward()
    run.backward(upstream, set(diff))
    return {n: run.blob(n).diff.copy() for n in diff}


def _check_finite(case, arrays):
    for name, a in sorted(arrays.items()):
        if not np.all(np.isfinite(a)):
            raise ReferenceCheckError(f"case {case.id}: tensor {name} is not finite")


# -------------------------------------------------------------- FD check
def check(case, arrays, info):
    """Central differences of ``phi = sum(upstream * output)`` w.r.t. every
    element of every differentiable tensor, against the stored gradient.

    Element k of tensor t passes when ``|g - n| <= threshold *
    max(|g|, |n|, max|g_t|) + 1e-8 * max(1, |phi|)``; the step is
    ``fd_step * max(1, |x_k|)``.  Returns ``(checked, skipped, worst)``.
    """
    run, upstream = info["run"], info["upstream"]
    base = {n: arrays[n] for n in info["names"]}

    def phi(name, k, value):
        _load(run, base, info["names"])
        if name is not None:
            run.blob(name).data.reshape(-1)[k] = value
        out = run.forward()
        return sum(float(np.vdot(upstream[o], out[o])) for o in out)

    phi0 = abs(phi(None, 0, 0.0))
    floor = 1e-8 * max(1.0, phi0)
    skip = case.fd_skip(arrays) if case.fd_skip else {}
    expected = case.closed_form(arrays) if case.closed_form else {}
    checked = skipped = 0
    worst = 0.0
    failures = []
    for name in info["diff"]:
        g = arrays[f"grad.{name}"].reshape(-1)
        x = base[name].reshape(-1)
        mask = np.asarray(skip.get(name, np.zeros(x.shape, bool))).reshape(-1)
        if mask.any() and f"grad.{name}" not in expected and not case.fd_skip_reason:
            raise ValueError(
                f"case {case.id}: fd_skip on {name} needs a closed form or a reason"
            )
        scale = float(np.abs(g).max()) if g.size else 0.0
        for k in range(x.size):
            if mask[k]:
                skipped += 1
                continue
            h = case.fd_step * max(1.0, abs(x[k]))
            n = (phi(name, k, x[k] + h) - phi(name, k, x[k] - h)) / (2 * h)
            tol = case.fd_threshold * max(abs(g[k]), abs(n), scale) + floor
            err = abs(g[k] - n)
            worst = max(worst, err / tol)
            checked += 1
            if not err <= tol:
                failures.append((name, k, g[k], n, err / tol))
    _load(run, base, info["names"])
    for key, want in sorted(expected.items()):
        got = arrays[key]
        scale = max(float(np.abs(want).max()), 1e-300)
        if not np.allclose(
            got, want, rtol=CLOSED_FORM_RTOL, atol=CLOSED_FORM_RTOL * scale
        ):
            bad = float(np.abs(got - want).max())
            failures.append((key, "closed form", bad, scale, float("inf")))
    if failures:
        failures.sort(key=lambda f: -f[4])
        lines = [
            f"  {t} [{k}]: stored {a!r}, finite differences {b!r} "
            f"({e:.3g} x the tolerance)"
            for t, k, a, b, e in failures[:8]
        ]
        raise ReferenceCheckError(
            f"case {case.id}: {len(failures)} gradient entries disagree with finite "
            f"differences (step {case.fd_step:g}, threshold {case.fd_threshold:g}):\n"
            + "\n".join(lines)
        )
    return checked, skipped, worst


# ------------------------------------------------------------------ write
def record_for(case, specs):
    return fmt.CaseRecord(
        id=case.id,
        kind=case.kind,
        layer_type=case.layer_type,
        prototxt=case.prototxt,
        seed=int(case.seed),
        tensors=specs,
        tolerance=case.tolerance,
        docs=case.docs,
        equation=case.equation,
        edges=list(case.edges),
        description=case.description,
    )


def write(
    out,
    layers=None,
    dtype="float64",
    check=True,
    netlite_version=None,
    case_list=None,
    log=None,
):
    """Write the corpus of ``layers`` (all types with a backward by default)
    to directory ``out``; return the list of CaseRecord.

    Parameters
    ----------
    out : str
        Directory (created if missing).  Files of earlier runs that are no
        case of this one are left alone; the manifest lists this run's.
    layers : iterable of str, optional
        Layer types to write (see :func:`netlite.reference.cases`).
    dtype : str
        Only ``"float64"``: the corpus is the float64 reference.
    check : bool
        Finite-difference check every gradient first (default; False only
        to save time when the cases are known to pass).
    netlite_version : str, optional
        The version written into the manifest (default: netlite's); the
        committed test corpus pins it (docs/reference.md §3).
    case_list : list of Case, optional
        Write these cases instead of :func:`cases` (tests).
    log : callable, optional
        Called with one line per case.
    """
    if dtype != "float64":
        raise ValueError(f"the reference corpus is float64 only, got dtype={dtype!r}")
    if netlite_version is None:
        import netlite

        netlite_version = netlite.__version__
    selected = list(case_list) if case_list is not None else cases(layers)
    os.makedirs(out, exist_ok=True)
    from netlite import backend

    previous = backend.cpu_engine()
    backend.set_cpu_engine("numpy")  # the reference engine writes the reference
    try:
        records = _write_cases(out, selected, check, log)
    finally:
        backend.set_cpu_engine(previous)
    fmt.write_manifest(out, netlite_version, dtype, records)
    return records


def _write_cases(out, selected, check, log):
    records = []
    for case in selected:
        if not isinstance(case, Case):
            raise TypeError(f"not a reference Case: {case!r}")
        start = time.perf_counter()
        with warnings.catch_warnings():
            # Some cases are deliberately at configurations the layers warn
            # about (a non-monotonic margin under boundary NONE).
            warnings.simplefilter("ignore", NetliteWarning)
            arrays, specs, info = compute(case)
            stats = check_case(case, arrays, info) if check else (0, 0, 0.0)
        record = record_for(case, specs)
        fmt.write_case(out, record, arrays)
        records.append(record)
        if log is not None:
            log(
                f"{case.id}: {len(arrays)} tensors, FD checked {stats[0]} "
                f"(skipped {stats[1]}, worst {stats[2]:.2g} of tolerance) in "
                f"{time.perf_counter() - start:.2f}s"
            )
    return records


check_case = check
