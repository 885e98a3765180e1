"""The sections of a run config, one frozen dataclass per stage (mixture, calibration, sketch,
parameters, partition, train, experiments, merge, eval, diagnostics), with their choices.

Each field has a one-line comment; each class checks its own ranges in ``__post_init__``. The run
config that holds them, and loading it from YAML, are in `merit_lab.config.schema`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from merit_lab.config.fields import (
    below,
    global_batch_problem,
    lm_eval_problems,
    lmms_eval_problems,
    not_one_of,
    refuse,
    unless,
)

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
    "SketchSpec",
    "TrainConfig",
    "default_experiments",
]


DEVICES = ("auto", "cpu", "cuda", "cuda:N")
DISTRIBUTED_MODES = ("ddp", "fsdp")  # train.distributed: a full copy per process | sharded
EXPERIMENT_KINDS = ("joint", "split", "soup", "shrink", "early")  # shrink, early: controls
LONG_EXAMPLE_POLICIES = ("truncate_prompt", "skip", "truncate_right")  # formatting.tokenize_example
SMALL_SOURCE_POLICIES = ("refuse", "warn")  # the mixture stage, on a source short of examples
LAYER_GROUPINGS = ("none", "layers", "modules")  # calibration.layer_groups: layerwise.py
FOLD_DEALS = ("examples", "batches")  # calibration.fold_deal: gradients/batching.py


@dataclass(frozen=True)
class MixtureConfig:
    path: str = "demo"  # "demo", a folder/file of sources, or a `datasets` name / saved folder
    source_column: str = "source"  # source column for single-table inputs
    eval_fraction: float = 0.1  # held out per source when there is no eval split
    split: str = "train"  # split of a `datasets` dataset to read
    # an example over max_length: drop its first prompt tokens, "skip" it, or "truncate_right"
    long_examples: str = "truncate_prompt"
    # a source short of calibration.n calibration examples, or with no train/eval: "refuse"/"warn"
    small_sources: str = "refuse"
    # a hash list of evaluation examples (`data.checks.write_hash_list`): the mixture stage counts
    # the listed prompts and images that a training example holds (None: not checked)
    overlap_hashes: str | None = None

    def __post_init__(self) -> None:
        refuse(
            unless(
                0 <= self.eval_fraction < 1,
                f"eval_fraction: must be in [0, 1), got {self.eval_fraction!r}",
            )
            + not_one_of("long_examples", "policy", self.long_examples, LONG_EXAMPLE_POLICIES)
            + not_one_of("small_sources", "policy", self.small_sources, SMALL_SOURCE_POLICIES)
        )


@dataclass(frozen=True)
class CalibrationConfig:
    n: int = 200  # calibration examples per source (the paper: direction stable from ~160-200)
    micro_batch_size: int = 16  # examples per forward/backward; gradients accumulate exactly
    max_length: int = 256  # tokens per example; longer ones as mixture.long_examples says
    # padded tokens per micro-batch instead of micro_batch_size examples (None: by examples):
    # long sources get fewer examples per forward pass, so they do not run out of memory
    micro_batch_tokens: int | None = None
    gradient_checkpointing: bool = (
        False  # recompute activations in backward: less memory, ~1.3x time
    )
    workers: int = (
        1  # processes sharing the sources (train.launcher: local processes or SLURM jobs)
    )
    layer_groups: str = "none"  # none | layers | modules: also sketch each group (layerwise.py)
    layer_dim: int = 2**14  # sketch width per layer group (cosine error ~1/sqrt(layer_dim))
    # LoRA bank (the LESS way): warm a LoRA adapter (train.lora_*) up on the mixture for N
    # seeded steps, then take the gradients on its parameters only; 0: full-parameter bank
    lora_warmup_steps: int = 0
    # calibration examples dealt into this many folds (example i → fold i mod folds), each
    # fold's gradient sketched too: the stability of the matrix and split (1: off)
    folds: int = 4
    # what is dealt to the folds: "examples", or whole micro-"batches" where each fold gets at
    # least two (no padding lost to the folds; the stability reads conservative): batching.py
    fold_deal: str = "examples"

    def __post_init__(self) -> None:
        refuse(
            below(self, 1, "n", "micro_batch_size", "workers", "folds")
            + unless(
                self.n < 1 or self.folds <= self.n,  # an invalid n is reported alone, above
                f"folds: must be <= n ({self.n}), got {self.folds!r}",
            )
            + below(self, 0, "lora_warmup_steps")
            + below(self, 8, "max_length", "micro_batch_tokens", "layer_dim")
            + not_one_of("layer_groups", "grouping", self.layer_groups, LAYER_GROUPINGS)
            + not_one_of("fold_deal", "deal", self.fold_deal, FOLD_DEALS)
        )


DEFAULT_SKETCH_DIM = 2**18
"""Count-sketch width: 1 MiB per source whatever the model's size. The smallest power of two
whose max cosine error over the demo's 496 source pairs stayed ≤ 0.005 at seeds 0-2 (0.0050
worst; 2^17: 0.0067; `python -m benchmarks.bench_sketch`). Over other seeds and gradients 0.005
holds at the median seed, not every seed (0.0116 at the worst of 64: heavy coordinates sharing
a bucket; `tests/test_demo_structure.py`). The error is ~1/sqrt(dim) and grows slowly with the
number of pairs: 2^19 halves the typical error (it still exceeded 0.005 at 3 of 16 seeds)."""

SKETCH_KINDS = ("countsketch", "gaussian", "subsample", "exact")


@dataclass(frozen=True)
class SketchSpec:
    """Which linear map compresses a gradient; stored in bank.json so rows can be reproduced."""

    kind: str = "countsketch"  # "countsketch" | "gaussian" | "subsample" | "exact"
    dim: int = DEFAULT_SKETCH_DIM  # output width for countsketch / gaussian (ignored otherwise)
    seed: int = 0  # hashes, signs, projections and the subsample offset all derive from it
    every: int = 5  # subsample: keep every k-th coordinate (the paper's 1 in 5)

    def __post_init__(self) -> None:
        refuse(
            not_one_of("kind", "sketch kind", self.kind, SKETCH_KINDS)
            + unless(
                self.kind not in ("countsketch", "gaussian") or 1 <= self.dim < 2**31,
                f"dim: sketch dim must be in [1, 2**31), got {self.dim!r}",
            )
            + below(self, 1, "every")
            + below(self, 0, "seed")
        )

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
    # named selection (models.PARAMETER_PRESETS): all | attention | mlp | language | vision |
    # projector | last-N (the last N transformer layers); include/exclude then narrow it
    preset: str = "all"
    include: tuple[str, ...] = ()  # parameter-name globs to keep (empty: all trainable)
    exclude: tuple[str, ...] = ()  # parameter-name globs to drop

    def __post_init__(self) -> None:
        refuse(
            unless(
                re.fullmatch(
                    r"all|attention|mlp|language|vision|projector|last-[1-9]\d*", self.preset
                )
                is not None,
                f"preset: unknown parameter preset {self.preset!r}; preset must be one of: all, "
                "attention, mlp, language, vision, projector, last-N (N >= 1)",
            )
        )


@dataclass(frozen=True)
class PartitionConfig:
    method: str = "balanced"  # balanced (MERIT's PCA median split) | random | kmeans | gain
    r: int | None = 2  # PCA axes: K = 2^r groups (balanced)
    k: int | None = None  # number of groups instead of r (any K)
    seed: int = 0  # seed of random / k-means
    layer_group: str = ""  # split on one layer group's rows (calibration.layer_groups); "": all

    def __post_init__(self) -> None:
        refuse(
            below(self, 0, "r", "seed")
            + below(self, 1, "k")
            + unless(self.r is not None or self.k is not None, "r: give r (K = 2^r groups) or k")
        )


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters shared by every branch and baseline (MERIT changes only the data).

    A branch's spec (`merit_lab.training.spec.BranchSpec`) holds this section whole, with the
    branch's own seed; the run-level fields (seeds, launcher, n_procs, gpus, slurm) stay here.
    """

    lr: float = 3e-4  # peak AdamW learning rate
    batch_size: int = 32  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup_ratio: float = 0.05  # share of steps with linear warm-up
    lr_scheduler: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    max_grad_norm: float = 1.0  # gradient clipping (0: off)
    max_length: int = 256  # tokens per example; the mixture's token counts use the same length
    seed: int = 0  # data order; the same in every branch
    # more training seeds: every joint and split row is trained again with each (rows
    # `<row>@s<seed>`); the report gives each row's mean and spread over seed and these
    seeds: tuple[int, ...] = ()
    save_steps: int = 100  # resumable checkpoint every N optimizer steps
    launcher: str = "sequential"  # sequential (in process) | local (subprocesses) | slurm
    n_procs: int | None = None  # local: branches at a time on the CPU
    gpus: tuple[int, ...] = ()  # local: GPU ids, one branch per GPU (empty: all visible)
    slurm: dict = field(default_factory=dict)  # slurm: submitit parameters (partition, gpus...)
    # processes that train one branch together (torchrun + Trainer: one per GPU, or CPU
    # processes over gloo); the global batch (batch_size x grad_accum) is the same at any count
    procs_per_branch: int = 1
    distributed: str = "ddp"  # ddp (a full copy per process) | fsdp (weights sharded across them)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory
    lora_r: int = 0  # LoRA rank of every branch and baseline (peft); 0: full fine-tuning
    lora_alpha: float = 16.0  # LoRA scale s = alpha / r (alpha / sqrt(r) with lora_rslora)
    lora_dropout: float = 0.0  # dropout on the LoRA input during training
    lora_target_modules: tuple[str, ...] = ()  # module names to adapt (empty: all linear layers)
    lora_rslora: bool = False  # rank-stabilised scale alpha / sqrt(r) instead of alpha / r
    snapshot_steps: tuple[int, ...] = ()  # joint runs keep their weights at these steps

    def __post_init__(self) -> None:
        steps = list(self.snapshot_steps)
        refuse(
            unless(self.lr > 0, f"lr: must be > 0, got {self.lr!r}")
            + unless(
                steps == sorted(set(steps)) and min(steps, default=1) >= 1,
                f"snapshot_steps: give optimizer steps >= 1 in increasing order, got {steps}",
            )
            + below(
                self, 1, "batch_size", "grad_accum", "save_steps", "n_procs", "procs_per_branch"
            )
            + not_one_of("distributed", "distributed mode", self.distributed, DISTRIBUTED_MODES)
            + unless(
                0 <= self.warmup_ratio < 1,
                f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio!r}",
            )
            + below(self, 0, "weight_decay", "max_grad_norm", "seed")
            + below(self, 8, "max_length")
            + unless(all(g >= 0 for g in self.gpus), f"gpus: ids must be >= 0, got {self.gpus}")
            + below(self, 0, "lora_r")
            + [
                f"procs_per_branch: {self.procs_per_branch} {p}"
                for p in [
                    global_batch_problem(self.batch_size, self.grad_accum, self.procs_per_branch)
                ]
                if p
            ]
            + unless(self.lora_alpha > 0, f"lora_alpha: must be > 0, got {self.lora_alpha!r}")
            + unless(
                0 <= self.lora_dropout < 1,
                f"lora_dropout: must be in [0, 1), got {self.lora_dropout!r}",
            )
            + unless(
                self.lora_r == 0 or self.distributed == "ddp",
                "lora_r: LoRA branches train with distributed: ddp (FSDP is not supported)",
            )
            + unless(
                len({self.seed, *self.seeds}) == len(self.seeds) + 1
                and min(self.seeds, default=0) >= 0,
                f"seeds: must be distinct, >= 0 and differ from seed ({self.seed}), "
                f"got {list(self.seeds)}",
            )
        )


