"""Cells of notebook 04, the curation workbench (imported by build_notebooks.py).

The browser test (tests/test_browser.py) runs every cell in JupyterLab, then moves a source with
the editor's dropdowns and buttons: keep one editor, shown once, with its "Move" and "Save".
"""

from __future__ import annotations

__all__ = ["NB04"]

# The same parameters cell opening as build_notebooks.SETUP.
SETUP = """import os
from pathlib import Path

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
SMOKE = os.environ.get("MERIT_SMOKE") == "1"  # tests set this: tiny settings, same code path
OUTPUT_DIR = os.environ.get("MERIT_OUTPUT_DIR", str(ROOT / "runs"))"""

NB04 = [
    (
        "md",
        """# 04 · The curation workbench

Notebook 01 computed the conflict space and a partition automatically. Here you look at them
the way a data curator would, and change them by hand where you know better:

1. **explore** the conflict matrix, the PCA scatter and, per source, its nearest allies and
   strongest conflicts;
2. **check** that the calibration sample pins down a source's gradient direction;
3. **edit** the partition (move, drop or down-weight sources, re-split, undo) and save
   `partition.json` with a log of every edit; the branches of notebook 02 train whatever it
   says.

Every button calls a plain method (`editor.move(...)`, `editor.save()`), so any edit can also be
scripted and replayed.""",
    ),
    (
        "code",
        """from IPython.display import HTML, display

from merit_lab.config import load_config
from merit_lab.conflict import ConflictSpace
from merit_lab.convergence import gradient_convergence
from merit_lab.figures import CONVERGENCE_FILE
from merit_lab.gradients import GradientBank
from merit_lab.models import load_model, load_tokenizer, resolve_model_path
from merit_lab.partition import Partition
from merit_lab.pipeline import load_run_mixture, load_source_table, run_pipeline
from merit_lab.plots import plot_gradient_convergence
from merit_lab.widgets import ConflictExplorer, PartitionEditor""",
    ),
    (
        "md",
        "**Parameters.** `MERIT_SMOKE=1` shrinks the calibration set and the convergence check "
        "so the tests run this notebook in about a minute; otherwise it is the demo config.",
    ),
    (
        "code",
        SETUP
        + """
CONFIG = ROOT / "configs" / "demo.yaml"
overrides = {"output_dir": OUTPUT_DIR}
NS, N_BOOT = (10, 20, 40, 80, 160, 200), 20  # calibration sizes to check, bootstrap samples
if SMOKE:
    overrides |= {"name": "nb04-smoke", "calibration": {"n": 8, "micro_batch_size": 8}}
    NS, N_BOOT = (2, 4, 8), 5
cfg = load_config(CONFIG, **overrides)
cfg.name, cfg.calibration.n""",
    ),
    (
        "md",
        """## 1 · The run

The analysis stages (mixture → gradients → conflict → partition), skipped when already done.
A partition that carries hand edits is never overwritten by a re-run.""",
    ),
    (
        "code",
        """run = run_pipeline(cfg, until="partition")
space = ConflictSpace.load(run.conflict)
table = load_source_table(run.root)
table[["family", "examples", "tokens", "grad_norm", "group"]].head()""",
    ),
    (
        "md",
        """## 2 · Explore the conflicts

Top: the cosine matrix C under its dendrogram (hover a cell for both sources and their
metadata). Middle: the PCA scatter, coloured by any column of the table, in 2-D or 3-D, beside
the explained variance. Bottom: pick a source to list its nearest allies (highest cosine) and
strongest conflicts (lowest cosine).""",
    ),
    (
        "code",
        """explorer = ConflictExplorer(space, table)
explorer.widget""",
    ),
    (
        "md",
        "The panel's tables are plain DataFrames too. The first source's strongest conflicts:",
    ),
    (
        "code",
        """FIRST = space.names[0]
allies, conflicts = explorer.allies_and_conflicts(FIRST, n=3)
conflicts[["source", "cosine", "family", "group"]]""",
    ),
    (
        "md",
        """## 3 · Is the calibration sample big enough?

Each source's gradient is estimated from `calibration.n` examples. Take one gradient per
example, then for growing n compare the gradient of a bootstrap sample of n examples with the
gradient of all of them: when the cosine is close to 1 and its band is narrow, n is enough.
Here for the first source and its strongest conflict; the table is kept in the run directory
(`convergence.parquet`), where notebook 05 finds it for the paper figures.""",
    ),
    (
        "code",
        """SOURCES = [FIRST, conflicts.loc[0, "source"]]
mixture = load_run_mixture(cfg)
model_path = resolve_model_path(cfg.model)
model = load_model(model_path, device=cfg.device, dtype=cfg.dtype)
tokenizer = load_tokenizer(model_path)
convergence = gradient_convergence(
    model, tokenizer, {s: mixture[s].calibration for s in SOURCES},
    ns=NS, n_boot=N_BOOT, max_length=cfg.calibration.max_length, progress=not SMOKE,
)  # fmt: skip
convergence.to_parquet(run.root / CONVERGENCE_FILE)
plot_gradient_convergence(convergence)""",
    ),
    (
        "md",
        """## 4 · Edit the partition

The editor starts from the run's `partition.json`. Change the method or the number of groups
and it re-splits; pick a source and a group and press **Move**; **Drop** leaves a source out,
**Down-weight** scales its token count (and so its merge weight); a box or lasso selection on
the scatter moves the selected sources to the chosen group; **Undo** steps back. The table below
the buttons shows each group's size, cohesion (mean cosine inside), conflict (mean cosine with
the other groups) and predicted merge gain. **Save** writes `partition.json` with the edit log.""",
    ),
    (
        "code",
        """bank = GradientBank.load(run.gradients)
editor = PartitionEditor(space, table, rows=bank, path=run.partition)
editor.widget""",
    ),
    (
        "md",
        """The same edits from Python: move the first source to the next group, read the new
statistics, then undo (the buttons call exactly these methods).""",
    ),
    (
        "code",
        """source = editor.partition.groups[0][0]
editor.move(source, 1)
display(HTML(editor.status.value))
editor.stats""",
    ),
    (
        "code",
        """editor.undo()
editor.summary""",
    ),
    (
        "md",
        """## 5 · Save

Press **Save** above (or call `editor.save()`). The file on disk is what the branches train:
reload it to see the groups and the edit log, with who changed what and when.""",
    ),
    (
        "code",
        """saved = Partition.load(run.partition)
print(f"K = {saved.k}, weights {[round(w, 3) for w in saved.weights]}")
saved.edit_log""",
    ),
]
