"""The conflict heatmap at any number of sources, and finding a source in it.

Input: a `ConflictSpace` (its cosines C and clustering order) and an optional per-source table.
Output: the cell aggregation (`heatmap_cells`: contiguous runs of the clustering order, at most
`MAX_CELLS` a side, with the mean, min and max cosine of each pair of runs), its figure
(`plot_conflict_cells`, every cell's hover naming the sources it holds), `find_sources` (a
name search) and `mark_sources` (a band on the heatmap rows that hold given sources).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from merit_lab.analysis.conflict import ConflictSpace
from merit_lab.viz.style import layout

__all__ = [
    "MAX_CELLS",
    "HeatmapCells",
    "find_sources",
    "heatmap_cells",
    "mark_sources",
    "plot_conflict_cells",
]

# Display cells a side: above this many sources the heatmap shows runs of the clustering order
# (at T = 10,000, 200 runs of 50), which a browser draws at once; every source is still named in
# its cell's hover and found by `find_sources`.
MAX_CELLS = 200
_HOVER_NAMES = 6  # names listed per run in a hover; the rest are counted
_STRIP = 1024  # sources of C read at a time while aggregating


@dataclass(frozen=True)
class HeatmapCells:
    """The cosine matrix in clustering order, aggregated into runs of consecutive sources.

    Attributes:
        names: (T,) source names in clustering order (``space.order``).
        bounds: (n + 1,) int: run i holds ``names[bounds[i]:bounds[i + 1]]``; runs differ in
            size by at most one.
        mean, low, high: (n, n) float64 mean / min / max cosine between the sources of run i
            and of run j; on the diagonal over distinct pairs only (a source's own cosine, 1,
            never counts), NaN for a run of one source.
    """

    names: tuple[str, ...]
    bounds: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray

    def __post_init__(self) -> None:
        for arr in (self.bounds, self.mean, self.low, self.high):
            arr.setflags(write=False)  # shared by every caller of `heatmap_cells`

    @property
    def n_cells(self) -> int:
        return len(self.bounds) - 1

    def members(self, i: int) -> tuple[str, ...]:
        """The sources of run ``i``, in clustering order."""
        return self.names[self.bounds[i] : self.bounds[i + 1]]

    def cell_of(self, name: str) -> int:
        """The run that holds source ``name``."""
        try:
            pos = self.names.index(name)
        except ValueError:
            raise ValueError(f"unknown source {name!r}") from None
        return int(np.searchsorted(self.bounds, pos, side="right") - 1)

    def label(self, i: int) -> str:
        """Run i in a hover: its size, place and first names."""
        names = self.members(i)
        shown = ", ".join(names[:_HOVER_NAMES])
        more = f", … (+{len(names) - _HOVER_NAMES})" if len(names) > _HOVER_NAMES else ""
        lo, hi = int(self.bounds[i]) + 1, int(self.bounds[i + 1])
        where = f"#{lo}" if lo == hi else f"#{lo}–{hi}"
        return f"run {i} ({len(names)}: {where} in order): {shown}{more}"


def heatmap_cells(space: ConflictSpace, max_cells: int = MAX_CELLS) -> HeatmapCells:
    """Cut the clustering order into min(T, max_cells) runs and aggregate C over each pair.

    Reads C a strip of rows at a time (no permuted (T, T) copy): O(T²) work, about a second at
    T = 10,000. With T ≤ max_cells every run is one source and ``mean`` is C[order][:, order]
    with NaN on the diagonal.
    """
    if isinstance(max_cells, bool) or not isinstance(max_cells, int) or max_cells < 1:
        raise ValueError(f"max_cells must be a positive integer, got {max_cells!r}")
    # The explorer's figure and its search use the same runs: aggregate once per space.
    known = _CELLS.setdefault(space, {})
    if max_cells not in known:
        known[max_cells] = _aggregate(space, max_cells)
    return known[max_cells]


# Aggregations of the spaces still alive (a space is frozen, so its runs never change).
_CELLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _aggregate(space: ConflictSpace, max_cells: int) -> HeatmapCells:
    order = np.asarray(space.order)
    t = len(order)
    n = min(t, max_cells)
    bounds = np.round(np.linspace(0, t, n + 1)).astype(np.int64)
    starts = bounds[:-1]
    sizes = np.diff(bounds)
    total = np.zeros((n, n))
    low = np.full((n, n), np.inf)
    high = np.full((n, n), -np.inf)
    cell = np.repeat(np.arange(n), sizes)  # the run of each position in the order
    picked = np.empty((min(_STRIP, t), t))  # reused: fresh (strip, T) arrays fault every page
    ordered = np.empty_like(picked)
    for lo in range(0, t, _STRIP):
        hi = min(lo + _STRIP, t)
        np.take(space.cosine, order[lo:hi], axis=0, out=picked[: hi - lo])
        rows = np.take(picked[: hi - lo], order, axis=1, out=ordered[: hi - lo])  # in order
        # Reduce over the strip's rows run by run first (contiguous, fast), then over columns.
        first = np.flatnonzero(np.r_[True, cell[lo + 1 : hi] != cell[lo : hi - 1]])
        runs = cell[lo:hi][first]  # distinct within a strip
        own = (np.arange(hi - lo), np.arange(lo, hi))  # each source's own cosine
        rows[own] = 0.0
        total[runs] += np.add.reduceat(np.add.reduceat(rows, first, axis=0), starts, axis=1)
        rows[own] = np.inf
        part = np.minimum.reduceat(np.minimum.reduceat(rows, first, axis=0), starts, axis=1)
        low[runs] = np.minimum(low[runs], part)
        rows[own] = -np.inf
        part = np.maximum.reduceat(np.maximum.reduceat(rows, first, axis=0), starts, axis=1)
        high[runs] = np.maximum(high[runs], part)
    pairs = np.outer(sizes, sizes) - np.diag(sizes)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(pairs > 0, total / pairs, np.nan)
    low[pairs == 0] = np.nan
    high[pairs == 0] = np.nan
    names = tuple(space.names[i] for i in order)
    return HeatmapCells(names, bounds, mean, low, high)


def plot_conflict_cells(
    space: ConflictSpace,
    table: pd.DataFrame | None = None,
    *,
    max_cells: int = MAX_CELLS,
    highlight: str | Sequence[str] = (),
) -> go.Figure:
    """The cosine matrix in clustering order, drawn as at most ``max_cells`` runs a side.

    Each cell is the mean cosine between two runs of consecutive sources in the clustering
    order; its hover gives both runs (size, place, first names), the mean and the min/max, and
    with ``table`` and one-source runs that source's table columns. ``highlight``: sources
    whose rows get a band (`mark_sources`).

    Returns:
        A figure whose last trace is a heatmap of ``HeatmapCells.mean`` (n × n, n =
        min(T, max_cells)) on category axes whose values are the runs' hover labels.
    """
    cells = heatmap_cells(space, max_cells)
    n, t = cells.n_cells, len(cells.names)
    labels = [cells.label(i) for i in range(n)]
    if table is not None and n == t:  # one source per run: its columns too
        cols = [c for c in table.columns if c != "source"][:6]
        labels = [
            lab + "".join(f"<br>{c}: {table.loc[nm, c]}" for c in cols if nm in table.index)
            for lab, nm in zip(labels, cells.names, strict=True)
        ]
    span = [
        [
            ""
            if np.isnan(cells.low[i, j])
            else f"min {cells.low[i, j]:+.3f}, max {cells.high[i, j]:+.3f}"
            for j in range(n)
        ]
        for i in range(n)
    ]
    off = cells.mean[np.isfinite(cells.mean)]
    lim = float(np.abs(off).max()) if off.size else 1.0
    fig = go.Figure(
        go.Heatmap(
            z=cells.mean,
            x=labels,  # category axes: run i sits at position i
            y=labels,
            zmin=-lim,
            zmax=lim,
            colorscale="RdBu_r",
            text=span,
            hovertemplate="<b>rows</b> %{y}<br><b>× columns</b> %{x}<br>mean cos = %{z:+.3f}"
            "<br>%{text}<extra></extra>",
            colorbar={"title": "mean cos" if n < t else "cos"},
            name="cosine",
        )
    )
    fig.update_xaxes(showticklabels=False, ticks="", title=f"{t:,} sources in clustering order")
    fig.update_yaxes(showticklabels=False, ticks="", autorange="reversed")
    title = "Gradient conflict matrix C (clustered)"
    if n < t:
        title += f": {n} runs of ~{t // n} sources"
    layout(fig, title, width=760, height=700)
    return mark_sources(fig, cells, highlight)


def mark_sources(
    fig: go.Figure, cells: HeatmapCells, sources: str | Sequence[str], *, replace: bool = True
) -> go.Figure:
    """Draw a band along the heatmap row and column of the run holding each source, with the
    source's name at the row's left end.

    ``fig``'s last trace is the heatmap of ``cells`` (`plot_conflict_cells`, or the clustermap
    of `merit_lab.viz.plots.plot_conflict_clustermap` with one source per run); the bands go on
    that trace's axes. ``replace`` removes the bands of an earlier call first.
    """
    sources = [sources] if isinstance(sources, str) else list(sources)
    runs = [(name, cells.cell_of(name)) for name in sources]  # unknown names fail first
    if replace:
        fig.layout.shapes = [s for s in fig.layout.shapes if not _is_mark(s)]
        fig.layout.annotations = [a for a in fig.layout.annotations if not _is_mark(a)]
    heat = fig.data[-1]
    ref = {"xref": heat.xaxis or "x", "yref": heat.yaxis or "y"}
    n = cells.n_cells
    for name, i in runs:
        for x0, x1, y0, y1 in (
            (-0.5, n - 0.5, i - 0.5, i + 0.5),
            (i - 0.5, i + 0.5, -0.5, n - 0.5),
        ):
            fig.add_shape(
                type="rect",
                x0=x0,
                x1=x1,
                y0=y0,
                y1=y1,
                line={"color": "#111111", "width": 1.5},
                name=f"{_MARK}{name}",
                **ref,
            )
        fig.add_annotation(  # inside the band, at its left end (a data x would widen x)
            x=0.01,
            y=i,
            text=f"{name} (run {i})" if n < len(cells.names) else name,
            showarrow=False,
            xanchor="left",
            bgcolor="rgba(255,255,255,0.85)",
            font={"size": 10},
            name=f"{_MARK}{name}",
            xref=f"{ref['xref']} domain",
            yref=ref["yref"],
        )
    return fig


_MARK = "marked source: "


def _is_mark(item: object) -> bool:
    return str(getattr(item, "name", None) or "").startswith(_MARK)


def find_sources(names: Sequence[str], query: str, limit: int = 20) -> list[str]:
    """Sources whose name contains ``query`` (case-insensitive): an exact match first, then
    names that start with it, then the rest, each in the given order; at most ``limit``."""
    q = query.strip().lower()
    if not q:
        return []
    exact = [n for n in names if n.lower() == q]
    start = [n for n in names if n.lower().startswith(q) and n.lower() != q]
    inside = [n for n in names if q in n.lower() and not n.lower().startswith(q)]
    return (exact + start + inside)[:limit]
