"""Paper figures: every figure a run has, in one publication style, as HTML, PNG and SVG.

Input: a run directory (``conflict.json``, ``mixture.json``, ``partition.json``; ``eval.parquet``,
training logs, ``diagnostics/`` and ``convergence.parquet`` when present). Output:
``<out_dir>/<stem>.{html,png,svg}`` and ``captions.md`` (each figure's title, for its caption).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from merit_lab.plots import PALETTE, static_renderer_problem

__all__ = [
    "CONVERGENCE_FILE",
    "PAPER",
    "PaperStyle",
    "collect_figures",
    "paper_layout",
    "write_figures",
]

log = logging.getLogger(__name__)

CONVERGENCE_FILE = "convergence.parquet"  # a run's gradient_convergence table (notebook 04)
STATIC_FORMATS = ("png", "svg", "pdf")
# Figures that need the full page width: many tick labels, 3-D scenes, many grouped bars.
_WIDE = ("conflict_clustermap", "conflict_heatmap", "conflict_scatter_3d", "compare_", "diag_disp")


@dataclass(frozen=True)
class PaperStyle:
    """The one place the look of exported figures is set (sizes in CSS px, 96 per inch)."""

    font_family: str = "Arial, Helvetica, Liberation Sans, sans-serif"
    font_size: int = 10  # 7.5 pt printed at the figure's own width
    column_width: int = 336  # 3.5 in: one column of a two-column paper
    page_width: int = 696  # 7.25 in: a figure* across both columns
    max_height: int = 720
    scale: float = 3.0  # PNG pixels per px: about 290 dpi at print size
    show_title: bool = False  # a paper's caption carries the title; captions.md keeps them


PAPER = PaperStyle()


def paper_layout(fig: go.Figure, *, wide: bool = False, style: PaperStyle = PAPER) -> go.Figure:
    """A copy of ``fig`` in the paper style: white background, one font, the palette, sized for a
    column (or the page with ``wide``) at the figure's own aspect ratio. Data are untouched."""
    out = go.Figure(fig)
    layout = fig.layout
    width = style.page_width if wide else style.column_width
    w0, h0 = layout.width or 700, layout.height or 450
    height = min(style.max_height, round(h0 * width / w0))
    title = layout.title.text if style.show_title else None
    out.update_layout(
        template="simple_white",
        font={"family": style.font_family, "size": style.font_size, "color": "black"},
        title={"text": title, "x": 0.5, "font": {"size": style.font_size + 1}},
        colorway=list(PALETTE),
        paper_bgcolor="white",
        plot_bgcolor="white",
        width=width,
        height=height,
        margin={"l": 10, "r": 10, "t": 30 if title else 10, "b": 10, "autoexpand": True},
        # above the plot, left-aligned: at column width a legend on the right halves the plot
        legend={"font": {"size": style.font_size - 1}, "orientation": "h", "x": 0,
                "xanchor": "left", "y": 1.0, "yanchor": "bottom", "bgcolor": "rgba(0,0,0,0)"},
    )  # fmt: skip
    out.update_xaxes(automargin=True, title_standoff=4)
    out.update_yaxes(automargin=True, title_standoff=4)
    if any(t.type == "scatter3d" for t in out.data):  # the default camera crops the axis titles
        out.update_layout(scene_camera_eye={"x": 1.6, "y": 1.6, "z": 0.9},
                          margin={"l": 0, "r": 0, "t": 30, "b": 0})  # fmt: skip
    return out


def _eval_figures(path: Path) -> dict[str, go.Figure]:
    from merit_lab.evaluate import summarize_eval
    from merit_lab.report import METRICS, plot_comparison

    table = pd.read_parquet(path)
    order = list(dict.fromkeys(table["model"]))
    figs = {}
    for metric in [*METRICS, *sorted(set(table["metric"]) - set(METRICS))]:
        if ((table["metric"] == metric) & (table["split"] == "eval")).any():
            wide = summarize_eval(table, metric=metric, split="eval", order=order)
            figs[f"compare_{metric}"] = plot_comparison(wide, metric=metric)
    return figs


def _diagnostics_figures(run_root: Path) -> dict[str, go.Figure]:
    try:
        from merit_lab.diagnose_report import diagnostics_figures
    except ImportError as e:
        log.warning("diagnostics/ skipped: the diagnostics report module is missing (%s)", e)
        return {}
    try:
        return diagnostics_figures(run_root)
    except (KeyError, TypeError, ValueError) as e:  # one odd file must not block the rest
        log.warning("diagnostics figures skipped: %s", e)
        return {}


