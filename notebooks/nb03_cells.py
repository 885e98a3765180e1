"""Cells of ``03_diagnostics.ipynb`` (imported by build_notebooks.py, which writes the notebook)."""

from __future__ import annotations

__all__ = ["NB03"]

# The same parameters preamble as build_notebooks.SETUP (repeated: that module imports this one).
SETUP = """import os
from pathlib import Path

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
SMOKE = os.environ.get("MERIT_SMOKE") == "1"  # tests set this: tiny settings, same code path
OUTPUT_DIR = os.environ.get("MERIT_OUTPUT_DIR", str(ROOT / "runs"))"""

NB03 = [
    (
        "md",
        """# 03 · Is θ0 merge-ready? The diagnostics, and the theory measured

MERIT's one-shot merge rests on one assumption: θ0 sits in a *merge-ready flat basin*, where
the loss is close to a quadratic bowl and every branch stays in it. Then averaging the branches
gains exactly the curvature-weighted spread of the checkpoints,

G = Σ_i w_i L(θ_i) − L(θ̄) = ½ Σ_ℓ λ_ℓ Var_w(u_ℓᵀ δ_i) ≥ 0,  δ_i = θ_i − θ0,

and a split along the top PCA axes of the source gradients makes that spread large. The paper
checks the assumption four ways: (a) no loss barrier along straight lines between branches,
(b) the merged model lies 2.4–2.9× closer to θ0 than the joint model, (c) a higher train loss
but a lower held-out loss, (d) a smaller loss increase under Gaussian weight noise.

This notebook measures all four on a finished run, then the theory itself: the Hessian's top
eigenpairs at θ0, the measured gain against its quadratic prediction, and the gain *predicted
before training* from the gradient bank for MERIT, random and k-means splits against the gain
measured after. Whatever the numbers say is what the report says: on the tiny demo model some
of the paper's findings may not reproduce.""",
    ),
    (
        "code",
        """from IPython.display import Markdown

from merit_lab.config.schema import load_config
from merit_lab.pipeline import run_pipeline, run_summary
from merit_lab.pipeline.diagnose import (
    diagnostics_figures,
    diagnostics_section,
    diagnostics_tables,
    run_diagnostics,
)""",
    ),
    (
        "md",
        "**Parameters.** Without `MERIT_SMOKE` this reads `runs/demo` (run `make demo` first, "
        "else the cell below trains it, ~10 min on a CPU) and diagnoses MERIT-1D, MERIT-2D and "
        "the random K=4 split. `MERIT_SMOKE=1` makes its own tiny run (5% of an epoch, one "
        "split) and shrinks every diagnostic so the tests run this notebook in about a minute.",
    ),
    (
        "code",
        SETUP
        + """
CONFIG = ROOT / "configs" / "demo.yaml"
if SMOKE:
    cfg = load_config(
        CONFIG,
        output_dir=OUTPUT_DIR,
        name="diag-smoke",
        calibration={"n": 16},
        train={"batch_size": 8},
        experiments=[
            {"name": "joint-1ep", "kind": "joint", "epochs": 0.05},
            {"name": "merit-1d", "method": "balanced", "r": 1, "epochs": 0.05},
        ],
        eval={"max_examples": 2, "exact_match": False},
    )
    SETTINGS = {
        "max_examples": 2,
        "alphas": 5,
        "sigmas": (0.0, 1e-2),
        "seeds": (0, 1),
        "hessian_k": 4,
        "hessian_iter": 8,
        "curvature_examples": 1,
    }
else:
    cfg = load_config(CONFIG, output_dir=OUTPUT_DIR)
    SETTINGS = {
        "experiments": ["merit-1d", "merit-2d", "random-k4"],
        "max_examples": 4,
        "alphas": 7,
        "curvature_examples": 2,
    }
SETTINGS""",
    ),
    (
        "md",
        """## 1 · A finished run

The diagnostics need the trained branches, the joint baselines and the merges. Stages already
done are skipped, so on a finished run this is instant.""",
    ),
    (
        "code",
        """run = run_pipeline(cfg, until="evaluate")
print(run_summary(run.root))""",
    ),
    (
        "md",
        """## 2 · Run the diagnostics

One model is loaded once and every checkpoint is written into it in place. Each result lands in
`runs/<name>/diagnostics/<what>.json` with a key over its inputs and settings: re-running this
cell skips what is current; changing one setting redoes only the files it affects.""",
    ),
    (
        "code",
        """results = run_diagnostics(run.root, **SETTINGS)
tables = diagnostics_tables(run.root)
figures = diagnostics_figures(run.root)
{name: round(r["seconds"], 1) for name, r in results.items()}""",
    ),
    (
        "md",
        """## 3 · (a) Loss along straight lines

For every pair of branches, each branch → the merge, θ0 → the merge and the 1-epoch joint model
→ the merge: the loss at (1−α)θ_a + αθ_b and its chord (dotted). The barrier is the largest rise
above the chord; 0 means the whole segment lies in one basin.""",
    ),
    ("code", 'tables["barriers"]'),
    ("code", 'figures[next(k for k in figures if k.startswith("diag_paths_"))]'),
    (
        "md",
        """## 4 · (b, c) Distance to θ0, train vs held-out loss

The merge averages displacements, so it sits closer to θ0 than its branches (the norm
inequality, section 7). The table is the paper's ablation layout: one row per joint model
against each merge.""",
    ),
    ("code", 'figures["diag_displacement"]'),
    ("code", 'tables["ablation"]'),
    ("code", 'tables["losses"]'),
    (
        "md",
        """## 5 · (d) Flatness under Gaussian weight noise

Mean train-loss increase over the noise draws; the same seeds for every model, so the
comparison is paired.""",
    ),
    ("code", 'figures["diag_perturbation"]'),
    ("code", 'tables["perturbation"]'),
    (
        "md",
        """## 6 · Curvature at θ0

The top Hessian eigenpairs of the calibration loss (Lanczos on Hessian-vector products). The
eigenvectors are kept in `diagnostics/curvature.safetensors` for the next step.""",
    ),
    ("code", 'tables["curvature"]'),
    (
        "md",
        """## 7 · The merging gain: measured vs predicted

- *measured*: G = Σ w_i L(θ_i) − L(θ̄) with the token weights of the merge;
- *quadratic prediction*: ½ Σ_ℓ λ_ℓ Var_w(u_ℓᵀδ_i) over the top eigenvectors only, and the share
  of the branches' spread those directions hold;
- *predicted before training*: ½ Σ_k w_k ‖ḡ_k − ḡ‖² from the gradient bank (H = I), the score
  MERIT's split maximises; compare its order across splits with the measured order.""",
    ),
    ("code", 'tables["gain"]'),
    ("code", 'figures[next(k for k in figures if k.startswith("diag_spectral_"))]'),
    (
        "md",
        """## 8 · The report section

The same tables with the facts read off the numbers, as `report.md` shows them.""",
    ),
    ("code", 'Markdown("\\n".join(diagnostics_section(run.root, image_formats=())))'),
]
