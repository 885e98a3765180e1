"""Writes the tutorial notebooks from their cell lists (outputs stripped). Run after editing.

Keeping the cells here as plain strings makes them lintable and reviewable in diffs;
`python notebooks/build_notebooks.py` rewrites every .ipynb.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # the nbXX_cells modules beside this file, however it is loaded

from nb00_cells import NB00  # noqa: E402
from nb03_cells import NB03  # noqa: E402
from nb04_cells import NB04  # noqa: E402
from nb05_cells import NB05  # noqa: E402
from nb06_cells import NB06  # noqa: E402
from nb07_cells import NB07  # noqa: E402

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
        """from merit_lab.config.schema import load_config
from merit_lab.analysis.conflict import ConflictSpace
from merit_lab.io import read_json
from merit_lab.pipeline import load_source_table, run_pipeline, run_summary
from merit_lab.viz.plots import (
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

NB02 = [
    (
        "md",
        """# 02 · Branches and the one-shot merge

With the partition from notebook 01, MERIT trains one **branch** per group, each from θ0 on its
own sources only, with no communication between branches, then merges them **once** by
token-weighted averaging, w_k = N_k / Σ_j N_j. This notebook walks through that:

1. build the branch specs (`spec.json`: base model, sources, token budget, shared
   hyperparameters) from the partition, together with the baselines on the same token budget;
2. launch them (here in-process; the same specs run as local subprocesses or SLURM jobs);
3. watch their progress and loss curves;
4. merge each split into a normal Hugging Face folder;
5. evaluate every model on the same held-out examples and compare, paper-style.

Everything lives in the run directory, so each step resumes where it stopped.""",
    ),
    (
        "code",
        """from IPython.display import Markdown

from merit_lab.config.schema import load_config
from merit_lab.evaluation.evaluate import summarize_eval
from merit_lab.io import read_json
from merit_lab.partition.plan import Partition
from merit_lab.pipeline import run_pipeline
from merit_lab.pipeline.experiments import (
    evaluate_rows,
    merge_rows,
    plan_specs,
    train_experiments,
)
from merit_lab.pipeline.report import training_logs
from merit_lab.pipeline.status import token_budget, training_status
from merit_lab.viz.plots import plot_comparison, plot_training_curves""",
    ),
    (
        "md",
        "**Parameters.** `MERIT_SMOKE=1` trains on 5% of each source with two rows, so the "
        "tests run this notebook in about a minute; otherwise it is the quick demo's config.",
    ),
    (
        "code",
        SETUP
        + """
CONFIG = ROOT / "configs" / "demo.yaml"
overrides = {"output_dir": OUTPUT_DIR}
if SMOKE:
    overrides |= {
        "name": "nb02-smoke",
        "calibration": {"n": 16, "micro_batch_size": 16},
        "train": {"batch_size": 8},
        "experiments": [
            {"name": "joint-1ep", "kind": "joint", "epochs": 0.05},
            {"name": "merit-2d", "epochs": 0.05, "merges": ["linear", "ties"]},
        ],
        "eval": {"max_examples": 2, "max_new_tokens": 8, "splits": ["eval"]},
    }
cfg = load_config(CONFIG, **overrides)
[(e.name, e.kind, e.epochs) for e in cfg.experiments]""",
    ),
    (
        "md",
        """## 1 · The partition

The analysis stages of notebook 01 (they are skipped when already done). `partition.json` is
the grouping an experiment with no `method` trains: edit it by hand and the branches follow.""",
    ),
    (
        "code",
        """run = run_pipeline(cfg, until="partition")
part = Partition.load(run.partition)
for k, (group, w) in enumerate(zip(part.groups, part.weights, strict=True)):
    print(f"group {k}: weight {w:.3f}, {len(group)} sources: {', '.join(group[:4])}, ...")""",
    ),
    (
        "md",
        """## 2 · Branch specs

One `spec.json` per branch and baseline. Every spec shares the hyperparameters, seed and data
order; only the sources differ. A joint run on every source for one epoch trains on exactly the
tokens that all branches of a split train on together.""",
    ),
    (
        "code",
        """specs = plan_specs(cfg)
first = specs[next(e.name for e in cfg.experiments if e.kind == "split")][0]
{k: v for k, v in first.to_dict().items() if k != "mixture"}""",
    ),
    ("code", "training_status(cfg)"),
    (
        "md",
        """## 3 · Launch

`train_experiments` uses the config's launcher: `sequential` (in this process), `local`
(subprocesses: one per GPU, or `n_procs` on the CPU) or `slurm` (submitit). Any branch can also
run alone from a shell: `merit-lab train-branch runs/<name>/branches/<experiment>/<k>/spec.json`.
Finished branches are skipped and a killed one resumes from its last checkpoint.""",
    ),
    ("code", "finals = train_experiments(cfg)"),
    (
        "md",
        "From any other kernel or a shell, `training_status(cfg)` polls the same folders while "
        "a launch is running.",
    ),
    ("code", "training_status(cfg)"),
    ("code", "plot_training_curves(training_logs(run.root))"),
    (
        "md",
        """## 4 · Merge once

Each split becomes one Hugging Face folder under `merged/`, streamed one tensor at a time. The
linear weights are the branches' trained tokens, which equal the partition's token weights.
`merge_manifest.json` records the inputs' sha256 and `mergekit.yaml` reproduces the merge with
mergekit.""",
    ),
    ("code", "merge_rows(cfg)"),
    (
        "code",
        """manifest = read_json(run.root / "merged" / "merit-2d" / "merge_manifest.json")
print("merge weights:    ", [round(w, 4) for w in manifest["weights"]])
print("partition weights:", [round(w, 4) for w in part.weights])
token_budget(cfg)""",
    ),
    (
        "md",
        """## 5 · Compare

Every model (θ0, the baselines and the merges) is scored on the same held-out examples.
Held-out loss is in nats per response token; exact match and character similarity in %.""",
    ),
    (
        "code",
        """table = evaluate_rows(cfg)
order = list(dict.fromkeys(table["model"]))
loss = summarize_eval(table, metric="loss", order=order)
loss""",
    ),
    ("code", 'plot_comparison(loss, metric="loss")'),
    ("code", 'summarize_eval(table, metric="exact_match", order=order)'),
    (
        "md",
        "## 6 · The report\n\n`report.md` gathers these tables and the figures (the same "
        "stage `make demo` ends with).",
    ),
    (
        "code",
        """run = run_pipeline(cfg, ["report"])
Markdown(run.report.read_text())""",
    ),
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


NOTEBOOKS = {
    "00_quickstart": NB00,
    "01_conflict_space": NB01,
    "02_branches_and_merge": NB02,
    "03_diagnostics": NB03,
    "04_curation_workbench": NB04,
    "05_paper_figures": NB05,
    "06_image_text": NB06,
    "07_short_answer_collapse": NB07,
}

if __name__ == "__main__":
    for name, spec in NOTEBOOKS.items():
        print("wrote", build(name, spec))
