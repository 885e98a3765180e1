"""Split stability: how much a conflict matrix and its split move on another calibration draw.

Input: per-example gradient rows with their sources and weights (`merit_lab.analysis.examples`).
Output: ``SplitStability`` — a bootstrap over each source's calibration examples of the cosine
matrix (spread per pair), of the balanced partition (ARI to the reported split, source
co-assignment) and a recommended calibration size from the convergence curve.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from merit_lab.analysis.conflict import space_from_cosine
from merit_lab.analysis.convergence import DEFAULT_NS, bootstrap_convergence
from merit_lab.envelope import load_enveloped, save_enveloped, unwrap, wrap
from merit_lab.partition.methods import make_partition
from merit_lab.partition.plan import Partition

__all__ = [
    "CONVERGENCE_THRESHOLD",
    "UNSTABLE_ARI",
    "SplitStability",
    "bootstrap_split_stability",
    "describe_stability",
    "recommend_n",
    "stability_warning",
    "wavering_sources",
]

# A split whose median adjusted Rand index to the reported split over the bootstrap is below
# this is called unstable (ARI 1: the same split every time; 0: no better than chance).
UNSTABLE_ARI = 0.8
# The recommended n: the smallest n at which the worst source's median bootstrap cosine between
# an n-example gradient and the all-example gradient reaches this.
CONVERGENCE_THRESHOLD = 0.95
STABILITY_FORMAT = "merit-lab/stability"  # stability.json has carried this header from the start
STABILITY_VERSION = 1


@dataclass(frozen=True, eq=False)
class SplitStability:
    """The bootstrap distribution of a run's conflict matrix and of its split.

    Attributes:
        names: (T,) sources, the order of every matrix.
        n_boot: bootstrap replicates B; seed: their seed.
        cosine: (T, T) the cosine matrix of all examples (the point estimate, from the rows).
        cosine_std: (T, T) its bootstrap standard deviation per pair.
        cosine_lo, cosine_hi: (T, T) the 5% and 95% bootstrap quantiles (a 90% interval).
        cosine_bias: (T, T) mean of the replicates − ``cosine``. A resampled mean is noisier
            than the all-example mean, so a large |cosine| shrinks towards 0 on resampling (and
            the all-example cosine itself is shrunk the same way against the true one).
        pearson: (B,) Pearson correlation of each replicate's upper triangle with ``cosine``.
        pearson_pairs: (B // 2,) between disjoint pairs of replicates (like two fresh draws).
        ari: r → (B,) adjusted Rand index of each replicate's split to the reference split.
        ari_pairs: r → (B // 2,) between the splits of disjoint pairs of replicates.
        coassign: r → (T, T) share of replicates in which two sources share a group.
        reference: r → (T,) group of each source in the reference split.
        info: how it was made (method, sizes, where the reference came from, ...).
    """

    names: tuple[str, ...]
    n_boot: int
    seed: int
    cosine: np.ndarray
    cosine_std: np.ndarray
    cosine_lo: np.ndarray
    cosine_hi: np.ndarray
    cosine_bias: np.ndarray
    pearson: np.ndarray
    pearson_pairs: np.ndarray
    ari: Mapping[int, np.ndarray]
    ari_pairs: Mapping[int, np.ndarray]
    coassign: Mapping[int, np.ndarray]
    reference: Mapping[int, np.ndarray]
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def rs(self) -> tuple[int, ...]:
        return tuple(sorted(self.ari))

    def summary(self) -> pd.DataFrame:
        """One row per r: median and 5%/95% quantiles of the ARI to the reference split, the
        median ARI between replicate pairs, and whether the split is `UNSTABLE_ARI` unstable."""
        rows = []
        for r in self.rs:
            a = self.ari[r]
            rows.append(
                {
                    "r": r,
                    "k": 2**r,
                    "ari_median": float(np.median(a)),
                    "ari_q05": float(np.quantile(a, 0.05)),
                    "ari_q95": float(np.quantile(a, 0.95)),
                    "ari_pairs_median": float(np.median(self.ari_pairs[r]))
                    if self.ari_pairs[r].size
                    else math.nan,
                    "same_split": float(np.mean(a > 1 - 1e-9)),
                    "unstable": bool(np.median(a) < UNSTABLE_ARI),
                }
            )
        return pd.DataFrame(rows).set_index("r")

    def pair_table(self) -> pd.DataFrame:
        """One row per source pair: the cosine, its bootstrap std and 90% interval."""
        t = len(self.names)
        iu = np.triu_indices(t, k=1)
        return pd.DataFrame(
            {
                "a": [self.names[i] for i in iu[0]],
                "b": [self.names[j] for j in iu[1]],
                "cosine": self.cosine[iu],
                "std": self.cosine_std[iu],
                "bias": self.cosine_bias[iu],
                "q05": self.cosine_lo[iu],
                "q95": self.cosine_hi[iu],
            }
        )

    def _payload(self) -> dict[str, Any]:
        def per_r(m: Mapping[int, np.ndarray]) -> dict[str, list]:
            return {str(r): np.asarray(v).tolist() for r, v in m.items()}

        return {
            "names": list(self.names),
            "n_boot": self.n_boot,
            "seed": self.seed,
            **{k: getattr(self, k).tolist() for k in _MATRICES},
            "pearson_pairs": self.pearson_pairs.tolist(),
            "ari": per_r(self.ari),
            "ari_pairs": per_r(self.ari_pairs),
            "coassign": per_r(self.coassign),
            "reference": per_r(self.reference),
            "info": dict(self.info),
        }

    def to_dict(self) -> dict[str, Any]:
        """The ``stability.json`` document: the arrays under the envelope's header."""
        return wrap(STABILITY_FORMAT, STABILITY_VERSION, self._payload())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str | os.PathLike = "") -> SplitStability:
        """The stability of a `to_dict` document; another format or a newer version is refused
        (`merit_lab.envelope.EnvelopeError`, naming ``source``)."""
        return cls._from_payload(unwrap(d, STABILITY_FORMAT, STABILITY_VERSION, source=source))

    @classmethod
    def _from_payload(cls, d: Mapping[str, Any]) -> SplitStability:
        def per_r(key: str) -> dict[int, np.ndarray]:
            return {int(r): np.asarray(v, dtype=np.float64) for r, v in d[key].items()}

        return cls(
            names=tuple(d["names"]),
            n_boot=int(d["n_boot"]),
            seed=int(d["seed"]),
            **{k: np.asarray(d[k], dtype=np.float64) for k in _MATRICES},
            pearson_pairs=np.asarray(d["pearson_pairs"], dtype=np.float64),
            ari=per_r("ari"),
            ari_pairs=per_r("ari_pairs"),
            coassign=per_r("coassign"),
            reference={r: v.astype(np.int64) for r, v in per_r("reference").items()},
            info=dict(d.get("info", {})),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``stability.json`` atomically."""
        return save_enveloped(path, STABILITY_FORMAT, STABILITY_VERSION, self._payload())

    @classmethod
    def load(cls, path: str | os.PathLike) -> SplitStability:
        """Read `save`'s file; another format or a newer version is refused, naming it."""
        return cls._from_payload(load_enveloped(path, STABILITY_FORMAT, STABILITY_VERSION))


_MATRICES = ("cosine", "cosine_std", "cosine_lo", "cosine_hi", "cosine_bias", "pearson")


def _cosine(means: np.ndarray) -> np.ndarray:
    g = means @ means.T
    n = np.sqrt(np.diag(g))
    return np.clip(g / np.outer(n, n), -1.0, 1.0)


def _upper(c: np.ndarray) -> np.ndarray:
    return c[np.triu_indices(c.shape[0], k=1)]


def _labels(cosine: np.ndarray, names: Sequence[str], r: int, method: str, counts) -> np.ndarray:
    space = space_from_cosine(cosine, names)
    part = make_partition(space, counts[0], counts[1], method=method, r=r)
    return part.labels(names)


def bootstrap_split_stability(
    rows: np.ndarray,
    tokens: np.ndarray,
    sources: Sequence[str],
    names: Sequence[str],
    *,
    examples: Mapping[str, int],
    train_tokens: Mapping[str, int],
    rs: Sequence[int] = (1, 2),
    references: Mapping[int, Partition] | None = None,
    method: str = "balanced",
    n_boot: int = 200,
    seed: int = 0,
) -> SplitStability:
    """Bootstrap the conflict matrix and the split over each source's calibration examples.

    Replicate b resamples every source's n_s examples with replacement, takes the source's
    gradient as the token-weighted mean of the drawn rows (what the gradient stage computes on
    that draw), recomputes the cosine matrix, its PCA and the ``method`` split for each r, and
    compares the split with the reference (adjusted Rand index: label permutations do not
    count).

    Args:
        rows: (N, m) per-example gradients (sketched; `merit_lab.analysis.examples.resketch`
            keeps this affordable); tokens: (N,) their weights; sources: (N,) the source of
            each row.
        names: the sources to split (each must have rows), in the order of the outputs.
        examples, train_tokens: per-source counts the split balances (the partition's).
        rs: numbers of PCA axes to split on (K = 2^r); each needs r ≤ T − 1.
        references: r → the split to compare with (the reported one); default: the split of
            the all-example cosine matrix computed here.
        n_boot, seed: replicates and their seed.
    """
    from scipy import sparse
    from sklearn.metrics import adjusted_rand_score

    names = tuple(names)
    x = np.asarray(rows, dtype=np.float32)
    w = np.asarray(tokens, dtype=np.float64)
    src = np.asarray(sources, dtype=object)
    if x.ndim != 2 or w.shape != (x.shape[0],) or src.shape != (x.shape[0],):
        raise ValueError(
            f"need (N, m) rows with (N,) tokens and sources, got {x.shape}, {w.shape}, {src.shape}"
        )
    if len(names) < 2:
        raise ValueError("need at least 2 sources")
    groups = [np.flatnonzero(src == s) for s in names]
    empty = [s for s, g in zip(names, groups, strict=True) if g.size == 0]
    if empty:
        raise ValueError(f"no example rows for sources {empty}")
    bad_r = [r for r in rs if r < 0 or 2**r > len(names)]
    if bad_r:
        raise ValueError(f"r = {bad_r}: need 2^r ≤ {len(names)} sources")
    if n_boot < 2:
        raise ValueError(f"n_boot must be ≥ 2, got {n_boot}")
    counts = ({s: examples[s] for s in names}, {s: train_tokens[s] for s in names})
    cols = np.concatenate(groups)
    row_of = np.repeat(np.arange(len(names)), [g.size for g in groups])

    def means(draw: np.ndarray) -> np.ndarray:
        weights = draw * w[cols]
        total = np.bincount(row_of, weights=weights, minlength=len(names)).reshape(-1, 1)
        # float32 products: a float64 matrix would upcast all N × m rows on every redraw
        mat = sparse.csr_matrix(
            (weights.astype(np.float32), (row_of, cols)), shape=(len(names), x.shape[0])
        )
        return np.asarray(mat @ x, dtype=np.float64) / total

    full = _cosine(means(np.ones(cols.size)))
    if references is not None:
        ref = {r: references[r].labels(names) for r in rs}
    else:
        ref = {r: _labels(full, names, r, method, counts) for r in rs}
    rng = np.random.default_rng(seed)
    boots = np.empty((n_boot, len(names), len(names)))
    labels = {r: np.empty((n_boot, len(names)), dtype=np.int64) for r in rs}
    for b in range(n_boot):
        draw = np.concatenate(
            [np.bincount(rng.integers(0, g.size, g.size), minlength=g.size) for g in groups]
        ).astype(np.float64)
        boots[b] = _cosine(means(draw))
        for r in rs:
            labels[r][b] = _labels(boots[b], names, r, method, counts)
    tri = np.array([_upper(c) for c in boots])
    half = n_boot // 2
    pearson = np.array([np.corrcoef(t, _upper(full))[0, 1] for t in tri])
    pearson_pairs = np.array([np.corrcoef(tri[2 * i], tri[2 * i + 1])[0, 1] for i in range(half)])
    ari = {r: np.array([adjusted_rand_score(ref[r], lab) for lab in labels[r]]) for r in rs}
    ari_pairs = {
        r: np.array(
            [adjusted_rand_score(labels[r][2 * i], labels[r][2 * i + 1]) for i in range(half)]
        )
        for r in rs
    }
    coassign = {r: (labels[r][:, :, None] == labels[r][:, None, :]).mean(axis=0) for r in rs}
    return SplitStability(
        names=names,
        n_boot=n_boot,
        seed=seed,
        cosine=full,
        cosine_std=boots.std(axis=0, ddof=1),
        cosine_lo=np.quantile(boots, 0.05, axis=0),
        cosine_hi=np.quantile(boots, 0.95, axis=0),
        cosine_bias=boots.mean(axis=0) - full,
        pearson=pearson,
        pearson_pairs=pearson_pairs,
        ari=ari,
        ari_pairs=ari_pairs,
        coassign=coassign,
        reference={r: np.asarray(v, dtype=np.int64) for r, v in ref.items()},
        info={
            "method": method,
            "examples_per_source": {s: int(g.size) for s, g in zip(names, groups, strict=True)},
            "reference": "given" if references is not None else "all-example split",
            "dim": int(x.shape[1]),
        },
    )


def recommend_n(
    rows: np.ndarray,
    tokens: np.ndarray,
    sources: Sequence[str],
    *,
    threshold: float = CONVERGENCE_THRESHOLD,
    ns: Sequence[int] = DEFAULT_NS,
    n_boot: int = 50,
    seed: int = 0,
) -> dict[str, Any]:
    """The calibration size the convergence curve asks for.

    Per source, `bootstrap_convergence` gives the cosine between n-example and all-example
    gradients; the curve used is the worst source's median at each n. The recommended n is the
    smallest measured n (the sizes in ``ns`` a source has, and its own count) where it reaches
    ``threshold``. Beyond the measured sizes it is
    extrapolated from cos² = n / (n + k) (a mean of n noisy rows: k = noise / signal, fitted per
    source by least squares on 1/cos² − 1 = k/n; the largest k decides), so a source with too
    few examples still gets an answer.

    Returns:
        ``threshold``, ``n`` (smallest measured n that reaches it, or None), ``n_extrapolated``
        (from the fit, rounded up), ``worst_source``, ``curve`` (n → worst median cosine) and
        ``k`` (per source).
    """
    src = np.asarray(sources, dtype=object)
    frames = []
    for s in dict.fromkeys(sources):
        idx = np.flatnonzero(src == s)
        sizes = sorted({n for n in ns if n <= idx.size} | {idx.size})  # and all n_s examples
        df = bootstrap_convergence(rows[idx], tokens[idx], ns=sizes, n_boot=n_boot, seed=seed)
        df.insert(0, "source", s)
        frames.append(df)
    table = pd.concat(frames, ignore_index=True)
    med = table.groupby(["source", "n"])["cosine"].median().reset_index()
    curve = med.groupby("n")["cosine"].min()
    reached = [int(n) for n, c in curve.items() if c >= threshold]
    k = {}
    for s, g in med.groupby("source"):
        c2 = np.clip(g["cosine"].to_numpy() ** 2, 1e-12, 1.0)
        y, inv_n = 1.0 / c2 - 1.0, 1.0 / g["n"].to_numpy(dtype=np.float64)
        k[str(s)] = float(max((inv_n @ y) / (inv_n @ inv_n), 0.0))
    worst = max(k, key=k.__getitem__)
    return {
        "threshold": threshold,
        "n": min(reached) if reached else None,
        "n_extrapolated": math.ceil(k[worst] * threshold**2 / (1 - threshold**2)),
        "worst_source": worst,
        "curve": {int(n): float(c) for n, c in curve.items()},
        "k": k,
    }


def stability_warning(stab: SplitStability, r: int) -> str:
    """A plain warning when the r-axis split is unstable (median ARI < `UNSTABLE_ARI`), else ""."""
    if r not in stab.ari:
        return ""
    med = float(np.median(stab.ari[r]))
    if med >= UNSTABLE_ARI:
        return ""
    return (
        f"Unstable split: over {stab.n_boot} bootstrap redraws of the calibration examples the "
        f"r = {r} split agrees with the reported one at median ARI {med:.2f} (< {UNSTABLE_ARI}); "
        "another draw of calibration examples would likely give a different split. Raise "
        "calibration.n or split on fewer axes."
    )


def wavering_sources(stab: SplitStability, r: int, threshold: float = 0.8) -> list[str]:
    """Sources whose place in the r-axis split the redraws do not confirm: the mean over the
    other sources of the share of redraws that agree with the reference on "same group or not"
    is below ``threshold``."""
    ref = stab.reference[r]
    same = ref[:, None] == ref[None, :]
    agree = np.where(same, stab.coassign[r], 1.0 - stab.coassign[r])
    np.fill_diagonal(agree, np.nan)
    score = np.nanmean(agree, axis=1)
    return [stab.names[i] for i in np.argsort(score, kind="stable") if score[i] < threshold]


def describe_stability(stab: SplitStability, r: int | None = None) -> list[str]:
    """Plain-text lines for a report or an editor: cosine spread, the ARI per r, wavering
    sources, the recommended n and (for ``r``, the reported split's) the warning."""
    iu = np.triu_indices(len(stab.names), k=1)
    width = (stab.cosine_hi - stab.cosine_lo)[iu]
    lines = [
        f"Bootstrap over the calibration examples ({stab.n_boot} redraws of each source's "
        f"examples): cosine std median {np.median(stab.cosine_std[iu]):.3f} (max "
        f"{stab.cosine_std[iu].max():.3f}); 90% interval width median {np.median(width):.3f}; "
        f"Pearson between two redraws' matrices median {np.median(stab.pearson_pairs):.3f}."
    ]
    summary = stab.summary()
    for rr, row in summary.iterrows():
        wav = wavering_sources(stab, int(rr))
        lines.append(
            f"r = {rr} (K = {row['k']}): ARI to the reported split median {row['ari_median']:.2f} "
            f"(5–95%: {row['ari_q05']:.2f}–{row['ari_q95']:.2f}), the same split in "
            f"{row['same_split']:.0%} of redraws; two redraws agree at median ARI "
            f"{row['ari_pairs_median']:.2f}"
            + (f"; wavering sources: {', '.join(wav)}" if wav else "")
            + "."
        )
    rec = stab.info.get("recommended_n")
    if rec:
        measured = f"n = {rec['n']}" if rec["n"] is not None else "no measured n"
        lines.append(
            f"Recommended calibration size: {measured} reaches a median bootstrap cosine of "
            f"{rec['threshold']} to the all-example gradient for every source (extrapolated: "
            f"n ≈ {rec['n_extrapolated']}, set by {rec['worst_source']}); the run uses "
            f"{stab.info.get('calibration_n', '?')}."
        )
    warning = stability_warning(stab, r) if r is not None else ""
    if warning:
        lines.append(f"WARNING: {warning}")
    return lines
