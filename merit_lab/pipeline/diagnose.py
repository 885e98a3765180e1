"""Diagnostics stage: merge-readiness of a finished run, and the merging-gain theory measured.

Input: a run directory whose merge stage is done (θ0, joint runs, branches, linear merges, the
gradient bank). Output: ``diagnostics/{paths,displacement,perturbation,curvature,gain}.json``
(+ ``curvature.safetensors``), each skipped when current; `diagnostics_section` turns them into
report lines and ``figures/diag_*.html``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

from merit_lab.config.schema import DiagnosticsConfig, config_hash
from merit_lab.diagnostics import (
    displacement,
    hessian_top_eigs,
    make_loss_graph_fn,
    merging_gain,
    norm_inequality,
    perturbation_curve,
    predicted_partition_gain,
    quadratic_gain_prediction,
    spectral_filtering,
    stack_deltas,
    summarize_perturbation,
)
from merit_lab.io import atomic_write_bytes, atomic_write_json, read_json
from merit_lab.models.loading import select_parameters
from merit_lab.partition.plan import Partition
from merit_lab.pipeline.probe import SPLITS, RunProbe, measure_path, select_weights
from merit_lab.pipeline.report_diagnostics import (
    BARRIER_NOISE,
    diagnostics_figures,
    diagnostics_section,
    diagnostics_tables,
    load_diagnostics,
)
from merit_lab.pipeline.rows import THETA0
from merit_lab.pipeline.rundir import writes_run

__all__ = [
    "BARRIER_NOISE",
    "DIAGNOSTICS",
    "Diagnostic",
    "DiagnosticContext",
    "RunProbe",
    "diagnostics_figures",
    "diagnostics_section",
    "diagnostics_tables",
    "load_diagnostics",
    "measure_path",
    "run_diagnostics",
]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ helpers
def _jsonable(x: Any) -> Any:
    """numpy / torch / NaN → plain JSON (NaN and ±inf become null)."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return _jsonable(np.asarray(x).tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, pd.DataFrame):
        return _jsonable(x.to_dict(orient="records"))
    return x


# ------------------------------------------------------------------------------ the five files
def _paths(probe: RunProbe, alphas: np.ndarray, progress: bool) -> dict:
    jobs = []
    joint = probe.reference_joint()
    for row in probe.merged:
        branches = probe.branches[row.label]
        jobs += [(row.experiment, "branch-branch", a, b) for a, b in combinations(branches, 2)]
        jobs += [(row.experiment, "branch-merged", a, row.label) for a in branches]
        jobs.append((row.experiment, "theta0-merged", THETA0, row.label))
        if joint is not None:
            jobs.append((row.experiment, "joint-merged", joint.label, row.label))
    out = []
    for exp, kind, a, b in tqdm(jobs, desc="interpolation paths", disable=not progress):
        for split, c in probe.path(a, b, alphas).items():
            out.append({"experiment": exp, "kind": kind, "a": a, "b": b, "split": split, **c})
    labels = [lb for lb in probe.checkpoints if lb in probe.probed]
    return {"paths": out, "losses": {lb: probe.losses(lb) for lb in labels}}


def _displacement(probe: RunProbe, progress: bool) -> dict:
    labels = [lb for lb in probe.checkpoints if lb != THETA0]
    models = {}
    for lb in tqdm(labels, desc="displacements", disable=not progress):
        d = displacement(probe.checkpoints[lb], probe.theta0)
        models[lb] = {"total": d["total"], "per_layer": d["per_layer"]}
    kinds = {r.label: r.kind for r in probe.rows}
    for lb in models:
        models[lb]["kind"] = kinds.get(lb, "branch")
    ratios, ablation = [], []
    for j in probe.joints:
        for m in probe.merged:
            dj, dm = models[j.label]["total"], models[m.label]["total"]
            ratio = dj / dm if dm > 0 else float("nan")
            ratios.append(
                {
                    "joint": j.label,
                    "merged": m.label,
                    "joint_displacement": dj,
                    "merged_displacement": dm,
                    "ratio": ratio,
                }
            )
            lj, lm = probe.losses(j.label)["train"], probe.losses(m.label)["train"]
            ablation.append(
                {
                    "epoch": probe.epochs[j.experiment],
                    "joint": j.label,
                    "merged": m.label,
                    "merged_epochs": probe.epochs[m.experiment],
                    "joint_displacement": dj,
                    "merged_displacement": dm,
                    "ratio": ratio,
                    "joint_train_loss": lj,
                    "merged_train_loss": lm,
                    "gap": lm - lj,
                    "joint_heldout_loss": probe.losses(j.label)["eval"],
                    "merged_heldout_loss": probe.losses(m.label)["eval"],
                }
            )
    return {"models": models, "ratios": ratios, "ablation": ablation}


