"""Report stage: ``report.md`` and ``figures/*.html`` from a run directory's artifacts.

Input: ``mixture.json``, ``conflict.json``, ``partition.json``, the branches' logs and manifests,
``merged/*/merge_manifest.json``, ``controls/controls.json``, ``eval.parquet``, ``diagnostics/``
and ``timings.json``. Output:
``report.md``, one section per entry of `REPORT_SECTIONS`, in order. Every number is read from
those files; nothing is recomputed here. Figures are built by `merit_lab.viz`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from merit_lab.config.schema import RunConfig
from merit_lab.data.checks import overlap_lines
from merit_lab.evaluation.evaluate import summarize_eval
from merit_lab.io import atomic_write_json, atomic_write_text, read_json
from merit_lab.merging.stream import load_merge_manifest
from merit_lab.partition.plan import Partition
from merit_lab.pipeline.controls import load_controls
from merit_lab.pipeline.drift import drift_section
from merit_lab.pipeline.examples import stability_section
from merit_lab.pipeline.layers import layer_section
from merit_lab.pipeline.markdown import figure_link, markdown_table
from merit_lab.pipeline.report_controls import (
    Frontier,
    controls_lines,
    controls_record,
    frontier_of,
    frontier_record,
)
from merit_lab.pipeline.report_curation import curated_mixture_table, edit_log_table
from merit_lab.pipeline.report_diagnostics import diagnostics_section
from merit_lab.pipeline.report_lm_eval import lm_eval_lines
from merit_lab.pipeline.report_lmms_eval import lmms_eval_lines, lmms_eval_record
from merit_lab.pipeline.report_partition import gain_search_lines, on_demand_lines
from merit_lab.pipeline.report_seeds import heldout_record, seeds_lines, seeds_record, style_lines
from merit_lab.pipeline.rows import SNAPSHOT, ModelRow, model_rows
from merit_lab.pipeline.rundir import THROUGHPUT_KEY, RunDir, load_source_table
from merit_lab.pipeline.status import token_budget
from merit_lab.training.branch_log import read_log
from merit_lab.viz.export import save_figure
from merit_lab.viz.plots import (
    METRICS,
    plot_comparison,
    plot_conflict_heatmap,
    plot_conflict_scatter,
    plot_explained_variance,
    plot_training_curves,
)
from merit_lab.viz.plots_frontier import plot_frontier
from merit_lab.viz.style import Figure

__all__ = [
    "METRICS",
    "REPORT_SECTIONS",
    "ReportContext",
    "curated_mixture_table",
    "edit_log_table",
    "long_and_small_table",
    "markdown_table",
    "plot_comparison",
    "plot_training_curves",
    "report_section",
    "training_logs",
    "write_report",
]


@dataclass(frozen=True)
class ReportContext:
    """What every report section reads: the run, its config and its loaded tables.

    Attributes:
        run: the run directory.
        cfg: its ``config.yaml``.
        eval_table: ``eval.parquet`` (one row per model, source, split and metric).
        order: row order of the tables (model labels).
        sources: `load_source_table`: one row per source of ``mixture.json`` (the original
            mixture), with ``group`` G<k> / dropped / unplaced and ``fraction``.
        partition: the run's ``partition.json`` (None before the partition stage).
        rows: `model_rows` with the controls and snapshots (`ModelRow`).
        controls: ``controls/controls.json`` (`merit_lab.pipeline.controls.load_controls`).
        frontier: the frontier figure's data (None without controls or snapshots).
    """

    run: RunDir
    cfg: RunConfig
    eval_table: pd.DataFrame
    order: list[str]
    sources: pd.DataFrame
    partition: Partition | None
    rows: list[ModelRow]
    controls: dict
    frontier: Frontier | None

    def figure(self, fig: Figure, stem: str) -> str:
        """Save ``fig`` as ``figures/<stem>.html`` and return its markdown link."""
        path = self.run.figures / f"{stem}.html"
        save_figure(fig, path.with_suffix(""), formats=())
        return figure_link(path, self.run.root)


ReportSection = Callable[[ReportContext], list[str]]
REPORT_SECTIONS: dict[str, ReportSection] = {}  # name -> section, in report order


def report_section(name: str) -> Callable[[ReportSection], ReportSection]:
    """Register a section of ``report.md`` (sections appear in registration order)."""

    def register(fn: ReportSection) -> ReportSection:
        if name in REPORT_SECTIONS:
            raise ValueError(f"report section {name!r} is registered twice")
        REPORT_SECTIONS[name] = fn
        return fn

    return register


def write_report(run_dir: str | Path, *, order: Sequence[str] | None = None) -> Path:
    """Write ``report.md`` and ``figures/`` (HTML) for a run whose evaluate stage is done.

    Static images are left to `merit_lab.pipeline.figures.write_figures` (one browser for all
    of them): exporting each here would start a browser per image.

    Args:
        run_dir: ``runs/<name>``.
        order: row order of the tables (default: the order models were evaluated in).

    Returns:
        The report's path.
    """
    ctx = load_report_context(run_dir, order=order)
    lines = [line for section in REPORT_SECTIONS.values() for line in section(ctx)]
    atomic_write_json(ctx.run.results, results_record(ctx))
    return atomic_write_text(ctx.run.report, "\n".join(lines))


def results_record(ctx: ReportContext) -> dict:
    """``results.json``: the comparison table's numbers (per model, each metric's family
    average on the held-out split, as the report shows them), so a README or a paper can cite
    one file of one run."""
    table = ctx.eval_table
    held = table[(table["split"] == "eval") & (table["metric"] == "loss")]
    metrics = {}
    for metric, (_title, unit, higher) in METRICS.items():
        if ((table["metric"] == metric) & (table["split"] == "eval")).any():
            avg = summarize_eval(table, metric=metric, order=ctx.order)["avg"]
            metrics[metric] = {
                "unit": unit,
                "higher_is_better": higher,
                "avg": {m: float(v) for m, v in avg.items()},
            }
    return {
        "run": ctx.cfg.name,
        **_given_paths(ctx),
        "models": list(ctx.order),
        "held_out_examples_per_metric": int(held.groupby("model")["n"].sum().iloc[0]),
        "metrics": metrics,
        **heldout_record(table, ctx.order),
        **lmms_eval_record(table, ctx.order),
        **seeds_record(table, _shown(ctx)),
        **controls_record(ctx.controls),
        **frontier_record(ctx.frontier),
    }


def load_report_context(
    run_dir: str | Path, *, order: Sequence[str] | None = None
) -> ReportContext:
    """Read what the sections need once: config, ``eval.parquet``, sources and partition."""
    run = RunDir(Path(run_dir))
    table = pd.read_parquet(run.eval)
    cfg = run.load_config()
    rows, controls = model_rows(cfg, controls=True), load_controls(run.root)
    # a row's repeats under train.seeds appear in the seeds section, not the comparison tables;
    # joint snapshots only on the frontier's joint path
    hidden = {r.label for r in rows if r.repeat or r.kind == SNAPSHOT}
    return ReportContext(
        run=run,
        cfg=cfg,
        eval_table=table,
        order=[m for m in (order or dict.fromkeys(table["model"])) if m not in hidden],
        sources=load_source_table(run.root),
        partition=run.load_partition() if run.partition.exists() else None,
        rows=rows,
        controls=controls,
        frontier=frontier_of(table, rows, cfg, controls["controls"]),
    )


def training_logs(run_dir: str | Path) -> dict[str, list[dict]]:
    """Every joint run's and branch's ``log.jsonl``, keyed by its folder relative to the run."""
    run = RunDir(Path(run_dir))
    return {str(p.parent.relative_to(run.root)): read_log(p) for p in run.training_logs()}


def _given_paths(ctx: ReportContext) -> dict[str, str]:
    """θ0 and the mixture as the config names them (read from anywhere, the report is the same)."""
    given = ctx.run.config_as_given()
    return {"model": given.model, "mixture": str(given.mixture.path)}


# ---------------------------------------------------------------------------------- sections
@report_section("header")
def header_section(ctx: ReportContext) -> list[str]:
    cfg, tr = ctx.cfg, ctx.cfg.train
    src, given = ctx.sources, _given_paths(ctx)
    return [
        f"# MERIT run `{cfg.name}`",
        "",
        f"- base model θ0: `{given['model']}`; mixture `{given['mixture']}`: "
        f"{len(src)} sources, {int(src['examples'].sum())} train examples, "
        f"{int(src['tokens'].sum())} train response tokens (the size unit of the split and the "
        "merge weights)",
        f"- training (shared by every branch and baseline): lr {tr.lr:g}, batch "
        f"{tr.batch_size}×{tr.grad_accum}, {tr.lr_scheduler} schedule, "
        f"warm-up {tr.warmup_ratio:g}, max length {tr.max_length}, "
        f"seed {tr.seed}, device `{cfg.device}`, dtype `{cfg.dtype}`"
        + (
            f"; LoRA r {tr.lora_r}, alpha {tr.lora_alpha:g} (linear and uniform merges exact: "
            "θ0 + Σ w_k s_k B_k A_k)"
            if tr.lora_r
            else ""
        ),
        "- every number below is read from this run's files "
        "(`eval.parquet`, `merged/*/merge_manifest.json`, `branches/*/*/final/merit_branch.json`, "
        "`timings.json`)",
        "",
    ]


@report_section("long and small sources")
def long_and_small_section(ctx: ReportContext) -> list[str]:
    table = long_and_small_table(ctx.run.read_mixture())
    if table.empty:
        return []
    pol = ctx.run.read_mixture().get("policies", {})
    short = (table["shortfall"] != "–").any() if "shortfall" in table else False
    return [
        "## Over-long examples and small sources",
        "",
        f"Examples over `max_length` {pol.get('max_length', {})} were handled by "
        f"`mixture.long_examples: {pol.get('long_examples', '?')}` (counts per split: over-long, "
        "then what was done)"
        + (
            "; a source short of examples was let through by "
            f"`mixture.small_sources: {pol.get('small_sources', '?')}`."
            if short
            else "; no source is short of examples."
        ),
        "",
        markdown_table(table),
        "",
    ]


@report_section("mixture overlaps")
def mixture_overlaps_section(ctx: ReportContext) -> list[str]:
    # absent in runs made before the check; a clean mixture is only in mixture.json
    overlaps = ctx.run.read_mixture().get("overlaps")
    found = overlaps and (overlaps["duplicates"]["groups"] or overlaps["eval_in_train"]["n"])
    if not found and not (overlaps or {}).get("hash_list"):
        return []
    return ["## What the mixture holds twice", "", *overlap_lines(overlaps), ""]


def long_and_small_table(mixture: dict) -> pd.DataFrame:
    """The sources of a ``mixture.json`` with an over-long example or a shortfall (else empty).

    Columns: ``train``, ``calibration``, ``eval`` (e.g. ``3 (truncated_prompt 3)``: over-long
    examples of that split and what the policy did to them) and ``shortfall``.
    """

    def cell(counts: dict) -> str:
        done = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "n")
        return f"{counts.get('n', 0)} ({done})" if counts.get("n") else "0"

    rows = []
    for s in mixture["sources"]:
        long = s.get("long_examples", {})
        if any(c.get("n") for c in long.values()) or s.get("shortfall"):
            splits = {sp: cell(long.get(sp, {})) for sp in ("train", "calibration", "eval")}
            rows.append({"source": s["name"], **splits, "shortfall": s.get("shortfall") or "–"})
    return pd.DataFrame(rows).set_index("source") if rows else pd.DataFrame()


@report_section("curated mixture")
def curated_mixture_section(ctx: ReportContext) -> list[str]:
    if ctx.partition is None:
        return []
    changed = curated_mixture_table(ctx.sources, ctx.partition)
    if changed.empty:
        return ["The mixture is trained as loaded: `partition.json` records no hand edits.", ""]
    src, part = ctx.sources, ctx.partition
    kept = list(part.sources)
    ex, tok = int(src["examples"].sum()), int(src["tokens"].sum())
    ex_c = sum(int(part.examples[s]) for s in kept)
    tok_c = sum(int(part.tokens[s]) for s in kept)
    out = [
        "## Curated mixture",
        "",
        "Hand edits in `partition.json` change what every row trains (joint, soup and split "
        "alike): a dropped or unplaced source trains in no row, a down-weighted one trains a "
        "seeded fraction of its examples, and the merge weights follow the tokens trained.",
        "",
        markdown_table(changed),
        "",
        f"- original mixture: {len(src)} sources, {ex} train examples, {tok} train response tokens",
        f"- curated (trained): {len(kept)} sources, {ex_c} train examples, {tok_c} train "
        f"response tokens ({tok_c / max(tok, 1):.1%} of them)",
        "",
    ]
    if part.edit_log:
        out += ["### Edit log", "", markdown_table(edit_log_table(part.edit_log)), ""]
    return out


@report_section("comparison")
def comparison_section(ctx: ReportContext) -> list[str]:
    table = ctx.eval_table
    held = table[(table["split"] == "eval") & (table["metric"] == "loss")]  # n: examples
    sub_n = held.groupby("model")["n"].sum()
    if sub_n.nunique() != 1:
        raise ValueError(f"models were scored on different held-out sets: {sub_n.to_dict()}")
    out = [
        f"Every model is scored on the same held-out examples: {int(sub_n.iloc[0])} per metric "
        f"({held.groupby('model')['source'].nunique().iloc[0]} sources). Family columns average "
        "the family's sources; `avg` averages the families.",
        "",
    ]
    for metric, (title, unit, higher) in METRICS.items():
        if not ((table["metric"] == metric) & (table["split"] == "eval")).any():
            continue
        wide = summarize_eval(table, metric=metric, order=ctx.order)
        out += [
            f"## {title} ({unit}, {'higher' if higher else 'lower'} is better)",
            "",
            markdown_table(
                wide, fmt="{:.1f}" if unit == "%" else "{:.4f}", bold="max" if higher else "min"
            ),
            "",
            ctx.figure(plot_comparison(wide, metric=metric), f"compare_{metric}"),
            "",
        ]
    return out


@report_section("seeds")
def seeds_section(ctx: ReportContext) -> list[str]:
    def figure(mean: pd.DataFrame, std: pd.DataFrame, metric: str) -> str:
        return ctx.figure(plot_comparison(mean, metric=metric, spread=std), f"seeds_{metric}")

    return seeds_lines(ctx.eval_table, _shown(ctx), figure)


def _shown(ctx: ReportContext) -> list[ModelRow]:
    return [r for r in ctx.rows if r.kind != SNAPSHOT]


@report_section("answer style")
def style_section(ctx: ReportContext) -> list[str]:
    lines = style_lines(ctx.eval_table, _shown(ctx))
    f = ctx.frontier
    if f is None:
        return lines
    fig = plot_frontier(f.points, f.paths, y_metric=f.y_metric, y_of=f.y_of)
    return [
        *(lines or ["## Answer style", ""]),
        "Target-task quality against preserved ability: the merges, soups and controls as "
        "points (means over seeds, bars their spread), the joint run's snapshots and the "
        "shrink θ0 → θ_joint as paths. A point above both paths keeps more at the same "
        "held-out loss than training less would.",
        "",
        ctx.figure(fig, "frontier"),
        "",
    ]


@report_section("controls")
def controls_section(ctx: ReportContext) -> list[str]:
    return controls_lines(ctx.eval_table, _shown(ctx), ctx.controls, ctx.frontier)


@report_section("train vs held-out")
def train_vs_heldout_section(ctx: ReportContext) -> list[str]:
    table = ctx.eval_table
    if not (table["split"] == "train").any():
        return []
    tr = summarize_eval(table, metric="loss", split="train", order=ctx.order)["avg"]
    ev = summarize_eval(table, metric="loss", split="eval", order=ctx.order)["avg"]
    gap = pd.DataFrame({"train loss": tr, "held-out loss": ev, "gap": ev - tr})
    return ["## Train vs held-out loss (family average)", "", markdown_table(gap, fmt="{:.4f}"), ""]


@report_section("lm-eval")
def lm_eval_section(ctx: ReportContext) -> list[str]:
    return lm_eval_lines(ctx.eval_table, ctx.order, ctx.figure)


@report_section("lmms-eval")
def lmms_eval_section(ctx: ReportContext) -> list[str]:
    return lmms_eval_lines(ctx.eval_table, ctx.order, ctx.figure)


@report_section("token budget")
def token_budget_section(ctx: ReportContext) -> list[str]:
    budget = token_budget(ctx.cfg)
    if budget.empty:
        return []
    weights = {}
    for row in ctx.rows:
        manifest = row.model_dir / "merge_manifest.json"
        if row.inputs and manifest.is_file():
            w = load_merge_manifest(manifest)["weights"]
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


@report_section("diagnostics")
def diagnostics_report_section(ctx: ReportContext) -> list[str]:
    return diagnostics_section(ctx.run.root, image_formats=())


@report_section("conflict space")
def conflict_space_section(ctx: ReportContext) -> list[str]:
    space, src = ctx.run.load_space(), ctx.sources
    ev = ", ".join(f"PC{i + 1} {v:.1%}" for i, v in enumerate(space.explained_variance_ratio[:5]))
    return [
        "## Conflict space",
        "",
        f"Explained variance of the normalised source gradients: {ev}.",
        "",
        *gain_search_lines(ctx.run),  # partition.method: gain (report_partition.py)
        *on_demand_lines(ctx.run),
        ctx.figure(plot_conflict_heatmap(space, src), "conflict_heatmap"),
        "",
        ctx.figure(plot_conflict_scatter(space, src, color="group"), "conflict_scatter"),
        "",
        ctx.figure(plot_explained_variance(space), "explained_variance"),
        "",
    ]


@report_section("fold stability")
def fold_stability_report_section(ctx: ReportContext) -> list[str]:
    from merit_lab.pipeline.report_folds import fold_stability_section  # every run (folds)

    return fold_stability_section(ctx.run.root, ctx.figure)


@report_section("split stability")
def split_stability_section(ctx: ReportContext) -> list[str]:
    return stability_section(ctx.run.root, ctx.figure)  # after `merit-lab examples` (examples.py)


@report_section("layer-wise conflict")
def layer_conflict_section(ctx: ReportContext) -> list[str]:
    return layer_section(ctx.run.root, ctx.figure)  # calibration.layer_groups (layers.py)


@report_section("conflict drift")
def conflict_drift_section(ctx: ReportContext) -> list[str]:
    return drift_section(ctx.run.root, ctx.figure)  # after `merit-lab drift` (drift.py)


@report_section("training")
def training_section(ctx: ReportContext) -> list[str]:
    logs = training_logs(ctx.run.root)
    if not logs:
        return []
    return ["## Training", "", ctx.figure(plot_training_curves(logs), "training"), ""]


@report_section("timings")
def timings_section(ctx: ReportContext) -> list[str]:
    if not ctx.run.timings.exists():
        return []
    record = read_json(ctx.run.timings)
    rates = record.get(THROUGHPUT_KEY, {})
    seconds = {k: v for k, v in record.items() if k != THROUGHPUT_KEY}
    times = pd.DataFrame({"seconds": pd.Series(seconds, dtype=float)})
    times.index.name = "stage"
    times.loc["total"] = times["seconds"].sum()
    lines = ["## Wall time per stage (last run that did the work)", ""]
    if rates:  # tokens/s over the stage's wall time; the workers' or branches' own beside
        times["tokens/s"] = [rates.get(k, {}).get("stage", float("nan")) for k in times.index]
        for stage, r in rates.items():
            each = r.get("workers") or r.get("branches") or {}
            if len(each) > 1:
                listed = ", ".join(f"{k} {v:,.0f}" for k, v in each.items())
                lines.append(f"- {stage}: {r['tokens']:,} tokens; tokens/s of each: {listed}")
        lines.append("")
    return [*lines, markdown_table(times, fmt="{:.1f}"), ""]


@report_section("footer")
def footer_section(ctx: ReportContext) -> list[str]:
    return [
        "Figures are interactive HTML in `figures/` (a PNG shows inline where one exists). "
        f"`merit-lab figures {ctx.run.root} --out figures/` writes every figure as HTML, PNG and "
        "SVG in the paper style.",
        "",
    ]
