"""Markdown pieces of ``report.md``: tables from DataFrames and links to a run's figures.

Input: pandas tables and figure paths inside a run directory. Output: GitHub-markdown strings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["figure_link", "markdown_section", "markdown_table"]


def markdown_table(
    df: pd.DataFrame, *, fmt: str = "{:.2f}", bold: str | None = None, index: bool = True
) -> str:
    """A GitHub-markdown table; ``bold="max"``/``"min"`` marks each numeric column's best value.

    Args:
        df: the table; floats are written with ``fmt`` (NaN as "–"), anything else with `str`.
        fmt: the format of float cells.
        bold: "max" or "min" to bold each numeric column's best value (none on a tie).
        index: whether the first column is the index.
    """
    cols = list(df.columns)
    header = ([df.index.name or ""] if index else []) + [str(c) for c in cols]
    best = {}
    if bold:
        for c in cols:
            if pd.api.types.is_numeric_dtype(df[c]) and df[c].nunique() > 1:  # a tie: no best
                best[c] = df[c].max() if bold == "max" else df[c].min()
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for idx, row in df.iterrows():
        cells = [str(idx)] if index else []
        for c in cols:
            v = row[c]
            if isinstance(v, (float, np.floating)):
                text = "–" if np.isnan(v) else fmt.format(v)
                if c in best and v == best[c]:
                    text = f"**{text}**"
            else:
                text = str(v)
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure_link(path: Path, run_root: Path) -> str:
    """A markdown link to a figure's HTML, relative to the run, with its PNG inline if one exists.

    Args:
        path: ``<run>/figures/<stem>.html``.
        run_root: the run directory (where report.md lives).
    """
    rel = path.relative_to(run_root)
    png = path.with_suffix(".png")
    if png.exists():
        return f"![{path.stem}]({png.relative_to(run_root)})  \n[interactive]({rel})"
    return f"[{path.stem} (interactive HTML)]({rel})"


def markdown_section(text: str, heading: str) -> str:
    """The ``## heading…`` section of a markdown document (its heading line starts with
    ``## heading``), up to the next ``## `` heading; raises KeyError naming the headings there."""
    lines = text.splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.startswith("## ")]
    for i in starts:
        if lines[i][3:].startswith(heading):
            end = next((j for j in starts if j > i), len(lines))
            return "\n".join(lines[i:end]).strip() + "\n"
    raise KeyError(f"no section {heading!r}; sections: {[lines[i][3:] for i in starts]}")
