from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from merit_lab.analysis.conflict import compute_conflict_space
from merit_lab.viz.export import save_figure
from merit_lab.viz.plots import (
    INACTIVE_SYMBOLS,
    plot_comparison,
    plot_conflict_clustermap,
    plot_conflict_heatmap,
    plot_conflict_scatter,
    plot_explained_variance,
    plot_training_curves,
)
from merit_lab.viz.style import MUTED, PALETTE, paper_layout


@pytest.fixture(scope="module")
def space():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    rows = [
        s * a + t * b + 0.3 * rng.normal(size=50) for s in (1, -1) for t in (1, -1) for _ in "xy"
    ]
    return compute_conflict_space(np.stack(rows), [f"s{i}" for i in range(8)])


def test_heatmap_shows_c_in_clustering_order(space):
    fig = plot_conflict_heatmap(space)
    order = list(space.order)
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), space.cosine[np.ix_(order, order)])
    assert list(fig.data[0].x) == [space.names[i] for i in order]
    assert fig.data[0].zmin == -fig.data[0].zmax  # diverging scale centred at 0


def test_scatter_points_are_the_embedding(space):
    table = pd.DataFrame(
        {"source": space.names, "group": ["A"] * 4 + ["B"] * 4}, index=list(space.names)
    )
    fig = plot_conflict_scatter(space, table, color="group")
    assert [t.name for t in fig.data] == ["A", "B"]
    for trace, idx in zip(fig.data, (range(4), range(4, 8)), strict=True):
        z = space.coords(2)[list(idx)]
        np.testing.assert_allclose(trace.x, z[:, 0])
        np.testing.assert_allclose(trace.y, z[:, 1])
    fig3 = plot_conflict_scatter(space, dims=3)
    np.testing.assert_allclose(fig3.data[0].z, space.coords(3)[:, 2])
    bars = plot_explained_variance(space, top=3)
    np.testing.assert_allclose(bars.data[0].y, space.explained_variance_ratio[:3])


def test_scatter_draws_sources_in_no_row_apart(space):
    """A curated run's table: dropped and unplaced sources, one source the space lacks, and one
    table row the space lacks (a source added to mixture.json after the conflict stage)."""
    groups = ["G0", "G0", "dropped", "G1", "G1", "unplaced", "G1"]
    table = pd.DataFrame({"group": groups}, index=list(space.names[:7]))
    table.loc["new-source", "group"] = "unplaced"
    for dims in (2, 3):
        fig = plot_conflict_scatter(space, table, color="group", dims=dims)
        assert [t.name for t in fig.data] == ["G0", "G1", "dropped", "unplaced", "n/a"]
        assert [t.marker.color for t in fig.data[:2]] == list(PALETTE[:2])  # groups keep theirs
        for t in fig.data[2:]:
            assert t.marker.color == MUTED and t.marker.symbol == INACTIVE_SYMBOLS[t.name]
        shown = [n.split("<br>")[0][3:-4] for t in fig.data for n in t.text]
        assert sorted(shown) == sorted(space.names)  # every source of the space, once
    for fig in (plot_conflict_heatmap(space, table), plot_conflict_clustermap(space, table)):
        assert "group: dropped" in str(fig.data[-1].text)


def test_comparison_and_training_figures_hold_their_numbers():
    wide = pd.DataFrame({"add": [10.0, 50.0], "avg": [10.0, 50.0]}, index=["theta0", "merged"])
    bars = plot_comparison(wide, metric="exact_match")
    assert [t.name for t in bars.data] == ["theta0", "merged"]
    np.testing.assert_allclose(bars.data[1].y, [50.0, 50.0])
    assert "Exact match" in bars.layout.title.text
    logs = {"joint/ep1-s0": [{"loss": 2.0, "tokens": 10}, {"loss": 1.0, "tokens": 20}], "x": []}
    curves = plot_training_curves(logs, smooth=1)
    assert len(curves.data) == 1
    np.testing.assert_allclose(curves.data[0].y, [2.0, 1.0])


def test_save_figure_writes_html_even_without_a_static_renderer(space, tmp_path):
    written = save_figure(plot_explained_variance(space), tmp_path / "ev")
    assert written[0] == tmp_path / "ev.html"
    assert "plotly" in written[0].read_text()[:100000].lower()


def test_training_curves_one_colour_and_one_legend_entry_per_experiment():
    rows = [{"loss": 1.0, "tokens": 10}, {"loss": 0.5, "tokens": 20}]
    logs = {"joint/ep1-s0": rows, "branches/m/0": rows, "branches/m/1": rows, "branches/r/0": rows}
    fig = plot_training_curves(logs)
    assert [t.name for t in fig.data] == ["joint ep1-s0", "m", "m", "r"]
    assert [t.showlegend for t in fig.data] == [True, True, False, True]
    colors = [t.line.color for t in fig.data]
    assert colors[1] == colors[2] and len({colors[0], colors[1], colors[3]}) == 3


def test_paper_layout_grows_by_the_legend_rows_it_needs():
    """Twelve long legend entries need rows of their own: the plot keeps its height."""

    def fig(n: int) -> go.Figure:
        return go.Figure(
            [go.Scatter(x=[0, 1], y=[0, 1], name=f"branch {i} → merged model") for i in range(n)]
        ).update_layout(width=700, height=450)

    one, twelve = paper_layout(fig(1)).layout.height, paper_layout(fig(12)).layout.height
    assert twelve - one == 11 * (3 * 9 + 1)  # one entry per row at column width, font 9
    assert len(PALETTE) >= 9 and len(set(PALETTE)) == len(PALETTE)
