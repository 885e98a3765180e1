"""The configuration reference (docs/reference/configuration.md, moved out of the README) says
what `merit_lab/config/schema.py` declares: every field, with its default (schema.py is the one
place a default lives); and every test the README and docs cite exists in a clean clone."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from merit_lab.config import schema as c
from merit_lab.gradients.sketch import SketchSpec
from tests.clean_clone import is_tracked

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONFIG_DOC = ROOT / "docs" / "reference" / "configuration.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
SECTIONS = {
    "top level": c.RunConfig,
    "`mixture`": c.MixtureConfig,
    "`calibration`": c.CalibrationConfig,
    "`sketch`": SketchSpec,
    "`parameters`": c.ParameterConfig,
    "`partition`": c.PartitionConfig,
    "`train`": c.TrainConfig,
    "`experiments`": c.ExperimentConfig,
    "`merge`": c.MergeConfig,
    "`eval`": c.EvalConfig,
    "`diagnostics`": c.DiagnosticsConfig,
    "`plan`": c.PlanConfig,
}
FIELD = re.compile(r"`(\w+)` \(([^()]*)\)")


def _rows() -> dict[str, str]:
    text = CONFIG_DOC.read_text(encoding="utf-8")
    table = text[text.index("| section | fields (default): meaning |") :].split("\n\n")[0]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [x.strip() for x in line.strip().strip("|").split("|")]
        rows[cells[0]] = "|".join(cells[1:])
    return rows


def _parse(text: str):
    try:
        return float(text) if any(ch in text for ch in ".e") else int(text)
    except ValueError:
        return yaml.safe_load(text)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()


def _norm(v):
    if isinstance(v, tuple | list):
        return [_norm(x) for x in v]
    return v


def test_table_has_a_row_per_section():
    assert set(_rows()) == set(SECTIONS)


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_field_and_default_is_in_the_table(section):
    cls = SECTIONS[section]
    documented = dict(FIELD.findall(_rows()[section]))
    nested = {
        "mixture",
        "calibration",
        "sketch",
        "parameters",
        "partition",
        "train",
        "experiments",
        "merge",
        "eval",
        "diagnostics",
        "plan",
    }
    for f in dataclasses.fields(cls):
        if cls is c.RunConfig and f.name in nested:
            continue
        if cls is c.ExperimentConfig and f.name == "name":
            continue  # required, no default
        assert f.name in documented, f"{section}: `{f.name}` is not in {CONFIG_DOC.name}'s table"
        assert _parse(documented[f.name]) == _norm(_default(f)), (
            f"{section}.{f.name}: the table says {documented[f.name]!r}, schema.py {_default(f)!r}"
        )


# A test pointer: `tests/<path>` or `tests/<file>.py::<function>` in backticks.
TEST_POINTER = re.compile(r"`(tests/[\w./-]*?)(?:::(\w+))?`")


def test_a_gitignored_folder_is_not_a_pointer_target():
    """The pointer check reads git's list, not the disk: the browser test's gitignored
    tests/artifacts/ does not count even where a run of that test created it."""
    artifacts = ROOT / "tests" / "artifacts"
    made = not artifacts.exists()
    artifacts.mkdir(exist_ok=True)
    try:
        assert artifacts.is_dir() and not is_tracked("tests/artifacts/")
    finally:
        if made:
            artifacts.rmdir()
    assert is_tracked("tests/bad_inputs/")
    assert is_tracked("tests/test_readme.py")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_test_the_readme_points_to_exists(page):
    """Every `tests/...` path the README and docs cite is a file or folder of a clean clone, and
    every `tests/<file>.py::<name>` names a test function (or class) defined in that file."""
    text = page.read_text(encoding="utf-8")
    pointers = TEST_POINTER.findall(text)
    dangling = []
    for path, name in pointers:
        target = ROOT / path
        if not is_tracked(path):
            dangling.append(path)
        elif name and not re.search(
            rf"^(?:async def|def|class) {name}\b", target.read_text(encoding="utf-8"), re.M
        ):
            dangling.append(f"{path}::{name}")
    assert not dangling, f"{page.name} cites tests that do not exist: {sorted(set(dangling))}"


def test_the_readme_and_docs_cite_tests():
    """The pointer syntax still matches: the README cites its demo table's test, the docs many."""
    assert "tests/test_demo_results.py" in {p for p, _ in TEST_POINTER.findall(README.read_text())}
    cited = {p for page in PAGES for p, _ in TEST_POINTER.findall(page.read_text("utf-8"))}
    assert len(cited) >= 30


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_tested_claim_names_its_test(page):
    """ "(tested)" alone names nothing, and "tested in X" must name the test: each is followed by
    a `tests/...` pointer (which the test above checks exists)."""
    text = " ".join(page.read_text(encoding="utf-8").split())  # pointers wrap across lines
    bare = re.findall(r".{0,60}\(tested\)", text)
    unnamed = re.findall(r".{0,60}\btested in (?!`tests/).{0,30}", text)
    assert not bare + unnamed, f"{page.name}: test claims without a test file: {bare + unnamed}"
