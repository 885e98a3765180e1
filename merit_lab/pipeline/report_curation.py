"""The curated mixture's tables in ``report.md``: what hand edits changed, and their log.

Input: `load_source_table` (the original mixture) and the run's `Partition` with its edit log.
Output: DataFrames that `merit_lab.pipeline.report` writes as markdown tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from merit_lab.partition.plan import Partition
from merit_lab.partition.session import UNPLACED

__all__ = ["curated_mixture_table", "edit_log_table"]


def curated_mixture_table(sources: pd.DataFrame, partition: Partition) -> pd.DataFrame:
    """Per source a hand edit touched, or that trains in no row: what changed and the counts.

    Args:
        sources: `load_source_table` (``examples``, ``tokens``, ``group``), the original mixture.
        partition: the run's partition (its ``examples``/``tokens`` count what is trained).

    Returns:
        Indexed by source, in mixture order: ``change``, ``group``, the original ``examples``
        and ``tokens``, and the ``trained examples``/``trained tokens`` (0 for a source in no
        group). Empty when nothing was edited and every source is placed.
    """
    changes: dict[str, list[str]] = {}
    for e in partition.edit_log:
        if "source" in e:  # a re-split (op "split") names no source
            changes.setdefault(e["source"], []).append(_describe_edit(e))
    for s in partition.dropped:
        changes.setdefault(s, ["dropped"])
    for s, f in partition.fractions.items():
        changes.setdefault(s, [f"down-weighted to {f:g}"])
    groups = sources["group"] if "group" in sources else pd.Series(dtype=str)
    for s in groups.index[groups == UNPLACED]:
        changes.setdefault(s, []).append("not placed: trains in no row")
    names = [s for s in sources.index if s in changes] + sorted(set(changes) - set(sources.index))
    kept = set(partition.sources)
    rows = [
        {
            "source": s,
            "change": "; ".join(changes[s]),
            "group": groups.get(s, f"G{partition.group_of(s)}" if s in kept else "–"),
            "examples": int(sources["examples"].get(s, 0)),
            "tokens": int(sources["tokens"].get(s, 0)),
            "trained examples": int(partition.examples[s]) if s in kept else 0,
            "trained tokens": int(partition.tokens[s]) if s in kept else 0,
        }
        for s in names
    ]
    columns = ["change", "group", "examples", "tokens", "trained examples", "trained tokens"]
    return pd.DataFrame(rows, columns=["source", *columns]).set_index("source")


def edit_log_table(edit_log: Sequence[dict]) -> pd.DataFrame:
    """The edit log, oldest first: ``op``, ``source``, ``detail``, ``who``, ``at``."""
    rows = [
        {
            "op": e.get("op", ""),
            "source": e.get("source", ""),
            "detail": _edit_detail(e),
            "who": e.get("who", ""),
            "at": e.get("at", ""),
        }
        for e in edit_log
    ]
    table = pd.DataFrame(rows, columns=["op", "source", "detail", "who", "at"])
    table.index = pd.RangeIndex(1, len(table) + 1, name="#")
    return table


def _describe_edit(e: dict) -> str:
    op = e.get("op")
    if op == "drop":
        return "dropped"
    if op == "downweight":
        return f"down-weighted to {e['to']:g}"
    if op == "add":
        return f"added to G{e['to']}"
    if op == "move":
        return f"moved G{e['from']} → G{e['to']}"
    return str(op)


def _edit_detail(e: dict) -> str:
    op = e.get("op")
    if op == "move":
        return f"G{e['from']} → G{e['to']}"
    if op == "drop":
        return "it was in no group" if e.get("from") is None else f"from G{e['from']}"
    if op == "split":
        return f"re-split: {e.get('method')} {e.get('params', {})}"
    if op == "add":
        return f"to G{e['to']}"
    if op == "downweight":
        return f"fraction {e['from']:g} → {e['to']:g}"
    return ""
