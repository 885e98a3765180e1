"""The comparison rows of a run: branch specs, training, one-shot merges and evaluation.

Input: a run directory whose partition stage is done, and the config's ``experiments``.
Output, under ``runs/<name>/``::

    branches/<experiment>/partition.json   the grouping that experiment trains
    branches/<experiment>/<k>/             one branch: spec.json, checkpoints/, final/, log.jsonl
    joint/ep<epochs>-s<seed>/              a joint run (shared by joint rows and soups)
    merged/<row>/                          HF folder + merge_manifest.json + mergekit.yaml
    eval/<row>.parquet, eval.parquet       one row per (model, source, split, metric)

Every branch starts from θ0 and shares the training hyperparameters; a source contributes the
same tokens whichever branch it lands in, and a joint run on every source for the same epochs
trains on the same token budget as all branches of a split together.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from merit_lab.config import ExperimentConfig, RunConfig, config_hash
from merit_lab.io import atomic_write_bytes, read_json
from merit_lab.partition import Partition

__all__ = [
    "ModelRow",
    "branch_dirs",
    "evaluate_rows",
    "experiment_partition",
    "merge_rows",
    "model_rows",
    "plan_specs",
    "token_budget",
    "train_experiments",
    "training_status",
]

log = logging.getLogger(__name__)

THETA0 = "theta0"


@dataclass(frozen=True)
class ModelRow:
    """One model of the comparison table and where it comes from."""

    label: str  # the table's row name
    experiment: str  # the experiment that makes it ("theta0" for the base)
    kind: str  # theta0 | joint | split | soup
    model_dir: Path  # the HF folder that is evaluated
    inputs: tuple[Path, ...] = ()  # split/soup: the final/ folders merged
    merge_method: str | None = None  # split/soup: the merge method


def _root(cfg: RunConfig) -> Path:
    return Path(cfg.run_dir)


def _joint_dir(cfg: RunConfig, epochs: float, seed: int) -> Path:
    return _root(cfg) / "joint" / f"ep{epochs:g}-s{seed}"


def branch_dirs(cfg: RunConfig, experiment: str) -> list[Path]:
    """The branch folders of a split experiment, in group order (needs its partition)."""
    part = Partition.load(_root(cfg) / "branches" / experiment / "partition.json")
    return [_root(cfg) / "branches" / experiment / str(k) for k in range(part.k)]


def experiment_partition(cfg: RunConfig, exp: ExperimentConfig) -> Partition:
    """The grouping a split experiment trains, written to ``branches/<name>/partition.json``.

    ``method: null`` takes the run's ``partition.json`` (hand edits included); otherwise the
    partition is recomputed from the conflict space. Once a branch of the experiment has started,
    a different grouping is refused rather than mixed with the trained branches.
    """
    from merit_lab.conflict import ConflictSpace
    from merit_lab.pipeline import RunDir, make_partition, source_counts

    root = _root(cfg)
    if exp.method is None:
        part = Partition.load(root / "partition.json")
    else:
        space = ConflictSpace.load(root / "conflict.json")
        examples, tokens = source_counts(RunDir(root))
        part = make_partition(
            space, examples, tokens, method=exp.method, r=exp.r, k=exp.k, seed=exp.seed
        )
    path = root / "branches" / exp.name / "partition.json"
    if path.exists():
        old = Partition.load(path)
        if old.groups == part.groups and dict(old.tokens) == dict(part.tokens):
            return old
        started = [d for d in path.parent.iterdir() if d.is_dir() and (d / "spec.json").exists()]
        if started:
            raise ValueError(
                f"{path.parent}: its branches were planned from a different partition; delete "
                f"that folder (or rename the experiment) to train the new one"
            )
    part.save(path)
    return part


def _spec(cfg: RunConfig, name: str, sources: Sequence[str], out: Path, epochs: float, seed: int):
    from merit_lab.models import resolve_model_path
    from merit_lab.pipeline import mixture_args
    from merit_lab.train import BranchSpec

    t = cfg.train
    mixture = mixture_args(cfg)
    if Path(mixture["path"]).exists():  # absolute, so the spec runs from any working directory
        mixture["path"] = str(Path(mixture["path"]).resolve())
    base = resolve_model_path(cfg.model)
    return BranchSpec(
        name=name,
        base_model=str(Path(base).resolve()) if Path(base).exists() else base,
        output_dir=str(out.resolve()),
        sources=tuple(sources),
        mixture=mixture,
        epochs=epochs,
        lr=t.lr,
        batch_size=t.batch_size,
        grad_accum=t.grad_accum,
        warmup_ratio=t.warmup_ratio,
        lr_scheduler=t.lr_scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        max_length=t.max_length,
        seed=seed,
        device=cfg.device,
        dtype=cfg.dtype,
        save_steps=t.save_steps,
    )


def plan_specs(cfg: RunConfig, experiments: Sequence[str] | None = None) -> dict[str, list]:
    """Branch specs per experiment (joint: one; soup: one per seed; split: one per group).

    Writes each experiment's partition; joint runs with the same epochs and seed are one
    folder, so a soup's seed-0 member is the ``joint-1ep`` model itself.
    """
    names = list(mixture_names(cfg))
    out: dict[str, list] = {}
    for exp in cfg.experiments:
        if experiments is not None and exp.name not in experiments:
            continue
        if exp.kind == "joint":
            d = _joint_dir(cfg, exp.epochs, cfg.train.seed)
            out[exp.name] = [_spec(cfg, d.name, names, d, exp.epochs, cfg.train.seed)]
        elif exp.kind == "soup":
            out[exp.name] = [
                _spec(cfg, d.name, names, d, exp.epochs, s)
                for s in exp.seeds
                for d in [_joint_dir(cfg, exp.epochs, s)]
            ]
        else:
            part = experiment_partition(cfg, exp)
            root = _root(cfg) / "branches" / exp.name
            out[exp.name] = [
                _spec(cfg, f"{exp.name}/{k}", g, root / str(k), exp.epochs, cfg.train.seed)
                for k, g in enumerate(part.groups)
            ]
    return out


def mixture_names(cfg: RunConfig) -> list[str]:
    return [s["name"] for s in read_json(_root(cfg) / "mixture.json")["sources"]]


def train_experiments(cfg: RunConfig, experiments: Sequence[str] | None = None) -> list[Path]:
    """Train every branch and joint run not yet done, with the configured launcher.

    Returns:
        The ``final/`` folders, each once.
    """
    from merit_lab.launch import launch_branches

    unique: dict[str, object] = {}
    for specs in plan_specs(cfg, experiments).values():
        for s in specs:
            unique.setdefault(s.output_dir, s)
    t = cfg.train
    return launch_branches(
        list(unique.values()),
        mode=t.launcher,
        n_procs=t.n_procs,
        gpus=list(t.gpus) or None,
        slurm=t.slurm,
    )


def training_status(cfg: RunConfig) -> pd.DataFrame:
    """One row per branch/joint run: experiment, state, step, total steps, loss, tokens."""
    from merit_lab.train import branch_status

    rows = []
    for exp, specs in plan_specs(cfg).items():
        for s in specs:
            rows.append({"experiment": exp, "branch": s.name, **branch_status(s.output_dir)})
    return pd.DataFrame(rows)


def model_rows(cfg: RunConfig) -> list[ModelRow]:
    """θ0, then every experiment's model(s), in config order (needs the split partitions)."""
    from merit_lab.models import resolve_model_path

    root = _root(cfg)
    rows = [ModelRow(THETA0, THETA0, THETA0, Path(resolve_model_path(cfg.model)))]
    for exp in cfg.experiments:
        if exp.kind == "joint":
            d = _joint_dir(cfg, exp.epochs, cfg.train.seed) / "final"
            rows.append(ModelRow(exp.name, exp.name, "joint", d))
        elif exp.kind == "soup":
            ins = tuple(_joint_dir(cfg, exp.epochs, s) / "final" for s in exp.seeds)
            rows.append(ModelRow(exp.name, exp.name, "soup", root / "merged" / exp.name, ins,
                                 "uniform"))  # fmt: skip
        else:
            ins = tuple(d / "final" for d in branch_dirs(cfg, exp.name))
            for i, method in enumerate(exp.merges):
                label = exp.name if i == 0 else f"{exp.name}+{method}"
                merged = root / "merged" / label
                rows.append(ModelRow(label, exp.name, "split", merged, ins, method))
    return rows


