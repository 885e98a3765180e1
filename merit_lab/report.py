"""Report stage: ``report.md`` and ``figures/`` from a run directory's artifacts.

Input: ``mixture.json``, ``conflict.json``, ``partition.json``, the branches' ``merit_branch.json``,
``merged/*/merge_manifest.json``, ``eval.parquet`` and ``timings.json``. Output: the paper-style
comparison (rows = models, columns = per-family scores and their average) and every figure the
run has, as HTML (and PNG/SVG where a static renderer exists). Every number in the report is read
from those files; nothing is recomputed here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from merit_lab.io import atomic_write_text, read_json

__all__ = [
    "markdown_table",
    "plot_comparison",
    "plot_training_curves",
    "training_logs",
    "write_report",
]

log = logging.getLogger(__name__)

METRICS = {  # metric -> (title, unit, higher is better)
    "exact_match": ("Exact match of greedy answers", "%", True),
    "similarity": ("Character similarity of greedy answers", "%", True),
    "loss": ("Held-out loss", "nats per response token", False),
}


def markdown_table(
    df: pd.DataFrame, *, fmt: str = "{:.2f}", bold: str | None = None, index: bool = True
) -> str:
    """A GitHub-markdown table; ``bold="max"``/``"min"`` marks each numeric column's best value."""
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


def plot_comparison(wide: pd.DataFrame, *, metric: str) -> go.Figure:
    """Grouped bars: one group per family (and the average), one bar per model."""
    from merit_lab.plots import _layout, color_map

    title, unit, higher = METRICS.get(metric, (metric, "", True))
    colors = color_map(list(wide.index))
    fig = go.Figure()
    for model, row in wide.iterrows():
        fig.add_bar(
            name=str(model),
            x=[str(c) for c in wide.columns],
            y=row.to_numpy(dtype=float),
            marker_color=colors[model],
            hovertemplate=f"{model}<br>%{{x}}: %{{y:.3f}} {unit}<extra></extra>",
        )
    better = "higher is better" if higher else "lower is better"
    fig.update_layout(barmode="group", yaxis_title=f"{unit} ({better})", xaxis_title="family")
    if not higher:  # losses: zoom on the differences, not the distance from zero
        lo, hi = np.nanmin(wide.to_numpy()), np.nanmax(wide.to_numpy())
        fig.update_yaxes(range=[lo - 0.1 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9)])
    return _layout(fig, title)


def plot_training_curves(logs: dict[str, list[dict]], *, smooth: int = 10) -> go.Figure:
    """Training loss against tokens seen, one line per branch/joint run (moving average)."""
    from merit_lab.plots import _layout, color_map

    colors = color_map(list(logs))
    fig = go.Figure()
    for name, rows in logs.items():
        if not rows:
            continue
        loss = pd.Series([r["loss"] for r in rows]).rolling(smooth, min_periods=1).mean()
        fig.add_scatter(
            x=[r["tokens"] for r in rows],
            y=loss,
            mode="lines",
            name=name,
            line={"color": colors[name], "width": 1.5},
            hovertemplate=f"{name}<br>tokens %{{x}}<br>loss %{{y:.3f}}<extra></extra>",
        )
    fig.update_layout(xaxis_title="tokens trained", yaxis_title="training loss (moving average)")
    return _layout(fig, "Branch and joint training")


def _figure_link(path: Path, run_root: Path) -> str:
    rel = path.relative_to(run_root)
    png = path.with_suffix(".png")
    if png.exists():
        return f"![{path.stem}]({png.relative_to(run_root)})  \n[interactive]({rel})"
    return f"[{path.stem} (interactive HTML)]({rel})"


def _save(fig: go.Figure, stem: Path, formats: Sequence[str] = ()) -> Path:
    from merit_lab.plots import save_figure

    save_figure(fig, stem, formats=formats)
    return stem.with_suffix(".html")


def training_logs(run_dir: str | Path) -> dict[str, list[dict]]:
    """Every joint run's and branch's ``log.jsonl``, keyed by its folder relative to the run."""
    from merit_lab.train import _read_log

    root = Path(run_dir)
    found = sorted(root.glob("joint/*/log.jsonl")) + sorted(root.glob("branches/*/*/log.jsonl"))
    return {str(p.parent.relative_to(root)): _read_log(p) for p in found}


