"""Reference gradients: a versioned float64 case corpus for every layer
(``netlite reference``) and a harness that holds another framework's
implementation to it (``netlite validate``).  See docs/reference.md.

Reading or writing a corpus needs the ``safetensors`` package (the
``reference`` extra); ``import netlite`` does not import this package.
"""

from netlite.reference.cases import cases
from netlite.reference.corpus import Corpus, load
from netlite.reference.format import (
    FORMAT,
    SCHEMA_VERSION,
    CaseRecord,
    CorpusError,
    TensorSpec,
    read_case,
    read_manifest,
)
from netlite.reference.validate import Report, validate
from netlite.reference.write import write

__all__ = [
    "FORMAT", "SCHEMA_VERSION", "CaseRecord", "CorpusError", "TensorSpec",
    "read_case", "read_manifest",
    "Corpus", "load", "Report", "validate",
    "cases", "write",
]
