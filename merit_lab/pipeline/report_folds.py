"""The report's "Split stability (calibration folds)" section: how far the conflict matrix and
the split would move under another calibration draw, read from the fold rows every run keeps.

Input: a run directory (``fold_stability.json``, ``partition.json``, ``config.yaml``). Output:
markdown lines for ``report.md`` and the fold figures (`fold_figures`), built by `merit_lab.viz`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from merit_lab.partition.folds import FOLD_AGREEMENT_TARGET, FoldStability
from merit_lab.pipeline.folds import FOLD_STABILITY_FILE, load_fold_stability, read_fold_cost
from merit_lab.pipeline.markdown import markdown_table
from merit_lab.pipeline.rundir import RunDir
from merit_lab.viz.plots_stability import (
    FLIP_THRESHOLD,
    plot_fold_agreement,
    plot_fold_cosine,
    plot_fold_flips,
)
from merit_lab.viz.style import Figure

__all__ = [
    "FOLD_FIGURES",
    "FOLD_HEADING",
    "fold_cost_paragraph",
    "fold_figures",
    "fold_stability_section",
    "fold_summary_table",
    "uncertain_pairs_table",
    "unstable_sources_table",
]

FOLD_HEADING = "## Split stability (calibration folds)"
# The figures of the section, by file stem (also `merit-lab figures`' stems for them).
FOLD_FIGURES = ("fold_cosine", "fold_agreement", "fold_flips")
# Above this share of the stage, the paragraph says why the passes cost that much at this n.
PASSES_SHARE_NOTE = 0.05


def fold_cost_paragraph(cost: dict) -> list[str]:
    """What the folds cost this run's gradient stage (`merit_lab.pipeline.folds.fold_cost`),
    as the report says it: the sketch passes' time and share, and the micro-batches with folds
    beside one fold's."""
    share = cost["fold_seconds"] / cost["seconds"] if cost["seconds"] else float("nan")
    text = (
        f"**What the folds cost this run.** The {cost['passes']} extra sketch passes of the "
        f"fold rows (m − 1 for each of {cost['sources']} sources) took "
        f"{cost['fold_seconds']:.1f} s of the sources' {cost['seconds']:.1f} s in the gradient "
        f"stage ({share:.1%})."
    )
    if share > PASSES_SHARE_NOTE:
        text += (
            " A pass reads every gradient coordinate whatever the source's n, so their share "
            "falls as `calibration.n` grows."
        )
    if "folds" in cost:
        (c, p), (c1, p1) = cost["folds"], cost["one_fold"]
        text += (
            " A micro-batch cannot span two folds: formed within folds, the micro-batches ran "
            f"{c:,} forward/backward calls over {p:,} padded tokens, where one fold would have "
            f"run {c1:,} over {p1:,} ({c - c1:+,} calls, {p / p1 - 1:+.1%} padded tokens). "
            "That time is inside the stage's and one run cannot time it apart; "
            "`docs/performance.md` (fold sketches) has the stage timed with folds and without."
        )
    return [text, ""]


def fold_figures(stab: FoldStability) -> dict[str, Figure]:
    """The section's figures by stem: the cosine matrix with each standard error, the agreement
    of two draws per r against n, and each source's probability of changing group."""
    builders = (plot_fold_cosine, plot_fold_agreement, plot_fold_flips)
    return {stem: build(stab) for stem, build in zip(FOLD_FIGURES, builders, strict=True)}


def fold_summary_table(stab: FoldStability) -> pd.DataFrame:
    """One row per r (``r = 2 (K = 4)``): the halves' median ARI, its range and mean, the
    simulation at the halves' size (read it against their mean), the agreement expected between
    two draws of the run's n, and the n that reaches the target."""
    summary = stab.summary()
    half = f"halves (n = {stab.n / 2:.0f})"
    out = pd.DataFrame(
        {
            f"ARI of {half}, median": summary["ari_half_median"],
            "min": summary["ari_half_min"],
            "max": summary["ari_half_max"],
            "mean": summary["ari_half_mean"],
            f"simulated at n = {stab.n / 2:.0f}": summary["ari_at_half"],
            f"ARI of two draws of n = {stab.n:.0f}": summary["ari_at_n"],
            f"n for ARI {FOLD_AGREEMENT_TARGET}": [
                "–" if v is None or pd.isna(v) else f"{int(v)}" for v in summary["n_for_target"]
            ],
        }
    )
    out.index = [f"r = {r} (K = {2**r})" for r in summary.index]
    out.index.name = "split"
    return out


def uncertain_pairs_table(stab: FoldStability, top: int = 5) -> pd.DataFrame:
    """The ``top`` source pairs whose cosine has the largest fold standard error."""
    i, j = np.triu_indices(len(stab.names), k=1)
    se = stab.cosine_se[i, j]
    pick = np.argsort(-se, kind="stable")[:top]
    return pd.DataFrame(
        {
            "cosine": stab.cosine[i[pick], j[pick]],
            "standard error": se[pick],
        },
        index=pd.Index([f"{stab.names[i[p]]} · {stab.names[j[p]]}" for p in pick], name="pair"),
    )


