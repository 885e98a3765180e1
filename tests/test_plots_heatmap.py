"""The conflict heatmap at any T: the run aggregation against a brute-force one, the delegation
of the heatmap builders above `MAX_CELLS`, the name search and the marked rows (figures and the
explorer's search box)."""

from __future__ import annotations

import numpy as np
import pytest

from merit_lab.analysis.conflict import space_from_cosine
from merit_lab.viz import plots, plots_heatmap
from merit_lab.viz.explorer import ConflictExplorer
from merit_lab.viz.plots_heatmap import (
    find_sources,
    heatmap_cells,
    mark_sources,
    plot_conflict_cells,
)


def _space(t: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, 6)) + np.repeat(rng.standard_normal((3, 6)), -(-t // 3), 0)[:t]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return space_from_cosine(x @ x.T, [f"src-{i:03d}" for i in range(t)])


@pytest.mark.parametrize("strip", [4, 1024], ids=["strips-across-runs", "one-strip"])
def test_cells_equal_a_brute_force_aggregation(monkeypatch, strip):
    monkeypatch.setattr(plots_heatmap, "_STRIP", strip)
    space = _space(23)
    cells = heatmap_cells(space, max_cells=5)
    sizes = np.diff(cells.bounds)
    assert cells.n_cells == 5 and sizes.sum() == 23 and sizes.max() - sizes.min() <= 1
    order = list(space.order)
    c = space.cosine[np.ix_(order, order)]
    for i in range(5):
        ri = range(cells.bounds[i], cells.bounds[i + 1])
        assert cells.members(i) == tuple(space.names[order[p]] for p in ri)
        for j in range(5):
            rj = range(cells.bounds[j], cells.bounds[j + 1])
            vals = [c[a, b] for a in ri for b in rj if a != b]
            assert cells.mean[i, j] == pytest.approx(np.mean(vals), abs=1e-12)
            assert cells.low[i, j] == min(vals) and cells.high[i, j] == max(vals)
    for name in space.names:
        assert name in cells.members(cells.cell_of(name))
    # aggregated once per space and size (the explorer's figure and its search share it)
    assert heatmap_cells(space, max_cells=5) is cells
    assert heatmap_cells(space, max_cells=6) is not cells
    assert not cells.mean.flags.writeable
    with pytest.raises(ValueError, match="unknown source"):
        cells.cell_of("nope")


def test_one_source_per_run_is_the_ordered_matrix():
    space = _space(9)
    cells = heatmap_cells(space, max_cells=50)
    order = list(space.order)
    expect = space.cosine[np.ix_(order, order)].copy()
    np.fill_diagonal(expect, np.nan)
    np.testing.assert_allclose(cells.mean, expect, equal_nan=True)
    assert np.isnan(np.diag(cells.low)).all()
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="max_cells"):
            heatmap_cells(space, max_cells=bad)


def test_builders_aggregate_above_max_cells_and_hover_names_the_runs(monkeypatch):
    space = _space(30)
    small = plots.plot_conflict_heatmap(space)
    np.testing.assert_array_equal(
        np.asarray(small.data[-1].z), space.cosine[np.ix_(space.order, space.order)]
    )
    monkeypatch.setattr(plots, "MAX_CELLS", 6)
    for build in (plots.plot_conflict_heatmap, plots.plot_conflict_clustermap):
        fig = build(space)
        heat = fig.data[-1]
        assert np.asarray(heat.z).shape == (6, 6)
        assert len(fig.data) == 1  # no dendrogram over runs
        first = heat.y[0]
        assert first.startswith("run 0 (5: #1–5 in order): ")
        assert all(n in first for n in heatmap_cells(space, 6).members(0))
        assert heat.text[0][1].startswith("min ")
        assert "200" not in fig.layout.title.text and "6 runs of ~5" in fig.layout.title.text


def test_find_sources_ranks_exact_then_prefix_then_inside():
    names = ["alpha-2", "beta", "Alpha", "the-alpha", "gamma", "alpha"]
    assert find_sources(names, "ALPHA") == ["Alpha", "alpha", "alpha-2", "the-alpha"]
    assert find_sources(names, "alpha", limit=2) == ["Alpha", "alpha"]
    assert find_sources(names, "  ") == []
    assert find_sources(names, "delta") == []


def test_marks_go_on_the_heatmap_axes_and_replace_earlier_ones():
    space = _space(40)
    cells = heatmap_cells(space, max_cells=8)
    fig = plot_conflict_cells(space, max_cells=8, highlight="src-007")
    i = cells.cell_of("src-007")
    bands = [s for s in fig.layout.shapes if s.name == "marked source: src-007"]
    assert {(s.y0, s.y1) for s in bands} >= {(i - 0.5, i + 0.5)}
    assert {(s.x0, s.x1) for s in bands} >= {(i - 0.5, i + 0.5)}
    mark_sources(fig, cells, ["src-001", "src-030"])
    marked = {s.name for s in fig.layout.shapes}
    assert marked == {"marked source: src-001", "marked source: src-030"}
    assert len(fig.layout.annotations) == 2
    with pytest.raises(ValueError, match="unknown source"):
        mark_sources(fig, cells, "missing")
    clustermap = plots.plot_conflict_clustermap(space)  # subplots: the heatmap is on x2/y2
    mark_sources(clustermap, heatmap_cells(space), "src-003")
    assert {s.xref for s in clustermap.layout.shapes} == {"x2"}
    pos = list(space.order).index(3)
    assert any(s.y0 == pos - 0.5 for s in clustermap.layout.shapes)


def test_explorer_search_selects_and_marks_the_source(monkeypatch):
    monkeypatch.setattr(plots, "MAX_CELLS", 10)
    space = _space(40)
    ex = ConflictExplorer(space)
    assert np.asarray(ex.heatmap.data[-1].z).shape == (10, 10)
    ex.search.value = "SRC-01"  # typing in the box runs `find`
    assert ex.source.value == "src-010"
    assert ex.matches.value.startswith("10 matches: src-010")
    assert {s.name for s in ex.heatmap.layout.shapes} == {"marked source: src-010"}
    assert ex.find("src-039") == ["src-039"] and ex.source.value == "src-039"
    assert {s.name for s in ex.heatmap.layout.shapes} == {"marked source: src-039"}
    assert ex.find("zzz") == [] and ex.matches.value == "no source matches"
    assert ex.source.value == "src-039"
