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

import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

import pandas as pd
import torch

from merit_lab.config.schema import ExperimentConfig, RunConfig, config_hash
from merit_lab.evaluation.evaluate import EVAL_METRICS, evaluate_model
from merit_lab.evaluation.lm_eval import run_lm_eval
from merit_lab.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
    sha256_file,
)
from merit_lab.merging.lora import merge_lora
from merit_lab.merging.methods import merge_checkpoints
from merit_lab.models.checkpoints import fingerprint_checkpoint
from merit_lab.models.loading import load_model, load_tokenizer, resolve_model_path
from merit_lab.partition.plan import Partition, make_partition
from merit_lab.pipeline.rundir import (
    RunDir,
    load_run_mixture,
    mixture_args,
    source_counts,
    writes_run,
)
from merit_lab.training.launch import launch_branches
from merit_lab.training.trainer import MANIFEST, BranchSpec

__all__ = [
    "SEED_MARK",
    "ModelRow",
    "branch_dirs",
    "evaluate_rows",
    "experiment_partition",
    "merge_rows",
    "model_rows",
    "plan_specs",
    "seed_variants",
    "train_experiments",
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
    seed: int | None = None  # the training seed (None: θ0; a soup: its first joint run's)
    base: str = ""  # the label without the seed mark: the row its seeds are averaged into

    @property
    def repeat(self) -> bool:
        """A repeat of a row under another of ``train.seeds`` (label ``<base>@s<seed>``)."""
        return self.label != self.base


SEED_MARK = "@s"  # `<row>@s<seed>`: a row trained again under another of train.seeds


def seed_variants(cfg: RunConfig) -> list[tuple[ExperimentConfig, int, str]]:
    """Every experiment under each training seed: (experiment, seed, seed suffix).

    The config's own ``train.seed`` comes first with an empty suffix (the rows and folders as
    they have always been); each of ``train.seeds`` repeats the joint and split experiments under
    ``<name>@s<seed>`` (their own branch folders and merges; joint runs are keyed by seed
    anyway). A soup is not repeated: it is already an average over joint seeds.
    """
    out = [(exp, cfg.train.seed, "") for exp in cfg.experiments]
    for seed in cfg.train.seeds:
        mark = f"{SEED_MARK}{seed}"
        out += [
            (replace(exp, name=exp.name + mark), seed, mark)
            for exp in cfg.experiments
            if exp.kind != "soup"
        ]
    return out


def _run(cfg: RunConfig) -> RunDir:
    return RunDir(Path(cfg.run_dir))


@dataclass(frozen=True)
class Curation:
    """What the rows train, read once from the run's ``partition.json``.

    Attributes:
        sources: the kept sources, in ``mixture.json`` order (dropped ones left out).
        fractions: source → the share f < 1 of its train examples every row trains.
        dropped: sources a hand edit removed (they train in no row).
        partition: the run's partition (None before the partition stage).
        excluded: source → ids of train examples a hand edit dropped (no row trains them).
    """

    sources: tuple[str, ...]
    fractions: Mapping[str, float]
    dropped: tuple[str, ...]
    partition: Partition | None
    excluded: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def load_curation(cfg: RunConfig) -> Curation:
    """The curated mixture every row trains: the run partition's sources and fractions.

    Raises:
        ValueError: a hand-edited partition that leaves a source of ``mixture.json`` neither
            placed nor dropped (added to the mixture after the edit): add or drop it first,
            rather than train without it unannounced.
    """
    run = _run(cfg)
    names = run.source_names()
    if not run.partition.exists():
        return Curation(tuple(names), {}, (), None)
    part = run.load_partition()
    kept = set(part.sources)
    unknown = sorted(kept - set(names))
    if unknown:
        raise ValueError(f"{run.partition}: sources not in mixture.json: {unknown}")
    unplaced = [n for n in names if n not in kept and n not in part.dropped]
    if unplaced:
        raise ValueError(
            f"{run.partition}: sources {unplaced} are in the mixture but in no group and not "
            "dropped; place them (EditSession.add) or drop them before training"
        )
    return Curation(
        tuple(n for n in names if n in kept),
        dict(part.fractions),
        part.dropped,
        part,
        dict(part.excluded),
    )


def branch_dirs(cfg: RunConfig, experiment: str) -> list[Path]:
    """The branch folders of a split experiment, in group order (needs its partition)."""
    run = _run(cfg)
    return [run.branch_dir(experiment, k) for k in range(run.load_partition(experiment).k)]


def _curated_split(cfg: RunConfig, exp: ExperimentConfig, cur: Curation) -> Partition:
    """A recomputed split of the curated sources: their own conflict space, the counts of what
    they train (down-weighted subsets included), the curation's fractions carried along."""
    run = _run(cfg)
    space = run.load_space()
    if set(cur.sources) != set(space.names):
        space = space.select(cur.sources)
    if cur.partition is not None:
        examples, tokens = dict(cur.partition.examples), dict(cur.partition.tokens)
    else:
        examples, tokens = source_counts(run)
    part = make_partition(
        space, examples, tokens, method=exp.method, r=exp.r, k=exp.k, seed=exp.seed
    )
    if cur.fractions or cur.dropped or cur.excluded:
        part = replace(part, fractions=cur.fractions, dropped=cur.dropped, excluded=cur.excluded)
    return part


def experiment_partition(cfg: RunConfig, exp: ExperimentConfig) -> Partition:
    """The grouping a split experiment trains, written to ``branches/<name>/partition.json``.

    ``method: null`` takes the run's ``partition.json`` (hand edits included); otherwise the
    curated sources are split again in their own conflict space. Once a branch of the experiment
    has started, a different grouping is refused rather than mixed with the trained branches.
    """
    run = _run(cfg)
    cur = load_curation(cfg)
    part = cur.partition if exp.method is None else _curated_split(cfg, exp, cur)
    if part is None:
        raise FileNotFoundError(f"{run.partition} is missing: run the partition stage")
    path = run.experiment_partition(exp.name)
    if path.exists():
        old = Partition.load(path)
        if (old.groups, dict(old.tokens), dict(old.fractions)) == (
            part.groups,
            dict(part.tokens),
            dict(part.fractions),
        ):
            return old
        started = [d for d in path.parent.iterdir() if d.is_dir() and (d / "spec.json").exists()]
        if started:
            raise ValueError(
                f"{path.parent}: its branches were planned from a different partition; delete "
                f"that folder (or rename the experiment) to train the new one"
            )
    part.save(path)
    return part


def _spec(
    cfg: RunConfig,
    name: str,
    sources: Sequence[str],
    out: Path,
    epochs: float,
    seed: int,
    fractions: Mapping[str, float],
    excluded: Mapping[str, Sequence[str]] = MappingProxyType({}),
) -> BranchSpec:
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
        long_examples=cfg.mixture.long_examples,
        seed=seed,
        device=cfg.device,
        dtype=cfg.dtype,
        save_steps=t.save_steps,
        fractions={s: f for s, f in fractions.items() if s in sources},
        excluded={s: list(ids) for s, ids in excluded.items() if s in sources},
        trust_remote_code=cfg.trust_remote_code,
        procs_per_branch=t.procs_per_branch,  # each launcher mode runs N processes per branch
        distributed=t.distributed,
        gradient_checkpointing=t.gradient_checkpointing,
        lora_r=t.lora_r,
        lora_alpha=t.lora_alpha,
        lora_dropout=t.lora_dropout,
        lora_target_modules=t.lora_target_modules,
        lora_rslora=t.lora_rslora,
    )