def _perturbation_labels(probe: RunProbe) -> list[str]:
    return (
        [r.label for r in probe.merged]
        + [r.label for r in probe.joints]
        + [b for r in probe.merged for b in probe.branches[r.label]]
    )


def _perturbation(probe: RunProbe, sigmas, seeds, relative: bool, progress: bool) -> dict:
    rows = []
    for lb in tqdm(_perturbation_labels(probe), desc="perturbation", disable=not progress):
        model = probe.load(lb)
        t = perturbation_curve(
            model, probe.loss_fns["train"], sigmas, seeds, relative=relative, progress=False
        )
        t["relative_delta"] = t["delta"] / t["base_loss"]
        t.insert(0, "model", lb)
        rows.append(t)
    table = pd.concat(rows, ignore_index=True)
    summary = []
    for lb, g in table.groupby("model", sort=False):
        s = summarize_perturbation(g)
        rel = g.groupby("sigma")["relative_delta"]
        s["relative_delta_mean"], s["relative_delta_std"] = rel.mean(), rel.std(ddof=0)
        summary += [{"model": lb, "sigma": sig, **r} for sig, r in s.to_dict("index").items()]
    return {"loss": "train", "relative_noise": relative, "draws": table, "summary": summary}


def _curvature(probe: RunProbe, n_examples, params, k, n_iter, progress) -> tuple[dict, dict]:
    model = probe.load(THETA0)
    examples = probe.examples("calibration", n_examples)
    graph = make_loss_graph_fn(probe.tokenizer, examples, probe.cfg.calibration.max_length)
    chosen = select_parameters(model, include=list(params) if params else None)
    t0 = time.perf_counter()
    spec = hessian_top_eigs(model, graph, chosen, k=k, n_iter=max(n_iter, k), progress=progress)
    data = {
        "mode": spec.mode,
        "point": THETA0,
        "examples": len(examples),
        "parameters": list(spec.names),
        "shapes": [list(s) for s in spec.shapes],
        "dim": int(spec.eigvecs.shape[0]),
        "eigvals": spec.eigvals,
        "lanczos_seconds": time.perf_counter() - t0,
    }
    # float32 halves the file (42 MB → 21 MB on the demo); gain.json reads them back from it
    vecs = torch.from_numpy(np.ascontiguousarray(spec.eigvecs, dtype=np.float32))
    return data, {"eigvals": torch.from_numpy(spec.eigvals), "eigvecs": vecs}


def _gain(probe: RunProbe, curv: dict, tensors: dict, progress: bool) -> dict:
    bank = probe.run.load_bank()
    lam, u = tensors["eigvals"].double().numpy(), tensors["eigvecs"].double().numpy()
    names = curv["parameters"]
    theta0_sub = select_weights(probe.theta0, names)
    out = []
    for row in tqdm(probe.merged, desc="merging gain", disable=not progress):
        branches = probe.branches[row.label]
        w = probe.merge_weights(row.label)
        part = Partition.load(probe.run.experiment_partition(row.experiment))
        bl = {s: [probe.losses(b)[s] for b in branches] for s in SPLITS}
        ml = probe.losses(row.label)
        measured = {s: merging_gain(bl[s], w, ml[s]) for s in SPLITS}
        deltas = stack_deltas(
            [select_weights(probe.checkpoints[b], names) for b in branches], theta0_sub
        )
        quad = quadratic_gain_prediction(deltas, w, lam, u)
        ineq = norm_inequality([probe.checkpoints[b] for b in branches], w, probe.theta0)
        merged_sq = displacement(probe.checkpoints[row.label], probe.theta0)["total"] ** 2
        out.append(
            {
                "experiment": row.experiment,
                "row": row.label,
                "method": part.method,
                "k": part.k,
                "weights": w,
                "branches": branches,
                "branch_losses": bl,
                "merged_loss": ml,
                "measured_gain": measured,
                "quadratic": quad,
                "prediction_share": quad["gain"] / measured["train"]
                if measured["train"] != 0
                else float("nan"),
                "spectral_filtering": spectral_filtering(deltas, w, u, lam),
                "norm_inequality": {**ineq, "merged_checkpoint_lhs": merged_sq},
                "predicted_partition_gain": {
                    "identity": predicted_partition_gain(part, bank.rows, bank.names),
                    "identity_normalized": predicted_partition_gain(
                        part, bank.rows, bank.names, normalize=True
                    ),
                },
            }
        )
    return {"loss_of_curvature": "calibration", "experiments": out}


