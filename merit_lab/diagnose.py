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
from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from merit_lab.config import config_hash
from merit_lab.diagnose_report import (
    BARRIER_NOISE,
    DIAGNOSTICS,
    diagnostics_figures,
    diagnostics_section,
    diagnostics_tables,
    load_diagnostics,
)
from merit_lab.diagnostics import (
    LossFn,
    Weights,
    _as_mapping,
    _float_params,
    displacement,
    hessian_top_eigs,
    interpolation_curve,
    make_loss_fn,
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

__all__ = [
    "BARRIER_NOISE",
    "DIAGNOSTICS",
    "RunProbe",
    "diagnostics_figures",
    "diagnostics_section",
    "diagnostics_tables",
    "load_diagnostics",
    "measure_path",
    "run_diagnostics",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")  # the pooled train examples and the held-out ones
THETA0 = "theta0"


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


def _assign(model: torch.nn.Module, theta: Weights) -> None:
    """Write every floating-point tensor of ``theta`` into the model in place."""
    src = _as_mapping(theta)
    target = _float_params(model)
    with torch.no_grad():
        for k in src:
            if k in target and target[k].is_floating_point():
                target[k].copy_(src[k].to(target[k].device, target[k].dtype))


def _subset(theta: Weights, names: Sequence[str]) -> dict[str, torch.Tensor]:
    src = _as_mapping(theta)
    return {n: src[n] for n in names}


def measure_path(
    model: torch.nn.Module,
    theta_a: Weights,
    theta_b: Weights,
    loss_fns: Mapping[str, LossFn],
    alphas: Sequence[float] | np.ndarray,
) -> dict[str, dict]:
    """`interpolation_curve` of one linear path under several losses (split name → curve)."""
    return {
        split: interpolation_curve(model, theta_a, theta_b, fn, alphas, progress=False)
        for split, fn in loss_fns.items()
    }


# ------------------------------------------------------------------------------------ the probe
class RunProbe:
    """One loaded model and the loss functions of a run, with every checkpoint by label.

    Labels: ``theta0``, each joint/split row's label, and each branch as ``<experiment>/<k>``.
    The model starts at θ0 and is overwritten in place for each checkpoint (one load per run).

    Args:
        run_dir: ``runs/<name>`` after the merge stage.
        max_examples: per source, the first train and the first held-out examples pooled into
            the ``train`` and ``eval`` losses.
        experiments: split experiments to probe (default: every one with a linear merge).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        max_examples: int = 16,
        experiments: Sequence[str] | None = None,
    ) -> None:
        from merit_lab.experiments import model_rows
        from merit_lab.pipeline import RunDir

        self.run = RunDir(Path(run_dir))
        self.cfg = self.run.load_config()
        self.max_examples = int(max_examples)
        self.rows = model_rows(self.cfg)
        linear = [r for r in self.rows if r.kind == "split" and r.merge_method == "linear"]
        if experiments is not None:
            unknown = sorted(set(experiments) - {r.experiment for r in linear})
            if unknown:
                raise ValueError(f"no split experiment with a linear merge named {unknown}")
            linear = [r for r in linear if r.experiment in experiments]
        self.merged = linear  # the split rows diagnosed
        self.joints = [r for r in self.rows if r.kind == "joint"]
        self.theta0_dir = self.rows[0].model_dir
        self.checkpoints: dict[str, Path] = {r.label: r.model_dir for r in self.rows}
        self.branches: dict[str, list[str]] = {}  # merged row label → its branch labels
        for r in self.merged:
            labels = [f"{r.experiment}/{k}" for k in range(len(r.inputs))]
            self.checkpoints.update(zip(labels, r.inputs, strict=True))
            self.branches[r.label] = labels
        self.epochs = {e.name: e.epochs for e in self.cfg.experiments}
        # θ0, the joint rows, the diagnosed merges and their branches
        self.probed = [THETA0, *(r.label for r in self.joints), *(r.label for r in self.merged)]
        self.probed += [b for r in self.merged for b in self.branches[r.label]]
        self._model = self._tok = self._loss_fns = self._theta0 = self._mixture = None
        self._losses: dict[str, dict[str, float]] = {}
        self._fps: dict[str, str] = {}

    # -- lazily loaded pieces: a run whose diagnostics are current loads nothing
    @property
    def mixture(self):
        from merit_lab.pipeline import load_run_mixture

        if self._mixture is None:
            self._mixture = load_run_mixture(self.cfg)
        return self._mixture

    @property
    def tokenizer(self):
        from merit_lab.models import load_tokenizer

        if self._tok is None:
            remote = self.cfg.trust_remote_code
            self._tok = load_tokenizer(self.theta0_dir, trust_remote_code=remote)
        return self._tok

    @property
    def model(self) -> torch.nn.Module:
        from merit_lab.models import load_model

        if self._model is None:
            self._model = load_model(
                self.theta0_dir,
                device=self.cfg.device,
                dtype=self.cfg.dtype,
                trust_remote_code=self.cfg.trust_remote_code,
            )
            self._model.requires_grad_(True)
        return self._model

    @property
    def theta0(self) -> Weights:
        """θ0's folder, or (a hub id) its parameters as loaded."""
        if self._theta0 is None:
            local = Path(self.theta0_dir).is_dir()
            self._theta0 = Path(self.theta0_dir) if local else _load_params(self.model)
        return self._theta0

    def weights(self, label: str) -> Weights:
        return self.theta0 if label == THETA0 else self.checkpoints[label]

    def examples(self, split: str, n: int | None = None) -> list[dict]:
        """The first ``n`` (default max_examples) examples of every source's ``split``, pooled."""
        n = self.max_examples if n is None else n
        return [ex for s in self.mixture for ex in s.split(split)[:n]]

    @property
    def loss_fns(self) -> dict[str, LossFn]:
        if self._loss_fns is None:
            kw = {"max_length": self.cfg.train.max_length, "batch_size": self.cfg.eval.batch_size}
            self._loss_fns = {
                s: make_loss_fn(self.tokenizer, self.examples(s), **kw) for s in SPLITS
            }
        return self._loss_fns

    def fingerprint(self, label: str) -> str:
        from merit_lab.merge import fingerprint_checkpoint

        if label not in self._fps:
            folder = self.checkpoints[label]
            local = any(Path(folder).glob("*.safetensors"))
            self._fps[label] = fingerprint_checkpoint(folder) if local else str(folder)
        return self._fps[label]

    def fingerprints(self, labels: Sequence[str]) -> dict[str, str]:
        return {label: self.fingerprint(label) for label in labels}

    def load(self, label: str) -> torch.nn.Module:
        """The model with ``label``'s weights written in."""
        _assign(self.model, self.weights(label))
        return self.model

    def losses(self, label: str) -> dict[str, float]:
        """Pooled train and held-out loss of one checkpoint (cached)."""
        if label not in self._losses:
            model = self.load(label)
            self._losses[label] = {s: float(fn(model)) for s, fn in self.loss_fns.items()}
        return self._losses[label]

    def path(self, a: str, b: str, alphas: Sequence[float] | np.ndarray) -> dict[str, dict]:
        """Loss along (1−α)θ_a + αθ_b on both splits (see `measure_path`)."""
        self.load(a)
        return measure_path(self.model, self.weights(a), self.weights(b), self.loss_fns, alphas)

    def merge_weights(self, label: str) -> list[float]:
        return list(read_json(self.checkpoints[label] / "merge_manifest.json")["weights"])

    def reference_joint(self):
        """The joint row merges are compared with: the first 1-epoch one, else the first."""
        ones = [r for r in self.joints if self.epochs.get(r.experiment) == 1]
        return (ones or self.joints or [None])[0]


def _load_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").clone() for n, p in model.named_parameters()}


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
            ratios.append({"joint": j.label, "merged": m.label, "joint_displacement": dj,
                           "merged_displacement": dm, "ratio": ratio})  # fmt: skip
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
    from merit_lab.models import select_parameters

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
    from merit_lab.gradients import GradientBank
    from merit_lab.partition import Partition

    bank = GradientBank.load(probe.run.gradients)
    lam, u = tensors["eigvals"].double().numpy(), tensors["eigvecs"].double().numpy()
    names = curv["parameters"]
    theta0_sub = _subset(probe.theta0, names)
    out = []
    for row in tqdm(probe.merged, desc="merging gain", disable=not progress):
        branches = probe.branches[row.label]
        w = probe.merge_weights(row.label)
        part = Partition.load(probe.run.root / "branches" / row.experiment / "partition.json")
        bl = {s: [probe.losses(b)[s] for b in branches] for s in SPLITS}
        ml = probe.losses(row.label)
        measured = {s: merging_gain(bl[s], w, ml[s]) for s in SPLITS}
        deltas = stack_deltas([_subset(probe.checkpoints[b], names) for b in branches], theta0_sub)
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


# ---------------------------------------------------------------------------------- the runner
def _current(path: Path, key: str) -> bool:
    return path.is_file() and read_json(path).get("key") == key


def _stored_key(path: Path) -> str | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(path, framework="pt") as f:
        return (f.metadata() or {}).get("key")


def run_diagnostics(
    run_dir: str | Path,
    *,
    experiments: Sequence[str] | None = None,
    max_examples: int = 16,
    alphas: int | Sequence[float] = 11,
    sigmas: Sequence[float] = (0.0, 1e-3, 3e-3, 1e-2),
    seeds: Sequence[int] = (0, 1, 2),
    relative_noise: bool = False,
    hessian_k: int = 8,
    hessian_iter: int = 20,
    curvature_examples: int = 2,
    curvature_params: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """Compute and write the five diagnostics of a finished run; current files are skipped.

    Args:
        run_dir: ``runs/<name>`` after the merge stage.
        experiments: split experiments to diagnose (default: every one with a linear merge).
        max_examples: per source, train and held-out examples pooled into the two losses.
        alphas: points per interpolation path (an int: evenly spaced on [0, 1]) or the α's.
        sigmas, seeds: Gaussian weight-noise scales and draws (`perturbation_curve`).
        relative_noise: noise σ·RMS(W) per tensor instead of σ.
        hessian_k, hessian_iter: top eigenpairs and Lanczos steps of the Hessian at θ0.
        curvature_examples: calibration examples per source in the Hessian's loss (one batch;
            2 per source on the demo: ~20-30 s for all 653k parameters on a CPU).
        curvature_params: parameter-name globs of the Hessian (default: all; pick e.g.
            ``["*layers.23.*"]`` on a large model).

    Returns:
        name → the JSON written (``paths``, ``displacement``, ``perturbation``, ``curvature``,
        ``gain``); each has ``key`` (its inputs' hash) and ``settings``.
    """
    from safetensors.torch import load_file
    from safetensors.torch import save as save_safetensors

    probe = RunProbe(run_dir, max_examples=max_examples, experiments=experiments)
    if not probe.merged:
        raise ValueError(f"{run_dir}: no split experiment with a linear merge to diagnose")
    a = np.linspace(0.0, 1.0, alphas) if isinstance(alphas, int) else np.asarray(alphas, float)
    out_dir = probe.run.root / "diagnostics"
    mix_key = read_json(probe.run.mixture)["key"]
    common = {
        "mixture": mix_key,
        "max_length": probe.cfg.train.max_length,
        "max_examples": max_examples,
        "dtype": probe.cfg.dtype,
        "experiments": [r.label for r in probe.merged],
    }
    all_fps = probe.fingerprints(list(probe.checkpoints))  # displacement covers every model
    fps = {lb: all_fps[lb] for lb in probe.probed}
    settings = {
        "paths": {**common, "alphas": a.tolist()},
        "displacement": common,
        "perturbation": {**common, "sigmas": list(map(float, sigmas)),
                         "seeds": list(map(int, seeds)), "relative_noise": relative_noise},
        "curvature": {"mixture": mix_key, "max_length": probe.cfg.calibration.max_length,
                      "examples_per_source": curvature_examples, "k": hessian_k,
                      "n_iter": hessian_iter, "params": list(curvature_params or [])},
    }  # fmt: skip
    keys = {name: config_hash(name, s, fps) for name, s in settings.items()}
    keys["displacement"] = config_hash("displacement", settings["displacement"], all_fps)
    curv_key = config_hash("curvature", settings["curvature"], fps[THETA0])
    keys["curvature"] = curv_key
    bank_key = read_json(probe.run.gradients / "bank.json")["info"].get("stage_key")
    settings["gain"] = {**common, "curvature": curv_key, "bank": bank_key}
    keys["gain"] = config_hash("gain", settings["gain"], fps)
    results: dict[str, dict] = {}
    curv_st = out_dir / "curvature.safetensors"
    for name in DIAGNOSTICS:
        path = out_dir / f"{name}.json"
        fresh = _current(path, keys[name])
        if name == "curvature":
            fresh = fresh and _stored_key(curv_st) == curv_key
        if fresh:
            log.info("diagnostics %s: up to date", name)
            results[name] = read_json(path)
            continue
        t0 = time.perf_counter()
        if name == "paths":
            data = _paths(probe, a, progress)
        elif name == "displacement":
            data = _displacement(probe, progress)
        elif name == "perturbation":
            data = _perturbation(probe, sigmas, seeds, relative_noise, progress)
        elif name == "curvature":
            data, tensors = _curvature(probe, curvature_examples, curvature_params, hessian_k,
                                       hessian_iter, progress)  # fmt: skip
            meta = {"key": curv_key, "parameters": json.dumps(data["parameters"])}
            atomic_write_bytes(curv_st, save_safetensors(tensors, metadata=meta))
        else:
            tensors = load_file(curv_st)
            data = _gain(probe, results["curvature"], tensors, progress)
        data["seconds"] = time.perf_counter() - t0
        log.info("diagnostics %s: %.1f s", name, data["seconds"])
        data = _jsonable({"key": keys[name], "settings": settings[name], **data})
        atomic_write_json(path, data)
        results[name] = data
    return results
