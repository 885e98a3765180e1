"""The stage runner over a run directory: mixture → gradients → conflict → partition → train →
merge → evaluate → diagnose → report.

Each stage reads the previous artifact from ``runs/<name>/`` and writes its own atomically; a
stage whose artifact exists and was made from the same inputs is skipped, so re-running resumes.
The wall time of every stage that did work is kept in ``timings.json``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from merit_lab.config import RunConfig, config_hash, load_config
from merit_lab.conflict import ConflictSpace, compute_conflict_space
from merit_lab.gradients import GradientBank, estimate_gradients
from merit_lab.io import atomic_write_json, read_json
from merit_lab.mixture import SPLITS, Mixture, load_mixture
from merit_lab.partition import (
    Partition,
    split_balanced,
    split_balanced_k,
    split_kmeans,
    split_random,
)

__all__ = [
    "STAGES",
    "RunDir",
    "load_run_mixture",
    "load_source_table",
    "make_partition",
    "run_pipeline",
    "run_summary",
    "stage_status",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunDir:
    """Paths of one run's artifacts (see ARCHITECTURE.md, "The run directory")."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def mixture(self) -> Path:
        return self.root / "mixture.json"

    @property
    def gradients(self) -> Path:
        return self.root / "gradients"

    @property
    def conflict(self) -> Path:
        return self.root / "conflict.json"

    @property
    def partition(self) -> Path:
        return self.root / "partition.json"

    @property
    def eval(self) -> Path:
        return self.root / "eval.parquet"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def timings(self) -> Path:
        return self.root / "timings.json"

    def artifact(self, stage: str) -> Path:
        """The file (or folder) whose presence marks ``stage`` as done."""
        return {
            "mixture": self.mixture,
            "gradients": self.gradients / "bank.json",
            "conflict": self.conflict,
            "partition": self.partition,
            "train": self.root / "train.json",
            "merge": self.root / "merge.json",
            "evaluate": self.eval,
            "diagnose": self.root / "diagnostics" / "gain.json",
            "report": self.report,
        }[stage]

    def load_config(self) -> RunConfig:
        return load_config(self.config)


def _model_fingerprint(model: str) -> str:
    """`fingerprint_checkpoint` of a local folder (the value branches record as their base), else
    the hub id as given."""
    from merit_lab.merge import fingerprint_checkpoint

    return fingerprint_checkpoint(model) if any(Path(model).glob("*.safetensors")) else model


def mixture_args(cfg: RunConfig) -> dict:
    """`load_mixture`'s arguments for a run (``path`` included): every stage and every branch
    spec loads the mixture with exactly these, so all see the same splits."""
    m = cfg.mixture
    return {
        "path": m.path,
        "source_column": m.source_column,
        "calibration_n": cfg.calibration.n,
        "eval_fraction": m.eval_fraction,
        "seed": cfg.seed,
        "split": m.split,
    }


def load_run_mixture(cfg: RunConfig) -> Mixture:
    """The mixture a run config names, split as the run splits it."""
    args = mixture_args(cfg)
    return load_mixture(args.pop("path"), **args)


def _stage_mixture(cfg: RunConfig, run: RunDir) -> bool:
    from merit_lab.formatting import tokenize_examples
    from merit_lab.models import load_tokenizer, resolve_model_path

    key = config_hash(cfg.mixture, cfg.seed, cfg.calibration, cfg.model, cfg.train.max_length)
    if run.mixture.exists() and read_json(run.mixture).get("key") == key:
        log.info("mixture: up to date")
        return False
    mixture = load_run_mixture(cfg)
    tok = load_tokenizer(resolve_model_path(cfg.model), trust_remote_code=cfg.trust_remote_code)
    from tqdm.auto import tqdm

    sources = []
    for s in tqdm(mixture, desc="tokenising sources", unit="source"):
        # counted at the length branches train at: these counts are the merge weights' N_k
        toks = tokenize_examples(tok, s.train, cfg.train.max_length)
        sources.append(
            {
                "name": s.name,
                **{f"n_{sp}": len(s.split(sp)) for sp in SPLITS},
                "train_tokens": sum(t.n_tokens for t in toks),
                "train_response_tokens": sum(t.n_response_tokens for t in toks),
                "calibration_ids": [ex["id"] for ex in s.calibration[: cfg.calibration.n]],
                "metadata": dict(s.metadata),
                "origin": s.origin,
            }
        )
    atomic_write_json(
        run.mixture,
        {
            "key": key,
            "origin": mixture.origin,
            "seed": mixture.seed,
            "info": dict(mixture.info),
            "sources": sources,
        },
    )
    return True


