"""Interactive workbench: a conflict explorer and a partition editor (ipywidgets + plotly).

Input: a run's ``ConflictSpace`` and per-source table (``load_source_table``), optionally the
gradient rows. Output: live figures and widgets for a notebook; the editor writes a hand-edited
partition.json. Every button has a plain method behind it, so the widgets run from Python too.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import html
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from merit_lab.conflict import ConflictSpace, compute_conflict_space
from merit_lab.partition import Partition, predict_gain
from merit_lab.pipeline import make_partition
from merit_lab.plots import (
    PALETTE,
    color_map,
    plot_conflict_clustermap,
    plot_conflict_scatter,
    plot_explained_variance,
)

__all__ = [
    "ConflictExplorer",
    "PartitionEditor",
    "group_statistics",
    "place_sources",
    "project_onto_space",
]

DROPPED_COLOR = "#BBBBBB"
METHODS = (("balanced PCA", "balanced"), ("random", "random"), ("k-means", "kmeans"))


# ---------------------------------------------------------------------------------------------
# Figures that update in place


class _FigureView:
    """A figure and the widget that shows it.

    ``go.FigureWidget`` (live, with selection events) needs the ``anywidget`` package under
    plotly ≥ 6; without it the figure is a plain ``go.Figure`` redrawn into an ``Output``
    after each change, and selection falls back to the editor's dropdowns.
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
        if self.live:
            return
        from IPython import get_ipython
        from IPython.display import display

        if get_ipython() is None:  # plain Python (tests, scripts): nothing to draw into
            return
        with self.view:
            self.view.clear_output(wait=True)
            display(self.fig)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no USER/LOGNAME and no passwd entry (some containers)
        return "unknown"


def _group_label(k: int) -> str:
    return f"G{k}"


def _align_table(table: pd.DataFrame | None, names: Sequence[str]) -> pd.DataFrame:
    """The table indexed by source name, one row per name, in ``names`` order."""
    if table is None:
        return pd.DataFrame({"source": list(names)}, index=pd.Index(list(names), name=None))
    if "source" in table.columns and not set(names) <= set(table.index):
        table = table.set_index("source", drop=False)
    missing = [n for n in names if n not in table.index]
    if missing:
        raise ValueError(f"table has no row for sources: {missing}")
    out = table.loc[list(names)].copy()
    if "source" not in out.columns:
        out.insert(0, "source", list(names))
    return out


