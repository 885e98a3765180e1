"""The frontier figure: target-task quality against preserved ability, with the joint and shrink
paths that a merge has to beat.

Input: a table of models (label, kind, x, y, optional seed spreads) and a table of paths (the
joint run's snapshots from θ0 in step order, the shrink path θ0 → θ_joint along α). Output: a
``go.Figure`` with the paths as curves and the models as labelled points; labels are placed so
that they do not overlap (`place_labels`), and hover says where each point sits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from merit_lab.evaluation.frontier import frontier_position, frontier_value
from merit_lab.viz.plots import METRICS
from merit_lab.viz.style import DASHES, FONT, PALETTE, layout

__all__ = [
    "FRONTIER_SIZE",
    "PATH_KINDS",
    "POINT_KINDS",
    "estimate_plot_area",
    "place_labels",
    "plot_frontier",
]

# kind -> (legend name, colour, marker). Fixed rather than drawn from the kinds present, so a
# kind looks the same in every run's figure; a control shares no colour with what it controls.
POINT_KINDS = {
    "theta0": ("θ0", PALETTE[7], "star"),
    "joint": ("joint", PALETTE[0], "square"),
    "merge": ("MERIT merges", PALETTE[3], "circle"),
    "random": ("random splits", PALETTE[1], "diamond"),
    "soup": ("uniform soups", PALETTE[2], "hexagon"),
    "shrink": ("shrink controls", PALETTE[4], "triangle-down"),
    "early": ("early-stop controls", PALETTE[5], "triangle-up"),
}
# path kind -> (legend name, colour, what ``at`` counts): a path has its points' kind colour
PATH_KINDS = {
    "joint": ("joint path", PALETTE[0], "step"),
    "shrink": ("shrink path", PALETTE[4], "α"),
}
FRONTIER_SIZE = (860, 560)  # px: room for a dozen labels beside the points
_MARGIN = {"l": 80, "r": 20, "t": 60, "b": 70}
_LABEL_FONT = 11
_Y_SHORT = {
    "in_style": "in style (%)",
    "loss": "loss (nats/token)",
    "exact_match": "exact match (%)",
}


# ---------------------------------------------------------------------------------------- labels
def _overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Overlap areas of box ``a`` (x0, y0, x1, y1) with each of the boxes ``b`` (m, 4)."""
    w = np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0])
    h = np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1])
    return np.clip(w, 0, None) * np.clip(h, 0, None)


def place_labels(
    anchors: np.ndarray,
    sizes: np.ndarray,
    area: tuple[float, float],
    obstacles: np.ndarray | None = None,
    *,
    marker: float = 14.0,
) -> np.ndarray:
    """Offsets that put each label's box near its anchor without covering another label or mark.

    Greedy, in the given order: each label takes the nearest candidate position (rings of 16
    directions at growing radii) whose box stays inside the area and overlaps no label placed
    before it, no anchor's marker and no obstacle; if every candidate collides, the least
    overlap wins. Pixel coordinates, y downward (as plotly's ``ax``/``ay``).

    Args:
        anchors: (n, 2) the labelled points.
        sizes: (n, 2) each label's box width and height.
        area: (width, height) of the plotting area the boxes must stay inside.
        obstacles: (m, 2) other points to keep clear of (e.g. samples along the curves).
        marker: the side of the square kept clear around every anchor and obstacle.

    Returns:
        (n, 2) offsets from each anchor to its box's centre.
    """
    anchors, sizes = np.asarray(anchors, float).reshape(-1, 2), np.asarray(sizes, float)
    others = np.empty((0, 2)) if obstacles is None else np.asarray(obstacles, float).reshape(-1, 2)
    marks = np.vstack([anchors, others])
    half = marker / 2
    mark_boxes = np.hstack([marks - half, marks + half])
    angles = np.deg2rad(np.arange(16) * 22.5 + 45)  # up-right first, then counter-clockwise
    radii = np.array([14, 22, 32, 44, 58, 76, 98, 124, 156])
    placed = np.empty((0, 4))
    out = np.zeros_like(anchors)
    for i, ((ax, ay), (w, h)) in enumerate(zip(anchors, sizes, strict=True)):
        best, best_cost = None, np.inf
        for r in radii:
            # a box centred r away along the direction, pushed out so its edge clears the mark
            for t in angles:
                dx = np.cos(t) * (r + w / 2 * abs(np.cos(t)))
                dy = -np.sin(t) * (r + h / 2 * abs(np.sin(t)))
                box = np.array([ax + dx - w / 2, ay + dy - h / 2, ax + dx + w / 2, ay + dy + h / 2])
                if box[0] < 0 or box[1] < 0 or box[2] > area[0] or box[3] > area[1]:
                    continue
                cost = 10 * _overlap(box, placed).sum() + _overlap(box, mark_boxes).sum()
                if cost < best_cost:
                    best, best_cost = (dx, dy), cost
            if best_cost == 0:
                break
        if best is None:  # nothing fits inside the area: straight above, clipped by plotly
            best = (0.0, -(h / 2 + half))
        out[i] = best
        c = anchors[i] + best
        placed = np.vstack([placed, [c[0] - w / 2, c[1] - h / 2, c[0] + w / 2, c[1] + h / 2]])
    return out


