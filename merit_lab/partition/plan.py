"""Partition plan: which sources train together in which branch.

Input: a ``ConflictSpace`` (or just names for the random baseline) and per-source example and
token counts. Output: a ``Partition`` of the sources into K groups with token merge weights,
saved as partition.json (`merit_lab.partition.gain.predict_gain` scores any partition).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from merit_lab.analysis.conflict import ConflictSpace
from merit_lab.io import atomic_write_json, read_json
from merit_lab.partition.edits import PartitionEdits

__all__ = [
    "PARTITION_METHODS",
    "Partition",
    "make_partition",
    "split_balanced",
    "split_balanced_k",
    "split_kmeans",
    "split_random",
]

_FORMAT = "merit-lab/partition"
_VERSION = 1


@dataclass(frozen=True)
class Partition(PartitionEdits):
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
            already
            count only that subset, so the weights are those the merge will use.
        excluded: source → ids of train examples a hand edit dropped (no row trains them; a
            down-weighted subset is drawn from the rest); ``examples``/``tokens`` count without
            them.

    Edits (`merit_lab.partition.edits`: `move`, `drop`, `downweight`, `add`, `drop_examples`,
    `restore_examples`) return a new partition with the edit logged.
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
            counts = _check_counts(getattr(self, what), members, what)
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

    def to_dict(self) -> dict[str, Any]:
        """JSON document; ``weights``/``group_*`` are derived and recomputed on load."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
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

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Partition:
        if d.get("format") != _FORMAT or d.get("version") != _VERSION:
            raise ValueError(
                f"not a {_FORMAT} v{_VERSION} document: {d.get('format')!r} v{d.get('version')}"
            )
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
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Partition:
        """Read partition.json; every problem is one ValueError that starts with the path."""
        try:
            data = read_json(path)  # the error names the path and line
        except ValueError as e:
            raise ValueError(f"{e}; fix it, or delete it: the partition stage writes one") from e
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as e:
            what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise ValueError(f"{path}: {what}") from e


def _check_counts(counts: Mapping[str, int], names: Sequence[str], what: str) -> dict[str, int]:
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


def _check_k(k: int, n_sources: int) -> None:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"K must be a positive integer, got {k!r}")
    if k > n_sources:
        raise ValueError(f"K = {k} groups but only {n_sources} sources")


def split_balanced_k(
    space: ConflictSpace, examples: Mapping[str, int], tokens: Mapping[str, int], *, k: int
) -> Partition:
    """Recursive sample-balanced median splits along successive PCA axes, for any K.

    A group meant to become k groups is sorted by its members' PCA coordinate on axis = depth
    and cut between two consecutive members so that the low side carries as close as possible
    to ⌊k/2⌋/k of the group's examples (for even k: the sample-weighted median), each side
    keeping at least as many sources as groups it will become. The low side becomes ⌊k/2⌋
    groups and the high side ⌈k/2⌉. For K = 2^r this is the paper's split on the top r axes;
    groups are ordered depth first, low side first, so group index bits are the axis signs.

    Args:
        space: the sources' conflict space.
        examples: per-source example counts (the split balances these).
        tokens: per-source token counts (they set the merge weights).
        k: number of groups, 1 ≤ k ≤ T; needs ⌈log2 k⌉ axes with positive variance.
    """
    names = space.names
    _check_k(k, len(names))
    ex = _check_counts(examples, names, "examples")
    _check_counts(tokens, names, "tokens")
    depth_needed = math.ceil(math.log2(k)) if k > 1 else 0
    if depth_needed > space.n_axes:
        raise ValueError(
            f"K = {k} needs {depth_needed} PCA axes but the conflict space has {space.n_axes}"
        )
    z = space.embedding
    pos = {s: i for i, s in enumerate(names)}

    def split(members: list[str], k_here: int, depth: int) -> list[list[str]]:
        if k_here == 1:
            return [members]
        k_low = k_here // 2
        # Ties on the coordinate fall back to the space's source order: deterministic.
        ordered = sorted(members, key=lambda s: (z[pos[s], depth], pos[s]))
        w = np.array([ex[s] for s in ordered], dtype=np.float64)
        cum = np.cumsum(w)[:-1]  # examples on the low side when cutting after position i
        target = w.sum() * k_low / k_here
        cuts = np.arange(1, len(ordered))
        allowed = (cuts >= k_low) & (len(ordered) - cuts >= k_here - k_low)
        gap = np.where(allowed, np.abs(cum - target), np.inf)
        c = int(cuts[np.argmin(gap)])
        return split(ordered[:c], k_low, depth + 1) + split(ordered[c:], k_here - k_low, depth + 1)

    groups = split(list(names), k, 0)
    # Inside a group, list sources in the space's order so the plan reads like the mixture.
    groups = [sorted(g, key=pos.__getitem__) for g in groups]
    return Partition(
        method="balanced",
        groups=tuple(tuple(g) for g in groups),
        examples=examples,
        tokens=tokens,
        params={"k": k, "axes": list(range(depth_needed))},
    )


def split_balanced(
    space: ConflictSpace, examples: Mapping[str, int], tokens: Mapping[str, int], *, r: int
) -> Partition:
    """The paper's MERIT-rD split: K = 2^r groups by r levels of sample-weighted median cuts.

    Level j cuts every current group at the sample-weighted median of its members' j-th PCA
    coordinate. See ``split_balanced_k`` for the cut rule.
    """
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 0:
        raise ValueError(f"r must be a non-negative integer, got {r!r}")
    if r > space.n_axes:
        raise ValueError(f"r = {r} axes requested but the conflict space has {space.n_axes}")
    part = split_balanced_k(space, examples, tokens, k=2**r)
    return Partition(
        method="balanced",
        groups=part.groups,
        examples=part.examples,
        tokens=part.tokens,
        params={"r": r, "k": 2**r, "axes": list(range(r))},
    )


