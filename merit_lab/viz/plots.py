"""Plot builders of a run's figures: conflict space, model comparison, training curves.

Input: objects (`ConflictSpace`, a per-source table, evaluation tables, training-log rows).
Output: ``go.Figure`` objects that never call ``.show()``; the look is `merit_lab.viz.style`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from merit_lab.analysis.conflict import ConflictSpace
from merit_lab.partition.session import DROPPED, UNPLACED
from merit_lab.viz.export import save_figure, static_renderer_problem
from merit_lab.viz.plots_heatmap import MAX_CELLS, plot_conflict_cells
from merit_lab.viz.style import MARKERS, MUTED, PALETTE, color_map, layout, style_map

__all__ = [
    "INACTIVE_SYMBOLS",
    "METRICS",
    "PALETTE",
    "color_map",
    "plot_comparison",
    "plot_conflict_clustermap",
    "plot_conflict_heatmap",
    "plot_conflict_scatter",
    "plot_explained_variance",
    "plot_gradient_convergence",
    "plot_training_curves",
    "save_figure",
    "static_renderer_problem",
]

METRICS = {  # metric -> (title, unit, higher is better)
    "exact_match": ("Exact match of greedy answers", "%", True),
    "similarity": ("Character similarity of greedy answers", "%", True),
    "loss": ("Held-out loss", "nats per response token", False),
    "in_style": ("Answers in their source's style", "%", True),  # evaluate.style_scores
}
# Colour values of sources that train in no row: grey, with their own marker (valid in 2-D and
# 3-D scatters). "dropped" and "unplaced" are the `group` a run's source table gives them.
INACTIVE_SYMBOLS = {DROPPED: "x", UNPLACED: "circle-open", "n/a": "circle-open"}


def plot_conflict_heatmap(space: ConflictSpace, table: pd.DataFrame | None = None) -> go.Figure:
    """The cosine matrix C in clustering order, diverging colours centred at 0.

    Args:
        table: optional per-source columns (indexed by source name) shown on hover.

    Returns:
        A heatmap whose ``z`` is ``C[order][:, order]`` and whose axes are the ordered names;
        above `MAX_CELLS` sources, runs of the order aggregated (`plot_conflict_cells`).
    """
    if space.n_sources > MAX_CELLS:
        return plot_conflict_cells(space, table, max_cells=MAX_CELLS)
    order = list(space.order)
    names = [space.names[i] for i in order]
    z = space.cosine[np.ix_(order, order)]
    extra = [""] * len(names)
    if table is not None:
        cols = [c for c in table.columns if c not in ("source",)][:6]
        extra = [
            "<br>".join(f"{c}: {table.loc[n, c]}" for c in cols) if n in table.index else ""
            for n in names
        ]
    hover = [
        [
            f"{names[i]} × {names[j]}<br>cos = {z[i, j]:+.3f}<br>{extra[i]}"
            for j in range(len(names))
        ]
        for i in range(len(names))
    ]
    lim = float(np.abs(z[~np.eye(len(names), dtype=bool)]).max()) if len(names) > 1 else 1.0
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=names,
            y=names,
            zmin=-lim,
            zmax=lim,
            colorscale="RdBu_r",
            text=hover,
            hoverinfo="text",
            colorbar={"title": "cos"},
        )
    )
    fig.update_yaxes(autorange="reversed", tickfont={"size": 9})
    fig.update_xaxes(tickangle=-60, tickfont={"size": 9})
    return layout(fig, "Gradient conflict matrix C (clustered)", width=760, height=700)


def plot_conflict_scatter(
    space: ConflictSpace,
    table: pd.DataFrame | None = None,
    *,
    color: str | None = None,
    dims: int = 2,
) -> go.Figure:
    """Sources in the PCA conflict space (PC1-2, or PC1-3 with ``dims=3``), a trace per colour.

    Args:
        table: per-source columns indexed by source name (hover text and colouring); it may
            hold sources the space lacks (ignored) and lack some the space has ("n/a").
        color: the column of ``table`` to colour by (a group, family or planted label). The
            values of `INACTIVE_SYMBOLS` ("dropped", "unplaced": sources that train in no row)
            are drawn grey with their own marker, after the coloured traces.
    """
    if dims not in (2, 3):
        raise ValueError("dims must be 2 or 3")
    z = space.coords(dims)
    names = list(space.names)
    frame = pd.DataFrame(z, columns=[f"PC{i + 1}" for i in range(dims)], index=names)
    if table is not None:
        frame = frame.join(table.drop(columns=[c for c in frame.columns if c in table.columns]))
    key = color if color is not None and color in frame.columns else None
    if key:  # a source missing from the table has no value to colour by
        values = frame[key].astype(object).where(frame[key].notna(), "n/a").astype(str)
    else:
        values = pd.Series("source", index=frame.index)
    looks = style_map(v for v in values if v not in INACTIVE_SYMBOLS)
    colors = {v: look.color for v, look in looks.items()}
    inactive = [v for v in INACTIVE_SYMBOLS if (values == v).any()]
    ev = space.explained_variance_ratio
    hover_cols = [c for c in frame.columns if not c.startswith("PC")][:8]
    fig = go.Figure()
    for v in [*sorted(colors, key=str), *inactive]:
        sub = frame[values == v]
        text = [
            f"<b>{n}</b><br>" + "<br>".join(f"{c}: {sub.loc[n, c]}" for c in hover_cols)
            for n in sub.index
        ]
        marker = {
            "color": colors.get(v, MUTED),
            "size": 9 if dims == 2 else 5,
            "line": {"width": 0.5},
            "symbol": INACTIVE_SYMBOLS.get(v) or _symbol(looks[v].symbol, dims),
        }
        if v in INACTIVE_SYMBOLS:  # hollow or crossed, so they read as "not trained"
            marker["line"] = {"width": 1.5, "color": MUTED}
        common = dict(name=str(v), text=text, hoverinfo="text", mode="markers", marker=marker)
        if dims == 2:
            fig.add_trace(go.Scatter(x=sub["PC1"], y=sub["PC2"], **common))
        else:
            fig.add_trace(go.Scatter3d(x=sub["PC1"], y=sub["PC2"], z=sub["PC3"], **common))
    labels = [f"PC{i + 1} ({ev[i]:.0%})" for i in range(dims)]
    if dims == 2:
        fig.update_xaxes(title=labels[0], zeroline=True)
        fig.update_yaxes(title=labels[1], zeroline=True)
    else:
        fig.update_layout(
            scene={"xaxis_title": labels[0], "yaxis_title": labels[1], "zaxis_title": labels[2]}
        )
    title = f"Conflict space{f', coloured by {key}' if key else ''}"
    return layout(fig, title, width=720, height=560, legend_title_text=key or "")


# scatter3d knows 8 symbols; "x" and "circle-open" mark the inactive sources
SYMBOLS_3D = ("circle", "square", "diamond", "cross", "diamond-open", "square-open")


def _symbol(symbol: str, dims: int) -> str:
    """``symbol`` in 2-D; in 3-D its place in `style.MARKERS` mapped onto `SYMBOLS_3D`."""
    return symbol if dims == 2 else SYMBOLS_3D[MARKERS.index(symbol) % len(SYMBOLS_3D)]


def plot_explained_variance(space: ConflictSpace, top: int = 10) -> go.Figure:
    """Bars of each PCA axis's share of the variance of the normalised gradients, with the sum."""
    ev = space.explained_variance_ratio[:top]
    axes = [f"PC{i + 1}" for i in range(len(ev))]
    fig = go.Figure(go.Bar(x=axes, y=ev, marker_color=PALETTE[0], name="per axis"))
    fig.add_trace(
        go.Scatter(
            x=axes,
            y=np.cumsum(ev),
            mode="lines+markers",
            name="cumulative",
            line={"color": PALETTE[3]},
        )
    )
    fig.update_yaxes(title="explained variance", tickformat=".0%", range=[0, 1.02])
    return layout(fig, "Explained variance of the conflict space", width=620, height=400)


