"""The conflict explorer: clustered heatmap, PCA scatter, explained variance, allies/conflicts,
and a search box that finds a source by name (any T: above 200 sources the heatmap shows runs of
the clustering order, `merit_lab.viz.plots_heatmap`).

Input: a run's ``ConflictSpace`` and per-source table (``load_source_table``), optionally its
`FoldStability` (each cosine's standard error on hover, unstable sources ringed in the scatter).
Output: a widget for a notebook (every panel is also a figure or a DataFrame, so it runs from
Python too).
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go

from merit_lab.analysis.conflict import ConflictSpace
from merit_lab.partition.folds import FoldStability
from merit_lab.viz.figure_view import FigureView, align_table
from merit_lab.viz.plots import (
    plot_conflict_clustermap,
    plot_conflict_scatter,
    plot_explained_variance,
)
from merit_lab.viz.plots_examples import plot_example_cloud
from merit_lab.viz.plots_heatmap import find_sources, heatmap_cells, mark_sources
from merit_lab.viz.plots_stability import (
    FLIP_THRESHOLD,
    add_fold_errors,
    mark_unstable_sources,
)

__all__ = ["ConflictExplorer"]

# A numeric column with more distinct values than this is a quantity (token counts, losses),
# drawn on a colour scale, not as categories.
MAX_NUMERIC_LEVELS = 8


class ConflictExplorer:
    """Clustered heatmap with dendrogram, PCA scatter, explained variance and a per-source panel.

    Attributes:
        heatmap: the dendrogram + heatmap figure (``plot_conflict_clustermap``).
        scatter: the PCA scatter; ``color`` and ``dims`` redraw it.
        variance: explained-variance bars.
        color: Dropdown of table columns to colour the scatter by ("(none)" for one colour).
        dims: ToggleButtons, 2 or 3 (labels "2-D", "3-D").
        source: Dropdown of sources for the panel; ``n_neighbours``: how many to list.
        search: Text box: a name (or part of one) to find (`find`); ``matches`` lists the hits.
        panel: HTML with the selected source's allies and conflicts.
        cloud: Dropdown of sources whose calibration examples to draw around their point in the
            scatter ("(none)": sources only); present only with ``examples``.
        widget: the VBox to display.

    Args:
        space: the run's conflict space.
        table: per-source columns (``load_source_table``); metadata, counts and groups appear
            on hover and in the colour dropdown.
        examples: the example table (``examples.parquet``, `merit_lab.analysis.examples`): with it
            the scatter can show one source's examples as a cloud, their text on hover.
        folds: the run's fold stability (``load_fold_stability(run_dir)``): each cell's hover
            shows ``cos ± SE``, the PCA scatter rings the sources that change group between
            halves of the calibration examples at ``fold_r`` (`mark_unstable_sources`), and the
            per-source panel gives each listed cosine's standard error and the source's
            probability of changing group.
        fold_r: the split depth whose unstable sources are ringed (the run's r; default 2).
    """

    NONE = "(none)"

    def __init__(
        self,
        space: ConflictSpace,
        table: pd.DataFrame | None = None,
        examples: pd.DataFrame | None = None,
        *,
        folds: FoldStability | None = None,
        fold_r: int = 2,
    ) -> None:
        self.space = space
        self.folds, self.fold_r = folds, fold_r
        self.examples: pd.DataFrame | None = None
        self.cloud = widgets.Dropdown(options=[self.NONE], description="examples of")
        self.cloud.layout.display = "none"  # shown once there are examples (`set_examples`)
        self.table = align_table(table, space.names)
        columns = [c for c in self.table.columns if c != "source"]
        default = next((c for c in ("group", "family") if c in columns), self.NONE)
        self.color = widgets.Dropdown(
            options=[self.NONE, *columns], value=default, description="colour by"
        )
        self.dims = widgets.ToggleButtons(
            options=[("2-D", 2), ("3-D", 3)], value=2, description="scatter"
        )
        self.dims.disabled = space.n_sources < 3
        self.source = widgets.Dropdown(options=list(space.names), description="source")
        self.n_neighbours = widgets.BoundedIntText(
            value=min(5, space.n_sources - 1),
            min=1,
            max=max(space.n_sources - 1, 1),
            description="show",
        )
        self.panel = widgets.HTML()
        self.search = widgets.Text(description="find", placeholder="source name or part of it")
        self.matches = widgets.HTML()

        heatmap = plot_conflict_clustermap(space, self.table)
        rows = len(heatmap.data[-1].z)  # T, or the runs of `plot_conflict_cells` above 200
        if folds is not None and rows == space.n_sources:  # per-source cells only
            heatmap = add_fold_errors(heatmap, folds)
        self._heatmap = FigureView(heatmap)
        self._cells = heatmap_cells(space, rows)  # the heatmap's rows, for `find`
        self._scatter = FigureView(self.scatter_figure(self.color.value, self.dims.value))
        self._variance = FigureView(plot_explained_variance(space))
        self.color.observe(self._redraw_scatter, names="value")
        self.cloud.observe(self._redraw_scatter, names="value")
        self.dims.observe(self._redraw_scatter, names="value")
        self.source.observe(self._redraw_panel, names="value")
        self.n_neighbours.observe(self._redraw_panel, names="value")
        self.search.observe(lambda change: self.find(change["new"]), names="value")
        self._redraw_panel()
        if examples is not None:
            self.set_examples(examples)
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.search, self.matches]),
                self._heatmap.view,
                widgets.HBox([self.color, self.dims, self.cloud]),
                widgets.HBox([self._scatter.view, self._variance.view]),
                widgets.HBox([self.source, self.n_neighbours]),
                self.panel,
            ]
        )

    @property
    def heatmap(self) -> go.Figure:
        return self._heatmap.fig

    @property
    def scatter(self) -> go.Figure:
        return self._scatter.fig

    @property
    def variance(self) -> go.Figure:
        return self._variance.fig

    def find(self, query: str) -> list[str]:
        """The sources whose name contains ``query`` (`find_sources`: exact match first); the
        first becomes the panel's source (its allies and conflicts) and its heatmap row and
        column are marked. ``matches`` shows how many matched. Returns the matches."""
        found = find_sources(self.space.names, query)
        more = len(find_sources(self.space.names, query, limit=len(self.space.names)))
        if not found:
            self.matches.value = "no source matches" if query.strip() else ""
            return found
        listed = ", ".join(html.escape(n) for n in found[:5]) + (", …" if more > 5 else "")
        self.matches.value = f"{more} match{'es' if more > 1 else ''}: {listed}"
        self.source.value = found[0]
        mark_sources(self._heatmap.fig, self._cells, found[0])
        self._heatmap.refresh()
        return found

    def scatter_figure(self, color: str | None = None, dims: int = 2) -> go.Figure:
        """The PCA scatter coloured by a table column.

        A numeric column with more than `MAX_NUMERIC_LEVELS` distinct values gets a continuous
        colour scale (one trace); any other column one trace per value. With ``folds``, a last
        trace rings the sources that change group between folds (`mark_unstable_sources`).
        """
        color = None if color in (None, self.NONE) else color
        values = self.table[color] if color else None
        if values is None or not (
            pd.api.types.is_numeric_dtype(values) and values.nunique() > MAX_NUMERIC_LEVELS
        ):
            fig = plot_conflict_scatter(self.space, self.table, color=color, dims=dims)
        else:
            fig = plot_conflict_scatter(self.space, self.table, dims=dims)
            fig.update_traces(
                marker={
                    "color": values.to_numpy(),
                    "colorscale": "Viridis",
                    "showscale": True,
                    "colorbar": {"title": color},
                },
            )
            fig.update_layout(title_text=f"Conflict space, coloured by {color}")
        if self.folds is not None:
            mark_unstable_sources(fig, self.space, self.folds, self.fold_r)
        return fig

    def allies_and_conflicts(self, source: str, n: int = 5) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The ``n`` sources most aligned with ``source`` and the ``n`` most opposed.

        Returns:
            (allies, conflicts): frames with ``source``, ``cosine`` (with ``folds``: ``se``,
            its fold standard error) and the table's other columns, allies by decreasing cosine,
            conflicts by increasing cosine; ``source`` itself is never listed.
        """
        i = self.space.index(source)
        cos = pd.Series(self.space.cosine[i], index=self.space.names).drop(source)
        extra = self.table.drop(columns=["source"]).loc[cos.index]
        se = [] if self.folds is None else [self._fold_se(source, cos.index)]
        frame = pd.concat([cos.rename("cosine"), *se, extra], axis=1)
        frame.insert(0, "source", cos.index)
        # mergesort is stable: ties keep the space's source order, in both directions.
        allies = frame.sort_values("cosine", ascending=False, kind="mergesort").head(n)
        conflicts = frame.sort_values("cosine", ascending=True, kind="mergesort").head(n)
        return allies.reset_index(drop=True), conflicts.reset_index(drop=True)

    def _fold_se(self, source: str, others: pd.Index) -> pd.Series:
        """The fold standard error of each cosine of ``source`` with ``others`` (NaN where the
        stability lacks a source)."""
        pos = {s: i for i, s in enumerate(self.folds.names)}
        row = pos.get(source)
        values = [
            self.folds.cosine_se[row, pos[s]] if row is not None and s in pos else float("nan")
            for s in others
        ]
        return pd.Series(values, index=others, name="se")

    def fold_note(self, source: str) -> str:
        """One line on ``source``'s place in the split across folds ("" without ``folds`` or
        when ``fold_r`` was not measured)."""
        if self.folds is None or self.fold_r not in self.folds.flip:
            return ""
        if source not in self.folds.names:
            return f"{source}: not in the fold stability"
        p = float(self.folds.flip[self.fold_r][self.folds.names.index(source)])
        return (
            f"{source} changes group between disjoint halves of the calibration examples in "
            f"{p:.0%} of pairings (r = {self.fold_r})"
            + ("; its place in the split is uncertain." if p >= FLIP_THRESHOLD else ".")
        )

    def set_examples(self, examples: pd.DataFrame) -> None:
        """Give the explorer the example table (``load_example_table``): the ``cloud``
        dropdown appears, listing the sources that have examples."""
        self.examples = examples
        have = set(examples["source"])
        self.cloud.options = [self.NONE, *(n for n in self.space.names if n in have)]
        self.cloud.layout.display = None

    def example_cloud(self, source: str) -> go.Figure:
        """The 2-D scatter with ``source``'s calibration examples around its point
        (`plot_example_cloud`); needs ``examples``."""
        if self.examples is None:
            raise ValueError("no example table: pass examples=load_example_table(run)")
        color = None if self.color.value == self.NONE else self.color.value
        return plot_example_cloud(self.space, self.examples, source, self.table, color=color)

    def _redraw_scatter(self, _change: Any = None) -> None:
        if self.cloud.value != self.NONE:
            self._scatter.replace(self.example_cloud(self.cloud.value))
            return
        self._scatter.replace(self.scatter_figure(self.color.value, self.dims.value))

    def _redraw_panel(self, _change: Any = None) -> None:
        allies, conflicts = self.allies_and_conflicts(self.source.value, self.n_neighbours.value)
        fmt = {"cosine": "{:+.3f}".format, "se": "±{:.3f}".format}
        note = self.fold_note(self.source.value)
        self.panel.value = (
            f"<h4>{html.escape(self.source.value)}</h4>"
            + (f"<p>{html.escape(note)}</p>" if note else "")
            + f"<b>Nearest allies</b> (highest cosine){allies.to_html(index=False, formatters=fmt)}"
            f"<b>Strongest conflicts</b> (lowest cosine)"
            f"{conflicts.to_html(index=False, formatters=fmt)}"
        )
