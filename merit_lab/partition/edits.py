"""Hand edits of a `merit_lab.partition.plan.Partition`: each returns a new partition, edit logged.

Sources: move, drop, down-weight (a seeded fraction of its examples), add. Examples: drop or
restore individual train examples of a source (by id). The counts an edit needs (examples and
tokens a source trains afterwards) come from `merit_lab.partition.session.EditSession`.
"""

from __future__ import annotations

import datetime as _dt
import numbers
from collections.abc import Mapping, Sequence
from types import MappingProxyType

__all__ = ["PartitionEdits"]


class PartitionEdits:
    """The edit operations of `Partition` (a mixin: it reads the partition's fields)."""

    def move(self, source: str, to_group: int, who: str = "user") -> PartitionEdits:
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

    def drop(self, source: str, who: str = "user") -> PartitionEdits:
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
    ) -> PartitionEdits:
        """A new partition in which ``source`` trains a seeded ``fraction`` of its examples.

        Args:
            fraction: in (0, 1]; 1 undoes a down-weight.
            examples, tokens: what that subset holds (`merit_lab.partition.session.EditSession`
            counts
                them from the mixture's per-example tokens), so the weights stay exact.
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
    ) -> PartitionEdits:
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
    ) -> PartitionEdits:
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
    ) -> PartitionEdits:
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
    ) -> PartitionEdits:
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
