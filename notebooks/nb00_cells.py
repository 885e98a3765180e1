"""Cells of notebook 00, the quickstart (imported by build_notebooks.py)."""

from __future__ import annotations

__all__ = ["NB00"]

# The same parameters cell opening as build_notebooks.SETUP.
SETUP = """import os
from pathlib import Path

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
SMOKE = os.environ.get("MERIT_SMOKE") == "1"  # tests set this: tiny settings, same code path
OUTPUT_DIR = os.environ.get("MERIT_OUTPUT_DIR", str(ROOT / "runs"))"""

NB00 = [
    (
        "md",
        """# 00 · Quickstart

MERIT fine-tunes a base model θ0 on an instruction mixture in three moves:

1. **measure conflicts**: one gradient per source at θ0 and their cosines, before any training;
2. **split** the sources into K groups along the main axes of conflict, balanced in size;
3. **train one branch per group** from θ0, independently, then **merge them once** by
   token-weighted averaging.

This notebook does moves 1 and 2 on the bundled demo mixture (32 small synthetic sources, a
tiny base model, a few minutes on a laptop CPU).""",
    ),
    (
        "code",
        """from merit_lab.config.schema import load_config
from merit_lab.analysis.conflict import ConflictSpace
from merit_lab.pipeline import load_source_table, run_pipeline, run_summary
from merit_lab.viz.plots import plot_conflict_scatter""",
    ),
    (
        "md",
        "**Parameters.** `MERIT_SMOKE=1` shrinks the calibration sample (the tests use it); "
        "otherwise 200 examples per source, as in the paper.",
    ),
    (
        "code",
        SETUP
        + """
overrides = {"output_dir": OUTPUT_DIR}
if SMOKE:
    overrides |= {"name": "nb00-smoke", "calibration": {"n": 8, "micro_batch_size": 8}}
cfg = load_config(ROOT / "configs" / "demo.yaml", **overrides)""",
    ),
    (
        "md",
        """## Gradients, conflict space, partition

One call runs the stages into `runs/<name>/` (the same as `merit-lab run configs/demo.yaml
--until partition` in a shell); finished stages are skipped when you run it again.""",
    ),
    (
        "code",
        """run = run_pipeline(cfg, until="partition")
print(run_summary(run.root))""",
    ),
    (
        "md",
        """## The conflict space

Each point is a source, placed by the PCA of the normalised gradients: sources far apart pull
θ0 in different directions. Colours are the groups of the balanced split (K = 2^r with r = 2);
hover a point for its metadata.""",
    ),
    (
        "code",
        """space = ConflictSpace.load(run.conflict)
table = load_source_table(run.root)
plot_conflict_scatter(space, table, color="group")""",
    ),
    (
        "md",
        """## Next

- **01 · conflict space**: the same stages step by step, the clustered conflict matrix, and a
  check against the conflicts planted in the demo.
- **02 · branches and merge**: train one branch per group, merge once, compare with joint
  training on the same tokens (`make demo` runs it all from a shell).
- **03**: the notebook after the merge (merge-readiness diagnostics).
- **04 · curation workbench**: explore conflicts interactively and edit the partition by hand.
- **05 · paper figures**: every figure of a run, exported for a paper.""",
    ),
]
