"""Conflict drift of a trained run (`merit-lab drift runs/<name>`): the bank recomputed along
training.

Input: a run whose joint-1ep row and split branches are trained. Output: ``drift/`` with one bank
per checkpoint (θ0, the joint run's middle and end, each branch's end; same sources, calibration
examples and sketch as the run's bank), the joint run's middle weights, and ``drift.json``
(`merit_lab.analysis.drift.compute_drift`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from merit_lab.analysis.conflict import ConflictSpace
from merit_lab.analysis.drift import Drift, compute_drift
from merit_lab.gradients.estimate import estimate_gradients
from merit_lab.io import atomic_dir, atomic_write_json, read_json
from merit_lab.models.checkpoints import fingerprint_checkpoint
from merit_lab.models.loading import load_model, load_tokenizer, resolve_model_path
from merit_lab.pipeline.markdown import markdown_table
from merit_lab.pipeline.rundir import RunDir, load_run_mixture, writes_run
from merit_lab.training.branch_log import read_log
from merit_lab.training.spec import BranchSpec
from merit_lab.training.trainer import train_branch

__all__ = ["compute_run_drift", "drift_checkpoints", "drift_section", "load_drift"]

log = logging.getLogger(__name__)

THETA0, MID, END = "theta0", "joint-1ep/mid", "joint-1ep/end"


class _MidpointReached(Exception):
    """Raised by the mid-point callback once the weights are saved: training stops there."""


def _joint_dir(cfg, run: RunDir) -> Path:
    joints = [e for e in cfg.experiments if e.kind == "joint"]
    one = [e for e in joints if e.epochs == 1] or joints
    if not one:
        raise ValueError("drift needs a joint experiment (the path θ0 → middle → end)")
    return run.joint_dir(one[0].epochs, one[0].seed)


def _train_to_midpoint(joint: Path, out: Path) -> dict[str, Any]:
    """Train the joint run's spec again, from θ0, to half its optimizer steps; save the weights
    there in ``out`` and stop. The spec fixes seed, data order and schedule, so these are the
    joint run's own middle weights: its logged losses up to there are compared as a check."""
    from transformers import TrainerCallback

    logged = read_log(joint / "log.jsonl")
    total = int(logged[-1]["total_steps"])
    mid = total // 2
    scratch = out.parent / f"{out.name}-training"
    shutil.rmtree(scratch, ignore_errors=True)
    joint_spec = BranchSpec.load(joint / "spec.json")
    spec = dataclasses.replace(
        joint_spec,
        output_dir=str(scratch),
        name="joint-mid",
        keep_checkpoints=False,
        train=dataclasses.replace(joint_spec.train, save_steps=total + 1),
    )

    class SaveAtMidpoint(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == mid:
                with atomic_dir(out, overwrite=True) as tmp:
                    model.save_pretrained(tmp)
                raise _MidpointReached

    with contextlib.suppress(_MidpointReached):
        train_branch(spec, callbacks=[SaveAtMidpoint()])
    again = read_log(scratch / "log.jsonl")[:mid]
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(again, logged, strict=False))
    shutil.rmtree(scratch, ignore_errors=True)
    check = {
        "step": mid,
        "total_steps": total,
        "steps_compared": len(again),
        "max_abs_loss_diff": float(diff),
    }
    atomic_write_json(out / "midpoint.json", check)
    return check


def drift_checkpoints(
    run_dir: str | Path, experiments: Sequence[str] | None = None
) -> dict[str, Path]:
    """label → model folder: θ0, the joint-1ep run's middle (``drift/joint-mid``, made by
    `compute_run_drift`) and end, and the end of each branch of ``experiments`` (default: the
    split experiments that train the run's own partition, else every split experiment)."""
    run = RunDir(Path(run_dir))
    cfg = run.load_config()
    joint = _joint_dir(cfg, run)
    points = {
        THETA0: Path(resolve_model_path(cfg.model)),
        MID: run.drift / "joint-mid",
        END: joint / "final",
    }
    splits = [e for e in cfg.experiments if e.kind == "split"]
    if experiments is None:
        own = [e.name for e in splits if e.method is None and e.r is None and e.k is None]
        experiments = own or [e.name for e in splits]
    for name in experiments:
        if name not in [e.name for e in splits]:
            raise ValueError(f"no split experiment {name!r}; have {[e.name for e in splits]}")
        finals = sorted(
            run.experiment_dir(name).glob("*/final/merit_branch.json"),
            key=lambda p: int(p.parent.parent.name),
        )
        if not finals:
            raise FileNotFoundError(f"{run.experiment_dir(name)}: no trained branch; train first")
        points.update({f"{name}/{p.parent.parent.name}": p.parent for p in finals})
    return points


def _bank_at(cfg, run: RunDir, label: str, model_dir: Path, names, content, n: int, tok, mixture):
    """The bank at one checkpoint (resumable: one part per source in ``drift/banks/<label>/``)."""
    model = load_model(
        model_dir, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code
    )
    cal, par = cfg.calibration, cfg.parameters
    return estimate_gradients(
        model,
        tok,
        mixture,
        sketch=cfg.sketch,
        n=n,
        micro_batch_size=cal.micro_batch_size,
        micro_batch_tokens=cal.micro_batch_tokens,
        gradient_checkpointing=cal.gradient_checkpointing,
        max_length=cal.max_length,
        long_examples=cfg.mixture.long_examples,
        preset=par.preset,
        include=par.include,
        exclude=par.exclude,
        sources=names,
        out_dir=run.drift / "banks" / re.sub(r"[^A-Za-z0-9_.-]", "_", label),
        model_fingerprint=fingerprint_checkpoint(model_dir),
        source_keys=content,
    )


