"""Paper figures: every figure a run has, in one publication style, as HTML, PNG, SVG and PDF.

Input: a run directory (``conflict.json``, ``mixture.json``, ``partition.json``; ``eval.parquet``,
training logs, ``diagnostics/`` and ``convergence.parquet`` when present). Output:
``<out_dir>/<stem>.{html,png,svg,pdf}``, ``captions.md`` and ``contact_sheet.png`` (every PNG on
one page). The files are read here; the figures are built, styled and written by `merit_lab.viz`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from merit_lab.evaluation.evaluate import summarize_eval
from merit_lab.evaluation.lm_eval import summarize_lm_eval
from merit_lab.evaluation.lmms_eval import summarize_lmms_eval
from merit_lab.io import atomic_write_text
from merit_lab.pipeline.controls import load_controls
from merit_lab.pipeline.folds import load_fold_stability
from merit_lab.pipeline.report import training_logs
from merit_lab.pipeline.report_controls import frontier_of
from merit_lab.pipeline.report_diagnostics import diagnostics_figures
from merit_lab.pipeline.report_folds import fold_figures
from merit_lab.pipeline.report_seeds import seed_tables
from merit_lab.pipeline.rows import SNAPSHOT, model_rows
from merit_lab.pipeline.rundir import RunDir, load_source_table
from merit_lab.viz.export import FIGURE_FORMATS, make_contact_sheet, write_figure_files
from merit_lab.viz.plots import (
    METRICS,
    plot_comparison,
    plot_conflict_clustermap,
    plot_conflict_heatmap,
    plot_conflict_scatter,
    plot_explained_variance,
    plot_gradient_convergence,
    plot_training_curves,
)
from merit_lab.viz.plots_frontier import plot_frontier
from merit_lab.viz.style import PAPER, Figure, PaperStyle, paper_layout

__all__ = [
    "CONTACT_SHEET",
    "CONVERGENCE_FILE",
    "FIGURE_NAMES",
    "FIGURE_PREFIXES",
    "PAPER",
    "PaperStyle",
    "collect_figures",
    "paper_layout",
    "write_figures",
]

log = logging.getLogger(__name__)

CONTACT_SHEET = "contact_sheet.png"  # every figure's PNG tiled on one page, stems as captions
CONVERGENCE_FILE = "convergence.parquet"  # a run's gradient_convergence table (notebook 04)
# The stems `collect_figures` gives: one of these names, or a prefix followed by a metric, an
# experiment or a comparison row ("compare_loss", "diag_paths_merit-2d"); figures/README.md lists
# the demo's, and tests/test_figures_dir.py holds both to this.
FIGURE_NAMES = (
    "conflict_clustermap",
    "conflict_heatmap",
    "conflict_scatter",
    "conflict_scatter_3d",
    "explained_variance",
    "training",
    "gradient_convergence",
    "diag_displacement",
    "diag_perturbation",
    "fold_cosine",
    "fold_agreement",
    "fold_flips",
)
FIGURE_PREFIXES = ("compare_", "seeds_", "diag_paths_", "diag_spectral_")
# Figures that need the full page width: many tick labels, 3-D scenes, many grouped bars.
WIDE_STEMS = (
    "conflict_clustermap",
    "conflict_heatmap",
    "conflict_scatter_3d",
    "fold_cosine",
    "compare_",
    "diag_disp",
    "diag_paths",
    "frontier",  # a dozen point labels beside the paths overlap at column width
    "training",
)


def _conflict_figures(run: RunDir) -> dict[str, Figure]:
    space = run.load_space()
    # mixture.json may hold sources the partition does not (dropped, unplaced): the table says
    # so in `group`, and the builders draw them apart
    table = load_source_table(run.root) if run.mixture.exists() else None
    color = next((c for c in ("group", "family") if table is not None and c in table), None)
    figs = {
        "conflict_clustermap": plot_conflict_clustermap(space, table),
        "conflict_heatmap": plot_conflict_heatmap(space, table),
        "conflict_scatter": plot_conflict_scatter(space, table, color=color),
    }
    if space.n_sources >= 3:
        fig3 = plot_conflict_scatter(space, table, color=color, dims=3)
        figs["conflict_scatter_3d"] = fig3.update_layout(
            title_text=f"{fig3.layout.title.text}, PC1-3"
        )
    figs["explained_variance"] = plot_explained_variance(space)
    return figs


def _eval_figures(run: RunDir) -> dict[str, Figure]:
    """The comparison bars of the config's own seed (as the report's tables), and with
    ``train.seeds`` each row's mean over seeds with its standard deviation as error bars."""
    table = pd.read_parquet(run.eval)
    cfg = run.load_config() if run.config.is_file() else None
    rows = model_rows(cfg, controls=True) if cfg is not None else []
    repeats = {r.label for r in rows if r.repeat}
    hidden = repeats | {r.label for r in rows if r.kind == SNAPSHOT}  # snapshots: frontier only
    order = [m for m in dict.fromkeys(table["model"]) if m not in hidden]
    rows = [r for r in rows if r.kind != SNAPSHOT]
    figs = {}
    for metric in METRICS:  # the metrics with a direction; length_ratio is in the report
        if ((table["metric"] == metric) & (table["split"] == "eval")).any():
            wide = summarize_eval(table, metric=metric, split="eval", order=order)
            figs[f"compare_{metric}"] = plot_comparison(wide, metric=metric)
            if repeats:
                mean, std, _n = seed_tables(table, rows, metric)
                figs[f"seeds_{metric}"] = plot_comparison(mean, metric=metric, spread=std)
    frontier = None
    if cfg is not None:
        controls = load_controls(run.root)["controls"]
        frontier = frontier_of(table, model_rows(cfg, controls=True), cfg, controls)
    if frontier is not None:  # with controls or joint snapshots (report.md's answer style)
        f = frontier
        figs["frontier"] = plot_frontier(f.points, f.paths, y_metric=f.y_metric, y_of=f.y_of)
    values, stderr = summarize_lm_eval(table, order)  # eval.lm_eval's rows, ± their stderr
    if not values.empty:
        figs["compare_lm_eval"] = plot_comparison(
            values, metric="lm-eval score", spread=stderr, xaxis="task and metric"
        )
    values, stderr = summarize_lmms_eval(table, order)  # eval.lmms_eval's scores, 0-100
    if not values.empty:
        figs["compare_lmms_eval"] = plot_comparison(
            values, metric="score (0-100)", spread=stderr, xaxis="benchmark"
        )
    return figs


