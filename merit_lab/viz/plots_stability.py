"""Figures of split stability: from the example-level bootstrap, the source co-assignment over
redraws, the ARI distribution per r and the spread of each cosine; from the calibration folds,
the cosine matrix with each standard error, the agreement of halves per r against n, and each
source's probability of changing group.

Input: a `merit_lab.partition.stability.SplitStability` or a
`merit_lab.partition.folds.FoldStability`. Output: ``go.Figure``s.
"""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go

from merit_lab.analysis.conflict import ConflictSpace, space_from_cosine
from merit_lab.partition.folds import FOLD_AGREEMENT_TARGET, FoldStability
from merit_lab.partition.stability import UNSTABLE_ARI, SplitStability
from merit_lab.viz.style import MUTED, layout, style_map

__all__ = [
    "FLIP_THRESHOLD",
    "UNSTABLE_COLOR",
    "add_fold_errors",
    "mark_unstable_sources",
    "plot_ari_distribution",
    "plot_coassignment",
    "plot_cosine_spread",
    "plot_fold_agreement",
    "plot_fold_cosine",
    "plot_fold_flips",
]

# A source that changes group in at least this share of halves pairings is marked unstable
# (`FoldStability.unstable_sources`' default), in every figure and widget.
FLIP_THRESHOLD = 0.5
UNSTABLE_COLOR = "#222222"  # the ring around a source that changes group between folds (no
# palette colour: a group drawn in it would hide under the ring)
REFERENCE = "#555555"  # dotted reference lines drawn over bars and curves
# The SE cells carry their value up to this many sources; beyond, the colour and the hover.
MAX_CELL_LABELS = 20


def plot_coassignment(stab: SplitStability, r: int) -> go.Figure:
    """Share of bootstrap replicates in which two sources land in the same group (r axes),
    sources ordered by the reference split's groups; 1 on a block diagonal means a stable split."""
    if r not in stab.coassign:
        raise ValueError(f"no r = {r} in this stability result (has {list(stab.rs)})")
    ref = stab.reference[r]
    order = sorted(range(len(stab.names)), key=lambda i: (ref[i], i))
    names = [f"{stab.names[i]} (G{ref[i]})" for i in order]
    co = stab.coassign[r][np.ix_(order, order)]
    fig = go.Figure(
        go.Heatmap(
            z=co,
            x=names,
            y=names,
            zmin=0,
            zmax=1,
            colorscale="Blues",
            colorbar={"title": "same group"},
            hovertemplate="%{y}<br>%{x}<br>together in %{z:.0%} of redraws<extra></extra>",
        )
    )
    med = float(np.median(stab.ari[r]))
    fig.update_yaxes(autorange="reversed", tickmode="array", tickvals=names)  # every label
    fig.update_xaxes(tickmode="array", tickvals=names)
    return layout(
        fig,
        f"Same group in {stab.n_boot} redraws, r = {r} (median ARI {med:.2f})",
        height=max(420, 18 * len(names) + 200),
        width=max(600, 18 * len(names) + 320),
    )


def plot_ari_distribution(stab: SplitStability) -> go.Figure:
    """Adjusted Rand index of each redraw's split to the reported one, per r (a box with every
    point), with the instability threshold as a dotted line."""
    fig = go.Figure()
    looks = style_map([f"r = {r}" for r in stab.rs])
    for r in stab.rs:
        look = looks[f"r = {r}"]
        fig.add_trace(
            go.Box(
                y=stab.ari[r],
                name=f"r = {r}",
                boxpoints="all",
                jitter=0.4,
                pointpos=0,
                marker={"color": look.color, "symbol": look.symbol, "size": 4},
                line={"color": look.color},
            )
        )
    _reference_line(fig, y=UNSTABLE_ARI, text=f"unstable below {UNSTABLE_ARI}")
    return layout(
        fig,
        f"Split agreement over {stab.n_boot} redraws",
        yaxis={"title": "ARI to the reported split", "range": [-0.5, 1.05]},
        showlegend=False,
    )