@writes_run
def compute_run_drift(
    run_dir: str | Path,
    *,
    n: int | None = None,
    k: int = 3,
    experiments: Sequence[str] | None = None,
) -> Path:
    """Recompute the bank at θ0, the joint-1ep run's middle and end and each branch's end, and
    write ``drift/drift.json`` (atomically, as the run's one writer).

    Args:
        n: calibration examples per source (default: the run's; then θ0's bank is the run's).
        k: PCA axes compared.
        experiments: split experiments whose branch ends are compared (`drift_checkpoints`).
    """
    run = RunDir(Path(run_dir))
    cfg = run.load_config()
    n = n or cfg.calibration.n
    if not 1 <= n <= cfg.calibration.n:
        raise ValueError(f"n must be in [1, {cfg.calibration.n}] (the run's calibration.n)")
    points = drift_checkpoints(run.root, experiments)  # refuses an untrained run before work
    bank0 = run.load_bank()
    names = list(bank0.names)
    content = {s["name"]: s.get("content_key", "") for s in run.read_mixture()["sources"]}
    started = time.perf_counter()
    midpoint = {}
    if not any(points[MID].glob("*.safetensors")):
        midpoint = _train_to_midpoint(_joint_dir(cfg, run), points[MID])
    elif (points[MID] / "midpoint.json").is_file():
        midpoint = read_json(points[MID] / "midpoint.json")
    tok = load_tokenizer(resolve_model_path(cfg.model), trust_remote_code=cfg.trust_remote_code)
    mixture = load_run_mixture(cfg)
    banks, seconds = {}, {"midpoint": time.perf_counter() - started}
    for label, model_dir in points.items():
        t0 = time.perf_counter()
        if label == THETA0 and n == cfg.calibration.n:
            banks[label] = bank0  # the run's own bank: same sources, examples and sketch
        else:
            banks[label] = _bank_at(cfg, run, label, model_dir, names, content, n, tok, mixture)
        seconds[label] = time.perf_counter() - t0
    rows0 = banks.pop(THETA0).rows
    drift = compute_drift(names, rows0, {lb: b.rows for lb, b in banks.items()}, k=k)
    record = {
        "n": n,
        "k": k,
        "checkpoints": {lb: str(p) for lb, p in points.items()},
        "midpoint": midpoint,
        "seconds": seconds,
        "theta0": drift.theta0.to_dict(),
        "drift": drift.to_dict(),
    }
    return atomic_write_json(run.drift / "drift.json", record)


def load_drift(run_dir: str | Path) -> Drift:
    """The `Drift` of ``drift/drift.json``."""
    path = RunDir(Path(run_dir)).drift / "drift.json"
    data = read_json(path)
    theta0 = ConflictSpace.from_dict(data["theta0"], source=path)
    return Drift.from_dict(data["drift"], theta0, source=path)


def drift_table(drift: Drift) -> list[dict[str, Any]]:
    """One record per checkpoint: principal angles, and the sources' movement."""
    rows = []
    for p in drift.points:
        rows.append(
            {
                "checkpoint": p.label,
                **{f"angle {j + 1} (°)": float(a) for j, a in enumerate(p.angles)},
                "score angle 1 (°)": float(p.score_angles[0]),
                "cos to θ0: median": float(np.median(p.cos_to_theta0)),
                "cos to θ0: min": float(p.cos_to_theta0.min()),
                "displacement: median": float(np.median(p.displacement)),
                "farthest source": drift.names[int(np.argmax(p.displacement))],
            }
        )
    return rows


def drift_section(run_dir: str | Path, figure=None) -> list[str]:
    """The report's "Conflict drift" section (nothing when ``drift/drift.json`` is absent);
    ``figure(fig, stem)`` saves a figure and returns its link."""
    path = RunDir(Path(run_dir)).drift / "drift.json"
    if not path.is_file():
        return []
    import pandas as pd

    data = read_json(path)
    drift = load_drift(run_dir)
    lines = [
        "## Conflict drift",
        "",
        f"The bank recomputed along training ({data['n']} calibration examples per source, the "
        f"run's sketch). Principal angles between the top-{drift.k} PCA subspaces of the "
        "gradient space at each checkpoint and at θ0 (0° = the same conflict axes); each "
        "source's cosine to its own θ0 gradient; its displacement in θ0's PCA coordinates.",
        "",
        markdown_table(pd.DataFrame(drift_table(drift)).set_index("checkpoint"), fmt="{:.3g}"),
        "",
    ]
    if figure is not None:
        from merit_lab.viz.plots_drift import plot_drift_angles, plot_drift_map

        lines += [
            figure(plot_drift_angles(drift), "drift_angles"),
            figure(plot_drift_map(drift), "drift_map"),
            "",
        ]
    mid = data.get("midpoint") or {}
    if mid:
        lines += [
            f"The middle (step {mid['step']} of {mid['total_steps']}) was trained again "
            f"from θ0; its losses matched the joint run's log to "
            f"{mid['max_abs_loss_diff']:.2g}.",
            "",
        ]
    return lines
