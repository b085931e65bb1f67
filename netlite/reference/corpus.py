"""Loading a reference-gradient corpus, checked (docs/reference.md §4).

:func:`load` reads ``manifest.json`` (:func:`netlite.reference.format.read_manifest`),
checks every case entry against the format's rules, and by default reads
every case file once to check its SHA-256, tensor names, shapes and dtypes
(:func:`netlite.reference.format.read_case`), so a damaged corpus is
refused before anything runs.  Every problem raises :class:`CorpusError`
with a message naming the case (or the manifest).
"""

import math
import os
from dataclasses import dataclass, field

from netlite.reference import format as fmt
from netlite.reference.format import KINDS, ROLES, CorpusError

#: The dtypes a corpus (and a tolerance entry) may name.
DTYPES = ("float64", "float32")
#: Dtypes a ``label`` tensor may be stored in besides the corpus dtype.
LABEL_DTYPES = ("float64", "float32", "int64", "int32")
#: Roles whose tensors are real-valued and stored in the corpus dtype.
FLOAT_ROLES = ("input", "param", "output", "upstream", "gradient", "surrogate")


def parse_layers(layers):
    """``"A,B"``, ``["A", "B"]`` or None -> a list of layer types or None."""
    if layers is None:
        return None
    if isinstance(layers, str):
        layers = layers.split(",")
    out = [str(t).strip() for t in layers if str(t).strip()]
    return out or None


def select_layers(items, wanted, known, error):
    """The ``items`` (cases or records) whose ``layer_type`` is in ``wanted``
    (all when None); raises ``error(unknown)`` when a wanted type is not
    in ``known``."""
    if wanted is None:
        return list(items)
    unknown = [t for t in wanted if t not in known]
    if unknown:
        raise error(unknown)
    return [r for r in items if r.layer_type in wanted]


def unknown_layers_error(directory, known):
    """The ``error`` of :func:`select_layers` for a corpus in ``directory``
    with the layer types ``known``."""

    def error(unknown):
        return CorpusError(
            f"{directory}: no cases for layer type(s) {', '.join(unknown)}; "
            f"the corpus has {', '.join(known) or 'no cases'}"
        )

    return error


def upstream_of(record, output_name):
    """The upstream spec of output ``output_name`` (``of``, else by name:
    ``top.<i>`` -> ``top_diff.<i>``, ``output.<b>`` -> ``output_diff.<b>``)."""
    ups = record.specs("upstream")
    for spec in ups:
        if spec.of == output_name:
            return spec
    prefix, _, rest = output_name.partition(".")
    wanted = f"{prefix}_diff.{rest}"
    for spec in ups:
        if spec.name == wanted and spec.of in (None, "", output_name):
            return spec
    return None


def target_of(spec):
    """The input or param name a gradient or surrogate spec belongs to."""
    of = spec.of
    if of is None:
        name = spec.name
        if spec.role == "surrogate":  # surrogate.<mode>.grad.<name>
            name = name.split(".", 2)[2] if name.count(".") >= 2 else name
        of = name
    return of[len("grad.") :] if of.startswith("grad.") else of


def surrogate_mode(spec):
    """The mode name of a surrogate spec (``surrogate``, else its name)."""
    if spec.surrogate:
        return spec.surrogate
    parts = spec.name.split(".")
    return parts[1] if len(parts) > 1 else spec.name


@dataclass
class Corpus:
    """A loaded corpus.

    Attributes
    ----------
    directory : str
    header : dict
        The manifest without its cases (format, schema_version,
        netlite_version, dtype).
    records : list of CaseRecord
        The cases selected by ``layers`` (all when None), manifest order.
    all_records : list of CaseRecord
        Every case of the manifest.
    """

    directory: str
    header: dict
    records: list
    all_records: list = field(default_factory=list)

    def __len__(self):
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    @property
    def dtype(self):
        return self.header.get("dtype", "float64")

    @property
    def layer_types(self):
        """The layer types of all cases, sorted."""
        return sorted({r.layer_type for r in self.all_records})

    def record(self, case_id):
        """The record of ``case_id`` (CorpusError when absent)."""
        for r in self.all_records:
            if r.id == case_id:
                return r
        raise CorpusError(f"{self.directory}: no case {case_id!r}")

    def arrays(self, record):
        """The checked arrays (name -> ndarray) of ``record``."""
        if isinstance(record, str):
            record = self.record(record)
        return fmt.read_case(self.directory, record)


