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

from merit_lab.io import atomic_write_text

__all__ = [
    "DEFAULT_SKETCH_DIM",
    "SKETCH_KINDS",
    "CalibrationConfig",
    "DiagnosticsConfig",
    "EvalConfig",
    "ExperimentConfig",
    "MergeConfig",
    "MixtureConfig",
    "ParameterConfig",
    "PartitionConfig",
    "RunConfig",
    "SketchSpec",
    "TrainConfig",
    "config_hash",
    "default_experiments",
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


DEFAULT_SKETCH_DIM = 2**18
"""Count-sketch width: 1 MiB per source whatever the model's size. The smallest power of two
whose max cosine error over the demo's 496 source pairs stays ≤ 0.005 at each of 3 seeds (0.0050
worst; 2^17: 0.0067; `python -m benchmarks.bench_sketch`). The error is ~1/sqrt(dim) and grows
slowly with the number of pairs: for hundreds of sources, 2^19 keeps the same margin."""

SKETCH_KINDS = ("countsketch", "gaussian", "subsample", "exact")


@dataclass(frozen=True)
class SketchSpec:
    """Which linear map compresses a gradient; stored in bank.json so rows can be reproduced."""

    kind: str = "countsketch"  # "countsketch" | "gaussian" | "subsample" | "exact"
    dim: int = DEFAULT_SKETCH_DIM  # output width for countsketch / gaussian (ignored otherwise)
    seed: int = 0  # hashes, signs, projections and the subsample offset all derive from it
    every: int = 5  # subsample: keep every k-th coordinate (the paper's 1 in 5)

    def __post_init__(self) -> None:
        if self.kind not in SKETCH_KINDS:
            raise ValueError(f"unknown sketch kind {self.kind!r}; expected one of {SKETCH_KINDS}")
        if self.kind in ("countsketch", "gaussian") and not 1 <= self.dim < 2**31:
            raise ValueError(f"sketch dim must be in [1, 2**31), got {self.dim}")
        if self.every < 1:
            raise ValueError(f"subsample 'every' must be >= 1, got {self.every}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SketchSpec:
        unknown = set(d) - {"kind", "dim", "seed", "every"}
        if unknown:
            raise ValueError(f"unknown SketchSpec fields: {sorted(unknown)}")
        return cls(**d)


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
class TrainConfig:
    """Hyperparameters shared by every branch and baseline (MERIT changes only the data)."""

    lr: float = 3e-4  # peak AdamW learning rate
    batch_size: int = 32  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup_ratio: float = 0.05  # share of steps with linear warm-up
    lr_scheduler: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    max_grad_norm: float = 1.0  # gradient clipping (0: off)
    max_length: int = 256  # tokens per example; the mixture's token counts use the same length
    seed: int = 0  # data order; the same in every branch
    save_steps: int = 100  # resumable checkpoint every N optimizer steps
    launcher: str = "sequential"  # sequential (in process) | local (subprocesses) | slurm
    n_procs: int | None = None  # local: branches at a time on the CPU
    gpus: tuple[int, ...] = ()  # local: GPU ids, one branch per GPU (empty: all visible)
    slurm: dict = field(default_factory=dict)  # slurm: submitit parameters (partition, gpus...)


@dataclass(frozen=True)
class ExperimentConfig:
    """One row of the comparison table."""

    name: str  # row label, e.g. "joint-1ep", "random-k4", "merit-2d"
    kind: str = "split"  # joint (one model on every source) | split (branches + merge) | soup
    epochs: float = 1.0  # passes over each source's train split
    method: str | None = None  # split: balanced | random | kmeans; None: the run's partition.json
    r: int | None = None  # split, balanced: K = 2^r
    k: int | None = None  # split: K groups (instead of r)
    seed: int = 0  # split: seed of random / k-means
    seeds: tuple[int, ...] = (0, 1, 2)  # soup: training seeds of the joint runs averaged uniformly
    merges: tuple[str, ...] = ("linear",)  # split: merge methods; rows beyond the first: name+m

    def __post_init__(self) -> None:
        if self.kind not in ("joint", "split", "soup"):
            raise ValueError(f"experiment {self.name!r}: kind must be joint, split or soup")
        if not self.epochs > 0:
            raise ValueError(f"experiment {self.name!r}: epochs must be > 0")
        if self.kind == "split" and self.method is not None and self.r is None and self.k is None:
            raise ValueError(f"experiment {self.name!r}: give r or k for method {self.method!r}")
        if self.kind == "soup" and len(self.seeds) < 2:
            raise ValueError(f"experiment {self.name!r}: a soup needs at least two seeds")


def default_experiments() -> tuple[ExperimentConfig, ...]:
    """The paper's comparison rows (θ0 is always evaluated): joint 1 and 2 epochs, a random
    split into 4, MERIT with r = 1, 2, 3."""
    return (
        ExperimentConfig("joint-1ep", kind="joint", epochs=1.0),
        ExperimentConfig("joint-2ep", kind="joint", epochs=2.0),
        ExperimentConfig("random-k4", method="random", k=4),
        ExperimentConfig("merit-1d", method="balanced", r=1),
        ExperimentConfig("merit-2d", method="balanced", r=2),
        ExperimentConfig("merit-3d", method="balanced", r=3),
    )


@dataclass(frozen=True)
class MergeConfig:
    params: dict = field(default_factory=dict)  # per method: {ties: {density: 0.5, lambda: 1}}
    shard_size: int = 2**30  # most bytes per output shard


@dataclass(frozen=True)
class EvalConfig:
    splits: tuple[str, ...] = ("eval",)  # loss on these splits (train: the diagnostics' side)
    max_examples: int | None = None  # per source and split (None: all)
    exact_match: bool = True  # greedy answers vs references, on the eval split
    max_new_tokens: int = 48  # greedy answer length limit
    batch_size: int = 256  # examples per forward / generate call (pooled over sources)


@dataclass(frozen=True)
class DiagnosticsConfig:
    experiments: tuple[str, ...] = ()  # split experiments to diagnose (empty: every linear merge)
    max_examples: int = 4  # per source, train and held-out examples pooled into the losses
    alphas: int = 7  # points per interpolation path
    sigmas: tuple[float, ...] = (0.0, 1e-3, 3e-3, 1e-2)  # Gaussian weight-noise scales
    seeds: tuple[int, ...] = (0, 1, 2)  # noise draws per scale
    hessian_k: int = 8  # top Hessian eigenpairs at θ0
    hessian_iter: int = 20  # Lanczos steps
    curvature_examples: int = 2  # calibration examples per source in the Hessian's loss
    curvature_params: tuple[str, ...] = ()  # parameter globs of the Hessian (empty: all)


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

    def __post_init__(self) -> None:
        names = [e.name for e in self.experiments]
        if len(set(names)) != len(names) or "theta0" in names:
            raise ValueError(f"experiment names must be unique and not 'theta0': {names}")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def save(self, path: str | Path) -> Path:
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
        if (cls, k) == (RunConfig, "experiments"):
            if not isinstance(v, (list, tuple)):
                raise ValueError(f"{where}.experiments: expected a list of experiments")
            kwargs[k] = tuple(
                _build(ExperimentConfig, e, f"{where}.experiments[{i}]") for i, e in enumerate(v)
            )
        elif sub is not None:
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
    (RunConfig, "train"): TrainConfig,
    (RunConfig, "merge"): MergeConfig,
    (RunConfig, "eval"): EvalConfig,
    (RunConfig, "diagnostics"): DiagnosticsConfig,
}


def load_config(path: str | Path, **overrides: Any) -> RunConfig:
    """Read a YAML run config; ``overrides`` replace its keys (``None`` values are ignored).

    A mapping override merges into its section, so ``train={"lr": 1e-4}`` keeps the config's
    other training settings; any other value (a list of experiments, a string) replaces the key.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: malformed YAML: {e}") from e
    for k, v in overrides.items():
        if v is None:
            continue
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    return _build(RunConfig, data, str(path))


def config_hash(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (used to tell whether an artifact is current)."""
    blob = json.dumps(
        [dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
