"""The notebooks are their own source: stripped, free of logic, one shared setup, and they run.

The ``.ipynb`` files are what people edit in Jupyter; nothing generates them, so these checks read
each notebook as saved. Executing them is the ``notebook`` tier (minutes).
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager

from merit_lab.pipeline.notebook import NOTEBOOK_NAMES, NotebookSetting, notebook_setting

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
ALL = sorted(NOTEBOOKS.glob("*.ipynb"))
SETUP_MODULE = "merit_lab.pipeline.notebook"
LOGIC = {
    ast.FunctionDef: "def",
    ast.AsyncFunctionDef: "async def",
    ast.ClassDef: "class",
    ast.Lambda: "lambda",
}


def _code_cells(nb: nbformat.NotebookNode) -> list[tuple[int, ast.Module]]:
    """Each code cell's index and syntax tree (IPython magics turned into Python first)."""
    transform = TransformerManager().transform_cell
    return [
        (i, ast.parse(transform(cell.source)))
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
    ]


def output_problems(nb: nbformat.NotebookNode) -> list[str]:
    """Code cells that still carry outputs or an execution count."""
    return [
        f"cell {i}: has outputs or an execution count (Clear All Outputs before committing)"
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count"))
    ]


def logic_problems(nb: nbformat.NotebookNode) -> list[str]:
    """Definitions in code cells: a helper belongs in `merit_lab`, the notebook calls it."""
    return [
        f"cell {i}, line {node.lineno}: `{LOGIC[type(node)]}` (move it into merit_lab/)"
        for i, tree in _code_cells(nb)
        for node in ast.walk(tree)
        if type(node) in LOGIC
    ]


def setup_problems(nb: nbformat.NotebookNode) -> list[str]:
    """The shared setting comes from one import in the first code cell and nowhere else."""
    cells = _code_cells(nb)
    imports = [
        (i, node)
        for i, tree in cells
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == SETUP_MODULE
    ]
    problems = []
    if len(imports) != 1:
        problems.append(f"{len(imports)} imports from {SETUP_MODULE}; expected one")
    elif imports[0][0] != cells[0][0]:
        problems.append(f"cell {imports[0][0]}: the {SETUP_MODULE} import is not in the first cell")
    for i, node in imports:
        unknown = sorted({a.name for a in node.names} - set(NOTEBOOK_NAMES))
        if unknown:
            problems.append(f"cell {i}: imports {unknown} from {SETUP_MODULE}")
    for i, tree in cells:
        for node in ast.walk(tree):
            if isinstance(node, ast.Name | ast.alias):
                name = node.id if isinstance(node, ast.Name) else (node.asname or node.name)
                stored = isinstance(node, ast.alias) or isinstance(node.ctx, ast.Store)
                if stored and name in NOTEBOOK_NAMES and node not in _aliases(imports):
                    problems.append(f"cell {i}: sets {name} itself")
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "cwd"):
                problems.append(f"cell {i}, line {node.lineno}: reads `{node.attr}`")
    return problems


def _aliases(imports: list[tuple[int, ast.ImportFrom]]) -> list[ast.alias]:
    return [a for _, node in imports for a in node.names]


def _notebook(*cells: tuple[str, str]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
        for kind, src in cells
    ]
    return nb


IMPORTS = f"from merit_lab.config import load_config\nfrom {SETUP_MODULE} import ROOT, SMOKE"


def test_there_are_notebooks_and_no_generator():
    assert len(ALL) >= 8
    assert not list(NOTEBOOKS.glob("*.py")), "the .ipynb files are the source: no builder"


@pytest.mark.parametrize("path", ALL, ids=[p.stem for p in ALL])
def test_notebook_is_stripped_thin_and_shares_the_setup(path: Path):
    nb = nbformat.read(path, as_version=4)
    problems = output_problems(nb) + logic_problems(nb) + setup_problems(nb)
    assert not problems, f"{path.name}: " + "; ".join(problems)


