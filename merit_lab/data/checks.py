"""Mixture checks: what a source lacks for a run, and the one message naming every small source.

Input: a source's example counts per split. Output: the shortfall text `pipeline.analysis`
reports before any work (re-exported by `merit_lab.data.mixture`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["small_source_message", "source_shortfall"]


def source_shortfall(counts: Mapping[str, int], calibration_n: int) -> str:
    """What a source lacks for a run ("" when nothing), from its ``n_train``, ``n_calibration``
    and ``n_eval``: train examples, ``calibration_n`` calibration examples, eval examples."""
    short = []
    if counts["n_train"] < 1:
        short.append("no train examples")
    if counts["n_calibration"] < calibration_n:
        short.append(
            f"{counts['n_calibration']} calibration examples < calibration.n {calibration_n}"
        )
    if counts["n_eval"] < 1:
        short.append("no eval examples")
    return "; ".join(short)


def small_source_message(shortfalls: Mapping[str, Mapping[str, Any]]) -> str:
    """One message naming each small source, its counts and what it lacks.

    Args:
        shortfalls: source name → ``{"n_train", "n_calibration", "n_eval", "shortfall"}``.
    """
    lines = [
        f"  {name}: train {c['n_train']}, calibration {c['n_calibration']}, eval {c['n_eval']}"
        f" ({c['shortfall']})"
        for name, c in shortfalls.items()
    ]
    return (
        f"{len(lines)} source(s) too small for this run:\n" + "\n".join(lines) + "\nadd examples, "
        "lower calibration.n, raise mixture.eval_fraction, drop the sources, or set "
        "mixture.small_sources: warn to go on with them"
    )
