"""Split methods: the registry that turns a conflict space into a `Partition` of K groups.

Input: a ``ConflictSpace`` (or just names for the random baseline), per-source example and
token counts and, for ``gain``, the gradient rows. Output: a `Partition`: the paper's balanced
PCA split (`split_balanced`, any K with `split_balanced_k`), the random and k-means baselines
and the gain-searched split (`split_gain`; the search is `merit_lab.partition.search`), by name
through `PARTITION_METHODS` / `make_partition`.

One size unit: the splits balance ``tokens``, the same counts that set the merge weights
(w_k = N_k / Σ_j N_j). A run passes each source's train *response* tokens, the tokens its loss
averages over (`merit_lab.pipeline.rundir.source_counts`), so a group's merge weight is its share
of the joint run's loss and the balanced cut gives each side half of it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import numpy as np
from torch import Tensor

from merit_lab.analysis.conflict import ConflictSpace
from merit_lab.partition.gain import predict_gain
from merit_lab.partition.plan import Partition, check_counts
from merit_lab.partition.search import check_gain_rows, search_gain_split

__all__ = [
    "PARTITION_METHODS",
    "ROW_METHODS",
    "make_partition",
    "partition_method",
    "split_balanced",
    "split_balanced_k",
    "split_gain",
    "split_kmeans",
    "split_random",
]


def _check_k(k: int, n_sources: int) -> None:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"K must be a positive integer, got {k!r}")
    if k > n_sources:
        raise ValueError(f"K = {k} groups but only {n_sources} sources")


def split_balanced_k(
    space: ConflictSpace, examples: Mapping[str, int], tokens: Mapping[str, int], *, k: int
) -> Partition:
    """Recursive balanced median splits along successive PCA axes, for any K.

    A group meant to become k groups is sorted by its members' PCA coordinate on axis = depth
    and cut between two consecutive members so that the low side carries as close as possible
    to ⌊k/2⌋/k of the group's tokens (for even k: the token-weighted median), each side
    keeping at least as many sources as groups it will become. The low side becomes ⌊k/2⌋
    groups and the high side ⌈k/2⌉. For K = 2^r this is the paper's split on the top r axes;
    groups are ordered depth first, low side first, so group index bits are the axis signs.

    Args:
        space: the sources' conflict space.
        examples: per-source example counts (recorded; the steps a branch takes follow them).
        tokens: per-source token counts: the split balances these and they set the merge
            weights (a run passes response tokens; see the module docstring).
        k: number of groups, 1 ≤ k ≤ T; needs ⌈log2 k⌉ axes with positive variance.
    """
    names = space.names
    _check_k(k, len(names))
    check_counts(examples, names, "examples")
    ex = check_counts(tokens, names, "tokens")
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
        cum = np.cumsum(w)[:-1]  # tokens on the low side when cutting after position i
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
    """The paper's MERIT-rD split: K = 2^r groups by r levels of token-weighted median cuts.

    Level j cuts every current group at the token-weighted median of its members' j-th PCA
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

    ``balance="examples"`` (default, the fair baseline for the balanced split, which balances
    the same unit): shuffle the sources, seed each group with one of the first K, then give each
    next source to the group with the fewest ``tokens`` so far; every group ends within one
    source's size of 1/K of the tokens. (The name is kept for the files and configs that use it;
    the unit is the split's size unit, see the module docstring.) ``balance="count"``: shuffle
    and deal round-robin (equal source counts).
    """
    names = tuple(names)
    if len(set(names)) != len(names):
        raise ValueError("duplicate source names")
    _check_k(k, len(names))
    check_counts(examples, names, "examples")
    ex = check_counts(tokens, names, "tokens")
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
    check_counts(examples, names, "examples")
    check_counts(tokens, names, "tokens")
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
ROW_METHODS: set[str] = set()  # methods that also take the gradient rows (rows=, row_names=)


def partition_method(
    name: str, *, needs_rows: bool = False
) -> Callable[[PartitionMethod], PartitionMethod]:
    """Register ``fn(space, examples, tokens, *, r, k, seed)`` as partition method ``name``;
    ``needs_rows``: it is also called with ``rows=`` and ``row_names=`` (the gradient bank)."""

    def register(fn: PartitionMethod) -> PartitionMethod:
        PARTITION_METHODS[name] = fn
        if needs_rows:
            ROW_METHODS.add(name)
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


@partition_method("gain", needs_rows=True)
def _make_gain(space, examples, tokens, *, r, k, seed, rows, row_names) -> Partition:
    k = k if k is not None else 2**r
    return split_gain(space, examples, tokens, rows, row_names, k=k, seed=seed)


def split_gain(
    space: ConflictSpace,
    examples: Mapping[str, int],
    tokens: Mapping[str, int],
    rows: np.ndarray | Tensor | None,
    row_names: Sequence[str] | None,
    *,
    k: int,
    seed: int = 0,
    restarts: int = 50,
) -> Partition:
    """The gain-searched split: the balanced K-group split with the largest predicted merging
    gain that a seeded swap search from MERIT's PCA-median split finds (`search_gain_split`).

    Balance: every group's tokens stay within the PCA-median split's own largest deviation from
    the even share W/K (its tolerance τ); see `merit_lab.partition.search`. ``params`` record
    the predicted gain (H = I) of this split and of the PCA-median (``balanced``), random and
    k-means splits at the same K and seed (``kmeans``: None where k-means finds fewer than K
    clusters).

    Args:
        rows: (T', d) gradient rows (the bank); ``row_names`` (T',) must include every source of
            ``space`` (others are ignored).
        k: number of groups, 1 ≤ k ≤ T (the PCA start needs ⌈log2 k⌉ axes with variance).
        seed: the search's, and the random and k-means baselines'.

    Raises:
        ValueError: before any work, for an objective it cannot evaluate (no rows, a source
            without a row, non-finite or all-zero rows) or K < 1, K > T, bad counts.
    """
    names = space.names
    _check_k(k, len(names))
    check_counts(examples, names, "examples")
    check_counts(tokens, names, "tokens")
    if isinstance(restarts, bool) or not isinstance(restarts, numbers.Integral) or restarts < 0:
        raise ValueError(f"restarts must be a non-negative integer, got {restarts!r}")
    x = check_gain_rows(names, rows, row_names)
    start = split_balanced_k(space, examples, tokens, k=k)
    found = search_gain_split(start, x, names, seed=seed, restarts=restarts)
    gains = dict(found.params["predicted_gain"])
    gains["random"] = predict_gain(split_random(names, examples, tokens, k=k, seed=seed), x, names)
    try:
        gains["kmeans"] = predict_gain(
            split_kmeans(space, examples, tokens, k=k, seed=seed), x, names
        )
    except ValueError:  # fewer than k distinct clusters: no k-means baseline at this K
        gains["kmeans"] = None
    return replace(found, params={**found.params, "predicted_gain": gains})


def make_partition(
    space: ConflictSpace,
    examples: Mapping[str, int],
    tokens: Mapping[str, int],
    *,
    method: str = "balanced",
    r: int | None = None,
    k: int | None = None,
    seed: int = 0,
    rows: np.ndarray | Tensor | None = None,
    row_names: Sequence[str] | None = None,
) -> Partition:
    """A partition by method name (`PARTITION_METHODS`); ``r`` gives K = 2^r, else ``k`` is K.

    ``examples``/``tokens`` may hold more sources than ``space`` (only the space's are used).
    ``rows`` (T', d) and ``row_names`` (T',): the gradient bank, for the methods that score
    splits on it (`ROW_METHODS`: ``gain``); the others ignore them.
    """
    if r is None and k is None:
        raise ValueError("give r (K = 2^r groups) or k")
    if method not in PARTITION_METHODS:
        raise ValueError(
            f"unknown partition method {method!r}; expected one of {sorted(PARTITION_METHODS)}"
        )
    ex = {s: examples[s] for s in space.names if s in examples}
    tok = {s: tokens[s] for s in space.names if s in tokens}
    extra = {"rows": rows, "row_names": row_names} if method in ROW_METHODS else {}
    return PARTITION_METHODS[method](space, ex, tok, r=r, k=k, seed=seed, **extra)
