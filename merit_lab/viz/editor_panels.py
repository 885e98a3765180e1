"""What the partition editor shows: the scatter of the split, the group table, the stability panel.

Input: an `EditSession`'s partition, conflict space and statistics (and the run's
`SplitStability` and `FoldStability`). Output: the per-source table, the PC1-2 scatter drawn into
a figure, and the HTML of the group statistics, of the stability panel and of the fold flag of
the selected source; `merit_lab.viz.editor` lays them out with its controls and redraws them
after each edit.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from merit_lab.analysis.conflict import ConflictSpace
from merit_lab.partition.folds import FoldStability
from merit_lab.partition.plan import Partition
from merit_lab.partition.session import DROPPED, UNPLACED, group_label
from merit_lab.partition.stability import SplitStability, describe_stability
from merit_lab.viz.plots import color_map
from merit_lab.viz.plots_stability import FLIP_THRESHOLD

__all__ = [
    "DROPPED_COLOR",
    "UNPLACED_COLOR",
    "draw_partition_scatter",
    "empty_partition_scatter",
    "flipping_sources",
    "fold_flag_html",
    "fold_r",
    "group_stats_html",
    "source_table",
    "stability_panel_html",
]

DROPPED_COLOR, UNPLACED_COLOR = "#BBBBBB", "#555555"
WARNING_COLOR = "#D55E00"


def source_table(
    partition: Partition,
    example_tokens: Mapping[str, Sequence[int]],
    table: pd.DataFrame,
) -> pd.DataFrame:
    """Every source of ``table`` with its current ``group`` ("G0".., "dropped", "unplaced"),
    ``fraction`` and the ``examples``/``tokens`` it trains (for a source in no group: its full
    counts, from ``example_tokens`` or else the table's own columns), then the table's other
    columns.

    Args:
        table: per-source columns indexed by source, with a ``source`` column
            (`merit_lab.viz.figure_view.align_table`).
    """
    part, full = partition, example_tokens
    given = {c: table[c].to_dict() if c in table else {} for c in ("examples", "tokens")}
    columns: dict[str, list] = {"group": [], "fraction": [], "examples": [], "tokens": []}
    for s in table.index:
        if s in part.tokens:
            group, ex, tok = group_label(part.group_of(s)), part.examples[s], part.tokens[s]
        else:
            group = DROPPED if s in part.dropped else UNPLACED
            ex = len(full[s]) if full.get(s) else given["examples"].get(s, math.nan)
            tok = sum(full[s]) if full.get(s) else given["tokens"].get(s, math.nan)
        for c, v in zip(columns, (group, part.fractions.get(s, 1.0), ex, tok), strict=True):
            columns[c].append(v)
    rest = table.drop(columns=[c for c in columns if c in table.columns])
    return pd.concat(
        [rest[["source"]], pd.DataFrame(columns, index=table.index), rest.drop(columns="source")],
        axis=1,
    )


def empty_partition_scatter() -> go.Figure:
    """The editor's scatter before its first draw: one marker trace, lasso selection."""
    fig = go.Figure(go.Scatter(mode="markers", name="sources"))
    fig.update_layout(
        dragmode="lasso",
        template="simple_white",
        width=720,
        height=520,
        title={
            "text": "Partition in the conflict space (select points to move them; "
            "hollow: down-weighted, ×: dropped)",
            "x": 0.5,
        },
    )
    return fig


def draw_partition_scatter(
    fig: go.Figure, space: ConflictSpace, table: pd.DataFrame
) -> dict[str, str]:
    """Redraw ``fig``'s trace: PC1-2 of every source coloured by group, dropped grey ×,
    unplaced dark ◇, down-weighted hollow; hover shows the table's first columns.

    Args:
        fig: a figure from `empty_partition_scatter` (or its widget).
        table: `source_table` of the partition, indexed by source in ``space.names`` order.

    Returns:
        The colour of each group label, for the statistics table.
    """
    z = space.coords(min(2, space.n_sources))
    x = z[:, 0]
    y = z[:, 1] if z.shape[1] > 1 else np.zeros(len(x))
    labels = table["group"].tolist()
    frac = table["fraction"].tolist()
    colors = color_map([g for g in labels if g not in (DROPPED, UNPLACED)])
    colors |= {DROPPED: DROPPED_COLOR, UNPLACED: UNPLACED_COLOR}
    first = ["group", "fraction", "examples", "tokens"]
    cols = first + [c for c in table.columns if c not in (*first, "source", "description")]
    text = [
        f"<b>{s}</b><br>" + "<br>".join(f"{c}: {table.loc[s, c]}" for c in cols[:8])
        for s in space.names
    ]
    symbols = [
        "x"
        if g == DROPPED
        else "diamond-open"
        if g == UNPLACED
        else "circle-open"
        if f < 1
        else "circle"
        for g, f in zip(labels, frac, strict=True)
    ]
    hollow = [s.endswith("-open") for s in symbols]
    ev = space.explained_variance_ratio
    with fig.batch_update():
        tr = fig.data[0]
        tr.x, tr.y, tr.customdata, tr.text = x, y, list(space.names), text
        tr.hoverinfo = "text"
        tr.marker = {
            "color": [colors[g] for g in labels],
            "symbol": symbols,
            "size": [10 if not h else 9 for h in hollow],
            "line": {
                "width": [2 if h else 0.5 for h in hollow],
                "color": [
                    colors[g] if h else "#333333" for g, h in zip(labels, hollow, strict=True)
                ],
            },
        }
        fig.layout.xaxis.title = f"PC1 ({ev[0]:.0%})"
        fig.layout.yaxis.title = f"PC2 ({ev[1]:.0%})" if len(ev) > 1 else ""
    return colors


def group_stats_html(
    stats: pd.DataFrame,
    summary: Mapping[str, float],
    partition: Partition,
    unplaced: Sequence[str],
    colors: Mapping[str, str],
) -> str:
    """The group statistics as an HTML table, and a line of notes under it.

    Args:
        stats: `EditSession.stats` (one row per group label).
        summary: `EditSession.summary`: ``within``, ``between`` and the predicted ``gain``.
        unplaced: sources in no group that were never dropped.
        colors: group label → colour (`draw_partition_scatter`).
    """
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in ["group", *stats.columns])
    body = []
    for g, row in stats.iterrows():
        cells = [f'<span style="color:{colors.get(g, "#000")}">■</span> {g}']
        for c, v in row.items():
            if c in ("sources", "examples", "tokens"):
                cells.append(f"{int(v):,}")
            elif c == "gain":
                cells.append(f"{v:.3e}")
            else:
                cells.append("–" if pd.isna(v) else f"{v:.3f}")
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    s, part = summary, partition
    notes = [
        f"K = {part.k}, method {part.method}",
        f"mean cosine within groups {s['within']:.3f}, between groups {s['between']:.3f}",
    ]
    if not math.isnan(s["gain"]):
        notes.append(f"predicted merge gain {s['gain']:.3e}")
    if part.fractions:
        notes.append(
            "down-weighted: " + ", ".join(f"{k} ×{f:g}" for k, f in part.fractions.items())
        )
    if part.dropped:
        notes.append(f"dropped: {', '.join(part.dropped)}")
    if unplaced:
        notes.append(f"unplaced: {', '.join(unplaced)}")
    notes.append(f"{len(part.edit_log)} edit(s) logged")
    table = f"<table><tr>{head}</tr>{''.join(body)}</table>"
    return f"{table}<p>{html.escape('; '.join(notes))}</p>"