def plan_specs(cfg: RunConfig, experiments: Sequence[str] | None = None) -> dict[str, list]:
    """Branch specs per experiment (joint: one; soup: one per seed; split: one per group).

    Every row trains the curated mixture (`load_curation`): dropped sources in none, a
    down-weighted source's same seeded subset in all, so joint and split rows keep one token
    budget. Writes each experiment's partition; joint runs with the same epochs and seed are one
    folder, so a soup's seed-0 member is the ``joint-1ep`` model itself.
    """
    run = _run(cfg)
    cur = load_curation(cfg)
    out: dict[str, list] = {}
    for exp, seed, mark in seed_variants(cfg):
        if experiments is not None and exp.name.removesuffix(mark) not in experiments:
            continue
        if exp.kind in ("joint", "soup"):
            seeds = [seed] if exp.kind == "joint" else list(exp.seeds)
            out[exp.name] = [
                _spec(cfg, d.name, cur.sources, d, exp.epochs, s, cur.fractions, cur.excluded)
                for s in seeds
                for d in [run.joint_dir(exp.epochs, s)]
            ]
        else:
            part = experiment_partition(cfg, exp)
            out[exp.name] = [
                _spec(
                    cfg,
                    f"{exp.name}/{k}",
                    g,
                    run.branch_dir(exp.name, k),
                    exp.epochs,
                    seed,
                    part.fractions,
                    part.excluded,
                )
                for k, g in enumerate(part.groups)
            ]
    return out