# ------------------------------------------------------------------------------ the registry
@dataclass
class DiagnosticContext:
    """What the diagnostics of one call share: the probe, the settings, keys and results so far.

    ``fps`` are the probed checkpoints' fingerprints (θ0, joint rows, merges, branches),
    ``all_fps`` every checkpoint's (displacement measures them all).
    """

    probe: RunProbe
    alphas: np.ndarray
    sigmas: Sequence[float]
    seeds: Sequence[int]
    relative_noise: bool
    hessian_k: int
    hessian_iter: int
    curvature_examples: int
    curvature_params: Sequence[str] | None
    progress: bool
    common: dict[str, Any]  # the settings every loss-based diagnostic is keyed on
    fps: dict[str, str]
    all_fps: dict[str, str]
    keys: dict[str, str] = field(default_factory=dict)
    results: dict[str, dict] = field(default_factory=dict)


@dataclass(frozen=True)
class Diagnostic:
    """One file ``diagnostics/<name>.json``: its settings, the checkpoints it is keyed on, and
    how it is computed. Its key is ``config_hash(name, settings(ctx), fingerprints(ctx))``."""

    settings: Callable[[DiagnosticContext], dict]
    compute: Callable[[DiagnosticContext], dict]
    fingerprints: Callable[[DiagnosticContext], Any] = lambda ctx: ctx.fps
    tensors_current: Callable[[DiagnosticContext, str], bool] = lambda ctx, key: True


def _curvature_settings(ctx: DiagnosticContext) -> dict:
    return {
        "mixture": ctx.common["mixture"],
        "max_length": ctx.probe.cfg.calibration.max_length,
        "examples_per_source": ctx.curvature_examples,
        "k": ctx.hessian_k,
        "n_iter": ctx.hessian_iter,
        "params": list(ctx.curvature_params or []),
    }


def _perturbation_settings(ctx: DiagnosticContext) -> dict:
    sigmas, seeds = list(map(float, ctx.sigmas)), list(map(int, ctx.seeds))
    return {**ctx.common, "sigmas": sigmas, "seeds": seeds, "relative_noise": ctx.relative_noise}


def _gain_settings(ctx: DiagnosticContext) -> dict:
    """Keyed on the curvature it reads and on the gradient bank its predicted gain uses."""
    bank = read_json(ctx.probe.run.bank_json)["info"].get("stage_key")
    return {**ctx.common, "curvature": ctx.keys["curvature"], "bank": bank}


def _compute_curvature(ctx: DiagnosticContext) -> dict:
    """curvature.json, and the eigenpairs in ``curvature.safetensors`` under the same key."""
    data, tensors = _curvature(
        ctx.probe,
        ctx.curvature_examples,
        ctx.curvature_params,
        ctx.hessian_k,
        ctx.hessian_iter,
        ctx.progress,
    )
    meta = {"key": ctx.keys["curvature"], "parameters": json.dumps(data["parameters"])}
    atomic_write_bytes(ctx.probe.run.curvature_tensors, save_safetensors(tensors, metadata=meta))
    return data


def _compute_gain(ctx: DiagnosticContext) -> dict:
    tensors = load_file(ctx.probe.run.curvature_tensors)
    return _gain(ctx.probe, ctx.results["curvature"], tensors, ctx.progress)


# name → how to compute its file, in dependency order (gain reads curvature's eigenpairs). A
# new diagnostic is one entry here; `run_diagnostics` keys, skips, times and writes it.
DIAGNOSTICS: dict[str, Diagnostic] = {
    "paths": Diagnostic(
        settings=lambda ctx: {**ctx.common, "alphas": ctx.alphas.tolist()},
        compute=lambda ctx: _paths(ctx.probe, ctx.alphas, ctx.progress),
    ),
    "displacement": Diagnostic(
        settings=lambda ctx: ctx.common,
        compute=lambda ctx: _displacement(ctx.probe, ctx.progress),
        fingerprints=lambda ctx: ctx.all_fps,
    ),
    "perturbation": Diagnostic(
        settings=_perturbation_settings,
        compute=lambda ctx: _perturbation(
            ctx.probe, ctx.sigmas, ctx.seeds, ctx.relative_noise, ctx.progress
        ),
    ),
    "curvature": Diagnostic(
        settings=_curvature_settings,
        compute=_compute_curvature,
        fingerprints=lambda ctx: ctx.fps[THETA0],
        tensors_current=lambda ctx, key: ctx.probe.run.is_current("curvature", key),
    ),
    "gain": Diagnostic(
        settings=_gain_settings,
        compute=_compute_gain,
    ),
}


