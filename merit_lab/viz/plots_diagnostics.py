"""Figures of the merge-readiness diagnostics: one plotly builder per diagnostic.

Input: the dicts and tables of `merit_lab.diagnostics` (interpolation curves, displacements,
perturbation tables, spectral filtering), or the loaded ``diagnostics/*.json`` documents
(`plot_diagnostics_files`). Output: ``go.Figure`` objects that never call ``.show()``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from merit_lab.diagnostics import summarize_perturbation
from merit_lab.viz.style import MUTED, PALETTE, layout, style_map

__all__ = [
    "figure_stem",
    "plot_diagnostics_files",
    "plot_displacement",
    "plot_interpolation",
    "plot_perturbation",
    "plot_spectral_filtering",
]


def plot_interpolation(curves: Mapping[str, dict]) -> go.Figure:
    """Loss along each linear path (solid) and its chord between the endpoints (dotted).

    Args:
        curves: pair label (e.g. "branch0→branch1") → an `interpolation_curve` result.

    Returns:
        Two traces per pair (curve, chord), then one legend-only grey dotted entry that says
        what the dotted lines are; the legend names each pair's barrier.
    """
    if not curves:
        raise ValueError("no interpolation curves to plot")
    looks = style_map(curves)
    fig = go.Figure()
    for label, c in curves.items():
        alphas = np.asarray(c["alphas"])
        chord = c["loss_a"] + alphas * (c["loss_b"] - c["loss_a"])
        fig.add_trace(
            go.Scatter(
                x=alphas,
                y=c["losses"],
                mode="lines+markers",
                name=f"{label} (barrier {c['barrier']:.3g})",
                line=looks[label].line(),
                marker=looks[label].marker(),
                legendgroup=label,
            )
        )
        fig.add_trace(
            go.Scatter(
                x=alphas,
                y=chord,
                mode="lines",
                name=f"{label} chord",
                line={"color": looks[label].color, "dash": "dot", "width": 1},
                opacity=0.7,
                legendgroup=label,
                showlegend=False,
            )
        )
    fig.add_trace(
        go.Scatter(
            x=[None],
            y=[None],
            mode="lines",
            name="chord (endpoints joined)",
            line={"color": MUTED, "dash": "dot", "width": 1},
            hoverinfo="skip",
        )
    )
    fig.update_xaxes(title="α  (θ = (1−α) θ_a + α θ_b)")
    fig.update_yaxes(title="loss")
    # wide enough for a legend of long pair names on the right
    return layout(fig, "Loss along linear interpolation paths", width=900, height=480)


def plot_displacement(displacements: Mapping[str, dict]) -> go.Figure:
    """Grouped bars of ‖θ − θ0‖ per layer, one bar colour per model; totals in the legend.

    Args:
        displacements: model label (e.g. "joint", "merged") → a `displacement` result.
    """
    if not displacements:
        raise ValueError("no displacements to plot")
    looks = style_map(displacements)
    fig = go.Figure()
    for label, d in displacements.items():
        groups = list(d["per_layer"])
        fig.add_trace(
            go.Bar(
                x=groups,
                y=[d["per_layer"][g] for g in groups],
                name=f"{label} (total {d['total']:.3g})",
                marker=looks[label].bar(),
            )
        )
    fig.update_xaxes(tickangle=-45)
    fig.update_yaxes(title="‖θ − θ0‖", rangemode="tozero")
    return layout(fig, "Distance to θ0 per layer", barmode="group", width=760, height=440)


def plot_perturbation(tables: Mapping[str, pd.DataFrame]) -> go.Figure:
    """Mean loss increase (± std over seeds) against the noise scale σ, a line per model.

    Args:
        tables: model label → a `perturbation_curve` table.
    """
    if not tables:
        raise ValueError("no perturbation tables to plot")
    looks = style_map(tables)
    fig = go.Figure()
    for label, table in tables.items():
        s = summarize_perturbation(table)
        fig.add_trace(
            go.Scatter(
                x=s.index,
                y=s["delta_mean"],
                error_y={"type": "data", "array": s["delta_std"], "visible": True},
                mode="lines+markers",
                name=label,
                line=looks[label].line(),
                marker=looks[label].marker(),
            )
        )
    fig.update_xaxes(title="σ")
    fig.update_yaxes(title="loss increase  L(θ + ε) − L(θ)")
    return layout(fig, "Flatness: loss under Gaussian weight noise", width=680, height=440)


def plot_spectral_filtering(table: pd.DataFrame) -> go.Figure:
    """Energy along each curvature eigenvector: branches (w-averaged) vs the merged model.

    A dot plot on a log axis (the energies span decades, and a bar on a log axis has no zero to
    start from): one marker per eigenvector and series, joined by a thin line.

    Args:
        table: a `spectral_filtering` result (with ``eigval`` when given, shown on hover).
    """
    x = [f"u{int(i)}" for i in table["direction"]]
    hover = [f"λ = {v:.3g}" for v in table["eigval"]] if "eigval" in table else [""] * len(x)
    fig = go.Figure()
    for col, name, color, symbol in (
        ("branch_energy", "branches  Σ w_i (uᵀδ_i)²", PALETTE[0], "circle"),
        ("merged_energy", "merged  (uᵀδ̄)²", PALETTE[1], "diamond"),
    ):
        fig.add_trace(
            go.Scatter(
                x=x,
                y=table[col],
                name=name,
                mode="lines+markers",
                hovertext=hover,
                line={
                    "color": color,
                    "width": 1,
                    "dash": "solid" if symbol == "circle" else "dash",
                },
                marker={"color": color, "symbol": symbol, "size": 8},
            )
        )
    fig.update_yaxes(title="energy", type="log")
    fig.update_xaxes(title="curvature eigenvector (descending λ)")
    return layout(fig, "Spectral filtering by the merge", width=680, height=420)


def figure_stem(label: str) -> str:
    """A file stem for a row or experiment label (``merit-2d+ties`` → ``merit-2d_ties``)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)


