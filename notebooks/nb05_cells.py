"""Cells of notebook 05, the paper figures (imported by build_notebooks.py)."""

from __future__ import annotations

__all__ = ["NB05"]

# The same parameters cell opening as build_notebooks.SETUP.
SETUP = """import os
from pathlib import Path

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
SMOKE = os.environ.get("MERIT_SMOKE") == "1"  # tests set this: tiny settings, same code path
OUTPUT_DIR = os.environ.get("MERIT_OUTPUT_DIR", str(ROOT / "runs"))"""

NB05 = [
    (
        "md",
        """# 05 · Paper figures

`write_figures` exports every figure a run has, in one style made for print: one font, white
background, the colour-blind-safe palette (a stable colour per group and per model), sized for
one column (3.5 in) or the full page width, as HTML (interactive), PNG (about 300 dpi) and SVG.
Which figures depends on how far the run went: the conflict figures after the analysis stages,
the comparison bars and training curves after `make demo` or notebook 02, the diagnostics
figures after the diagnostics stage, the calibration check after notebook 04.

From a shell: `merit-lab figures runs/demo --out figures/`.""",
    ),
    (
        "code",
        """from IPython.display import Image

from merit_lab.config.schema import load_config
from merit_lab.pipeline import run_pipeline, stage_status
from merit_lab.pipeline.figures import PAPER, collect_figures, write_figures""",
    ),
    (
        "md",
        "**Parameters.** `MERIT_SMOKE=1` uses a small calibration set, writes under the test's "
        "output folder and skips SVG; otherwise the demo run and `figures/` at the repository "
        "root.",
    ),
    (
        "code",
        SETUP
        + """
overrides = {"output_dir": OUTPUT_DIR}
FIG_DIR, FORMATS = ROOT / "figures", ("html", "png", "svg")
if SMOKE:
    overrides |= {"name": "nb05-smoke", "calibration": {"n": 8, "micro_batch_size": 8}}
    FIG_DIR, FORMATS = Path(OUTPUT_DIR) / "figures", ("html", "png")
cfg = load_config(ROOT / "configs" / "demo.yaml", **overrides)""",
    ),
    (
        "md",
        """## 1 · The run

At least the analysis stages (skipped when already done); a run that went further simply has
more figures.""",
    ),
    (
        "code",
        """run = run_pipeline(cfg, until="partition")
stage_status(run.root)""",
    ),
    (
        "md",
        """## 2 · The style

Set in one place, `PaperStyle`: pass `style=PaperStyle(font_size=12, show_title=True)` (or any
other field) to `write_figures` to change every figure at once. Titles are left to the paper's
captions; `captions.md` lists each figure's title to start them from.""",
    ),
    ("code", "PAPER"),
    (
        "md",
        """## 3 · Export

Without a static renderer (kaleido and a Chromium) the PNG/SVG files are skipped with a message
saying what to install; the HTML files are written either way.""",
    ),
    (
        "code",
        """written = write_figures(run.root, FIG_DIR, formats=FORMATS)
sorted(p.name for p in written)""",
    ),
    (
        "md",
        "A PNG as it will print (the interactive figure when no PNG could be made):",
    ),
    (
        "code",
        """png = FIG_DIR / "conflict_scatter.png"
interactive = collect_figures(run.root)["conflict_scatter"]
Image(png, width=PAPER.column_width) if png.exists() else interactive""",
    ),
    (
        "md",
        """In LaTeX, one column:

```latex
\\includegraphics[width=\\columnwidth]{figures/conflict_scatter.png}
```

(or the SVG converted to PDF). The `conflict_clustermap`, `conflict_heatmap`, 3-D scatter and
`compare_*` figures are sized for a `figure*` across both columns.""",
    ),
    ("code", 'print((FIG_DIR / "captions.md").read_text())'),
]