def _stage_gradients(cfg: RunConfig, run: RunDir) -> bool:
    from merit_lab.models import load_model, load_tokenizer, resolve_model_path

    names = [s["name"] for s in read_json(run.mixture)["sources"]]
    model_path = resolve_model_path(cfg.model)
    fingerprint = _model_fingerprint(model_path)
    key = config_hash(
        cfg.mixture, cfg.seed, cfg.calibration, cfg.sketch, cfg.parameters, cfg.dtype, names,
        fingerprint,
    )  # fmt: skip
    bank_json = run.gradients / "bank.json"
    if bank_json.exists() and read_json(bank_json)["info"].get("stage_key") == key:
        log.info("gradients: up to date")
        return False
    mixture = load_run_mixture(cfg)
    tok = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
    model = load_model(
        model_path, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code
    )
    bank = estimate_gradients(
        model,
        tok,
        mixture,
        sketch=cfg.sketch,
        n=cfg.calibration.n,
        micro_batch_size=cfg.calibration.micro_batch_size,
        max_length=cfg.calibration.max_length,
        include=cfg.parameters.include,
        exclude=cfg.parameters.exclude,
        out_dir=run.gradients,
        sources=names,
        model_fingerprint=fingerprint,
    )
    GradientBank(bank.names, bank.rows, {**bank.info, "stage_key": key}, bank.stats).save(
        run.gradients
    )
    return True


def _stage_conflict(cfg: RunConfig, run: RunDir) -> bool:
    bank_key = read_json(run.gradients / "bank.json")["info"]["stage_key"]
    if run.conflict.exists() and read_json(run.conflict).get("bank_key") == bank_key:
        log.info("conflict: up to date")
        return False
    bank = GradientBank.load(run.gradients)
    space = compute_conflict_space(bank.rows, bank.names)
    data = space.to_dict()
    data["bank_key"] = bank_key
    atomic_write_json(run.conflict, data)
    return True


def source_counts(run: RunDir) -> tuple[dict[str, int], dict[str, int]]:
    """Per-source train examples and train tokens, from ``mixture.json``."""
    sources = read_json(run.mixture)["sources"]
    return (
        {s["name"]: s["n_train"] for s in sources},
        {s["name"]: s["train_tokens"] for s in sources},
    )


def make_partition(
    space: ConflictSpace,
    examples: dict[str, int],
    tokens: dict[str, int],
    *,
    method: str = "balanced",
    r: int | None = None,
    k: int | None = None,
    seed: int = 0,
) -> Partition:
    """Dispatch to the partition methods by name; ``r`` gives K = 2^r, else ``k`` is K."""
    if r is None and k is None:
        raise ValueError("give r (K = 2^r groups) or k")
    if method == "balanced":
        if r is not None and k is None:
            return split_balanced(space, examples, tokens, r=r)
        return split_balanced_k(space, examples, tokens, k=k if k is not None else 2**r)
    kk = k if k is not None else 2**r
    if method == "random":
        return split_random(space.names, examples, tokens, k=kk, seed=seed)
    if method == "kmeans":
        return split_kmeans(space, examples, tokens, k=kk, seed=seed)
    raise ValueError(f"unknown partition method {method!r}; expected balanced, random or kmeans")


def _stage_partition(cfg: RunConfig, run: RunDir) -> bool:
    conflict_key = config_hash(read_json(run.conflict))
    key = config_hash(cfg.partition, conflict_key, read_json(run.mixture)["key"])
    if run.partition.exists():
        existing = read_json(run.partition)
        if existing.get("params", {}).get("stage_key") == key or existing.get("edit_log"):
            # Hand edits are never overwritten by a re-run; delete partition.json to redo it.
            log.info("partition: up to date (or hand-edited)")
            return False
    space = ConflictSpace.load(run.conflict)
    examples, tokens = source_counts(run)
    p = cfg.partition
    part = make_partition(space, examples, tokens, method=p.method, r=p.r, k=p.k, seed=p.seed)
    data = part.to_dict()
    data["params"] = {**data.get("params", {}), "stage_key": key}
    atomic_write_json(run.partition, data)
    return True


