"""Tests for merit_lab.viz.plots_frontier: traces, directions, error bars, labels that do not
overlap, and bad input, on the numbers of issue 25's collapse pilot."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from merit_lab.evaluation.frontier import frontier_position
from merit_lab.viz.plots_frontier import (
    PATH_KINDS,
    POINT_KINDS,
    estimate_plot_area,
    place_labels,
    plot_frontier,
)

# (label, kind, held-out loss on the short tasks, conversational answers in style %): the pilot
# of issue 25, plus a random split, a soup and early-stop controls made up for the test.
PILOT = [
    ("theta0", "theta0", 7.62, 100.0),
    ("joint-1ep", "joint", 1.81, 0.0),
    ("merit-1d", "merge", 3.11, 0.0),
    ("merit-2d", "merge", 4.32, 29.0),
    ("merit-3d", "merge", 5.01, 62.0),
    ("merit-1d:shrink", "shrink", 2.38, 5.0),
    ("merit-2d:shrink", "shrink", 3.97, 58.0),
    ("merit-3d:shrink", "shrink", 5.65, 99.0),
    ("merit-1d:early", "early", 2.9, 3.0),
    ("merit-2d:early", "early", 4.1, 40.0),
    ("random-k4", "random", 3.6, 12.0),
    ("soup", "soup", 1.9, 1.0),
]


def pilot_points(spread: bool = True) -> pd.DataFrame:
    pts = pd.DataFrame(PILOT, columns=["label", "kind", "x", "y"])
    if spread:  # seeds gave a spread for the merges only
        pts["y_err"] = np.where(pts["kind"] == "merge", 4.0, np.nan)
        pts["x_err"] = np.where(pts["kind"] == "merge", 0.1, np.nan)
    return pts


def pilot_paths() -> pd.DataFrame:
    """The joint run's snapshots at steps 0-40 and the straight shrink path θ0 → θ_joint."""
    joint = [(0, 7.62, 100.0), (10, 5.2, 70.0), (20, 3.4, 20.0), (30, 2.3, 4.0), (40, 1.81, 0.0)]
    rows = [("joint-1ep", "joint", s, x, y) for s, x, y in joint]
    rows += [
        ("joint-1ep", "shrink", a, 7.62 + a * (1.81 - 7.62), 100.0 * (1 - a) ** 0.5)
        for a in (0.0, 0.25, 0.5, 0.75, 1.0)
    ]
    frame = pd.DataFrame(rows, columns=["path", "kind", "at", "x", "y"])
    frame["path"] = np.where(frame["kind"] == "joint", "joint-1ep", "joint-1ep shrunk")
    return frame.iloc[::-1]  # out of order: the figure sorts each path by `at`


def pilot_frontier():
    """The figure the figure-rule tests check."""
    return plot_frontier(pilot_points(), pilot_paths())


def test_paths_then_one_trace_per_kind_with_the_fixed_look():
    fig = pilot_frontier()
    names = [t.name for t in fig.data]
    assert names == [
        "joint path",  # joint paths first, though the table lists the shrink path first
        "shrink path",
        "θ0",
        "joint",
        "MERIT merges",
        "random splits",
        "uniform soups",
        "shrink controls",
        "early-stop controls",
    ]
    joint, shrink = fig.data[0], fig.data[1]
    assert (joint.line.dash, shrink.line.dash) == ("solid", "dash")
    assert list(joint.x) == [7.62, 5.2, 3.4, 2.3, 1.81]  # sorted by step, from θ0
    assert list(shrink.y) == pytest.approx([100.0, 100 * 0.75**0.5, 100 * 0.5**0.5, 50.0, 0.0])
    assert joint.line.color == PATH_KINDS["joint"][1] == POINT_KINDS["joint"][1]
    assert shrink.line.color == PATH_KINDS["shrink"][1] == POINT_KINDS["shrink"][1]
    for t in fig.data[2:]:
        kind = next(k for k, v in POINT_KINDS.items() if v[0] == t.name)
        assert (t.marker.color, t.marker.symbol) == POINT_KINDS[kind][1:]
    merges = fig.data[4]
    assert list(merges.x) == [3.11, 4.32, 5.01] and list(merges.y) == [0.0, 29.0, 62.0]
    # colours and markers are kind's own: all distinct, and the same with kinds left out
    assert len({v[1] for v in POINT_KINDS.values()}) == len({v[2] for v in POINT_KINDS.values()})
    assert len({v[1] for v in POINT_KINDS.values()}) == len(POINT_KINDS)
    only = plot_frontier(pilot_points().query("kind == 'merge'"))
    assert only.data[0].marker.color == merges.marker.color


def test_axes_say_the_direction_and_better_is_up():
    fig = pilot_frontier()
    assert "lower is better" in fig.layout.xaxis.title.text
    assert "higher is better" in fig.layout.yaxis.title.text
    lo, hi = fig.layout.yaxis.range
    assert lo < 0 and hi > 100  # in style: up is more
    x0, x1 = fig.layout.xaxis.range
    assert x0 < 1.81 and x1 > 7.62
    # a loss on the held-out families: lower is better, so the axis runs downward
    loss = pilot_points().assign(y=lambda d: 1 + (100 - d["y"]) / 50)
    fig = plot_frontier(loss, y_metric="loss")
    top, bottom = fig.layout.yaxis.range
    assert top > 3.0 and bottom < 1.0
    assert "lower is better" in fig.layout.yaxis.title.text


