"""Hand curation without widgets: `EditSession` (state, undo, validate, save) over `Partition`.

Input: a partition, the conflict space, per-example token counts (and ids). Output: an edited
partition (move, drop, down-weight, add, drop examples; logged) and the seeded subset a
down-weighted source trains, so every edit means the same thing to the branches, the joint
baselines and the merge weights.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from merit_lab.analysis.conflict import ConflictSpace
from merit_lab.partition.gain import gain_terms, predict_gain
from merit_lab.partition.methods import make_partition
from merit_lab.partition.plan import Partition

__all__ = [
    "DROPPED",
    "UNPLACED",
    "EditSession",
    "curated_counts",
    "fraction_subset",
    "group_label",
    "group_statistics",
    "place_by_projection",
    "subset_counts",
    "within_between",
]


DROPPED = "dropped"  # the `group` of a source a hand edit removed from the mixture
UNPLACED = "unplaced"  # the `group` of a source with a gradient that no group holds yet


def fraction_subset(source: str, n: int, fraction: float, seed: int = 0) -> np.ndarray:
    """The train examples a source keeps at ``fraction``: sorted indices, (m,) int64.

    m = max(1, round(f·n)); the subset is the first m of a permutation seeded by ``seed`` and the
    source's name, so it does not depend on which branch or row trains it, and a smaller
    fraction keeps a subset of a larger one's examples.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if n < 1:
        raise ValueError(f"source {source!r} has no train examples")
    if fraction == 1:
        return np.arange(n, dtype=np.int64)
    m = max(1, round(fraction * n))
    salt = int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], "little")
    perm = np.random.default_rng([int(seed), salt]).permutation(n)
    return np.sort(perm[:m]).astype(np.int64)


def subset_counts(
    source: str, example_tokens: Sequence[int], fraction: float, seed: int = 0
) -> tuple[int, int]:
    """(examples, tokens) of the subset `fraction_subset` keeps, from per-example token counts."""
    idx = fraction_subset(source, len(example_tokens), fraction, seed)
    tokens = np.asarray(example_tokens, dtype=np.int64)
    return int(idx.size), int(tokens[idx].sum())


def curated_counts(
    source: str,
    example_tokens: Sequence[int],
    fraction: float = 1.0,
    seed: int = 0,
    *,
    train_ids: Sequence[str] | None = None,
    excluded: Sequence[str] = (),
) -> tuple[int, int]:
    """(examples, tokens) a source trains: its train examples without the ``excluded`` ids, then
    the seeded ``fraction`` of those (`fraction_subset`), as a branch's ``_train_examples``
    chooses them.

    Args:
        example_tokens: tokens of each train example (``mixture.json``'s ``train_example_tokens``).
        train_ids: the id of each of them, same order (needed when ``excluded`` is not empty).
    """
    tokens = np.asarray(example_tokens, dtype=np.int64)
    if excluded:
        if train_ids is None or len(train_ids) != tokens.size:
            raise ValueError(f"no train example ids for {source!r} to drop examples by")
        gone = set(excluded)
        tokens = tokens[[i not in gone for i in train_ids]]
    if tokens.size == 0:
        raise ValueError(f"{source!r} would train no examples (drop the source instead)")
    idx = fraction_subset(source, tokens.size, fraction, seed)
    return int(idx.size), int(tokens[idx].sum())


# ---------------------------------------------------------------------------- group statistics
def group_statistics(
    partition: Partition, space: ConflictSpace, rows: np.ndarray | None = None, *, eta: float = 1.0
) -> pd.DataFrame:
    """Per-group statistics of a partition.

    Args:
        partition: the grouping (its sources must all be in ``space``).
        space: cosines between the sources.
        rows: (T, d) gradients in ``space.names`` order; adds the ``gain`` column. ``space``
            (and ``rows``) may hold sources outside the partition: they are ignored.
        eta: learning-rate scale of the predicted gain.

    Returns:
        One row per group, indexed "G0".."G{K-1}": ``sources``, ``examples``, ``tokens``,
        ``weight`` (token share, sums to 1), ``cohesion`` (mean cosine over pairs inside the
        group; NaN for a single source), ``conflict`` (mean cosine between the group's sources
        and the other groups' sources; NaN for K = 1) and, with ``rows``, ``gain``: the
        group's term of the predicted merging gain (the column sums to `predict_gain`).
    """
    members = [[space.index(s) for s in g] for g in partition.groups]
    placed = [i for g in members for i in g]
    c = space.cosine
    cohesion, conflict = [], []
    for g in members:
        pairs = c[np.ix_(g, g)][np.triu_indices(len(g), k=1)]
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
        index=pd.Index([group_label(k) for k in range(partition.k)], name="group"),
    )
    if rows is not None:
        frame["gain"] = gain_terms(partition, rows, space.names, eta)
    return frame


