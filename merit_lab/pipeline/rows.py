"""The comparison's rows: which models the table holds and the branches each one trains.

Input: a run config (its ``experiments`` and ``train.seeds``) and the run's curation
(`merit_lab.pipeline.curation`). Output: `ModelRow`s (θ0 first, then every experiment's models)
and `BranchSpec`s per experiment, built from the config's own sections. Each experiment kind is
one entry of `ROW_KINDS`: what it trains and which rows it adds. The controls (``shrink``,
``early``) train nothing: each adds one row per merged row, ``<row>:<experiment>``, built by the
merge stage from the joint run (`merit_lab.pipeline.controls`).
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
from merit_lab.training.snapshots import snapshot_dir
from merit_lab.training.spec import BranchSpec

__all__ = [
    "CONTROLS",
    "CONTROL_KINDS",
    "ROW_KINDS",
    "SEED_MARK",
    "SNAPSHOT",
    "THETA0",
    "ModelRow",
    "RowKind",
    "branch_spec",
    "control_joint",
    "merged_labels",
    "model_rows",
    "plan_specs",
    "seed_variants",
]

THETA0 = "theta0"
SEED_MARK = "@s"  # `<row>@s<seed>`: a row trained again under another of train.seeds
CONTROL_KINDS = ("shrink", "early")  # rows built from a joint run beside each merged row
SNAPSHOT = "snapshot"  # the kind of a joint run's snapshot evaluated as a row (`<joint>:step<N>`)
CONTROLS = "controls"  # the run's folder of control rows: controls/<label, ":" as "_">/


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
    controls: str = ""  # shrink | early: the merged row's label it stands beside
    joint: Path | None = None  # shrink | early | snapshot: the joint run's folder it comes from
    step: int | None = None  # snapshot: the optimizer step

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
    snapshot_steps: Sequence[int] = (),
) -> BranchSpec:
    """The spec of one branch of the run: the config's ``train`` section with this branch's
    seed, θ0 and the mixture as absolute paths (so it trains from any working directory), and
    the curation's down-weights and exclusions of the sources it trains. Only a joint run keeps
    snapshots (``snapshot_steps``: the config's ``train.snapshot_steps``)."""
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
        train=replace(cfg.train, seed=seed, seeds=(), snapshot_steps=tuple(snapshot_steps)),
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
    return branch_spec(
        cfg,
        d.name,
        cur.sources,
        d,
        epochs,
        seed,
        cur.fractions,
        cur.excluded,
        snapshot_steps=cfg.train.snapshot_steps,
    )


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


def merged_labels(cfg: RunConfig, mark: str = "") -> list[str]:
    """The merged rows of one seed variant, from the config alone, without the seed mark: every
    split row under every merge method, then (with no mark: soups are not repeated) every soup."""
    out = []
    for e in cfg.experiments:
        if e.kind == "split":
            out += [e.name if i == 0 else f"{e.name}+{m}" for i, m in enumerate(e.merges)]
    if not mark:
        out += [e.name for e in cfg.experiments if e.kind == "soup"]
    return out


def control_joint(cfg: RunConfig, exp: ExperimentConfig) -> ExperimentConfig:
    """The joint experiment a control pulls back: ``exp.joint``, or the first joint one."""
    joints = [e for e in cfg.experiments if e.kind == "joint"]
    found = [e for e in joints if exp.joint in (None, e.name)]
    if not found:
        raise ValueError(
            f"experiment {exp.name!r}: no joint experiment named {exp.joint!r}; joint "
            f"experiments: {[e.name for e in joints] or 'none'}"
        )
    return found[0]


def _no_branches(
    cfg: RunConfig, cur: Curation, exp: ExperimentConfig, seed: int
) -> list[BranchSpec]:
    return []  # a control is built from the joint run after the merges


def _control_rows(cfg: RunConfig, exp: ExperimentConfig, seed: int, mark: str) -> list[ModelRow]:
    """One row per merged row of this seed (those of ``exp.of``, or all), ``<row>:<name>``;
    each pulls back the joint run with the merged row's own training seed (a soup, an average
    over seeds: the config's own seed, the joint row itself)."""
    run, joint = RunDir(Path(cfg.run_dir)), control_joint(cfg, exp)
    name = exp.name.removesuffix(mark)
    rows = []
    for merged in merged_labels(cfg, mark):
        if exp.of and merged not in exp.of:
            continue
        label = f"{merged}:{name}{mark}"
        rows.append(
            ModelRow(
                label,
                exp.name,
                exp.kind,
                run.root / CONTROLS / label.replace(":", "_"),
                seed=seed,
                base=f"{merged}:{name}",
                controls=merged + mark,
                joint=run.joint_dir(joint.epochs, seed),
            )
        )
    return rows


def _snapshot_rows(cfg: RunConfig) -> list[ModelRow]:
    """The snapshots of each joint run a control pulls back (the config's own seed), as rows
    ``<joint>:step<N>``: the joint path of the frontier. Steps past the run's end exist in no
    folder (the evaluate stage scores the snapshots that exist)."""
    if not cfg.train.snapshot_steps:
        return []
    run = RunDir(Path(cfg.run_dir))
    controls = [e for e in cfg.experiments if e.kind in CONTROL_KINDS]
    joints = dict.fromkeys(control_joint(cfg, e).name for e in controls)
    rows = []
    for e in cfg.experiments:
        if e.name not in joints:
            continue
        folder = run.joint_dir(e.epochs, cfg.train.seed)
        for step in cfg.train.snapshot_steps:
            label = f"{e.name}:step{step}"
            model_dir = snapshot_dir(folder, step)
            rows.append(
                ModelRow(
                    label,
                    e.name,
                    SNAPSHOT,
                    model_dir,
                    seed=cfg.train.seed,
                    base=label,
                    joint=folder,
                    step=step,
                )
            )
    return rows


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
    control: bool = False  # built after the merges; in `model_rows` only with ``controls``


ROW_KINDS: dict[str, RowKind] = {
    "joint": RowKind(_joint_branches, _joint_rows),
    "split": RowKind(_split_branches, _split_rows),
    # a soup is already an average over joint seeds: not repeated under train.seeds
    "soup": RowKind(_soup_branches, _soup_rows, per_seed=False),
    # controls: θ0 + α(θ_joint − θ0) at each merged row's distance from θ0, and the joint run's
    # first snapshot at that distance (`merit_lab.merging.controls`)
    "shrink": RowKind(_no_branches, _control_rows, control=True),
    "early": RowKind(_no_branches, _control_rows, control=True),
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


def model_rows(cfg: RunConfig, *, controls: bool = False) -> list[ModelRow]:
    """θ0, then every experiment's model(s), in config order (needs the split partitions).

    Args:
        controls: also the control rows (``shrink``, ``early``: some may be "not reachable",
            with no folder; `merit_lab.pipeline.controls` records which) and the evaluated
            snapshots of their joint runs (kind `SNAPSHOT`), last. Without it: the rows that
            are trained or merged.
    """
    rows = [ModelRow(THETA0, THETA0, THETA0, Path(resolve_model_path(cfg.model)), base=THETA0)]
    for exp, seed, mark in seed_variants(cfg):
        if controls or not ROW_KINDS[exp.kind].control:
            rows += ROW_KINDS[exp.kind].rows(cfg, exp, seed, mark)
    return rows + (_snapshot_rows(cfg) if controls else [])