def _stage_train(cfg: RunConfig, run: RunDir) -> bool:
    """Every branch and joint run; finished ones are skipped, killed ones resume."""
    from merit_lab.experiments import train_experiments, training_status

    status = training_status(cfg)
    if len(status) and (status["state"] == "done").all() and run.artifact("train").exists():
        log.info("train: every branch is done")
        return False
    train_experiments(cfg)
    status = training_status(cfg)
    atomic_write_json(run.artifact("train"), {"branches": status.to_dict(orient="records")})
    return True


def _stage_merge(cfg: RunConfig, run: RunDir) -> bool:
    from merit_lab.experiments import merge_rows

    merged = merge_rows(cfg)
    atomic_write_json(run.artifact("merge"), {"merges": merged})
    return any(m["seconds"] > 0 for m in merged)


def _stage_evaluate(cfg: RunConfig, run: RunDir) -> bool:
    from merit_lab.experiments import evaluate_rows

    return bool(evaluate_rows(cfg).attrs["evaluated"])


def _stage_diagnose(cfg: RunConfig, run: RunDir) -> bool:
    """Merge-readiness diagnostics and the gain theory (``diagnostics/*.json``), resumable."""
    from merit_lab.diagnose import run_diagnostics

    if not any(e.kind == "split" and "linear" in e.merges for e in cfg.experiments):
        log.info("diagnose: no split experiment with a linear merge")
        return False

    def stamps() -> dict:
        return {p: p.stat().st_mtime_ns for p in (run.root / "diagnostics").glob("*.json")}

    before = stamps()
    d = cfg.diagnostics
    run_diagnostics(
        run.root,
        experiments=list(d.experiments) or None,
        max_examples=d.max_examples,
        alphas=d.alphas,
        sigmas=d.sigmas,
        seeds=d.seeds,
        hessian_k=d.hessian_k,
        hessian_iter=d.hessian_iter,
        curvature_examples=d.curvature_examples,
        curvature_params=list(d.curvature_params) or None,
    )
    return stamps() != before


def _stage_report(cfg: RunConfig, run: RunDir) -> bool:
    from merit_lab.report import write_report

    write_report(run.root)
    return True


STAGES: dict[str, Callable[[RunConfig, RunDir], bool]] = {
    "mixture": _stage_mixture,
    "gradients": _stage_gradients,
    "conflict": _stage_conflict,
    "partition": _stage_partition,
    "train": _stage_train,
    "merge": _stage_merge,
    "evaluate": _stage_evaluate,
    "diagnose": _stage_diagnose,
    "report": _stage_report,
}