def _hover_lines(table: pd.DataFrame | None, name: str, columns: Sequence[str]) -> str:
    if table is None or name not in table.index:
        return ""
    return "<br>".join(f"{c}: {table.loc[name, c]}" for c in columns)


def plot_conflict_clustermap(
    space: ConflictSpace, table: pd.DataFrame | None = None, *, hover_columns: int = 8
) -> go.Figure:
    """The cosine matrix C in clustering order under its dendrogram (average linkage on 1 − C).

    The linkage is the one that made ``space.order`` (average, optimal leaf ordering), so the
    dendrogram's leaves sit exactly above the heatmap's columns. Hovering a cell shows both
    sources, their cosine and their ``table`` columns (family, tags, examples, tokens, ...).

    Args:
        space: the conflict space.
        table: per-source columns indexed by source name, shown on hover.
        hover_columns: at most this many table columns per source on hover.

    Returns:
        A figure whose first trace is the dendrogram (one line trace, absent when T < 3) and
        whose last trace is a heatmap with ``z = C[order][:, order]`` on integer axes 0..T-1
        labelled by the ordered names. Above `MAX_CELLS` sources: `plot_conflict_cells` (runs
        of the order aggregated, no dendrogram).
    """
    if space.n_sources > MAX_CELLS:
        return plot_conflict_cells(space, table, max_cells=MAX_CELLS)
    from plotly.subplots import make_subplots
    from scipy.cluster.hierarchy import dendrogram, linkage
    from scipy.spatial.distance import squareform

    order = list(space.order)
    names = [space.names[i] for i in order]
    t = len(names)
    z = space.cosine[np.ix_(order, order)]
    cols = [] if table is None else [c for c in table.columns if c != "source"][:hover_columns]
    info = [_hover_lines(table, n, cols) for n in names]
    hover = [
        [
            f"<b>{names[i]}</b> × <b>{names[j]}</b><br>cos = {z[i, j]:+.3f}"
            f"<br><br><b>{names[i]}</b><br>{info[i]}<br><br><b>{names[j]}</b><br>{info[j]}"
            for j in range(t)
        ]
        for i in range(t)
    ]
    fig = make_subplots(
        rows=2, cols=1, shared_xaxes=True, row_heights=[0.18, 0.82], vertical_spacing=0.01
    )
    if t >= 3:
        dist = np.clip(1.0 - space.cosine, 0.0, 2.0)
        np.fill_diagonal(dist, 0.0)
        link = linkage(squareform(dist, checks=False), method="average", optimal_ordering=True)
        tree = dendrogram(link, no_plot=True)
        xs: list[float | None] = []
        ys: list[float | None] = []
        for ic, dc in zip(tree["icoord"], tree["dcoord"], strict=True):
            # scipy puts leaf i at x = 10 i + 5; the heatmap's column i is at x = i.
            xs += [(x - 5.0) / 10.0 for x in ic] + [None]
            ys += [*dc, None]
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                line={"color": "#555555", "width": 1},
                hoverinfo="skip",
                showlegend=False,
                name="dendrogram",
            ),
            row=1,
            col=1,
        )
    lim = float(np.abs(z[~np.eye(t, dtype=bool)]).max()) if t > 1 else 1.0
    fig.add_trace(
        go.Heatmap(
            z=z,
            x=list(range(t)),
            y=list(range(t)),
            zmin=-lim,
            zmax=lim,
            colorscale="RdBu_r",
            text=hover,
            hoverinfo="text",
            customdata=names,
            colorbar={"title": "cos", "len": 0.8, "y": 0.4},
            name="cosine",
        ),
        row=2,
        col=1,
    )
    ticks = {"tickvals": list(range(t)), "ticktext": names, "tickfont": {"size": 9}}
    fig.update_xaxes(**ticks, tickangle=-60, row=2, col=1)
    fig.update_yaxes(**ticks, autorange="reversed", row=2, col=1)
    fig.update_yaxes(title="1 − cos", showticklabels=True, row=1, col=1)
    fig.update_xaxes(showticklabels=False, row=1, col=1)
    return layout(fig, "Gradient conflict matrix C (clustered)", width=800, height=820)


