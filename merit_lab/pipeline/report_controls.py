"""Report pieces on the controls: each merge beside joint training pulled back to its distance
from θ0, and the frontier of target-task quality against preserved ability.

Input: ``eval.parquet`` (control rows ``<row>:<control>``, joint snapshots ``<joint>:step<N>``,
split ``heldout`` for the evaluation-only sources), the run's `ModelRow` list (with controls)
and ``controls/controls.json``. Output: the Controls table's lines, the frontier's points and
paths (`Frontier`, drawn by `merit_lab.viz.plots_frontier.plot_frontier`) and their records for
``results.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from merit_lab.config.schema import RunConfig
from merit_lab.evaluation.evaluate import PERCENT_METRICS, summarize_eval
from merit_lab.evaluation.frontier import frontier_position, frontier_value
from merit_lab.evaluation.heldout import HELDOUT_SPLIT
from merit_lab.io import read_json
from merit_lab.pipeline.markdown import markdown_table
from merit_lab.pipeline.report_seeds import seed_tables
from merit_lab.pipeline.rows import (
    CONTROL_KINDS,
    SEED_MARK,
    SNAPSHOT,
    THETA0,
    ModelRow,
    control_joint,
)
from merit_lab.training.branch_log import MANIFEST
from merit_lab.viz.plots import METRICS

__all__ = [
    "Frontier",
    "controls_lines",
    "controls_record",
    "controls_table",
    "frontier_of",
    "frontier_record",
]

X_METRIC = "loss"  # target-task quality: held-out loss on the trained sources
Y_METRICS = ("in_style_tokens", "in_style")  # preserved ability, the first one scored
_POINT_KIND = {THETA0: "theta0", "joint": "joint", "soup": "soup", **{k: k for k in CONTROL_KINDS}}


@dataclass(frozen=True)
class Frontier:
    """The frontier figure's data: seed means of every row, and the paths of the config's seed.

    Attributes:
        points: label, kind (`plots_frontier.POINT_KINDS`), x, y, x_err, y_err (seed spreads),
            frontier (the paths' best y at x), position (above | on | below | outside).
        paths: path, kind (joint | shrink), at (step or α), label (the row), x, y.
        y_metric: the metric on the y axis (a key of `merit_lab.viz.plots.METRICS`).
        y_split: ``heldout`` (the evaluation-only families) or ``eval`` (the trained sources).
    """

    points: pd.DataFrame
    paths: pd.DataFrame
    y_metric: str
    y_split: str

    @property
    def y_of(self) -> str:
        return "held-out families" if self.y_split == HELDOUT_SPLIT else "trained sources"

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.y_metric][2]


def _scored(table: pd.DataFrame, metric: str, split: str) -> bool:
    sub = table[(table["metric"] == metric) & (table["split"] == split)]
    return bool(len(sub)) and bool(np.isfinite(sub["value"].to_numpy(float)).any())


def _y_axis(table: pd.DataFrame) -> tuple[str, str] | None:
    """(metric, split) of the y axis: the held-out families when scored, the first of
    `Y_METRICS` that has values and a direction."""
    for split in (HELDOUT_SPLIT, "eval"):
        for metric in Y_METRICS:
            if metric in METRICS and _scored(table, metric, split):
                return metric, split
    return None


def _point_kind(row: ModelRow, methods: dict[str, str | None]) -> str:
    if row.kind == "split":
        return "random" if methods.get(row.experiment) == "random" else "merge"
    return _POINT_KIND[row.kind]


def _avg(table: pd.DataFrame, metric: str, split: str) -> pd.Series:
    return summarize_eval(table, metric=metric, split=split)["avg"]


def _final_step(joint: Path) -> int | None:
    path = joint / "final" / MANIFEST
    return int(read_json(path)["steps"]) if path.is_file() else None


def _paths(
    cfg: RunConfig, rows: Sequence[ModelRow], x: pd.Series, y: pd.Series, controls: dict
) -> pd.DataFrame:
    """The joint paths (θ0, the evaluated snapshots, the joint row at its last step) and the
    shrink paths (θ0, the shrink controls at their α, the joint row at α = 1), of the config's
    own seed; a vertex whose row was not scored is left out, and so is a path of one vertex."""
    have = set(x.dropna().index) & set(y.dropna().index)
    out = []

    def vertex(path: str, kind: str, at: float, label: str) -> None:
        if label in have:
            out.append({"path": path, "kind": kind, "at": float(at), "label": label})

    for e in cfg.experiments:
        snaps = [r for r in rows if r.kind == SNAPSHOT and r.experiment == e.name]
        if snaps:
            vertex(e.name, "joint", 0, THETA0)
            for r in snaps:
                vertex(e.name, "joint", r.step, r.label)
            last = _final_step(snaps[0].joint)
            if last is not None:
                vertex(e.name, "joint", last, e.name)
    for e in cfg.experiments:
        if e.kind != "shrink":
            continue
        joint = control_joint(cfg, e)
        vertex(e.name, "shrink", 0.0, THETA0)
        for r in rows:  # the config's seed: the controls of the joint row's own run
            entry = controls.get(r.label, {})
            if r.experiment == e.name and r.seed == cfg.train.seed and entry.get("alpha"):
                vertex(e.name, "shrink", entry["alpha"], r.label)
        vertex(e.name, "shrink", 1.0, joint.name)
    paths = pd.DataFrame(out, columns=["path", "kind", "at", "label"])
    paths = paths.drop_duplicates(["path", "at"])
    paths = paths[paths.groupby("path")["at"].transform("size") >= 2]
    return paths.assign(x=paths["label"].map(x), y=paths["label"].map(y)).reset_index(drop=True)


def frontier_of(
    table: pd.DataFrame, rows: Sequence[ModelRow], cfg: RunConfig, controls: dict
) -> Frontier | None:
    """The frontier's points and paths (None without a y metric or a path to compare with).

    Args:
        table: ``eval.parquet``.
        rows: `model_rows(cfg, controls=True)`.
        controls: ``controls.json``'s ``controls`` (the shrink controls' α).
    """
    axis = _y_axis(table)
    if axis is None or not _scored(table, X_METRIC, "eval"):
        return None
    y_metric, y_split = axis
    paths = _paths(
        cfg, rows, _avg(table, X_METRIC, "eval"), _avg(table, y_metric, y_split), controls
    )
    if paths.empty:
        return None
    rows = [r for r in rows if r.kind != SNAPSHOT]
    mx, sx, _ = seed_tables(table, rows, X_METRIC)
    my, sy, _ = seed_tables(table, rows, y_metric, y_split)
    methods = {e.name: e.method for e in cfg.experiments}
    kinds = {r.base: _point_kind(r, methods) for r in rows if not r.repeat}
    labels = [b for b in kinds if b in mx.index and b in my.index]
    points = pd.DataFrame(
        {
            "label": labels,
            "kind": [kinds[b] for b in labels],
            "x": mx.loc[labels, "avg"].to_numpy(float),
            "y": my.loc[labels, "avg"].to_numpy(float),
            "x_err": sx.loc[labels, "avg"].fillna(0.0).to_numpy(float),
            "y_err": sy.loc[labels, "avg"].fillna(0.0).to_numpy(float),
        }
    )
    points = points[np.isfinite(points[["x", "y"]]).all(axis=1)].reset_index(drop=True)
    curves = [(p["x"].to_numpy(), p["y"].to_numpy()) for _, p in paths.groupby("path")]
    higher = METRICS[y_metric][2]
    points["frontier"] = frontier_value(points["x"], curves, higher_is_better=higher)
    points["position"] = frontier_position(
        points["x"], points["y"], curves, higher_is_better=higher, tol=2 * points["y_err"]
    )
    return Frontier(points, paths, y_metric, y_split)


def frontier_record(frontier: Frontier | None) -> dict:
    """``results.json``'s ``frontier``: the axes, every point with its position, the paths."""
    if frontier is None:
        return {}
    f = frontier
    points = f.points.set_index("label")
    return {
        "frontier": {
            "x": {"metric": X_METRIC, "split": "eval", "higher_is_better": False},
            "y": {"metric": f.y_metric, "split": f.y_split, "higher_is_better": f.higher_is_better},
            "tolerance": "within 2x the point's seed spread of y counts as on the frontier",
            "points": {
                label: {k: _json(v) for k, v in p.items()} for label, p in points.iterrows()
            },
            "paths": {
                name: {
                    "kind": str(p["kind"].iloc[0]),
                    "vertices": [
                        {"at": float(v.at), "label": v.label, "x": float(v.x), "y": float(v.y)}
                        for v in p.itertuples()
                    ],
                }
                for name, p in f.paths.groupby("path", sort=False)
            },
        }
    }