def test_checks_accept_a_notebook_edited_in_jupyter():
    """As JupyterLab saves it after an edit and "Clear All Outputs": new cells, cell metadata,
    a magic; no builder to agree with."""
    nb = _notebook(
        ("code", IMPORTS),
        ("md", "A paragraph written in Jupyter."),
        ("code", '%matplotlib inline\ncfg = load_config(ROOT / "configs" / "demo.yaml")'),
        ("code", "cfg.name if SMOKE else [s for s in cfg.experiments]"),
    )
    nb.cells[2].metadata = {"tags": [], "scrolled": True}
    assert output_problems(nb) + logic_problems(nb) + setup_problems(nb) == []


def test_checks_catch_outputs_logic_and_a_second_setup():
    nb = _notebook(
        ("code", IMPORTS),
        ("code", "def helper(x):\n    return x\n\n\nclass Thing:\n    pass"),
        ("code", "key = lambda row: row[0]"),
        ("code", "import os\n\nSMOKE = os.environ.get('MERIT_SMOKE') == '1'"),
        ("code", "1 + 1"),
    )
    nb.cells[4].outputs = [nbformat.v4.new_output("execute_result", data={"text/plain": "2"})]
    nb.cells[4].execution_count = 3
    assert output_problems(nb) == [
        "cell 4: has outputs or an execution count (Clear All Outputs before committing)"
    ]
    assert sorted(logic_problems(nb)) == [
        "cell 1, line 1: `def` (move it into merit_lab/)",
        "cell 1, line 5: `class` (move it into merit_lab/)",
        "cell 2, line 1: `lambda` (move it into merit_lab/)",
    ]
    assert setup_problems(nb) == ["cell 3: sets SMOKE itself", "cell 3, line 3: reads `environ`"]


def test_checks_catch_a_missing_or_misplaced_setup_import():
    assert setup_problems(_notebook(("code", "from merit_lab.config import load_config"))) == [
        f"0 imports from {SETUP_MODULE}; expected one"
    ]
    late = _notebook(("code", "import pandas"), ("md", "x"), ("code", IMPORTS))
    assert setup_problems(late) == [f"cell 2: the {SETUP_MODULE} import is not in the first cell"]
    other = _notebook(("code", f"from {SETUP_MODULE} import ROOT, notebook_setting"))
    assert setup_problems(other) == [f"cell 0: imports ['notebook_setting'] from {SETUP_MODULE}"]


# ------------------------------------------------------------------- merit_lab.pipeline.notebook
def test_setting_from_the_notebooks_folder_and_from_the_top(tmp_path: Path):
    env = {"MERIT_SMOKE": "1", "MERIT_OUTPUT_DIR": "/scratch/runs"}
    assert notebook_setting(tmp_path / "notebooks", env) == NotebookSetting(
        tmp_path, True, "/scratch/runs"
    )
    assert notebook_setting(tmp_path, {}) == NotebookSetting(tmp_path, False, f"{tmp_path}/runs")
    assert notebook_setting(tmp_path / "notebooks", {"MERIT_SMOKE": "0"}).smoke is False


def test_setting_refuses_a_smoke_value_it_would_misread(tmp_path: Path):
    with pytest.raises(ValueError, match=r"MERIT_SMOKE='true': set it to 1"):
        notebook_setting(tmp_path, {"MERIT_SMOKE": "true"})


def test_the_import_reads_the_setting_when_it_runs(tmp_path: Path, monkeypatch):
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    monkeypatch.setenv("MERIT_SMOKE", "1")
    monkeypatch.delenv("MERIT_OUTPUT_DIR", raising=False)
    from merit_lab.pipeline.notebook import OUTPUT_DIR as out
    from merit_lab.pipeline.notebook import ROOT as root
    from merit_lab.pipeline.notebook import SMOKE as smoke

    assert (root, smoke, out) == (tmp_path, True, str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MERIT_SMOKE", "0")
    monkeypatch.setenv("MERIT_OUTPUT_DIR", str(tmp_path / "elsewhere"))
    from merit_lab.pipeline.notebook import OUTPUT_DIR as out
    from merit_lab.pipeline.notebook import ROOT as root
    from merit_lab.pipeline.notebook import SMOKE as smoke

    assert (root, smoke, out) == (tmp_path, False, str(tmp_path / "elsewhere"))
    with pytest.raises(ImportError, match="SETTING"):
        from merit_lab.pipeline.notebook import SETTING  # noqa: F401


# ---------------------------------------------------------------------------------- execution
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