def _label_size(text: str) -> tuple[float, float]:
    """A label's box in px: ~0.6 em per character (as the figure-rule tests estimate), one line."""
    return 0.6 * _LABEL_FONT * len(text) + 6, 1.3 * _LABEL_FONT + 4


# ----------------------------------------------------------------------------------------- input
def _check_points(points: pd.DataFrame) -> pd.DataFrame:
    missing = {"label", "kind", "x", "y"} - set(points.columns)
    if missing:
        raise ValueError(f"points lacks columns {sorted(missing)} (label, kind, x, y)")
    if points.empty:
        raise ValueError("no points to plot")
    if points["label"].duplicated().any():
        raise ValueError(
            f"repeated labels: {sorted(set(points['label'][points['label'].duplicated()]))}"
        )
    unknown = sorted(set(points["kind"]) - set(POINT_KINDS))
    if unknown:
        raise ValueError(f"unknown point kinds {unknown}; known: {list(POINT_KINDS)}")
    out = points.copy()
    for col in ("x_err", "y_err"):
        out[col] = out[col].astype(float).fillna(0.0) if col in out else 0.0
        if (out[col] < 0).any():
            raise ValueError(f"{col} must be >= 0 (a seed spread)")
    bad = out.loc[~np.isfinite(out[["x", "y"]].astype(float)).all(axis=1), "label"]
    if len(bad):
        raise ValueError(f"points without a finite x and y: {list(bad)}")
    return out


def _check_paths(paths: pd.DataFrame | None) -> dict[str, pd.DataFrame]:
    """Path name → its vertices sorted by ``at``, joint paths first; each starts at θ0."""
    if paths is None or paths.empty:
        return {}
    missing = {"path", "kind", "at", "x", "y"} - set(paths.columns)
    if missing:
        raise ValueError(f"paths lacks columns {sorted(missing)} (path, kind, at, x, y)")
    out = {}
    for name, p in paths.groupby("path", sort=False):
        kinds = set(p["kind"])
        if len(kinds) != 1 or not kinds <= set(PATH_KINDS):
            raise ValueError(f"path {name!r}: one kind of {list(PATH_KINDS)}, got {sorted(kinds)}")
        p = p.sort_values("at")
        if len(p) < 2 or p["at"].iloc[0] != 0 or p["at"].duplicated().any():
            raise ValueError(
                f"path {name!r} needs distinct 'at' values starting at 0 (θ0 itself: step 0 "
                f"of the joint run, α = 0 of the shrink), got {list(p['at'])}"
            )
        if not np.isfinite(p[["x", "y"]].astype(float)).all(axis=None):
            raise ValueError(f"path {name!r} has vertices without a finite x and y")
        out[str(name)] = p
    order = list(PATH_KINDS)
    return dict(sorted(out.items(), key=lambda item: order.index(item[1]["kind"].iloc[0])))


