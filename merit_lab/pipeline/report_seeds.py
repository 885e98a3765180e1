"""Report sections on training seeds and answer style: mean and spread per row, and how much of
θ0's behaviour each row keeps.

Input: ``eval.parquet`` (every seed's copy of a row is its own model label, ``<row>@s<seed>``)
and the run's `ModelRow` list. Output: markdown lines (and figure links) for ``report.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from merit_lab.evaluation.evaluate import PERCENT_METRICS, relative_to, seed_spread, summarize_eval
from merit_lab.evaluation.heldout import HELDOUT_SPLIT
from merit_lab.pipeline.markdown import markdown_table
from merit_lab.pipeline.rows import THETA0, ModelRow

__all__ = [
    "SEED_METRICS",
    "family_style",
    "heldout_record",
    "noise_calls",
    "seed_tables",
    "seeds_lines",
    "seeds_record",
    "style_lines",
]

# metric -> (title, higher is better), in report order
SEED_METRICS = {
    "loss": ("Held-out loss", False),
    "exact_match": ("Exact match (%)", True),
    "similarity": ("Character similarity (%)", True),
    "in_style": ("Answers in their source's style (%)", True),
}
FigureLink = Callable[..., str]  # (figure, stem) -> markdown link


def seed_tables(
    table: pd.DataFrame, rows: Sequence[ModelRow], metric: str, split: str = "eval"
) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    """(mean, std, seeds) of `summarize_eval(metric, split)` over each row's training seeds."""
    order = [r.label for r in rows]
    wide = summarize_eval(table, metric=metric, split=split, order=order)
    return seed_spread(wide, {r.label: r.base or r.label for r in rows})


def noise_calls(
    mean: pd.Series, std: pd.Series, reference: str, *, higher: bool
) -> list[tuple[str, float, float, str]]:
    """Each row against ``reference``: (row, difference of means, pooled spread, verdict).

    The pooled spread is sqrt(std_row² + std_reference²) of the per-seed averages; a difference
    smaller than it is "within the spread" (not distinguishable at these seeds), otherwise
    "better" or "worse" (by ``higher``)."""
    out = []
    for row in mean.index:
        if row in (reference, THETA0):
            continue
        diff = float(mean[row] - mean[reference])
        spread = float(np.hypot(std.get(row, np.nan), std.get(reference, np.nan)))
        if not np.isfinite(spread) or abs(diff) <= spread:
            verdict = "within the spread"
        else:
            verdict = "better" if (diff > 0) == higher else "worse"
        out.append((row, diff, spread, verdict))
    return out


def _reference(rows: Sequence[ModelRow]) -> str | None:
    """The comparison's reference row: the first joint row (the same token budget)."""
    return next((r.base for r in rows if r.kind == "joint"), None)


def seeds_lines(table: pd.DataFrame, rows: Sequence[ModelRow], figure: FigureLink) -> list[str]:
    """The seeds section: per metric, mean ± spread per row, a figure, and the noise calls."""
    repeats = [r for r in rows if r.repeat]
    if not repeats:
        return []
    seeds = sorted({r.seed for r in rows if r.seed is not None and r.kind != "soup"})
    ref = _reference(rows)
    out = [
        "## Training seeds",
        "",
        f"Every joint and split row was trained under {len(seeds)} seeds ({seeds}: the data "
        "order and initialisation of each branch; the partition is the same), merged and "
        "evaluated on the same held-out examples. Cells are the mean over seeds ± the sample "
        "standard deviation of the per-seed family averages; θ0 and soups are not repeated.",
        "",
    ]
    for metric, (title, higher) in SEED_METRICS.items():
        if not ((table["metric"] == metric) & (table["split"] == "eval")).any():
            continue
        mean, std, n = seed_tables(table, rows, metric)
        cells = mean.copy().astype(object)
        fmt = "{:.1f}" if metric in PERCENT_METRICS else "{:.4f}"
        for col in mean.columns:
            cells[col] = [
                fmt.format(m) + ("" if not np.isfinite(s) else " ± " + fmt.format(s))
                for m, s in zip(mean[col], std[col], strict=True)
            ]
        cells["seeds"] = n.astype(int)
        out += [f"### {title}", "", markdown_table(cells), ""]
        if metric in ("loss", "in_style"):
            out += [figure(mean, std, metric), ""]
        if ref is not None and ref in mean.index:
            calls = noise_calls(mean["avg"], std["avg"], ref, higher=higher)
            within = [r for r, _, _, v in calls if v == "within the spread"]
            beyond = [
                f"{r} ({v}, {d:+.3g} vs a spread of {s:.2g})"
                for r, d, s, v in calls
                if v != "within the spread"
            ]
            out += [
                f"Against {ref} (average over families): "
                + (f"within the spread: {', '.join(within)}. " if within else "")
                + (f"Beyond it: {'; '.join(beyond)}." if beyond else "No row differs beyond it."),
                "",
            ]
    return out


