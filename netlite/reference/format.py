"""The on-disk format of a reference-gradient corpus (docs/reference.md).

A corpus is a directory with one ``manifest.json`` and one safetensors file
per case.  The manifest names every case, its layer (or net) prototxt, its
seed, every tensor with its role, the tolerances the case holds at, the
docs page that defines it, and the SHA-256 of its file; the safetensors file
holds the float64 tensors.  This module reads and writes both, and checks
what it reads: any mismatch raises :class:`CorpusError` naming the case.

Tensor names and roles
----------------------
``bottom.<i>`` / ``input.<blob>``
    ``input`` (differentiable) or ``label`` (integer-valued, no gradient).
``param.<i>`` / ``param.<layer>.<i>``
    ``param``: a learnable blob, as the forward reads it.
``top.<i>`` / ``output.<blob>``
    ``output``: the forward's result.
``top_diff.<i>`` / ``output_diff.<blob>``
    ``upstream``: the gradient arriving at that output (seeded, not ones).
``grad.<name>``
    ``gradient``: d(sum upstream * output)/d<name>, the reference gradient.
``surrogate.<mode>.grad.<name>``
    ``surrogate``: a documented non-gradient backward (``mode`` names it).

``safetensors`` is imported only here and only when a corpus is read or
written: ``import netlite`` does not need it (the ``reference`` extra).
"""

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field

import numpy as np

from netlite.errors import NetliteError
from netlite.io import atomic_write_bytes

FORMAT = "netlite-reference"
#: Bumped whenever the manifest layout changes; a reader refuses others.
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ROLES = ("input", "label", "param", "output", "upstream", "gradient", "surrogate")
KINDS = ("layer", "net")
_ID = re.compile(r"^[A-Za-z0-9_.\-]+/[A-Za-z0-9_.\-]+$")


class CorpusError(NetliteError, ValueError):
    """A corpus directory, manifest or case file is missing, of another
    format or schema version, or does not match its manifest."""


@dataclass
class TensorSpec:
    """One tensor of a case: its name, role, shape and dtype.

    ``of`` names the tensor a gradient or surrogate belongs to;
    ``surrogate`` names the documented backward a surrogate reproduces.
    """

    name: str
    role: str
    shape: list
    dtype: str = "float64"
    of: str = None
    surrogate: str = None


@dataclass
class CaseRecord:
    """A case's manifest entry (everything but the tensors' values)."""

    id: str
    kind: str
    layer_type: str
    prototxt: str
    seed: int
    tensors: list
    tolerance: dict
    docs: str
    equation: str = ""
    edges: list = field(default_factory=list)
    description: str = ""
    file: str = ""
    sha256: str = ""

    def to_json(self):
        return {k: v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, entry, where):
        try:
            tensors = [TensorSpec(**t) for t in entry["tensors"]]
            return cls(**{**entry, "tensors": tensors})
        except (KeyError, TypeError) as exc:
            raise CorpusError(f"{where}: malformed case entry ({exc})") from None

    def specs(self, role):
        """The tensor specs of one role, in manifest order."""
        return [t for t in self.tensors if t.role == role]


def case_file_name(case_id):
    """The file of a case: ``Type/name`` -> ``Type__name.safetensors``."""
    if not _ID.match(case_id):
        raise CorpusError(
            f"case id {case_id!r} is not '<Type>/<name>' of [A-Za-z0-9_.-]"
        )
    return case_id.replace("/", "__") + ".safetensors"


def _safetensors():
    try:
        from safetensors import numpy as st
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading or writing a reference corpus needs the safetensors package: "
            "pip install 'netlite-caffe[reference]'"
        ) from None
    return st


def write_case(directory, record, arrays):
    """Write ``arrays`` (name -> ndarray) as ``record``'s safetensors file.

    Fills ``record.file`` and ``record.sha256``.  Every array must have a
    spec in ``record.tensors`` and vice versa.  Byte-deterministic: the same
    arrays give the same file.
    """
    names = {t.name for t in record.tensors}
    if names != set(arrays):
        raise CorpusError(
            f"case {record.id}: tensors {sorted(set(arrays) ^ names)} are in only one "
            "of the manifest and the arrays"
        )
    for spec in record.tensors:
        a = arrays[spec.name]
        spec.shape, spec.dtype = [int(d) for d in a.shape], str(a.dtype)
    # ascontiguousarray makes a 0-d array 1-d: reshape keeps a scalar a scalar.
    payload = _safetensors().save(
        {
            k: np.ascontiguousarray(v).reshape(np.shape(v))
            for k, v in sorted(arrays.items())
        }
    )
    record.file = case_file_name(record.id)
    record.sha256 = hashlib.sha256(payload).hexdigest()
    atomic_write_bytes(os.path.join(directory, record.file), payload)
    return record


def read_case(directory, record):
    """The arrays of ``record``, checked against its checksum, names,
    shapes and dtypes (``CorpusError`` naming the case otherwise)."""
    path = os.path.join(directory, record.file)
    try:
        with open(path, "rb") as f:
            payload = f.read()
    except OSError as exc:
        raise CorpusError(
            f"case {record.id}: cannot read {path}: {exc.strerror}"
        ) from None
    digest = hashlib.sha256(payload).hexdigest()
    if digest != record.sha256:
        raise CorpusError(
            f"case {record.id}: {record.file} has SHA-256 {digest[:16]}..., the "
            f"manifest says {record.sha256[:16]}...: the file was changed or damaged"
        )
    try:
        arrays = _safetensors().load(payload)
    except Exception as exc:  # safetensors raises its own error types
        raise CorpusError(
            f"case {record.id}: {record.file} is not safetensors: {exc}"
        ) from None
    for spec in record.tensors:
        a = arrays.get(spec.name)
        if a is None:
            raise CorpusError(
                f"case {record.id}: tensor {spec.name!r} missing from {record.file}"
            )
        if list(a.shape) != list(spec.shape) or str(a.dtype) != spec.dtype:
            raise CorpusError(
                f"case {record.id}: tensor {spec.name!r} is {a.dtype}{list(a.shape)}, "
                f"the manifest says {spec.dtype}{list(spec.shape)}"
            )
    extra = sorted(set(arrays) - {t.name for t in record.tensors})
    if extra:
        raise CorpusError(
            f"case {record.id}: {record.file} has unlisted tensors {extra}"
        )
    return arrays


def write_manifest(directory, netlite_version, dtype, records):
    """Write ``manifest.json`` (sorted keys, fixed layout: deterministic)."""
    manifest = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "netlite_version": netlite_version,
        "dtype": dtype,
        "cases": [r.to_json() for r in records],
    }
    text = json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write_bytes(os.path.join(directory, MANIFEST), text.encode("utf-8"))
    return manifest


def read_manifest(directory):
    """``(header, records)`` of a corpus: ``header`` without ``cases``.

    Raises CorpusError for a missing directory or manifest, another format
    or schema version, or a malformed entry.
    """
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise CorpusError(f"{directory}: no such corpus directory")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read the manifest: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{path}: not JSON: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise CorpusError(
            f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}"
        )
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise CorpusError(
            f"{path}: schema version {manifest.get('schema_version')!r}; this netlite "
            f"reads version {SCHEMA_VERSION}"
        )
    records = [
        CaseRecord.from_json(e, f"{path} case #{i}")
        for i, e in enumerate(manifest.get("cases", []))
    ]
    header = {k: v for k, v in manifest.items() if k != "cases"}
    return header, records