def write_report(run_dir: str | Path, *, order: Sequence[str] | None = None) -> Path:
    """Write ``report.md`` and ``figures/`` (HTML) for a run whose evaluate stage is done.

    Static images are left to `merit_lab.figures.write_figures` (one browser for all of them):
    exporting each here would start a browser per image.

    Args:
        run_dir: ``runs/<name>``.
        order: row order of the tables (default: the order models were evaluated in).

    Returns:
        The report's path.
    """
    from merit_lab.conflict import ConflictSpace
    from merit_lab.evaluate import summarize_eval
    from merit_lab.pipeline import RunDir, load_source_table
    from merit_lab.plots import (
        plot_conflict_heatmap,
        plot_conflict_scatter,
        plot_explained_variance,
    )

    run = RunDir(Path(run_dir))
    cfg = run.load_config()
    table = pd.read_parquet(run.eval)
    order = list(order or dict.fromkeys(table["model"]))
    figs = run.root / "figures"
    mix = read_json(run.mixture)
    n_ex = sum(s["n_train"] for s in mix["sources"])
    n_tok = sum(s["train_tokens"] for s in mix["sources"])
    out = [
        f"# MERIT run `{cfg.name}`",
        "",
        f"- base model θ0: `{cfg.model}`; mixture `{cfg.mixture.path}`: "
        f"{len(mix['sources'])} sources, {n_ex} train examples, {n_tok} train tokens",
        f"- training (shared by every branch and baseline): lr {cfg.train.lr:g}, batch "
        f"{cfg.train.batch_size}×{cfg.train.grad_accum}, {cfg.train.lr_scheduler} schedule, "
        f"warm-up {cfg.train.warmup_ratio:g}, max length {cfg.train.max_length}, "
        f"seed {cfg.train.seed}, device `{cfg.device}`, dtype `{cfg.dtype}`",
        "- every number below is read from this run's files "
        "(`eval.parquet`, `merged/*/merge_manifest.json`, `branches/*/*/final/merit_branch.json`, "
        "`timings.json`)",
        "",
    ]
    sub_n = table[table["split"] == "eval"].groupby("model")["n"].sum()
    if sub_n.nunique() != 1:
        raise ValueError(f"models were scored on different held-out sets: {sub_n.to_dict()}")
    out.append(
        f"Every model is scored on the same held-out examples: {int(sub_n.iloc[0])} per metric "
        f"({table[table['split'] == 'eval'].groupby('model')['source'].nunique().iloc[0]} "
        "sources). Family columns average the family's sources; `avg` averages the families.\n"
    )
    for metric, (title, unit, higher) in METRICS.items():
        if not (table["metric"] == metric).any():
            continue
        wide = summarize_eval(table, metric=metric, order=order)
        out += [
            f"## {title} ({unit}, {'higher' if higher else 'lower'} is better)",
            "",
            markdown_table(wide, fmt="{:.1f}" if unit == "%" else "{:.4f}",
                           bold="max" if higher else "min"),
            "",
            _figure_link(_save(plot_comparison(wide, metric=metric), figs / f"compare_{metric}"),
                         run.root),
            "",
        ]  # fmt: skip
    if (table["split"] == "train").any():
        tr = summarize_eval(table, metric="loss", split="train", order=order)["avg"]
        ev = summarize_eval(table, metric="loss", split="eval", order=order)["avg"]
        gap = pd.DataFrame({"train loss": tr, "held-out loss": ev, "gap": ev - tr})
        out += ["## Train vs held-out loss (family average)", "", markdown_table(gap, fmt="{:.4f}"),
                ""]  # fmt: skip
    out += _budget_section(cfg)
    from merit_lab.diagnose import diagnostics_section

    out += diagnostics_section(run.root, image_formats=())
    space = ConflictSpace.load(run.conflict)
    src = load_source_table(run.root)
    ev = ", ".join(f"PC{i + 1} {v:.1%}" for i, v in enumerate(space.explained_variance_ratio[:5]))
    out += [
        "## Conflict space",
        "",
        f"Explained variance of the normalised source gradients: {ev}.",
        "",
        _figure_link(_save(plot_conflict_heatmap(space, src), figs / "conflict_heatmap"), run.root),
        "",
        _figure_link(
            _save(plot_conflict_scatter(space, src, color="group"), figs / "conflict_scatter"),
            run.root,
        ),
        "",
        _figure_link(_save(plot_explained_variance(space), figs / "explained_variance"), run.root),
        "",
    ]
    logs = training_logs(run.root)
    if logs:
        fig = plot_training_curves(logs)
        out += ["## Training", "", _figure_link(_save(fig, figs / "training"), run.root), ""]
    if run.timings.exists():
        t = read_json(run.timings)
        times = pd.DataFrame({"seconds": pd.Series(t, dtype=float)})
        times.index.name = "stage"
        times.loc["total"] = times["seconds"].sum()
        out += ["## Wall time per stage (last run that did the work)", "",
                markdown_table(times, fmt="{:.1f}"), ""]  # fmt: skip
    out += [
        "Figures are interactive HTML in `figures/` (a PNG shows inline where one exists). "
        f"`merit-lab figures {run.root} --out figures/` writes every figure as HTML, PNG and SVG "
        "in the paper style.",
        "",
    ]
    text = "\n".join(out)
    atomic_write_text(run.report, text)
    return run.report


def _budget_section(cfg) -> list[str]:
    from merit_lab.experiments import model_rows, token_budget

    budget = token_budget(cfg)
    if budget.empty:
        return []
    weights = {}
    for row in model_rows(cfg):
        manifest = row.model_dir / "merge_manifest.json"
        if row.inputs and manifest.is_file():
            w = read_json(manifest)["weights"]
            weights[row.label] = ", ".join(f"{x:.3f}" for x in w) if w else "uniform"
    budget = budget.set_index("model")
    budget["merge weights"] = [weights.get(m, "") for m in budget.index]
    budget["branch_tokens"] = [json.dumps(v) for v in budget["branch_tokens"]]
    budget = budget.rename(columns={"branch_tokens": "tokens per branch"})
    return [
        "## Token budget and merge weights",
        "",
        "Split rows train every source once across their branches, the same tokens as the joint "
        "run of the same epochs; linear merges weight branch k by w_k = N_k / Σ_j N_j.",
        "",
        markdown_table(budget, fmt="{:.0f}"),
        "",
    ]
