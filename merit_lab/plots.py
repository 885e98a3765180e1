"""Figures: plotly builders, one function per figure, and `save_figure` (HTML + static images).

Input: artifacts of a run (`ConflictSpace`, a source table). Output: ``go.Figure`` objects that
never call ``.show()``; one palette and one font across every figure.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from merit_lab.conflict import ConflictSpace

__all__ = [
    "PALETTE",
    "color_map",
    "plot_conflict_heatmap",
    "plot_conflict_scatter",
    "plot_explained_variance",
    "save_figure",
    "static_renderer_problem",
]

log = logging.getLogger(__name__)

# Okabe-Ito: distinguishable under the common colour-vision deficiencies, prints well in grey.
PALETTE = (
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000",
)  # fmt: skip
FONT = {"family": "Helvetica, Arial, sans-serif", "size": 13}
TEMPLATE = "simple_white"


def color_map(values: Sequence) -> dict:
    """A stable colour per distinct value (sorted), cycling the palette."""
    return {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(sorted(set(values), key=str))}


def _layout(fig: go.Figure, title: str, **kw) -> go.Figure:
    fig.update_layout(template=TEMPLATE, font=FONT, title={"text": title, "x": 0.5}, **kw)
    return fig


def plot_conflict_heatmap(space: ConflictSpace, table: pd.DataFrame | None = None) -> go.Figure:
    """The cosine matrix C in clustering order, diverging colours centred at 0.

    Args:
        table: optional per-source columns (indexed by source name) shown on hover.

    Returns:
        A heatmap whose ``z`` is ``C[order][:, order]`` and whose axes are the ordered names.
    """
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
    return _layout(fig, "Gradient conflict matrix C (clustered)", width=760, height=700)


def plot_conflict_scatter(
    space: ConflictSpace,
    table: pd.DataFrame | None = None,
    *,
    color: str | None = None,
    dims: int = 2,
) -> go.Figure:
    """Sources in the PCA conflict space (PC1-2, or PC1-3 with ``dims=3``), a trace per colour.

    Args:
        table: per-source columns indexed by source name (hover text and colouring).
        color: the column of ``table`` to colour by (a group, family or planted label).
    """
    if dims not in (2, 3):
        raise ValueError("dims must be 2 or 3")
    z = space.coords(dims)
    names = list(space.names)
    frame = pd.DataFrame(z, columns=[f"PC{i + 1}" for i in range(dims)], index=names)
    if table is not None:
        frame = frame.join(table.drop(columns=[c for c in frame.columns if c in table.columns]))
    key = color if color is not None and color in frame.columns else None
    values = frame[key].astype(str) if key else pd.Series("source", index=frame.index)
    colors = color_map(values)
    ev = space.explained_variance_ratio
    hover_cols = [c for c in frame.columns if not c.startswith("PC")][:8]
    fig = go.Figure()
    for v in sorted(colors, key=str):
        sub = frame[values == v]
        text = [
            f"<b>{n}</b><br>" + "<br>".join(f"{c}: {sub.loc[n, c]}" for c in hover_cols)
            for n in sub.index
        ]
        marker = {"color": colors[v], "size": 9 if dims == 2 else 5, "line": {"width": 0.5}}
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
    return _layout(fig, title, width=720, height=560, legend_title_text=key or "")


def plot_explained_variance(space: ConflictSpace, top: int = 10) -> go.Figure:
    """Bars of each PCA axis's share of the variance of the normalised gradients, with the sum."""
    ev = space.explained_variance_ratio[:top]
    axes = [f"PC{i + 1}" for i in range(len(ev))]
    fig = go.Figure(go.Bar(x=axes, y=ev, marker_color=PALETTE[0], name="per axis"))
    fig.add_trace(
        go.Scatter(x=axes, y=np.cumsum(ev), mode="lines+markers", name="cumulative",
                   line={"color": PALETTE[3]})
    )  # fmt: skip
    fig.update_yaxes(title="explained variance", tickformat=".0%", range=[0, 1.02])
    return _layout(fig, "Explained variance of the conflict space", width=620, height=400)


SYSTEM_CHROMIUM = "/usr/bin/chromium"  # Debian/Ubuntu: `apt-get install chromium`


