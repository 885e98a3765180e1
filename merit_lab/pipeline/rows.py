"""The comparison's rows: which models the table holds and the branches each one trains.

Input: a run config (its ``experiments`` and ``train.seeds``) and the run's curation
(`merit_lab.pipeline.curation`). Output: `ModelRow`s (θ0 first, then every experiment's models)
and `BranchSpec`s per experiment, built from the config's own sections. Each experiment kind is
one entry of `ROW_KINDS`: what it trains and which rows it adds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType

from merit_lab.config.schema import ExperimentConfig, RunConfig
from merit_lab.models.loading import resolve_model_path
from merit_lab.pipeline.curation import (
    Curation,
    branch_dirs,
    experiment_partition,
    load_curation,
)
from merit_lab.pipeline.rundir import RunDir, mixture_args
from merit_lab.training.spec import BranchSpec

__all__ = [
    "ROW_KINDS",
    "SEED_MARK",
    "THETA0",
    "ModelRow",
    "RowKind",
    "branch_spec",
    "model_rows",
    "plan_specs",
    "seed_variants",
]

THETA0 = "theta0"
SEED_MARK = "@s"  # `<row>@s<seed>`: a row trained again under another of train.seeds


@dataclass(frozen=True)
class ModelRow:
    """One model of the comparison table and where it comes from."""

    label: str  # the table's row name
    experiment: str  # the experiment that makes it ("theta0" for the base)
    kind: str  # "theta0", or the experiment's kind (joint | split | soup)
    model_dir: Path  # the HF folder that is evaluated
    inputs: tuple[Path, ...] = ()  # split/soup: the final/ folders merged
    merge_method: str | None = None  # split/soup: the merge method
    seed: int | None = None  # the training seed (None: θ0; a soup: its first joint run's)
    base: str = ""  # the label without the seed mark: the row its seeds are averaged into

    @property
    def repeat(self) -> bool:
        """A repeat of a row under another of ``train.seeds`` (label ``<base>@s<seed>``)."""
        return self.label != self.base


def branch_spec(
    cfg: RunConfig,
    name: str,
    sources: Sequence[str],
    out: Path,
    epochs: float,
    seed: int,
    fractions: Mapping[str, float] = MappingProxyType({}),
    excluded: Mapping[str, Sequence[str]] = MappingProxyType({}),
) -> BranchSpec:
    """The spec of one branch of the run: the config's ``train`` section with this branch's
    seed, θ0 and the mixture as absolute paths (so it trains from any working directory), and
    the curation's down-weights and exclusions of the sources it trains."""
    mixture = mixture_args(cfg)
    if Path(mixture["path"]).exists():
        mixture["path"] = str(Path(mixture["path"]).resolve())
    base = resolve_model_path(cfg.model)
    return BranchSpec(
        name=name,
        base_model=str(Path(base).resolve()) if Path(base).exists() else base,
        output_dir=str(out.resolve()),
        sources=tuple(sources),
        mixture=mixture,
        epochs=epochs,
        # the run's other training seeds are rows of their own, not part of this branch
        train=replace(cfg.train, seed=seed, seeds=()),
        long_examples=cfg.mixture.long_examples,
        device=cfg.device,
        dtype=cfg.dtype,
        trust_remote_code=cfg.trust_remote_code,
        fractions={s: f for s, f in fractions.items() if s in sources},
        excluded={s: list(ids) for s, ids in excluded.items() if s in sources},
    )


# ------------------------------------------------------------------------ the kinds of rows
def _joint_spec(cfg: RunConfig, cur: Curation, epochs: float, seed: int) -> BranchSpec:
    """A joint run on the curated mixture; runs with the same epochs and seed are one folder."""
    d = RunDir(Path(cfg.run_dir)).joint_dir(epochs, seed)
    return branch_spec(cfg, d.name, cur.sources, d, epochs, seed, cur.fractions, cur.excluded)


def _joint_branches(
    cfg: RunConfig, cur: Curation, exp: ExperimentConfig, seed: int
) -> list[BranchSpec]:
    return [_joint_spec(cfg, cur, exp.epochs, seed)]


def _joint_rows(cfg: RunConfig, exp: ExperimentConfig, seed: int, mark: str) -> list[ModelRow]:
    final = RunDir(Path(cfg.run_dir)).joint_dir(exp.epochs, seed) / "final"
    base = exp.name.removesuffix(mark)
    return [ModelRow(exp.name, exp.name, "joint", final, seed=seed, base=base)]


def _split_branches(
    cfg: RunConfig, cur: Curation, exp: ExperimentConfig, seed: int
) -> list[BranchSpec]:
    """One branch per group of the experiment's partition (written here, once)."""
    run = RunDir(Path(cfg.run_dir))
    part = experiment_partition(cfg, exp)
    return [
        branch_spec(
            cfg,
            f"{exp.name}/{k}",
            group,
            run.branch_dir(exp.name, k),
            exp.epochs,
            seed,
            part.fractions,
            part.excluded,
        )
        for k, group in enumerate(part.groups)
    ]


