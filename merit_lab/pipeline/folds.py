"""A run's fold stability: ``fold_stability.json``, written beside ``conflict.json`` by the
conflict stage from the bank's fold rows (``gradients/folds.safetensors``), and read back.

Input: the run's bank (with ``calibration.folds`` > 1), ``mixture.json``'s counts and the run's
partition rule. Output: `merit_lab.partition.folds.FoldStability`, keyed by the bank's stage key
and the split rule, so it is redone exactly when the bank (or the rule) changes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

from merit_lab.config.schema import RunConfig, config_hash
from merit_lab.io import read_json
from merit_lab.partition.folds import FoldStability, compute_fold_stability
from merit_lab.pipeline.rundir import RunDir, source_counts

__all__ = [
    "FOLD_STABILITY_FILE",
    "fold_stability_lines",
    "load_fold_stability",
    "save_fold_stability",
]

log = logging.getLogger(__name__)

FOLD_STABILITY_FILE = "fold_stability.json"


def _key(cfg: RunConfig, run: RunDir) -> str:
    p = cfg.partition
    return config_hash(
        "fold-stability",
        1,  # what is computed (the file's FOLD_STABILITY_VERSION 2 moved the matrices only)
        run.stored_key("gradients"),
        run.stored_key("mixture"),  # the counts the split balances
        p.method,
        p.seed,
    )


def save_fold_stability(cfg: RunConfig, run: RunDir) -> bool:
    """Write ``<run>/fold_stability.json`` when it is not current; True when it did work.

    Nothing is written (and an earlier file is removed) when the bank has no fold rows
    (``calibration.folds: 1`` or a bank from before folds) or the split is made on one layer
    group's rows (``partition.layer_group``), whose matrix the fold rows do not describe.
    """
    path = run.root / FOLD_STABILITY_FILE
    key = _key(cfg, run)
    if path.is_file() and read_json(path).get("info", {}).get("key") == key:
        try:
            FoldStability.load(path)  # the matrices beside it are there and its own
            return False
        except ValueError:
            pass  # computed again
    bank = run.load_bank(mmap=True)  # only the (mapped) fold rows are read
    if bank.folds is None or cfg.partition.layer_group or len(bank.names) < 2:
        path.unlink(missing_ok=True)
        path.with_suffix(".safetensors").unlink(missing_ok=True)
        return False
    examples, tokens = source_counts(run)
    stab = compute_fold_stability(
        bank.folds,
        bank.fold_tokens,
        bank.names,
        n_examples=[bank.stats[s]["n_examples"] for s in bank.names],
        examples=examples,
        train_tokens=tokens,
        method=cfg.partition.method,
        seed=cfg.partition.seed,
    )
    dataclasses.replace(stab, info={**stab.info, "key": key}).save(path)
    for line in stab.describe(2):
        log.info("%s", line)
    return True


def load_fold_stability(run_dir: str | Path) -> FoldStability | None:
    """The run's `FoldStability` (``fold_stability.json``), or None when the run has none
    (``calibration.folds: 1``, a run from before folds, or the conflict stage not yet run)."""
    path = RunDir(Path(run_dir)).root / FOLD_STABILITY_FILE
    return FoldStability.load(path) if path.is_file() else None


def fold_stability_lines(run_dir: str | Path, r: int = 2) -> list[str]:
    """Lines for a run's summary: the r-axis fold agreement (the halves' median and mean, the
    curve at the run's n) and the calibration n it calls for, then `FoldStability.warning`: two
    draws of the run's n would agree below 0.8 and the halves' mean is below it too ([] without
    folds)."""
    stab = load_fold_stability(run_dir)
    if stab is None or not stab.rs:
        return []
    r = r if r in stab.rs else max(stab.rs)  # fewer than 2^r sources: the deepest split
    row = stab.summary().loc[r]
    need = stab.n_for(r)
    lines = [
        f"  fold stability ({stab.folds} folds): r={r} halves agree at ARI "
        f"{row['ari_half_median']:.2f} (mean {row['ari_half_mean']:.2f}, n={stab.n / 2:.0f} "
        f"each), ~{row['ari_at_n']:.2f} at "
        f"n={stab.n:.0f}"
        + (f"; n≈{need} reaches 0.8" if need is not None else "")
        + (
            f"; matrix reliability {stab.reliability:.3f}"
            if not math.isnan(stab.reliability)
            else ""
        )
    ]
    warning = stab.warning(r)
    return lines + ([f"  WARNING: {warning}"] if warning else [])
