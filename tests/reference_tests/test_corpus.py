"""netlite.reference.load: a corpus is read back exactly, and every kind of
bad corpus (issue 9 §4) is refused with a CorpusError naming the case."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import validate_testing as vt

from netlite.reference import CorpusError, load
from netlite.reference import format as fmt

pytest.importorskip("safetensors")


@pytest.fixture
def corpus_dir(tmp_path):
    vt.write_corpus(tmp_path, which=("InnerProduct", "SoftmaxWithLoss", "Head"))
    return tmp_path


def _edit_manifest(directory, edit):
    path = os.path.join(directory, fmt.MANIFEST)
    with open(path) as f:
        manifest = json.load(f)
    edit(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f)


def _case(manifest, case_id):
    return next(c for c in manifest["cases"] if c["id"] == case_id)


def test_load_reads_back_what_was_written(tmp_path):
    rng = np.random.default_rng(0)
    _, ip_arrays = vt.inner_product_case(rng)
    vt.write_corpus(tmp_path, which=("InnerProduct", "SoftmaxWithLoss"))
    corpus = load(tmp_path)
    assert corpus.header["format"] == fmt.FORMAT
    assert corpus.header["schema_version"] == fmt.SCHEMA_VERSION
    assert corpus.dtype == "float64"
    assert [r.id for r in corpus] == ["InnerProduct/basic", "SoftmaxWithLoss/basic"]
    arrays = corpus.arrays(corpus.records[0])
    assert set(arrays) == set(ip_arrays)
    for name, value in ip_arrays.items():
        np.testing.assert_array_equal(arrays[name], value)
    loss = corpus.arrays("SoftmaxWithLoss/basic")["top.0"]
    assert loss.shape == () and loss.dtype == np.float64  # a scalar stays a scalar


def test_layer_filter(corpus_dir):
    corpus = load(corpus_dir, layers="SoftmaxWithLoss, Head")
    assert [r.id for r in corpus] == ["SoftmaxWithLoss/basic", "Head/ip_softmax"]
    assert corpus.layer_types == ["Head", "InnerProduct", "SoftmaxWithLoss"]
    assert len(load(corpus_dir, layers=["InnerProduct"])) == 1


def test_unknown_layer_filter_lists_the_corpus_types(corpus_dir):
    with pytest.raises(CorpusError, match=r"Convolution.*has Head, InnerProduct"):
        load(corpus_dir, layers="Convolution")


def test_missing_directory_and_manifest(tmp_path):
    with pytest.raises(CorpusError, match="no such corpus directory"):
        load(tmp_path / "nope")
    with pytest.raises(CorpusError, match="cannot read the manifest"):
        load(tmp_path)


def test_missing_case_file_names_the_case(corpus_dir):
    os.remove(corpus_dir / "SoftmaxWithLoss__basic.safetensors")
    with pytest.raises(
        CorpusError, match=r"case SoftmaxWithLoss/basic: file .* missing"
    ):
        load(corpus_dir)
    # a filter that leaves the case out loads the rest
    assert len(load(corpus_dir, layers="InnerProduct")) == 1


@pytest.mark.parametrize(
    "field, value, message",
    [("schema_version", 2, "schema version 2"), ("format", "other", "format 'other'")],
)
def test_other_schema_version_or_format(corpus_dir, field, value, message):
    _edit_manifest(corpus_dir, lambda m: m.update({field: value}))
    with pytest.raises(CorpusError, match=message):
        load(corpus_dir)


def test_tensor_of_the_wrong_dtype(tmp_path):
    def to_float32(record, arrays):
        if record.layer_type == "InnerProduct":
            arrays["param.0"] = arrays["param.0"].astype(np.float32)

    vt.write_corpus(tmp_path, mutate=to_float32)
    with pytest.raises(
        CorpusError, match=r"case InnerProduct/basic: tensor 'param.0' .* float32"
    ):
        load(tmp_path)


def test_file_dtype_differs_from_the_manifest(corpus_dir):
    # The manifest (and its checksum) say float32; the file holds float64.
    def edit(m):
        spec = next(
            t for t in _case(m, "InnerProduct/basic")["tensors"] if t["name"] == "top.0"
        )
        spec["dtype"] = "float32"

    _edit_manifest(corpus_dir, edit)
    with pytest.raises(CorpusError, match=r"case InnerProduct/basic: tensor 'top.0'"):
        load(corpus_dir)


def test_file_shape_differs_from_the_manifest(corpus_dir):
    def edit(m):
        case = _case(m, "SoftmaxWithLoss/basic")
        for t in case["tensors"]:
            if t["name"] in ("bottom.0", "grad.bottom.0"):
                t["shape"] = [3, 4]

    _edit_manifest(corpus_dir, edit)
    with pytest.raises(
        CorpusError,
        match=r"case SoftmaxWithLoss/basic: tensor 'bottom.0' is float64\[4, 3\], "
        r"the manifest says float64\[3, 4\]",
    ):
        load(corpus_dir)


def test_gradient_of_the_wrong_shape(tmp_path):
    def bad(record, arrays):
        if record.layer_type == "InnerProduct":
            arrays["grad.param.1"] = np.zeros(3)

    vt.write_corpus(tmp_path, mutate=bad)
    with pytest.raises(
        CorpusError, match=r"InnerProduct/basic: gradient 'grad.param.1'"
    ):
        load(tmp_path)


def test_tampered_tensor_fails_its_checksum(corpus_dir):
    path = corpus_dir / "InnerProduct__basic.safetensors"
    payload = bytearray(path.read_bytes())
    payload[-3] ^= 0x01  # one bit of the last tensor's data
    path.write_bytes(bytes(payload))
    with pytest.raises(CorpusError, match=r"case InnerProduct/basic: .* SHA-256"):
        load(corpus_dir)
    # Without the up-front check the same error comes when the case is read.
    corpus = load(corpus_dir, verify=False)
    with pytest.raises(CorpusError, match="InnerProduct/basic"):
        corpus.arrays(corpus.records[0])


def test_not_json_manifest(corpus_dir):
    (corpus_dir / fmt.MANIFEST).write_text("{ not json")
    with pytest.raises(CorpusError, match="not JSON"):
        load(corpus_dir)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(kind="graph"), "kind 'graph'"),
        (
            lambda c: c.update(tolerance={"float32": {"rtol": 1, "atol": 1}}),
            "no tolerance for float64",
        ),
        (lambda c: c["tolerance"]["float64"].update(rtol=-1), "rtol is -1"),
        (lambda c: c.update(sha256=""), "no SHA-256"),
        (lambda c: c["tensors"][0].update(role="weights"), "role 'weights'"),
        (
            lambda c: c.update(
                tensors=[t for t in c["tensors"] if t["role"] != "upstream"]
            ),
            "output 'top.0' has no upstream",
        ),
        (lambda c: c["tensors"].append(dict(c["tensors"][0])), "listed twice"),
        (
            lambda c: next(t for t in c["tensors"] if t["role"] == "gradient").update(
                of="bottom.7"
            ),
            "belongs to 'bottom.7'",
        ),
        (lambda c: c.update(prototxt=""), "no prototxt"),
    ],
)
def test_malformed_entries_name_the_case(corpus_dir, edit, message):
    _edit_manifest(corpus_dir, lambda m: edit(_case(m, "SoftmaxWithLoss/basic")))
    with pytest.raises(CorpusError, match=f"case SoftmaxWithLoss/basic.*{message}"):
        load(corpus_dir)


def test_duplicate_case_ids(corpus_dir):
    _edit_manifest(corpus_dir, lambda m: m["cases"].append(m["cases"][0]))
    with pytest.raises(CorpusError, match="InnerProduct/basic: listed twice"):
        load(corpus_dir)


def test_import_needs_neither_torch_nor_jax():
    code = (
        "import sys, netlite.reference, netlite.reference.cli; "
        "bad = [m for m in ('torch', 'jax', 'safetensors') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "NETLITE_CPU_ENGINE": "numpy"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