@dataclass(frozen=True)
class ExperimentConfig:
    """One row of the comparison table."""

    name: str  # row label, e.g. "joint-1ep", "random-k4", "merit-2d"
    kind: str = "split"  # joint (one model) | split (branches + merge) | soup | shrink | early
    epochs: float = 1.0  # passes over each source's train split
    method: str | None = None  # split: balanced | random | kmeans | gain; None: partition.json
    r: int | None = None  # split, balanced: K = 2^r
    k: int | None = None  # split: K groups (instead of r)
    seed: int = 0  # split: seed of random / k-means
    seeds: tuple[int, ...] = (0, 1, 2)  # soup: training seeds of the joint runs averaged uniformly
    merges: tuple[str, ...] = ("linear",)  # split: merge methods; rows beyond the first: name+m
    joint: str | None = None  # shrink | early: the joint experiment (None: the first one)
    of: tuple[str, ...] = ()  # shrink | early: the merged rows to control (empty: every one)

    def __post_init__(self) -> None:
        split, soup = self.kind == "split", self.kind == "soup"
        refuse(
            unless(bool(self.name), "name: must not be empty")
            + not_one_of("kind", "kind", self.kind, EXPERIMENT_KINDS)
            + unless(self.epochs > 0, f"epochs: must be > 0, got {self.epochs!r}")
            + below(self, 0, "r", "seed")
            + below(self, 1, "k")
            + unless(
                not split or self.method is None or self.r is not None or self.k is not None,
                f"r: give r or k for method {self.method!r}",
            )
            + unless(
                not soup or len(set(self.seeds)) >= 2,
                f"seeds: a soup needs at least two seeds, all different; got {self.seeds}",
            )
            + unless(all(s >= 0 for s in self.seeds), f"seeds: must be >= 0, got {self.seeds}")
            + unless(not split or len(self.merges) >= 1, "merges: give at least one merge method")
            + unless(
                len(set(self.merges)) == len(self.merges),
                f"merges: a method is listed twice: {self.merges}",
            )
        )


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

    def __post_init__(self) -> None:
        refuse(below(self, 1, "shard_size"))