def stability_panel_html(stability: SplitStability | None, partition: Partition) -> str:
    """The stability panel: `describe_stability` for the partition's r, the warning in red
    ("" without a stability)."""
    if stability is None:
        return ""
    r = partition.params.get("r")
    lines = describe_stability(stability, r if r in stability.ari else None)
    return "<br>".join(
        f'<b style="color:{WARNING_COLOR}">{html.escape(x)}</b>'
        if x.startswith("WARNING")
        else html.escape(x)
        for x in lines
    )


def fold_r(partition: Partition) -> int | None:
    """The split depth of ``partition`` the fold flips refer to: its ``r``, or log2 K when K is
    a power of two (a split by K); None otherwise."""
    r = partition.params.get("r")
    if r is not None:
        return int(r)
    k = partition.k
    return k.bit_length() - 1 if k >= 2 and k & (k - 1) == 0 else None


def flipping_sources(folds: FoldStability | None, r: int | None) -> dict[str, float]:
    """Source → its probability of changing group between halves of the folds at ``r``, for
    the sources at or above `FLIP_THRESHOLD` ({} without folds or when r was not measured)."""
    if folds is None or r is None or r not in folds.flip:
        return {}
    flip = dict(zip(folds.names, (float(p) for p in folds.flip[r]), strict=True))
    return {s: flip[s] for s in folds.unstable_sources(r, FLIP_THRESHOLD)}


def fold_flag_html(folds: FoldStability | None, source: str | None, r: int | None) -> str:
    """The flag under the source picker: a warning in red when ``source`` changes group between
    disjoint halves of the calibration examples in at least `FLIP_THRESHOLD` of pairings (its
    group is a coin toss of the calibration draw, so a hand move on it may chase noise), a
    plain note when it sometimes does, "" when it never does or nothing is known."""
    if folds is None or source is None or r is None or r not in folds.flip:
        return ""
    if source not in folds.names:
        return ""
    p = float(folds.flip[r][folds.names.index(source)])
    where = (
        f"{html.escape(source)} changes group between disjoint halves of the calibration "
        f"examples in {p:.0%} of the {len(folds.pearson_halves)} pairings of {folds.folds} folds "
        f"(r = {r}, the run's split rule)"
    )
    if p >= FLIP_THRESHOLD:
        return (
            f'<b style="color:{WARNING_COLOR}">⚠ Unstable source: {where}. Its group is not '
            "settled by the calibration sample: check the cosines (± their standard error) "
            "before moving it, or raise calibration.n.</b>"
        )
    if p > 0:
        return f"{where}."
    return ""
