"""Report side of the diagnostics stage: tables, figures and markdown from ``diagnostics/*.json``.

Input: the files `merit_lab.pipeline.diagnose.run_diagnostics` writes. Output: pandas tables,
figures (built by `merit_lab.viz.plots_diagnostics`, saved as ``figures/diag_*.html``) and the
report section's markdown lines. Nothing is recomputed: every number is read from those files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from merit_lab.io import read_json
from merit_lab.pipeline.markdown import figure_link, markdown_table
from merit_lab.pipeline.rundir import RunDir
from merit_lab.viz.export import save_figure
from merit_lab.viz.plots_diagnostics import plot_diagnostics_files
from merit_lab.viz.style import Figure

__all__ = [
    "BARRIER_NOISE",
    "DIAGNOSTICS",
    "diagnostics_figures",
    "diagnostics_section",
    "diagnostics_tables",
    "load_diagnostics",
]

DIAGNOSTICS = ("paths", "displacement", "perturbation", "curvature", "gain")


def load_diagnostics(run_dir: str | Path) -> dict[str, dict]:
    """The diagnostics JSON files a run has (name → data); missing ones are absent."""
    run = RunDir(Path(run_dir))
    files = {n: run.diagnostic(n) for n in DIAGNOSTICS}
    return {n: read_json(f) for n, f in files.items() if f.is_file()}


# ------------------------------------------------------------------------- tables and figures
def diagnostics_tables(run_dir: str | Path) -> dict[str, pd.DataFrame]:
    """The report's tables from the diagnostics files (only those whose file exists).

    Keys: ``losses`` (model × train/held-out), ``barriers`` (experiment × path kind),
    ``displacement``, ``ratios``, ``ablation``, ``perturbation`` (model × σ, mean loss increase),
    ``curvature`` (the eigenvalues), ``gain`` (per experiment: measured vs predicted).
    """
    d = load_diagnostics(run_dir)
    out: dict[str, pd.DataFrame] = {}
    if "paths" in d:
        losses = pd.DataFrame(d["paths"]["losses"]).T.rename(columns={"eval": "held-out"})
        losses.index.name = "model"
        out["losses"] = losses
        p = _with_relative_barrier(pd.DataFrame(d["paths"]["paths"]))
        rows = []
        for (exp, kind), g in p.groupby(["experiment", "kind"], sort=False):
            tr, ev = g[g.split == "train"], g[g.split == "eval"]
            rows.append(
                {
                    "experiment": exp,
                    "path": kind,
                    "paths": len(tr),
                    "barriers (train)": int(tr["above_noise"].sum()),
                    "max barrier train": tr["barrier"].max(),
                    "barriers (held-out)": int(ev["above_noise"].sum()),
                    "max barrier held-out": ev["barrier"].max(),
                }
            )
        out["barriers"] = pd.DataFrame(rows).set_index("experiment")
    if "displacement" in d:
        m = d["displacement"]["models"]
        out["displacement"] = pd.DataFrame(
            {"kind": [v["kind"] for v in m.values()], "‖θ − θ0‖": [v["total"] for v in m.values()]},
            index=pd.Index(list(m), name="model"),
        )
        for name in ("ratios", "ablation"):
            rows = d["displacement"][name]
            if rows:
                t = pd.DataFrame(rows)
                out[name] = t.set_index("epoch" if name == "ablation" else "joint")
    if "perturbation" in d:
        s = pd.DataFrame(d["perturbation"]["summary"])
        t = s.pivot(index="model", columns="sigma", values="delta_mean")
        t = t.loc[list(dict.fromkeys(s["model"]))]
        t.columns = [f"σ={c:g}" for c in t.columns]
        out["perturbation"] = t
    if "curvature" in d:
        c = d["curvature"]
        out["curvature"] = pd.DataFrame(
            [c["eigvals"]],
            columns=[f"λ{i + 1}" for i in range(len(c["eigvals"]))],
            index=pd.Index([f"{c['mode']} at θ0 (dim {c['dim']})"], name="curvature"),
        )
    if "gain" in d:
        rows = []
        for e in d["gain"]["experiments"]:
            ni = e["norm_inequality"]
            rows.append(
                {
                    "experiment": e["experiment"],
                    "method": e["method"],
                    "K": e["k"],
                    "predicted before training (H=I)": e["predicted_partition_gain"]["identity"],
                    "measured G train": e["measured_gain"]["train"],
                    "measured G held-out": e["measured_gain"]["eval"],
                    "quadratic prediction (top-k)": e["quadratic"]["gain"],
                    "prediction / measured": _nan(e["prediction_share"]),
                    "subspace share of spread": _nan(e["quadratic"]["explained"]),
                    "‖θ̄−θ0‖²": ni["lhs"],
                    "Σ w‖θi−θ0‖²": ni["rhs"],
                    "inequality holds": str(ni["holds"]),
                }
            )
        out["gain"] = pd.DataFrame(rows).set_index("experiment")
    return out


BARRIER_NOISE = 1e-6  # relative to the higher endpoint loss: float32 losses round at ~1e-7


def _with_relative_barrier(p: pd.DataFrame) -> pd.DataFrame:
    top = p[["loss_a", "loss_b"]].abs().max(axis=1)
    p = p.assign(relative_barrier=p["barrier"] / top.where(top > 0, 1.0))
    return p.assign(above_noise=p["relative_barrier"] > BARRIER_NOISE)


def _nan(x) -> float:
    return float("nan") if x is None else float(x)


def diagnostics_figures(run_dir: str | Path) -> dict[str, Figure]:
    """Figures by file stem: ``diag_paths_<exp>`` (train loss along each path),
    ``diag_displacement``, ``diag_perturbation``, ``diag_spectral_<exp>``."""
    return plot_diagnostics_files(load_diagnostics(run_dir))


# ------------------------------------------------------------------------------ report section
Tables = dict[str, pd.DataFrame]
Links = dict[str, str]


def diagnostics_section(
    run_dir: str | Path, *, image_formats: Sequence[str] = ("png", "svg")
) -> list[str]:
    """Markdown lines for ``report.md``: tables, facts read from the numbers, figure links.

    Figures are written to ``figures/diag_*.html``, plus ``image_formats`` where a static
    renderer exists (each image starts a browser: ``()`` skips them). An empty list when the run
    has no diagnostics yet.
    """
    root = Path(run_dir)
    d = load_diagnostics(root)
    if not d:
        return []
    t = diagnostics_tables(root)
    links = _save_figures(root, image_formats)
    out = _intro_lines(next(iter(d.values()))["settings"])
    for name, lines in _SUBSECTIONS.items():
        if name in d:
            out += lines(d, t, links)
    return out


def _save_figures(root: Path, image_formats: Sequence[str]) -> Links:
    """Write every diagnostics figure under ``figures/``; stem → its markdown link."""
    folder = RunDir(root).figures
    links = {}
    for stem, fig in diagnostics_figures(root).items():
        save_figure(fig, folder / stem, formats=image_formats)
        links[stem] = figure_link(folder / f"{stem}.html", root)
    return links


def _intro_lines(settings: dict) -> list[str]:
    return [
        "## Merge-readiness diagnostics",
        "",
        f"Losses pool the first {settings.get('max_examples', '?')} train and held-out examples "
        "of every source (`diagnostics/*.json`; the paper's four checks: zero barriers, a merged "
        "model closer to θ0, higher train but lower held-out loss, flatter under weight noise).",
        "",
    ]


def _order(s: pd.Series) -> str:
    return " > ".join(f"{k} ({v:.3g})" for k, v in s.sort_values(ascending=False).items())


def _paths_lines(d: dict, t: Tables, links: Links) -> list[str]:
    p = _with_relative_barrier(pd.DataFrame(d["paths"]["paths"]))
    out = [
        "### Linear interpolation barriers",
        "",
        f"A barrier counts when it exceeds {BARRIER_NOISE:g} × the path's higher endpoint "
        "loss (below that it is float rounding).",
        "",
    ]
    for split, name in (("train", "train"), ("eval", "held-out")):
        g = p[p.split == split]
        worst = g.loc[g["relative_barrier"].idxmax()]
        line = f"- {name} loss: a barrier on {int(g.above_noise.sum())} of {len(g)} paths"
        if worst["above_noise"]:
            line += (
                f"; the largest is {worst['barrier']:.4g} ({worst['a']} → {worst['b']}, "
                f"{worst['relative_barrier']:.2%} of its higher endpoint loss)"
            )
        out.append(line + ".")
    out += ["", markdown_table(t["barriers"], fmt="{:.4f}"), ""]
    out += [links[k] for k in links if k.startswith("diag_paths_")]
    return [
        *out,
        "",
        "### Train vs held-out loss (pooled examples)",
        "",
        markdown_table(t["losses"], fmt="{:.4f}"),
        "",
    ]


def _displacement_lines(d: dict, t: Tables, links: Links) -> list[str]:
    out = ["### Distance to θ0", "", markdown_table(t["displacement"], fmt="{:.4f}"), ""]
    if "ablation" in t:
        ab = t["ablation"]
        r = ab["ratio"].dropna()
        span = f"{r.min():.2f}×" if len(r) == 1 else f"{r.min():.2f}× to {r.max():.2f}×"
        better = int((ab["merged_heldout_loss"] < ab["joint_heldout_loss"]).sum())
        out += [
            f"- ‖θ_joint − θ0‖ / ‖θ_merged − θ0‖: {span} over {len(r)} (joint, merged) "
            f"pairs (the paper reports 2.4–2.9× for MERIT-2D); the merged model is the "
            f"closer one in {int((r > 1).sum())} of {len(r)}.",
            f"- merged train loss above the joint model's in {int((ab['gap'] > 0).sum())} "
            f"of {len(ab)} pairs (gap = merged − joint).",
            f"- merged held-out loss below the joint model's in {better} of {len(ab)} pairs.",
            "",
            markdown_table(ab, fmt="{:.4f}"),
            "",
        ]
    return [*out, links.get("diag_displacement", ""), ""]


def _perturbation_lines(d: dict, t: Tables, links: Links) -> list[str]:
    pt = t["perturbation"]
    big = pt.columns[-1]
    kinds = d.get("displacement", {}).get("models", {})
    merged = [m for m in pt.index if kinds.get(m, {}).get("kind") == "split"]
    joint = [m for m in pt.index if kinds.get(m, {}).get("kind") == "joint"]
    pairs = [(m, j) for m in merged for j in joint]
    rel = " (noise relative to each tensor RMS)" if d["perturbation"]["relative_noise"] else ""
    fact = (
        f" At {big}, the merged model rises less than the joint model in "
        f"{sum(pt.loc[m, big] < pt.loc[j, big] for m, j in pairs)} of {len(pairs)} "
        "(merged, joint) pairs."
        if pairs
        else ""
    )
    return [
        "### Flatness under Gaussian weight noise",
        "",
        f"Mean train-loss increase over {len(d['perturbation']['settings']['seeds'])} draws"
        f"{rel}.{fact}",
        "",
        markdown_table(pt, fmt="{:.4f}"),
        "",
        links.get("diag_perturbation", ""),
        "",
    ]


def _curvature_lines(d: dict, t: Tables, links: Links) -> list[str]:
    c = d["curvature"]
    lam = np.array(c["eigvals"], dtype=float)
    return [
        "### Curvature at θ0",
        "",
        f"Top {lam.size} Hessian eigenvalues of the calibration loss ({c['examples']} "
        f"examples, {c['dim']} parameters, Lanczos): {int((lam < 0).sum())} negative.",
        "",
        markdown_table(t["curvature"], fmt="{:.4g}"),
        "",
    ]


def _gain_lines(d: dict, t: Tables, links: Links) -> list[str]:
    g = t["gain"]
    share = g["prediction / measured"].dropna()
    spread = g["subspace share of spread"]
    out = [
        "### Merging gain: measured vs predicted",
        "",
        f"- measured G = Σ w_i L(θ_i) − L(θ̄) > 0 on the train loss in "
        f"{int((g['measured G train'] > 0).sum())} of {len(g)} experiments, on the held-out "
        f"loss in {int((g['measured G held-out'] > 0).sum())} of {len(g)}.",
        f"- the quadratic prediction ½ Σ λ_ℓ Var_w(u_ℓᵀδ_i) on the top "
        f"{len(d.get('curvature', {}).get('eigvals', []))} directions is "
        + (
            f"{share.min():.3g}–{share.max():.3g}× the measured train gain"
            if len(share)
            else "undefined (measured gain 0)"
        )
        + f"; those directions hold {spread.min():.2%}–{spread.max():.2%} of the branches' "
        "spread.",
        f"- the norm inequality ‖θ̄−θ0‖² ≤ Σ w_i‖θ_i−θ0‖² holds in "
        f"{int((g['inequality holds'] == 'True').sum())} of {len(g)} experiments.",
        f"- order by gain predicted before training (gradient bank, H = I): "
        f"{_order(g['predicted before training (H=I)'])}; by measured held-out gain: "
        f"{_order(g['measured G held-out'])}.",
        "",
        markdown_table(g, fmt="{:.4g}"),
        "",
    ]
    return out + [links[k] for k in links if k.startswith("diag_spectral_")] + [""]


# In report order; each writes its subsection when its diagnostics file exists.
_SUBSECTIONS: dict[str, Callable[[dict, Tables, Links], list[str]]] = {
    "paths": _paths_lines,
    "displacement": _displacement_lines,
    "perturbation": _perturbation_lines,
    "curvature": _curvature_lines,
    "gain": _gain_lines,
}
