"""Run configuration: frozen dataclasses loaded from and saved to YAML beside the artifacts.

Every field has a one-line comment; unknown keys are refused so a typo never silently falls back
to a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from merit_lab.sketch import SketchSpec

__all__ = [
    "CalibrationConfig",
    "MixtureConfig",
    "ParameterConfig",
    "PartitionConfig",
    "RunConfig",
    "config_hash",
    "load_config",
]


@dataclass(frozen=True)
class MixtureConfig:
    path: str = "demo"  # "demo", a folder/file of sources, or a `datasets` name / saved folder
    source_column: str = "source"  # source column for single-table inputs
    eval_fraction: float = 0.1  # held out per source when there is no eval split
    split: str = "train"  # split of a `datasets` dataset to read


@dataclass(frozen=True)
class CalibrationConfig:
    n: int = 200  # calibration examples per source (the paper: direction stable from ~160-200)
    micro_batch_size: int = 16  # examples per forward/backward; gradients accumulate exactly
    max_length: int = 256  # tokens per example, truncated on the right


@dataclass(frozen=True)
class ParameterConfig:
    include: tuple[str, ...] = ()  # parameter-name globs to keep (empty: all trainable)
    exclude: tuple[str, ...] = ()  # parameter-name globs to drop


@dataclass(frozen=True)
class PartitionConfig:
    method: str = "balanced"  # balanced (MERIT's PCA median split) | random | kmeans
    r: int | None = 2  # PCA axes: K = 2^r groups (balanced)
    k: int | None = None  # number of groups instead of r (any K)
    seed: int = 0  # seed of random / k-means


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

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def save(self, path: str | Path) -> Path:
        from merit_lab.io import atomic_write_text

        return atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return _build(cls, d, "config")


def _build(cls: type, d: Any, where: str) -> Any:
    if isinstance(d, cls):
        return d
    if cls is MixtureConfig and isinstance(d, str):
        return MixtureConfig(path=d)
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for k, v in d.items():
        sub = _NESTED.get((cls, k))
        if sub is not None:
            kwargs[k] = _build(sub, v, f"{where}.{k}")
        elif isinstance(v, list):
            kwargs[k] = tuple(v)
        else:
            kwargs[k] = v
    return cls(**kwargs)


_NESTED: dict[tuple[type, str], type] = {
    (RunConfig, "mixture"): MixtureConfig,
    (RunConfig, "calibration"): CalibrationConfig,
    (RunConfig, "sketch"): SketchSpec,
    (RunConfig, "parameters"): ParameterConfig,
    (RunConfig, "partition"): PartitionConfig,
}


def load_config(path: str | Path, **overrides: Any) -> RunConfig:
    """Read a YAML run config; ``overrides`` replace top-level keys (e.g. ``output_dir``)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: malformed YAML: {e}") from e
    data.update({k: v for k, v in overrides.items() if v is not None})
    return _build(RunConfig, data, str(path))


def config_hash(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (used to tell whether an artifact is current)."""
    blob = json.dumps(
        [dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