def static_renderer_problem() -> str | None:
    """Why static export (PNG/SVG/PDF) cannot run here, or None when it can.

    Kaleido ≥ 1 drives a Chromium/Chrome that choreographer finds: ``BROWSER_PATH`` first, then
    the usual names on ``PATH`` and install locations. When it finds none but Debian's
    ``/usr/bin/chromium`` is there, ``BROWSER_PATH`` is set to it for this process.
    """
    import importlib.metadata as md
    import os

    try:
        version = md.version("kaleido")
    except md.PackageNotFoundError:
        return "kaleido is not installed: pip install 'kaleido>=1'"
    if int(version.split(".")[0]) < 1:
        return f"kaleido {version} is too old for plotly here: pip install -U 'kaleido>=1'"
    if os.environ.get("BROWSER_PATH"):
        return None
    try:
        from choreographer.browsers.chromium import Chromium

        found = Chromium.find_browser(skip_local=False)
    except Exception:  # an older choreographer: fall through to the system Chromium check
        found = None
    if found:
        return None
    if os.access(SYSTEM_CHROMIUM, os.X_OK):
        os.environ["BROWSER_PATH"] = SYSTEM_CHROMIUM
        return None
    return (
        "kaleido found no Chromium or Chrome: `apt-get install chromium` (Debian/Ubuntu), "
        "`plotly_get_chrome` (downloads Chrome for Testing), or set BROWSER_PATH to a browser"
    )


def save_figure(
    fig: go.Figure, stem: str | Path, *, formats: Sequence[str] = ("png", "svg")
) -> list[Path]:
    """Write ``<stem>.html`` always, plus static images when a renderer (kaleido) is available.

    Returns:
        The files written. A missing static renderer is logged (with how to install it), not
        raised: the HTML holds the figure either way.
    """
    from merit_lab.io import atomic_write_bytes, atomic_write_text

    stem = Path(stem)
    written = [atomic_write_text(stem.with_suffix(".html"), fig.to_html(include_plotlyjs=True))]
    problem = static_renderer_problem() if formats else None
    if problem:
        log.warning("static export to %s skipped: %s; the HTML has the figure",
                    "/".join(formats), problem)  # fmt: skip
        return written
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        try:
            written.append(atomic_write_bytes(path, fig.to_image(format=fmt, scale=2)))
        except Exception as e:  # Chromium failed to start or to render
            log.warning("static export to %s skipped (%s); the HTML has the figure", fmt, e)
            break
    return written


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
        labelled by the ordered names.
    """
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
            go.Scatter(x=xs, y=ys, mode="lines", line={"color": "#555555", "width": 1},
                       hoverinfo="skip", showlegend=False, name="dendrogram"),
            row=1, col=1,
        )  # fmt: skip
    lim = float(np.abs(z[~np.eye(t, dtype=bool)]).max()) if t > 1 else 1.0
    fig.add_trace(
        go.Heatmap(z=z, x=list(range(t)), y=list(range(t)), zmin=-lim, zmax=lim,
                   colorscale="RdBu_r", text=hover, hoverinfo="text", customdata=names,
                   colorbar={"title": "cos", "len": 0.8, "y": 0.4}, name="cosine"),
        row=2, col=1,
    )  # fmt: skip
    ticks = {"tickvals": list(range(t)), "ticktext": names, "tickfont": {"size": 9}}
    fig.update_xaxes(**ticks, tickangle=-60, row=2, col=1)
    fig.update_yaxes(**ticks, autorange="reversed", row=2, col=1)
    fig.update_yaxes(title="1 − cos", showticklabels=True, row=1, col=1)
    fig.update_xaxes(showticklabels=False, row=1, col=1)
    return _layout(fig, "Gradient conflict matrix C (clustered)", width=800, height=820)


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
    colors = color_map(frame["source"])
    fig = go.Figure()
    for src in sorted(colors, key=str):
        sub = frame[frame["source"] == src].groupby("n")["cosine"]
        stats = pd.DataFrame(
            {"mean": sub.mean(), "lo": sub.quantile(0.05), "hi": sub.quantile(0.95)}
        ).sort_index()
        n = stats.index.to_numpy()
        fig.add_trace(
            go.Scatter(x=[*n, *n[::-1]], y=[*stats["hi"], *stats["lo"][::-1]], fill="toself",
                       fillcolor=colors[src], opacity=0.2, line={"width": 0}, hoverinfo="skip",
                       showlegend=False, legendgroup=str(src), name=f"{src} 5–95%")
        )  # fmt: skip
        fig.add_trace(
            go.Scatter(x=n, y=stats["mean"], mode="lines+markers", name=str(src),
                       legendgroup=str(src), line={"color": colors[src]})
        )  # fmt: skip
    fig.update_xaxes(title="calibration examples n", type="log")
    fig.update_yaxes(title="cos(g_n, g_all)")
    return _layout(
        fig, "Gradient direction vs calibration sample size", width=680, height=440,
        showlegend=len(colors) > 1,
    )  # fmt: skip


__all__ += ["plot_conflict_clustermap", "plot_gradient_convergence"]
