"""Figures of conflict drift: how the conflict space moved from θ0 along training.

Input: a `merit_lab.analysis.drift.Drift`. Output: plotly figures: the principal angles per
checkpoint
(`plot_drift_angles`) and the sources' paths in θ0's PCA plane (`plot_drift_map`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from merit_lab.analysis.drift import Drift
from merit_lab.viz.style import MUTED, style_map
from merit_lab.viz.style import layout as apply_layout

__all__ = ["plot_drift_angles", "plot_drift_map"]


def plot_drift_angles(drift: Drift) -> go.Figure:
    """Left: the principal angles (degrees, 0-90) between each checkpoint's top-k PCA subspace
    and θ0's, a dot per angle. Right: each source's gradient cosine to its own θ0 gradient
    (a dot per source; the line is the median)."""
    labels = [p.label for p in drift.points]
    fig = make_subplots(
        1,
        2,
        subplot_titles=[
            "Principal angles to θ0's PCA subspace",
            "Each source's cosine to its θ0 gradient",
        ],
        horizontal_spacing=0.14,
    )
    looks = style_map(range(drift.k))
    for j in range(drift.k):
        s = looks[j]
        fig.add_trace(
            go.Scatter(
                x=labels,
                y=[p.angles[j] for p in drift.points],
                mode="markers",
                name=f"angle {j + 1}",
                marker=s.marker(size=9),
                hovertemplate="%{x}: %{y:.1f}°<extra>angle " + str(j + 1) + "</extra>",
            ),
            row=1,
            col=1,
        )
    for i, name in enumerate(drift.names):
        fig.add_trace(
            go.Scatter(
                x=labels,
                y=[p.cos_to_theta0[i] for p in drift.points],
                mode="markers",
                marker={"color": MUTED, "size": 5},
                showlegend=False,
                name=name,
                hovertemplate="%{x}<br>" + name + ": %{y:.3f}<extra></extra>",
            ),
            row=1,
            col=2,
        )
    fig.add_trace(
        go.Scatter(
            x=labels,
            y=[float(np.median(p.cos_to_theta0)) for p in drift.points],
            mode="lines+markers",
            name="median source",
            line={"color": "black"},
            marker={"color": "black", "symbol": "line-ew-open", "size": 12},
        ),
        row=1,
        col=2,
    )
    fig.update_yaxes(title_text="degrees", range=[0, 90], row=1, col=1)
    fig.update_yaxes(
        title_text="cosine",
        range=[min(0.0, min(p.cos_to_theta0.min() for p in drift.points) - 0.05), 1.02],
        row=1,
        col=2,
    )
    fig.update_xaxes(tickangle=-40)
    return apply_layout(fig, "Conflict drift", height=460, width=960)


def plot_drift_map(drift: Drift, path: Sequence[str] | None = None) -> go.Figure:
    """Each source's path in θ0's PCA plane (PC1 × PC2): from its θ0 position (open circle)
    through the checkpoints of ``path`` (default: every joint checkpoint, in order) to its last
    position (filled); branch ends, when not on the path, as small crosses. Hover names each."""
    labels = [p.label for p in drift.points]
    path = list(path or [lb for lb in labels if lb.startswith("joint")])
    missing = [lb for lb in path if lb not in labels]
    if missing:
        raise ValueError(f"unknown checkpoints {missing}; have {labels}")
    by_label = {p.label: p for p in drift.points}
    z0 = drift.theta0.coords(min(2, drift.k))
    if z0.shape[1] < 2:
        z0 = np.column_stack([z0, np.zeros(len(z0))])
    looks = style_map(drift.names)
    fig = go.Figure()
    for i, name in enumerate(drift.names):
        xy = [z0[i, :2]] + [by_label[lb].coords[i, :2] for lb in path]
        xs, ys = zip(*[(float(a), float(b)) for a, b in xy], strict=True)
        steps = ["θ0", *path]
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines+markers",
                name=name,
                showlegend=False,
                line={"color": looks[name].color, "width": 1},
                marker={
                    "color": looks[name].color,
                    "size": [8] + [5] * (len(xs) - 2) + [9],
                    "symbol": ["circle-open"] + ["circle"] * (len(xs) - 1),
                },
                text=steps,
                hovertemplate=name + "<br>%{text}: (%{x:.3f}, %{y:.3f})<extra></extra>",
            )
        )
    others = [lb for lb in labels if lb not in path]
    for lb in others:
        c = by_label[lb].coords
        fig.add_trace(
            go.Scatter(
                x=c[:, 0],
                y=c[:, 1],
                mode="markers",
                name=lb,
                showlegend=False,
                marker={"color": MUTED, "symbol": "x-thin-open", "size": 6},
                text=list(drift.names),
                hovertemplate="%{text}<br>" + lb + "<extra></extra>",
            )
        )
    ev = drift.theta0.explained_variance_ratio
    fig.update_xaxes(title_text=f"θ0 PC1 ({ev[0]:.0%})", zeroline=False)
    fig.update_yaxes(title_text=f"θ0 PC2 ({ev[1]:.0%})", zeroline=False, scaleanchor="x")
    title = "Sources in θ0's conflict space: θ0 (○) → " + " → ".join(path)
    if others:
        title += "; branch ends ×"
    return apply_layout(fig, title, height=620, width=760)
