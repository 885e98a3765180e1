"""Figures of split stability: the source co-assignment matrix over bootstrap redraws, the ARI
distribution per r, and the spread of each cosine.

Input: a `merit_lab.partition.stability.SplitStability`. Output: ``go.Figure``s.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from merit_lab.partition.stability import UNSTABLE_ARI, SplitStability
from merit_lab.viz.style import MUTED, layout, style_map

__all__ = ["plot_ari_distribution", "plot_coassignment", "plot_cosine_spread"]


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
    fig.add_hline(
        y=UNSTABLE_ARI,
        line={"dash": "dot", "color": MUTED},
        annotation_text=f"unstable below {UNSTABLE_ARI}",
        annotation_position="bottom right",
    )
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