def _split_rows(cfg: RunConfig, exp: ExperimentConfig, seed: int, mark: str) -> list[ModelRow]:
    """One merged row per merge method: the first is named for the experiment, the others
    ``<name>+<method>``."""
    run = RunDir(Path(cfg.run_dir))
    name = exp.name.removesuffix(mark)
    inputs = tuple(d / "final" for d in branch_dirs(cfg, exp.name))
    rows = []
    for i, method in enumerate(exp.merges):
        base = name if i == 0 else f"{name}+{method}"
        merged = run.merged_dir(base + mark)
        rows.append(
            ModelRow(base + mark, exp.name, "split", merged, inputs, method, seed=seed, base=base)
        )
    return rows


def _soup_branches(
    cfg: RunConfig, cur: Curation, exp: ExperimentConfig, seed: int
) -> list[BranchSpec]:
    """The joint runs it averages, one per seed (its seed-0 member is ``joint-1ep`` itself)."""
    return [_joint_spec(cfg, cur, exp.epochs, s) for s in exp.seeds]


def _soup_rows(cfg: RunConfig, exp: ExperimentConfig, seed: int, mark: str) -> list[ModelRow]:
    run = RunDir(Path(cfg.run_dir))
    inputs = tuple(run.joint_dir(exp.epochs, s) / "final" for s in exp.seeds)
    merged = run.merged_dir(exp.name)
    base = exp.name.removesuffix(mark)
    return [
        ModelRow(
            exp.name, exp.name, "soup", merged, inputs, "uniform", seed=exp.seeds[0], base=base
        )
    ]


@dataclass(frozen=True)
class RowKind:
    """One experiment kind: what it trains and which models of the table it makes.

    A new kind is one entry of `ROW_KINDS` (and its name in `config.schema.EXPERIMENT_KINDS`).
    A row with ``inputs`` and a ``merge_method`` is merged by the merge stage; every row is
    evaluated.
    """

    # (config, curation, experiment, training seed) → the branches it trains; a branch folder
    # two experiments share (a joint run) is trained once
    branches: Callable[[RunConfig, Curation, ExperimentConfig, int], list[BranchSpec]]
    # (config, experiment, training seed, seed mark) → its rows, in table order
    rows: Callable[[RunConfig, ExperimentConfig, int, str], list[ModelRow]]
    per_seed: bool = True  # repeated under each of train.seeds as `<name>@s<seed>`


ROW_KINDS: dict[str, RowKind] = {
    "joint": RowKind(_joint_branches, _joint_rows),
    "split": RowKind(_split_branches, _split_rows),
    # a soup is already an average over joint seeds: not repeated under train.seeds
    "soup": RowKind(_soup_branches, _soup_rows, per_seed=False),
}


# ------------------------------------------------------------------------------- the plan
def seed_variants(cfg: RunConfig) -> list[tuple[ExperimentConfig, int, str]]:
    """Every experiment under each training seed: (experiment, seed, seed suffix).

    The config's own ``train.seed`` comes first with an empty suffix (the rows and folders as
    they have always been); each of ``train.seeds`` repeats the experiments of a kind that is
    ``per_seed`` (joint and split) under ``<name>@s<seed>`` (their own branch folders and
    merges; joint runs are keyed by seed anyway).
    """
    out = [(exp, cfg.train.seed, "") for exp in cfg.experiments]
    for seed in cfg.train.seeds:
        mark = f"{SEED_MARK}{seed}"
        out += [
            (replace(exp, name=exp.name + mark), seed, mark)
            for exp in cfg.experiments
            if ROW_KINDS[exp.kind].per_seed
        ]
    return out


def plan_specs(
    cfg: RunConfig, experiments: Sequence[str] | None = None
) -> dict[str, list[BranchSpec]]:
    """Branch specs per experiment (joint: one; soup: one per seed; split: one per group).

    Every row trains the curated mixture (`load_curation`): dropped sources in none, a
    down-weighted source's same seeded subset in all, so joint and split rows keep one token
    budget. Writes each split experiment's partition; joint runs with the same epochs and seed
    are one folder, so a soup's seed-0 member is the ``joint-1ep`` model itself.
    """
    cur = load_curation(cfg)
    out: dict[str, list[BranchSpec]] = {}
    for exp, seed, mark in seed_variants(cfg):
        if experiments is None or exp.name.removesuffix(mark) in experiments:
            out[exp.name] = ROW_KINDS[exp.kind].branches(cfg, cur, exp, seed)
    return out


def model_rows(cfg: RunConfig) -> list[ModelRow]:
    """θ0, then every experiment's model(s), in config order (needs the split partitions)."""
    rows = [ModelRow(THETA0, THETA0, THETA0, Path(resolve_model_path(cfg.model)), base=THETA0)]
    for exp, seed, mark in seed_variants(cfg):
        rows += ROW_KINDS[exp.kind].rows(cfg, exp, seed, mark)
    return rows