def plot_diagnostics_files(d: Mapping[str, dict]) -> dict[str, go.Figure]:
    """Every diagnostics figure of a run, by file stem, from its loaded ``diagnostics/*.json``.

    Args:
        d: diagnostic name ("paths", "displacement", "perturbation", "gain", ...) → the JSON
            document the diagnose stage wrote; missing ones are skipped.

    Returns:
        ``diag_paths_<exp>`` (train loss along each path), ``diag_displacement``,
        ``diag_perturbation``, ``diag_spectral_<row>``, as their documents exist.
    """
    figs: dict[str, go.Figure] = {}
    if "paths" in d:
        figs |= _path_figures(d["paths"]["paths"])
    if "displacement" in d:
        shown = {lb: v for lb, v in d["displacement"]["models"].items() if v["kind"] != "branch"}
        if shown:
            figs["diag_displacement"] = plot_displacement(shown)
    if "perturbation" in d:
        draws = pd.DataFrame(d["perturbation"]["draws"])
        tables = {lb: g for lb, g in draws.groupby("model", sort=False) if "/" not in lb}
        figs["diag_perturbation"] = plot_perturbation(tables or dict(list(draws.groupby("model"))))
    if "gain" in d:
        for e in d["gain"]["experiments"]:
            fig = plot_spectral_filtering(pd.DataFrame(e["spectral_filtering"]).astype(float))
            fig.update_layout(title={"text": f"Spectral filtering by the merge: {e['row']}"})
            figs[f"diag_spectral_{figure_stem(e['row'])}"] = fig
    return figs


def _path_figures(paths: list[dict]) -> dict[str, go.Figure]:
    """One interpolation figure per experiment, over its train-loss paths."""
    curves: dict[str, dict[str, dict]] = {}
    for p in paths:
        if p["split"] == "train":
            curves.setdefault(p["experiment"], {})[f"{p['a']} → {p['b']}"] = p
    figs = {}
    for exp, pairs in curves.items():
        fig = plot_interpolation(pairs)
        title = f"Train loss along linear paths: {figure_stem(exp)}"  # the legend names chords
        fig.update_layout(title={"text": title})
        figs[f"diag_paths_{figure_stem(exp)}"] = fig
    return figs
