"""Where a model sits against a frontier of (target-task quality, preserved ability).

Input: points (x, y) and piecewise-linear curves through (x, y) vertices, e.g. the joint run's
snapshots from θ0 and the shrink path θ0 → θ_joint, with x the held-out loss on the trained
sources. Output: the curves' best y at each x and each point's position: above, on or below.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["FRONTIER_POSITIONS", "frontier_position", "frontier_value"]

# "above": better than the frontier at the point's x by more than the tolerance (higher y when
# higher is better, lower y otherwise); "outside": no curve spans the point's x.
FRONTIER_POSITIONS = ("above", "on", "below", "outside")

Curve = tuple[ArrayLike, ArrayLike]  # (x, y) vertices in path order, at least two


def _as_curves(curves: Sequence[Curve]) -> list[tuple[np.ndarray, np.ndarray]]:
    if not curves:
        raise ValueError("no curves: give at least one (x, y) curve")
    out = []
    for i, (cx, cy) in enumerate(curves):
        cx, cy = np.asarray(cx, dtype=float), np.asarray(cy, dtype=float)
        if cx.ndim != 1 or cx.shape != cy.shape or len(cx) < 2:
            raise ValueError(
                f"curve {i}: x and y must be 1-D of the same length >= 2, got shapes "
                f"{cx.shape} and {cy.shape}"
            )
        if not (np.isfinite(cx).all() and np.isfinite(cy).all()):
            raise ValueError(f"curve {i} has NaN or infinite vertices")
        out.append((cx, cy))
    return out


def frontier_value(x: ArrayLike, curves: Sequence[Curve], *, higher_is_better: bool) -> np.ndarray:
    """The best y the curves reach at each x, by linear interpolation between vertices.

    Every segment whose x-span holds x gives a y (a vertical segment at x gives both ends); a
    curve that is not monotone in x can give several, and so can several curves: the best one
    counts (the largest y when higher is better, else the smallest), so a point "above" beats
    every part of every curve at its x.

    Args:
        x: (n,) the points' x.
        curves: (x, y) vertex arrays, each in path order with at least two vertices.
        higher_is_better: the direction of y.

    Returns:
        (n,) float64; NaN where no segment spans x.
    """
    xs = np.asarray(x, dtype=float).reshape(-1)
    if not np.isfinite(xs).all():
        raise ValueError("x has NaN or infinite values")
    best = np.full(xs.shape, np.nan)
    pick = np.fmax if higher_is_better else np.fmin  # NaN-ignoring: NaN means "none yet"
    for cx, cy in _as_curves(curves):
        for x0, x1, y0, y1 in zip(cx[:-1], cx[1:], cy[:-1], cy[1:], strict=True):
            lo, hi = min(x0, x1), max(x0, x1)
            inside = (xs >= lo) & (xs <= hi)
            if x0 == x1:  # vertical: both ends are on the curve at this x
                ends = pick(np.where(inside, y0, np.nan), np.where(inside, y1, np.nan))
                best = pick(best, ends)
                continue
            y = y0 + (xs - x0) * (y1 - y0) / (x1 - x0)
            best = pick(best, np.where(inside, y, np.nan))
    return best


def frontier_position(
    x: ArrayLike,
    y: ArrayLike,
    curves: Sequence[Curve],
    *,
    higher_is_better: bool,
    tol: float | ArrayLike = 0.0,
) -> list[str]:
    """Each point's position against the curves at its x: one of `FRONTIER_POSITIONS`.

    Args:
        x, y: (n,) the points.
        curves: (x, y) vertex arrays (`frontier_value`); pass one curve to place the points
            against it alone, or several for the frontier they make together.
        higher_is_better: the direction of y; "above" always means better.
        tol: a scalar or (n,) per-point margin ≥ 0 within which a point is "on" the frontier
            (e.g. twice the pooled seed spread: a smaller difference does not count).

    Returns:
        n labels: "above" (better than the frontier by more than ``tol``), "on", "below", or
        "outside" (no curve spans its x).
    """
    xs = np.asarray(x, dtype=float).reshape(-1)
    ys = np.asarray(y, dtype=float).reshape(-1)
    if xs.shape != ys.shape:
        raise ValueError(f"x and y differ in length: {xs.size} and {ys.size}")
    if not np.isfinite(ys).all():
        raise ValueError("y has NaN or infinite values")
    tols = np.broadcast_to(np.asarray(tol, dtype=float), xs.shape)
    if not (np.isfinite(tols).all() and (tols >= 0).all()):
        raise ValueError(f"tol must be finite and >= 0, got {tol!r}")
    value = frontier_value(xs, curves, higher_is_better=higher_is_better)
    gain = (ys - value) if higher_is_better else (value - ys)  # > 0: better than the frontier
    out = []
    for g, t in zip(gain, tols, strict=True):
        if np.isnan(g):
            out.append("outside")
        else:
            out.append("above" if g > t else "below" if g < -t else "on")
    return out
