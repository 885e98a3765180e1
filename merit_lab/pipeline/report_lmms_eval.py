"""The report's lmms-eval section and ``results.json`` record: the paper's benchmark table.

Input: the eval table (`merit_lab.evaluation.lmms_eval.run_lmms_eval` rows, split "lmms-eval",
written by the evaluate stage when ``eval.lmms_eval`` is set). Output: markdown lines (models ×
benchmarks + average, 0-100, with each task's judge) and a comparison figure; the same numbers
for ``results.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence

import pandas as pd

from merit_lab.config.fields import judged_task
from merit_lab.evaluation.lmms_eval import LMMS_EVAL_SPLIT, PAPER_BENCHMARKS, summarize_lmms_eval
from merit_lab.pipeline.markdown import markdown_table
from merit_lab.viz.plots import plot_comparison
from merit_lab.viz.style import Figure

__all__ = ["lmms_eval_lines", "lmms_eval_record"]


def _tasks(table: pd.DataFrame) -> pd.DataFrame:
    """Per task (in table order): its column title, metric, documents and judge record."""
    sub = table[(table["split"] == LMMS_EVAL_SPLIT) & (table["metric"] == "score")]
    judge = sub["judge"] if "judge" in sub else pd.Series("", index=sub.index)
    rows = []
    for task, group in sub.assign(judge=judge.fillna("")).groupby("source", sort=False):
        b = PAPER_BENCHMARKS.get(task)
        judges = sorted(set(group["judge"]) - {""})
        rows.append(
            {
                "task": task,
                "title": b.title if b else task,
                "metric": b.metric if b else "first metric",
                "n": int(group["n"].max()),
                "judged": judged_task(task) is not None,
                "judge": [json.loads(j) for j in judges],
            }
        )
    return pd.DataFrame(rows)


def lmms_eval_lines(
    table: pd.DataFrame, order: Sequence[str], figure: Callable[[Figure, str], str]
) -> list[str]:
    """``## Image-text benchmarks (lmms-eval)``: the paper's table (± stderr where lmms-eval
    gives one), the documents and judge of each task, and its bar figure; nothing without
    lmms-eval rows."""
    values, stderr = summarize_lmms_eval(table, order)
    if values.empty:
        return []
    cells = values.copy().astype(object)
    for c in values.columns:
        cells[c] = [
            ("–" if pd.isna(v) else f"{v:.1f}") + ("" if pd.isna(e) else f" ± {e:.1f}")
            for v, e in zip(values[c], stderr[c], strict=True)
        ]
    tasks = _tasks(table)
    notes = []
    for t in tasks.itertuples():
        judge = (
            ", judge "
            + "; ".join(f"`{j['model']}` ({j['api_type']}, {j['api_base']})" for j in t.judge)
            if t.judged and t.judge
            else (", no judge" if not t.judged else "")
        )
        notes.append(f"- {t.title}: `{t.task}`, {t.metric}, {t.n} documents{judge}")
    fig = plot_comparison(values, metric="score (0-100)", spread=stderr, xaxis="benchmark")
    return [
        "## Image-text benchmarks (lmms-eval)",
        "",
        "Each row's model folder scored by lmms-evaluation-harness with greedy answers, on a "
        "0-100 scale; the average is over the benchmarks (– where one has no score).",
        "",
        markdown_table(cells),
        "",
        *notes,
        "",
        figure(fig, "compare_lmms_eval"),
        "",
    ]


def lmms_eval_record(table: pd.DataFrame, order: Sequence[str]) -> dict:
    """``results.json``'s ``lmms_eval``: per model its score per benchmark and the average
    (None where missing), and per benchmark its task, metric, documents and judge; empty when
    the run has no lmms-eval rows."""
    values, _ = summarize_lmms_eval(table, order)
    if values.empty:
        return {}
    scores = {
        m: {c: (None if math.isnan(v) else float(v)) for c, v in row.items()}
        for m, row in values.iterrows()
    }
    benchmarks = {
        t.title: {"task": t.task, "metric": t.metric, "n": t.n, "judge": t.judge or None}
        for t in _tasks(table).itertuples()
    }
    return {"lmms_eval": {"scores": scores, "benchmarks": benchmarks}}