def plot_gradient_convergence(df: pd.DataFrame) -> go.Figure:
    """How fast a source's gradient direction settles as calibration examples are added.

    Args:
        df: one row per (n, boot) with the cosine between the gradient of a bootstrap sample
            of n examples and that of all of them (``convergence.gradient_convergence``); an
            optional ``source`` column gives one curve per source.

    Returns:
        Per source, the mean cosine vs n (log axis) over a shaded 5–95% bootstrap band.
    """
    frame = df if "source" in df.columns else df.assign(source="all")
    looks = style_map(frame["source"])
    fig = go.Figure()
    for src, look in looks.items():
        sub = frame[frame["source"] == src].groupby("n")["cosine"]
        stats = pd.DataFrame(
            {"mean": sub.mean(), "lo": sub.quantile(0.05), "hi": sub.quantile(0.95)}
        ).sort_index()
        n = stats.index.to_numpy()
        fig.add_trace(
            go.Scatter(
                x=[*n, *n[::-1]],
                y=[*stats["hi"], *stats["lo"][::-1]],
                fill="toself",
                fillcolor=look.color,
                opacity=0.2,
                line={"width": 0},
                hoverinfo="skip",
                showlegend=False,
                legendgroup=str(src),
                name=f"{src} 5–95%",
            )
        )
        fig.add_trace(
            go.Scatter(
                x=n,
                y=stats["mean"],
                mode="lines+markers",
                name=str(src),
                legendgroup=str(src),
                line=look.line(),
                marker=look.marker(),
            )
        )
    fig.update_xaxes(title="calibration examples n", type="log")
    fig.update_yaxes(title="cos(g_n, g_all)")
    return layout(
        fig,
        "Gradient direction vs calibration sample size",
        width=680,
        height=440,
        showlegend=len(looks) > 1,
    )


