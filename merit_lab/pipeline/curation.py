"""What the rows train: the curated mixture, and the grouping of each split experiment.

Input: a run directory whose partition stage is done (``partition.json``, with its hand edits)
and an experiment of the config. Output: `Curation` (the sources every row trains, their
down-weights and exclusions) and ``branches/<experiment>/partition.json`` (the grouping a split
trains: the run's own, or the curated sources split again).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from merit_lab.config.schema import ExperimentConfig, RunConfig
from merit_lab.partition.methods import ROW_METHODS, make_partition
from merit_lab.partition.plan import Partition
from merit_lab.pipeline.rundir import RunDir, source_counts

__all__ = [
    "Curation",
    "branch_dirs",
    "experiment_partition",
    "load_curation",
    "mixture_names",
]


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
    run = RunDir(Path(cfg.run_dir))
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


def mixture_names(cfg: RunConfig) -> list[str]:
    """The sources the rows train and are scored on: the curated mixture."""
    return list(load_curation(cfg).sources)


def branch_dirs(cfg: RunConfig, experiment: str) -> list[Path]:
    """The branch folders of a split experiment, in group order (needs its partition)."""
    run = RunDir(Path(cfg.run_dir))
    return [run.branch_dir(experiment, k) for k in range(run.load_partition(experiment).k)]


def _curated_split(cfg: RunConfig, exp: ExperimentConfig, cur: Curation) -> Partition:
    """A recomputed split of the curated sources: their own conflict space, the counts of what
    they train (down-weighted subsets included), the curation's fractions carried along."""
    run = RunDir(Path(cfg.run_dir))
    space = run.load_space()
    if set(cur.sources) != set(space.names):
        space = space.select(cur.sources)
    if cur.partition is not None:
        examples, tokens = dict(cur.partition.examples), dict(cur.partition.tokens)
    else:
        examples, tokens = source_counts(run)
    bank = run.load_bank() if exp.method in ROW_METHODS else None  # `gain` scores on the bank
    rows = {} if bank is None else {"rows": bank.rows, "row_names": bank.names}
    part = make_partition(
        space, examples, tokens, method=exp.method, r=exp.r, k=exp.k, seed=exp.seed, **rows
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
    run = RunDir(Path(cfg.run_dir))
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