def _json(v):
    if isinstance(v, (float, np.floating)):
        return float(v) if np.isfinite(v) else None
    return v


# ------------------------------------------------------------------------------ the table
def _split_label(row: ModelRow) -> tuple[str, str]:
    """A control row's (merged row, control experiment), without the seed mark."""
    merged, name = row.base.rsplit(":", 1)
    return merged, name


def _cell(diff: float, spread: float, fmt: str) -> str:
    """``+0.012 ± 0.004``, in bold when beyond twice the pooled seed spread."""
    if not np.isfinite(diff):
        return "–"
    text = fmt.format(diff)
    if not np.isfinite(spread):
        return text
    text += " ± " + fmt.format(spread).lstrip("+")
    return f"**{text}**" if abs(diff) > 2 * spread else text


def controls_table(
    table: pd.DataFrame,
    rows: Sequence[ModelRow],
    controls: dict,
    y_axis: tuple[str, str] | None,
    positions: dict[str, str],
) -> tuple[pd.DataFrame, list[str]]:
    """Each merged row with a control, then its controls beneath it: distance to θ0 and scores
    (means over seeds), the control's α or step (the config's seed), the differences merge −
    control (± the pooled seed spread, bold beyond twice it) and the frontier position; and
    the reasons of the controls that are not reachable."""
    record, entries = controls.get("rows", {}), controls.get("controls", {})
    ctl = [r for r in rows if r.kind in CONTROL_KINDS]
    metrics = {"loss": (X_METRIC, "eval")} | ({"style": y_axis} if y_axis else {})
    stats = {}
    for name, (metric, split) in metrics.items():
        mean, std, _ = seed_tables(table, rows, metric, split)
        stats[name] = (mean["avg"], std["avg"])
    percent = y_axis is not None and y_axis[0] in PERCENT_METRICS
    fmts = {"loss": "{:+.4f}", "style": "{:+.1f}" if percent else "{:+.3f}"}

    def distance(base: str, of: dict) -> float:
        found = [of.get(r.label, {}).get("distance_to_base") for r in rows if r.base == base]
        found = [d for d in found if d is not None]
        return float(np.mean(found)) if found else np.nan

    out, notes = [], []
    for m in dict.fromkeys(_split_label(r)[0] for r in ctl):
        line = {"row": m, "control": "", "‖θ − θ0‖": distance(m, record)}
        line |= {name: float(mean.get(m, np.nan)) for name, (mean, _) in stats.items()}
        out.append({**line, **{f"Δ {n}": "" for n in stats}, "frontier": positions.get(m, "–")})
        for r in ctl:
            if r.repeat or _split_label(r)[0] != m:
                continue
            entry = entries.get(r.label, {})
            line = {"row": f"↳ {r.label}", "‖θ − θ0‖": distance(r.base, entries)}
            if entry.get("status") != "done":
                line["control"] = "not reachable"
                notes.append(f"- `{r.label}`: {entry.get('reason', 'not built yet')}")
            elif r.kind == "shrink":
                line["control"] = f"α {entry['alpha']:.3f}"
            else:
                line["control"] = f"step {entry['step']}"
            for name, (mean, std) in stats.items():
                line[name] = float(mean.get(r.base, np.nan))
                diff = float(mean.get(m, np.nan) - line[name])
                spread = float(np.hypot(std.get(m, np.nan), std.get(r.base, np.nan)))
                line[f"Δ {name}"] = _cell(diff, spread, fmts[name])
            out.append({**line, "frontier": positions.get(r.base, "–")})
    return pd.DataFrame(out).set_index("row"), notes


