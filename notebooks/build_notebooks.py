"""Writes the tutorial notebooks from their cell lists (outputs stripped). Run after editing.

Keeping the cells here as plain strings makes them lintable and reviewable in diffs;
`python notebooks/build_notebooks.py` rewrites every .ipynb.
"""

from __future__ import annotations

from pathlib import Path

import nbformat

HERE = Path(__file__).parent

SETUP = """import os
from pathlib import Path

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
SMOKE = os.environ.get("MERIT_SMOKE") == "1"  # tests set this: tiny settings, same code path
OUTPUT_DIR = os.environ.get("MERIT_OUTPUT_DIR", str(ROOT / "runs"))"""

NB01 = [
    (
        "md",
        """# 01 · The conflict space of an instruction mixture

MERIT starts from one question: *which datasets of a mixture pull the base model θ0 in opposite
directions?* It answers it offline, before any training, from one gradient per source:

1. estimate each source's gradient at θ0 from ~200 calibration examples (loss on response tokens
   only), kept as a compact count-sketch;
2. compare them by cosine, `C_ij = cos(g_i, g_j)`, and take the PCA of the normalised gradients:
   the *conflict space*;
3. split the mixture into K = 2^r groups by sample-balanced median cuts along the top r axes.

This notebook runs those stages on the bundled demo mixture (32 synthetic sources with *planted*
conflicts) and checks that the conflict space finds what was planted.""",
    ),
    (
        "code",
        """from merit_lab.config import load_config
from merit_lab.conflict import ConflictSpace
from merit_lab.io import read_json
from merit_lab.pipeline import load_source_table, run_pipeline, run_summary
from merit_lab.plots import (
    plot_conflict_heatmap,
    plot_conflict_scatter,
    plot_explained_variance,
)""",
    ),
    (
        "md",
        "**Parameters.** `MERIT_SMOKE=1` shrinks the calibration set so the tests run this "
        "notebook in seconds; everything else is the real demo configuration.",
    ),
    (
        "code",
        SETUP
        + """
CONFIG = ROOT / "configs" / "demo.yaml"
overrides = {"output_dir": OUTPUT_DIR}
if SMOKE:
    overrides |= {"name": "nb01-smoke", "calibration": {"n": 16, "micro_batch_size": 16}}
cfg = load_config(CONFIG, **overrides)
cfg""",
    ),
    (
        "md",
        """## 1 · Gradients at θ0, conflict space, partition

`run_pipeline` runs the stages into `runs/<name>/` and skips any stage whose artifact is already
there and current, so re-running this cell is instant. The same call is `merit-lab run
configs/demo.yaml` from a shell.""",
    ),
    (
        "code",
        """run = run_pipeline(cfg, ["mixture", "gradients", "conflict", "partition"])
print(run_summary(run.root))""",
    ),
    (
        "code",
        """space = ConflictSpace.load(run.conflict)
table = load_source_table(run.root)
AXES = read_json(run.mixture)["info"].get("axes", [])  # the planted labels, from sources.json
print("planted axes:", AXES)
table.head()""",
    ),
    (
        "md",
        """## 2 · The conflict matrix

Sources in clustering order (average linkage on 1 − C). Blue blocks pull together, red blocks
pull apart. Hover for the pair and each source's metadata.""",
    ),
    ("code", "plot_conflict_heatmap(space, table)"),
    (
        "md",
        """## 3 · The conflict space

Each point is a source at its PCA coordinates. Colour it by a planted label: if the first axis
is a planted conflict, the colours separate left/right.""",
    ),
    ("code", 'plot_conflict_scatter(space, table, color="style")'),
    ("code", 'plot_conflict_scatter(space, table, color=AXES[1] if len(AXES) > 1 else "family")'),
    ("md", "How much of the spread each axis carries (r = 2 uses the first two)."),
    ("code", "plot_explained_variance(space)"),
    (
        "md",
        """## 4 · The partition

The balanced median split gives K = 2^r groups of nearly equal example counts. Coloured by
group, and cross-tabulated against the planted labels: a clean diagonal means the split found
the planted structure.""",
    ),
    ("code", 'plot_conflict_scatter(space, table, color="group")'),
    (
        "code",
        """import pandas as pd

pd.crosstab(table["group"], [table[a] for a in AXES])""",
    ),
    ("code", 'plot_conflict_scatter(space, table, color="group", dims=3)'),
]


def _cells(spec: list[tuple[str, str]]) -> list:
    return [
        nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
        for kind, src in spec
    ]


def build(name: str, spec: list[tuple[str, str]]) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells = _cells(spec)
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{name[:2]}-{i:02d}"
    path = HERE / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


NOTEBOOKS = {"01_conflict_space": NB01}

if __name__ == "__main__":
    for name, spec in NOTEBOOKS.items():
        print("wrote", build(name, spec))