def _merge_key(row: ModelRow, weights: Sequence[float], params: dict) -> str:
    from merit_lab.merge import fingerprint_checkpoint

    return config_hash(
        row.merge_method, list(weights), params, [fingerprint_checkpoint(p) for p in row.inputs]
    )


def merge_rows(cfg: RunConfig) -> list[dict]:
    """Merge every split and soup row once; skip merges whose inputs and settings are unchanged.

    Linear weights are each branch's trained tokens over the total, w_k = N_k / Σ_j N_j, read
    from the branches' ``merit_branch.json``; they equal the partition's token weights when the
    branches trained one epoch.

    Returns:
        Per merged row: label, method, weights, seconds (0 when skipped), output folder.
    """
    from merit_lab.merge import merge_checkpoints
    from merit_lab.models import resolve_model_path
    from merit_lab.train import MANIFEST

    base = Path(resolve_model_path(cfg.model))
    done = []
    for row in model_rows(cfg):
        if not row.inputs:
            continue
        missing = [str(p) for p in row.inputs if not (p / MANIFEST).is_file()]
        if missing:
            raise FileNotFoundError(f"{row.label}: untrained branches {missing}; run stage train")
        tokens = [read_json(p / MANIFEST)["tokens"] for p in row.inputs]
        weights = [n / sum(tokens) for n in tokens] if row.merge_method == "linear" else None
        params = dict(cfg.merge.params.get(row.merge_method, {}))
        key = _merge_key(row, weights or [], params)
        manifest = row.model_dir / "merge_manifest.json"
        if manifest.is_file() and read_json(manifest).get("merit_key") == key:
            done.append({"label": row.label, "method": row.merge_method, "seconds": 0.0})
            continue
        report = merge_checkpoints(
            row.inputs,
            row.model_dir,
            method=row.merge_method,
            weights=weights,
            base=base if base.is_dir() else None,
            params=params,
            shard_size=cfg.merge.shard_size,
            overwrite=True,
        )
        _stamp_manifest(manifest, key, tokens)
        done.append(
            {
                "label": row.label,
                "method": row.merge_method,
                "weights": list(report.weights),
                "seconds": report.seconds,
            }
        )
    return done