def collect_figures(run_dir: str | Path) -> dict[str, go.Figure]:
    """Every figure a run's artifacts allow, by file stem, in their interactive style.

    Always (once the conflict stage is done): ``conflict_clustermap``, ``conflict_heatmap``
    (``z = C[order][:, order]``), ``conflict_scatter`` and ``conflict_scatter_3d`` (coloured by
    group, or by family before the partition stage) and ``explained_variance``. Then, as their
    files exist: ``compare_<metric>`` (``eval.parquet``), ``training`` (branch and joint logs),
    ``diag_*`` (``diagnostics/``) and ``gradient_convergence`` (``convergence.parquet``).
    """
    from merit_lab.conflict import ConflictSpace
    from merit_lab.pipeline import RunDir, load_source_table
    from merit_lab.plots import (
        plot_conflict_clustermap,
        plot_conflict_heatmap,
        plot_conflict_scatter,
        plot_explained_variance,
        plot_gradient_convergence,
    )
    from merit_lab.report import plot_training_curves, training_logs

    run = RunDir(Path(run_dir))
    if not run.conflict.exists():
        raise FileNotFoundError(f"{run.conflict} is missing: run the pipeline up to 'conflict'")
    space = ConflictSpace.load(run.conflict)
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
    if run.eval.exists():
        figs |= _eval_figures(run.eval)
    logs = training_logs(run.root)
    if any(logs.values()):
        figs["training"] = plot_training_curves(logs)
    if (run.root / "diagnostics").is_dir():
        figs |= _diagnostics_figures(run.root)
    if (run.root / CONVERGENCE_FILE).exists():
        figs["gradient_convergence"] = plot_gradient_convergence(
            pd.read_parquet(run.root / CONVERGENCE_FILE)
        )
    return figs


def _export_static(jobs: list[tuple[go.Figure, Path, str]], scale: float) -> list[Path]:
    """Render every (figure, path, format) with one Chromium (kaleido), not one per image."""
    import kaleido

    specs = [
        {
            "fig": fig,
            "path": str(path),
            "opts": {"format": fmt, "width": fig.layout.width, "height": fig.layout.height,
                     "scale": scale},
        }
        for fig, path, fmt in jobs
    ]  # fmt: skip
    errors = kaleido.write_fig_from_object_sync(specs, kopts={"mathjax": False}) or ()
    for e in errors:
        log.warning("static export failed: %s", e)
    missing = [p for _, p, _ in jobs if not p.exists()]
    if missing:
        log.warning("static export wrote no %s; the HTML has those figures",
                    ", ".join(p.name for p in missing))  # fmt: skip
    return [p for _, p, _ in jobs if p.exists()]


def write_figures(
    run_dir: str | Path,
    out_dir: str | Path = "figures",
    formats: Sequence[str] = ("html", "png", "svg"),
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
        The files written, figure by figure, then ``captions.md``. Without a static renderer
        (kaleido + Chromium) the images are skipped with a logged message saying what to
        install; HTML and JSON are written either way.
    """
    from plotly.offline import get_plotlyjs

    from merit_lab.io import atomic_write_text

    unknown = sorted(set(formats) - {"html", "json", *STATIC_FORMATS})
    if unknown:
        raise ValueError(f"unknown formats {unknown}; expected html, json, png, svg or pdf")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = collect_figures(run_dir)
    figs = {
        stem: paper_layout(fig, wide=stem.startswith(_WIDE), style=style)
        for stem, fig in raw.items()
    }
    written: list[Path] = []
    if "html" in formats and not (out / "plotly.min.js").exists():
        written.append(atomic_write_text(out / "plotly.min.js", get_plotlyjs()))
    for stem, fig in figs.items():
        if "html" in formats:
            html = fig.to_html(include_plotlyjs="directory", config={"toImageButtonOptions": {
                "format": "svg", "filename": stem}})  # fmt: skip
            written.append(atomic_write_text(out / f"{stem}.html", html))
        if "json" in formats:
            written.append(atomic_write_text(out / f"{stem}.json", fig.to_json()))
    static = [f for f in formats if f in STATIC_FORMATS]
    if static:
        problem = static_renderer_problem()
        if problem:
            log.warning("PNG/SVG/PDF figures skipped: %s. The HTML files hold every figure.",
                        problem)  # fmt: skip
        else:
            jobs = [
                (fig, out / f"{stem}.{fmt}", fmt) for stem, fig in figs.items() for fmt in static
            ]
            for _, path, _ in jobs:
                path.unlink(missing_ok=True)  # so a failed render cannot leave a stale file
            written += _export_static(jobs, style.scale)
    captions = [f"- `{stem}`: {fig.layout.title.text or ''}" for stem, fig in raw.items()]
    written.append(atomic_write_text(out / "captions.md", "\n".join(captions) + "\n"))
    log.info("wrote %d figure files to %s", len(written), out)
    return written