def _axis_range(values: Sequence[np.ndarray], reverse: bool) -> list[float]:
    v = np.concatenate([np.asarray(a, float).ravel() for a in values])
    lo, hi = float(v.min()), float(v.max())
    pad = 0.08 * (hi - lo) if hi > lo else 0.05 * max(abs(hi), 1.0)
    rng = [lo - pad, hi + pad]
    return rng[::-1] if reverse else rng


# ---------------------------------------------------------------------------------------- figure
def plot_frontier(
    points: pd.DataFrame,
    paths: pd.DataFrame | None = None,
    *,
    y_metric: str = "in_style",
    x_of: str = "trained sources",
    y_of: str = "held-out families",
) -> go.Figure:
    """Target-task quality (x) against preserved ability (y): is a merge above the frontier?

    x is the held-out loss on the trained sources (lower is better, so better is left); y is
    ``y_metric`` on the held-out families, its axis reversed when lower is better, so better is
    always up and "above the frontier" reads as drawn. Hover gives each point's place against
    the paths together (`frontier_position`, within twice its y spread counts as "on").

    Args:
        points: one row per model: ``label`` (unique), ``kind`` (a key of `POINT_KINDS`:
            theta0, joint, merge, random, soup, shrink, early), ``x``, ``y``, and optionally
            ``x_err``, ``y_err`` (seed spreads ≥ 0; NaN or 0 draws no bar).
        paths: one row per vertex: ``path`` (a name, e.g. the joint row), ``kind`` (joint:
            the run's snapshots; shrink: θ0 + α(θ_joint − θ0)), ``at`` (step or α, from 0 at
            θ0), ``x``, ``y``.
        y_metric: a key of `merit_lab.viz.plots.METRICS` (its direction is used).
        x_of, y_of: what the axes are measured on, for their titles.

    Returns:
        One trace per path (joint paths, then shrink paths), then one per point kind present
        (in `POINT_KINDS` order), and one annotation per point holding its label.
    """
    if y_metric not in METRICS:
        raise ValueError(f"unknown y_metric {y_metric!r}; known: {sorted(METRICS)}")
    title, unit, higher = METRICS[y_metric]
    pts, curves = _check_points(points), _check_paths(paths)
    fig = go.Figure()
    for name, p in curves.items():
        kind = p["kind"].iloc[0]
        legend, color, at = PATH_KINDS[kind]
        same = [n for n, q in curves.items() if q["kind"].iloc[0] == kind]
        # joint paths start solid, shrink paths dashed: apart in grey print too
        dash = DASHES[(same.index(name) + list(PATH_KINDS).index(kind)) % len(DASHES)]
        fig.add_trace(
            go.Scatter(
                x=p["x"],
                y=p["y"],
                mode="lines+markers",
                name=legend if len(same) == 1 else f"{legend} ({name})",
                line={"color": color, "dash": dash, "width": 2},
                marker={"color": color, "size": 5, "symbol": "circle"},
                text=[f"{name}, {at} {v:g}" for v in p["at"]],
                hovertemplate="%{text}<br>x %{x:.4g}, y %{y:.4g}<extra></extra>",
            )
        )
    xy = [(p["x"].to_numpy(float), p["y"].to_numpy(float)) for p in curves.values()]
    if xy:
        value = frontier_value(pts["x"], xy, higher_is_better=higher)
        where = frontier_position(
            pts["x"], pts["y"], xy, higher_is_better=higher, tol=2 * pts["y_err"].to_numpy()
        )
    else:
        value, where = np.full(len(pts), np.nan), ["no path given"] * len(pts)
    pts = pts.assign(frontier=value, where=where)
    for kind, (legend, color, symbol) in POINT_KINDS.items():
        g = pts[pts["kind"] == kind]
        if g.empty:
            continue
        fig.add_trace(
            go.Scatter(
                x=g["x"],
                y=g["y"],
                mode="markers",
                name=legend,
                marker={
                    "color": color,
                    "symbol": symbol,
                    "size": 11,
                    "line": {"width": 1, "color": "white"},
                },
                error_x={
                    "type": "data",
                    "array": g["x_err"],
                    "visible": bool((g["x_err"] > 0).any()),
                    "color": color,
                },
                error_y={
                    "type": "data",
                    "array": g["y_err"],
                    "visible": bool((g["y_err"] > 0).any()),
                    "color": color,
                },
                text=[_hover(r) for r in g.itertuples()],
                hovertemplate="%{text}<extra></extra>",
            )
        )
    x_range = _axis_range(
        [pts["x"] - pts["x_err"], pts["x"] + pts["x_err"], *(c[0] for c in xy)], False
    )
    y_range = _axis_range(
        [pts["y"] - pts["y_err"], pts["y"] + pts["y_err"], *(c[1] for c in xy)], not higher
    )
    fig.update_xaxes(title=f"held-out loss, {x_of} (lower is better)", range=x_range)
    y_short = _Y_SHORT.get(y_metric, f"{title} ({unit})")
    fig.update_yaxes(
        title=f"{y_short}, {y_of} ({'higher' if higher else 'lower'} is better)", range=y_range
    )
    width, height = FRONTIER_SIZE
    layout(
        fig, "Target-task quality vs preserved ability", width=width, height=height, margin=_MARGIN
    )
    _add_labels(fig, pts, xy, x_range, y_range)
    return fig


