"""Cells of ``07_short_answer_collapse.ipynb`` (imported by build_notebooks.py)."""

from __future__ import annotations

__all__ = ["NB07"]

# The same parameters preamble as build_notebooks.SETUP (repeated: that module imports this one).
SETUP = """import os
from pathlib import Path

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
SMOKE = os.environ.get("MERIT_SMOKE") == "1"  # tests set this: tiny settings, same code path
OUTPUT_DIR = os.environ.get("MERIT_OUTPUT_DIR", str(ROOT / "runs"))"""

NB07 = [
    (
        "md",
        """# 07 · Short-answer collapse: does a one-shot merge keep the minority style?

The paper's largest gains are on free-form answers. On LLaVA-W, joint training on Vision-FLAN
plus conversation data falls to 41.9 while MERIT-3D keeps 52.0, against the base's 53.2 (at
7B: joint 67.1 → 50.2, MERIT 66.2). The proposed mechanism: trained together with many
short-answer tasks, a model starts answering conversational prompts tersely too, although the
prompts differ. MERIT trains the styles in separate branches from a merge-ready base and merges
once, which is meant to keep the minority style.

This notebook tests that mechanism at toy scale on `data/demo-collapse`: 8 one-word task
sources and 3 conversational ones with 16× fewer training examples each, from a θ0 that already
answers both styles. It asks four questions, and prints whatever the numbers say:

1. Does the conflict space separate the two styles?
2. Does joint training collapse the conversational style?
3. Does the merge keep it?
4. What do the diagnostics say about why?

Every row is trained under several seeds: a difference smaller than the spread over seeds is
called so.""",
    ),
    (
        "code",
        """import pandas as pd
from IPython.display import Markdown

from merit_lab.config.schema import load_config
from merit_lab.pipeline import load_source_table, run_pipeline, run_summary
from merit_lab.pipeline.experiments import model_rows
from merit_lab.pipeline.report_seeds import family_style, noise_calls, seed_tables
from merit_lab.viz.plots import plot_comparison, plot_conflict_scatter""",
    ),
    (
        "md",
        "**Parameters.** Without `MERIT_SMOKE` this runs `configs/demo-collapse.yaml` (every "
        "row under 3 seeds; see the README for its wall time on 2 CPU cores; stages already "
        "done are skipped). `MERIT_SMOKE=1` makes a tiny run with the same code path (a tenth "
        "of an epoch, two rows, two seeds) so the tests execute this notebook quickly.",
    ),
    (
        "code",
        SETUP
        + """
CONFIG = ROOT / "configs" / "demo-collapse.yaml"
DATA = ROOT / "data" / "demo-collapse"
paths = {"model": str(DATA / "base"), "mixture": str(DATA)}
if SMOKE:
    cfg = load_config(
        CONFIG,
        output_dir=OUTPUT_DIR,
        name="collapse-smoke",
        calibration={"n": 8, "micro_batch_size": 8},
        train={"batch_size": 16, "seeds": [1]},
        experiments=[
            {"name": "joint-1ep", "kind": "joint", "epochs": 0.1},
            {"name": "merit-1d", "method": "balanced", "r": 1, "epochs": 0.1},
        ],
        eval={"max_examples": 2, "max_new_tokens": 40},
        diagnostics={
            "experiments": ["merit-1d"],
            "max_examples": 1,
            "alphas": 3,
            "sigmas": [0.0, 0.01],
            "seeds": [0],
            "hessian_k": 2,
            "hessian_iter": 4,
            "curvature_examples": 1,
        },
        **paths,
    )
else:
    cfg = load_config(CONFIG, output_dir=OUTPUT_DIR, **paths)
cfg.name, cfg.train.seed, cfg.train.seeds""",
    ),
    (
        "md",
        """## 1 · The mixture and its conflict space

`style` is the ground truth from `data/demo-collapse/sources.json`. The imbalance is in the
train split only; every source has the same number of calibration examples, so the conflict
space weighs both styles alike.""",
    ),
    (
        "code",
        """run = run_pipeline(cfg, until="partition")
sources = load_source_table(run.root)
sources[["style", "task", "examples", "tokens", "group"]]""",
    ),
    (
        "code",
        """space = run.load_space()
plot_conflict_scatter(space, sources, color="style")""",
    ),
    (
        "code",
        """names = list(space.names)
scores = pd.DataFrame(space.embedding[:, :3], index=names, columns=["PC1", "PC2", "PC3"])
by_style = sources.loc[names, "style"]
for pc in scores:
    long, short = scores.loc[by_style == "long", pc], scores.loc[by_style == "short", pc]
    apart = long.min() > short.max() or long.max() < short.min()
    print(
        f"{pc}: long {long.min():+.2f}..{long.max():+.2f}, short "
        f"{short.min():+.2f}..{short.max():+.2f}; separates the styles: {apart}"
    )""",
    ),
    (
        "md",
        """## 2 · Train every row under every seed, merge, evaluate

Joint rows train every source together; split rows train each group of the partition from θ0
and merge once by token weights. Seeds change the data order of every run; the partition is
the same for all seeds of a row.""",
    ),
    (
        "code",
        """run = run_pipeline(cfg, until="evaluate")
table = pd.read_parquet(run.eval)
rows = model_rows(cfg)
print(run_summary(run.root))""",
    ),
    (
        "md",
        """## 3 · Did joint training collapse the conversational style, and did the merge keep it?

`in_style`: the share of greedy answers whose length is within 2× of the reference's;
`length_ratio`: answer over reference length (under 1 is the collapse direction). Mean over
seeds, with the standard deviation.""",
    ),
    (
        "code",
        """long_style = family_style(table, rows, "long")
long_style.round(3)""",
    ),
    (
        "code",
        """mean, std, n = seed_tables(table, rows, "in_style")
plot_comparison(mean, metric="in_style", spread=std)""",
    ),
    (
        "code",
        """reference = next(r.base for r in rows if r.kind == "joint")
calls = noise_calls(
    long_style["in_style"], long_style["in_style std"].fillna(0), reference, higher=True
)
pd.DataFrame(calls, columns=["row", "difference (points)", "pooled spread", "verdict"])""",
    ),
    (
        "md",
        """And the short-answer sources, where the fine-tuning data mostly is: a merge that keeps
the conversational style but learns the short tasks less would show here.""",
    ),
    (
        "code",
        """family_style(table, rows, "short").round(3)""",
    ),
    (
        "md",
        """## 4 · Why: displacement, barriers and the predicted gain

The diagnostics probe the config's own seed: how far each model moved from θ0, whether the
path between the branches crosses a barrier, and the merging gain predicted from the gradient
bank against the gain measured.""",
    ),
    (
        "code",
        """run = run_pipeline(cfg)
report = run.report.read_text()
Markdown(report.split("## Training seeds", 1)[-1].split("\\n## ", 1)[0][:4000])""",
    ),
    (
        "code",
        """from merit_lab.pipeline.diagnose import diagnostics_tables

tables = diagnostics_tables(run.root)
{k: v.round(4) for k, v in tables.items() if k in ("displacement", "barriers", "gain")}""",
    ),
    (
        "md",
        """The README's demo section reports this run's table as it came out and how it compares
with the paper's direction; `runs/demo-collapse/report.md` has every table and figure.""",
    ),
]
