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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from merit_lab.config.schema import RunConfig, config_hash
from merit_lab.envelope import load_enveloped
from merit_lab.gradients.bank import BANK_FORMAT, BANK_VERSION, FOLDS_FILE
from merit_lab.io import read_json
from merit_lab.partition.folds import FoldStability, compute_fold_stability
from merit_lab.pipeline.rundir import RunDir, source_counts

__all__ = [
    "FOLD_STABILITY_FILE",
    "fold_cost",
    "fold_cost_lines",
    "fold_stability_lines",
    "load_fold_stability",
    "read_fold_cost",
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


def fold_cost(stats: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """What the folds cost a gradient stage, summed over the sources of its bank's ``stats``
    that have fold rows (None: none has): ``sources``; ``seconds``, the sources' own time
    (forward, backward and sketching); ``fold_seconds``, their extra sketch passes (``passes``
    of them, m − 1 a source); and where every source recorded them, ``folds`` and
    ``one_fold``: [calls, padded tokens] of the micro-batches run and of those one fold would
    have run (`merit_lab.gradients.batching.fold_batching_cost`), whose time is inside
    ``seconds`` and is not measured apart."""
    rows = [s for s in stats.values() if "fold_seconds" in s]
    if not rows:
        return None
    out: dict[str, Any] = {
        "sources": len(rows),
        "seconds": sum(float(s["seconds"]) for s in rows),
        "fold_seconds": sum(float(s["fold_seconds"]) for s in rows),
        "passes": sum(len(s["fold_tokens"]) - 1 for s in rows),
    }
    if all("micro_batches" in s for s in rows):  # a bank from before 2026-12-07 has none
        for k in ("folds", "one_fold"):
            out[k] = [sum(int(s["micro_batches"][k][i]) for s in rows) for i in (0, 1)]
    return out


def read_fold_cost(run_dir: str | Path) -> dict[str, Any] | None:
    """`fold_cost` of a run's ``gradients/bank.json`` (None without the bank or its fold rows:
    a bank of one fold written before its reused parts' fold stats were dropped has them)."""
    path = RunDir(Path(run_dir)).bank_json
    if not path.is_file() or not (path.parent / FOLDS_FILE).is_file():
        return None
    return fold_cost(load_enveloped(path, BANK_FORMAT, BANK_VERSION, legacy=True)["stats"])


def fold_cost_lines(run_dir: str | Path) -> list[str]:
    """A run summary's line on what its folds cost ([] without fold rows)."""
    cost = read_fold_cost(run_dir)
    if cost is None or not cost["seconds"]:
        return []
    line = (
        f"  fold cost: sketch passes {cost['fold_seconds'] / cost['seconds']:.1%} of the "
        f"gradient stage ({cost['fold_seconds']:.1f} of {cost['seconds']:.1f} s)"
    )
    if "folds" in cost:
        (c, p), (c1, p1) = cost["folds"], cost["one_fold"]
        line += f"; micro-batches {c} calls, {p:,} padded tokens (one fold: {c1}, {p1:,})"
    return [line]
