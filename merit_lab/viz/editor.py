"""The partition editor: a thin widget view bound to a `merit_lab.partition.session.EditSession`.

Input: an edit session (``load_edit_session(run_dir)``), or a conflict space and per-source table
to build one. Output: buttons that call the session's edits (split, move, drop, down-weight, add,
undo, save), the panels of `merit_lab.viz.editor_panels` (scatter, statistics, stability)
redrawn after each edit, a status line, and a flag on the selected source when it changes
group between folds (the run's `FoldStability`).
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from merit_lab.analysis.conflict import ConflictSpace
from merit_lab.partition.folds import FoldStability
from merit_lab.partition.methods import PARTITION_METHODS, make_partition
from merit_lab.partition.plan import Partition
from merit_lab.partition.session import DROPPED, UNPLACED, EditSession, group_label
from merit_lab.partition.stability import SplitStability
from merit_lab.viz.editor_panels import (
    WARNING_COLOR,
    draw_partition_scatter,
    empty_partition_scatter,
    flipping_sources,
    fold_flag_html,
    fold_r,
    group_stats_html,
    source_table,
    stability_panel_html,
)
from merit_lab.viz.figure_view import FigureView, align_table

__all__ = ["PartitionEditor"]

_LABELS = {"balanced": "balanced PCA", "kmeans": "k-means"}  # others show their registry name
BY_PROJECTION = -1  # the ``add_to`` value that places an added source by projection


class PartitionEditor:
    """Split, inspect and hand-edit a partition, then save partition.json with an edit log.

    The editor holds no state of its own: every button calls a method of its `EditSession`
    (``editor.session``), shows the session's message, or its refusal (a ``ValueError``, after
    which nothing changed) in ``status``, and redraws. Scripts can drive the session directly.

    Widgets (attributes): ``method`` (Dropdown: "balanced", "random", "kmeans"), ``size_by``
    (ToggleButtons: "r" for K = 2^r, "k" for K), ``r``, ``k``, ``seed`` (changing any of these
    re-splits; so does ``split_button``, "Split"); ``source`` and ``target`` (Dropdowns: a placed
    source and a group) with ``move_button`` ("Move"), ``drop_button`` ("Drop") and
    ``downweight_button`` ("Down-weight": train a seeded ``fraction`` of the source's examples;
    ``factor`` is the same widget); ``add_source`` (Dropdown of unplaced and dropped sources),
    ``add_to`` (a group, or by projection) and ``add_button`` ("Add"); ``undo_button``
    ("Undo"); ``save_button`` ("Save"); ``status`` (HTML: the last message or refusal);
    ``stats_html`` (HTML: the group statistics); ``scatter`` (PC1-2 of every source coloured
    by group: dropped grey ×, unplaced dark ◇, down-weighted hollow; a box/lasso selection
    moves the selected sources to ``target``); ``widget`` (the VBox to display).

    Actions (``split``, ``move``, ``move_sources``, ``drop``, ``downweight``, ``add``,
    ``undo``) return whether they were applied; ``save`` returns the path written.

    Args:
        session: the edit session to view; or, for a session built here, the conflict space.
        table: per-source columns shown on hover, indexed by source or with a ``source`` column
            (e.g. ``load_source_table(run_dir)``). Needs ``examples`` and ``tokens`` when
            ``session`` is a space.
        rows, path, user, partition, eta, example_tokens, seed: only with a space, to build
            the session (`EditSession`'s arguments; ``rows`` may be a ``GradientBank``). The
            partition defaults to ``path``'s if it exists, else balanced with r = 1.
        stability: the run's split stability (``load_stability(run_dir)``): a stability panel
            (``stability_html``) under the status line, with a plain warning when the split
            is unstable.
        folds: the run's fold stability (``load_fold_stability(run_dir)``): a source that
            changes group between disjoint halves of the calibration examples (at the current
            split's r) is marked ⚠ in the ``source`` picker, and selecting it shows a warning in
            ``fold_flag`` (HTML, under the Move button) before it is moved.

    Example-level curation: ``example_ids`` (Text: comma-separated ids of the selected
    source's train examples) with ``drop_examples_button`` ("Drop examples") calls
    `EditSession.drop_examples` (the session needs train ids: ``load_example_session``).
    """

    def __init__(
        self,
        session: EditSession | ConflictSpace,
        table: pd.DataFrame | None = None,
        *,
        rows: Any = None,
        path: str | os.PathLike | None = None,
        user: str | None = None,
        partition: Partition | None = None,
        eta: float | None = None,
        example_tokens: Mapping[str, Sequence[int]] | None = None,
        seed: int | None = None,
        stability: SplitStability | None = None,
        folds: FoldStability | None = None,
    ) -> None:
        build = {
            "rows": rows,
            "path": path,
            "user": user,
            "partition": partition,
            "eta": eta,
            "example_tokens": example_tokens,
            "seed": seed,
        }
        if isinstance(session, EditSession):
            given = sorted(k for k, v in build.items() if v is not None)
            if given:
                raise TypeError(f"pass {given} to the EditSession, not to the editor")
        else:
            session = _session_from_table(session, table, **build)
        self.session = session
        self._table = align_table(table, session.space.names, strict=False)
        self._syncing = False

        n = session.space.n_sources
        methods = [(_LABELS.get(m, m), m) for m in PARTITION_METHODS]
        self.method = widgets.Dropdown(options=methods, value="balanced", description="method")
        self.size_by = widgets.ToggleButtons(
            options=[("r (K = 2^r)", "r"), ("K", "k")], value="r", description="groups by"
        )
        self.r = widgets.BoundedIntText(value=1, min=0, max=max(n - 1, 1), description="r")
        self.k = widgets.BoundedIntText(value=2, min=1, max=n, description="K")
        self.seed = widgets.IntText(value=0, description="seed")
        self.split_button = widgets.Button(description="Split", tooltip="re-split (undoable)")
        self.source = widgets.Dropdown(description="source")
        self.target = widgets.Dropdown(description="to group")
        self.move_button = widgets.Button(description="Move", button_style="primary")
        self.fraction = widgets.BoundedFloatText(
            value=0.5, min=0.01, max=1.0, step=0.05, description="fraction"
        )
        self.downweight_button = widgets.Button(
            description="Down-weight", tooltip="train a seeded fraction of its examples"
        )
        self.drop_button = widgets.Button(description="Drop", button_style="warning")
        self.add_source = widgets.Dropdown(description="add")
        self.add_to = widgets.Dropdown(description="to group")
        self.add_button = widgets.Button(description="Add")
        self.undo_button = widgets.Button(description="Undo")
        self.save_button = widgets.Button(description="Save", button_style="success")
        self.status = widgets.HTML()
        self.stats_html = widgets.HTML()
        self.example_ids = widgets.Text(description="example ids", placeholder="id-1, id-2")
        self.drop_examples_button = widgets.Button(description="Drop examples")
        self.stability = stability
        self.folds = folds
        self.fold_flag = widgets.HTML()
        self.stability_html = widgets.HTML(stability_panel_html(stability, session.partition))
        self._scatter = FigureView(empty_partition_scatter())
        self.scatter.data[0].on_selection(self._on_selection)

        self._sync_controls()
        for w in (self.method, self.size_by, self.r, self.k, self.seed):
            w.observe(self._on_params, names="value")
        self.source.observe(self._redraw_fold_flag, names="value")
        self.split_button.on_click(lambda _b: self.split(**self._params()))
        self.move_button.on_click(lambda _b: self.move(self.source.value, self.target.value))
        self.drop_button.on_click(lambda _b: self.drop(self.source.value))
        self.downweight_button.on_click(
            lambda _b: self.downweight(self.source.value, self.fraction.value)
        )
        self.add_button.on_click(lambda _b: self._add_clicked())
        self.drop_examples_button.on_click(
            lambda _b: self.drop_examples(self.source.value, _split_ids(self.example_ids.value))
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
                self.fold_flag,
                widgets.HBox([self.fraction, self.downweight_button, self.drop_button]),
                widgets.HBox([self.add_source, self.add_to, self.add_button]),
                widgets.HBox([self.example_ids, self.drop_examples_button]),
                widgets.HBox([self.undo_button, self.save_button]),
                self.status,
                self.stability_html,
                self.stats_html,
            ]
        )

    # -- what the session holds ---------------------------------------------------------------
    @property
    def partition(self) -> Partition:
        return self.session.partition

    @property
    def space(self) -> ConflictSpace:
        return self.session.space

    @property
    def rows(self) -> np.ndarray | None:
        return self.session.rows

    @property
    def path(self) -> Path | None:
        return self.session.path

    @property
    def user(self) -> str:
        return self.session.user

    @property
    def history(self) -> list[Partition]:
        return self.session.history

    @property
    def dropped(self) -> tuple[str, ...]:
        return self.session.dropped

    @property
    def unplaced(self) -> tuple[str, ...]:
        return self.session.unplaced

    @property
    def factor(self) -> widgets.BoundedFloatText:
        """The ``fraction`` widget under its former name."""
        return self.fraction

    @property
    def stats(self) -> pd.DataFrame:
        """`EditSession.stats` of the current partition."""
        return self.session.stats()

    @property
    def summary(self) -> dict[str, float]:
        """`EditSession.summary`: ``within``, ``between`` and the predicted ``gain``."""
        return self.session.summary()

    @property
    def scatter(self) -> go.Figure:
        return self._scatter.fig

    @property
    def table(self) -> pd.DataFrame:
        """Every source of the space with its current ``group`` ("G0".., "dropped",
        "unplaced"), ``fraction`` and the ``examples``/``tokens`` it trains (full counts for a
        source in no group), then the table's other columns."""
        return source_table(self.partition, self.session.example_tokens, self._table)

    def validate(self) -> list[str]:
        """`EditSession.validate`: problems that block ``save``."""
        return self.session.validate()

    # -- actions: each calls the session and shows its message or its refusal -------------------
    def split(
        self, method: str = "balanced", *, r: int | None = None, k: int | None = None, seed: int = 0
    ) -> bool:
        """Re-split the placed sources (`EditSession.split`); undoable."""
        return self._apply("split", self.session.split, method, r=r, k=k, seed=seed)

    def move(self, source: str, to_group: int) -> bool:
        """Move one source to group ``to_group`` (logged with the user); undoable."""
        return self._apply("move", self.session.move, source, to_group)

    def move_sources(self, names: Sequence[str], to_group: int) -> bool:
        """Move several sources at once (one undo step), all or nothing."""
        return self._apply("move", self.session.move_sources, list(names), to_group)

    def drop(self, source: str) -> bool:
        """Take a source out of the mixture (it trains in no row); undoable."""
        return self._apply("drop", self.session.drop, source)

    def downweight(self, source: str, fraction: float) -> bool:
        """Train a seeded ``fraction`` of a source's examples (1 restores it); undoable."""
        return self._apply("down-weight", self.session.downweight, source, fraction)

    def drop_examples(self, source: str, ids: Sequence[str]) -> bool:
        """Leave train examples of ``source`` out of every row, by id; undoable."""
        return self._apply("drop examples", self.session.drop_examples, source, list(ids))

    def add(self, source: str, to_group: int | None = None) -> bool:
        """Put an unplaced or dropped source in a group (by projection without ``to_group``)."""
        return self._apply("add", self.session.add, source, to_group)

    def undo(self) -> bool:
        """Restore the partition before the last applied edit."""
        return self._apply("undo", self.session.undo)

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the partition with its edit log (`EditSession.save`) and say so in ``status``.

        Raises:
            ValueError: no path, or `validate` finds a problem (also shown in ``status``).
        """
        try:
            out = self.session.save(path)
        except ValueError as e:
            self._say(f"save refused: {e}", error=True)
            raise
        self._say(f"saved {out} ({len(self.partition.edit_log)} edit-log entries)")
        return out

    # -- internals ----------------------------------------------------------------------------
    def _apply(self, what: str, edit: Callable[..., str], *args: Any, **kwargs: Any) -> bool:
        try:
            message = edit(*args, **kwargs)
        except ValueError as e:
            self._say(f"{what} refused: {e}", error=True)
            return False
        self._sync_controls()
        self._refresh()
        self._say(message)
        return True

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

    def _add_clicked(self) -> None:
        if self.add_source.value is None:
            self._say("add refused: every source is already in a group", error=True)
            return
        to = self.add_to.value
        self.add(self.add_source.value, None if to in (None, BY_PROJECTION) else to)

    def _save_clicked(self) -> None:
        try:
            self.save()
        except ValueError:
            pass  # already shown in status
        except OSError as e:
            self._say(f"save refused: {e}", error=True)

    def _say(self, message: str, *, error: bool = False) -> None:
        color = WARNING_COLOR if error else "#009E73"
        self.status.value = f'<span style="color:{color}">{html.escape(message)}</span>'

    def _sync_controls(self) -> None:
        """Make the controls show the current partition without triggering a re-split."""
        part, names = self.partition, self.space.names
        self._syncing = True
        try:
            n = len(part.sources)
            self.k.max, self.r.max = n, max(n - 1, 1)
            if part.method in PARTITION_METHODS:
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
            groups = [(group_label(k), k) for k in range(part.k)]
            current = self.source.value
            members = [s for s in names if s in part.tokens]
            unsure = flipping_sources(self.folds, fold_r(part))  # ⚠: changes group across folds
            self.source.options = [
                (f"{s} ({group_label(part.group_of(s))}){' ⚠' if s in unsure else ''}", s)
                for s in members
            ]
            self.source.value = current if current in part.tokens else members[0]
            target = self.target.value
            self.target.options = groups
            self.target.value = target if target is not None and target < part.k else 0
            outside = [(f"{s} ({UNPLACED})", s) for s in self.unplaced]
            outside += [(f"{s} ({DROPPED})", s) for s in names if s in part.dropped]
            current = self.add_source.value
            self.add_source.options = outside
            self.add_source.value = (
                current
                if current in dict(outside).values()
                else (outside[0][1] if outside else None)
            )
            to = self.add_to.value
            self.add_to.options = [("by projection", BY_PROJECTION), *groups]
            self.add_to.value = to if to is not None and to < part.k else BY_PROJECTION
            self.add_source.disabled = self.add_to.disabled = self.add_button.disabled = not outside
        finally:
            self._syncing = False

    def _refresh(self) -> None:
        """Redraw the scatter and the statistics from the session's partition."""
        colors = draw_partition_scatter(self.scatter, self.space, self.table)
        self._scatter.refresh()
        self.stats_html.value = group_stats_html(
            self.stats, self.summary, self.partition, self.unplaced, colors
        )
        self._redraw_fold_flag()

    def _redraw_fold_flag(self, _change: Any = None) -> None:
        """Flag the selected source when it changes group between folds (`fold_flag_html`)."""
        self.fold_flag.value = fold_flag_html(self.folds, self.source.value, fold_r(self.partition))


def _session_from_table(
    space: ConflictSpace,
    table: pd.DataFrame | None,
    *,
    rows: Any,
    path: str | os.PathLike | None,
    user: str | None,
    partition: Partition | None,
    eta: float | None,
    example_tokens: Mapping[str, Sequence[int]] | None,
    seed: int | None,
) -> EditSession:
    """An `EditSession` for the editor's space form (see `PartitionEditor`)."""
    table = align_table(table, space.names)
    for col in ("examples", "tokens"):
        if col not in table.columns:
            raise ValueError(f"table needs an {col!r} column")
    if partition is None and path is not None and Path(path).exists():
        partition = Partition.load(path)
    if partition is None:
        counts = {c: {str(s): int(v) for s, v in table[c].items()} for c in ("examples", "tokens")}
        partition = make_partition(
            space,
            counts["examples"],
            counts["tokens"],
            method="balanced",
            r=1 if space.n_axes >= 1 else 0,
        )
    return EditSession(
        partition,
        space,
        example_tokens=example_tokens,
        seed=0 if seed is None else seed,
        rows=_align_rows(rows, space.names),
        path=path,
        user=user,
        eta=1.0 if eta is None else eta,
    )


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


def _split_ids(text: str) -> list[str]:
    return [t.strip() for t in text.replace("\n", ",").split(",") if t.strip()]
