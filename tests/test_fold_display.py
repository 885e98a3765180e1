"""The fold stability on display: the report section, the figures, the explorer and the editor.

A hand-made `FoldStability` (`hand_made_stability`) fixes every number the display shows, so
each is asserted against a value worked out here; one test renders a computed stability.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from merit_lab.analysis.conflict import compute_conflict_space
from merit_lab.gradients.bank import FOLDS_FILE
from merit_lab.partition.folds import FoldStability, compute_fold_stability
from merit_lab.partition.methods import split_balanced
from merit_lab.pipeline.folds import FOLD_STABILITY_FILE
from merit_lab.pipeline.report import REPORT_SECTIONS
from merit_lab.pipeline.report_folds import (
    FOLD_FIGURES,
    FOLD_HEADING,
    fold_figures,
    fold_stability_section,
)
from merit_lab.pipeline.rundir import RunDir
from merit_lab.viz.editor import PartitionEditor
from merit_lab.viz.explorer import ConflictExplorer
from merit_lab.viz.plots import plot_conflict_scatter
from merit_lab.viz.plots_stability import UNSTABLE_COLOR, mark_unstable_sources

NAMES = ["a0", "a1", "a2", "b0", "b1", "b2"]
N = 40  # calibration examples per source
# r = 2: b2 changes group in every pairing, a1 in 2 of 3, b1 in 1 of 3 (below the 0.5 line)
FLIP_R2 = {"a1": 2 / 3, "b1": 1 / 3, "b2": 1.0}


def hand_made_stability(
    names: list[str],
    cosine: np.ndarray,
    *,
    at_n: float = 0.72,
    n: int = N,
    flips: dict[str, float] | None = None,
) -> FoldStability:
    """A stability with chosen numbers: SE of pair (i, j) 0.01 (i + j + 1); halves' Pearson
    0.80, 0.90, 0.85; r = 1 halves agree at 1, r = 2 at 0.5, 0.7, 0.6; r = 2 flips `FLIP_R2`
    (or ``flips``, by name; other sources never flip); the r = 2 agreement curve at sizes n·2^(k/2),
    k = −2..12, is ``at_n`` at the run's n and rises by 0.04 per step up to k = 1 and by 0.08
    after (0.72: 0.76 at n·√2, 0.84 at 2n, so it crosses 0.8 half-way between them)."""
    t = len(names)
    i, j = np.indices((t, t))
    se = np.where(i == j, 0.0, 0.01 * (i + j + 1))
    ks = np.arange(-2, 13)
    sizes = n * 2.0 ** (ks / 2)
    curve2 = at_n + np.where(ks <= 1, 0.04 * ks, 0.04 + 0.08 * (ks - 1))
    curve2 = np.minimum(curve2, 1.0)
    flip2 = np.array([(FLIP_R2 if flips is None else flips).get(s, 0.0) for s in names])
    return FoldStability(
        names=tuple(names),
        folds=4,
        n_examples=np.full(t, n),
        cosine=np.asarray(cosine, dtype=np.float64),
        cosine_se=se,
        pearson_halves=np.array([0.80, 0.90, 0.85]),
        reliability=2 * 0.85 / 1.85,
        ari_halves={1: np.ones(3), 2: np.array([0.5, 0.7, 0.6])},
        flip={1: np.zeros(t), 2: flip2},
        coassign={1: np.ones((t, t)), 2: np.eye(t)},
        sizes=sizes,
        curve={1: np.ones(ks.size), 2: curve2},
        info={"method": "balanced", "seed": 0},
    )


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2, 30))
    rows = np.stack([centres[i // 3] + 0.7 * rng.normal(size=30) for i in range(6)])
    space = compute_conflict_space(rows, NAMES)
    counts = {s: 20 + 5 * i for i, s in enumerate(NAMES)}
    table = pd.DataFrame(
        {
            "source": NAMES,
            "family": [s[0] for s in NAMES],
            "examples": list(counts.values()),
            "tokens": [10 * v for v in counts.values()],
        }
    ).set_index("source", drop=False)
    return SimpleNamespace(
        rows=rows,
        space=space,
        table=table,
        counts=counts,
        tokens={s: 10 * v for s, v in counts.items()},
        stab=hand_made_stability(NAMES, space.cosine),
    )


def test_the_hand_made_numbers_are_what_the_stability_reports(world):
    """The fixture's worked numbers, through the stability's own methods."""
    st = world.stab
    assert st.agreement(2) == pytest.approx(0.72)
    # 0.72 at n, 0.76 at n·√2, 0.84 at 2n: 0.8 half-way in log n, at n · 2^(3/4)
    assert st.n_for(2) == math.ceil(N * 2**0.75) == 68
    assert st.unstable_sources(2) == ["b2", "a1"]
    assert st.warning(2) and not st.warning(1)


# ---- the report -------------------------------------------------------------------------------


def write_run(root: Path, stab: FoldStability | None, world) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    world.space.save(root / "conflict.json")
    split_balanced(world.space, world.counts, world.tokens, r=2).save(root / "partition.json")
    if stab is not None:
        stab.save(root / FOLD_STABILITY_FILE)
    return root


def table_rows(text: str, first: str) -> list[list[str]]:
    """The markdown table rows of ``text`` whose first cell is ``first``."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first:
            rows.append(cells)
    return rows


