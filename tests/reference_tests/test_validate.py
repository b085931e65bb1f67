"""netlite.reference.validate: the torch, jax and netlite adapters on
hand-computed corpora - correct implementations pass, wrong ones fail on
the right tensor, surrogates are recognised, bad implementations are
reported per case and the run goes on."""

import functools
import json

import numpy as np
import pytest
import validate_testing as vt

from netlite.reference import CorpusError, load, validate
from netlite.reference.validate import compare

pytest.importorskip("safetensors")
ALL = ("InnerProduct", "SoftmaxWithLoss", "Head")


@pytest.fixture
def corpus(tmp_path):
    vt.write_corpus(tmp_path, which=ALL)
    return load(tmp_path)


def _row(report, case_id):
    return next(r for r in report.rows if r.id == case_id)


def _tensor(row, label):
    return next(t for t in row.tensors if t.label == label)


# ------------------------------------------------------------ comparison
def test_compare_relative_error_and_tolerance():
    tol = {"rtol": 1e-6, "atol": 0.0}
    err, diff, nan, inf, ok, _ = compare([1.0, 2.0 + 1e-7], [1.0, 2.0], tol)
    assert err == pytest.approx(0.5e-7) and diff == pytest.approx(1e-7) and ok
    assert not compare([1.0, 2.1], [1.0, 2.0], tol)[4]
    # a zero reference: only atol can pass a non-zero answer
    assert compare([0.0], [0.0], tol)[4]
    assert not compare([1e-30], [0.0], tol)[4]
    assert compare([1e-30], [0.0], {"rtol": 0.0, "atol": 1e-20})[4]


def test_compare_counts_and_matches_non_finite_values():
    tol = {"rtol": 1e-12, "atol": 0.0}
    _, _, nan, inf, ok, note = compare([np.nan, np.inf, 1.0], [0.0, 0.0, 1.0], tol)
    assert (nan, inf, ok) == (1, 1, False) and "2 non-finite" in note
    # the same non-finite values where the reference has them are no mismatch
    assert compare([np.nan, -np.inf, 1.0], [np.nan, -np.inf, 1.0], tol)[4]
    assert not compare([np.inf], [-np.inf], tol)[4]
    assert not compare([np.zeros(2)], [np.zeros(3)], tol)[4]  # shape


# ----------------------------------------------------------------- torch
@pytest.mark.torch
def test_torch_correct_impl_passes(corpus):
    pytest.importorskip("torch")
    report = validate(corpus, vt.torch_impl, "torch")
    assert report.ok, report.table()
    assert report.counts() == {
        "pass": 3,
        "fail": 0,
        "surrogate": 0,
        "error": 0,
        "skip": 0,
    }
    worst = max(t.err for r in report.rows for t in r.tensors)
    print(f"torch vs hand-computed corpus: worst relative error {worst:.2e}")
    assert worst < 1e-13
    ip = _row(report, "InnerProduct/basic")
    assert [t.label for t in ip.tensors] == [
        "top.0",
        "dbottom.0",
        "dparam.0",
        "dparam.1",
    ]
    assert ip.dtype == "float64"


@pytest.mark.torch
@pytest.mark.parametrize(
    "kwargs, case_id, bad",
    [
        ({"scale": 2.0}, "InnerProduct/basic", ["dparam.0"]),
        ({"scale": 1.0 + 1e-9}, "InnerProduct/basic", ["dparam.0"]),
        ({"flip": True}, "InnerProduct/basic", ["dbottom.0"]),
        ({"flip": True}, "SoftmaxWithLoss/basic", ["dbottom.0"]),
    ],
)
def test_torch_wrong_gradient_fails_on_that_tensor(corpus, kwargs, case_id, bad):
    pytest.importorskip("torch")
    report = validate(corpus, functools.partial(vt.torch_impl, **kwargs), "torch")
    assert not report.ok
    row = _row(report, case_id)
    assert row.verdict == "fail"
    assert [t.label for t in row.tensors if not t.ok] == bad
    assert row.verdict_text() == "FAIL: " + ", ".join(bad)
    assert _row(report, "Head/ip_softmax").verdict == "pass"


@pytest.mark.torch
def test_torch_wrong_forward_fails(corpus):
    pytest.importorskip("torch")

    def impl(case):
        out = vt.torch_impl(case)
        if case.layer_type == "SoftmaxWithLoss":
            return [out[0] * 1.001]
        return out

    row = _row(validate(corpus, impl, "torch"), "SoftmaxWithLoss/basic")
    assert row.verdict == "fail" and not _tensor(row, "top.0").ok
    assert row.forward_err == pytest.approx(1e-3, rel=1e-6)


