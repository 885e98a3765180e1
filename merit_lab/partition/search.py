"""The gain-searched split: the balanced K-group partition with the largest predicted merging gain.

Input: a start `Partition` (MERIT's PCA-median split: `merit_lab.partition.methods.split_gain`)
and the sources' gradient rows (the bank). Output: a `Partition` (method ``gain``) found by a
seeded local search of moves and swaps that keep the start's balance, with its predicted gain
and the start's in ``params``; `search_summary` prints it beside the other splits at that K.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

import numpy as np
from torch import Tensor

from merit_lab.partition.gain import predict_gain
from merit_lab.partition.plan import Partition

__all__ = ["check_gain_rows", "imbalance", "search_gain_split", "search_summary"]

_KICK = 4  # random feasible swaps applied to the best split before each restart's local search


def imbalance(groups: Sequence[Sequence[str]], tokens: Mapping[str, int]) -> int:
    """K times the largest deviation of a group's tokens from the even share: max_g |K·L_g − W|.

    An integer, so the balance check is exact; divide by K for the deviation in tokens.
    """
    k = len(groups)
    loads = [sum(int(tokens[s]) for s in g) for g in groups]
    total = sum(loads)
    return max(abs(k * load - total) for load in loads)


def check_gain_rows(
    names: Sequence[str], rows: np.ndarray | Tensor | None, row_names: Sequence[str] | None
) -> np.ndarray:
    """The sources' rows, (T, d) float64 in ``names`` order; one ValueError for anything the
    predicted gain cannot use: no rows, a source without a row, non-finite or all-zero rows."""
    if rows is None or row_names is None:
        raise ValueError(
            "partition method 'gain' scores splits on the gradient rows: pass rows= and "
            "row_names= (the run's bank)"
        )
    if isinstance(rows, Tensor):
        rows = rows.detach().to("cpu").double().numpy()
    x = np.asarray(rows, dtype=np.float64)
    row_names = list(row_names)
    if x.ndim != 2 or x.shape[0] != len(row_names):
        raise ValueError(f"rows of shape {x.shape} for {len(row_names)} row names")
    if len(set(row_names)) != len(row_names):
        raise ValueError("duplicate row names")
    pos = {s: i for i, s in enumerate(row_names)}
    missing = [s for s in names if s not in pos]
    if missing:
        raise ValueError(f"no gradient row for kept sources: {missing}")
    x = x[[pos[s] for s in names]]
    bad = [s for s, ok in zip(names, np.isfinite(x).all(axis=1), strict=True) if not ok]
    if bad:
        raise ValueError(f"gradient rows with NaN or infinite values: {bad}")
    zero = [s for s, n in zip(names, np.linalg.norm(x, axis=1), strict=True) if n == 0]
    if zero:
        raise ValueError(f"all-zero gradient rows (no signal to split on): {zero}")
    return x


class _State:
    """Labels and the running sums of a K-group split, for O(T) evaluation of every move.

    With x_i = n_i g_i (token-weighted rows), G = X Xᵀ, S_g = Σ_{i∈g} x_i, W_g its tokens:
    the predicted gain (H = I, η = 1) is ½ (Σ_g ‖S_g‖²/W_g / W − ‖S‖²/W²), so the search
    maximises F = Σ_g Q_g / W_g with Q_g = ‖S_g‖², kept with P[i, g] = x_i · S_g.
    """

    def __init__(self, gram: np.ndarray, n: np.ndarray, labels: np.ndarray, k: int) -> None:
        self.gram, self.n, self.k = gram, n, k
        self.labels = labels.copy()
        onehot = np.eye(k)[labels]  # (T, K)
        self.p = gram @ onehot
        self.q = np.einsum("ig,ig->g", onehot, self.p)
        self.w = n @ onehot
        self.count = onehot.sum(axis=0).astype(int)

    @property
    def score(self) -> float:
        return float((self.q / self.w).sum())

    def apply(self, i: int, b: int, j: int | None) -> None:
        """Move source i to group b; with j (a source of b), move j to i's group."""
        a = int(self.labels[i])
        for src, dst in ((i, b),) if j is None else ((i, b), (j, a)):
            old = int(self.labels[src])
            g = self.gram[:, src]
            self.q[old] += -2 * self.p[src, old] + self.gram[src, src]
            self.p[:, old] -= g
            self.q[dst] += 2 * self.p[src, dst] + self.gram[src, src]
            self.p[:, dst] += g
            self.w[old] -= self.n[src]
            self.w[dst] += self.n[src]
            self.count[old] -= 1
            self.count[dst] += 1
            self.labels[src] = dst


