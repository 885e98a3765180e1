"""The two tiers of the suite (docs/testing.md): `make test` runs the fast tier, `make test-slow`
the rest, and `.ci/run` runs both, so every test runs in CI exactly once."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _recipe(makefile: str, target: str) -> list[str]:
    """The command lines of ``target`` in the Makefile (tab-indented lines after its rule)."""
    lines = makefile.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"{target}:"))
    body = []
    for ln in lines[start + 1 :]:
        if not ln.startswith("\t"):
            break
        body.append(ln.strip())
    return body


def _pytest_marker_expr(makefile: str, target: str) -> str:
    (line,) = [ln for ln in _recipe(makefile, target) if "pytest" in ln]
    return re.search(r'-m "([^"]+)"', line).group(1)


def test_the_slow_tier_is_exactly_what_the_fast_tier_leaves_out():
    text = (ROOT / "Makefile").read_text()
    fast_def = re.search(r"^FAST := (.+)$", text, re.M).group(1)
    assert _pytest_marker_expr(text, "test") == "$(FAST)"
    assert _pytest_marker_expr(text, "test-slow") == "not ($(FAST))"
    # every marker that puts a test in the slow tier is registered with pytest (pyproject.toml)
    pyproject = (ROOT / "pyproject.toml").read_text()
    registered = set(re.findall(r'^  "(\w+): ', pyproject.split("markers = [", 1)[1], re.M))
    named = set(re.findall(r"not (\w+)", fast_def))
    assert named == {"slow", "notebook", "browser"} and named <= registered
    assert _recipe(text, "test")[:2] == ["$(BIN)/ruff check .", "$(BIN)/ruff format --check ."]
    assert re.search(r"^test-all: test test-slow$", text, re.M)


def test_ci_runs_both_tiers_after_installing():
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [ln for ln in lines if ln and not ln.startswith("#")]
    assert commands.index("make install") < commands.index("make test")
    assert commands.index("make test") < commands.index("make test-slow")


def test_the_fast_tier_uses_the_xdist_of_the_dev_extra():
    dev = (ROOT / "pyproject.toml").read_text().split("\ndev = [", 1)[1].split("]", 1)[0]
    assert re.search(r'^  "pytest-xdist>=', dev, re.M)
    (line,) = [ln for ln in _recipe((ROOT / "Makefile").read_text(), "test") if "pytest" in ln]
    assert "-n 2" in line and "--dist loadfile" in line