def _diagnostics_figures(run: RunDir) -> dict[str, Figure]:
    try:
        return diagnostics_figures(run.root)
    except (KeyError, TypeError, ValueError) as e:  # one odd file must not block the rest
        log.warning("diagnostics figures skipped: %s", e)
        return {}


def collect_figures(run_dir: str | Path) -> dict[str, Figure]:
    """Every figure a run's artifacts allow, by file stem, in their interactive style.

    Always (once the conflict stage is done): ``conflict_clustermap``, ``conflict_heatmap``
    (``z = C[order][:, order]``), ``conflict_scatter`` and ``conflict_scatter_3d`` (coloured by
    group, or by family before the partition stage) and ``explained_variance``. Then, as their
    files exist: ``compare_<metric>`` (``eval.parquet``), ``frontier`` (controls or joint
    snapshots), ``training`` (branch and joint logs), ``diag_*`` (``diagnostics/``),
    ``gradient_convergence`` (``convergence.parquet``) and ``fold_cosine``, ``fold_agreement``,
    ``fold_flips`` (``fold_stability.json``).
    """
    run = RunDir(Path(run_dir))
    if not run.conflict.exists():
        raise FileNotFoundError(f"{run.conflict} is missing: run the pipeline up to 'conflict'")
    figs = _conflict_figures(run)
    if run.eval.exists():
        figs |= _eval_figures(run)
    logs = training_logs(run.root)
    if any(logs.values()):
        figs["training"] = plot_training_curves(logs)
    if run.diagnostics.is_dir():
        figs |= _diagnostics_figures(run)
    if run.convergence.exists():
        figs["gradient_convergence"] = plot_gradient_convergence(pd.read_parquet(run.convergence))
    folds = load_fold_stability(run.root)  # fold_stability.json: every run with fold rows
    if folds is not None:
        figs |= fold_figures(folds)
    return figs


def write_figures(
    run_dir: str | Path,
    out_dir: str | Path = "figures",
    formats: Sequence[str] = ("html", "png", "svg", "pdf"),
    *,
    style: PaperStyle = PAPER,
) -> list[Path]:
    """Write every figure of a run in the paper style (``collect_figures``, ``paper_layout``).

    Args:
        run_dir: ``runs/<name>``.
        out_dir: the folder to write (relative paths are relative to the working directory).
        formats: any of "html" (standalone but for one shared ``plotly.min.js`` beside it),
            "json" (the figure as plotly JSON), "png", "svg", "pdf".
        style: fonts, sizes and PNG resolution.

    Returns:
        The files written, figure by figure, then ``captions.md``, then (with "png") the
        `CONTACT_SHEET` of every PNG. Every format gets the same styled figure. Without a static
        renderer (kaleido + Chromium) the images are skipped with a logged message saying what
        to install; HTML and JSON are written either way.
    """
    unknown = sorted(set(formats) - set(FIGURE_FORMATS))
    if unknown:
        raise ValueError(f"unknown formats {unknown}; expected html, json, png, svg or pdf")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = collect_figures(run_dir)
    figs = {
        stem: paper_layout(fig, wide=stem.startswith(WIDE_STEMS), style=style)
        for stem, fig in raw.items()
    }
    written = write_figure_files(figs, out, formats, scale=style.scale)
    captions = [f"- `{stem}`: {fig.layout.title.text or ''}" for stem, fig in raw.items()]
    written.append(atomic_write_text(out / "captions.md", "\n".join(captions) + "\n"))
    pngs = {stem: out / f"{stem}.png" for stem in figs if out / f"{stem}.png" in written}
    if pngs:
        written.append(make_contact_sheet(pngs, out / CONTACT_SHEET))
    log.info("wrote %d figure files to %s", len(written), out)
    return written