def plot_comparison(
    wide: pd.DataFrame,
    *,
    metric: str,
    spread: pd.DataFrame | None = None,
    xaxis: str = "family",
) -> go.Figure:
    """Grouped bars from zero: one group per family (and the average), one bar per model.

    Args:
        wide: models × families (+ ``avg``), as `merit_lab.evaluation.evaluate.summarize_eval`
        returns.
        metric: a key of `METRICS` (its title, unit and direction), or any other name.
        spread: optional, the same models × families (e.g. the std over training seeds), drawn
            as symmetric error bars; a missing model, family or NaN draws none there.
        xaxis: the title of the category axis (the columns of ``wide``).

    Returns:
        One bar trace per model (``y`` = its row of ``wide``) with its own colour (hatched once
        the palette wraps); the value axis starts at 0.
    """
    if spread is not None:
        extra = sorted(set(map(str, spread.index)) - set(map(str, wide.index)))
        cols = sorted(set(map(str, spread.columns)) - set(map(str, wide.columns)))
        if extra or cols:
            raise ValueError(f"spread has models {extra} / columns {cols} that wide lacks")
        spread = spread.reindex(index=wide.index, columns=wide.columns).astype(float)
        if (spread < 0).any().any():
            raise ValueError("spread must be >= 0 (a standard deviation or half-width)")
    title, unit, higher = METRICS.get(metric, (metric, "", True))
    looks = style_map(list(wide.index))
    fig = go.Figure()
    for model, row in wide.iterrows():
        err = None
        if spread is not None:
            e = spread.loc[model].to_numpy(dtype=float)
            err = {
                "type": "data",
                "array": np.nan_to_num(e),
                "visible": True,
                "color": "#333333",
                "thickness": 1,
                "width": 2,
            }
        fig.add_bar(
            name=str(model),
            x=[str(c) for c in wide.columns],
            y=row.to_numpy(dtype=float),
            marker=looks[model].bar(),
            error_y=err,
            hovertemplate=f"{model}<br>%{{x}}: %{{y:.3f}} {unit}<extra></extra>",
        )
    better = "higher is better" if higher else "lower is better"
    ytitle = f"{unit} ({better})" if unit else better
    fig.update_layout(barmode="group", yaxis_title=ytitle, xaxis_title=xaxis)
    fig.update_yaxes(rangemode="tozero")  # bars are read by their length: they start at 0
    return layout(fig, title)


def plot_training_curves(logs: Mapping[str, Sequence[dict]], *, smooth: int = 10) -> go.Figure:
    """Training loss against tokens seen, one line per branch/joint run (moving average).

    The branches of one experiment share a look and one legend entry (``branches/merit-2d/0``
    and ``/1`` are both "merit-2d"); each joint run is its own entry. The run's full label is in
    the hover.

    Args:
        logs: run label → its ``log.jsonl`` rows (each with ``loss`` and ``tokens``).
        smooth: the moving-average window in logged steps.
    """
    groups = {name: _training_group(name) for name in logs}
    looks = style_map(list(groups.values()))
    fig, shown = go.Figure(), set()
    for name, rows in logs.items():
        if not rows:
            continue
        group = groups[name]
        loss = pd.Series([r["loss"] for r in rows]).rolling(smooth, min_periods=1).mean()
        fig.add_scatter(
            x=[r["tokens"] for r in rows],
            y=loss,
            mode="lines+markers",
            name=group,
            legendgroup=group,
            showlegend=group not in shown,
            line=looks[group].line(),
            # a few markers per line: the symbol tells series apart in grey print
            marker=looks[group].marker(size=6, maxdisplayed=8),
            hovertemplate=f"{name}<br>tokens %{{x}}<br>loss %{{y:.3f}}<extra></extra>",
        )
        shown.add(group)
    fig.update_layout(xaxis_title="tokens trained", yaxis_title="training loss (moving average)")
    return layout(fig, "Branch and joint training")


def _training_group(label: str) -> str:
    """The legend entry of a training log: its experiment for a branch, else the run itself."""
    parts = label.split("/")
    return parts[1] if parts[0] == "branches" and len(parts) == 3 else label.replace("/", " ")
