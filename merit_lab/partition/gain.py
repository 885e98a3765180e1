"""Merging-gain theory: measured vs predicted gain of averaging checkpoints in a flat basin.

Input: per-checkpoint losses, flat displacements δ_i = θ_i − θ0 (n, dim) and curvature
eigenpairs, or a `Partition` with its sources' gradient rows. Output: the gain Σ w_i L(θ_i) − L(θ̄),
its quadratic prediction ½ Σ_ℓ λ_ℓ Var_w(u_ℓᵀ δ_i), spectral filtering tables and the predicted
gain of a K-group split before training.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from merit_lab.partition.plan import Partition

__all__ = [
    "as_matrix",
    "check_weights",
    "gain_terms",
    "group_means",
    "merging_gain",
    "predict_gain",
    "predicted_partition_gain",
    "quadratic_gain_prediction",
    "spectral_filtering",
]


def check_weights(weights: Sequence[float], n: int) -> np.ndarray:
    """``weights`` as (n,) float64; ValueError unless finite, ≥ 0 and summing to 1."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"{w.size} weights for {n} checkpoints")
    if not np.isfinite(w).all() or (w < 0).any() or abs(w.sum() - 1.0) > 1e-6:
        raise ValueError(f"weights must be non-negative and sum to 1, got {w.tolist()}")
    return w


def merging_gain(losses_i: Sequence[float], weights: Sequence[float], loss_merged: float) -> float:
    """Measured merging gain Σ_i w_i L(θ_i) − L(θ̄): positive when the merge beats its branches."""
    losses = np.asarray(losses_i, dtype=np.float64)
    w = check_weights(weights, losses.size)
    if not np.isfinite(losses).all() or not np.isfinite(loss_merged):
        raise ValueError("losses must be finite")
    return float(w @ losses - loss_merged)


def as_matrix(x: np.ndarray | Tensor, what: str) -> np.ndarray:
    """A finite 2-D float64 array from numpy or torch; ValueError naming ``what`` otherwise."""
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{what} must be 2-D, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} has NaN or infinite values")
    return x