@pytest.mark.torch
def test_raising_impl_is_reported_per_case_and_the_run_goes_on(corpus):
    pytest.importorskip("torch")

    def impl(case):
        if case.layer_type == "SoftmaxWithLoss":
            raise RuntimeError("no softmax here")
        return vt.torch_impl(case)

    report = validate(corpus, impl, "torch")
    row = _row(report, "SoftmaxWithLoss/basic")
    assert row.verdict == "error"
    assert "RuntimeError: no softmax here" in row.message
    assert "test_validate.py" in row.message  # where it was raised
    assert report.counts() == {
        "pass": 2,
        "fail": 0,
        "surrogate": 0,
        "error": 1,
        "skip": 0,
    }
    assert not report.ok
    assert "ERROR: RuntimeError: no softmax here" in report.table()


@pytest.mark.torch
@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda out: {"top.0": out["top.0"].T},
            "output 'top.0' has shape [2, 3], expected [3, 2]",
        ),
        (
            lambda out: [out["top.0"], out["top.0"]],
            "returned 2 outputs, the case has 1",
        ),
        (lambda out: {"top.1": out["top.0"]}, "missing 'top.0'"),
        (lambda out: {"top.0": out["top.0"].detach().numpy()}, "not a tensor"),
        (lambda out: None, "returned NoneType"),
    ],
)
def test_wrong_outputs_are_reported_per_case(corpus, change, message):
    pytest.importorskip("torch")

    def impl(case):
        out = vt.torch_impl(case)
        return change(out) if case.layer_type == "InnerProduct" else out

    report = validate(corpus, impl, "torch")
    row = _row(report, "InnerProduct/basic")
    assert row.verdict == "error" and message in row.message
    assert _row(report, "Head/ip_softmax").verdict == "pass"


@pytest.mark.torch
def test_surrogate_backward_is_recognised(corpus):
    pytest.importorskip("torch")
    report = validate(corpus, functools.partial(vt.torch_impl, half=True), "torch")
    row = _row(report, "InnerProduct/basic")
    assert row.verdict == "surrogate" and row.surrogate == "HALF"
    assert row.verdict_text() == "matches surrogate HALF"
    assert _tensor(row, "dbottom.0").surrogate == "HALF"
    assert report.counts()["surrogate"] == 1 and report.ok
    assert "1 matched a surrogate" in report.summary()


@pytest.mark.torch
def test_a_gradient_that_is_neither_true_nor_surrogate_fails(corpus):
    pytest.importorskip("torch")
    import torch

    def impl(case):
        if case.layer_type != "InnerProduct":
            return vt.torch_impl(case)
        x = case.inputs["bottom.0"]
        x = 0.3 * x + 0.7 * x.detach()
        w, b = case.params["param.0"], case.params["param.1"]
        return torch.addmm(b, x, w.T)

    row = _row(validate(corpus, impl, "torch"), "InnerProduct/basic")
    assert row.verdict == "fail" and row.surrogate is None


@pytest.mark.torch
def test_surrogate_needs_the_forward_to_pass(corpus):
    pytest.importorskip("torch")

    def impl(case):
        out = vt.torch_impl(case, half=True)
        return {"top.0": out["top.0"] + 1} if case.layer_type == "InnerProduct" else out

    assert _row(validate(corpus, impl, "torch"), "InnerProduct/basic").verdict == "fail"


@pytest.mark.torch
def test_nan_output_is_counted_and_fails(corpus):
    pytest.importorskip("torch")

    def impl(case):
        out = vt.torch_impl(case)
        if case.layer_type == "SoftmaxWithLoss":
            return [out[0] * float("nan")]
        return out

    report = validate(corpus, impl, "torch")
    row = _row(report, "SoftmaxWithLoss/basic")
    assert row.verdict == "fail" and _tensor(row, "top.0").nan == 1
    assert row.nonfinite >= 1
    json.dumps(report.to_json())  # still serialisable


