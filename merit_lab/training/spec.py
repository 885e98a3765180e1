"""A branch's spec: everything one branch needs, so that any machine can train it from a file.

Input: the run's `TrainConfig` (held whole: every training setting is declared once, with its
default, in `merit_lab.config.schema`), θ0, the mixture's arguments and the branch's sources.
Output: `BranchSpec`, saved as ``<output_dir>/spec.json`` (format ``merit-lab/branch-spec``), flat
as it has always been; files from before the envelope, with no header, load as version 1.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merit_lab.config.fields import not_one_of, refuse, unless
from merit_lab.config.schema import LONG_EXAMPLE_POLICIES, MixtureConfig, RunConfig, TrainConfig
from merit_lab.envelope import load_enveloped, save_enveloped
from merit_lab.training.distributed import split_global_batch

__all__ = [
    "RUN_LEVEL_FIELDS",
    "SCHEDULERS",
    "SPEC_FORMAT",
    "SPEC_VERSION",
    "BranchSpec",
    "write_spec",
]

SPEC_FORMAT = "merit-lab/branch-spec"
SPEC_VERSION = 1  # the flat layout; headerless files written before the envelope are the same

# train.lr_scheduler → transformers' name for it
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}

# `TrainConfig` fields that say how the run schedules its branches, not how one branch trains:
# a spec holds them at their defaults, and spec.json leaves them out.
RUN_LEVEL_FIELDS = ("seeds", "launcher", "n_procs", "gpus", "slurm")
_TRAIN_FIELDS = tuple(
    f.name for f in dataclasses.fields(TrainConfig) if f.name not in RUN_LEVEL_FIELDS
)

# Fields that may differ between a killed run and its resumption without changing the result
# (a run folder may move, or go on on another machine, with another process count: the global
# batch and the data order do not depend on it; snapshots are kept from then on).
_RESUMABLE_CHANGES = (
    "output_dir",
    "device",
    "save_steps",
    "keep_checkpoints",
    "procs_per_branch",
    "gradient_checkpointing",
    "snapshot_steps",
)
# Fields left out of spec.json at their defaults, so specs written before they existed stay equal.
_OMITTED_AT_DEFAULT = (
    "long_examples",
    "fractions",
    "excluded",
    "trust_remote_code",
    "procs_per_branch",
    "distributed",
    "gradient_checkpointing",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_rslora",
    "snapshot_steps",
)


def _branch_train(train: TrainConfig) -> TrainConfig:
    """``train`` with the run-level fields at their defaults (what a branch and its file hold)."""
    default = TrainConfig()
    at_default = {k: getattr(default, k) for k in RUN_LEVEL_FIELDS}
    return dataclasses.replace(
        train,
        lora_target_modules=tuple(train.lora_target_modules),
        snapshot_steps=tuple(train.snapshot_steps),
        **at_default,
    )


@dataclass(frozen=True)
class BranchSpec:
    """All one branch needs, self-contained so that any machine can train it from spec.json.

    Build one from a run config with the run's ``train`` section (`dataclasses.replace` it for
    this branch's seed); `from_dict` takes the flat ``spec.json`` layout instead.
    """

    name: str  # branch name, e.g. "0" or "joint"; used in logs and progress bars
    base_model: str  # θ0: HF folder with safetensors weights (or "demo"); every branch shares it
    output_dir: str  # branch folder: checkpoints/, final/, log.jsonl, spec.json
    sources: tuple[str, ...]  # source names this branch trains on (all of them: joint baseline)
    # load_mixture arguments (path, source_column, eval_fraction, seed, calibration_n); the same
    # in every branch so every branch sees the same train split of each source
    mixture: Mapping[str, Any] = field(default_factory=lambda: {"path": "demo"})
    epochs: float = 1.0  # passes over each source's train split (1.0 = its token budget)
    # the run's training settings, shared by every branch, with this branch's seed (data order
    # and RNG); its run-level fields (`RUN_LEVEL_FIELDS`) are held at their defaults
    train: TrainConfig = field(default_factory=TrainConfig)
    long_examples: str = MixtureConfig.long_examples  # over max_length: formatting.tokenize_example
    device: str = RunConfig.device  # auto | cpu | cuda (the launcher picks each process's GPU)
    dtype: str = RunConfig.dtype  # float32, or bfloat16/float16 autocast over fp32
    trust_remote_code: bool = RunConfig.trust_remote_code  # let transformers run θ0's own code
    keep_checkpoints: bool = False  # keep checkpoints/ after final/ is written (~3x the weights)
    # source → share f < 1 of its train examples to train (a hand down-weight): the seeded subset
    # `merit_lab.partition.session.fraction_subset(source, n, f, mixture seed)`, the same in every
    # row
    fractions: Mapping[str, float] = field(default_factory=dict)
    excluded: Mapping[str, list] = field(default_factory=dict)  # source → example ids not trained

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(self.sources))
        object.__setattr__(self, "mixture", dict(self.mixture))
        object.__setattr__(self, "train", _branch_train(self.train))
        object.__setattr__(self, "fractions", {s: float(f) for s, f in self.fractions.items()})
        stray = sorted(set(self.fractions) - set(self.sources))
        if stray:
            raise ValueError(
                f"branch {self.name!r}: fractions for sources it does not train {stray}"
            )
        if any(not 0 < f <= 1 for f in self.fractions.values()):
            raise ValueError(f"branch {self.name!r}: fractions must be in (0, 1]")
        if not self.sources:
            raise ValueError(f"branch {self.name!r}: no sources")
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"branch {self.name!r}: repeated sources {list(self.sources)}")
        # `train` checked its own fields when it was built; its scheduler names live here
        refuse(
            unless(self.epochs > 0, f"epochs: must be > 0, got {self.epochs!r}")
            + not_one_of("long_examples", "policy", self.long_examples, LONG_EXAMPLE_POLICIES)
            + not_one_of("lr_scheduler", "lr_scheduler", self.train.lr_scheduler, SCHEDULERS)
        )
        # before any work: a global batch that N processes cannot share is refused here
        t = self.train
        split_global_batch(t.batch_size, t.grad_accum, t.procs_per_branch, self.name)

    def to_dict(self, *, relative_to: str | Path | None = None) -> dict[str, Any]:
        """The spec as JSON-ready data, flat: the ``train`` fields beside the branch's own.

        Args:
            relative_to: the folder of the file the data goes to; when that file lies in
                ``output_dir`` (``spec.json``, ``final/merit_branch.json``), ``output_dir`` is
                written relative to it ("." or ".."), so the branch folder can move.
        """
        d, defaults = _flat(self), _defaults()
        for k in _OMITTED_AT_DEFAULT:
            if d[k] == defaults[k]:
                d.pop(k)
        if relative_to is not None:
            out, folder = Path(self.output_dir).resolve(), Path(relative_to).resolve()
            if folder == out or out in folder.parents:
                d["output_dir"] = Path(os.path.relpath(out, folder)).as_posix()
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BranchSpec:
        """Build a spec from the flat layout of `to_dict` (a ``spec.json``'s payload); a field
        left out takes its default. Unknown keys are an error, not silently dropped."""
        own = {f.name for f in dataclasses.fields(cls)} - {"train"}
        unknown = set(data) - own - set(_TRAIN_FIELDS)
        if unknown:
            raise ValueError(f"unknown BranchSpec field(s) {sorted(unknown)}")
        train = {k: v for k, v in data.items() if k in _TRAIN_FIELDS}
        for key in ("lora_target_modules", "snapshot_steps"):  # lists in JSON
            if key in train:
                train[key] = tuple(train[key])
        return cls(**{k: v for k, v in data.items() if k in own}, train=TrainConfig(**train))

    def save(self, path: str | Path) -> Path:
        """Write the spec to ``path`` (atomically, under its envelope header); an
        ``output_dir`` holding the file is stored relative to it."""
        payload = self.to_dict(relative_to=Path(path).parent)
        return Path(save_enveloped(path, SPEC_FORMAT, SPEC_VERSION, payload))

    @classmethod
    def load(cls, path: str | Path) -> BranchSpec:
        """Read a spec written by `save` (or a headerless one from before the envelope); a
        relative ``output_dir`` is taken from the file's folder (wherever the run has moved),
        an absolute one as it is."""
        data = load_enveloped(path, SPEC_FORMAT, SPEC_VERSION, legacy=True)
        out = data.get("output_dir")
        if isinstance(out, str) and not Path(out).is_absolute():
            data["output_dir"] = str((Path(path).parent / out).resolve())
        return cls.from_dict(data)


def _flat(spec: BranchSpec) -> dict[str, Any]:
    """Every field of ``spec`` as JSON-ready data, the ``train`` fields beside the branch's own
    (in the file's order: the branch and its data, its training settings, then the rest)."""
    own = dataclasses.asdict(spec)
    train = own.pop("train")
    first = ("name", "base_model", "output_dir", "sources", "mixture", "epochs")
    d = {
        **{k: own.pop(k) for k in first},
        **{k: train[k] for k in _TRAIN_FIELDS},
        **own,
    }
    d["sources"] = list(spec.sources)
    d["lora_target_modules"] = list(spec.train.lora_target_modules)
    d["snapshot_steps"] = list(spec.train.snapshot_steps)
    return d


@functools.cache
def _defaults() -> dict[str, Any]:
    """`_flat` of a spec whose every setting is at its default."""
    return _flat(BranchSpec(name="", base_model="", output_dir="", sources=("-",)))


def write_spec(spec: BranchSpec) -> Path:
    """Write ``<output_dir>/spec.json``, refusing a folder that holds a different branch.

    Resuming someone else's checkpoints would silently mix two runs; only `_RESUMABLE_CHANGES`
    may differ, and the process count only under DDP (FSDP checkpoints are not re-sharded here).
    """
    path = Path(spec.output_dir) / "spec.json"
    if path.is_file():
        data = load_enveloped(path, SPEC_FORMAT, SPEC_VERSION, legacy=True)
        procs, now = data.get("procs_per_branch", 1), spec.train.procs_per_branch
        if spec.train.distributed == "fsdp" and procs != now:
            raise ValueError(
                f"{path.parent}: an FSDP branch resumes with the {procs} processes "
                f"it started with, not {now}"
            )
        old = {k: v for k, v in data.items() if k not in _RESUMABLE_CHANGES}
        new = {k: v for k, v in spec.to_dict().items() if k not in _RESUMABLE_CHANGES}
        if old != new:
            changed = sorted(k for k in new.keys() | old.keys() if old.get(k) != new.get(k))
            raise ValueError(f"{path.parent} holds a different branch (fields {changed} differ)")
    return spec.save(path)