def plot_cosine_spread(stab: SplitStability, top: int = 30) -> go.Figure:
    """The ``top`` source pairs with the widest bootstrap interval: each cosine (dot) with its
    90% interval (bar), sorted by width."""
    pairs = stab.pair_table()
    pairs["width"] = pairs["q95"] - pairs["q05"]
    pairs = pairs.sort_values("width", ascending=False).head(top).iloc[::-1]
    labels = [f"{a} · {b}" for a, b in zip(pairs["a"], pairs["b"], strict=True)]
    # the interval as segments, not error bars: the all-example cosine may lie outside it
    # (resampled means are noisier, so large cosines shrink towards 0 on redraws)
    seg_x = [v for lo, hi in zip(pairs["q05"], pairs["q95"], strict=True) for v in (lo, hi, None)]
    seg_y = [v for lab in labels for v in (lab, lab, None)]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=seg_x,
            y=seg_y,
            mode="lines",
            name="90% of redraws",
            line={"color": MUTED, "width": 6},
            hoverinfo="skip",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=pairs["cosine"],
            y=labels,
            mode="markers",
            name="all examples",
            marker={"color": "black", "size": 7, "symbol": "diamond"},
            hovertemplate="%{y}<br>cos %{x:+.3f}<extra></extra>",
        )
    )
    return layout(
        fig,
        f"Cosine spread: the {len(pairs)} widest 90% intervals",
        xaxis_title="cosine (diamond: all examples; bar: 5%–95% of redraws)",
        showlegend=False,
        height=max(360, 20 * len(pairs) + 140),
    )


def plot_fold_cosine(stab: FoldStability) -> go.Figure:
    """The cosine matrix below the diagonal and each cosine's fold standard error above it, in
    clustering order (average linkage on 1 − C, as the conflict heatmap), each triangle on its
    own colour bar; the SE cells carry their value up to `MAX_CELL_LABELS` sources, and every
    cell hovers as ``cos ± SE``."""
    space = space_from_cosine(stab.cosine, stab.names)
    order = list(space.order)
    names = [stab.names[i] for i in order]
    t = len(names)
    z = stab.cosine[np.ix_(order, order)]
    se = stab.cosine_se[np.ix_(order, order)]
    row, col = np.indices((t, t))
    hover = [
        [
            f"<b>{names[i]}</b> × <b>{names[j]}</b><br>cos = {z[i, j]:+.3f} ± {se[i, j]:.3f}"
            for j in range(t)
        ]
        for i in range(t)
    ]
    lim = float(np.abs(z[row != col]).max()) if t > 1 else 1.0
    common = {
        "x": names,
        "y": names,
        "customdata": hover,
        "hovertemplate": "%{customdata}<extra></extra>",
        "hoverongaps": False,
    }
    labels = t <= MAX_CELL_LABELS
    fig = go.Figure(
        [
            go.Heatmap(
                z=np.where(row > col, z, np.nan),
                zmin=-lim,
                zmax=lim,
                colorscale="RdBu_r",
                colorbar={"title": "cos", "len": 0.45, "y": 1.0, "yanchor": "top"},
                name="cosine",
                **common,
            ),
            go.Heatmap(
                z=np.where(row < col, se, np.nan),
                zmin=0,
                zmax=float(se.max()) or 1.0,
                colorscale="Greys",
                colorbar={"title": "SE", "len": 0.45, "y": 0.0, "yanchor": "bottom"},
                text=np.round(se, 2) if labels else None,
                texttemplate="%{text:.2f}" if labels else None,
                textfont={"size": 9},
                name="standard error",
                **common,
            ),
        ]
    )
    fig.update_yaxes(autorange="reversed", tickmode="array", tickvals=names)
    fig.update_xaxes(tickmode="array", tickvals=names, tickangle=-60)
    iu = np.triu_indices(t, k=1)
    return layout(
        fig,
        f"Cosine (below) and its fold standard error (above; {stab.folds} folds, median "
        f"{np.median(stab.cosine_se[iu]):.3f})",
        height=max(460, 24 * t + 220),
        width=max(640, 24 * t + 360),
        showlegend=False,  # the two colour bars say what each triangle is
    )


