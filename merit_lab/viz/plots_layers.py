"""Figures of layer-wise conflict: where in the model the sources conflict.

Input: a `merit_lab.analysis.layerwise.LayerConflict`. Output: plotly figures: each group's share
of a
conflict axis as a kind × layer grid (`plot_layer_axis_shares`), and the groups' own cosine
matrices side by side (`plot_layer_cosines`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from merit_lab.analysis.layerwise import KINDS, LayerConflict
from merit_lab.viz.style import layout

__all__ = ["plot_layer_axis_shares", "plot_layer_cosines"]


def _grid(lc: LayerConflict) -> tuple[list[str], list[str], dict[int, tuple[int, int]]]:
    """Rows (kinds present), columns (``embeddings``, ``L0``…, ``head``, ``other``) and each
    group's cell: a layer's groups share its column, the rest have a column of their own."""
    kinds = [k for k in KINDS if any(g.kind == k for g in lc.groups)]
    layers = sorted({g.layer for g in lc.groups if g.layer is not None})
    cols = (["embeddings"] if "embeddings" in kinds else []) + [f"L{i}" for i in layers]
    cols += [
        k for k in ("head", "other") if any(g.kind == k and g.layer is None for g in lc.groups)
    ]
    cell = {}
    for i, g in enumerate(lc.groups):
        col = f"L{g.layer}" if g.layer is not None else g.kind
        cell[i] = (kinds.index(g.kind), cols.index(col))
    return kinds, cols, cell


def plot_layer_axis_shares(lc: LayerConflict, axes: Sequence[str] | None = None) -> go.Figure:
    """Each group's share of a conflict axis, one panel per axis, on a kind × layer grid.

    A share is vᵀC_k v / vᵀC v (`merit_lab.analysis.layerwise.axis_shares`): the part of the
    conflict
    along v that group k's inner products carry; the shares of one panel sum to 1, negative ones
    pull against the axis. Axes: ``pc1``, ``pc2``… of the whole conflict space and the labelled
    contrasts (``style``, ``case`` on the demo).

    Args:
        lc: the run's layer conflict.
        axes: the panels (default: every PC share and contrast it holds).
    """
    available = {f"pc{j + 1}": lc.axis_shares[:, j] for j in range(lc.axis_shares.shape[1])}
    available.update(lc.contrasts)
    axes = list(axes or available)
    unknown = [a for a in axes if a not in available]
    if unknown:
        raise ValueError(f"unknown axes {unknown}; known: {list(available)}")
    kinds, cols, cell = _grid(lc)
    ncols = min(2, len(axes))
    nrows = math.ceil(len(axes) / ncols)
    titles = []
    for a in axes:
        if a.startswith("pc"):
            ratio = lc.whole.explained_variance_ratio[int(a[2:]) - 1]
            titles.append(f"{a.upper()} ({ratio:.0%} of the variance)")
        else:
            titles.append(f"{a} contrast")
    fig = make_subplots(
        nrows, ncols, subplot_titles=titles, horizontal_spacing=0.12, vertical_spacing=0.3 / nrows
    )
    lim = max(float(np.nanmax(np.abs(available[a]))) for a in axes) or 1.0
    for n, a in enumerate(axes):
        z = np.full((len(kinds), len(cols)), np.nan)
        names = np.full((len(kinds), len(cols)), "", dtype=object)
        for i, (r, c) in cell.items():
            z[r, c] = available[a][i]
            names[r, c] = lc.groups[i].name
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=cols,
                y=kinds,
                customdata=names,
                zmin=-lim,
                zmax=lim,
                colorscale="RdBu_r",
                zmid=0,
                showscale=n == 0,
                texttemplate="%{z:.2f}",
                colorbar={"title": {"text": "share"}, "len": 0.8},
                hovertemplate="%{customdata}: %{z:.3f} of the axis<extra>" + a + "</extra>",
                xgap=2,
                ygap=2,
            ),
            row=n // ncols + 1,
            col=n % ncols + 1,
        )
    fig.update_yaxes(autorange="reversed")
    return layout(
        fig,
        "Where the sources conflict: each group's share of a conflict axis",
        height=260 * nrows + 80,
        width=max(720, 130 + 70 * len(cols) * ncols),
    )


def plot_layer_cosines(lc: LayerConflict, groups: Sequence[str] | None = None) -> go.Figure:
    """Each group's own cosine matrix (sources in the whole space's heatmap order), a panel per
    group, and the whole rows' last; at most 12 panels (default: the groups with the largest
    |share| of PC1)."""
    names = [g.name for g in lc.groups]
    if groups is None:
        top = np.argsort(-np.abs(lc.axis_shares[:, 0]))[:11]
        groups = [names[i] for i in sorted(top)]
    unknown = [g for g in groups if g not in names]
    if unknown:
        raise ValueError(f"unknown groups {unknown}; known: {names}")
    order = list(lc.whole.order)
    labels = [lc.names[i] for i in order]
    panels = [(g, lc.cosines[names.index(g)]) for g in groups] + [("whole", lc.whole.cosine)]
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = make_subplots(
        nrows,
        ncols,
        subplot_titles=[p[0] for p in panels],
        horizontal_spacing=0.03,
        vertical_spacing=0.12 / nrows,
    )
    for n, (title, cos) in enumerate(panels):
        fig.add_trace(
            go.Heatmap(
                z=cos[np.ix_(order, order)],
                x=labels,
                y=labels,
                zmin=-1,
                zmax=1,
                zmid=0,
                colorscale="RdBu_r",
                showscale=n == 0,
                colorbar={"title": {"text": "cosine"}},
                hovertemplate="%{y} · %{x}: %{z:.3f}<extra>" + title + "</extra>",
            ),
            row=n // ncols + 1,
            col=n % ncols + 1,
        )
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False, autorange="reversed")
    return layout(fig, "Cosine matrix per layer group", height=230 * nrows + 80, width=940)