def mixture_names(cfg: RunConfig) -> list[str]:
    """The sources the rows train and are scored on: the curated mixture."""
    return list(load_curation(cfg).sources)


@writes_run
def train_experiments(cfg: RunConfig, experiments: Sequence[str] | None = None) -> list[Path]:
    """Train every branch and joint run not yet done, with the configured launcher.

    Returns:
        The ``final/`` folders, each once.
    """

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


def model_rows(cfg: RunConfig) -> list[ModelRow]:
    """θ0, then every experiment's model(s), in config order (needs the split partitions)."""
    run = _run(cfg)
    rows = [ModelRow(THETA0, THETA0, THETA0, Path(resolve_model_path(cfg.model)), base=THETA0)]
    for exp, seed, mark in seed_variants(cfg):
        name = exp.name.removesuffix(mark)
        if exp.kind == "joint":
            d = run.joint_dir(exp.epochs, seed) / "final"
            rows.append(ModelRow(exp.name, exp.name, "joint", d, seed=seed, base=name))
        elif exp.kind == "soup":
            ins = tuple(run.joint_dir(exp.epochs, s) / "final" for s in exp.seeds)
            rows.append(
                ModelRow(
                    exp.name,
                    exp.name,
                    "soup",
                    run.merged_dir(exp.name),
                    ins,
                    "uniform",
                    seed=exp.seeds[0],
                    base=name,
                )
            )
        else:
            ins = tuple(d / "final" for d in branch_dirs(cfg, exp.name))
            for i, method in enumerate(exp.merges):
                base = name if i == 0 else f"{name}+{method}"
                merged = run.merged_dir(base + mark)
                rows.append(
                    ModelRow(
                        base + mark, exp.name, "split", merged, ins, method, seed=seed, base=base
                    )
                )
    return rows


def _merge_key(row: ModelRow, weights: Sequence[float], params: dict) -> str:

    return config_hash(
        row.merge_method, list(weights), params, [fingerprint_checkpoint(p) for p in row.inputs]
    )


@writes_run
def merge_rows(cfg: RunConfig) -> list[dict]:
    """Merge every split and soup row once; skip merges whose inputs and settings are unchanged.

    Linear weights are each branch's trained tokens over the total, w_k = N_k / Σ_j N_j, read
    from the branches' ``merit_branch.json``; they equal the partition's token weights when the
    branches trained one epoch.

    Returns:
        Per merged row: label, method, weights, seconds (0 when skipped), output folder.
    """

    run, base = _run(cfg), Path(resolve_model_path(cfg.model))
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
        if run.is_current("merged", key, row.label):
            _repoint_merge_records(row, base if base.is_dir() else None)
            weights = read_json(manifest)["weights"]  # as the merge that made it recorded them
            done.append(
                {"label": row.label, "method": row.merge_method, "weights": weights, "seconds": 0.0}
            )
            continue
        if cfg.train.lora_r and row.merge_method in ("linear", "uniform"):
            # exact: θ0 + Σ w_k s_k B_k A_k from the adapters, plus the stacked adapter; ties and
            # task arithmetic take the branches' dense ΔW_k = θ_k − θ0 below, tensor by tensor
            report = merge_lora(
                row.inputs,
                row.model_dir,
                base=base,
                weights=weights,
                method=row.merge_method,
                shard_size=cfg.merge.shard_size,
                overwrite=True,
            )
        else:
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
    data = read_json(path)
    data.update(merit_key=key, branch_tokens=list(tokens))
    atomic_write_json(path, data)