def plot_fold_agreement(stab: FoldStability) -> go.Figure:
    """Per r: the ARI between the splits of disjoint halves of the folds (points, at n/2
    examples per source) and the agreement expected between two independent draws of n'
    examples (the simulated curve, against n' on a log axis), with the target as a dotted line
    and the run's n as another."""
    fig = go.Figure()
    looks = style_map([f"r = {r}" for r in stab.rs])
    n = stab.n
    for r in stab.rs:
        look = looks[f"r = {r}"]
        halves = stab.ari_halves[r]
        fig.add_trace(
            go.Scatter(
                x=[n / 2] * len(halves),
                y=halves,
                mode="markers",
                name=f"r = {r} (K = {2**r}): halves",
                marker=look.marker(9, opacity=0.8),
                hovertemplate=f"r = {r}, two halves of n = %{{x:.0f}}: ARI %{{y:.2f}}"
                "<extra></extra>",
            )
        )
        need = stab.n_for(r)
        fig.add_trace(
            go.Scatter(
                x=stab.sizes,
                y=stab.curve[r],
                mode="lines",
                name=f"r = {r}: {stab.agreement(r):.2f} at n = {n:.0f}"
                + (f", {FOLD_AGREEMENT_TARGET} at {need}" if need is not None else ""),
                line=look.line(2),
                hovertemplate=f"r = {r}, two draws of n = %{{x:.0f}}: ARI %{{y:.2f}}"
                "<extra></extra>",
            )
        )
    _reference_line(fig, y=FOLD_AGREEMENT_TARGET, text=f"target {FOLD_AGREEMENT_TARGET}")
    _reference_line(fig, x=n, text=f" this run: n = {n:.0f}", log_x=True)
    lo, hi = min(n / 2, float(stab.sizes.min())), float(stab.sizes.max())
    lowest = [float(np.min(stab.ari_halves[r])) for r in stab.rs]  # ARI may go below 0
    bottom = min([-0.3, *(v - 0.05 for v in lowest)])
    return layout(
        fig,
        "Split agreement of two independent calibration draws",
        xaxis={
            "title": "calibration examples per source (n)",
            "type": "log",
            "range": [math.log10(lo) - 0.1, math.log10(hi) + 0.1],
        },
        yaxis={"title": "ARI between the two splits", "range": [bottom, 1.08]},
        width=820,
        height=480,
    )


def plot_fold_flips(stab: FoldStability) -> go.Figure:
    """Each source's probability of changing group between two disjoint halves, one bar per r,
    sources sorted by their largest probability; the `FLIP_THRESHOLD` as a dotted line."""
    flips = np.stack([stab.flip[r] for r in stab.rs]) if stab.rs else np.zeros((0, 0))
    worst = flips.max(axis=0) if flips.size else np.zeros(len(stab.names))
    order = np.argsort(worst, kind="stable")  # horizontal bars: the worst on top
    names = [stab.names[i] for i in order]
    looks = style_map([f"r = {r}" for r in stab.rs])
    fig = go.Figure()
    for r, row in zip(stab.rs, flips, strict=True):
        fig.add_trace(
            go.Bar(
                x=row[order],
                y=names,
                orientation="h",
                name=f"r = {r} (K = {2**r})",
                marker=looks[f"r = {r}"].bar(),
                hovertemplate="%{y}: changes group in %{x:.0%} of halves<extra></extra>",
            )
        )
    _reference_line(fig, x=FLIP_THRESHOLD)
    pairings = len(stab.pearson_halves)
    return layout(
        fig,
        f"Probability of changing group ({pairings} pairings of folds into halves)",
        barmode="group",
        legend_traceorder="reversed",  # as the bars stack: the last r on top
        xaxis={
            "title": f"share of pairings (dotted: {FLIP_THRESHOLD:g})",
            "range": [0, 1.02],
        },
        yaxis={"tickmode": "array", "tickvals": names},
        height=max(360, 14 * len(names) * max(len(stab.rs), 1) + 160),
        width=760,
    )


