"""The top of the pipeline: ``STAGES`` and the loop over a run directory, mixture → gradients →
conflict → partition → train → merge → evaluate → diagnose → report.

Each stage reads the previous artifact from ``runs/<name>/`` and writes its own atomically; a
stage whose artifact exists and was made from the same inputs is skipped, so re-running resumes.
The wall time of every stage that did work is kept in ``timings.json``. One process writes a run
at a time: the loop holds ``runs/<name>/.lock`` (`RunDir.writer_lock`). The merge stage also
builds the controls of every merged row (`merit_lab.pipeline.controls`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from merit_lab.analysis.conflict import ConflictSpace
from merit_lab.config.locate import launch_record
from merit_lab.config.schema import RunConfig, load_config
from merit_lab.gradients.bank import GradientBank
from merit_lab.io import atomic_write_json, read_json
from merit_lab.models.loading import remote_code_problem, resolve_model_path
from merit_lab.pipeline.analysis import (
    stage_conflict,
    stage_gradients,
    stage_mixture,
    stage_partition,
)
from merit_lab.pipeline.controls import write_controls
from merit_lab.pipeline.diagnose import run_diagnostics
from merit_lab.pipeline.experiments import (
    evaluate_rows,
    merge_rows,
    train_experiments,
)
from merit_lab.pipeline.folds import fold_cost_lines, fold_stability_lines
from merit_lab.pipeline.report import write_report
from merit_lab.pipeline.report_partition import gain_search_lines
from merit_lab.pipeline.rundir import THROUGHPUT_KEY, RunDir
from merit_lab.pipeline.status import training_status
from merit_lab.validate import curvature_memory_problem, validate_config

__all__ = ["STAGES", "run_pipeline", "run_summary", "stage_status"]

log = logging.getLogger(__name__)


def _stage_train(cfg: RunConfig, run: RunDir) -> bool:
    """Every branch and joint run; finished ones are skipped, killed ones resume."""
    status = training_status(cfg)
    if len(status) and (status["state"] == "done").all() and run.artifact("train").exists():
        log.info("train: every branch is done")
        return False
    train_experiments(cfg)
    status = training_status(cfg)
    atomic_write_json(run.artifact("train"), {"branches": status.to_dict(orient="records")})
    return True


def _stage_merge(cfg: RunConfig, run: RunDir) -> bool:
    """Every merge, then the controls beside each merged row (``controls/``)."""
    merged = merge_rows(cfg)
    controls = write_controls(cfg)
    atomic_write_json(run.artifact("merge"), {"merges": merged, "controls": controls})
    return any(m["seconds"] > 0 for m in merged + controls)


def _stage_evaluate(cfg: RunConfig, run: RunDir) -> bool:
    return bool(evaluate_rows(cfg).attrs["evaluated"])


def _stage_diagnose(cfg: RunConfig, run: RunDir) -> bool:
    """Merge-readiness diagnostics and the gain theory (``diagnostics/*.json``), resumable."""
    if not any(e.kind == "split" and "linear" in e.merges for e in cfg.experiments):
        log.info("diagnose: no split experiment with a linear merge")
        return False

    def stamps() -> dict:
        return {p: p.stat().st_mtime_ns for p in run.diagnostics.glob("*.json")}

    before = stamps()
    run_diagnostics(run.root, **asdict(cfg.diagnostics))  # its keywords are the section's fields
    return stamps() != before


def _stage_report(cfg: RunConfig, run: RunDir) -> bool:
    write_report(run.root)
    return True


STAGES: dict[str, Callable[[RunConfig, RunDir], bool]] = {
    "mixture": stage_mixture,
    "gradients": stage_gradients,
    "conflict": stage_conflict,
    "partition": stage_partition,
    "train": _stage_train,
    "merge": _stage_merge,
    "evaluate": _stage_evaluate,
    "diagnose": _stage_diagnose,
    "report": _stage_report,
}


def run_pipeline(
    cfg: RunConfig | RunDir | str | Path,
    stages: Sequence[str] | None = None,
    *,
    until: str | None = None,
    force: bool = False,
) -> RunDir:
    """Run ``stages`` (default: all, in order) of a config; skip those already complete.

    Args:
        cfg: a config (or its YAML file): the run is ``<output_dir>/<name>``, and its
            ``config.yaml`` and ``launch.json`` are written there. Or a run folder (a `RunDir`
            or its path): that folder, with the config it holds (`RunDir.load_config`), which
            is left as it is.
        stages: the stages to run (in pipeline order whatever the order given).
        until: run every stage up to and including this one (e.g. ``"partition"``: the
            analysis before any training).
        force: redo the named stages even when their artifacts are current.

    Returns:
        The run directory.

    Raises:
        LockHeldError: another live process is writing the run (``runs/<name>/.lock`` names
            it); the lock of a process that died on this host is taken over with a warning.
    """
    run = None
    if isinstance(cfg, RunDir) or (not isinstance(cfg, RunConfig) and Path(cfg).is_dir()):
        run = cfg if isinstance(cfg, RunDir) else RunDir(Path(cfg))
        cfg = run.load_config()
    elif not isinstance(cfg, RunConfig):
        cfg = load_config(cfg)
    if until is not None:
        if until not in STAGES or stages is not None:
            raise ValueError(f"until must be one of {list(STAGES)}, and not given with stages")
        stages = list(STAGES)[: list(STAGES).index(until) + 1]
    stages = list(stages or STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; expected some of {list(STAGES)}")
    # every choice, model, device, lm-eval task: no work yet
    validate_config(cfg, diagnose="diagnose" in stages, evaluate="evaluate" in stages)
    if force:  # refused now, not after the stages before train or merge have run
        _refuse_forced_retraining(stages)
    model_dir = resolve_model_path(cfg.model)  # a hub id resolves once; an unfetched model fails
    for problem in (
        remote_code_problem(cfg.model, cfg.trust_remote_code),
        curvature_memory_problem(cfg, model_dir) if "diagnose" in stages else None,
    ):
        if problem:
            raise ValueError(f"config {cfg.name!r}: {problem}")
    given = run is None
    run = RunDir(cfg.run_dir) if run is None else run
    with run.writer_lock():  # one writer per run; a second one is refused, naming the first
        run.sweep_temp(stages)  # leftovers of these stages' killed writes: nothing else writes
        if given:  # the config as given, and where its relative outside paths are taken from
            cfg.save(run.config)
            launch = launch_record(cfg)
            if not run.launch.is_file() or read_json(run.launch) != launch:
                atomic_write_json(run.launch, launch)
        _run_stages(cfg, run, stages, force)
    return run


def _run_stages(cfg: RunConfig, run: RunDir, stages: Sequence[str], force: bool) -> None:
    """The loop: each named stage in pipeline order, its wall time kept when it did work."""
    for name in STAGES:
        if name not in stages:
            continue
        if force:
            _clear_stage(run, name)
        t0, started = time.perf_counter(), time.time()
        did_work = STAGES[name](cfg, run)
        seconds = time.perf_counter() - t0
        log.info("%s: %.1f s%s", name, seconds, "" if did_work else " (up to date)")
        if did_work:
            timings = read_json(run.timings) if run.timings.exists() else {}
            timings[name] = round(seconds, 2)
            rates = _throughput(run, name, seconds, started)
            if rates:
                timings.setdefault(THROUGHPUT_KEY, {})[name] = rates
            atomic_write_json(run.timings, timings)


def _throughput(run: RunDir, name: str, seconds: float, started: float) -> dict | None:
    """Tokens/s of a stage that processes tokens: over its wall time (loading included), and
    per gradient worker or per branch trained in it (their own compute time)."""
    if name == "gradients":
        t = read_json(run.bank_json)["info"].get("throughput") or {}
        if not t.get("tokens"):
            return None
        workers = {w: round(v["tokens_per_s"], 1) for w, v in t.get("workers", {}).items()}
        if not workers and t.get("tokens_per_s"):
            workers = {"0": round(t["tokens_per_s"], 1)}
        return {"tokens": t["tokens"], "stage": round(t["tokens"] / seconds, 1), "workers": workers}
    if name == "train":
        manifests = [
            p for p in run.root.glob("*/**/final/merit_branch.json") if p.stat().st_mtime >= started
        ]
        if not manifests:
            return None
        branches = {
            str(p.parent.parent.relative_to(run.root)): read_json(p) for p in sorted(manifests)
        }
        tokens = sum(m["tokens"] for m in branches.values())
        per = {b: round(m["tokens_per_s"], 1) for b, m in branches.items() if m.get("tokens_per_s")}
        return {"tokens": tokens, "stage": round(tokens / seconds, 1), "branches": per}
    return None