def controls_lines(
    table: pd.DataFrame, rows: Sequence[ModelRow], controls: dict, frontier: Frontier | None
) -> list[str]:
    """The Controls section of ``report.md`` (nothing when the config has no control)."""
    if not any(r.kind in CONTROL_KINDS for r in rows):
        return []
    y_axis = (frontier.y_metric, frontier.y_split) if frontier is not None else _y_axis(table)
    positions = {}
    if frontier is not None:
        positions = dict(zip(frontier.points["label"], frontier.points["position"], strict=True))
    body, notes = controls_table(table, rows, controls, y_axis, positions)
    style = ""
    if y_axis is not None:
        where = "held-out families" if y_axis[1] == HELDOUT_SPLIT else "trained sources"
        style = f"; style is `{y_axis[0]}` on the {where} (higher is better)"
    return [
        "## Controls: each merge beside joint training pulled back to its distance from θ0",
        "",
        "`shrink` is θ0 + α(θ_joint − θ0) at the merge's distance ‖θ − θ0‖; `early` is the "
        "joint run's first snapshot at least that far from θ0 (`merit_lab.merging.controls`); "
        "both come from the joint run with the merge's own training seed. Each merge is followed "
        "by its controls (↳); Δ = merge − control (means over seeds ± the pooled seed spread, "
        "bold beyond twice it); loss is the held-out "
        f"loss on the trained sources (lower is better){style}. `frontier`: where the merge "
        "lies against the joint and shrink paths of the frontier figure.",
        "",
        markdown_table(body, fmt="{:.4f}"),
        "",
        *([*notes, ""] if notes else []),
    ]


def controls_record(controls: dict) -> dict:
    """``results.json``'s ``controls``: per merged row (every seed), its distance to θ0 and each
    control's status, α or step and distance (from ``controls/controls.json``)."""
    if not controls.get("controls"):
        return {}
    keep = ("kind", "status", "reason", "alpha", "step", "distance_to_base", "target_distance")
    out: dict[str, dict] = {}
    for entry in controls["controls"].values():
        merged = entry["controls"]
        row = out.setdefault(
            merged, {"distance_to_base": controls["rows"][merged]["distance_to_base"]}
        )
        name = entry["experiment"].split(SEED_MARK)[0]
        row[name] = {k: entry[k] for k in keep if k in entry}
    return {"controls": out}
