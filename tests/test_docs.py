"""The layer pages are tied to the code and the tests.

Every ``docs/layers/*.md`` page

* has a ``## Checks`` section whose table maps each claim of the page (an
  equation or a behaviour) to the pytest ids that check it; every id must
  name an existing test (``path::function``, ``path::Class::method``,
  optionally with a parameter id in brackets, which for a LayerTestCase
  must start with one of its case ids);
* quotes code only verbatim: a fenced block whose info string starts with
  ``python`` must name its source (```` ```python source=layers/x.py ````)
  and its lines must occur, in order and contiguous, in that file
  (indentation aside).  Source-tagged blocks on every other page of
  ``docs/`` (and the README) are held to the same rule;
* keeps engine strategy prose in an appendix: nothing but ``## Appendix``
  sections follows the Checks section.
"""

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs" / "layers").glob("*.md"))
ALL_PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]

_ID = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(?:::(\w+))?(?:\[([^\]`]+)\])?`")
_FENCE = re.compile(r"^```(.*)$")


def _sections(text):
    """``[(heading, body)]`` for the ``## `` headings of a page."""
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    return list(zip(parts[1::2], parts[2::2]))


def _checks_section(page):
    text = page.read_text(encoding="utf-8")
    for heading, body in _sections(text):
        if heading.strip().lower().startswith("checks"):
            return body
    return None


def _code_blocks(text):
    """``[(info, lines, line_number)]`` of the fenced blocks of a page."""
    blocks, current = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        fence = _FENCE.match(line.strip())
        if fence and current is None:
            current = (fence.group(1).strip(), [], number)
        elif fence:
            blocks.append(current)
            current = None
        elif current is not None:
            current[1].append(line)
    return blocks


@cache
def _module(path):
    return ast.parse((ROOT / path).read_text(encoding="utf-8"))


def _classes(tree):
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


def _functions(body):
    return {n.name for n in body if isinstance(n, ast.FunctionDef)}


def _harness():
    tree = _module("tests/layer_test_case.py")
    return _classes(tree)["LayerTestCase"]


def _case_ids(cls, classes):
    """The keys of a LayerTestCase subclass's ``cases`` (inherited too)."""
    for node in cls.body:
        if isinstance(node, ast.Assign) and any(
                getattr(t, "id", None) == "cases" for t in node.targets):
            return set(ast.literal_eval(node.value))
    for base in cls.bases:
        name = getattr(base, "id", None)
        if name in classes:
            return _case_ids(classes[name], classes)
    return {"default"}


def _is_harness_case(cls, classes):
    for base in cls.bases:
        name = getattr(base, "id", None)
        if name == "LayerTestCase" or (
                name in classes and _is_harness_case(classes[name], classes)):
            return True
    return False


def _methods(cls, classes):
    names = set(_functions(cls.body))
    for base in cls.bases:
        name = getattr(base, "id", None)
        if name in classes:
            names |= _methods(classes[name], classes)
        elif name == "LayerTestCase":
            names |= _functions(_harness().body)
    return names


def missing_test(path, first, second=None, param=None):
    """Why the pytest id does not exist, or None when it does."""
    if not (ROOT / path).is_file():
        return f"{path} does not exist"
    tree = _module(path)
    if second is None:
        if first not in _functions(tree.body):
            return f"{path} has no function {first}"
        return None
    classes = _classes(tree)
    if first not in classes:
        return f"{path} has no class {first}"
    if second not in _methods(classes[first], classes):
        return f"{path}::{first} has no method {second}"
    if param is not None and _is_harness_case(classes[first], classes):
        # Harness ids read [engine-]case[-dtype]; an engine alone names
        # every case on that engine.
        cases = _case_ids(classes[first], classes)
        tokens = param.split("-")
        if not (set(tokens) & cases or tokens == ["numba"]):
            return f"{path}::{first} has no case in {param!r} ({sorted(cases)})"
    return None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_has_a_checks_table(page):
    body = _checks_section(page)
    assert body is not None, f"{page.name} has no '## Checks' section"
    rows = [line for line in body.splitlines() if line.startswith("|")]
    ids = [m for row in rows[2:] for m in _ID.finditer(row)]
    assert len(rows) > 2 and ids, f"{page.name}: the Checks table names no test"
    for row in rows[2:]:
        assert _ID.search(row), f"{page.name}: a claim without a test id: {row}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_named_tests_exist(page):
    text = page.read_text(encoding="utf-8")
    problems = [missing_test(*m.groups()) for m in _ID.finditer(text)]
    problems = [p for p in problems if p]
    assert not problems, f"{page.name}: " + "; ".join(problems)


def excerpt_found(lines, source):
    """Whether ``lines`` occur, in order and contiguous, in the file
    ``source`` (blank lines and indentation aside)."""
    excerpt = [line.strip() for line in lines if line.strip()]
    code = [line.strip() for line in (ROOT / source).read_text(encoding="utf-8")
            .splitlines() if line.strip()]
    n = len(excerpt)
    return n > 0 and any(code[i:i + n] == excerpt for i in range(len(code) - n + 1))


@pytest.mark.parametrize("page", ALL_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_code_excerpts_are_verbatim(page):
    text = page.read_text(encoding="utf-8")
    strict = page.parent == ROOT / "docs" / "layers"
    for info, lines, number in _code_blocks(text):
        source = re.search(r"source=(\S+)", info)
        if source is None:
            assert not (strict and info.startswith("python")), (
                f"{page.name}:{number}: a python block must name its source "
                "(```python source=layers/<file>.py); use ```text for code "
                "that is not quoted from a file")
            continue
        assert (ROOT / source.group(1)).is_file(), (
            f"{page.name}:{number}: {source.group(1)} does not exist")
        assert excerpt_found(lines, source.group(1)), (
            f"{page.name}:{number}: the excerpt does not occur verbatim in "
            f"{source.group(1)}")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_only_appendices_follow_the_checks(page):
    headings = [h.strip() for h, _ in _sections(page.read_text(encoding="utf-8"))]
    checks = [i for i, h in enumerate(headings) if h.lower().startswith("checks")]
    assert checks, f"{page.name} has no '## Checks' section"
    after = headings[checks[0] + 1:]
    assert all(h.lower().startswith("appendix") for h in after), (
        f"{page.name}: only '## Appendix ...' sections may follow the Checks "
        f"table, found {after}"
    )


def test_the_checker_finds_missing_tests():
    # The checks above must be able to fail.
    assert missing_test("tests/nowhere.py", "test_x")
    assert missing_test("tests/test_docs.py", "test_no_such_function")
    assert missing_test("tests/test_docs.py", "NoClass", "test_x")
    assert missing_test("tests/test_docs.py", "test_named_tests_exist") is None
    assert missing_test("tests/layer_tests/test_relu.py", "TestReLULayer",
                        "test_gradient") is None
    assert missing_test("tests/layer_tests/test_relu.py", "TestReLULayer",
                        "test_gradient", "nocase")
    assert missing_test("tests/layer_tests/test_relu.py", "TestReLULayer",
                        "test_nothing")


def test_the_checker_finds_paraphrased_code():
    quoted = ["def excerpt_found(lines, source):", "    n = len(excerpt)"]
    assert excerpt_found(quoted[:1], "tests/test_docs.py")
    assert not excerpt_found(quoted, "tests/test_docs.py")  # not contiguous
    assert not excerpt_found(["def excerpt_found(lines, src):"], "tests/test_docs.py")