def family_style(table: pd.DataFrame, rows: Sequence[ModelRow], family: str) -> pd.DataFrame:
    """One family's style metrics per row over training seeds: mean and std of the in-style
    share (%), the length ratio and the similarity (%), and the number of seeds."""
    cols = {}
    for metric in ("in_style", "length_ratio", "similarity"):
        mean, std, n = seed_tables(table, rows, metric)
        if family not in mean.columns:
            raise ValueError(f"no family {family!r}; families: {list(mean.columns[:-1])}")
        cols[metric], cols[f"{metric} std"] = mean[family], std[family]
    out = pd.DataFrame(cols)
    out["seeds"] = n.astype(int)
    return out


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None  # JSON has no NaN: one seed has no spread


def seeds_record(table: pd.DataFrame, rows: Sequence[ModelRow]) -> dict:
    """For ``results.json`` when rows were repeated under ``train.seeds``: per metric and row,
    the mean, standard deviation and number of seeds of the family average (empty otherwise)."""
    if not any(r.repeat for r in rows):
        return {}
    out = {}
    for metric in SEED_METRICS:
        if ((table["metric"] == metric) & (table["split"] == "eval")).any():
            mean, std, n = seed_tables(table, rows, metric)
            out[metric] = {
                row: {
                    "mean": float(mean.at[row, "avg"]),
                    "std": _finite(std.at[row, "avg"]),
                    "seeds": int(n[row]),
                }
                for row in mean.index
            }
    return {"seeds": out}


def _style_tables(table: pd.DataFrame, rows: Sequence[ModelRow], split: str) -> list[str]:
    """In-style share and length ratio per family, and each row relative to θ0, on one split."""
    tables = {
        m: seed_tables(table, rows, m, split)[0] for m in ("in_style", "length_ratio", "similarity")
    }
    rel = pd.DataFrame(
        {
            "similarity vs θ0 (%)": relative_to(tables["similarity"])["avg"],
            "in-style vs θ0 (%)": relative_to(tables["in_style"])["avg"],
        }
    )
    return [
        "In-style answers (%):",
        "",
        markdown_table(tables["in_style"], fmt="{:.1f}", bold="max"),
        "",
        "Answer length / reference length:",
        "",
        markdown_table(tables["length_ratio"], fmt="{:.2f}"),
        "",
        "Relative to θ0:",
        "",
        markdown_table(rel, fmt="{:.1f}", bold="max"),
        "",
    ]


def _has(table: pd.DataFrame, metric: str, split: str) -> bool:
    return bool(((table["metric"] == metric) & (table["split"] == split)).any())


def style_lines(table: pd.DataFrame, rows: Sequence[ModelRow]) -> list[str]:
    """The style section: in-style share and length ratio per family, and each row relative to
    θ0 (similarity and in-style share), averaged over training seeds when there are several;
    the evaluation-only families (``eval.heldout``) in a table of their own."""
    if not (table["metric"] == "in_style").any():
        return []
    several = any(r.repeat for r in rows)
    out = [
        "## Answer style",
        "",
        "Does each row keep its sources' answer style? An answer is *in style* when its length "
        "(characters) is within 2× of its reference's "
        "(`merit_lab.evaluation.evaluate.style_scores`); the "
        "length ratio is answer over reference length (under 1: shorter, the direction of "
        "short-answer collapse). The last table is each row's score as a share of θ0's."
        + (" Means over training seeds." if several else ""),
        "",
    ]
    heldout = _has(table, "in_style", HELDOUT_SPLIT)
    if _has(table, "in_style", "eval"):
        if heldout:
            out += ["### Trained sources (their held-out examples)", ""]
        out += _style_tables(table, rows, "eval")
    if heldout:
        out += [
            "### Held-out families (evaluation-only: no row trains, calibrates on or splits "
            "them; `eval.heldout`)",
            "",
            *_style_tables(table, rows, HELDOUT_SPLIT),
        ]
    return out


def heldout_record(table: pd.DataFrame, order: Sequence[str]) -> dict:
    """For ``results.json`` with ``eval.heldout``: per metric, each model's average over the
    evaluation-only families and its score per family (apart from the trained ``metrics``)."""
    if not (table["split"] == HELDOUT_SPLIT).any():
        return {}
    out = {}
    for metric in dict.fromkeys(table.loc[table["split"] == HELDOUT_SPLIT, "metric"]):
        wide = summarize_eval(table, metric=metric, split=HELDOUT_SPLIT, order=order)
        out[metric] = {
            "percent": metric in PERCENT_METRICS,
            "avg": {m: _finite(v) for m, v in wide["avg"].items()},
            "families": {
                m: {f: _finite(v) for f, v in row.items() if f != "avg"}
                for m, row in wide.iterrows()
            },
        }
    families = sorted(set(table.loc[table["split"] == HELDOUT_SPLIT, "family"]))
    return {"heldout": {"families": families, "metrics": out}}
