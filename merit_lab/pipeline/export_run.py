"""Export a run's curated mixture for other trainers (`merit_lab.training.exports` over the run's
specs).

Input: a run directory whose partition stage is done. Output: ``<out>/`` as
`merit_lab.training.exports.export_branches` writes it, one mixture per branch group and per joint
run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from merit_lab.pipeline.rows import plan_specs
from merit_lab.pipeline.rundir import RunDir
from merit_lab.training.exports import EXPORT_FORMATS, export_branches
from merit_lab.training.spec import BranchSpec

__all__ = ["export_run", "run_specs"]


def run_specs(run_dir: str | Path) -> dict[str, BranchSpec]:
    """Label → branch spec of every row that trains: ``<exp>/<k>`` per group of a split,
    ``<exp>`` per joint run, ``<exp>/s<seed>`` per soup member (``<exp>@s<seed>`` for the
    repeats under ``train.seeds``).

    A branch that has started keeps the ``spec.json`` it trained with; the others are planned
    as `plan_specs` plans them (it writes only a split's ``partition.json``, as training does).
    """
    run = RunDir(Path(run_dir))
    cfg = run.load_config()  # located at run_dir: every branch folder is this run's
    exps = {e.name: e for e in cfg.experiments}
    out: dict[str, BranchSpec] = {}
    for name, specs in plan_specs(cfg).items():
        for spec in specs:
            kind = exps[name.split("@s", 1)[0]].kind  # "<exp>@s<seed>": a training-seed repeat
            if kind == "soup":
                label = f"{name}/s{spec.train.seed}"
            else:
                label = name if kind == "joint" else spec.name
            saved = Path(spec.output_dir) / "spec.json"
            # the folder that holds spec.json is the branch's, whatever an older one stored
            out[label] = (
                replace(BranchSpec.load(saved), output_dir=spec.output_dir)
                if saved.is_file()
                else spec
            )
    return out


def export_run(
    run_dir: str | Path, out: str | Path, formats: Sequence[str] = EXPORT_FORMATS
) -> list[Path]:
    """Write a run's curated data, trl and open-instruct mixtures and example manifest."""
    return export_branches(run_specs(run_dir), out, formats)