@pytest.mark.torch
def test_float32_run_is_held_to_the_float32_tolerance(corpus):
    torch = pytest.importorskip("torch")
    report = validate(corpus, vt.torch_impl, "torch", dtype="float32")
    assert report.ok, report.table()
    assert {r.dtype for r in report.rows} == {"float32"}

    # an impl that drops to float32 by itself is judged in float32 too
    def impl(case):
        out = vt.torch_impl(case)
        if case.layer_type == "InnerProduct":
            return {"top.0": out["top.0"].to(torch.float32)}
        return out

    row = _row(validate(corpus, impl, "torch"), "InnerProduct/basic")
    assert row.dtype == "float32" and row.verdict == "pass"


@pytest.mark.torch
def test_case_object(corpus):
    pytest.importorskip("torch")
    import torch

    seen = {}

    def impl(case):
        seen[case.id] = case
        return vt.torch_impl(case)

    validate(corpus, impl, "torch")
    ip, loss = seen["InnerProduct/basic"], seen["SoftmaxWithLoss/basic"]
    assert ip.kind == "layer" and ip.layer_type == "InnerProduct"
    assert ip.params_text["inner_product_param"]["num_output"] == 2
    assert ip.output_names == ["top.0"] and list(ip.params) == ["param.0", "param.1"]
    assert ip.inputs["bottom.0"].dtype == torch.float64
    assert ip.inputs["bottom.0"].requires_grad and ip.params["param.0"].requires_grad
    assert loss.labels == ["bottom.1"]
    assert loss.inputs["bottom.1"].dtype == torch.int64
    assert not loss.inputs["bottom.1"].requires_grad
    net = seen["Head/ip_softmax"]
    assert net.kind == "net" and [ly["name"] for ly in net.params_text["layer"]] == [
        "data",
        "ip",
        "loss",
    ]


@pytest.mark.torch
def test_layer_filter_and_report_json(corpus):
    pytest.importorskip("torch")
    report = validate(corpus, vt.torch_impl, "torch", layers="InnerProduct")
    assert [r.id for r in report.rows] == ["InnerProduct/basic"]
    data = json.loads(json.dumps(report.to_json()))
    assert data["ok"] is True and data["framework"] == "torch"
    assert data["counts"]["pass"] == 1
    case = data["cases"][0]
    assert case["id"] == "InnerProduct/basic" and case["verdict"] == "pass"
    assert {t["name"] for t in case["tensors"]} == {
        "top.0",
        "bottom.0",
        "param.0",
        "param.1",
    }
    with pytest.raises(CorpusError, match="no cases for layer type"):
        validate(corpus, vt.torch_impl, "torch", layers="Nope")


@pytest.mark.torch
def test_case_file_damaged_after_loading_is_an_error_row(tmp_path):
    pytest.importorskip("torch")
    vt.write_corpus(tmp_path)
    corpus = load(tmp_path)
    path = tmp_path / "SoftmaxWithLoss__basic.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    report = validate(corpus, vt.torch_impl, "torch")
    row = _row(report, "SoftmaxWithLoss/basic")
    assert row.verdict == "error" and "SHA-256" in row.message
    assert _row(report, "InnerProduct/basic").verdict == "pass"


def test_bad_arguments(corpus):
    with pytest.raises(ValueError, match="unknown framework"):
        validate(corpus, vt.torch_impl, "tensorflow")
    with pytest.raises(ValueError, match="give an implementation"):
        validate(corpus, None, "torch")
    with pytest.raises(ValueError, match="netlite framework only"):
        validate(corpus, vt.torch_impl, "torch", engine="numba")
    with pytest.raises(ValueError, match="expected module:function"):
        validate(corpus, "no_colon", "torch")


# --------------------------------------------------------------- netlite
@pytest.mark.parametrize("engine", ["numpy", "numba"])
def test_netlite_engines_pass_the_hand_computed_corpus(corpus, engine):
    report = validate(corpus, None, "netlite", engine=engine)
    assert report.ok, report.table()
    assert report.counts()["pass"] == 3
    assert f"netlite ({engine} engine)" in report.summary()


def test_netlite_adapter_fails_a_wrong_stored_gradient(tmp_path):
    # The self-check can fail: a corpus whose gradient is off is caught.
    def wrong(record, arrays):
        if record.layer_type == "Head":
            arrays["grad.param.ip.1"] = arrays["grad.param.ip.1"] * 1.0001
        if record.layer_type == "SoftmaxWithLoss":
            arrays["grad.bottom.0"] = -arrays["grad.bottom.0"]

    vt.write_corpus(tmp_path, which=ALL, mutate=wrong)
    report = validate(load(tmp_path), None, "netlite")
    assert [r.verdict for r in report.rows] == ["pass", "fail", "fail"]
    assert [t.label for t in _row(report, "Head/ip_softmax").tensors if not t.ok] == [
        "dparam.ip.1"
    ]


