"""Figures of the examples inside the conflict space: a source's examples as a cloud around its
point, and the per-example shares of a pair's cosine.

Input: a ``ConflictSpace``, the per-source table and the example table
(`merit_lab.analysis.examples.ExampleSketches.table`, ``examples.parquet``). Output: ``go.Figure``s.
"""

from __future__ import annotations

import html
import textwrap

import pandas as pd
import plotly.graph_objects as go

from merit_lab.analysis.conflict import ConflictSpace
from merit_lab.viz.plots import plot_conflict_scatter
from merit_lab.viz.style import MUTED, PALETTE, layout

__all__ = ["plot_example_cloud", "plot_pair_contributions"]

_OUTLIER = "#D55E00"  # bars that pull against
# the cloud in grey and its flagged examples in black, set apart from the sources' group colours
# by colour and marker
_CLOUD = "#555555"


def _hover(frame: pd.DataFrame) -> list[str]:
    wrap = lambda t: "<br>".join(textwrap.wrap(html.escape(str(t)), 60)[:5])  # noqa: E731
    return [
        f"<b>{html.escape(str(r.id))}</b><br>{wrap(r.text)}<br>cos to own source "
        f"{r.own_cosine:+.3f} (robust z {r.robust_z:+.1f}), {r.tokens} response tokens"
        for r in frame.itertuples()
    ]


def plot_example_cloud(
    space: ConflictSpace,
    examples: pd.DataFrame,
    source: str,
    table: pd.DataFrame | None = None,
    *,
    color: str | None = None,
) -> go.Figure:
    """The sources in PC1-2 with one source's calibration examples as a cloud around its point.

    Each example is its normalised gradient projected with the sources' centring and basis
    (columns ``z0``, ``z1`` of ``examples``); hover shows its id, text and cosine to its source.
    Outliers (``outlier``: low cosine to their own source) and dominant examples (``dominant``:
    most of the source's gradient) get their own marker and colour.

    Args:
        examples: the example table (``source``, ``id``, ``text``, ``tokens``, ``own_cosine``,
            ``robust_z``, ``outlier``, ``z0``, ``z1``).
        source: whose examples to draw.
        table, color: the per-source table and column to colour the sources by.
    """
    missing = {"z0", "z1", "source", "outlier"} - set(examples.columns)
    if missing:
        raise ValueError(f"example table lacks columns {sorted(missing)}")
    mine = examples[examples["source"] == source]
    if mine.empty:
        raise ValueError(f"no examples of source {source!r} in the example table")
    fig = plot_conflict_scatter(space, table, color=color)
    dominant = mine["dominant"] if "dominant" in mine.columns else pd.Series(False, mine.index)
    kinds = [
        (
            ~mine["outlier"] & ~dominant,
            f"examples of {source}",
            {"color": _CLOUD, "size": 5, "opacity": 0.45, "symbol": "circle"},
        ),
        (
            mine["outlier"],
            "outlier examples (point away from their source)",
            {
                "color": "black",
                "size": 9,
                "symbol": "x-thin",
                "line": {"width": 2, "color": "black"},
            },
        ),
        (
            dominant & ~mine["outlier"],
            "dominant examples (most of the source's gradient)",
            {"color": "black", "size": 10, "symbol": "diamond-open", "line": {"width": 2}},
        ),
    ]
    for mask, name, marker in kinds:
        sub = mine[mask]
        if sub.empty:
            continue
        fig.add_trace(
            go.Scatter(
                x=sub["z0"],
                y=sub["z1"],
                mode="markers",
                name=name,
                marker=marker,
                text=_hover(sub),
                hoverinfo="text",
            )
        )
    i = space.index(source)
    fig.add_trace(
        go.Scatter(
            x=[space.embedding[i, 0]],
            y=[space.embedding[i, 1]],
            mode="markers",
            name=f"{source} (source)",
            hoverinfo="name",
            marker={
                "symbol": "star",
                "size": 16,
                "color": "white",
                "line": {"width": 2, "color": "black"},
            },
        )
    )
    n_out = int(mine["outlier"].sum())
    return layout(fig, f"{source}: {len(mine)} calibration examples, {n_out} outlier(s)")


def plot_pair_contributions(contrib: pd.DataFrame, a: str, b: str, top: int = 10) -> go.Figure:
    """The examples of ``a`` that pull hardest against ``b`` and with it (horizontal bars from
    zero); the title gives the cosine, the sum of all shares.

    Args:
        contrib: `merit_lab.analysis.examples.pair_contributions` (``id``, ``share``, ``text``).
        top: how many examples each way.
    """
    total = float(contrib["share"].sum())
    order = contrib.sort_values("share", kind="stable")
    picked = pd.concat([order.head(top), order.tail(top)]).drop_duplicates(subset="id")
    against = picked["share"] < 0
    fig = go.Figure()
    for mask, name, colour in [
        (against, f"pulls against {b}", _OUTLIER),
        (~against, f"pulls with {b}", PALETTE[0]),
    ]:
        sub = picked[mask]
        if sub.empty:
            continue
        fig.add_trace(
            go.Bar(
                x=sub["share"],
                y=sub["id"],
                orientation="h",
                name=name,
                marker={"color": colour, "line": {"width": 0}},
                text=[textwrap.shorten(str(t), 60) for t in sub["text"]],
                hovertemplate="%{y}<br>share %{x:+.4f}<br>%{text}<extra></extra>",
                textposition="none",
            )
        )
    fig.add_vline(x=0, line={"color": MUTED, "width": 1})
    fig.update_xaxes(rangemode="tozero")  # the shares are bars from zero, both ways
    fig.update_yaxes(categoryorder="array", categoryarray=list(picked["id"]))
    return layout(
        fig,
        f"cos({a}, {b}) = {total:+.3f}: the {top} examples of {a} each way",
        xaxis_title="share of the cosine (sums to it over all examples)",
        height=max(320, 22 * len(picked) + 120),
    )