def within_between(partition: Partition, space: ConflictSpace) -> tuple[float, float]:
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


def group_label(k: int) -> str:
    return f"G{k}"


def place_by_projection(space: ConflictSpace, partition: Partition, source: str) -> int:
    """The group a source of ``space`` outside ``partition`` joins: the nearest group centroid.

    The source is projected (`ConflictSpace.project`, from its cosines alone) onto the PCA axes
    of the partition's own sources, so the existing groups and axes do not move; centroids are
    unweighted means of the members' scores on every positive-variance axis (on all of them the
    scores are the unit gradients in an orthonormal basis of their centred span: this is the
    nearest centroid of the unit gradients).
    """
    sub = space.select(partition.sources)
    z_new = sub.project(space.cosine[space.index(source), [space.index(s) for s in sub.names]])
    axes = max(sub.n_axes, 1)
    z = sub.embedding[:, :axes]
    centroids = np.stack([z[[sub.index(s) for s in g]].mean(axis=0) for g in partition.groups])
    return int(((centroids - z_new[None, :axes]) ** 2).sum(axis=1).argmin())


# -------------------------------------------------------------------------------- edit session
class EditSession:
    """Hand edits of a partition without widgets: state, undo, validation and save.

    Every edit (`split`, `move`, `move_sources`, `drop`, `downweight`, `add`, `drop_examples`,
    `restore_examples`) either applies,
    is logged in the partition's ``edit_log`` and returns a one-line message, or raises
    ``ValueError`` and changes nothing. Scripts, tests and the widget view
    (`merit_lab.viz.editor.PartitionEditor`) drive the same session.

    Args:
        partition: the partition to start from.
        space: the conflict space of every source with a gradient (it may hold sources the
            partition does not: dropped ones, or ones added to the mixture later).
        example_tokens: per source, the tokens of each train example (``mixture.json``'s
            ``train_example_tokens``); needed to down-weight or add a source.
        train_ids: per source, the id of each of those train examples (same order); needed to
            drop examples (`drop_examples`).
        seed: the seed of down-weighted subsets (the run's mixture seed: the branches use it).
        rows: (T, d) gradients in ``space.names`` order; adds the predicted gain.
        path: where `save` writes.
        user: recorded as ``who`` in the edit log (default: the login name).
        eta: learning-rate scale of the predicted gain.
    """

    def __init__(
        self,
        partition: Partition,
        space: ConflictSpace,
        *,
        example_tokens: Mapping[str, Sequence[int]] | None = None,
        train_ids: Mapping[str, Sequence[str]] | None = None,
        seed: int = 0,
        rows: np.ndarray | None = None,
        path: str | os.PathLike | None = None,
        user: str | None = None,
        eta: float = 1.0,
    ) -> None:
        outside = [s for s in partition.sources if s not in space.names]
        if outside:
            raise ValueError(f"partition has sources outside the conflict space: {outside}")
        if rows is not None and np.shape(rows)[0] != space.n_sources:
            raise ValueError(f"rows has {np.shape(rows)[0]} rows for {space.n_sources} sources")
        self.space = space
        self.example_tokens = {s: list(v) for s, v in (example_tokens or {}).items()}
        self.train_ids = {s: [str(i) for i in v] for s, v in (train_ids or {}).items()}
        self.seed = int(seed)
        self.rows = rows
        self.path = Path(path) if path is not None else None
        self.user = user or _login()
        self.eta = eta
        self.partition = partition
        self.history: list[Partition] = []

    # -- what the session holds ---------------------------------------------------------------
    @property
    def dropped(self) -> tuple[str, ...]:
        return self.partition.dropped

    @property
    def unplaced(self) -> tuple[str, ...]:
        """Sources of the space in no group and not dropped (added to the mixture later)."""
        placed = set(self.partition.sources) | set(self.partition.dropped)
        return tuple(s for s in self.space.names if s not in placed)

    def stats(self) -> pd.DataFrame:
        """`group_statistics` of the current partition (sources in no group are ignored)."""
        return group_statistics(self.partition, self.space, self.rows, eta=self.eta)

    def summary(self) -> dict[str, float]:
        """``within`` / ``between``: mean cosine over same-group / cross-group pairs; ``gain``:
        the predicted merging gain of the partition (NaN without gradient rows)."""
        within, between = within_between(self.partition, self.space)
        gain = math.nan
        if self.rows is not None:
            gain = predict_gain(self.partition, self.rows, self.space.names, self.eta)
        return {"within": within, "between": between, "gain": float(gain)}

    def validate(self) -> list[str]:
        """Problems that block `save` (an empty list when there are none)."""
        problems = []
        if self.unplaced:
            problems.append(
                f"sources neither placed nor dropped: {list(self.unplaced)} (add or drop them)"
            )
        return problems

    # -- edits --------------------------------------------------------------------------------
    def split(
        self, method: str = "balanced", *, r: int | None = None, k: int | None = None, seed: int = 0
    ) -> str:
        """Re-split the partition's sources (`make_partition`) in their own conflict space.

        Dropped sources stay dropped and down-weighted counts are kept; the edit log keeps its
        history and gains a ``split`` entry.
        """
        part = self.partition
        space = self.space.select([s for s in self.space.names if s in part.tokens])
        new = make_partition(
            space,
            dict(part.examples),
            dict(part.tokens),
            method=method,
            r=r,
            k=k,
            seed=seed,
            rows=self.rows,
            row_names=None if self.rows is None else self.space.names,
        )
        entry = {
            "op": "split",
            "method": method,
            "params": dict(new.params),
            "who": self.user,
            "at": _now(),
        }
        new = replace(
            new,
            edit_log=(*part.edit_log, entry),
            dropped=part.dropped,
            fractions=part.fractions,
            excluded=part.excluded,
        )
        return self._commit(new, f"split: {method}, K = {new.k}")

    def move(self, source: str, to_group: int) -> str:
        frm = self.partition.group_of(source)
        new = self.partition.move(source, int(to_group), who=self.user)
        return self._commit(new, f"moved {source} from G{frm} to G{int(to_group)}")

    def move_sources(self, names: Sequence[str], to_group: int) -> str:
        """Move several sources at once (one undo step), all or nothing; sources already in
        ``to_group`` are skipped."""
        to_group = int(to_group)
        part = self.partition
        todo = [s for s in names if s not in part.tokens or part.group_of(s) != to_group]
        if not todo:
            raise ValueError(f"nothing to move: the selection is already in G{to_group}")
        for s in todo:
            part = part.move(s, to_group, who=self.user)
        return self._commit(part, f"moved {len(todo)} source(s) to G{to_group}: {', '.join(todo)}")

    def drop(self, source: str) -> str:
        """Remove a source from the mixture: no row (joint, soup or split) trains it.

        An unplaced source (in the space, in no group) can be dropped too: that settles it for
        `validate`.
        """
        if source in self.unplaced:
            part = self.partition
            entry = {"op": "drop", "source": source, "from": None, "who": self.user, "at": _now()}
            new = replace(part, dropped=(*part.dropped, source), edit_log=(*part.edit_log, entry))
            return self._commit(new, f"dropped {source} (it was in no group)")
        frm = self.partition.group_of(source)
        return self._commit(
            self.partition.drop(source, who=self.user), f"dropped {source} from G{frm}"
        )

    def downweight(self, source: str, fraction: float) -> str:
        """Train a seeded ``fraction`` of a source's examples in every row (1 undoes it)."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        n_ex, n_tok = self._counts(source, fraction=fraction)
        before = self.partition.tokens.get(source)
        new = self.partition.downweight(
            source, fraction, examples=n_ex, tokens=n_tok, who=self.user
        )
        return self._commit(
            new,
            f"down-weighted {source} to {fraction:g}: {before} → {n_tok} tokens, {n_ex} examples",
        )

    def drop_examples(self, source: str, ids: Sequence[str]) -> str:
        """Leave train examples of ``source`` out of every row (joint, soup and split), by id.

        The examples and tokens the source trains are recounted without them (a down-weighted
        source keeps its fraction of the examples left), so the merge weights follow.
        """
        ids = [str(i) for i in ids]
        known = set(self.train_ids.get(source, ()))
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise ValueError(
                f"not train examples of {source!r}: {unknown[:5]}"
                + (
                    " (calibration examples of a calibration split of their own are not trained)"
                    if known
                    else " (the session has no train ids: load_example_session)"
                )
            )
        excluded = (*self.partition.excluded.get(source, ()), *ids)
        n_ex, n_tok = self._counts(source, excluded=excluded)
        before = self.partition.examples[source]
        new = self.partition.drop_examples(source, ids, examples=n_ex, tokens=n_tok, who=self.user)
        return self._commit(
            new, f"dropped {len(ids)} example(s) of {source}: {before} → {n_ex} examples"
        )

    def restore_examples(self, source: str, ids: Sequence[str]) -> str:
        """Train dropped examples of ``source`` again."""
        ids = [str(i) for i in ids]
        excluded = [i for i in self.partition.excluded.get(source, ()) if i not in ids]
        n_ex, n_tok = self._counts(source, excluded=excluded)
        new = self.partition.restore_examples(
            source, ids, examples=n_ex, tokens=n_tok, who=self.user
        )
        return self._commit(new, f"restored {len(ids)} example(s) of {source}")

    def add(self, source: str, to_group: int | None = None) -> str:
        """Add a source of the space that is in no group (new, or dropped before).

        Without ``to_group`` it is placed by projection (`place_by_projection`): only its
        gradient was needed, and the existing groups do not move.
        """
        if source not in self.space.names:
            raise ValueError(
                f"{source!r} has no gradient in the conflict space; run the "
                "gradients and conflict stages after adding it to the mixture"
            )
        if source in self.partition.tokens:
            raise ValueError(f"{source!r} is already in group {self.partition.group_of(source)}")
        rule = "by hand"
        if to_group is None:
            to_group, rule = place_by_projection(self.space, self.partition, source), "projection"
        tokens = self._example_tokens(source)
        new = self.partition.add(
            source, int(to_group), examples=len(tokens), tokens=sum(tokens), who=self.user
        )
        return self._commit(new, f"added {source} to G{int(to_group)} ({rule})")

    def undo(self) -> str:
        """Restore the partition before the last applied edit."""
        if not self.history:
            raise ValueError("nothing to undo")
        self.partition = self.history.pop()
        return "undone"

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the partition with its edit log atomically (to ``path`` or the session's).

        Raises:
            ValueError: no path, or `validate` finds a problem (nothing is written).
        """
        path = Path(path) if path is not None else self.path
        if path is None:
            raise ValueError("no path to save to: pass one here or to EditSession(path=...)")
        problems = self.validate()
        if problems:
            raise ValueError("; ".join(problems))
        return self.partition.save(path)

    # -- internals ----------------------------------------------------------------------------
    def _example_tokens(self, source: str) -> list[int]:
        tokens = self.example_tokens.get(source)
        if not tokens:
            raise ValueError(
                f"no per-example token counts for {source!r} (mixture.json's "
                "train_example_tokens; re-run the mixture stage)"
            )
        return tokens

    def _counts(
        self, source: str, *, fraction: float | None = None, excluded: Sequence[str] | None = None
    ) -> tuple[int, int]:
        """(examples, tokens) ``source`` trains with this fraction and these dropped examples
        (each defaulting to the partition's)."""
        part = self.partition
        return curated_counts(
            source,
            self._example_tokens(source),
            part.fractions.get(source, 1.0) if fraction is None else fraction,
            self.seed,
            train_ids=self.train_ids.get(source),
            excluded=part.excluded.get(source, ()) if excluded is None else excluded,
        )

    def _commit(self, partition: Partition, message: str) -> str:
        self.history.append(self.partition)
        self.partition = partition
        return message


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "user"