def _align_rows(rows: Any, names: Sequence[str]) -> np.ndarray | None:
    """(T, d) float64 rows in ``names`` order from an array (already in that order) or a bank."""
    if rows is None:
        return None
    if hasattr(rows, "names") and hasattr(rows, "rows"):  # a GradientBank
        rows = rows.select(list(names)).rows
    if hasattr(rows, "detach"):
        rows = rows.detach().cpu().numpy()
    arr = np.asarray(rows, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != len(names):
        raise ValueError(f"rows must be ({len(names)}, d), got {arr.shape}")
    return arr


# ---------------------------------------------------------------------------------------------
# Pure computations behind the widgets


def group_statistics(
    partition: Partition,
    space: ConflictSpace,
    rows: np.ndarray | None = None,
    *,
    eta: float = 1.0,
) -> pd.DataFrame:
    """Per-group statistics of a partition.

    Args:
        partition: the grouping (its sources must all be in ``space``).
        space: cosines between the sources.
        rows: (T, d) gradients in ``space.names`` order; adds the ``gain`` column.
        eta: learning-rate scale of the predicted gain.

    Returns:
        One row per group, indexed "G0".."G{K-1}": ``sources``, ``examples``, ``tokens``,
        ``weight`` (token share, sums to 1), ``cohesion`` (mean cosine over pairs inside the
        group; NaN for a single source), ``conflict`` (mean cosine between the group's sources
        and the other groups' sources; NaN for K = 1) and, with ``rows``, ``gain``: the
        group's term ½ η² w_k ‖ḡ_k − ḡ‖² of ``predict_gain`` (the column sums to it).
    """
    members = [[space.index(s) for s in g] for g in partition.groups]
    placed = [i for g in members for i in g]
    c = space.cosine
    cohesion, conflict = [], []
    for g in members:
        block = c[np.ix_(g, g)]
        pairs = block[np.triu_indices(len(g), k=1)]
        cohesion.append(float(pairs.mean()) if pairs.size else math.nan)
        others = [i for i in placed if i not in g]
        conflict.append(float(c[np.ix_(g, others)].mean()) if others else math.nan)
    frame = pd.DataFrame(
        {
            "sources": [len(g) for g in partition.groups],
            "examples": list(partition.group_examples),
            "tokens": list(partition.group_tokens),
            "weight": list(partition.weights),
            "cohesion": cohesion,
            "conflict": conflict,
        },
        index=pd.Index([_group_label(k) for k in range(partition.k)], name="group"),
    )
    if rows is not None:
        w = np.asarray(partition.weights)
        means = []
        for g, idx in zip(partition.groups, members, strict=True):
            tok = np.array([partition.tokens[s] for s in g], dtype=np.float64)
            means.append(tok @ rows[idx] / tok.sum())
        gbar = w @ np.stack(means)
        frame["gain"] = [
            0.5 * eta**2 * wk * float(np.sum((m - gbar) ** 2))
            for wk, m in zip(w, means, strict=True)
        ]
    return frame


def _within_between(partition: Partition, space: ConflictSpace) -> tuple[float, float]:
    """Mean cosine over all same-group pairs and over all cross-group pairs."""
    idx = [space.index(s) for s in partition.sources]
    labels = partition.labels(partition.sources)
    c = space.cosine[np.ix_(idx, idx)]
    iu = np.triu_indices(len(idx), k=1)
    same = (labels[:, None] == labels[None, :])[iu]
    vals = c[iu]
    within = float(vals[same].mean()) if same.any() else math.nan
    between = float(vals[~same].mean()) if (~same).any() else math.nan
    return within, between


def project_onto_space(space: ConflictSpace, cosines: np.ndarray) -> np.ndarray:
    """PCA scores of new sources on the existing axes, from their cosines with the old sources.

    With U the (T, d) unit gradients, ū their mean and JCJ = V Λ Vᵀ, axis ℓ's direction is
    (U − ū)ᵀ v_ℓ / √λ_ℓ, so a new unit gradient u scores z_ℓ = Σ_i a_i V_iℓ / √λ_ℓ with
    a_i = (u − ū)·(u_i − ū) = c_i − mean(c) − mean_j C_ij + mean(C), where c = cos(u, u_i).
    An old source's own cosines give back its row of ``space.embedding`` exactly.

    Args:
        space: the existing conflict space (T sources).
        cosines: (n, T) cosines of n new sources with the T old ones, in ``space.names`` order.

    Returns:
        (n, T) scores; axes with zero eigenvalue score 0.
    """
    cos = np.atleast_2d(np.asarray(cosines, dtype=np.float64))
    t = space.n_sources
    if cos.shape[1] != t:
        raise ValueError(f"cosines must be (n, {t}), got {cos.shape}")
    c = space.cosine
    a = cos - cos.mean(axis=1, keepdims=True) - c.mean(axis=1)[None, :] + c.mean()
    lam = space.eigenvalues
    pos = lam > 0
    # V√Λ = embedding, so V_iℓ / √λ_ℓ = embedding_iℓ / λ_ℓ on the positive axes.
    scale = np.zeros(t)
    scale[pos] = 1.0 / lam[pos]
    return a @ (space.embedding * scale[None, :])


def place_sources(space: ConflictSpace, partition: Partition, coords: np.ndarray) -> np.ndarray:
    """Group of each new source: the nearest group centroid in the PCA scores of ``space``.

    Centroids are unweighted means of the members' scores on every positive-variance axis.
    On all those axes the scores are the unit gradients in an orthonormal basis of their
    centred span, and the part of a new gradient outside that span adds the same amount to its
    distance from every centroid, so this is the nearest centroid of the unit gradients.

    Args:
        space: the space the partition was made in.
        partition: the current groups (members must be in ``space``).
        coords: (n, T) scores of the new sources (``project_onto_space``).

    Returns:
        (n,) int64 group indices.
    """
    axes = max(space.n_axes, 1)
    z = space.embedding[:, :axes]
    centroids = np.stack([z[[space.index(s) for s in g]].mean(axis=0) for g in partition.groups])
    d2 = ((np.atleast_2d(coords)[:, None, :axes] - centroids[None, :, :]) ** 2).sum(axis=2)
    return d2.argmin(axis=1).astype(np.int64)


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        raise ValueError("gradient rows must be finite and non-zero")
    return x / norms


def _subspace(space: ConflictSpace, names: Sequence[str]) -> ConflictSpace:
    """The conflict space of a subset of sources (its own PCA), from C alone.

    Any factor F with F Fᵀ = C has C as its cosine matrix, and ``compute_conflict_space`` reads
    rows only through their Gram matrix, so the subset's rows of F give the subset's space.
    """
    if tuple(names) == space.names:
        return space
    evals, evecs = np.linalg.eigh(space.cosine)
    factor = evecs * np.sqrt(np.clip(evals, 0.0, None))[None, :]
    return compute_conflict_space(factor[[space.index(n) for n in names]], names)


# ---------------------------------------------------------------------------------------------
# Conflict explorer


class ConflictExplorer:
    """Clustered heatmap with dendrogram, PCA scatter, explained variance and a per-source panel.

    Attributes:
        heatmap: the dendrogram + heatmap figure (``plot_conflict_clustermap``).
        scatter: the PCA scatter; ``color`` and ``dims`` redraw it.
        variance: explained-variance bars.
        color: Dropdown of table columns to colour the scatter by ("(none)" for one colour).
        dims: ToggleButtons, 2 or 3 (labels "2-D", "3-D").
        source: Dropdown of sources for the panel; ``n_neighbours``: how many to list.
        panel: HTML with the selected source's allies and conflicts.
        widget: the VBox to display.

    Args:
        space: the run's conflict space.
        table: per-source columns (``load_source_table``); metadata, counts and groups appear
            on hover and in the colour dropdown.
    """

    NONE = "(none)"

    def __init__(self, space: ConflictSpace, table: pd.DataFrame | None = None) -> None:
        self.space = space
        self.table = _align_table(table, space.names)
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
            value=min(5, space.n_sources - 1), min=1, max=max(space.n_sources - 1, 1),
            description="show",
        )  # fmt: skip
        self.panel = widgets.HTML()

        self._heatmap = _FigureView(plot_conflict_clustermap(space, self.table))
        self._scatter = _FigureView(self.scatter_figure(self.color.value, self.dims.value))
        self._variance = _FigureView(plot_explained_variance(space))
        self.color.observe(self._redraw_scatter, names="value")
        self.dims.observe(self._redraw_scatter, names="value")
        self.source.observe(self._redraw_panel, names="value")
        self.n_neighbours.observe(self._redraw_panel, names="value")
        self._redraw_panel()
        self.widget = widgets.VBox(
            [
                self._heatmap.view,
                widgets.HBox([self.color, self.dims]),
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

    def scatter_figure(self, color: str | None = None, dims: int = 2) -> go.Figure:
        """The PCA scatter coloured by a table column.

        A numeric column with more distinct values than the palette has colours gets a
        continuous colour scale (one trace); any other column one trace per value.
        """
        color = None if color in (None, self.NONE) else color
        values = self.table[color] if color else None
        if values is None or not (
            pd.api.types.is_numeric_dtype(values) and values.nunique() > len(PALETTE)
        ):
            return plot_conflict_scatter(self.space, self.table, color=color, dims=dims)
        fig = plot_conflict_scatter(self.space, self.table, dims=dims)
        fig.update_traces(
            marker={"color": values.to_numpy(), "colorscale": "Viridis", "showscale": True,
                    "colorbar": {"title": color}},
        )  # fmt: skip
        return fig.update_layout(title_text=f"Conflict space, coloured by {color}")

    def allies_and_conflicts(self, source: str, n: int = 5) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The ``n`` sources most aligned with ``source`` and the ``n`` most opposed.

        Returns:
            (allies, conflicts): frames with ``source``, ``cosine`` and the table's other
            columns, allies by decreasing cosine, conflicts by increasing cosine; ``source``
            itself is never listed.
        """
        i = self.space.index(source)
        cos = pd.Series(self.space.cosine[i], index=self.space.names).drop(source)
        extra = self.table.drop(columns=["source"]).loc[cos.index]
        frame = pd.concat([cos.rename("cosine"), extra], axis=1)
        frame.insert(0, "source", cos.index)
        # mergesort is stable: ties keep the space's source order, in both directions.
        allies = frame.sort_values("cosine", ascending=False, kind="mergesort").head(n)
        conflicts = frame.sort_values("cosine", ascending=True, kind="mergesort").head(n)
        return allies.reset_index(drop=True), conflicts.reset_index(drop=True)

    def _redraw_scatter(self, _change: Any = None) -> None:
        self._scatter.replace(self.scatter_figure(self.color.value, self.dims.value))

    def _redraw_panel(self, _change: Any = None) -> None:
        allies, conflicts = self.allies_and_conflicts(self.source.value, self.n_neighbours.value)
        fmt = {"cosine": "{:+.3f}".format}
        self.panel.value = (
            f"<h4>{html.escape(self.source.value)}</h4>"
            f"<b>Nearest allies</b> (highest cosine){allies.to_html(index=False, formatters=fmt)}"
            f"<b>Strongest conflicts</b> (lowest cosine)"
            f"{conflicts.to_html(index=False, formatters=fmt)}"
        )


# ---------------------------------------------------------------------------------------------
# Partition editor


@dataclass(frozen=True)
class _State:
    """Everything an edit can change; the undo stack holds previous states."""

    partition: Partition
    space: ConflictSpace
    rows: np.ndarray | None
    table: pd.DataFrame
    dropped: tuple[str, ...]


class PartitionEditor:
    """Split, inspect and hand-edit a partition, then save partition.json with an edit log.

    Widgets (attributes): ``method`` (Dropdown: "balanced", "random", "kmeans"), ``size_by``
    (ToggleButtons: "r" for K = 2^r, "k" for K), ``r``, ``k``, ``seed`` (changing any of these
    re-splits; so does ``split_button``, description "Split"); ``source`` and ``target``
    (Dropdowns: a source and a group index) with ``move_button`` ("Move"), ``drop_button``
    ("Drop") and ``downweight_button`` ("Down-weight", by ``factor``); ``undo_button``
    ("Undo"); ``save_button`` ("Save"); ``status`` (HTML: the last action or refusal);
    ``stats_html`` (HTML: the group statistics); ``scatter`` (figure: PC1-2 coloured by group,
    dropped sources grey; a box/lasso selection moves the selected sources to ``target``);
    ``widget`` (the VBox to display).

    Every action is a method (``split``, ``move``, ``move_sources``, ``drop``,
    ``downweight``, ``add_sources``, ``undo``, ``save``) returning whether it was applied;
    a refused action leaves everything unchanged and says why in ``status``.

    Args:
        space: the conflict space of the sources.
        table: per-source ``examples`` and ``tokens`` (indexed by source, or a ``source``
            column), e.g. ``load_source_table(run_dir)``; other columns appear on hover.
        rows: (T, d) gradients in ``space.names`` order, or a ``GradientBank``; enables the
            predicted-gain column and ``add_sources``.
        path: where ``save`` writes; if it already holds a partition, editing starts from it.
        user: recorded as ``who`` in the edit log (default: the login name).
        partition: the partition to start from (default: ``path``'s, else balanced with r = 1).
        eta: learning-rate scale of the predicted gain.
    """

    def __init__(
        self,
        space: ConflictSpace,
        table: pd.DataFrame,
        *,
        rows: Any = None,
        path: str | os.PathLike | None = None,
        user: str | None = None,
        partition: Partition | None = None,
        eta: float = 1.0,
    ) -> None:
        self.user = user or _user()
        self.path = Path(path) if path is not None else None
        self.eta = eta
        table = _align_table(table, space.names)
        for col in ("examples", "tokens"):
            if col not in table.columns:
                raise ValueError(f"table needs an {col!r} column")
        rows = _align_rows(rows, space.names)
        if partition is None and self.path is not None and self.path.exists():
            partition = Partition.load(self.path)
        if partition is None:
            partition = make_partition(
                space, self._counts(table, "examples"), self._counts(table, "tokens"),
                method="balanced", r=1 if space.n_axes >= 1 else 0,
            )  # fmt: skip
        unknown = [s for s in partition.sources if s not in space.names]
        if unknown:
            raise ValueError(f"partition has sources outside the conflict space: {unknown}")
        dropped = tuple(s for s in space.names if s not in set(partition.sources))
        self._state = _State(partition, space, rows, table, dropped)
        self.history: list[_State] = []
        self._syncing = False

        t = space.n_sources
        self.method = widgets.Dropdown(
            options=list(METHODS), value="balanced", description="method"
        )
        self.size_by = widgets.ToggleButtons(
            options=[("r (K = 2^r)", "r"), ("K", "k")], value="r", description="groups by"
        )
        self.r = widgets.BoundedIntText(value=1, min=0, max=max(t - 1, 1), description="r")
        self.k = widgets.BoundedIntText(value=2, min=1, max=t, description="K")
        self.seed = widgets.IntText(value=0, description="seed")
        self.split_button = widgets.Button(description="Split", tooltip="re-split (undoable)")
        self.source = widgets.Dropdown(description="source")
        self.target = widgets.Dropdown(description="to group")
        self.move_button = widgets.Button(description="Move", button_style="primary")
        self.factor = widgets.BoundedFloatText(
            value=0.5, min=0.01, max=1.0, step=0.05, description="factor"
        )
        self.downweight_button = widgets.Button(description="Down-weight")
        self.drop_button = widgets.Button(description="Drop", button_style="warning")
        self.undo_button = widgets.Button(description="Undo")
        self.save_button = widgets.Button(description="Save", button_style="success")
        self.status = widgets.HTML()
        self.stats_html = widgets.HTML()
        self._scatter = _FigureView(self._scatter_figure())
        self.scatter.data[0].on_selection(self._on_selection)

        self._sync_controls()
        for w in (self.method, self.size_by, self.r, self.k, self.seed):
            w.observe(self._on_params, names="value")
        self.split_button.on_click(lambda _b: self.split(**self._params()))
        self.move_button.on_click(lambda _b: self.move(self.source.value, self.target.value))
        self.drop_button.on_click(lambda _b: self.drop(self.source.value))
        self.downweight_button.on_click(
            lambda _b: self.downweight(self.source.value, self.factor.value)
        )
        self.undo_button.on_click(lambda _b: self.undo())
        self.save_button.on_click(lambda _b: self._save_clicked())
        self._refresh()
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.method, self.size_by]),
                widgets.HBox([self.r, self.k, self.seed, self.split_button]),
                self._scatter.view,
                widgets.HBox([self.source, self.target, self.move_button]),
                widgets.HBox([self.factor, self.downweight_button, self.drop_button]),
                widgets.HBox([self.undo_button, self.save_button]),
                self.status,
                self.stats_html,
            ]
        )

    # -- state ------------------------------------------------------------------------------

    @property
    def partition(self) -> Partition:
        return self._state.partition

    @property
    def space(self) -> ConflictSpace:
        return self._state.space

    @property
    def rows(self) -> np.ndarray | None:
        return self._state.rows

    @property
    def dropped(self) -> tuple[str, ...]:
        """Sources of the space left out of the partition by ``drop``."""
        return self._state.dropped

    @property
    def table(self) -> pd.DataFrame:
        """The source table with the current ``group`` ("G0".., "dropped") and ``tokens``."""
        out = self._state.table.copy()
        part = self.partition
        out["group"] = [
            _group_label(part.group_of(s)) if s in part.tokens else "dropped" for s in out.index
        ]
        out["tokens"] = [part.tokens.get(s, out.loc[s, "tokens"]) for s in out.index]
        return out

    @property
    def stats(self) -> pd.DataFrame:
        """``group_statistics`` of the current partition."""
        return group_statistics(self.partition, self.space, self.rows, eta=self.eta)

    @property
    def summary(self) -> dict[str, float]:
        """``within`` / ``between``: mean cosine over same-group / cross-group pairs; ``gain``:
        ``predict_gain`` of the partition (NaN without gradient rows)."""
        within, between = _within_between(self.partition, self.space)
        gain = math.nan
        if self.rows is not None:
            gain = predict_gain(self.partition, self.rows, self.space.names, self.eta)
        return {"within": within, "between": between, "gain": float(gain)}

    @property
    def scatter(self) -> go.Figure:
        return self._scatter.fig

    def validate(self) -> list[str]:
        """Problems that block ``save``: sources neither placed nor dropped, or unknown."""
        placed = set(self.partition.sources)
        problems = []
        missing = [s for s in self.space.names if s not in placed and s not in self.dropped]
        if missing:
            problems.append(f"sources not placed: {missing}")
        unknown = sorted(placed - set(self.space.names))
        if unknown:
            problems.append(f"sources not in the conflict space: {unknown}")
        twice = sorted(placed & set(self.dropped))
        if twice:
            problems.append(f"sources both placed and dropped: {twice}")
        return problems

    # -- actions ----------------------------------------------------------------------------

    def split(
        self, method: str = "balanced", *, r: int | None = None, k: int | None = None, seed: int = 0
    ) -> bool:
        """Re-split the current (not dropped) sources with ``make_partition``; undoable.

        Dropped sources stay dropped and down-weighted token counts are kept; with sources
        dropped, the split runs in the conflict space of the remaining ones. The edit log keeps
        its history and gains a ``split`` entry.
        """
        part = self.partition
        names = [s for s in self.space.names if s in part.tokens]
        try:
            space = _subspace(self.space, names)
            new = make_partition(
                space, dict(part.examples), dict(part.tokens), method=method, r=r, k=k, seed=seed
            )
        except ValueError as e:
            return self._refuse(f"split refused: {e}")
        entry = {"op": "split", "method": method, "params": dict(new.params), **self._who()}
        new = replace(new, edit_log=(*part.edit_log, entry))
        return self._commit(replace(self._state, partition=new), f"split: {method}, K = {new.k}")

    def move(self, source: str, to_group: int) -> bool:
        """Move one source to group ``to_group`` (``Partition.move``, logged with the user)."""
        part = self.partition
        try:
            new = part.move(source, int(to_group), who=self.user)
        except ValueError as e:
            return self._refuse(f"move refused: {e}")
        frm = part.group_of(source)
        msg = f"moved {source} from {_group_label(frm)} to {_group_label(int(to_group))}"
        return self._commit(replace(self._state, partition=new), msg)

    def move_sources(self, names: Sequence[str], to_group: int) -> bool:
        """Move several sources at once (one undo step); all or nothing.

        Sources already in ``to_group`` are skipped; dropped sources are refused.
        """
        part = self.partition
        to_group = int(to_group)
        todo = [s for s in names if s not in part.tokens or part.group_of(s) != to_group]
        if not todo:
            return self._refuse(f"nothing to move: the selection is already in G{to_group}")
        new = part
        try:
            for s in todo:
                new = new.move(s, to_group, who=self.user)
        except ValueError as e:
            return self._refuse(f"move refused, nothing changed: {e}")
        msg = f"moved {len(todo)} source(s) to {_group_label(to_group)}: {', '.join(todo)}"
        return self._commit(replace(self._state, partition=new), msg)

    def drop(self, source: str) -> bool:
        """Take a source out of the partition (it is not trained on); logged, undoable."""
        part = self.partition
        if source not in part.tokens:
            return self._refuse(f"drop refused: {source!r} is not in the partition")
        g = part.group_of(source)
        if len(part.groups[g]) == 1:
            return self._refuse(f"drop refused: dropping {source!r} would empty group {g}")
        groups = tuple(tuple(s for s in grp if s != source) for grp in part.groups)
        entry = {"op": "drop", "source": source, "from": g, "to": None, **self._who()}
        new = self._rebuild(part, groups, entry)
        state = replace(self._state, partition=new, dropped=(*self.dropped, source))
        return self._commit(state, f"dropped {source} from {_group_label(g)}")

    def downweight(self, source: str, factor: float) -> bool:
        """Scale a source's token count by ``factor`` (> 0, rounded, at least 1); logged.

        The token count sets the merge weights and the source's training budget.
        """
        part = self.partition
        if source not in part.tokens:
            return self._refuse(f"down-weight refused: {source!r} is not in the partition")
        if not (math.isfinite(factor) and factor > 0):
            return self._refuse(f"down-weight refused: factor must be > 0, got {factor}")
        before = part.tokens[source]
        after = max(1, round(before * factor))
        g = part.group_of(source)
        entry = {
            "op": "downweight", "source": source, "from": g, "to": g, "factor": float(factor),
            "tokens_before": before, "tokens_after": after, **self._who(),
        }  # fmt: skip
        new = self._rebuild(part, part.groups, entry, tokens={source: after})
        msg = f"down-weighted {source}: {before} → {after} tokens"
        return self._commit(replace(self._state, partition=new), msg)

    def add_sources(
        self,
        names: Sequence[str],
        rows: np.ndarray,
        examples: Mapping[str, int],
        tokens: Mapping[str, int],
    ) -> bool:
        """Add new sources and place each in a group; undoable.

        Rule: each new source's unit gradient is projected onto the existing PCA axes
        (``project_onto_space``) and joins the group whose centroid is nearest there
        (``place_sources``: the nearest centroid of the unit gradients). The existing
        groups do not change. Afterwards the conflict space is recomputed over all sources
        (exact cosines for the statistics; the axes may shift). Compute ``rows`` with the same
        sketch as the editor's rows, e.g. ``estimate_gradients(..., sources=new, out_dir=...)``.

        Args:
            names: the new sources (not already known).
            rows: (n, d) their gradients.
            examples, tokens: their counts.
        """
        names = list(names)
        new_rows = np.atleast_2d(np.asarray(rows, dtype=np.float64))
        if self.rows is None:
            return self._refuse("add refused: the editor has no gradient rows to compare with")
        clash = [s for s in names if s in self.space.names]
        if clash or len(set(names)) != len(names) or not names:
            return self._refuse(f"add refused: names must be new and distinct, got {names}")
        if new_rows.shape != (len(names), self.rows.shape[1]):
            return self._refuse(
                f"add refused: rows must be ({len(names)}, {self.rows.shape[1]}), got "
                f"{new_rows.shape}"
            )
        try:
            cos = _unit(new_rows) @ _unit(self.rows).T
            groups = place_sources(self.space, self.partition, project_onto_space(self.space, cos))
            all_rows = np.vstack([self.rows, new_rows])
            space = compute_conflict_space(all_rows, [*self.space.names, *names])
            part = self.partition
            grouped = [list(g) for g in part.groups]
            log = list(part.edit_log)
            for s, g in zip(names, groups.tolist(), strict=True):
                grouped[g].append(s)
                log.append(
                    {"op": "add", "source": s, "from": None, "to": g,
                     "rule": "nearest group centroid in PCA space", **self._who()}
                )  # fmt: skip
            new = Partition(
                method=part.method,
                groups=tuple(tuple(g) for g in grouped),
                examples={**part.examples, **{s: examples[s] for s in names}},
                tokens={**part.tokens, **{s: tokens[s] for s in names}},
                params=part.params,
                edit_log=tuple(log),
            )
        except (KeyError, ValueError) as e:
            return self._refuse(f"add refused: {e}")
        added = pd.DataFrame(
            {"source": names, "examples": [examples[s] for s in names],
             "tokens": [tokens[s] for s in names]},
            index=names,
        )  # fmt: skip
        table = pd.concat([self._state.table, added])
        state = replace(self._state, partition=new, space=space, rows=all_rows, table=table)
        placed = ", ".join(f"{s} → {_group_label(g)}" for s, g in zip(names, groups, strict=True))
        return self._commit(state, f"added {placed}")

    def undo(self) -> bool:
        """Restore the state before the last applied action."""
        if not self.history:
            return self._refuse("nothing to undo")
        self._state = self.history.pop()
        self._sync_controls()
        self._refresh()
        self._say("undone")
        return True

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the partition (with its edit log) to ``path`` (default: the editor's) atomically.

        Raises:
            ValueError: no path, or ``validate`` finds a problem.
        """
        path = Path(path) if path is not None else self.path
        if path is None:
            raise ValueError("no path to save to: pass one here or to PartitionEditor(path=...)")
        problems = self.validate()
        if problems:
            raise ValueError("; ".join(problems))
        out = self.partition.save(path)
        self._say(f"saved {out} ({len(self.partition.edit_log)} edit-log entries)")
        return out

    # -- internals --------------------------------------------------------------------------

    @staticmethod
    def _counts(table: pd.DataFrame, col: str) -> dict[str, int]:
        return {str(s): int(v) for s, v in table[col].items()}

    def _who(self) -> dict[str, str]:
        return {"who": self.user, "at": _now()}

    def _rebuild(
        self,
        part: Partition,
        groups: tuple[tuple[str, ...], ...],
        entry: dict,
        tokens: Mapping[str, int] | None = None,
    ) -> Partition:
        members = {s for g in groups for s in g}
        toks = {**part.tokens, **(tokens or {})}
        return Partition(
            method=part.method,
            groups=groups,
            examples={s: c for s, c in part.examples.items() if s in members},
            tokens={s: c for s, c in toks.items() if s in members},
            params=part.params,
            edit_log=(*part.edit_log, entry),
        )

    def _params(self) -> dict[str, Any]:
        size = {"r": self.r.value} if self.size_by.value == "r" else {"k": self.k.value}
        return {"method": self.method.value, "seed": self.seed.value, **size}

    def _on_params(self, _change: Any) -> None:
        if not self._syncing:
            self.split(**self._params())

    def _on_selection(self, trace: Any, points: Any, _selector: Any = None) -> None:
        chosen = [trace.customdata[i] for i in points.point_inds]
        chosen = [s for s in chosen if s in self.partition.tokens]
        if chosen and self.target.value is not None:
            self.move_sources(chosen, self.target.value)

    def _save_clicked(self) -> None:
        try:
            self.save()
        except (OSError, ValueError) as e:
            self._refuse(f"save refused: {e}")

    def _commit(self, state: _State, message: str) -> bool:
        self.history.append(self._state)
        self._state = state
        self._sync_controls()
        self._refresh()
        self._say(message)
        return True

    def _say(self, message: str, *, error: bool = False) -> None:
        color = "#D55E00" if error else "#009E73"
        self.status.value = f'<span style="color:{color}">{html.escape(message)}</span>'

    def _refuse(self, message: str) -> bool:
        self._say(message, error=True)
        return False

    def _sync_controls(self) -> None:
        """Make the controls show the current partition without triggering a re-split."""
        part = self.partition
        self._syncing = True
        try:
            self.k.max = self.space.n_sources
            self.r.max = max(self.space.n_sources - 1, 1)
            if part.method in dict(METHODS).values():
                self.method.value = part.method
            self.k.value = part.k
            power_of_two = part.k & (part.k - 1) == 0
            if "r" in part.params:
                self.r.value = int(part.params["r"])
            elif power_of_two:
                self.r.value = part.k.bit_length() - 1
            if self.size_by.value == "r" and not power_of_two:
                self.size_by.value = "k"
            if "seed" in part.params:
                self.seed.value = int(part.params["seed"])
            current = self.source.value
            members = sorted(part.sources, key=self.space.names.index)
            self.source.options = [(f"{s} ({_group_label(part.group_of(s))})", s) for s in members]
            self.source.value = current if current in part.tokens else members[0]
            target = self.target.value
            self.target.options = [(_group_label(k), k) for k in range(part.k)]
            self.target.value = target if target is not None and target < part.k else 0
        finally:
            self._syncing = False

    def _scatter_figure(self) -> go.Figure:
        fig = go.Figure(go.Scatter(mode="markers", name="sources"))
        fig.update_layout(
            dragmode="lasso", template="simple_white", width=720, height=520,
            title={"text": "Partition in the conflict space (select points to move them)",
                   "x": 0.5},
        )  # fmt: skip
        return fig

    def _refresh(self) -> None:
        """Redraw the scatter and the statistics from the current state."""
        space, table = self.space, self.table
        z = space.coords(min(2, space.n_sources))
        x = z[:, 0]
        y = z[:, 1] if z.shape[1] > 1 else np.zeros(len(x))
        labels = table["group"].tolist()
        colors = color_map([g for g in labels if g != "dropped"])
        cols = [c for c in table.columns if c not in ("source", "description")][:8]
        text = [
            f"<b>{s}</b><br>" + "<br>".join(f"{c}: {table.loc[s, c]}" for c in cols)
            for s in space.names
        ]
        ev = space.explained_variance_ratio
        fig = self.scatter
        with fig.batch_update():
            tr = fig.data[0]
            tr.x, tr.y, tr.customdata, tr.text = x, y, list(space.names), text
            tr.hoverinfo = "text"
            tr.marker = {
                "color": [colors.get(g, DROPPED_COLOR) for g in labels],
                "symbol": ["x" if g == "dropped" else "circle" for g in labels],
                "size": 10,
                "line": {"width": 0.5, "color": "#333333"},
            }
            fig.layout.xaxis.title = f"PC1 ({ev[0]:.0%})"
            fig.layout.yaxis.title = f"PC2 ({ev[1]:.0%})" if len(ev) > 1 else ""
        self._scatter.refresh()
        self.stats_html.value = self._stats_table_html(colors)

    def _stats_table_html(self, colors: Mapping[str, str]) -> str:
        stats = self.stats
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in ["group", *stats.columns])
        body = []
        for g, row in stats.iterrows():
            swatch = f'<span style="color:{colors.get(g, "#000")}">■</span> {g}'
            cells = [swatch]
            for c, v in row.items():
                if c in ("sources", "examples", "tokens"):
                    cells.append(f"{int(v):,}")
                elif c == "gain":
                    cells.append(f"{v:.3e}")
                else:
                    cells.append("–" if pd.isna(v) else f"{v:.3f}")
            body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        s = self.summary
        gain = "" if math.isnan(s["gain"]) else f"; predicted merge gain {s['gain']:.3e}"
        dropped = f"; dropped: {', '.join(self.dropped)}" if self.dropped else ""
        return (
            f"<table><tr>{head}</tr>{''.join(body)}</table>"
            f"<p>K = {self.partition.k}, method {html.escape(self.partition.method)}; "
            f"mean cosine within groups {s['within']:.3f}, between groups {s['between']:.3f}"
            f"{gain}{html.escape(dropped)}; {len(self.partition.edit_log)} edit(s) logged</p>"
        )
