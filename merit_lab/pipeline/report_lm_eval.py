"""The report's lm-eval section: the ``split == "lm-eval"`` rows of ``eval.parquet``.

Input: the eval table (`merit_lab.evaluation.lm_eval.run_lm_eval` rows, written by the evaluate
stage when ``eval.lm_eval`` is set). Output: markdown lines and a comparison figure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd

from merit_lab.evaluation.lm_eval import summarize_lm_eval
from merit_lab.pipeline.markdown import markdown_table
from merit_lab.viz.plots import plot_comparison
from merit_lab.viz.style import Figure

__all__ = ["lm_eval_lines"]


def lm_eval_lines(
    table: pd.DataFrame, order: Sequence[str], figure: Callable[[Figure, str], str]
) -> list[str]:
    """``## lm-eval`` with a models × "<task> <metric>" table (± stderr) and its bar figure;
    nothing when the run has no lm-eval rows."""
    values, stderr = summarize_lm_eval(table, order)
    if values.empty:
        return []
    n = table[table["split"] == "lm-eval"].groupby("source")["n"].max()
    cells = values.copy().astype(object)
    for c in values.columns:
        cells[c] = [
            f"{v:.3f}" + ("" if pd.isna(e) else f" ± {e:.3f}")
            for v, e in zip(values[c], stderr[c], strict=True)
        ]
    docs = ", ".join(f"{t}: {int(k)}" for t, k in n.items())
    fig = plot_comparison(values, metric="lm-eval score", spread=stderr, xaxis="task and metric")
    return [
        "## lm-eval (lm-evaluation-harness)",
        "",
        f"Each row's model folder scored by lm-evaluation-harness (± its standard error); "
        f"documents per task: {docs}.",
        "",
        markdown_table(cells),
        "",
        figure(fig, "compare_lm_eval"),
        "",
    ]