def _check_number(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CorpusError(f"{what} is {value!r}, not a number")
    if not (math.isfinite(value) and value >= 0):
        raise CorpusError(f"{what} is {value!r}, not a finite number >= 0")


def check_record(record, dtype="float64"):
    """Check one manifest entry (without its file).  CorpusError naming the
    case when it breaks a rule of the format."""
    where = f"case {record.id}"
    fmt.case_file_name(record.id)  # the id's syntax
    if record.kind not in KINDS:
        raise CorpusError(f"{where}: kind {record.kind!r}, expected one of {KINDS}")
    if not record.layer_type:
        raise CorpusError(f"{where}: no layer type")
    if not isinstance(record.prototxt, str) or not record.prototxt.strip():
        raise CorpusError(f"{where}: no prototxt")
    if record.file != fmt.case_file_name(record.id):
        raise CorpusError(
            f"{where}: file {record.file!r}, expected {fmt.case_file_name(record.id)!r}"
        )
    if not isinstance(record.sha256, str) or len(record.sha256) != 64:
        raise CorpusError(f"{where}: no SHA-256 checksum in the manifest")
    names = [t.name for t in record.tensors]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CorpusError(f"{where}: tensors {dup} are listed twice")
    for t in record.tensors:
        if t.role not in ROLES:
            raise CorpusError(
                f"{where}: tensor {t.name!r} has role {t.role!r}; roles: {ROLES}"
            )
        if not isinstance(t.shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in t.shape
        ):
            raise CorpusError(f"{where}: tensor {t.name!r} has shape {t.shape!r}")
        allowed = LABEL_DTYPES if t.role == "label" else (dtype,)
        if t.dtype not in allowed:
            raise CorpusError(
                f"{where}: tensor {t.name!r} ({t.role}) is {t.dtype}, expected "
                f"{' or '.join(allowed)}"
            )
    by_name = {t.name: t for t in record.tensors}
    outputs = record.specs("output")
    if not outputs:
        raise CorpusError(f"{where}: no output tensors")
    for out in outputs:
        up = upstream_of(record, out.name)
        if up is None:
            raise CorpusError(f"{where}: output {out.name!r} has no upstream gradient")
        if up.shape != out.shape:
            raise CorpusError(
                f"{where}: upstream {up.name!r} has shape {up.shape}, output "
                f"{out.name!r} has {out.shape}"
            )
    for g in record.specs("gradient") + record.specs("surrogate"):
        target = by_name.get(target_of(g))
        if target is None or target.role not in ("input", "param"):
            raise CorpusError(
                f"{where}: {g.role} {g.name!r} belongs to {target_of(g)!r}, which "
                "is not an input or param of the case"
            )
        if g.shape != target.shape:
            raise CorpusError(
                f"{where}: {g.role} {g.name!r} has shape {g.shape}, "
                f"{target.name!r} has {target.shape}"
            )
    tol = record.tolerance
    if not isinstance(tol, dict) or dtype not in tol:
        raise CorpusError(f"{where}: no tolerance for {dtype}")
    for key, entry in tol.items():
        if entry is None and key != dtype:
            continue  # null: the case is not expected to hold in that dtype
        if not isinstance(entry, dict) or not {"rtol", "atol"} <= set(entry):
            raise CorpusError(f"{where}: tolerance[{key!r}] needs rtol and atol")
        _check_number(entry["rtol"], f"{where}: tolerance[{key!r}].rtol")
        _check_number(entry["atol"], f"{where}: tolerance[{key!r}].atol")


def load(directory, layers=None, verify=True):
    """Load and check the corpus in ``directory``.

    Parameters
    ----------
    directory : str or path
    layers : str or sequence of str, optional
        Keep only these layer types (``"A,B"`` or a list).  A type that no
        case has is an error (the message lists the corpus's types).
    verify : bool
        Read every selected case file now and check its checksum, tensor
        names, shapes and dtypes (default).  With False only the files'
        presence is checked, and :meth:`Corpus.arrays` checks each file
        when it is read.

    Raises
    ------
    CorpusError
        Naming the manifest or the case: a missing directory, manifest or
        case file, another format or schema version, a malformed entry, a
        tensor of the wrong dtype or shape, a file whose SHA-256 is not the
        manifest's, an unknown layer type in ``layers``.
    """
    directory = os.fspath(directory)
    header, records = fmt.read_manifest(directory)
    dtype = header.get("dtype", "float64")
    if dtype not in DTYPES:
        raise CorpusError(
            f"{os.path.join(directory, fmt.MANIFEST)}: dtype {dtype!r}, expected "
            f"one of {DTYPES}"
        )
    seen = set()
    for r in records:
        if r.id in seen:
            raise CorpusError(f"case {r.id}: listed twice in the manifest")
        seen.add(r.id)
        check_record(r, dtype)
    known = sorted({r.layer_type for r in records})
    selected = select_layers(
        records, parse_layers(layers), known, unknown_layers_error(directory, known)
    )
    for r in selected:
        path = os.path.join(directory, r.file)
        if not os.path.isfile(path):
            raise CorpusError(f"case {r.id}: file {r.file} is missing from {directory}")
    if verify:
        for r in selected:
            fmt.read_case(directory, r)
    return Corpus(directory, header, selected, list(records))