def test_error_bars_only_where_seeds_gave_a_spread():
    fig = pilot_frontier()
    merges = next(t for t in fig.data if t.name == "MERIT merges")
    assert merges.error_y.visible and list(merges.error_y.array) == [4.0, 4.0, 4.0]
    assert merges.error_x.visible and list(merges.error_x.array) == [0.1, 0.1, 0.1]
    joint = next(t for t in fig.data if t.name == "joint")
    assert not joint.error_y.visible and list(joint.error_y.array) == [0.0]
    assert not plot_frontier(pilot_points(spread=False)).data[0].error_y.visible


def test_hover_places_each_point_against_both_paths():
    pts, paths = pilot_points(), pilot_paths()
    fig = plot_frontier(pts, paths)
    curves = [
        (p.sort_values("at")["x"].to_numpy(), p.sort_values("at")["y"].to_numpy())
        for _, p in paths.groupby("path")
    ]
    want = frontier_position(
        pts["x"], pts["y"], curves, higher_is_better=True, tol=2 * pts["y_err"].fillna(0)
    )
    got = {}
    for t in fig.data[2:]:
        for x, text in zip(t.x, t.text, strict=True):
            got[x] = text.split("<br>")[-1].split(" the paths")[0]
    assert [got[x] for x in pts["x"]] == want
    # by hand: merit-3d (5.01, 62 ± 4) is below the shrink path there, 73.9 between its
    # vertices at α = 0.25 (6.1675, 86.6) and 0.5 (4.715, 70.7), by more than 2 × 4
    assert got[5.01] == "below"
    assert got[5.65] == "above"  # its shrink control: 99 against 80.9 on the shrink path
    assert got[7.62] == "on"  # θ0 starts both paths


def _label_boxes(fig) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Each annotation's box and point in px (y down), from the axis ranges and offsets."""
    w, h = estimate_plot_area(fig)
    (x0, x1), (y0, y1) = fig.layout.xaxis.range, fig.layout.yaxis.range
    boxes, anchors = [], []
    for a in fig.layout.annotations:
        px, py = (a.x - x0) / (x1 - x0) * w, (y1 - a.y) / (y1 - y0) * h
        bw, bh = 0.6 * a.font.size * len(a.text) + 6, 1.3 * a.font.size + 4
        cx, cy = px + a.ax, py + a.ay
        boxes.append([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2])
        anchors.append([px, py])
    return np.array(boxes), np.array(anchors), (w, h)


def _disjoint(a, b) -> bool:
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_every_point_has_a_label_and_no_two_labels_overlap():
    fig = pilot_frontier()
    assert [a.text for a in fig.layout.annotations] == [r[0] for r in PILOT]
    assert [(a.x, a.y) for a in fig.layout.annotations] == [(r[2], r[3]) for r in PILOT]
    boxes, anchors, (w, h) = _label_boxes(fig)
    n = len(boxes)
    for i in range(n):
        assert boxes[i][0] >= 0 and boxes[i][1] >= 0 and boxes[i][2] <= w and boxes[i][3] <= h
        for j in range(i + 1, n):
            assert _disjoint(boxes[i], boxes[j]), (PILOT[i][0], PILOT[j][0])
        for j in range(n):  # no label sits on a point's marker (±7 px)
            mark = [*(anchors[j] - 7), *(anchors[j] + 7)]
            assert _disjoint(boxes[i], mark), (PILOT[i][0], PILOT[j][0])


def test_place_labels_spreads_a_tight_cluster():
    rng = np.random.default_rng(0)
    anchors = 200 + rng.uniform(0, 6, size=(12, 2))  # twelve points within 6 px
    sizes = np.tile([60.0, 18.0], (12, 1))
    off = place_labels(anchors, sizes, (500, 400))
    c = anchors + off
    boxes = np.hstack([c - sizes / 2, c + sizes / 2])
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 500).all() and (boxes[:, 3] <= 400).all()
    for i in range(12):
        for j in range(i + 1, 12):
            assert _disjoint(boxes[i], boxes[j]), (i, j)
        for a in anchors:  # clear of every marker (±7 px)
            assert _disjoint(boxes[i], [*(a - 7), *(a + 7)])
    # a lone point: the first candidate, up and to the right at radius 14
    ((dx, dy),) = place_labels([[100.0, 100.0]], [[40.0, 10.0]], (300, 300))
    r = np.cos(np.pi / 4)
    assert dx == pytest.approx(r * (14 + 20 * r)) and dy == pytest.approx(-r * (14 + 5 * r))
    # at the right edge the box goes left instead
    ((dx, _),) = place_labels([[295.0, 100.0]], [[40.0, 10.0]], (300, 300))
    assert dx < 0


@pytest.mark.parametrize(
    ("points", "paths", "message"),
    [
        (pilot_points().drop(columns="kind"), None, r"lacks columns \['kind'\]"),
        (pilot_points().assign(kind="ties"), None, "unknown point kinds"),
        (pd.concat([pilot_points()] * 2), None, "repeated labels"),
        (pilot_points().assign(y_err=-1.0), None, "y_err must be >= 0"),
        (pilot_points().assign(y=np.nan), None, "without a finite x and y"),
        (pilot_points(), pilot_paths().query("at != 0"), "starting at 0"),
        (pilot_points(), pilot_paths().assign(path="one"), "one kind of"),
        (pilot_points(), pilot_paths().assign(kind="soup"), "one kind of"),
        (pilot_points(), pilot_paths().drop(columns="at"), "lacks columns"),
        (pilot_points().iloc[:0], None, "no points"),
    ],
)
def test_bad_input_is_refused(points, paths, message):
    with pytest.raises(ValueError, match=message):
        plot_frontier(points, paths)
    with pytest.raises(ValueError, match="unknown y_metric"):
        plot_frontier(pilot_points(), y_metric="bleu")
