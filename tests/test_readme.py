"""The README's configuration table says what `merit_lab/config/schema.py` declares: every field,
with
its default (config.py is the one place a default lives)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from merit_lab.config import schema as c
from merit_lab.gradients.sketch import SketchSpec

README = Path(__file__).resolve().parents[1] / "README.md"
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
}
FIELD = re.compile(r"`(\w+)` \(([^()]*)\)")


def _rows() -> dict[str, str]:
    text = README.read_text(encoding="utf-8")
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
    }
    for f in dataclasses.fields(cls):
        if cls is c.RunConfig and f.name in nested:
            continue
        if cls is c.ExperimentConfig and f.name == "name":
            continue  # required, no default
        assert f.name in documented, f"{section}: `{f.name}` is not in the README table"
        assert _parse(documented[f.name]) == _norm(_default(f)), (
            f"{section}.{f.name}: README says {documented[f.name]!r}, config.py {_default(f)!r}"
        )


# A test pointer: `tests/<path>` or `tests/<file>.py::<function>` in backticks.
TEST_POINTER = re.compile(r"`(tests/[\w./-]*?)(?:::(\w+))?`")


def test_every_test_the_readme_points_to_exists():
    """Every `tests/...` path the README cites is a file or folder of this repository, and every
    `tests/<file>.py::<name>` names a test function (or class) defined in that file."""
    root = README.parent
    text = README.read_text(encoding="utf-8")
    pointers = TEST_POINTER.findall(text)
    assert pointers, "the README cites no test; has the pointer syntax changed?"
    dangling = []
    for path, name in pointers:
        target = root / path
        if not target.exists():
            dangling.append(path)
        elif name and not re.search(
            rf"^(?:async def|def|class) {name}\b", target.read_text(encoding="utf-8"), re.M
        ):
            dangling.append(f"{path}::{name}")
    assert not dangling, f"README cites tests that do not exist: {sorted(set(dangling))}"


def test_every_tested_claim_names_its_test():
    """ "(tested)" alone names nothing, and "tested in X" must name the test: each is followed by
    a `tests/...` pointer (which the test above checks exists)."""
    text = " ".join(README.read_text(encoding="utf-8").split())  # pointers wrap across lines
    bare = re.findall(r".{0,60}\(tested\)", text)
    unnamed = re.findall(r".{0,60}\btested in (?!`tests/).{0,30}", text)
    assert not bare + unnamed, f"README test claims without a test file: {bare + unnamed}"
