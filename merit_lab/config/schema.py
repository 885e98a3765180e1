"""Run configuration: frozen dataclasses loaded from and saved to YAML beside the artifacts.

Every field has a one-line comment; unknown keys are refused so a typo never silently falls back
to a default. Loading checks each value against its field's type (``1e-3``, a string to YAML 1.1,
is read as a number) and range, and names every problem by its key path; the choices that live in
registries (merge methods, splits, launchers...) are checked by `merit_lab.validate`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from merit_lab.config.fields import (
    below,
    coerce,
    join_key,
    refuse,
    unless,
)
from merit_lab.config.sections import (
    DEFAULT_SKETCH_DIM,
    DEVICES,
    DISTRIBUTED_MODES,
    EXPERIMENT_KINDS,
    FOLD_DEALS,
    LAYER_GROUPINGS,
    LONG_EXAMPLE_POLICIES,
    SKETCH_KINDS,
    SMALL_SOURCE_POLICIES,
    CalibrationConfig,
    DiagnosticsConfig,
    EvalConfig,
    ExperimentConfig,
    MergeConfig,
    MixtureConfig,
    ParameterConfig,
    PartitionConfig,
    PlanConfig,
    SketchSpec,
    TrainConfig,
    default_experiments,
)
from merit_lab.io import atomic_write_text

__all__ = [
    "DEFAULT_SKETCH_DIM",
    "DEVICES",
    "DISTRIBUTED_MODES",
    "EXPERIMENT_KINDS",
    "FOLD_DEALS",
    "LAYER_GROUPINGS",
    "LONG_EXAMPLE_POLICIES",
    "SKETCH_KINDS",
    "SMALL_SOURCE_POLICIES",
    "CalibrationConfig",
    "DiagnosticsConfig",
    "EvalConfig",
    "ExperimentConfig",
    "MergeConfig",
    "MixtureConfig",
    "ParameterConfig",
    "PartitionConfig",
    "PlanConfig",
    "RunConfig",
    "SketchSpec",
    "TrainConfig",
    "config_hash",
    "default_experiments",
    "load_config",
]


@dataclass(frozen=True)
class RunConfig:
    name: str = "demo"  # run directory name: <output_dir>/<name>
    model: str = "demo"  # base model θ0: HF folder, hub id, or "demo" (data/demo/base)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    output_dir: str = "runs"  # parent of the run directory
    seed: int = 0  # seed of the mixture splits
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # auto | float32 | bfloat16 | float16
    trust_remote_code: bool = False  # let transformers run a model's own code (off by default)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    sketch: SketchSpec = field(default_factory=SketchSpec)
    parameters: ParameterConfig = field(default_factory=ParameterConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    experiments: tuple[ExperimentConfig, ...] = field(default_factory=default_experiments)
    merge: MergeConfig = field(default_factory=MergeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)  # `merit-lab plan`: a stated size

    def __post_init__(self) -> None:
        names = [e.name for e in self.experiments]
        device_ok = re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None
        refuse(
            unless(
                bool(self.name) and "/" not in self.name and self.name not in (".", ".."),
                f"name: must be a folder name, got {self.name!r}",
            )
            + unless(
                len(set(names)) == len(names) and "theta0" not in names,
                f"experiments: names must be unique and not 'theta0': {names}",
            )
            + unless(
                device_ok,
                f"device: unknown device {self.device!r}; device must be one "
                f"of: {', '.join(DEVICES)}",
            )
            + below(self, 0, "seed")
            + unless(
                not self.partition.layer_group or self.calibration.layer_groups != "none",
                "partition.layer_group: needs calibration.layer_groups: layers or modules",
            )
        )

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> RunConfig:
        """A config from a mapping (as YAML gives it); one ValueError lists every problem, each
        line ``<where>: <key path>: <what is wrong>``."""
        problems: list[str] = []
        cfg = _build(cls, d, "", problems)
        if problems:
            raise ValueError("\n".join(f"{where}: {p}" for p in problems))
        return cfg


def _build(cls: type, d: Any, where: str, problems: list[str]) -> Any:
    """``cls`` from the mapping ``d`` at key path ``where``; None if it has problems (appended)."""
    if isinstance(d, cls):
        return d
    if cls is MixtureConfig and isinstance(d, str):
        d = {"path": d}
    if not isinstance(d, dict):
        problems.append(join_key(where, f"expected a mapping, got {d!r}", sep=": "))
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    before = len(problems)
    unknown = sorted(str(k) for k in set(d) - set(fields))
    if unknown:
        problems.append(
            join_key(where, f"unknown keys {unknown}; known: {sorted(fields)}", sep=": ")
        )
    required = [
        n
        for n, f in fields.items()
        if n not in d
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    problems.extend(f"{join_key(where, name)}: required" for name in required)
    kwargs = {}  # the values that have the right type: their ranges are checked even so
    for k, v in d.items():
        if k not in fields:
            continue
        path, sub, n = join_key(where, k), _NESTED.get((cls, k)), len(problems)
        if (cls, k) == (RunConfig, "experiments"):
            if not isinstance(v, (list, tuple)):
                problems.append(f"{path}: expected a list of experiments, got {v!r}")
                continue
            built = [_build(ExperimentConfig, e, f"{path}[{i}]", problems) for i, e in enumerate(v)]
            value = tuple(e for e in built if e is not None)
        elif sub is not None:
            value = _build(sub, v, path, problems)
        else:
            value = coerce(v, hints[k], path, problems)
        if len(problems) == n:
            kwargs[k] = value
    if required:
        return None
    try:
        obj = cls(**kwargs)
    except ValueError as e:  # the ranges and choices of __post_init__, a line per problem
        problems.extend(join_key(where, line) for line in str(e).splitlines())
        return None
    return obj if len(problems) == before else None


_NESTED: dict[tuple[type, str], type] = {
    (RunConfig, "mixture"): MixtureConfig,
    (RunConfig, "calibration"): CalibrationConfig,
    (RunConfig, "sketch"): SketchSpec,
    (RunConfig, "parameters"): ParameterConfig,
    (RunConfig, "partition"): PartitionConfig,
    (RunConfig, "train"): TrainConfig,
    (RunConfig, "merge"): MergeConfig,
    (RunConfig, "eval"): EvalConfig,
    (RunConfig, "diagnostics"): DiagnosticsConfig,
    (RunConfig, "plan"): PlanConfig,
}


def load_config(path: str | Path, **overrides: Any) -> RunConfig:
    """Read a YAML run config; ``overrides`` replace its keys (``None`` values are ignored).

    A mapping override merges into its section, so ``train={"lr": 1e-4}`` keeps the config's
    other training settings; any other value (a list of experiments, a string) replaces the key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:  # PyYAML's own report names "<unicode string>", not the file
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(
            f"{where}: malformed YAML: {what}; fix that line (a bracket, quote or colon)"
        ) from e
    for k, v in overrides.items():
        if v is None:
            continue
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    return RunConfig.from_dict(data, where=str(path))


def config_hash(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (used to tell whether an artifact is current)."""
    blob = json.dumps(
        [dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
