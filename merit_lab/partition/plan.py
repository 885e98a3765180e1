"""Partition plan: which sources train together in which branch, and its hand edits.

Input: the groups of a split (`merit_lab.partition.methods`) with per-source example and token
counts. Output: a ``Partition`` of the sources into K groups with token merge weights, edited by
hand (move, drop, down-weight, add; drop or restore single examples, each edit logged) and saved
as partition.json (`merit_lab.partition.gain.predict_gain` scores any partition).
"""

from __future__ import annotations

import datetime as _dt
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from merit_lab.envelope import save_enveloped, unwrap, wrap
from merit_lab.io import read_json

__all__ = ["Partition"]

PARTITION_FORMAT = "merit-lab/partition"  # partition.json has carried this header from the start
PARTITION_VERSION = 1


@dataclass(frozen=True)
class Partition:
    """K groups of sources, with the counts that balance them and weight their merge.

    Attributes:
        method: how it was made: "balanced" | "random" | "kmeans" | "manual" | ...
        groups: group k → its source names (every source in exactly one non-empty group).
        examples: per-source training examples (what the balanced split balances).
        tokens: per-source training tokens (the token budget; it sets the merge weights).
        params: the settings used (r, k, seed, axes, ...), JSON-serialisable.
        edit_log: hand edits applied after the split, oldest first.
        dropped: sources a hand edit removed from the mixture (they train in no row).
        fractions: source → the share f < 1 of its train examples the rows train (a seeded
            subset, `merit_lab.partition.session.fraction_subset`); ``examples`` and ``tokens``
            already count only that subset, so the weights are those the merge will use.
        excluded: source → ids of train examples a hand edit dropped (no row trains them; a
            down-weighted subset is drawn from the rest); ``examples``/``tokens`` count without
            them.

    Edits (`move`, `drop`, `downweight`, `add`, `drop_examples`, `restore_examples`) return a
    new partition with the edit logged; the counts an edit needs (what a source trains
    afterwards) come from `merit_lab.partition.session.EditSession`.
    """

    method: str
    groups: tuple[tuple[str, ...], ...]
    examples: Mapping[str, int]
    tokens: Mapping[str, int]
    params: Mapping[str, Any] = field(default_factory=dict)
    edit_log: tuple[dict, ...] = ()
    dropped: tuple[str, ...] = ()
    fractions: Mapping[str, float] = field(default_factory=dict)
    excluded: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        groups = tuple(tuple(g) for g in self.groups)
        if not groups:
            raise ValueError("a partition needs at least one group")
        empty = [k for k, g in enumerate(groups) if not g]
        if empty:
            raise ValueError(f"empty groups: {empty}")
        members = [s for g in groups for s in g]
        dupes = sorted({s for s in members if members.count(s) > 1})
        if dupes:
            raise ValueError(f"sources in more than one group (or twice): {dupes}")
        object.__setattr__(self, "groups", groups)
        for what in ("examples", "tokens"):
            counts = check_counts(getattr(self, what), members, what)
            object.__setattr__(self, what, MappingProxyType({s: counts[s] for s in members}))
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))
        object.__setattr__(self, "edit_log", tuple(dict(e) for e in self.edit_log))
        dropped = tuple(dict.fromkeys(self.dropped))
        both = sorted(set(dropped) & set(members))
        if both:
            raise ValueError(f"sources both dropped and in a group: {both}")
        object.__setattr__(self, "dropped", dropped)
        fractions = {}
        for s, f in dict(self.fractions).items():
            if s not in members:
                raise ValueError(f"fraction for {s!r}, which is in no group")
            if isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0 < f <= 1:
                raise ValueError(f"fraction of {s!r} must be in (0, 1], got {f!r}")
            if f < 1:
                fractions[s] = float(f)
        object.__setattr__(self, "fractions", MappingProxyType(fractions))
        excluded = {s: tuple(str(i) for i in ids) for s, ids in dict(self.excluded).items() if ids}
        stray = sorted(set(excluded) - set(members))
        if stray:
            raise ValueError(f"dropped examples of sources in no group: {stray}")
        object.__setattr__(self, "excluded", MappingProxyType(excluded))

    @property
    def k(self) -> int:
        return len(self.groups)

    @property
    def sources(self) -> tuple[str, ...]:
        """All sources, group by group."""
        return tuple(s for g in self.groups for s in g)

    def group_of(self, name: str) -> int:
        for k, g in enumerate(self.groups):
            if name in g:
                return k
        raise ValueError(f"source {name!r} is not in this partition")

    @property
    def group_examples(self) -> tuple[int, ...]:
        return tuple(sum(self.examples[s] for s in g) for g in self.groups)

    @property
    def group_tokens(self) -> tuple[int, ...]:
        return tuple(sum(self.tokens[s] for s in g) for g in self.groups)

    @property
    def weights(self) -> tuple[float, ...]:
        """Merge weights w_k = N_k / Σ_j N_j over group token budgets; they sum to 1."""
        n = self.group_tokens
        total = sum(n)
        return tuple(nk / total for nk in n)

    def labels(self, names: Sequence[str]) -> np.ndarray:
        """Group index of each of ``names``: (len(names),) int64."""
        lookup = {s: k for k, g in enumerate(self.groups) for s in g}
        unknown = [s for s in names if s not in lookup]
        if unknown:
            raise ValueError(f"sources not in this partition: {unknown}")
        return np.array([lookup[s] for s in names], dtype=np.int64)

    # -- persistence: partition.json, in the versioned envelope -----------------------------
    def _payload(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "k": self.k,
            "groups": [list(g) for g in self.groups],
            "weights": list(self.weights),
            "group_examples": list(self.group_examples),
            "group_tokens": list(self.group_tokens),
            "examples": dict(self.examples),
            "tokens": dict(self.tokens),
            "params": dict(self.params),
            "edit_log": [dict(e) for e in self.edit_log],
            "dropped": list(self.dropped),
            "fractions": dict(self.fractions),
            "excluded": {s: list(ids) for s, ids in self.excluded.items()},
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON document; ``weights``/``group_*`` are derived and recomputed on load."""
        return wrap(PARTITION_FORMAT, PARTITION_VERSION, self._payload())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str | os.PathLike = "") -> Partition:
        """The partition of a `to_dict` document; another format or a newer version is refused
        (`merit_lab.envelope.EnvelopeError`, naming ``source``)."""
        return cls._from_payload(unwrap(d, PARTITION_FORMAT, PARTITION_VERSION, source=source))

    @classmethod
    def _from_payload(cls, d: Mapping[str, Any]) -> Partition:
        return cls(
            method=d["method"],
            groups=tuple(tuple(g) for g in d["groups"]),
            examples=d["examples"],
            tokens=d["tokens"],
            params=d.get("params", {}),
            edit_log=tuple(d.get("edit_log", ())),
            dropped=tuple(d.get("dropped", ())),
            fractions=d.get("fractions", {}),
            excluded=d.get("excluded", {}),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write partition.json atomically."""
        return save_enveloped(path, PARTITION_FORMAT, PARTITION_VERSION, self._payload())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Partition:
        """Read partition.json; every problem is one ValueError that starts with the path."""
        try:
            data = read_json(path)  # the error names the path and line
        except ValueError as e:
            raise ValueError(f"{e}; fix it, or delete it: the partition stage writes one") from e
        data = unwrap(data, PARTITION_FORMAT, PARTITION_VERSION, source=path)
        try:
            return cls._from_payload(data)
        except (KeyError, TypeError, ValueError) as e:
            what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise ValueError(f"{path}: {what}") from e

    # -- hand edits: each returns a new partition with the edit logged ---------------------
    def move(self, source: str, to_group: int, who: str = "user") -> Partition:
        """A new partition with ``source`` moved to group ``to_group`` and the edit logged.

        Raises:
            ValueError: unknown source or group, a no-op move, or a move that empties a group.
        """
        src = self.group_of(source)
        if not 0 <= to_group < self.k:
            raise ValueError(f"group {to_group} does not exist (K = {self.k})")
        if to_group == src:
            raise ValueError(f"{source!r} is already in group {to_group}")
        if len(self.groups[src]) == 1:
            raise ValueError(f"moving {source!r} would empty group {src}")
        groups = [list(g) for g in self.groups]
        groups[src].remove(source)
        groups[to_group].append(source)
        return self._edited(
            {"op": "move", "source": source, "from": src, "to": to_group}, who, groups=groups
        )

    def drop(self, source: str, who: str = "user") -> Partition:
        """A new partition without ``source``: it trains in no row (joint, soup or split).

        Raises:
            ValueError: unknown source, or a drop that would empty its group (move another
                source in first, or drop it from a partition with fewer groups).
        """
        src = self.group_of(source)
        if len(self.groups[src]) == 1:
            raise ValueError(f"dropping {source!r} would empty group {src}")
        groups = [[s for s in g if s != source] for g in self.groups]
        return self._edited(
            {"op": "drop", "source": source, "from": src},
            who,
            groups=groups,
            dropped=(*self.dropped, source),
            remove=source,
        )

    def downweight(
        self, source: str, fraction: float, *, examples: int, tokens: int, who: str = "user"
    ) -> Partition:
        """A new partition in which ``source`` trains a seeded ``fraction`` of its examples.

        Args:
            fraction: in (0, 1]; 1 undoes a down-weight.
            examples, tokens: what that subset holds (`merit_lab.partition.session.EditSession`
                counts them from the mixture's per-example tokens), so the weights stay exact.
        """
        self.group_of(source)
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
            raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        old = self.fractions.get(source, 1.0)
        if float(fraction) == old:
            raise ValueError(f"{source!r} already trains a fraction {old:g}")
        fractions = {**self.fractions, source: float(fraction)}
        return self._edited(
            {"op": "downweight", "source": source, "from": old, "to": float(fraction)},
            who,
            fractions=fractions,
            counts={source: (examples, tokens)},
        )

    def add(
        self, source: str, to_group: int, *, examples: int, tokens: int, who: str = "user"
    ) -> Partition:
        """A new partition with a source that was not in it (new, or dropped before) in group
        ``to_group``; ``examples``/``tokens`` are its train counts."""
        if source in self.sources:
            raise ValueError(f"{source!r} is already in group {self.group_of(source)}")
        if not 0 <= to_group < self.k:
            raise ValueError(f"group {to_group} does not exist (K = {self.k})")
        groups = [list(g) for g in self.groups]
        groups[to_group].append(source)
        return self._edited(
            {"op": "add", "source": source, "to": to_group},
            who,
            groups=groups,
            dropped=tuple(s for s in self.dropped if s != source),
            counts={source: (examples, tokens)},
        )

    def drop_examples(
        self, source: str, ids: Sequence[str], *, examples: int, tokens: int, who: str = "user"
    ) -> Partition:
        """A new partition in which ``source`` no longer trains the examples ``ids`` (in any row).

        Args:
            ids: example ids (``{"id": ...}`` of its train examples) to leave out.
            examples, tokens: what the source trains afterwards (`merit_lab.partition.session.
                EditSession` counts them), so the merge weights follow the examples trained.
        """
        self.group_of(source)
        ids = tuple(dict.fromkeys(str(i) for i in ids))
        old = self.excluded.get(source, ())
        again = sorted(set(ids) & set(old))
        if not ids or again:
            raise ValueError(
                f"no examples to drop (already dropped: {again})"
                if again
                else "no example ids given"
            )
        return self._edited(
            {"op": "drop_examples", "source": source, "ids": list(ids)},
            who,
            excluded={**self.excluded, source: (*old, *ids)},
            counts={source: (examples, tokens)},
        )

    def restore_examples(
        self, source: str, ids: Sequence[str], *, examples: int, tokens: int, who: str = "user"
    ) -> Partition:
        """A new partition in which dropped examples ``ids`` of ``source`` train again."""
        self.group_of(source)
        ids = tuple(dict.fromkeys(str(i) for i in ids))
        old = self.excluded.get(source, ())
        missing = sorted(set(ids) - set(old))
        if not ids or missing:
            raise ValueError(f"examples of {source!r} that were not dropped: {missing or ids}")
        kept = tuple(i for i in old if i not in ids)
        excluded = {s: v for s, v in self.excluded.items() if s != source}
        if kept:
            excluded[source] = kept
        return self._edited(
            {"op": "restore_examples", "source": source, "ids": list(ids)},
            who,
            excluded=excluded,
            counts={source: (examples, tokens)},
        )

    def _edited(
        self,
        entry: dict,
        who: str,
        *,
        groups: Sequence[Sequence[str]] | None = None,
        dropped: tuple[str, ...] | None = None,
        fractions: Mapping[str, float] | None = None,
        excluded: Mapping[str, Sequence[str]] | None = None,
        counts: Mapping[str, tuple[int, int]] = MappingProxyType({}),
        remove: str | None = None,
    ) -> Partition:
        """A copy with the given fields replaced and ``entry`` appended to the edit log."""
        examples = {s: n for s, n in self.examples.items() if s != remove}
        tokens = {s: n for s, n in self.tokens.items() if s != remove}
        for s, (n_ex, n_tok) in counts.items():
            examples[s], tokens[s] = n_ex, n_tok
        fractions = dict(self.fractions if fractions is None else fractions)
        fractions.pop(remove, None)
        excluded = dict(self.excluded if excluded is None else excluded)
        excluded.pop(remove, None)
        stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        return type(self)(
            method=self.method,
            groups=tuple(tuple(g) for g in (self.groups if groups is None else groups)),
            examples=examples,
            tokens=tokens,
            params=self.params,
            edit_log=(*self.edit_log, {**entry, "who": who, "at": stamp}),
            dropped=self.dropped if dropped is None else dropped,
            fractions=fractions,
            excluded=excluded,
        )


def check_counts(counts: Mapping[str, int], names: Sequence[str], what: str) -> dict[str, int]:
    """Counts for exactly ``names``, as positive ints; ValueError naming any offender."""
    missing = [s for s in names if s not in counts]
    if missing:
        raise ValueError(f"sources missing {what} counts: {missing}")
    unknown = sorted(set(counts) - set(names))
    if unknown:
        raise ValueError(f"{what} counts for unknown sources: {unknown}")
    out = {}
    for s in names:
        c = counts[s]
        if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c <= 0:
            raise ValueError(f"{what} count of {s!r} must be a positive integer, got {c!r}")
        out[s] = int(c)
    return out
