"""Where a run's rows stand: training progress per branch and the token budget per row.

Read-only views over the folders `merit_lab.pipeline.rows` plans; the runner polls the
first, the report and notebooks show the second (the same-budget check).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from merit_lab.config.schema import RunConfig
from merit_lab.io import read_json
from merit_lab.pipeline.rows import THETA0, model_rows, plan_specs
from merit_lab.pipeline.rundir import SIZE_UNIT, RunDir, run_config
from merit_lab.training.branch_log import MANIFEST, branch_status

__all__ = ["token_budget", "training_status"]


def training_status(cfg: RunConfig | RunDir | str | Path) -> pd.DataFrame:
    """One row per branch/joint run: experiment, state, step, total steps, loss, tokens
    (``cfg``: a config, or a run folder: `run_config`)."""
    cfg = run_config(cfg)
    rows = []
    for exp, specs in plan_specs(cfg).items():
        for s in specs:
            rows.append({"experiment": exp, "branch": s.name, **branch_status(s.output_dir)})
    return pd.DataFrame(rows)


def token_budget(cfg: RunConfig | RunDir | str | Path) -> pd.DataFrame:
    """Per row: branches, trained response tokens (`SIZE_UNIT`) in total and per branch (the
    same-budget check; ``cfg``: a config, or a run folder: `run_config`)."""
    cfg = run_config(cfg)
    rows = []
    for row in model_rows(cfg):
        if row.kind == THETA0:
            continue
        finals = row.inputs or (row.model_dir,)
        tokens = [
            read_json(f / MANIFEST)[SIZE_UNIT] if (f / MANIFEST).is_file() else math.nan
            for f in finals
        ]
        rows.append(
            {
                "model": row.label,
                "kind": row.kind,
                "branches": len(finals),
                "tokens": sum(tokens) if row.kind != "soup" else tokens[0],
                "branch_tokens": tokens,
                "merge": row.merge_method or "",
            }
        )
    return pd.DataFrame(rows)