@dataclass(frozen=True)
class EvalConfig:
    splits: tuple[str, ...] = ("eval",)  # loss on these splits (train: the diagnostics' side)
    max_examples: int | None = None  # per source and split (None: all)
    exact_match: bool = True  # greedy answers vs references, on the eval split
    max_new_tokens: int = 48  # greedy answer length limit
    batch_size: int = 256  # examples per forward / generate call (pooled over sources)
    lm_eval: dict | None = None  # lm-eval tasks per row: {tasks, include_path, limit, ...}
    # lmms-eval image-text benchmarks per row: {tasks, include_path, limit, judge, ...}
    lmms_eval: dict | None = None
    # evaluation-only sources, scored on every row and trained by none: a folder of
    # <source>.jsonl (`merit_lab.evaluation.heldout`); their rows have split "heldout"
    heldout: str | None = None

    def __post_init__(self) -> None:
        refuse(
            unless(len(self.splits) >= 1, "splits: give at least one split")
            + unless(
                self.heldout is None or (isinstance(self.heldout, str) and self.heldout != ""),
                f"heldout: give a folder of evaluation-only <source>.jsonl, got {self.heldout!r}",
            )
            + below(self, 1, "max_examples", "max_new_tokens", "batch_size")
            + lm_eval_problems(self.lm_eval)
            + lmms_eval_problems(self.lmms_eval)
        )


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

    def __post_init__(self) -> None:
        refuse(
            below(self, 1, "max_examples", "hessian_k", "hessian_iter", "curvature_examples")
            + below(self, 2, "alphas")
            + unless(all(s >= 0 for s in self.sigmas), f"sigmas: must be >= 0, got {self.sigmas}")
            + unless(
                len(self.seeds) >= 1 and all(s >= 0 for s in self.seeds),
                f"seeds: give at least one seed, each >= 0; got {self.seeds}",
            )
        )


