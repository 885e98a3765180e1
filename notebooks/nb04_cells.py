"""Cells of notebook 04, the curation workbench (imported by build_notebooks.py).

The browser test (tests/test_browser.py) runs every cell in JupyterLab, then moves, drops and
down-weights sources with the editor's dropdowns and buttons: keep one editor, shown once, and
leave ``partition.json`` unsaved until the browser presses "Save".
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
3. **edit** the partition from a script: drop a source, keep only part of another, move a
   third, undo;
4. **edit** it again with buttons, and save `partition.json` with a log of every edit; the
   branches of notebook 02 train whatever it says.

Steps 3 and 4 drive the same object, an `EditSession`: the buttons only call its methods, so
anything you click can also be written down, replayed and tested without a browser.""",
    ),
    (
        "code",
        """from IPython.display import HTML, display

from merit_lab.config.schema import load_config
from merit_lab.analysis.convergence import gradient_convergence
from merit_lab.analysis.examples import pair_contributions
from merit_lab.models.loading import load_model, load_tokenizer, resolve_model_path
from merit_lab.partition.plan import Partition
from merit_lab.pipeline import (
    load_run_mixture,
    load_source_table,
    run_pipeline,
    save_convergence,
)
from merit_lab.pipeline.examples import (
    compute_example_sketches,
    compute_split_stability,
    load_example_session,
    load_example_table,
)
from merit_lab.partition.stability import describe_stability
from merit_lab.viz.editor import PartitionEditor
from merit_lab.viz.explorer import ConflictExplorer
from merit_lab.viz.plots import plot_gradient_convergence
from merit_lab.viz.plots_examples import plot_pair_contributions
from merit_lab.viz.plots_stability import plot_coassignment""",
    ),
    (
        "md",
        "**Parameters.** `MERIT_SMOKE=1` shrinks the calibration set and the convergence check "
        "so the tests run this notebook in about a minute; otherwise it is the demo config. "
        "`FRACTION` is the share of a source's examples the scripted down-weight keeps.",
    ),
    (
        "code",
        SETUP
        + """
CONFIG = ROOT / "configs" / "demo.yaml"
overrides = {"output_dir": OUTPUT_DIR}
NS, N_BOOT = (10, 20, 40, 80, 160, 200), 20  # calibration sizes to check, bootstrap samples
FRACTION = 0.5
N_STABILITY = 200  # bootstrap redraws of the calibration examples for the split's stability
if SMOKE:
    overrides |= {"name": "nb04-smoke", "calibration": {"n": 8, "micro_batch_size": 8}}
    NS, N_BOOT, N_STABILITY = (2, 4, 8), 5, 20
cfg = load_config(CONFIG, **overrides)
cfg.name, cfg.calibration.n""",
    ),
    (
        "md",
        """## 1 · The run

The analysis stages (mixture → gradients → conflict → partition), skipped when already done.
A partition that carries hand edits is never overwritten by a re-run. `load_edit_session`
opens the run's `partition.json` for editing, together with everything an edit needs: the
conflict space of every source, the tokens of each train example and the run's seed;
`load_example_session` adds the id of each train example, so the session can drop single
examples too.""",
    ),
    (
        "code",
        """run = run_pipeline(cfg, until="partition")
session = load_example_session(run.root)
space = session.space
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
save_convergence(run.root, convergence)  # atomic, under the run lock
plot_gradient_convergence(convergence)""",
    ),
    (
        "md",
        """## 3b · The examples inside the conflict space

One gradient per calibration example (one backward each: on the demo, 32 × 200 of them, about
ten minutes on two CPU cores; `merit-lab examples runs/<name>` does the same from a shell),
projected with the sources' own centring and PCA basis. A source's examples scatter around its
point: pick a source under **examples of** in the explorer above, or read the figure below
(hover an example for its text). A cross marks an outlier: an example whose cosine to its own
source's gradient is far below the source's others (modified z-score below −3.5).""",
    ),
    (
        "code",
        """examples = compute_example_sketches(run.root, progress=not SMOKE)
example_table = load_example_table(run.root)
explorer.set_examples(example_table)
explorer.example_cloud(FIRST)""",
    ),
    (
        "md",
        """**Which examples pull against a conflict?** A source's gradient is the token-weighted
mean of its examples' gradients, so the cosine of two sources is a sum with one share per
example of the first. The most negative shares are the examples of the first source that pull
against the second; the list sums exactly to the cosine.""",
    ),
    (
        "code",
        """RIVAL = conflicts.loc[0, "source"]
contrib = pair_contributions(examples, FIRST, RIVAL)
print(
    f"cos = {space.cosine[space.index(FIRST), space.index(RIVAL)]:+.4f}, "
    f"sum of shares = {contrib['share'].sum():+.4f}"
)
plot_pair_contributions(contrib, FIRST, RIVAL, top=8)""",
    ),
    (
        "md",
        """## 3c · How much to trust the split

Redraw each source's calibration examples with replacement, recompute the source gradients,
the cosines, the PCA and the balanced split, many times: the spread of each cosine, how often
the split comes out the same (adjusted Rand index to the reported split; below 0.8 at the
median it is called unstable) and which sources share a group how often. The recommended n is
the smallest calibration size whose bootstrap gradient reaches cosine 0.95 with the
all-example gradient for every source.""",
    ),
    (
        "code",
        """stability = compute_split_stability(run.root, rs=(1, 2), n_boot=N_STABILITY)
for line in describe_stability(stability, cfg.partition.r):
    print(line)
plot_coassignment(stability, cfg.partition.r)""",
    ),
    (
        "md",
        """## 4 · Edit the partition from a script

Three hand edits, each a method of the session that returns one line saying what it did:

- **drop** a source: it leaves the mixture, and no row (joint baseline, soup or split) trains
  it;
- **down-weight** a source to a fraction f: every row trains the same seeded f of its examples,
  and the merge weights follow the tokens actually trained;
- **move** a source to another group;
- **drop examples** of a source, by id: no row trains them, and its counts and weight follow.
  Where the calibration examples are drawn from the train split (a folder of one file per
  source), these are the two examples of the last source of G1 that point least with their
  own source; the demo keeps its calibration examples in a split of their own, which no row
  trains, so here the script drops that source's first two train examples instead.""",
    ),
    (
        "code",
        """G0, G1 = session.partition.groups[0], session.partition.groups[1]
print(session.drop(G0[-1]))
print(session.downweight(G0[0], FRACTION))
print(session.move(G1[0], 0))
odd = example_table[example_table["source"] == G1[-1]].nsmallest(2, "own_cosine")["id"]
trained = [i for i in odd if i in session.train_ids[G1[-1]]] or session.train_ids[G1[-1]][:2]
print(session.drop_examples(G1[-1], trained))
session.stats()""",
    ),
    (
        "md",
        """The partition now records the curation itself, so every later stage can read it: the
dropped sources, the fraction of each down-weighted one, and the merge weights
w_k = N_k / Σ_j N_j recomputed from the tokens each group still trains.""",
    ),
    (
        "code",
        """edited = session.partition
print("dropped:      ", edited.dropped)
print("fractions:    ", dict(edited.fractions))
print("merge weights:", [round(w, 3) for w in edited.weights])
print("examples left out:", dict(edited.excluded))
[(e["op"], e["source"]) for e in edited.edit_log]""",
    ),
    (
        "md",
        """An edit that would break the partition is refused with a `ValueError` that says why, and
nothing changes: here a fraction above 1, and a move to a group that does not exist.""",
    ),
    (
        "code",
        """K = session.partition.k
for edit, args in [(session.downweight, (G0[0], 1.5)), (session.move, (G1[1], K))]:
    try:
        edit(*args)
    except ValueError as refusal:
        print("refused:", refusal)
session.partition is edited""",
    ),
    (
        "md",
        """Nothing is on disk yet: `session.save()` would write `partition.json`. This tutorial
undoes its three edits instead, one step at a time, and hands the session to the editor.""",
    ),
    (
        "code",
        """while session.history:
    print(session.undo())
session.partition.groups == Partition.load(run.partition).groups""",
    ),
    (
        "md",
        """## 5 · Edit with the widget

The editor is a view of the same session. Change the method or the number of groups and it
re-splits; pick a source and a group and press **Move**; **Drop** leaves a source out;
**Down-weight** keeps the `fraction` of its examples (a hollow marker on the scatter; dropped
sources are grey crosses); **Add** puts back a dropped source, or places one added to the
mixture after the split, in the group its gradient is nearest to; a box or lasso selection on
the scatter moves the selected sources to the chosen group; **Undo** steps back. A refused edit
says why in red and changes nothing. The table below the buttons shows each group's size, token
weight, cohesion (mean cosine inside) and conflict (mean cosine with the other groups), and the
predicted merge gain when the session holds the gradients. **Drop examples** leaves out the
ids typed beside it (of the selected source). Under the status line: the split's stability
from 3c, with a warning in red when the split is unstable. **Save** writes `partition.json`
with the edit log.""",
    ),
    (
        "code",
        """editor = PartitionEditor(session, table, stability=stability)
editor.widget""",
    ),
    (
        "md",
        """The buttons call these methods; each returns whether the edit was applied and shows its
message under the buttons. Move the first source to the next group, read the status, undo:""",
    ),
    (
        "code",
        """source = editor.partition.groups[0][0]
editor.move(source, 1)
display(HTML(editor.status.value))
editor.undo()
editor.summary""",
    ),
    (
        "md",
        """## 6 · Save

Press **Save** above (or call `editor.save()`). The file on disk is what the branches train:
reload it to see the groups, the curation and the edit log, with who changed what and when.""",
    ),
    (
        "code",
        """saved = Partition.load(run.partition)
print(f"K = {saved.k}, weights {[round(w, 3) for w in saved.weights]}")
print(f"dropped {list(saved.dropped)}, fractions {dict(saved.fractions)}")
saved.edit_log""",
    ),
]