def split_random(
    names: Sequence[str],
    examples: Mapping[str, int],
    tokens: Mapping[str, int],
    *,
    k: int,
    seed: int,
    balance: str = "examples",
) -> Partition:
    """Random baseline: K groups that ignore conflict.

    ``balance="examples"`` (default, the fair baseline for the balanced split): shuffle the
    sources, seed each group with one of the first K, then give each next source to the group
    with the fewest examples so far; every group ends within one source's size of 1/K of the
    examples. ``balance="count"``: shuffle and deal round-robin (equal source counts).
    """
    names = tuple(names)
    if len(set(names)) != len(names):
        raise ValueError("duplicate source names")
    _check_k(k, len(names))
    ex = _check_counts(examples, names, "examples")
    _check_counts(tokens, names, "tokens")
    if balance not in ("examples", "count"):
        raise ValueError(f"balance must be 'examples' or 'count', got {balance!r}")
    rng = np.random.default_rng(seed)
    order = [names[i] for i in rng.permutation(len(names))]
    groups: list[list[str]] = [[] for _ in range(k)]
    loads = [0] * k
    for i, s in enumerate(order):
        # The first K sources seed the K groups, so none stays empty.
        lightest = min(range(k), key=lambda j: (loads[j], j))
        g = i % k if balance == "count" or i < k else lightest
        groups[g].append(s)
        loads[g] += ex[s]
    pos = {s: i for i, s in enumerate(names)}
    groups = [sorted(g, key=pos.__getitem__) for g in groups]
    return Partition(
        method="random",
        groups=tuple(tuple(g) for g in groups),
        examples=examples,
        tokens=tokens,
        params={"k": k, "seed": seed, "balance": balance},
    )


def split_kmeans(
    space: ConflictSpace,
    examples: Mapping[str, int],
    tokens: Mapping[str, int],
    *,
    k: int,
    seed: int,
    r: int | None = None,
) -> Partition:
    """K-means baseline on the first r PCA coordinates (all positive-variance axes by default).

    With all axes, Euclidean distances between PCA scores equal those between the unit
    gradients, so this is k-means on normalised gradients. Clusters are unweighted (not sample
    balanced) and numbered by their first source in the space's order.
    """
    from sklearn.cluster import KMeans

    names = space.names
    _check_k(k, len(names))
    _check_counts(examples, names, "examples")
    _check_counts(tokens, names, "tokens")
    r = space.n_axes if r is None else r
    if not 1 <= r <= space.n_axes:
        raise ValueError(f"r must be in [1, {space.n_axes}] (axes with variance), got {r}")
    x = space.coords(r)
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    if len(set(labels.tolist())) < k:
        raise ValueError(f"k-means found fewer than {k} distinct clusters (duplicate sources?)")
    first_seen = list(dict.fromkeys(labels.tolist()))
    groups = tuple(
        tuple(s for s, lab in zip(names, labels, strict=True) if lab == c) for c in first_seen
    )
    return Partition(
        method="kmeans",
        groups=groups,
        examples=examples,
        tokens=tokens,
        params={"k": k, "seed": seed, "r": r},
    )


# name → builder(space, examples, tokens, *, r, k, seed) -> Partition. A new partition method is
# one function registered here; `make_partition`, the config and the editor then know it.
PartitionMethod = Callable[..., Partition]
PARTITION_METHODS: dict[str, PartitionMethod] = {}


def partition_method(name: str) -> Callable[[PartitionMethod], PartitionMethod]:
    """Register ``fn(space, examples, tokens, *, r, k, seed)`` as partition method ``name``."""

    def register(fn: PartitionMethod) -> PartitionMethod:
        PARTITION_METHODS[name] = fn
        return fn

    return register


@partition_method("balanced")
def _make_balanced(space, examples, tokens, *, r, k, seed) -> Partition:
    if r is not None and k is None:
        return split_balanced(space, examples, tokens, r=r)
    return split_balanced_k(space, examples, tokens, k=k if k is not None else 2**r)


@partition_method("random")
def _make_random(space, examples, tokens, *, r, k, seed) -> Partition:
    return split_random(space.names, examples, tokens, k=k if k is not None else 2**r, seed=seed)


@partition_method("kmeans")
def _make_kmeans(space, examples, tokens, *, r, k, seed) -> Partition:
    return split_kmeans(space, examples, tokens, k=k if k is not None else 2**r, seed=seed)


def make_partition(
    space: ConflictSpace,
    examples: Mapping[str, int],
    tokens: Mapping[str, int],
    *,
    method: str = "balanced",
    r: int | None = None,
    k: int | None = None,
    seed: int = 0,
) -> Partition:
    """A partition by method name (`PARTITION_METHODS`); ``r`` gives K = 2^r, else ``k`` is K.

    ``examples``/``tokens`` may hold more sources than ``space`` (only the space's are used).
    """
    if r is None and k is None:
        raise ValueError("give r (K = 2^r groups) or k")
    if method not in PARTITION_METHODS:
        raise ValueError(
            f"unknown partition method {method!r}; expected one of {sorted(PARTITION_METHODS)}"
        )
    ex = {s: examples[s] for s in space.names if s in examples}
    tok = {s: tokens[s] for s in space.names if s in tokens}
    return PARTITION_METHODS[method](space, ex, tok, r=r, k=k, seed=seed)