@dataclass(frozen=True)
class PlanConfig:
    """`merit-lab plan`'s stated mixture size, for a mixture that is not here yet (before
    ``fetch-data``); a local mixture or a run's ``mixture.json`` is counted instead."""

    sources: int | None = None  # sources in the mixture
    examples_per_source: int | None = None  # examples per source (train + eval)
    tokens_per_example: int | None = None  # tokens per example: prompt + response (+ image)
    response_tokens_per_example: int | None = None  # of those, response tokens (the size unit)
    image_tokens_per_example: int = 0  # of those, image tokens (the vision tower: merge² patches)

    def __post_init__(self) -> None:
        given = [
            self.sources,
            self.examples_per_source,
            self.tokens_per_example,
            self.response_tokens_per_example,
        ]
        refuse(
            below(
                self,
                1,
                "sources",
                "examples_per_source",
                "tokens_per_example",
                "response_tokens_per_example",
            )
            + below(self, 0, "image_tokens_per_example")
            + unless(
                all(v is None for v in given) or all(v is not None for v in given),
                "sources: give sources, examples_per_source, tokens_per_example and "
                "response_tokens_per_example together (or none of them)",
            )
            + unless(
                self.tokens_per_example is None
                or (self.response_tokens_per_example or 0) + self.image_tokens_per_example
                <= self.tokens_per_example,
                "tokens_per_example: must hold the response and image tokens, got "
                f"{self.tokens_per_example!r}",
            )
        )