# ---------------------------------------------------------------------------------- the runner
def _update(ctx: DiagnosticContext, name: str) -> dict:
    """One diagnostic's file: read back when its key is current, else computed and written."""
    diag, path = DIAGNOSTICS[name], ctx.probe.run.diagnostic(name)
    settings = diag.settings(ctx)
    key = ctx.keys[name] = config_hash(name, settings, diag.fingerprints(ctx))
    if ctx.probe.run.is_current("diagnostic", key, name) and diag.tensors_current(ctx, key):
        log.info("diagnostics %s: up to date", name)
        return read_json(path)
    t0 = time.perf_counter()
    data = diag.compute(ctx)
    data["seconds"] = time.perf_counter() - t0
    log.info("diagnostics %s: %.1f s", name, data["seconds"])
    data = _jsonable({"key": key, "settings": settings, **data})
    atomic_write_json(path, data)
    return data


@writes_run
def run_diagnostics(
    run_dir: str | Path,
    *,
    experiments: Sequence[str] | None = None,
    max_examples: int = DiagnosticsConfig.max_examples,
    alphas: int | Sequence[float] = DiagnosticsConfig.alphas,
    sigmas: Sequence[float] = DiagnosticsConfig.sigmas,
    seeds: Sequence[int] = DiagnosticsConfig.seeds,
    relative_noise: bool = False,
    hessian_k: int = DiagnosticsConfig.hessian_k,
    hessian_iter: int = DiagnosticsConfig.hessian_iter,
    curvature_examples: int = DiagnosticsConfig.curvature_examples,
    curvature_params: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """Compute and write every diagnostic of `DIAGNOSTICS` for a finished run; current files
    are skipped.

    The keywords are the fields of `DiagnosticsConfig` (plus ``relative_noise`` and
    ``progress``), so a config's section is passed whole: ``run_diagnostics(run_dir,
    **dataclasses.asdict(cfg.diagnostics))``.

    Args:
        run_dir: ``runs/<name>`` after the merge stage.
        experiments: split experiments to diagnose (default, or empty: every one with a linear
            merge).
        max_examples: per source, train and held-out examples pooled into the two losses.
        alphas: points per interpolation path (an int: evenly spaced on [0, 1]) or the α's.
        sigmas, seeds: Gaussian weight-noise scales and draws (`perturbation_curve`).
        relative_noise: noise σ·RMS(W) per tensor instead of σ.
        hessian_k, hessian_iter: top eigenpairs and Lanczos steps of the Hessian at θ0.
        curvature_examples: calibration examples per source in the Hessian's loss (one batch;
            2 per source on the demo: ~20-30 s for all 653k parameters on a CPU).
        curvature_params: parameter-name globs of the Hessian (default, or empty: all; pick
            e.g. ``["*layers.23.*"]`` on a large model).

    Returns:
        name → the JSON written (``paths``, ``displacement``, ``perturbation``, ``curvature``,
        ``gain``); each has ``key`` (its inputs' hash) and ``settings``.
    """
    experiments = list(experiments or []) or None  # empty: every one (the config's meaning)
    curvature_params = list(curvature_params or []) or None
    probe = RunProbe(run_dir, max_examples=max_examples, experiments=experiments)
    if not probe.merged:
        raise ValueError(f"{run_dir}: no split experiment with a linear merge to diagnose")
    common = {
        "mixture": read_json(probe.run.mixture)["key"],
        "sources": [s.name for s in probe.mixture],  # the curated mixture
        "max_length": probe.cfg.train.max_length,
        "max_examples": max_examples,
        "dtype": probe.cfg.dtype,
        "experiments": [r.label for r in probe.merged],
    }
    all_fps = probe.fingerprints(list(probe.checkpoints))  # displacement covers every model
    a = np.linspace(0.0, 1.0, alphas) if isinstance(alphas, int) else np.asarray(alphas, float)
    ctx = DiagnosticContext(
        probe=probe,
        alphas=a,
        sigmas=sigmas,
        seeds=seeds,
        relative_noise=relative_noise,
        hessian_k=hessian_k,
        hessian_iter=hessian_iter,
        curvature_examples=curvature_examples,
        curvature_params=curvature_params,
        progress=progress,
        common=common,
        fps={lb: all_fps[lb] for lb in probe.probed},
        all_fps=all_fps,
    )
    for name in DIAGNOSTICS:
        ctx.results[name] = _update(ctx, name)
    return ctx.results