def unstable_sources_table(stab: FoldStability, r: int = 2, top: int = 10) -> pd.DataFrame:
    """The ``top`` sources most likely to change group between two halves (those at or above
    `FLIP_THRESHOLD` at some r), one column per r, ordered by their probability at ``r`` (the
    run's split), then at any r; empty when none is."""
    flips = pd.DataFrame(
        {f"r = {rr}": stab.flip[rr] for rr in stab.rs}, index=pd.Index(stab.names, name="source")
    )
    if flips.empty:
        return flips
    key = pd.DataFrame(
        {
            "at_r": flips.get(f"r = {r}", pd.Series(0.0, index=flips.index)),
            "worst": flips.max(axis=1),
        }
    )
    key = key[key["worst"] >= FLIP_THRESHOLD]
    keep = key.sort_values(["at_r", "worst"], ascending=False, kind="stable").index
    return flips.loc[keep[:top]]


def fold_stability_section(
    run_dir: str | Path, figure: Callable[[Figure, str], str] | None = None
) -> list[str]:
    """The report's "Split stability (calibration folds)" section; ``figure(fig, stem)`` saves a
    figure and returns its link. Before the conflict stage: nothing; a run without fold rows
    gets one line saying why and how to have them."""
    run = RunDir(Path(run_dir))
    stab = load_fold_stability(run.root)
    if stab is None:
        if not run.conflict.is_file():
            return []
        return [FOLD_HEADING, "", _why_none(run), ""]
    run_r = _run_r(run)
    lines = [
        FOLD_HEADING,
        "",
        f"The gradient stage keeps {stab.folds} fold sketches per source (the calibration "
        "examples dealt into folds; their weighted mean is the bank), so every run measures how "
        "far another calibration draw would move the matrix and the split, with no new "
        f"gradient. Two disjoint halves of the folds are two independent draws of "
        f"n/2 = {stab.n / 2:.0f} examples per source; the agreement at other n is simulated "
        f"from the folds (`{FOLD_STABILITY_FILE}`). A split is stable when two draws of the "
        f"run's n agree at ARI ≥ {FOLD_AGREEMENT_TARGET}"
        + (f"; this run splits at r = {run_r}." if run_r is not None else "."),
        "",
    ]
    cfg = run.load_config() if run.config.is_file() else None
    if cfg is not None and cfg.calibration.fold_deal == "batches":
        lines += [
            "The folds are whole micro-batches of length neighbours (`calibration.fold_deal: "
            "batches`), so the halves are clustered draws: where a source's gradient changes "
            "with its examples' length they differ more than two draws of single examples, and "
            "the figures below read conservative (each cosine's standard error 1.25× the "
            "by-example one on the demo and 1.51× on SmolLM2, `benchmarks/bench_fold_deal.py`).",
            "",
        ]
    described = stab.describe(2)
    if run_r is not None and run_r != 2 and stab.warning(run_r):
        described.append(f"WARNING: {stab.warning(run_r)}")
    lines += [f"**{x}**  " if x.startswith("WARNING") else f"{x}  " for x in described]
    lines += ["", markdown_table(fold_summary_table(stab), fmt="{:.2f}"), ""]
    lines += [
        "Least certain cosines (delete-one-fold jackknife standard error):",
        "",
        markdown_table(
            uncertain_pairs_table(stab).transform(
                {"cosine": "{:+.3f}".format, "standard error": "{:.3f}".format}
            )
        ),
        "",
    ]
    flips = unstable_sources_table(stab, run_r if run_r is not None else 2)
    if flips.empty:
        lines += [
            f"No source changes group in {FLIP_THRESHOLD:.0%} or more of the halves pairings.",
            "",
        ]
    else:
        lines += [
            "Sources that change group between halves (share of pairings; the explorer marks "
            "them in the scatter and the editor flags them before a move):",
            "",
            markdown_table(flips, fmt="{:.0%}"),
            "",
        ]
    if figure is not None:
        lines += [figure(fig, stem) for stem, fig in fold_figures(stab).items()] + [""]
    cost = read_fold_cost(run.root)
    return lines + (fold_cost_paragraph(cost) if cost is not None else [])


def _run_r(run: RunDir) -> int | None:
    """The run's split depth r (``partition.json``'s params), or None."""
    if not run.partition.is_file():
        return None
    r = run.load_partition().params.get("r")
    return int(r) if r is not None else None


def _why_none(run: RunDir) -> str:
    cfg = run.load_config() if run.config.is_file() else None
    if cfg is not None and cfg.calibration.folds < 2:
        why = "`calibration.folds` is 1 (folds off)"
    elif cfg is not None and cfg.partition.layer_group:
        why = "the split is made on one layer group's rows, which the fold rows do not describe"
    else:
        why = "the gradient bank has no fold rows (a bank made before folds)"
    return (
        f"Not measured for this run: {why}. With `calibration.folds: 4` (the default) the "
        "gradient stage keeps fold sketches at no extra gradient cost and the conflict stage "
        f"writes `{FOLD_STABILITY_FILE}`; the split's stability is otherwise unknown."
    )