def _best_action(
    st: _State, i: int, slack: int, total: int, rng: np.random.Generator
) -> tuple[float, int, int | None]:
    """The best feasible move or swap of source i: (ΔF, group, partner or None).

    Feasible: every group keeps a source and |K·L_g − W| ≤ ``slack``. Ties (equal ΔF) go to a
    seeded random choice.
    """
    k, lab, g, n = st.k, st.labels, st.gram, st.n
    a = int(lab[i])
    base = st.q / st.w
    ok_load = lambda load: np.abs(k * load - total) <= slack  # noqa: E731
    cands: list[tuple[float, int, int | None]] = []
    # moves: i → b
    if st.count[a] > 1:
        qa = st.q[a] - 2 * st.p[i, a] + g[i, i]
        wa = st.w[a] - n[i]
        for b in range(k):
            if b == a or not ok_load(wa) or not ok_load(st.w[b] + n[i]):
                continue
            qb = st.q[b] + 2 * st.p[i, b] + g[i, i]
            d = qa / wa + qb / (st.w[b] + n[i]) - base[a] - base[b]
            cands.append((float(d), b, None))
    # swaps: i ↔ j for every j outside a
    js = np.flatnonzero(lab != a)
    if js.size:
        bs = lab[js]
        gii, gjj, gij = g[i, i], g[js, js], g[i, js]
        qa = st.q[a] + gii + gjj - 2 * st.p[i, a] + 2 * st.p[js, a] - 2 * gij
        qb = st.q[bs] + gii + gjj - 2 * st.p[js, bs] + 2 * st.p[i, bs] - 2 * gij
        wa = st.w[a] - n[i] + n[js]
        wb = st.w[bs] + n[i] - n[js]
        d = qa / wa + qb / wb - base[a] - base[bs]
        feasible = ok_load(wa) & ok_load(wb)
        cands += [
            (float(dj), int(bj), int(j))
            for dj, bj, j, f in zip(d, bs, js, feasible, strict=True)
            if f
        ]
    if not cands:
        return 0.0, a, None
    ds = np.array([c[0] for c in cands])
    top = np.flatnonzero(ds >= ds.max() - 1e-12 * max(1.0, abs(ds.max())))
    return cands[int(top[rng.integers(top.size)])] if top.size > 1 else cands[int(top[0])]


def _local_search(st: _State, slack: int, total: int, rng: np.random.Generator, tol: float) -> int:
    """Improve ``st`` in place until no feasible move or swap raises F by more than ``tol``;
    sources are visited in a seeded order each pass. Returns the number of accepted actions."""
    accepted = 0
    improved = True
    while improved:
        improved = False
        for i in rng.permutation(st.labels.size):
            d, b, j = _best_action(st, int(i), slack, total, rng)
            if d > tol:
                st.apply(int(i), b, j)
                accepted += 1
                improved = True
    return accepted


def _kick(st: _State, slack: int, total: int, rng: np.random.Generator) -> None:
    """Apply `_KICK` random feasible swaps (whatever they do to F), drawing at most 50 pairs
    per swap: a restart's perturbation."""
    k, done = st.k, 0
    for _ in range(50 * _KICK):
        if done == _KICK:
            return
        i, j = rng.permutation(st.labels.size)[:2]
        a, b = int(st.labels[i]), int(st.labels[j])
        if a == b:
            continue
        wa = st.w[a] - st.n[i] + st.n[j]
        wb = st.w[b] + st.n[i] - st.n[j]
        if abs(k * wa - total) <= slack and abs(k * wb - total) <= slack:
            st.apply(int(i), b, int(j))
            done += 1


