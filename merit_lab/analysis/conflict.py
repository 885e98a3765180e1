"""Conflict space: from the gradient bank to cosine conflicts and their PCA embedding.

Input: (T, d) source gradients (exact or sketched) and their names. Output: ``ConflictSpace``
(cosine matrix C, PCA eigenvalues and scores z, explained variance, heatmap order), saved as
conflict.json in the run directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from merit_lab.envelope import load_enveloped, save_enveloped, unwrap, wrap

__all__ = [
    "ConflictSpace",
    "compute_conflict_space",
    "space_from_cosine",
]

CONFLICT_FORMAT = "merit-lab/conflict"  # conflict.json: it has carried this header from the start
CONFLICT_VERSION = 1
# Columns of the bank multiplied at a time: bounds the temporaries to T × 2**16 entries.
_COL_CHUNK = 2**16
# Optimal leaf ordering (flips subtrees so neighbours in the heatmap are most alike) costs
# O(T^3): 1.3 s at T = 1000 against 0.03 s for the linkage. Above this many sources the heatmap
# keeps the plain average-linkage leaf order, which groups the same clusters.
_OPTIMAL_ORDER_MAX = 256


@dataclass(frozen=True, eq=False)
class ConflictSpace:
    """Where each source sits with respect to the others' gradients.

    Attributes:
        names: (T,) source names, the row order of every array.
        cosine: (T, T) float64 cosine matrix C of the source gradients.
        eigenvalues: (T,) eigenvalues of J C J (J = I − 11ᵀ/T), descending, ≥ 0.
        embedding: (T, T) PCA scores z; column j is the j-th axis, its sign fixed so that its
            largest-magnitude entry is positive. Axes with zero eigenvalue are all-zero.
        explained_variance_ratio: (T,) eigenvalues / their sum.
        order: a permutation of range(T) grouping similar sources (average linkage on 1 − C,
            optimal leaf ordering), for the heatmap.
    """

    names: tuple[str, ...]
    cosine: np.ndarray
    eigenvalues: np.ndarray
    embedding: np.ndarray
    explained_variance_ratio: np.ndarray
    order: tuple[int, ...]

    def __post_init__(self) -> None:
        t = len(self.names)
        for field, shape in [
            ("cosine", (t, t)),
            ("eigenvalues", (t,)),
            ("embedding", (t, t)),
            ("explained_variance_ratio", (t,)),
        ]:
            arr = np.array(getattr(self, field), dtype=np.float64)
            if arr.shape != shape:
                raise ValueError(f"ConflictSpace.{field} has shape {arr.shape}, expected {shape}")
            arr.setflags(write=False)  # frozen means frozen: the arrays are shared read-only
            object.__setattr__(self, field, arr)
        if sorted(self.order) != list(range(t)):
            raise ValueError("ConflictSpace.order is not a permutation of the sources")
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "order", tuple(int(i) for i in self.order))

    @property
    def n_sources(self) -> int:
        return len(self.names)

    @property
    def n_axes(self) -> int:
        """Axes with positive variance (at most T − 1: centring removes one direction)."""
        return int(np.count_nonzero(self.eigenvalues > 0))

    def index(self, name: str) -> int:
        """Row of source ``name``."""
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"unknown source {name!r}") from None

    def coords(self, r: int) -> np.ndarray:
        """The first r PCA coordinates of every source: (T, r) float64."""
        if not 0 <= r <= self.n_sources:
            raise ValueError(f"r must be in [0, {self.n_sources}], got {r}")
        return self.embedding[:, :r].copy()

    def select(self, names: Sequence[str]) -> ConflictSpace:
        """The conflict space of a subset of the sources (PCA redone on their cosines)."""
        idx = [self.index(n) for n in names]
        return space_from_cosine(self.cosine[np.ix_(idx, idx)], [self.names[i] for i in idx])

    def project(self, cosines: np.ndarray) -> np.ndarray:
        """PCA coordinates of a new unit gradient from its cosines to this space's sources.

        With V, Λ the eigenpairs of J C J and u the new unit row, the score on axis ℓ is
        (u − ū)ᵀ(Uᵀ J v_ℓ)/√λ_ℓ = Σ_t v_ℓt (c_t − C̄_t)/√λ_ℓ (constants vanish as v_ℓ ⊥ 1).

        Args:
            cosines: (T,) cosines of the new source to ``names``, in their order.

        Returns:
            (T,) float64 coordinates; zero on axes without variance. A source of the space
            projects onto its own embedding row.
        """
        c = np.asarray(cosines, dtype=np.float64).reshape(-1)
        if c.shape != (self.n_sources,):
            raise ValueError(f"need {self.n_sources} cosines, got {c.shape}")
        lam = self.eigenvalues
        out = np.zeros(self.n_sources)
        pos = lam > 0
        out[pos] = (self.embedding[:, pos].T @ (c - self.cosine.mean(axis=1))) / lam[pos]
        return out

    def _payload(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "cosine": self.cosine.tolist(),
            "eigenvalues": self.eigenvalues.tolist(),
            "embedding": self.embedding.tolist(),
            "explained_variance_ratio": self.explained_variance_ratio.tolist(),
            "order": list(self.order),
        }

    def to_dict(self) -> dict[str, Any]:
        """The ``conflict.json`` document: the arrays under the envelope's header."""
        return wrap(CONFLICT_FORMAT, CONFLICT_VERSION, self._payload())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str | os.PathLike = "") -> ConflictSpace:
        """The space of a ``conflict.json`` document; another format or a newer version is
        refused (`merit_lab.envelope.EnvelopeError`, naming ``source``)."""
        return cls._from_payload(unwrap(d, CONFLICT_FORMAT, CONFLICT_VERSION, source=source))

    @classmethod
    def _from_payload(cls, d: Mapping[str, Any]) -> ConflictSpace:
        return cls(
            names=tuple(d["names"]),
            cosine=np.asarray(d["cosine"], dtype=np.float64),
            eigenvalues=np.asarray(d["eigenvalues"], dtype=np.float64),
            embedding=np.asarray(d["embedding"], dtype=np.float64),
            explained_variance_ratio=np.asarray(d["explained_variance_ratio"], dtype=np.float64),
            order=tuple(d["order"]),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write conflict.json atomically (floats round-trip exactly)."""
        return save_enveloped(path, CONFLICT_FORMAT, CONFLICT_VERSION, self._payload())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ConflictSpace:
        """Read conflict.json; every problem is one ValueError that names the file."""
        d = load_enveloped(path, CONFLICT_FORMAT, CONFLICT_VERSION)
        try:
            return cls._from_payload(d)
        except (KeyError, ValueError) as e:
            what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise ValueError(f"{path}: {what}") from e


def _gram(rows: np.ndarray | torch.Tensor) -> tuple[np.ndarray, list[int]]:
    """G = X Xᵀ, a block of columns at a time, summed in float64; and the non-finite rows.

    Each block's product is taken in the rows' own precision: float64 rows in float64, float32
    (and half-precision) rows in float32, which is 2× faster and ~1e-7 off in the cosines
    (measured against float64) — four orders below a 2^18 count-sketch's own error (~5e-3).
    """
    t, d = rows.shape
    gram = np.zeros((t, t), dtype=np.float64)
    bad = np.zeros(t, dtype=bool)
    for lo in range(0, d, _COL_CHUNK):
        block = rows[:, lo : lo + _COL_CHUNK]
        if isinstance(block, torch.Tensor):
            block = block.detach().to("cpu")
            block = block.numpy() if block.dtype == torch.float64 else block.float().numpy()
        block = np.asarray(block)
        if block.dtype != np.float64:
            block = block.astype(np.float32, copy=False)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            bad |= ~finite
            block = np.where(finite[:, None], block, block.dtype.type(0))
        gram += block @ block.T  # numpy computes a product with its own transpose by syrk
    return gram, np.flatnonzero(bad).tolist()


def compute_conflict_space(rows: np.ndarray | torch.Tensor, names: Sequence[str]) -> ConflictSpace:
    """Cosine conflict matrix and its PCA embedding.

    The paper's PCA is on normalised gradients g̃_t = g_t / ‖g_t‖ (scale-invariant: a source's
    gradient norm, which tracks its loss level, does not move it in conflict space). With U the
    (T, d) unit rows and J = I − 11ᵀ/T, the centred Gram matrix is (JU)(JU)ᵀ = J C J, so its
    eigenvectors V and eigenvalues Λ give the PCA scores z = V·sqrt(Λ) exactly (the same as
    ``sklearn.decomposition.PCA().fit_transform(U)`` up to the sign of each axis). Only the
    (T, T) matrix C is decomposed: the d-dimensional rows are read once, to form C.

    Args:
        rows: (T, d) gradients, any float dtype, numpy or torch (any device).
        names: (T,) distinct source names, in row order.

    Returns:
        The ConflictSpace of the T sources.

    Raises:
        ValueError: T < 2, names and rows disagree, duplicate names, or a row that is
            non-finite or zero (the error names the source).
    """
    names = tuple(names)
    if rows.ndim != 2:
        raise ValueError(f"rows must be (T, d), got shape {tuple(rows.shape)}")
    t = rows.shape[0]
    if t != len(names):
        raise ValueError(f"{t} rows but {len(names)} names")
    if t < 2:
        raise ValueError(f"need at least 2 sources for a conflict space, got {t}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate source names: {dupes}")

    gram, bad = _gram(rows)
    if bad:
        raise ValueError(f"non-finite gradient for sources: {[names[i] for i in bad]}")
    norms = np.sqrt(np.diag(gram))
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise ValueError(f"zero gradient for sources: {[names[i] for i in zero]}")
    cosine = np.clip(gram / np.outer(norms, norms), -1.0, 1.0)
    return space_from_cosine(cosine, names)


def space_from_cosine(
    cosine: np.ndarray, names: Sequence[str], *, order: bool = True
) -> ConflictSpace:
    """The conflict space of T sources from their (T, T) cosine matrix alone (the PCA of unit
    gradients needs nothing else; see `compute_conflict_space`). ``order=False`` leaves the
    heatmap order as given (the clustering is most of the time of a split of T = 32)."""
    names = tuple(names)
    t = len(names)
    cosine = np.array(cosine, dtype=np.float64)
    cosine = (cosine + cosine.T) / 2
    np.fill_diagonal(cosine, 1.0)

    centred = cosine - cosine.mean(axis=0, keepdims=True)
    centred = centred - centred.mean(axis=1, keepdims=True)
    centred = (centred + centred.T) / 2
    evals, evecs = np.linalg.eigh(centred)
    evals, evecs = evals[::-1].copy(), evecs[:, ::-1].copy()
    # Round-off leaves ~1e-16 eigenvalues (always one: the all-ones direction); treat them as
    # exact zeros so their arbitrary eigenvectors never reach the embedding.
    tol = max(float(evals[0]), 1.0) * t * np.finfo(np.float64).eps * 10
    evals[evals < tol] = 0.0
    embedding = evecs * np.sqrt(evals)[None, :]
    for j in range(t):
        col = embedding[:, j]
        if col[np.argmax(np.abs(col))] < 0:
            embedding[:, j] = -col
    total = evals.sum()
    ratio = evals / total if total > 0 else np.zeros(t)

    return ConflictSpace(
        names=names,
        cosine=cosine,
        eigenvalues=evals,
        embedding=embedding,
        explained_variance_ratio=ratio,
        order=_cluster_order(cosine) if order else tuple(range(t)),
    )


def _cluster_order(cosine: np.ndarray) -> tuple[int, ...]:
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    t = cosine.shape[0]
    if t < 3:
        return tuple(range(t))
    dist = np.clip(1.0 - cosine, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    z = linkage(
        squareform(dist, checks=False), method="average", optimal_ordering=t <= _OPTIMAL_ORDER_MAX
    )
    return tuple(int(i) for i in leaves_list(z))