def test_netlite_impl_must_return_gradients(corpus):
    def impl(case):
        outputs, grads = vt_netlite(case)
        grads.pop(next(iter(grads)))
        return outputs, grads

    from netlite.reference.impl import netlite_impl as vt_netlite

    report = validate(corpus, impl, "netlite")
    assert {r.verdict for r in report.rows} == {"error"}
    assert "returned no gradient" in report.rows[0].message
    report = validate(corpus, lambda case: vt_netlite(case)[0], "netlite")
    assert "returns (outputs, gradients)" in report.rows[0].message


# ------------------------------------------------------------------- jax
def test_jax_correct_impl_passes_and_a_wrong_one_fails(corpus):
    pytest.importorskip("jax")
    report = validate(corpus, vt.jax_impl, "jax")
    assert report.ok, report.table()
    worst = max(t.err for r in report.rows for t in r.tensors)
    print(f"jax vs hand-computed corpus: worst relative error {worst:.2e}")
    assert worst < 1e-13 and {r.dtype for r in report.rows} == {"float64"}

    def wrong(case):
        out = vt.jax_impl(case)
        if case.layer_type == "SoftmaxWithLoss":
            return out * 2.0
        if case.layer_type == "InnerProduct":
            raise ValueError("jax impl broke")
        return out

    report = validate(corpus, wrong, "jax")
    assert [r.verdict for r in report.rows] == ["error", "fail", "pass"]
    assert "jax impl broke" in report.rows[0].message


@pytest.mark.torch
def test_surrogate_explains_only_the_gradients_it_stores(corpus):
    # dbottom.0 is the HALF surrogate, but dparam.0 is simply wrong: a failure.
    pytest.importorskip("torch")
    impl = functools.partial(vt.torch_impl, half=True, scale=2.0)
    row = _row(validate(corpus, impl, "torch"), "InnerProduct/basic")
    assert row.verdict == "fail" and row.verdict_text() == "FAIL: dbottom.0, dparam.0"
    assert _tensor(row, "dbottom.0").surrogate == "HALF"


# ------------------------------------------ netlite against the real corpus
COMMITTED = __import__("pathlib").Path(__file__).parent / "data" / "corpus"


@pytest.mark.parametrize("engine", ["numpy", "numba"])
def test_netlite_engines_pass_the_committed_corpus(engine):
    if not (COMMITTED / "manifest.json").is_file():
        pytest.skip("no committed corpus")
    report = validate(load(COMMITTED), None, "netlite", engine=engine)
    assert report.ok and report.counts()["pass"] == len(report.rows), report.table()


# LabelSpecificMargin/cos_one_none warns (by design) that boundary NONE is
# not monotonic; the layer's own tests check the warning.
@pytest.mark.filterwarnings("ignore::netlite.NetliteWarning")
@pytest.mark.parametrize("engine", ["numpy", "numba"])
def test_netlite_engines_pass_the_whole_written_corpus(tmp_path, engine):
    write = __import__("importlib").import_module("netlite.reference.write").write
    records = write(str(tmp_path), check=False)
    report = validate(load(tmp_path), None, "netlite", engine=engine)
    assert len(report.rows) == len(records)
    assert report.ok and report.counts()["pass"] == len(records), report.table()
    worst = max(t.err for r in report.rows for t in r.tensors)
    print(f"netlite {engine} vs the written corpus: worst relative error {worst:.2e}")


@pytest.mark.torch
def test_null_float32_tolerance_is_a_skip_in_float32(tmp_path):
    pytest.importorskip("torch")

    def no_float32(record, arrays):
        if record.layer_type == "SoftmaxWithLoss":
            record.tolerance = {**record.tolerance, "float32": None}

    vt.write_corpus(tmp_path, mutate=no_float32)
    corpus = load(tmp_path)
    report = validate(corpus, vt.torch_impl, "torch", dtype="float32")
    row = _row(report, "SoftmaxWithLoss/basic")
    assert row.verdict == "skip" and "no float32 tolerance" in row.message
    assert report.ok and "1 skipped" in report.summary()
    assert validate(corpus, vt.torch_impl, "torch").counts()["pass"] == 2