def _refuse_forced_retraining(stages: Sequence[str]) -> None:
    for name in ("train", "merge"):
        if name in stages:
            raise ValueError(
                f"--force {name} would retrain or re-merge everything; delete the branches/, "
                "joint/ or merged/ folders you want redone instead (finished ones are skipped "
                "otherwise)"
            )


def _clear_stage(run: RunDir, name: str) -> None:
    import shutil

    _refuse_forced_retraining([name])
    if name == "evaluate":  # the per-model cache too, or it would be read back
        shutil.rmtree(run.eval_dir, ignore_errors=True)
    if name == "diagnose":
        shutil.rmtree(run.diagnostics, ignore_errors=True)
        return
    path = run.gradients if name == "gradients" else run.artifact(name)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def run_summary(run_dir: str | Path) -> str:
    """A plain-text summary of what a run directory holds."""
    run = RunDir(Path(run_dir))
    cfg = run.load_config()
    lines = [f"run {cfg.name} at {run.root}", f"  model: {cfg.model}"]
    if run.mixture.exists():
        srcs = read_json(run.mixture)["sources"]
        n_ex = sum(s["n_train"] for s in srcs)
        n_tok = sum(s["train_tokens"] for s in srcs)
        lines.append(f"  mixture: {len(srcs)} sources, {n_ex} train examples, {n_tok} train tokens")
    else:
        lines.append("  mixture: not yet")
    if (run.gradients / "bank.json").exists():
        bank = GradientBank.load(run.gradients, mmap=True)
        sk = bank.info["sketch"]
        lines.append(
            f"  gradients: {bank.rows.shape[0]} x {bank.rows.shape[1]} {sk['kind']} sketch "
            f"(seed {sk['seed']}), {bank.info['n_parameters']} parameters, n={bank.info['n']}, "
            f"{bank.rows[0].nbytes} bytes/source"
        )
        lines += fold_cost_lines(run.root)  # what the fold rows cost the stage
    else:
        lines.append("  gradients: not yet")
    if run.conflict.exists():
        space = ConflictSpace.load(run.conflict)
        ev = ", ".join(f"{v:.2f}" for v in space.explained_variance_ratio[:5])
        off = [np.inf, -np.inf]  # the off-diagonal range, 256 rows of the (T, T) map at a time
        for i in range(0, space.n_sources, 256):
            block = np.array(space.cosine[i : i + 256])
            np.fill_diagonal(block[:, i:], np.nan)
            off = [min(off[0], np.nanmin(block)), max(off[1], np.nanmax(block))]
        lines.append(
            f"  conflict: T={len(space.names)}, cosine range [{off[0]:.2f}, {off[1]:.2f}], "
            f"explained variance of PC1-5: {ev}"
        )
    else:
        lines.append("  conflict: not yet")
    if run.partition.exists():
        part = run.load_partition()
        lines.append(f"  partition: {part.method}, K={part.k} {dict(part.params)}")
        lines += [f"    {x[2:]}" for x in gain_search_lines(run) if x.startswith("- ")]
        for g, (members, ex, w) in enumerate(
            zip(part.groups, part.group_examples, part.weights, strict=True)
        ):
            lines.append(f"    group {g}: {len(members)} sources, {ex} examples, w={w:.3f}")
        unplaced = [n for n in run.source_names() if n not in part.tokens and n not in part.dropped]
        if part.edit_log or unplaced:
            fr = ", ".join(f"{s} {f:g}" for s, f in part.fractions.items()) or "none"
            lines.append(
                f"    curation: {len(part.edit_log)} hand edits; dropped: "
                f"{', '.join(part.dropped) or 'none'}; down-weighted: {fr}; unplaced (train "
                f"refuses to start until placed or dropped): {', '.join(unplaced) or 'none'}"
            )
    else:
        lines.append("  partition: not yet")
    lines += fold_stability_lines(run.root)  # the r = 2 fold agreement and its warning
    if run.artifact("train").exists():
        branches = read_json(run.artifact("train"))["branches"]
        done = sum(b["state"] == "done" for b in branches)
        tokens = sum(b["tokens"] for b in branches if b["state"] == "done")
        lines.append(f"  train: {done}/{len(branches)} branch runs done, {tokens} tokens trained")
    if run.artifact("merge").exists():
        merged = read_json(run.artifact("merge"))
        lines.append(f"  merge: {', '.join(m['label'] for m in merged['merges']) or 'none'}")
        controls = merged.get("controls", [])
        if controls:
            built = sum(c["status"] == "done" for c in controls)
            lines.append(f"  controls: {built} built, {len(controls) - built} not reachable")
    if run.eval.exists():
        models = pd.read_parquet(run.eval, columns=["model"])["model"].unique()
        lines.append(f"  evaluate: {len(models)} models ({', '.join(models)})")
    if run.report.exists():
        lines.append(f"  report: {run.report}")
    return "\n".join(lines)


def stage_status(run_dir: str | Path) -> dict[str, bool]:
    """Which stages' artifacts exist in a run directory (for notebooks polling a run)."""
    run = RunDir(Path(run_dir))
    return {name: run.artifact(name).exists() for name in STAGES}
