"""Tests for merit_lab.evaluation.frontier: positions against piecewise-linear curves, worked by
hand."""

from __future__ import annotations

import numpy as np
import pytest

from merit_lab.evaluation.frontier import frontier_position, frontier_value

# A joint path from θ0 at (7.6, 100) through (4.0, 60) to (1.8, 0): x is the loss on the trained
# sources, y the preserved style in %. The shrink path runs straight from θ0 to joint.
JOINT = ([7.6, 4.0, 1.8], [100.0, 60.0, 0.0])
SHRINK = ([7.6, 1.8], [100.0, 0.0])


def test_value_interpolates_each_segment_by_hand():
    # on the joint path at x = 5.8: halfway along (7.6, 100)–(4.0, 60) → 80
    # at x = 2.9: halfway along (4.0, 60)–(1.8, 0) → 30
    np.testing.assert_allclose(
        frontier_value([5.8, 2.9, 4.0], [JOINT], higher_is_better=True), [80.0, 30.0, 60.0]
    )
    # the shrink line at x = 4.7: (7.6 − 4.7) / 5.8 = 0.5 of the way → 50
    np.testing.assert_allclose(frontier_value([4.7], [SHRINK], higher_is_better=True), [50.0])
    # outside both ends: no value
    assert np.isnan(frontier_value([8.0, 1.0], [JOINT], higher_is_better=True)).all()


def test_several_curves_take_the_best_in_the_direction_of_y():
    # at x = 4.7: joint gives 60 + (0.7 / 3.6)·40 = 67.78, shrink gives 50
    both = [JOINT, SHRINK]
    np.testing.assert_allclose(
        frontier_value([4.7], both, higher_is_better=True), [60 + 0.7 / 3.6 * 40]
    )
    np.testing.assert_allclose(frontier_value([4.7], both, higher_is_better=False), [50.0])


def test_positions_by_hand():
    x = [5.8, 5.8, 5.8, 2.9, 9.0]
    y = [85.0, 80.0, 70.0, 30.5, 50.0]
    assert frontier_position(x, y, [JOINT], higher_is_better=True) == [
        "above",
        "on",
        "below",
        "above",
        "outside",
    ]
    # a tolerance of 1 (e.g. twice the seed spread) swallows the 0.5 above the curve at 2.9
    assert frontier_position(x, y, [JOINT], higher_is_better=True, tol=1.0)[3] == "on"
    # per-point tolerances: only the first point gets one big enough to call it "on"
    tol = [5.0, 0.0, 0.0, 0.0, 0.0]
    assert frontier_position(x, y, [JOINT], higher_is_better=True, tol=tol)[:3] == [
        "on",
        "on",
        "below",
    ]


def test_lower_is_better_flips_above_and_below():
    # y a loss on held-out families: θ0 at 1.0, joint at 3.0; lower is better
    curve = ([7.6, 1.8], [1.0, 3.0])
    # at x = 4.7 the curve is at 2.0: 1.5 is better (above), 2.5 worse (below)
    assert frontier_position([4.7, 4.7], [1.5, 2.5], [curve], higher_is_better=False) == [
        "above",
        "below",
    ]


def test_a_curve_that_turns_back_in_x_counts_its_best_crossing():
    # x goes 5 → 2 → 4: at x = 3 the curve is at 40 (first leg, slope 20) and 60 (second leg,
    # slope 40)
    curve = ([5.0, 2.0, 4.0], [80.0, 20.0, 100.0])
    np.testing.assert_allclose(frontier_value([3.0], [curve], higher_is_better=True), [60.0])
    np.testing.assert_allclose(frontier_value([3.0], [curve], higher_is_better=False), [40.0])
    # 50 beats the first leg but not the second: below
    assert frontier_position([3.0], [50.0], [curve], higher_is_better=True) == ["below"]
    # a vertical segment: both of its ends are on the curve at that x
    vertical = ([1.0, 2.0, 2.0, 3.0], [0.0, 10.0, 30.0, 40.0])
    np.testing.assert_allclose(frontier_value([2.0], [vertical], higher_is_better=True), [30.0])
    np.testing.assert_allclose(frontier_value([2.0], [vertical], higher_is_better=False), [10.0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"curves": []}, "no curves"),
        ({"curves": [([1.0], [2.0])]}, "length >= 2"),
        ({"curves": [([1.0, 2.0], [2.0])]}, "same length"),
        ({"curves": [([1.0, np.nan], [2.0, 3.0])]}, "NaN"),
        ({"y": [1.0]}, "differ in length"),
        ({"y": [np.nan, 1.0]}, "y has NaN"),
        ({"x": [np.inf, 1.0]}, "x has NaN"),
        ({"tol": -1.0}, "tol must be"),
    ],
)
def test_bad_input_is_refused(kwargs, message):
    args = {"x": [2.0, 3.0], "y": [1.0, 2.0], "curves": [SHRINK]} | kwargs
    tol = args.get("tol", 0.0)
    with pytest.raises(ValueError, match=message):
        frontier_position(args["x"], args["y"], args["curves"], higher_is_better=True, tol=tol)