def _repoint_merge_records(row: ModelRow, base: Path | None) -> None:
    """Point a current merge's records (``merge_manifest.json``, ``mergekit.yaml``) at where its
    inputs are now, after the run (or θ0) moved: the same files, so every hash stays true."""
    import yaml

    path = row.model_dir / "merge_manifest.json"
    data = read_json(path)
    inputs = [str(p.resolve()) for p in row.inputs]
    base_path = str(base.resolve()) if base is not None else None
    recorded_base = (data.get("base") or {}).get("path")
    if [i["path"] for i in data["inputs"]] == inputs and recorded_base in (None, base_path):
        return
    for entry, p in zip(data["inputs"], inputs, strict=True):
        entry["path"] = p
    if recorded_base is not None and base_path is not None:
        data["base"]["path"] = base_path
    mk_path = row.model_dir / "mergekit.yaml"
    if mk_path.is_file():
        mk = yaml.safe_load(mk_path.read_text(encoding="utf-8"))
        for model, p in zip(mk["models"], inputs, strict=True):
            model["model"] = p
        if "base_model" in mk and base_path is not None:
            mk["base_model"] = base_path
        atomic_write_text(mk_path, yaml.safe_dump(mk, sort_keys=False))
        data["output"]["files"]["mergekit.yaml"] = sha256_file(mk_path)
    atomic_write_json(path, data)
    log.info("%s: merge records re-pointed at the inputs' new location", row.label)


@writes_run
def evaluate_rows(cfg: RunConfig, *, progress: bool = True) -> pd.DataFrame:
    """Evaluate every row on the same held-out examples; cache one parquet per row.

    A row is re-evaluated only when its weights or the evaluation settings changed (the cache
    key is the model folder's weight fingerprint and the eval config).

    Returns:
        The long table (written to ``eval.parquet``): model, kind, source, family, split,
        metric, value, n; ``.attrs["evaluated"]`` lists the rows scored in this call.
    """

    run = _run(cfg)
    mixture = load_run_mixture(cfg)
    names = mixture_names(cfg)
    tables, evaluated = [], []
    tokenizer = None
    e = cfg.eval
    rows = model_rows(cfg)
    for row in rows:
        if not any(row.model_dir.glob("*.safetensors")):
            raise FileNotFoundError(f"{row.label}: no model at {row.model_dir}; run train/merge")
        key = config_hash(
            # without lm_eval when unset: the keys of runs from before the field stay current
            {k: v for k, v in asdict(e).items() if k != "lm_eval" or v is not None},
            fingerprint_checkpoint(row.model_dir),
            names,
            cfg.train.max_length,
            cfg.mixture.long_examples,
            EVAL_METRICS,
        )
        cache = run.eval_cache(row.label)
        if run.is_current("eval", key, row.label):
            tables.append(pd.read_parquet(cache))
            continue
        remote = cfg.trust_remote_code
        tokenizer = tokenizer or load_tokenizer(row.model_dir, trust_remote_code=remote)
        model = load_model(
            row.model_dir, device=cfg.device, dtype=cfg.dtype, trust_remote_code=remote
        )
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
                    long_examples=cfg.mixture.long_examples,
                    exact_match=e.exact_match and split == "eval",
                    max_new_tokens=e.max_new_tokens,
                    batch_size=e.batch_size,
                    progress=progress,
                )
            )
        if e.lm_eval:  # lm-evaluation-harness tasks on the loaded model: split "lm-eval" rows
            opts = {k: v for k, v in e.lm_eval.items() if k != "tasks"}
            parts.append(
                run_lm_eval(
                    row.model_dir,
                    e.lm_eval["tasks"],
                    label=row.label,
                    model=model,
                    tokenizer=tokenizer,
                    **opts,
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
    if evaluated or not run.eval.is_file():
        _write_parquet(run.eval, full)
    full.attrs["evaluated"] = evaluated  # the rows scored now (the others came from the cache)
    stale = {p.name for p in run.eval_dir.glob("*.parquet")} - {
        run.eval_cache(r.label).name for r in rows
    }
    for name in stale:  # rows no longer in the config
        (run.eval_dir / name).unlink()
    return full


def _write_parquet(path: Path, table: pd.DataFrame) -> None:

    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())