def _stamp_manifest(path: Path, key: str, tokens: Sequence[int]) -> None:
    """Record the stage key and the branch token counts N_k beside the merge's own facts."""
    from merit_lab.io import atomic_write_json

    data = read_json(path)
    data.update(merit_key=key, branch_tokens=list(tokens))
    atomic_write_json(path, data)


def evaluate_rows(cfg: RunConfig, *, progress: bool = True) -> pd.DataFrame:
    """Evaluate every row on the same held-out examples; cache one parquet per row.

    A row is re-evaluated only when its weights or the evaluation settings changed (the cache
    key is the model folder's weight fingerprint and the eval config).

    Returns:
        The long table (written to ``eval.parquet``): model, kind, source, family, split,
        metric, value, n; ``.attrs["evaluated"]`` lists the rows scored in this call.
    """
    import torch

    from merit_lab.evaluate import evaluate_model
    from merit_lab.merge import fingerprint_checkpoint
    from merit_lab.models import load_model, load_tokenizer
    from merit_lab.pipeline import load_run_mixture

    root = _root(cfg)
    mixture = load_run_mixture(cfg)
    names = mixture_names(cfg)
    tables, evaluated = [], []
    tokenizer = None
    e = cfg.eval
    rows = model_rows(cfg)
    for row in rows:
        if not any(row.model_dir.glob("*.safetensors")):
            raise FileNotFoundError(f"{row.label}: no model at {row.model_dir}; run train/merge")
        key = config_hash(e, fingerprint_checkpoint(row.model_dir), names, cfg.train.max_length)
        cache = root / "eval" / f"{row.label.replace('/', '_')}.parquet"
        if cache.is_file():
            old = pd.read_parquet(cache)
            if len(old) and (old["key"] == key).all():
                tables.append(old)
                continue
        tokenizer = tokenizer or load_tokenizer(row.model_dir, trust_remote_code=False)
        model = load_model(row.model_dir, device=cfg.device, dtype=cfg.dtype)
        parts = []
        for split in e.splits:
            parts.append(
                evaluate_model(
                    model,
                    tokenizer,
                    mixture,
                    label=row.label,
                    split=split,
                    sources=names,
                    max_examples=e.max_examples,
                    max_length=cfg.train.max_length,
                    exact_match=e.exact_match and split == "eval",
                    max_new_tokens=e.max_new_tokens,
                    batch_size=e.batch_size,
                    progress=progress,
                )
            )
        table = pd.concat(parts, ignore_index=True)
        table.insert(1, "kind", row.kind)
        table["key"] = key
        _write_parquet(cache, table)
        tables.append(table)
        evaluated.append(row.label)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    full = pd.concat(tables, ignore_index=True).drop(columns="key")
    if evaluated or not (root / "eval.parquet").is_file():
        _write_parquet(root / "eval.parquet", full)
    full.attrs["evaluated"] = evaluated  # the rows scored now (the others came from the cache)
    stale = {p.name for p in (root / "eval").glob("*.parquet")} - {
        f"{r.label.replace('/', '_')}.parquet" for r in rows
    }
    for name in stale:  # rows no longer in the config
        (root / "eval" / name).unlink()
    return full


def _write_parquet(path: Path, table: pd.DataFrame) -> None:
    import io

    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())


def token_budget(cfg: RunConfig) -> pd.DataFrame:
    """Per row: branches, trained tokens in total and per branch (the same-budget check)."""
    from merit_lab.train import MANIFEST

    rows = []
    for row in model_rows(cfg):
        if row.kind == THETA0:
            continue
        finals = row.inputs or (row.model_dir,)
        tokens = [
            read_json(f / MANIFEST)["tokens"] if (f / MANIFEST).is_file() else math.nan
            for f in finals
        ]
        rows.append(
            {
                "model": row.label,
                "kind": row.kind,
                "branches": len(finals),
                "tokens": sum(tokens) if row.kind != "soup" else tokens[0],
                "branch_tokens": tokens,
                "merge": row.merge_method or "",
            }
        )
    return pd.DataFrame(rows)