def test_report_section_shows_the_numbers_of_the_stability(world, tmp_path):
    root = write_run(tmp_path / "run", world.stab, world)
    saved = {}

    def figure(fig, stem):
        saved[stem] = fig
        return f"![{stem}](figures/{stem}.html)"

    text = "\n".join(fold_stability_section(root, figure))
    assert text.startswith(FOLD_HEADING)
    upper = [0.01 * (i + j + 1) for i in range(6) for j in range(i + 1, 6)]
    assert f"median {np.median(upper):.3f} (max {max(upper):.3f})" in text  # 0.060, 0.100
    assert f"{2 * 0.85 / 1.85:.3f}" in text  # split-half reliability, Spearman-Brown: 0.919
    # r = 2: halves median 0.60 (0.50-0.70), mean 0.60; the curve at n/2 = 20: 0.64 (0.08 per
    # doubling below 0.72); two draws of n = 40: 0.72, n for 0.8: 68
    assert table_rows(text, "r = 2 (K = 4)") == [
        ["r = 2 (K = 4)", "0.60", "0.50", "0.70", "0.60", "0.64", "0.72", "68"]
    ]
    assert table_rows(text, "r = 1 (K = 2)")[0][1:5] == ["1.00", "1.00", "1.00", "1.00"]
    # the least certain cosine: b1 · b2, SE 0.01 (4 + 5 + 1)
    cos = world.space.cosine[4, 5]
    assert table_rows(text, "b1 · b2") == [["b1 · b2", f"{cos:+.3f}", "0.100"]]
    # sources that change group: b2 (100%) before a1 (67%); b1 (33%) under the line
    flips = [ln for ln in text.splitlines() if ln.startswith("| b2 |") or ln.startswith("| a1 |")]
    assert flips == ["| b2 | 0% | 100% |", "| a1 | 0% | 67% |"]
    assert "| b1 | 0% | 33% |" not in text
    assert set(saved) == set(FOLD_FIGURES) and "figures/fold_flips.html" in text
    assert "this run splits at r = 2" in text


@pytest.mark.parametrize("at_n, warned", [(0.79, True), (0.81, False), (0.5, True), (0.95, False)])
def test_the_warning_appears_iff_two_draws_agree_below_0_8(world, tmp_path, at_n, warned):
    stab = hand_made_stability(NAMES, world.space.cosine, at_n=at_n)
    assert stab.agreement(2) == pytest.approx(at_n)
    root = write_run(tmp_path / "run", stab, world)
    ctx = SimpleNamespace(run=RunDir(root), figure=lambda fig, stem: stem)
    lines = REPORT_SECTIONS["fold stability"](ctx)  # as report.md gets it
    bold = [ln for ln in lines if ln.startswith("**WARNING")]
    assert bool(bold) == warned
    if warned:
        assert f"about {at_n:.2f} (< 0.8)" in bold[0] and "calibration.n" in bold[0]


def test_a_run_without_fold_rows_says_so(world, tmp_path):
    root = write_run(tmp_path / "run", None, world)
    lines = fold_stability_section(root)
    assert lines[0] == FOLD_HEADING and "Not measured for this run" in lines[2]
    assert fold_stability_section(tmp_path / "empty") == []  # before the conflict stage