def run_pipeline(
    cfg: RunConfig | str | Path,
    stages: Sequence[str] | None = None,
    *,
    until: str | None = None,
    force: bool = False,
) -> RunDir:
    """Run ``stages`` (default: all, in order) of a config; skip those already complete.

    Args:
        stages: the stages to run (in pipeline order whatever the order given).
        until: run every stage up to and including this one (e.g. ``"partition"``: the
            analysis before any training).
        force: redo the named stages even when their artifacts are current.

    Returns:
        The run directory.
    """
    if not isinstance(cfg, RunConfig):
        cfg = load_config(cfg)
    if until is not None:
        if until not in STAGES or stages is not None:
            raise ValueError(f"until must be one of {list(STAGES)}, and not given with stages")
        stages = list(STAGES)[: list(STAGES).index(until) + 1]
    stages = list(stages or STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; expected some of {list(STAGES)}")
    run = RunDir(cfg.run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    cfg.save(run.config)
    for name in STAGES:
        if name not in stages:
            continue
        if force:
            _clear_stage(run, name)
        t0 = time.perf_counter()
        did_work = STAGES[name](cfg, run)
        seconds = time.perf_counter() - t0
        log.info("%s: %.1f s%s", name, seconds, "" if did_work else " (up to date)")
        if did_work:
            timings = read_json(run.timings) if run.timings.exists() else {}
            timings[name] = round(seconds, 2)
            atomic_write_json(run.timings, timings)
    return run


def _clear_stage(run: RunDir, name: str) -> None:
    import shutil

    if name in ("train", "merge"):
        raise ValueError(
            f"--force {name} would retrain or re-merge everything; delete the branches/, joint/ "
            "or merged/ folders you want redone instead (finished ones are skipped otherwise)"
        )
    if name == "evaluate":  # the per-model cache too, or it would be read back
        shutil.rmtree(run.root / "eval", ignore_errors=True)
    if name == "diagnose":
        shutil.rmtree(run.root / "diagnostics", ignore_errors=True)
        return
    path = run.gradients if name == "gradients" else run.artifact(name)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def run_summary(run_dir: str | Path) -> str:
    """A plain-text summary of what a run directory holds."""
    run = RunDir(Path(run_dir))
    if not run.config.exists():
        raise FileNotFoundError(f"{run.root}: not a run directory (no config.yaml)")
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
        bank = GradientBank.load(run.gradients)
        sk = bank.info["sketch"]
        lines.append(
            f"  gradients: {bank.rows.shape[0]} x {bank.rows.shape[1]} {sk['kind']} sketch "
            f"(seed {sk['seed']}), {bank.info['n_parameters']} parameters, n={bank.info['n']}, "
            f"{bank.rows[0].nbytes} bytes/source"
        )
    else:
        lines.append("  gradients: not yet")
    if run.conflict.exists():
        space = ConflictSpace.load(run.conflict)
        ev = ", ".join(f"{v:.2f}" for v in space.explained_variance_ratio[:5])
        off = space.cosine[~np.eye(len(space.names), dtype=bool)]
        lines.append(
            f"  conflict: T={len(space.names)}, cosine range [{off.min():.2f}, {off.max():.2f}], "
            f"explained variance of PC1-5: {ev}"
        )
    else:
        lines.append("  conflict: not yet")
    if run.partition.exists():
        part = Partition.load(run.partition)
        lines.append(f"  partition: {part.method}, K={part.k} {dict(part.params)}")
        for g, (members, ex, w) in enumerate(
            zip(part.groups, part.group_examples, part.weights, strict=True)
        ):
            lines.append(f"    group {g}: {len(members)} sources, {ex} examples, w={w:.3f}")
    else:
        lines.append("  partition: not yet")
    if run.artifact("train").exists():
        branches = read_json(run.artifact("train"))["branches"]
        done = sum(b["state"] == "done" for b in branches)
        tokens = sum(b["tokens"] for b in branches if b["state"] == "done")
        lines.append(f"  train: {done}/{len(branches)} branch runs done, {tokens} tokens trained")
    if run.artifact("merge").exists():
        merges = read_json(run.artifact("merge"))["merges"]
        lines.append(f"  merge: {', '.join(m['label'] for m in merges) or 'none'}")
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


def load_source_table(run_dir: str | Path) -> pd.DataFrame:
    """One row per source (indexed by name): counts, metadata, θ0 loss and gradient norm, group.

    Columns appear as their artifacts exist, so it works on a partly finished run.
    """
    run = RunDir(Path(run_dir))
    rows = []
    for s in read_json(run.mixture)["sources"]:
        rows.append(
            {
                "source": s["name"],
                **{k: v for k, v in s["metadata"].items() if not isinstance(v, (dict, list))},
                "examples": s["n_train"],
                "tokens": s["train_tokens"],
            }
        )
    table = pd.DataFrame(rows).set_index("source", drop=False)
    if (run.gradients / "bank.json").exists():
        stats = read_json(run.gradients / "bank.json")["stats"]
        table["loss_theta0"] = [stats.get(n, {}).get("loss") for n in table.index]
        table["grad_norm"] = [stats.get(n, {}).get("grad_norm") for n in table.index]
    if run.partition.exists():
        part = Partition.load(run.partition)
        table["group"] = [f"G{part.group_of(n)}" for n in table.index]
    return table