def _projections(deltas, weights, eigvecs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = as_matrix(deltas, "deltas")
    u = as_matrix(eigvecs, "eigvecs")
    if u.shape[0] != d.shape[1]:
        raise ValueError(f"eigvecs have {u.shape[0]} rows but deltas {d.shape[1]} columns")
    w = check_weights(weights, d.shape[0])
    return d, w, d @ u


def quadratic_gain_prediction(deltas, weights: Sequence[float], eigvals, eigvecs) -> dict:
    """Predicted gain ½ Σ_ℓ λ_ℓ Var_w(u_ℓᵀ δ_i) of merging checkpoints θ_i = θ0 + δ_i.

    Exact for a quadratic loss with Hessian H = Σ_ℓ λ_ℓ u_ℓ u_ℓᵀ (all eigenpairs); with the top
    k it counts the gain along those directions. The variance is shift-invariant, so δ_i may be
    measured from θ0 or from the minimum θ*.

    Args:
        deltas: (n, dim) displacements, numpy or torch.
        weights: (n,) merge weights (≥ 0, sum 1).
        eigvals: (k,) eigenvalues λ_ℓ; eigvecs: (dim, k) orthonormal columns u_ℓ.

    Returns:
        dict with ``gain``, ``per_direction`` (k,) = ½ λ_ℓ Var_ℓ, ``variance`` (k,) = Var_ℓ,
        ``spread`` = Σ_i w_i ‖δ_i − δ̄‖² and ``explained`` = Σ_ℓ Var_ℓ / spread.
    """
    d, w, c = _projections(deltas, weights, eigvecs)
    lam = np.asarray(eigvals, dtype=np.float64).reshape(-1)
    if lam.size != c.shape[1]:
        raise ValueError(f"{lam.size} eigenvalues for {c.shape[1]} eigenvectors")
    var = w @ (c - w @ c) ** 2
    per = 0.5 * lam * var
    spread = float(w @ ((d - w @ d) ** 2).sum(axis=1))
    explained = float(var.sum() / spread) if spread > 0 else float("nan")
    return {
        "gain": float(per.sum()),
        "per_direction": per,
        "variance": var,
        "spread": spread,
        "explained": explained,
    }


def spectral_filtering(deltas, weights: Sequence[float], eigvecs, eigvals=None) -> pd.DataFrame:
    """Energy along each eigenvector: branches (w-averaged (u_ℓᵀδ_i)²) vs the merge ((u_ℓᵀδ̄)²).

    branch_energy − merged_energy = Var_w(u_ℓᵀδ_i) ≥ 0: averaging filters out the directions
    where the branches disagree.

    Returns:
        One row per direction: direction, [eigval,] branch_energy, merged_energy, kept
        (= merged / branch, in [0, 1]; NaN where the branches have no energy).
    """
    _, w, c = _projections(deltas, weights, eigvecs)
    branch = w @ c**2
    merged = (w @ c) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kept = np.where(branch > 0, merged / branch, np.nan)
    table = pd.DataFrame(
        {
            "direction": np.arange(c.shape[1]),
            "branch_energy": branch,
            "merged_energy": merged,
            "kept": kept,
        }
    )
    if eigvals is not None:
        table.insert(1, "eigval", np.asarray(eigvals, dtype=np.float64).reshape(-1))
    return table


def group_means(
    partition: Partition,
    rows: np.ndarray | Tensor,
    names: Sequence[str],
    *,
    normalize: bool = False,
) -> np.ndarray:
    """Token-weighted mean gradient ḡ_k of each group: (K, d) float64.

    Args:
        rows: (T, d) source gradients, any float dtype, numpy or torch.
        names: (T,) row names; must include every source of the partition (others ignored).
        normalize: average unit gradients instead of raw ones.
    """
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError("duplicate names")
    if isinstance(rows, Tensor):
        rows = rows.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(rows, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != len(names):
        raise ValueError(f"rows of shape {x.shape} for {len(names)} names")
    if not np.isfinite(x).all():
        raise ValueError("rows have NaN or infinite values")
    pos = {s: i for i, s in enumerate(names)}
    missing = [s for s in partition.sources if s not in pos]
    if missing:
        raise ValueError(f"no gradient row for sources: {missing}")
    means = []
    for group in partition.groups:
        g = x[[pos[s] for s in group]]
        if normalize:
            g = g / np.linalg.norm(g, axis=1, keepdims=True)
        tok = np.array([partition.tokens[s] for s in group], dtype=np.float64)
        means.append(tok @ g / tok.sum())
    return np.stack(means)


def gain_terms(
    partition: Partition,
    rows: np.ndarray | Tensor,
    names: Sequence[str],
    eta: float = 1.0,
    curvature: str = "identity",
    diag: np.ndarray | Tensor | None = None,
    eigvals: np.ndarray | Tensor | None = None,
    eigvecs: np.ndarray | Tensor | None = None,
    *,
    normalize: bool = False,
) -> np.ndarray:
    """Each group's term ½ η² w_k D_kᵀ H D_k of the predicted merging gain: (K,) float64.

    The one implementation of the predicted gain before training: `predicted_partition_gain`
    and `predict_gain` are its sum, and per-group tables show the terms. D_k = ḡ_k − ḡ with
    ḡ_k the token-weighted mean gradient of group k (`group_means`), w_k the partition's token
    weights (the weights the merge uses) and ḡ = Σ_k w_k ḡ_k: branch k moves by δ_k ≈ −η ḡ_k.
    ``rows``, ``diag`` and ``eigvecs`` must share coordinates (a sketch of the gradients needs
    the curvature in the same sketch).

    Args:
        partition: the grouping to score.
        rows: (T, d) source gradients, any float dtype, numpy or torch.
        names: (T,) row names; must include every source of the partition (others ignored).
        eta: the learning-rate scale η.
        curvature: "identity" (H = I), "diag" (H = diag(``diag``), e.g. a diagonal Fisher, (d,))
            or "subspace" (H = U diag(λ) Uᵀ from ``eigvals`` (k,) and ``eigvecs`` (d, k)).
        normalize: use unit gradients instead of raw ones.
    """
    means = group_means(partition, rows, names, normalize=normalize)
    w = np.asarray(partition.weights, dtype=np.float64)
    dev = means - w @ means
    if curvature == "identity":
        quad = (dev**2).sum(axis=1)
    elif curvature == "diag":
        if diag is None:
            raise ValueError("curvature='diag' needs diag")
        h = np.asarray(diag.detach().cpu() if isinstance(diag, Tensor) else diag, dtype=np.float64)
        if h.shape != (dev.shape[1],) or not np.isfinite(h).all():
            raise ValueError(f"diag must be a finite ({dev.shape[1]},) vector, got {h.shape}")
        quad = (dev**2) @ h
    elif curvature == "subspace":
        if eigvals is None or eigvecs is None:
            raise ValueError("curvature='subspace' needs eigvals and eigvecs")
        u = as_matrix(eigvecs, "eigvecs")
        lam = np.asarray(eigvals, dtype=np.float64).reshape(-1)
        if u.shape != (dev.shape[1], lam.size):
            raise ValueError(f"eigvecs {u.shape} do not match d={dev.shape[1]}, k={lam.size}")
        quad = ((dev @ u) ** 2) @ lam
    else:
        raise ValueError(f"curvature must be 'identity', 'diag' or 'subspace', got {curvature!r}")
    return 0.5 * eta**2 * w * quad


def predicted_partition_gain(
    partition: Partition,
    rows: np.ndarray | Tensor,
    names: Sequence[str],
    eta: float = 1.0,
    curvature: str = "identity",
    diag: np.ndarray | Tensor | None = None,
    eigvals: np.ndarray | Tensor | None = None,
    eigvecs: np.ndarray | Tensor | None = None,
    *,
    normalize: bool = False,
) -> float:
    """First-order merging gain of a K-group split before training: ½ η² Σ_k w_k D_kᵀ H D_k.

    The sum of `gain_terms` (see there for the arguments). For K = 2 and w = (½, ½) it is the
    paper's η²/8 (ḡ1 − ḡ2)ᵀ H (ḡ1 − ḡ2); with H = I it is `predict_gain`.
    """
    terms = gain_terms(
        partition, rows, names, eta, curvature, diag, eigvals, eigvecs, normalize=normalize
    )
    return float(terms.sum())


def predict_gain(
    partition: Partition,
    rows: np.ndarray | Tensor,
    names: Sequence[str],
    eta: float = 1.0,
    *,
    normalize: bool = False,
) -> float:
    """First-order merging gain with H = I: ½ η² Σ_k w_k ‖ḡ_k − ḡ‖².

    Branch k moves by δ_k ≈ −η ḡ_k from θ0, so the merge gain ½ Σ_ℓ λ_ℓ Var_w(u_ℓᵀ δ_k) with
    H = I is the w-weighted variance of the group gradients. ḡ_k is the token-weighted mean of
    group k's raw gradients (``normalize=True``: of unit gradients), w_k the partition's token
    weights and ḡ = Σ_k w_k ḡ_k. For K = 2 with w = (½, ½) it is the paper's
    η²/8 (ḡ1 − ḡ2)ᵀ(ḡ1 − ḡ2). Sketched rows estimate it (inner products are preserved).

    Args:
        partition: the grouping to score.
        rows: (T, d) source gradients, any float dtype, numpy or torch.
        names: (T,) row names; must include every source of the partition (others ignored).
        eta: the learning-rate scale η.
        normalize: use unit gradients instead of raw ones.
    """
    return predicted_partition_gain(partition, rows, names, eta, normalize=normalize)
