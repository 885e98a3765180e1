"""Conflict drift: how the conflict space moves from θ0 along training.

Input: gradient banks of the same sources (same calibration examples, same sketch) at θ0 and at
later checkpoints. Output: `Drift`: per checkpoint, the principal angles between its top-k PCA
subspace and θ0's, and how each source moved (its cosine to its own θ0 gradient, its position
in θ0's PCA coordinates).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.linalg import subspace_angles

from merit_lab.analysis.conflict import ConflictSpace, compute_conflict_space
from merit_lab.envelope import unwrap, wrap

__all__ = ["Drift", "DriftPoint", "compute_drift", "pca_basis", "principal_angles"]

DRIFT_FORMAT = "merit-lab/drift"  # documents from before the envelope are read as version 1
DRIFT_VERSION = 1


def pca_basis(rows: np.ndarray, k: int) -> np.ndarray:
    """Orthonormal basis (d, k) of the top-k principal directions of the unit-normalised rows.

    With U the (T, d) unit rows, J the centring and J C J = V Λ Vᵀ, the right singular vectors
    of JU are W = (JU)ᵀ V Λ^{-1/2}: the conflict space's axes in the gradient (sketch) space.
    """
    x = np.asarray(rows, dtype=np.float64)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    ju = u - u.mean(axis=0, keepdims=True)
    lam, vecs = np.linalg.eigh(ju @ ju.T)
    lam, vecs = lam[::-1][:k], vecs[:, ::-1][:, :k]
    if k > len(x) - 1 or lam[-1] <= 1e-12 * lam[0]:
        raise ValueError(f"k = {k} axes but the rows span fewer (eigenvalues {lam})")
    return (ju.T @ vecs) / np.sqrt(lam)[None, :]


def principal_angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Principal angles in degrees, smallest first, between the column spaces of a and b
    (`scipy.linalg.subspace_angles`)."""
    return np.degrees(np.sort(subspace_angles(a, b)))


@dataclass(frozen=True)
class DriftPoint:
    """One checkpoint against θ0.

    Attributes:
        label: e.g. ``joint-1ep/mid``, ``merit-2d/0``.
        angles: (k,) principal angles (degrees) between its top-k PCA subspace of the gradient
            space and θ0's, smallest first.
        score_angles: (k,) the same between the source-space score subspaces (span of the first
            k PCA score columns): how the arrangement of the sources turned.
        cos_to_theta0: (T,) each source's gradient cosine to its own θ0 gradient.
        coords: (T, k) each source's position in θ0's PCA coordinates (`ConflictSpace.project`).
        displacement: (T,) ‖coords − θ0's coords‖.
        explained: (k,) the checkpoint's own explained-variance ratios.
    """

    label: str
    angles: np.ndarray
    score_angles: np.ndarray
    cos_to_theta0: np.ndarray
    coords: np.ndarray
    displacement: np.ndarray
    explained: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in vars(self).items()}


@dataclass(frozen=True)
class Drift:
    """θ0's conflict space and every later checkpoint against it."""

    names: tuple[str, ...]
    k: int
    theta0: ConflictSpace
    points: tuple[DriftPoint, ...]

    def to_dict(self) -> dict[str, Any]:
        """The drift document (θ0's space is stored beside it: `ConflictSpace.to_dict`)."""
        payload = {
            "names": list(self.names),
            "k": self.k,
            "theta0_coords": self.theta0.coords(self.k).tolist(),
            "theta0_explained": self.theta0.explained_variance_ratio[: self.k].tolist(),
            "points": [p.to_dict() for p in self.points],
        }
        return wrap(DRIFT_FORMAT, DRIFT_VERSION, payload)

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], theta0: ConflictSpace, *, source: str | os.PathLike = ""
    ) -> Drift:
        """The drift of a `to_dict` document, against ``theta0``; another format or a newer
        version is refused (`merit_lab.envelope.EnvelopeError`, naming ``source``)."""
        d = unwrap(d, DRIFT_FORMAT, DRIFT_VERSION, source=source, legacy=True)
        points = tuple(
            DriftPoint(**{k: np.asarray(v) if isinstance(v, list) else v for k, v in p.items()})
            for p in d["points"]
        )
        return cls(tuple(d["names"]), int(d["k"]), theta0, points)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def compute_drift(
    names: Sequence[str], theta0_rows: np.ndarray, later: Mapping[str, np.ndarray], k: int = 3
) -> Drift:
    """Compare each later bank with θ0's.

    Args:
        names: (T,) sources, the row order of every bank.
        theta0_rows: (T, d) the bank at θ0.
        later: label → (T, d) bank at that checkpoint, the same sketch.
        k: PCA axes compared (at most T − 1).
    """
    t = len(names)
    if not 1 <= k <= t - 2:
        raise ValueError(f"k must be in [1, {t - 2}] for {t} sources, got {k}")
    for label, rows in later.items():
        if rows.shape != theta0_rows.shape:
            raise ValueError(f"{label}: rows {rows.shape}, θ0's {theta0_rows.shape}")
    space0 = compute_conflict_space(theta0_rows, names)
    basis0 = pca_basis(theta0_rows, k)
    u0 = _unit(theta0_rows)
    lam0 = space0.eigenvalues[:k]
    scores0 = space0.embedding[:, :k]
    points = []
    for label, rows in later.items():
        space = compute_conflict_space(rows, names)
        u = _unit(rows)
        cosines = u @ u0.T  # (T, T): source i now against every θ0 source
        coords = np.stack([space0.project(c)[:k] for c in cosines])
        points.append(
            DriftPoint(
                label=label,
                angles=principal_angles(basis0, pca_basis(rows, k)),
                score_angles=principal_angles(scores0 / np.sqrt(lam0), space.embedding[:, :k]),
                cos_to_theta0=np.diag(cosines).copy(),
                coords=coords,
                displacement=np.linalg.norm(coords - scores0, axis=1),
                explained=space.explained_variance_ratio[:k].copy(),
            )
        )
    return Drift(tuple(names), k, space0, tuple(points))