def _hover(r) -> str:
    gap = "" if np.isnan(r.frontier) else f" (frontier {r.frontier:.4g})"
    return (
        f"{r.label} ({POINT_KINDS[r.kind][0]})<br>x {r.x:.4g} ± {r.x_err:.2g}, "
        f"y {r.y:.4g} ± {r.y_err:.2g}<br>{r.where} the paths{gap}"
    )


def estimate_plot_area(fig: go.Figure) -> tuple[float, float]:
    """The plotting area's (width, height) in px as the labels are placed: the canvas less the
    margins and the legend on the right (~0.6 em per character plus its symbol)."""
    names = [t.name for t in fig.data if t.name and t.showlegend is not False]
    legend = 40 + 0.6 * FONT["size"] * max(map(len, names), default=0) + 10
    width = fig.layout.width - _MARGIN["l"] - _MARGIN["r"] - legend
    return width, fig.layout.height - _MARGIN["t"] - _MARGIN["b"]


def _add_labels(fig: go.Figure, pts: pd.DataFrame, xy, x_range, y_range) -> None:
    """One annotation per point, its text box offset by `place_labels` and tied by a thin line."""
    w, h = estimate_plot_area(fig)

    def to_px(x, y):
        px = (np.asarray(x, float) - x_range[0]) / (x_range[1] - x_range[0]) * w
        py = (y_range[1] - np.asarray(y, float)) / (y_range[1] - y_range[0]) * h
        return np.column_stack([px, py])

    samples = [
        to_px(np.linspace(a, b, 12), np.linspace(c, d, 12))
        for cx, cy in xy
        for a, b, c, d in zip(cx[:-1], cx[1:], cy[:-1], cy[1:], strict=True)
    ]
    obstacles = np.vstack(samples) if samples else None
    sizes = np.array([_label_size(str(lb)) for lb in pts["label"]])
    offsets = place_labels(to_px(pts["x"], pts["y"]), sizes, (w, h), obstacles)
    for (lb, x, y), (dx, dy) in zip(
        pts[["label", "x", "y"]].itertuples(index=False), offsets, strict=True
    ):
        fig.add_annotation(
            x=x,
            y=y,
            text=str(lb),
            ax=float(dx),
            ay=float(dy),
            showarrow=True,
            arrowhead=0,
            arrowwidth=0.7,
            arrowcolor="#888888",
            standoff=6,
            font={"size": _LABEL_FONT},
        )
