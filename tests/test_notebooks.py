"""Every notebook runs in the smoke setting; the committed files are stripped and current."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
ALL = sorted(NOTEBOOKS.glob("*.ipynb"))


def test_notebooks_are_stripped_and_match_their_builder():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "build_notebooks", NOTEBOOKS / "build_notebooks.py"
    )
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    assert sorted(f"{n}.ipynb" for n in builder.NOTEBOOKS) == [p.name for p in ALL]
    for path in ALL:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), path.name
        expected = [src for _, src in builder.NOTEBOOKS[path.stem]]
        assert [c.source for c in nb.cells] == expected, f"{path.name}: run build_notebooks.py"
        assert not any(line.startswith("def ") for c in code for line in c.source.splitlines())


@pytest.mark.notebook
@pytest.mark.parametrize("path", ALL, ids=[p.stem for p in ALL])
def test_notebook_executes_in_smoke_setting(path: Path, tmp_path: Path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("MERIT_SMOKE", "1")
    monkeypatch.setenv("MERIT_OUTPUT_DIR", str(tmp_path / "runs"))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors
    assert os.listdir(tmp_path / "runs")  # it wrote its run directory where it was told