def add_fold_errors(fig: go.Figure, stab: FoldStability) -> go.Figure:
    """Put each cosine's fold standard error into the hover of a cosine heatmap whose last trace
    holds the ordered source names in ``customdata`` and one hover text per cell
    (`merit_lab.viz.plots.plot_conflict_clustermap`): its line ``cos = +0.412`` becomes
    ``cos = +0.412 ± 0.031 (fold SE)``. Pairs the stability does not hold are left as they are.
    Returns ``fig``."""
    heat = fig.data[-1]
    names = list(heat.customdata)
    pos = {s: i for i, s in enumerate(stab.names)}
    text = [list(row) for row in heat.text]
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if a == b or a not in pos or b not in pos:
                continue
            se = stab.cosine_se[pos[a], pos[b]]
            lines = text[i][j].split("<br>")
            k = next((n for n, line in enumerate(lines) if line.startswith("cos = ")), None)
            if k is not None:
                lines[k] = f"{lines[k]} ± {se:.3f} (fold SE, {stab.folds} folds)"
                text[i][j] = "<br>".join(lines)
    heat.text = text
    return fig


def mark_unstable_sources(
    fig: go.Figure,
    space: ConflictSpace,
    stab: FoldStability,
    r: int,
    *,
    threshold: float = FLIP_THRESHOLD,
) -> go.Figure:
    """Ring the sources of a PCA scatter (`merit_lab.viz.plots.plot_conflict_scatter`, 2-D or
    3-D) that change group between disjoint halves of the folds in at least ``threshold`` of
    the pairings at ``r``: one more trace, open circles in `UNSTABLE_COLOR`, with its own
    legend entry; nothing when r was not measured or no source is unstable. Returns ``fig``."""
    if r not in stab.flip:
        return fig
    flip = dict(zip(stab.names, stab.flip[r], strict=True))
    names = [s for s in stab.unstable_sources(r, threshold) if s in space.names]
    if not names:
        return fig
    dims = 3 if any(t.type == "scatter3d" for t in fig.data) else 2
    z = space.coords(dims)[[space.index(s) for s in names]]
    common = {
        "mode": "markers",
        "name": f"changes group between folds (r = {r})",
        "text": [
            f"<b>{s}</b><br>changes group in {flip[s]:.0%} of halves (r = {r})" for s in names
        ],
        "hoverinfo": "text",
        "marker": {
            "symbol": "circle-open",
            "size": 18 if dims == 2 else 9,
            "color": UNSTABLE_COLOR,
            "line": {"width": 2.5, "color": UNSTABLE_COLOR},
        },
    }
    if dims == 2:
        fig.add_trace(go.Scatter(x=z[:, 0], y=z[:, 1], **common))
    else:
        fig.add_trace(go.Scatter3d(x=z[:, 0], y=z[:, 1], z=z[:, 2], **common))
    if any(getattr(t.marker, "showscale", False) for t in fig.data if t.marker is not None):
        # a colour bar sits where the legend would: the legend goes above the plot
        fig.update_layout(
            legend={"orientation": "h", "x": 0, "xanchor": "left", "y": 1.02, "yanchor": "bottom"}
        )
    elif not fig.layout.showlegend:
        fig.update_layout(showlegend=True)
    return fig


def _reference_line(
    fig: go.Figure,
    *,
    x: float | None = None,
    y: float | None = None,
    text: str = "",
    log_x: bool = False,
) -> None:
    """A dotted line across the plot at data ``x`` (vertical, labelled at its foot, to the
    right) or ``y`` (horizontal, labelled above its right end). The width and opacity are set:
    the simple_white template's shape defaults (line width 0, opacity 0.5) would hide a line
    drawn without them. On a log x axis (``log_x``) a shape takes the value, an annotation its
    log10."""
    line = {"dash": "dot", "color": REFERENCE, "width": 1.5}
    if x is not None:
        fig.add_shape(
            type="line", x0=x, x1=x, y0=0, y1=1, xref="x", yref="paper", line=line, opacity=1
        )
        at = math.log10(x) if log_x else x
        where = {"x": at, "y": 0.0, "yref": "paper", "xanchor": "left", "yanchor": "bottom"}
    else:
        fig.add_shape(
            type="line", x0=0, x1=1, y0=y, y1=y, xref="paper", yref="y", line=line, opacity=1
        )
        where = {"x": 1.0, "y": y, "xref": "paper", "xanchor": "right", "yanchor": "bottom"}
    if text:
        fig.add_annotation(text=text, showarrow=False, **where)
