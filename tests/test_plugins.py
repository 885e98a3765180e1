"""The suite's own pytest plugins, as conftest.py loads them: the run's end names the tiers that
did not run, with counts and reasons (tests/skip_summary.py); ``--order`` reverses or shuffles the
tests (tests/ordering.py). A tiny planted suite runs in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CONFTEST = """
from tests.ordering import pytest_addoption, pytest_collection_modifyitems  # noqa: F401
from tests.skip_summary import (  # noqa: F401
    pytest_deselected,
    pytest_sessionfinish,
    pytest_terminal_summary,
    pytest_testnodedown,
)


def pytest_configure(config):
    for marker in ("browser", "gpu", "notebook", "slow"):
        config.addinivalue_line("markers", f"{marker}: a tier")
"""

TESTS = """
import pytest


def test_passes():
    pass


@pytest.mark.browser
@pytest.mark.skipif(True, reason="/usr/bin/chromium is missing (apt-get install chromium)")
def test_browser():
    pass


@pytest.mark.parametrize("n", [1, 2])
def test_smollm2(n):
    pytest.skip("SmolLM2 is not fetched into /x: run `merit-lab fetch-model smollm2`")


@pytest.mark.gpu
@pytest.mark.skipif(True, reason="needs CUDA")
def test_gpu():
    pass


@pytest.mark.slow
def test_slow_without_a_known_reason():
    pytest.skip("the filesystem said no")


def test_no_marker_and_no_known_reason():
    pytest.skip("some other reason")


@pytest.mark.notebook
@pytest.mark.parametrize("n", [1, 2, 3])
def test_notebook(n):
    pass
"""


def _run(tmp_path: Path, *args: str) -> list[str]:
    """``pytest -q *args`` in ``tmp_path`` on the planted suite; its output lines."""
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_planted.py").write_text(TESTS)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.splitlines()


def test_summary_names_each_skipped_tier_with_its_count_and_reason(tmp_path):
    lines = _run(tmp_path, "-m", "not notebook", "test_planted.py")
    start = next(i for i, x in enumerate(lines) if x.startswith("skipped tiers:"))
    assert lines[start : start + 7] == [
        "skipped tiers: browser 1, smollm2 2, gpu 1, slow 1, other 1",
        "  browser: /usr/bin/chromium is missing (apt-get install chromium)",
        "  smollm2: SmolLM2 is not fetched into /x: run `merit-lab fetch-model smollm2`",
        "  gpu: needs CUDA",
        "  slow: the filesystem said no",
        "  other: some other reason",
        "deselected tiers (-m/-k): notebook 3",
    ]
    assert "1 passed, 6 skipped, 3 deselected" in lines[-1]


def test_the_summary_is_the_same_on_two_xdist_workers(tmp_path):
    """`make test` runs 2 workers, which collect and deselect: the controller still counts the
    tests each tier left out (once, not once per worker)."""
    lines = _run(tmp_path, "-n", "2", "-m", "not notebook", "test_planted.py")
    start = next(i for i, x in enumerate(lines) if x.startswith("skipped tiers:"))
    tiers = lines[start].removeprefix("skipped tiers: ").split(", ")  # in the order tests end
    assert sorted(tiers) == ["browser 1", "gpu 1", "other 1", "slow 1", "smollm2 2"]
    assert lines[start + 6] == "deselected tiers (-m/-k): notebook 3"
    assert "1 passed, 6 skipped" in lines[-1]


def test_nothing_is_added_when_every_test_ran(tmp_path):
    lines = _run(tmp_path, "test_planted.py::test_passes", "test_planted.py::test_notebook")
    assert "4 passed" in lines[-1]
    assert not any(x.startswith(("skipped tiers", "deselected tiers")) for x in lines)


def test_order_reverses_or_shuffles_within_and_across_files(tmp_path):
    (tmp_path / "test_second.py").write_text(
        "def test_a():\n    pass\n\n\ndef test_b():\n    pass\n"
    )
    args = ("--collect-only", "test_planted.py", "test_second.py")
    file_order = [x for x in _run(tmp_path, *args) if "::" in x]
    assert file_order[:2] == ["test_planted.py::test_passes", "test_planted.py::test_browser"]
    assert file_order[-2:] == ["test_second.py::test_a", "test_second.py::test_b"]
    assert [x for x in _run(tmp_path, *args, "--order", "reverse") if "::" in x] == file_order[::-1]
    shuffled = [
        x for x in _run(tmp_path, *args, "--order", "random", "--order-seed", "3") if "::" in x
    ]
    assert sorted(shuffled) == sorted(file_order) and shuffled != file_order
    files = [x.split("::")[0] for x in shuffled]
    assert files == sorted(files, key=files.index)  # each file's tests stay together