def test_a_computed_stability_renders_in_the_report_and_the_explorer(tmp_path):
    """compute_fold_stability's own output, end to end (no hand-made numbers)."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(2, 30))
    base = np.stack([centres[i % 2] + 0.5 * rng.normal(size=30) for i in range(6)])
    folds = base[:, None, :] + rng.normal(size=(6, 4, 30))
    names = [f"s{i}" for i in range(6)]
    cnt = {n: 10 for n in names}
    stab = compute_fold_stability(
        folds,
        np.full((6, 4), 5),
        names,
        n_examples=[20] * 6,
        examples=cnt,
        train_tokens=cnt,
        rs=(1, 2),
    )
    space = compute_conflict_space(folds.mean(axis=1), names)
    root = tmp_path / "run"
    root.mkdir()
    space.save(root / "conflict.json")
    stab.save(root / FOLD_STABILITY_FILE)
    text = "\n".join(fold_stability_section(root, lambda fig, stem: stem))
    row = stab.summary().loc[2]
    assert table_rows(text, "r = 2 (K = 4)")[0][1] == f"{row['ari_half_median']:.2f}"
    assert set(fold_figures(stab)) == set(FOLD_FIGURES)
    ex = ConflictExplorer(space, folds=stab)
    assert "fold SE" in ex.heatmap.data[-1].text[0][1]


# ---- the explorer -----------------------------------------------------------------------------


def test_explorer_hover_carries_each_cosines_standard_error(world):
    ex = ConflictExplorer(world.space, world.table, folds=world.stab)
    heat = ex.heatmap.data[-1]
    names = list(heat.customdata)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            cell = heat.text[i][j]
            if a == b:
                assert "fold SE" not in cell
                continue
            ia, ib = NAMES.index(a), NAMES.index(b)
            want = f"cos = {world.space.cosine[ia, ib]:+.3f} ± {0.01 * (ia + ib + 1):.3f}"
            assert want in cell, (a, b, cell)
            assert f"family: {a[0]}" in cell  # the table's hover lines stay
    allies, _ = ex.allies_and_conflicts("b2", n=5)
    want = [0.01 * (NAMES.index(s) + 5 + 1) for s in allies["source"]]
    np.testing.assert_allclose(allies["se"], want)
    ex.source.value = "b2"
    assert "in 100% of pairings (r = 2)" in ex.panel.value and "±0.100" in ex.panel.value


def test_explorer_rings_the_unstable_sources_in_the_scatter(world):
    ex = ConflictExplorer(world.space, world.table, folds=world.stab)
    ring = ex.scatter.data[-1]
    assert ring.name == "changes group between folds (r = 2)"
    assert ring.marker.symbol == "circle-open" and ring.marker.color == UNSTABLE_COLOR
    z = world.space.coords(2)
    want = [NAMES.index("b2"), NAMES.index("a1")]  # most unstable first
    np.testing.assert_allclose(ring.x, z[want, 0])
    np.testing.assert_allclose(ring.y, z[want, 1])
    assert "100%" in ring.text[0] and "67%" in ring.text[1]
    ex.dims.value = 3
    ring3 = ex.scatter.data[-1]
    assert ring3.type == "scatter3d"
    np.testing.assert_allclose(ring3.z, world.space.coords(3)[want, 2])
    ex.dims.value = 2
    # beside a colour bar (a continuous colour scale) the legend goes above the plot
    fig = plot_conflict_scatter(world.space)
    fig.update_traces(marker={"color": np.arange(6), "showscale": True})
    mark_unstable_sources(fig, world.space, world.stab, 2)
    assert fig.data[-1].name == ring.name and fig.layout.legend.orientation == "h"
    assert fig.layout.legend.yanchor == "bottom" and fig.layout.legend.y >= 1
    # r = 1 never flips, and without folds there is no ring
    assert ConflictExplorer(world.space, folds=world.stab, fold_r=1).scatter.data[-1].name != (
        "changes group between folds (r = 1)"
    )
    plain = ConflictExplorer(world.space, world.table)
    assert all("folds" not in (t.name or "") for t in plain.scatter.data)
    assert "se" not in plain.allies_and_conflicts("b2")[0].columns


# ---- the editor -------------------------------------------------------------------------------


def test_editor_flags_a_flipping_source_before_it_is_moved(world):
    part = split_balanced(world.space, world.counts, world.tokens, r=2)
    ed = PartitionEditor(world.space, world.table, partition=part, folds=world.stab)
    labels = dict((v, k) for k, v in ed.source.options)
    assert labels["b2"].endswith(" ⚠") and labels["a1"].endswith(" ⚠")
    assert not labels["b1"].endswith("⚠") and not labels["a0"].endswith("⚠")
    ed.source.value = "b2"
    assert "Unstable source" in ed.fold_flag.value and "in 100% of the 3 pairings" in (
        ed.fold_flag.value
    )
    assert ed.partition.edit_log == ()  # flagged on selection, before any move
    ed.source.value = "b1"  # sometimes: a note, no warning
    assert "33%" in ed.fold_flag.value and "Unstable" not in ed.fold_flag.value
    ed.source.value = "a0"
    assert ed.fold_flag.value == ""
    ed.source.value = "a1"
    assert "67%" in ed.fold_flag.value
    # the flag follows the split's r: at r = 1 nothing flips
    assert ed.split("balanced", r=1)
    assert ed.fold_flag.value == "" and not any("⚠" in k for k, _ in ed.source.options)
    bare = PartitionEditor(world.space, world.table, partition=part)
    bare.source.value = "b2"
    assert bare.fold_flag.value == ""


def test_no_n_reaching_the_target_shows_a_dash_and_still_warns(world, tmp_path):
    flat = hand_made_stability(NAMES, world.space.cosine, at_n=0.3)
    stab = FoldStability(**{**vars(flat), "curve": {1: flat.curve[1], 2: np.full(15, 0.3)}})
    assert stab.n_for(2) is None
    root = write_run(tmp_path / "run", stab, world)
    text = "\n".join(fold_stability_section(root))
    assert table_rows(text, "r = 2 (K = 4)")[0][4:] == ["0.60", "0.30", "0.30", "–"]
    assert "**WARNING" in text
    for fig in fold_figures(stab).values():  # the figures draw without a crossing too
        assert fig.data


def write_bank_stats(root: Path, stats: dict) -> None:
    """A run's ``gradients/bank.json`` with these per-source stats (what `read_fold_cost`
    reads; no rows are needed for it)."""
    from merit_lab.envelope import save_enveloped
    from merit_lab.gradients.bank import BANK_FORMAT, BANK_VERSION

    (root / "gradients").mkdir(parents=True, exist_ok=True)
    meta = {"names": list(stats), "info": {}, "stats": stats}
    save_enveloped(root / "gradients" / "bank.json", BANK_FORMAT, BANK_VERSION, meta)
    (root / "gradients" / FOLDS_FILE).write_bytes(b"")  # present: the bank has fold rows


def test_what_the_folds_cost_is_summed_over_the_sources_by_hand(world, tmp_path):
    """Two sources with 4 folds (3 passes each) and one whose part has no fold stats: 6 passes,
    0.5 + 2.5 = 3.0 s of 10 + 30 = 40 s (7.5%, over the 5% note); micro-batches 5 + 7 = 12
    calls over 300 + 500 = 800 padded tokens, one fold's 3 + 5 = 8 over 280 + 420 = 700
    (+4 calls, +14.3%)."""
    from merit_lab.pipeline.folds import fold_cost, fold_cost_lines

    four = {"fold_tokens": [9, 9, 9, 9]}
    stats = {
        "a": {
            **four,
            "seconds": 10.0,
            "fold_seconds": 0.5,
            "micro_batches": {"folds": [5, 300], "one_fold": [3, 280]},
        },
        "b": {
            **four,
            "seconds": 30.0,
            "fold_seconds": 2.5,
            "micro_batches": {"folds": [7, 500], "one_fold": [5, 420]},
        },
        "c": {"seconds": 99.0},
    }
    cost = fold_cost(stats)
    assert cost == {
        "sources": 2,
        "seconds": 40.0,
        "fold_seconds": 3.0,
        "passes": 6,
        "folds": [12, 800],
        "one_fold": [8, 700],
    }
    root = write_run(tmp_path / "run", world.stab, world)
    write_bank_stats(root, stats)
    assert fold_cost_lines(root) == [
        "  fold cost: sketch passes 7.5% of the gradient stage (3.0 of 40.0 s); micro-batches "
        "12 calls, 800 padded tokens (one fold: 8, 700)"
    ]
    text = " ".join(fold_stability_section(root))
    assert "The 6 extra sketch passes of the fold rows (m − 1 for each of 2 sources) took " in text
    assert "took 3.0 s of the " in text
    assert "sources' 40.0 s in the gradient stage (7.5%). A pass reads every" in text
    assert "ran 12 forward/backward calls over 800 padded tokens, where one fold would " in text
    assert "have run 8 over 700 (+4 calls, +14.3% padded tokens)" in text
    # under 5%, no note; a source without the micro-batches' counts (a part from before they
    # were kept): the passes alone
    stats["b"] |= {"fold_seconds": 0.5}
    del stats["a"]["micro_batches"]
    write_bank_stats(root, stats)
    text = " ".join(fold_stability_section(root))
    assert "took 1.0 s of the sources' 40.0 s in the gradient stage (2.5%)." in text
    assert "A pass reads" not in text and "forward/backward calls" not in text
    assert fold_cost_lines(root)[0].endswith("(1.0 of 40.0 s)")
    assert fold_cost({"c": {"seconds": 1.0}}) is None
    # a bank without fold rows says nothing of folds, whatever stats its parts carried
    (root / "gradients" / FOLDS_FILE).unlink()
    assert fold_cost_lines(root) == [] and "What the folds cost" not in " ".join(
        fold_stability_section(root)
    )
