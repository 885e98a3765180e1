"""A plotly figure shown in a notebook widget that updates in place, and the per-source table the
explorer and the editor hover with.

Input: a ``go.Figure`` (or a per-source DataFrame). Output: a widget to display, redrawn after
each change (a live ``FigureWidget`` when anywidget is installed, else an ``Output``).
"""

from __future__ import annotations

from collections.abc import Sequence

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go

__all__ = ["FigureView", "align_table"]


class FigureView:
    """A figure and the widget that shows it.

    ``go.FigureWidget`` (live, with selection events) needs the ``anywidget`` package under
    plotly ≥ 6; without it the figure is a plain ``go.Figure`` redrawn into an ``Output``
    after each change, and selection falls back to the editor's dropdowns.

    Attributes:
        fig: the figure to update (a ``FigureWidget`` when ``live``).
        live: whether ``fig`` is a live widget.
        view: the widget to put in a layout.
    """

    def __init__(self, fig: go.Figure) -> None:
        try:
            self.fig: go.Figure = go.FigureWidget(fig)
            self.live = True
        except ImportError:
            self.fig, self.live = fig, False
        self.view = self.fig if self.live else widgets.Output()
        self.refresh()

    def replace(self, fig: go.Figure) -> None:
        """Swap in another figure's traces and layout (trace kinds may change, e.g. 2-D → 3-D)."""
        self.fig.data = ()
        self.fig.add_traces(list(fig.data))
        self.fig.layout = fig.layout
        self.refresh()

    def refresh(self) -> None:
        """Redraw a non-live figure into its ``Output`` (a live one redraws itself)."""
        if self.live:
            return
        from IPython import get_ipython
        from IPython.display import display

        if get_ipython() is None:  # plain Python (tests, scripts): nothing to draw into
            return
        with self.view:
            self.view.clear_output(wait=True)
            display(self.fig)


def align_table(
    table: pd.DataFrame | None, names: Sequence[str], *, strict: bool = True
) -> pd.DataFrame:
    """The table indexed by source name, one row per name, in ``names`` order.

    Args:
        table: per-source columns, indexed by name or with a ``source`` column (None: names only).
        names: the sources to keep, in order.
        strict: raise when a name has no row; otherwise its row is empty (NaN).
    """
    names = list(names)
    if table is None:
        return pd.DataFrame({"source": names}, index=pd.Index(names))
    if "source" in table.columns and not set(names) <= set(table.index):
        table = table.set_index("source", drop=False)
    missing = [n for n in names if n not in table.index]
    if missing and strict:
        raise ValueError(f"table has no row for sources: {missing}")
    out = table.reindex(names) if missing else table.loc[names].copy()
    out.index.name = None
    out["source"] = names
    return out[["source", *[c for c in out.columns if c != "source"]]]