def search_gain_split(
    start: Partition,
    rows: np.ndarray | Tensor | None,
    row_names: Sequence[str] | None,
    *,
    seed: int = 0,
    restarts: int = 50,
) -> Partition:
    """The split with the largest predicted merging gain that a swap search from ``start`` finds,
    every group as balanced as in ``start``.

    Objective: `predict_gain` (H = I, η = 1, raw rows, the partition's token weights),
    ½ Σ_g w_g ‖ḡ_g − ḡ‖². Balance: ``start`` (MERIT's PCA-median split, `split_gain`) leaves
    each group's tokens L_g within τ = max_g |L_g − W/K| of the even share W/K; every split the
    search visits keeps every group non-empty and within that same τ (checked exactly as
    |K·L_g − W| ≤ K·τ, `imbalance`). Search: visit the sources in a seeded order and apply each
    one's best feasible action (move it to another group, or swap it with a source of another
    group) while it raises the gain; then ``restarts`` times, perturb the best split by four
    random feasible swaps and search again, keeping the best. Ties and visiting order follow
    ``seed``: deterministic for a seed, and never a lower predicted gain than ``start``.

    Args:
        start: the split to start from (its groups, counts and K).
        rows: (T', d) gradient rows (the bank), any float dtype; ``row_names`` (T',) name them
            and must include every source of ``start`` (others are ignored; the sources are
            listed in their order).
        seed: visiting order, tie-breaks and restarts.
        restarts: perturbation rounds after the first local optimum (0: plain local search).

    Returns:
        A ``Partition`` with method ``gain``; ``params`` hold k, seed, restarts, the start's
        method, the balance (unit, tolerance τ, target W/K), the moves of the first descent,
        the restarts that improved on it and ``predicted_gain`` of this split and the start's.

    Raises:
        ValueError: before any search, for an objective it cannot evaluate: no rows, a source
            without a row, non-finite or all-zero rows; a negative ``restarts``.
    """
    if isinstance(restarts, bool) or not isinstance(restarts, numbers.Integral) or restarts < 0:
        raise ValueError(f"restarts must be a non-negative integer, got {restarts!r}")
    if row_names is not None:
        order = {s: i for i, s in enumerate(row_names)}
        names = sorted(start.sources, key=lambda s: order.get(s, len(order)))
    else:
        names = list(start.sources)
    x = check_gain_rows(names, rows, row_names)
    tok, k = dict(start.tokens), start.k
    n = np.array([tok[s] for s in names], dtype=np.float64)
    xw = n[:, None] * x
    pos = {s: i for i, s in enumerate(names)}
    labels = np.empty(len(names), dtype=int)
    for g, members in enumerate(start.groups):
        labels[[pos[s] for s in members]] = g
    total = int(sum(tok.values()))
    slack = imbalance(start.groups, tok)
    rng = np.random.default_rng(seed)
    st = _State(xw @ xw.T, n, labels, k)
    tol = 1e-12 * max(1.0, abs(st.score))
    moves = _local_search(st, slack, total, rng, tol)
    # Scores are recomputed from the labels (not the running sums) before they are compared.
    best_labels = st.labels.copy()
    best_score = _State(st.gram, n, best_labels, k).score
    improved = 0
    for _ in range(restarts):
        st = _State(st.gram, n, best_labels, k)
        _kick(st, slack, total, rng)
        _local_search(st, slack, total, rng, tol)
        score = _State(st.gram, n, st.labels, k).score
        if score > best_score + tol:
            best_labels, best_score, improved = st.labels.copy(), score, improved + 1

    groups = tuple(
        tuple(s for s, lab in zip(names, best_labels, strict=True) if lab == g) for g in range(k)
    )
    if imbalance(groups, tok) > slack:  # the search only visits feasible splits
        raise AssertionError("gain search left the balance tolerance")
    counts = {"examples": start.examples, "tokens": start.tokens}
    found = Partition(method="gain", groups=groups, **counts)
    gains = {"gain": predict_gain(found, x, names), start.method: predict_gain(start, x, names)}
    if gains["gain"] < gains[start.method]:  # a float tie with the start: keep the start's groups
        found = Partition(method="gain", groups=start.groups, **counts)
        gains["gain"] = gains[start.method]
    params = {
        "k": k,
        "seed": seed,
        "restarts": restarts,
        "start": start.method,
        "moves": moves,  # accepted by the first descent from the start
        "restarts_improved": improved,
        "balance": {"unit": "tokens", "tolerance": slack / k, "target": total / k},
        "predicted_gain": gains,
    }
    return Partition(method="gain", groups=found.groups, params=params, **counts)


def search_summary(partition: Partition) -> str | None:
    """One line: a gain-searched split's predicted gain beside PCA's, random's and k-means' at
    the same K (None for a partition without them)."""
    gains = partition.params.get("predicted_gain")
    if not isinstance(gains, Mapping):
        return None
    base = gains.get("balanced")

    def cell(key: str, label: str) -> str:
        v = gains.get(key)
        if v is None:
            return f"{label} –"
        ratio = f" ({v / base:.2f}×)" if base and key != "balanced" else ""
        return f"{label} {v:.4g}{ratio}"

    tol = partition.params.get("balance", {}).get("tolerance")
    within = f", groups within {tol:.0f} tokens of the even share" if tol is not None else ""
    return (
        f"predicted gain (H = I) at K = {partition.k}: "
        + ", ".join(
            cell(key, label)
            for key, label in (
                ("gain", "gain-searched"),
                ("balanced", "PCA-median"),
                ("random", "random"),
                ("kmeans", "k-means"),
            )
        )
        + within
    )
