"""Fold stability: how much the conflict matrix and its split move between disjoint halves of
the calibration examples, read off the m fold rows the gradient stage keeps (no new gradient).

Input: fold rows (T, m, d) with their response tokens (T, m) (`GradientBank.folds`) and the
counts the split balances. Output: `FoldStability` — each cosine's jackknife standard error, the
split-half reliability of the matrix, for r = 1..3 the ARI between the splits of disjoint halves,
each source's probability of changing group, and the n that would reach a target agreement.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from merit_lab.analysis.array_file import load_beside, save_beside
from merit_lab.analysis.conflict import space_from_cosine
from merit_lab.envelope import load_enveloped, unwrap, wrap
from merit_lab.partition.methods import ROW_METHODS, make_partition

__all__ = [
    "FOLD_AGREEMENT_TARGET",
    "FoldStability",
    "compute_fold_stability",
    "fold_gram",
    "half_pairings",
]

# The r = 2 agreement a run should reach: two independent calibration draws of the run's size
# split alike at ARI >= this (the bootstrap's `UNSTABLE_ARI` line).
FOLD_AGREEMENT_TARGET = 0.8
FOLD_STABILITY_FORMAT = "merit-lab/fold-stability"
# 2: the (T, T) matrices in fold_stability.safetensors beside the JSON (1: every array inline).
FOLD_STABILITY_VERSION = 2
# Simulated pairs of draws per size of the agreement curve (the same multipliers at every size:
# a smooth curve; its standard error about 0.2 / √16 = 0.05 where the ARI spreads by 0.2).
SIMULATIONS = 16


@dataclass(frozen=True, eq=False)
class FoldStability:
    """The stability of a run's conflict matrix and split, from its fold rows.

    Two disjoint halves of the folds are two independent calibration draws of n/2 examples
    each; everything here compares such halves (all distinct pairings of the folds into two
    halves, at most ``max_pairings``).

    Attributes:
        names: (T,) sources, the order of every matrix.
        folds: m; n_examples: (T,) calibration examples per source (the folds together).
        cosine: (T, T) the cosine matrix of the full rows (the bank's, to float rounding).
        cosine_se: (T, T) each cosine's standard error: the delete-one-fold jackknife.
        pearson_halves: (P,) Pearson correlation of the off-diagonal cosines of the two halves'
            matrices, one per pairing (nan with fewer than 3 sources).
        reliability: the matrix's split-half reliability at the full n: the median of
            ``pearson_halves`` Spearman-Brown corrected, 2ρ / (1 + ρ).
        ari_halves: r → (P,) ARI between the two halves' splits (K = 2^r, the run's method).
        flip: r → (T,) each source's probability of changing group between two halves: the
            share of halves pairings in which fewer than half of its group-mates in one half
            are its group-mates in the other (group labels play no part).
        coassign: r → (T, T) share of the 2P half splits in which two sources share a group.
        sizes: (G,) calibration sizes n' (examples per source) of the agreement curve: the run's
            n times 2^k, k = −1 … 6 (n/2 to 64 n).
        curve: r → (G,) the ARI expected between the r-axis splits of two independent draws of
            n' examples per source, simulated from the folds (`compute_fold_stability`).
        info: method, seed, pairings, simulations, the model in words.
    """

    names: tuple[str, ...]
    folds: int
    n_examples: np.ndarray
    cosine: np.ndarray
    cosine_se: np.ndarray
    pearson_halves: np.ndarray
    reliability: float
    ari_halves: Mapping[int, np.ndarray]
    flip: Mapping[int, np.ndarray]
    coassign: Mapping[int, np.ndarray]
    sizes: np.ndarray
    curve: Mapping[int, np.ndarray]
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def rs(self) -> tuple[int, ...]:
        return tuple(sorted(self.ari_halves))

    @property
    def n(self) -> float:
        """The calibration size the statistics refer to: the median examples per source."""
        return float(np.median(self.n_examples))

    def agreement(self, r: int, n: float | None = None) -> float:
        """The ARI expected between the r-axis splits of two independent draws of ``n``
        examples per source (default: the run's n): the simulated `curve`, interpolated in
        log n (held at its ends)."""
        x = math.log(self.n if n is None else n)
        return float(np.interp(x, np.log(self.sizes), self.curve[r]))

    def n_for(self, r: int = 2, target: float = FOLD_AGREEMENT_TARGET) -> int | None:
        """The smallest examples per source at which two independent draws' r-axis splits are
        expected to agree at ARI ``target`` (the first crossing of `curve`, interpolated in log
        n); None when even the largest size (64 n) does not reach it."""
        c = self.curve[r]
        hit = np.flatnonzero(c >= target)
        if hit.size == 0:
            return None
        i = int(hit[0])
        if i == 0:
            return math.ceil(self.sizes[0])
        lo, hi = math.log(self.sizes[i - 1]), math.log(self.sizes[i])
        t = (target - c[i - 1]) / (c[i] - c[i - 1])
        return math.ceil(math.exp(lo + t * (hi - lo)))

    def summary(self) -> pd.DataFrame:
        """One row per r: the halves' ARI (median, min, max, mean), the curve at n/2 (the
        simulated counterpart of the halves' mean: the curve is a mean ARI, so compare it with
        the mean, not the median), the ARI expected at the run's n and the n that reaches
        `FOLD_AGREEMENT_TARGET`."""
        rows = []
        for r in self.rs:
            a = self.ari_halves[r]
            rows.append(
                {
                    "r": r,
                    "k": 2**r,
                    "ari_half_median": float(np.median(a)),
                    "ari_half_min": float(a.min()),
                    "ari_half_max": float(a.max()),
                    "ari_half_mean": float(a.mean()),
                    "ari_at_half": self.agreement(r, self.n / 2),
                    "ari_at_n": self.agreement(r),
                    "n_for_target": self.n_for(r),
                }
            )
        return pd.DataFrame(rows).set_index("r")

    def unstable_sources(self, r: int, threshold: float = 0.5) -> list[str]:
        """Sources that change group between halves in at least ``threshold`` of pairings,
        most unstable first."""
        p = self.flip[r]
        return [self.names[i] for i in np.argsort(-p, kind="stable") if p[i] >= threshold]

    def warning(self, r: int = 2, threshold: float = FOLD_AGREEMENT_TARGET) -> str:
        """A plain warning when two independent draws of the run's size would split alike (r
        axes) at ARI below ``threshold``, naming the n that would reach it; "" when fine or
        when r was not measured.

        None either when the halves (two measured draws of n/2) already agree at a mean ARI of at
        least ``threshold``: two draws of n agree at least as well as two of n/2; the simulated
        curve, centred on the run's own noisy rows, can read low (`compute_fold_stability`).
        """
        if r not in self.ari_halves:
            return ""
        at_n = self.agreement(r)
        mean = float(np.mean(self.ari_halves[r]))
        if (not math.isnan(at_n) and at_n >= threshold) or mean >= threshold:
            return ""
        half = float(np.median(self.ari_halves[r]))
        need = self.n_for(r, threshold)
        more = (
            f"about n = {need} calibration examples per source would reach {threshold}"
            if need is not None
            else f"even n = {self.sizes[-1]:.0f} per source would not reach {threshold}"
        )
        return (
            f"Unstable split: two disjoint halves of the calibration examples ({self.n / 2:.0f} "
            f"per source each) split alike at r = {r} at median ARI {half:.2f} (mean "
            f"{mean:.2f}); at the run's "
            f"n = {self.n:.0f} two draws would agree at about {at_n:.2f} (< {threshold}). "
            f"Another calibration draw would likely give another split: {more} (raise "
            "calibration.n), or split on fewer axes."
        )

    def describe(self, r: int | None = 2) -> list[str]:
        """Plain-text lines for a report, the CLI or an editor; the `warning` of ``r`` last."""
        iu = np.triu_indices(len(self.names), k=1)
        se = self.cosine_se[iu]
        lines = [
            f"Fold stability ({self.folds} folds of the calibration examples, "
            f"{len(self.pearson_halves)} pairings into halves): cosine standard error median "
            f"{np.median(se):.3f} (max {se.max():.3f}); split-half reliability of the matrix "
            + (
                f"{self.reliability:.3f} (Spearman-Brown corrected to the full n)."
                if not math.isnan(self.reliability)
                else "undefined (it needs 3 sources)."
            )
        ]
        for rr, row in self.summary().iterrows():
            wav = self.unstable_sources(int(rr))
            need = row["n_for_target"]
            lines.append(
                f"r = {rr} (K = {int(row['k'])}): halves agree at ARI "
                f"{row['ari_half_median']:.2f} "
                f"(range {row['ari_half_min']:.2f}–{row['ari_half_max']:.2f}, mean "
                f"{row['ari_half_mean']:.2f}; simulated at n/2 {row['ari_at_half']:.2f}); two "
                f"draws of n = {self.n:.0f} would agree at about {row['ari_at_n']:.2f}"
                + (
                    f"; n ≈ {need:.0f} reaches {FOLD_AGREEMENT_TARGET}"
                    if need is not None and not pd.isna(need)
                    else ""
                )
                + (f"; sources that change group: {', '.join(wav)}" if wav else "")
                + "."
            )
        warning = self.warning(r) if r is not None else ""
        if warning:
            lines.append(f"WARNING: {warning}")
        return lines

    def _matrices(self) -> dict[str, np.ndarray]:
        """The (T, T) arrays: the cosines, their standard errors, each r's co-assignment."""
        out = {"cosine": self.cosine, "cosine_se": self.cosine_se}
        out.update({f"coassign_r{r}": np.asarray(v) for r, v in self.coassign.items()})
        return out

    def _payload(self, inline: bool = True) -> dict[str, Any]:
        def per_r(m: Mapping[int, Any]) -> dict[str, Any]:
            return {
                str(r): (np.asarray(v).tolist() if v is not None else None) for r, v in m.items()
            }

        d: dict[str, Any] = {
            "names": list(self.names),
            "folds": self.folds,
            "n_examples": self.n_examples.tolist(),
            "pearson_halves": _nan_to_none(self.pearson_halves.tolist()),
            "reliability": _nan_to_none(self.reliability),
            "ari_halves": per_r(self.ari_halves),
            "flip": per_r(self.flip),
            "sizes": self.sizes.tolist(),
            "curve": per_r(self.curve),
            "info": dict(self.info),
        }
        if inline:
            d.update(
                cosine=self.cosine.tolist(),
                cosine_se=self.cosine_se.tolist(),
                coassign=per_r(self.coassign),
            )
        return d

    def to_dict(self) -> dict[str, Any]:
        """One JSON document with every array inline (version 1 of ``fold_stability.json``: small
        runs and embedding; `save` puts the (T, T) matrices in a file beside it)."""
        return wrap(FOLD_STABILITY_FORMAT, 1, self._payload())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str | os.PathLike = "") -> FoldStability:
        """The stability of a `to_dict` document; another format or a newer version is refused
        (`merit_lab.envelope.EnvelopeError`, naming ``source``)."""
        payload = unwrap(d, FOLD_STABILITY_FORMAT, FOLD_STABILITY_VERSION, source=source)
        if "cosine" not in payload:
            where = f"{os.fspath(source)}: " if source else ""
            raise ValueError(f"{where}the matrices are in a file beside it: use FoldStability.load")
        return cls._from_payload(payload)

    @classmethod
    def _from_payload(cls, d: Mapping[str, Any]) -> FoldStability:
        def per_r(key: str) -> dict[int, np.ndarray]:
            return {int(r): np.asarray(v, dtype=np.float64) for r, v in d[key].items()}

        return cls(
            names=tuple(d["names"]),
            folds=int(d["folds"]),
            n_examples=np.asarray(d["n_examples"], dtype=np.int64),
            cosine=np.asarray(d["cosine"], dtype=np.float64),
            cosine_se=np.asarray(d["cosine_se"], dtype=np.float64),
            pearson_halves=np.array(d["pearson_halves"], dtype=np.float64),  # None → nan
            reliability=math.nan if d["reliability"] is None else float(d["reliability"]),
            ari_halves=per_r("ari_halves"),
            flip=per_r("flip"),
            coassign=per_r("coassign"),
            sizes=np.asarray(d["sizes"], dtype=np.float64),
            curve=per_r("curve"),
            info=dict(d.get("info", {})),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the (T, T) matrices to ``<stem>.safetensors`` (streamed in row blocks), then
        the rest with their sha256 to ``path`` (``fold_stability.json``, written last: it marks
        the stability saved); both atomically. At T = 10,000 the JSON stays small."""
        v = FOLD_STABILITY_VERSION
        payload = self._payload(inline=False)
        return save_beside(path, FOLD_STABILITY_FORMAT, v, payload, self._matrices())

    @classmethod
    def load(cls, path: str | os.PathLike) -> FoldStability:
        """Read `save`'s file and map its matrices read-only; a version-1 file with every array
        inline reads too. A missing, cut or mismatched matrices file is one ValueError naming
        it; another format or a newer version is refused, naming the file."""
        d = load_enveloped(path, FOLD_STABILITY_FORMAT, FOLD_STABILITY_VERSION)
        if "cosine" in d:  # version 1: every array inline
            return cls._from_payload(d)
        redo = "run the conflict stage again (it rewrites both files)"
        d, arrays = load_beside(path, FOLD_STABILITY_FORMAT, FOLD_STABILITY_VERSION, redo)
        co = {k.removeprefix("coassign_r"): v for k, v in arrays.items() if "coassign" in k}
        return cls._from_payload({**d, **arrays, "coassign": co})


def half_pairings(m: int, limit: int = 64) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The distinct ways to pair m folds into two halves (⌊m/2⌋ and ⌈m/2⌉ folds; each
    unordered pairing once: for even m, fold 0 is always in the first half), in lexicographic
    order, at most ``limit`` (m = 4: 3 pairings; 6: 10; 8: 35)."""
    if m < 2:
        raise ValueError(f"halves need at least 2 folds, got {m}")
    everything = set(range(m))
    out = []
    for a in itertools.combinations(range(m), m // 2):
        if m % 2 == 0 and 0 not in a:
            continue
        out.append((a, tuple(sorted(everything - set(a)))))
        if len(out) == limit:
            break
    return out


def fold_gram(folds: np.ndarray, chunk: int = 2**14) -> np.ndarray:
    """(T, m, T, m) float64 inner products of every pair of fold rows, accumulated over column
    chunks (memory: one (T·m, chunk) float64 block): every cosine of any fold mean follows."""
    t, m, d = folds.shape
    flat = folds.reshape(t * m, d)
    gram = np.zeros((t * m, t * m))
    for lo in range(0, d, chunk):
        block = np.asarray(flat[:, lo : lo + chunk], dtype=np.float64)
        gram += block @ block.T
    return gram.reshape(t, m, t, m)


def _cosine_of(gram: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The (T, T) cosine matrix of the fold means Σ_f weights[t, f] · folds[t, f]."""
    g = np.einsum("sf,sftg,tg->st", weights, gram, weights)
    norm = np.sqrt(np.diag(g))
    return np.clip(g / np.outer(norm, norm), -1.0, 1.0)


def _weights(tokens: np.ndarray, subset: Sequence[int]) -> np.ndarray:
    w = np.zeros(tokens.shape)
    w[:, list(subset)] = tokens[:, list(subset)]
    return w / w.sum(axis=1, keepdims=True)


def _upper(c: np.ndarray) -> np.ndarray:
    return c[np.triu_indices(c.shape[0], k=1)]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two matrices' off-diagonal cosines; nan with fewer than 3 sources
    (one pair) or when either is constant."""
    x, y = _upper(a), _upper(b)
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def _nan_to_none(values: Any) -> Any:
    """JSON has no nan: a list (or number) with None where the value is nan."""
    if isinstance(values, list):
        return [_nan_to_none(v) for v in values]
    return None if isinstance(values, float) and math.isnan(values) else values


def _draw_weights(
    full: np.ndarray, z: np.ndarray, n_examples: np.ndarray, size: float
) -> np.ndarray:
    """(..., T, m) fold weights of simulated draws of ``size`` examples per source around the
    full rows: w_f (1 + α_t (z_f − Σ_g w_g z_g)) with α_t² = n_t / (size (1 − Σ_f w_f²)).

    Why: the draw minus the full row is α_t Σ_f w_f (z_f − z̄) D_f with D_f = F_f − ḡ (the
    multipliers sum to zero against w), whose covariance over z is α_t² Σ_f w_f² D_f D_fᵀ; a
    fold's deviation has E[D_f D_fᵀ] = Σ_t (1/n_f − 1/n_t), so with w_f = n_f / n_t this is
    α_t² Σ_t (1 − Σ_f w_f²) / n_t = Σ_t / size: each source's own n_t, not the median.

    Args:
        full: (T, m) each source's fold weights (summing to 1); z: (..., T, m) N(0, 1).
        n_examples: (T,) calibration examples per source; size: examples per source drawn.
    """
    spread = 1.0 - (full**2).sum(axis=1, keepdims=True)  # 1 − Σ_f w_f², (T, 1)
    alpha = np.sqrt(np.asarray(n_examples, dtype=np.float64)[:, None] / (size * spread))
    return full * (1 + alpha * (z - (z * full).sum(axis=-1, keepdims=True)))


def _jaccard_moves(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(T,) whether each source keeps fewer than half of its group-mates from split a to b
    (Jaccard distance of its mate sets > 1/2; a source alone in both keeps its place)."""
    same_a = (a[:, None] == a[None, :]) & ~np.eye(a.size, dtype=bool)
    same_b = (b[:, None] == b[None, :]) & ~np.eye(b.size, dtype=bool)
    union = (same_a | same_b).sum(axis=1)
    inter = (same_a & same_b).sum(axis=1)
    dist = np.where(union > 0, 1.0 - inter / np.maximum(union, 1), 0.0)
    return dist > 0.5


def compute_fold_stability(
    folds: np.ndarray,
    fold_tokens: np.ndarray,
    names: Sequence[str],
    *,
    n_examples: Sequence[int],
    examples: Mapping[str, int],
    train_tokens: Mapping[str, int],
    rs: Sequence[int] = (1, 2, 3),
    method: str = "balanced",
    seed: int = 0,
    max_pairings: int = 64,
    sims: int = SIMULATIONS,
) -> FoldStability:
    """The fold stability of a bank's fold rows (`FoldStability`).

    Standard errors: the delete-one-fold jackknife, se² = (m−1)/m · Σ_f (c₋f − c̄)², where c₋f
    is the cosine of the rows without fold f: each c₋f is at (m−1)/m of the examples, close to
    the run's own n, so the cosine's shrinkage with fewer examples barely enters (the spread of
    single folds' cosines would be at n/m, shrunk and noisier). Halves: all distinct pairings
    (`half_pairings`); each half's rows are its folds' token-weighted mean, so two halves are
    two independent draws of n/2: their agreement is measured, not modelled.

    The agreement at other sizes n' (`FoldStability.curve`) is simulated: a draw of n' examples
    per source is the full row plus the folds' own spread scaled to n' (`_draw_weights`: a
    Gaussian-multiplier bootstrap over folds whose noise has source t's covariance Σ_t/n',
    scaled by t's own n_t). ``sims`` pairs of such draws per size, the mean ARI of their splits
    (compare it with the halves' mean, `FoldStability.summary`'s ``ari_at_half``, not their
    median). Both draws are centred on the full rows, which carry their own noise Σ/n; the two
    draws share it, so it does not widen their difference, but in the Gram matrix it adds the
    cross terms ē_s·η_t to each draw's fresh noise and shapes the configuration they share. A
    draw centred on the true rows matches the true agreement; centred on the run's rows the
    curve is a model whose error depends on the mixture (docs/guide/interpretability.md: within
    0.05 on the demo's own examples at r = 2 and 0.04–0.09 high at r = 3, 0.1–0.25 low at 2n–4n
    on SmolLM2's examples and on synthetic mixtures with anisotropic noise). The warning
    therefore also needs the measured halves below the target (`FoldStability.warning`).

    Args:
        folds: (T, m, d) fold rows; fold_tokens: (T, m) their response tokens (> 0).
        names: (T,) the sources, in row order.
        n_examples: (T,) calibration examples per source (all folds together).
        examples, train_tokens: per-source counts the split balances (the run's partition).
        rs: split depths (K = 2^r); those with 2^r > T are left out.
        method, seed: the run's partition method and seed (a method that scores splits on the
            rows gets each half's rows; the simulated curve then uses ``balanced``, as the rows
            of a simulated draw are never formed).
        max_pairings: at most this many pairings of halves (m ≤ 8 gives all of them).
        sims: simulated pairs of draws per size of the curve.

    Raises:
        ValueError: m < 2 (``calibration.folds`` 1: no folds), shapes that disagree, fewer than
            2 sources, a fold without tokens, non-finite rows.
    """
    from sklearn.metrics import adjusted_rand_score

    names = tuple(names)
    x = np.asarray(folds)
    tok = np.asarray(fold_tokens, dtype=np.float64)
    if x.ndim != 3 or tok.shape != x.shape[:2] or len(names) != x.shape[0]:
        raise ValueError(
            f"need (T, m, d) folds with (T, m) tokens and T names, got {x.shape}, {tok.shape}, "
            f"{len(names)} names"
        )
    t, m, _ = x.shape
    if m < 2:
        raise ValueError(
            "fold stability needs at least 2 folds (calibration.folds is 1: folds are off)"
        )
    if t < 2:
        raise ValueError("fold stability needs at least 2 sources")
    if (tok <= 0).any():
        raise ValueError("every fold needs response tokens > 0")
    n_ex = np.asarray(n_examples, dtype=np.int64)
    if n_ex.shape != (t,) or (n_ex < m).any():
        raise ValueError(f"n_examples must be (T,) with at least m = {m} each, got {n_ex}")
    gram = fold_gram(x)
    if not np.isfinite(gram).all():
        raise ValueError("fold rows hold non-finite values")
    rs = tuple(r for r in rs if r >= 1 and 2**r <= t)
    counts = ({s: examples[s] for s in names}, {s: train_tokens[s] for s in names})

    def split(weights: np.ndarray, r: int, how: str = method) -> np.ndarray:
        space = space_from_cosine(_cosine_of(gram, weights), names, order=False)
        extra = {}
        if how in ROW_METHODS:  # the half's own rows, as the run's method reads the bank's
            rows = np.einsum("tf,tfd->td", weights, x, dtype=np.float64).astype(np.float32)
            extra = {"rows": rows, "row_names": names}
        part = make_partition(space, *counts, method=how, r=r, seed=seed, **extra)
        return part.labels(names)

    full = _weights(tok, range(m))
    cosine = _cosine_of(gram, full)
    loo = [_cosine_of(gram, _weights(tok, [g for g in range(m) if g != f])) for f in range(m)]
    loo = np.stack(loo)
    se = np.sqrt((m - 1) / m * ((loo - loo.mean(axis=0)) ** 2).sum(axis=0))
    np.fill_diagonal(se, 0.0)

    pairings = half_pairings(m, max_pairings)
    halves = [(_weights(tok, a), _weights(tok, b)) for a, b in pairings]
    pearson = np.array([_pearson(_cosine_of(gram, wa), _cosine_of(gram, wb)) for wa, wb in halves])
    med = float(np.median(pearson))
    reliability = -1.0 if med <= -1 else 2 * med / (1 + med)  # nan stays nan

    n_ref = float(np.median(n_ex))
    sizes = n_ref * 2.0 ** np.arange(-1, 7)
    sim_method = "balanced" if method in ROW_METHODS else method
    # the same multipliers at every size and r (common random numbers): a smooth curve
    z = np.random.default_rng(seed).standard_normal((sims, 2, *full.shape))
    ari_halves, flip, coassign, curve = {}, {}, {}, {}
    for r in rs:
        labels = [(split(wa, r), split(wb, r)) for wa, wb in halves]
        ari_halves[r] = np.array([adjusted_rand_score(a, b) for a, b in labels])
        flip[r] = np.mean([_jaccard_moves(a, b) for a, b in labels], axis=0)
        every = np.array([lab for pair in labels for lab in pair])
        coassign[r] = (every[:, :, None] == every[:, None, :]).mean(axis=0)
        curve[r] = np.ones(sizes.size)
        for i, size in enumerate(sizes):
            w = _draw_weights(full, z, n_ex, size)  # (sims, 2, T, m)
            agree = [
                adjusted_rand_score(split(a, r, sim_method), split(b, r, sim_method)) for a, b in w
            ]
            curve[r][i] = float(np.mean(agree))
            if curve[r][i] == 1.0:  # every pair split alike: larger n' only less noise
                break
    return FoldStability(
        names=names,
        folds=m,
        n_examples=n_ex,
        cosine=cosine,
        cosine_se=se,
        pearson_halves=pearson,
        reliability=float(reliability),
        ari_halves=ari_halves,
        flip=flip,
        coassign=coassign,
        sizes=sizes,
        curve=curve,
        info={
            "method": method,
            "seed": seed,
            "pairings": [[list(a), list(b)] for a, b in pairings],
            "simulations": sims,
            "standard_error": "delete-one-fold jackknife",
            "reliability": "median Pearson of the halves' off-diagonal cosines, Spearman-Brown",
            "agreement_model": "two draws of n' around the full rows with the folds' spread "
            "scaled to n' (Gaussian multipliers over folds); mean ARI of their splits",
        },
    )
