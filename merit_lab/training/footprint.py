"""What a run holds: training memory per process under each option, the advice when a branch
does not fit one GPU, and the disk its branches, checkpoints, snapshots, merges and bank take.

Input: a `RunConfig` and its model's `ModelHeader`, plus the counts of trained and merged
models (`merit_lab.training.plan`). Output: labelled `Memory` rows, advice lines, disk rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from merit_lab.config.fields import global_batch_problem
from merit_lab.config.schema import RunConfig
from merit_lab.models.checkpoints import DTYPES
from merit_lab.models.headers import ModelHeader
from merit_lab.training.cost import CHECKPOINT_BYTES, Memory, lora_parameters, training_memory

__all__ = [
    "DEFAULT_LORA_R",
    "ExampleShape",
    "branch_memory",
    "disk_items",
    "is_mixed",
    "memory_options",
    "micro_batch_examples",
    "micro_batch_tokens",
    "recommend",
    "weight_bytes",
]

DEFAULT_LORA_R = 16  # the rank the LoRA option is shown at when the config trains no LoRA
GC_SLOWDOWN = 1.3  # recomputing activations in backward: about 1.3x the time


def weight_bytes(header: ModelHeader) -> int:
    """One saved model in θ0's dtype: what a final/, a merge or a snapshot holds."""
    return header.n_parameters * DTYPES[header.dtype].itemsize


@dataclass(frozen=True)
class ExampleShape:
    """What sets a micro-batch's size besides the config: the longest train example and the
    image tokens of an example."""

    longest: int = 0  # tokens of the longest train example (0: unknown, max_length is used)
    image_tokens: float = 0.0  # image tokens per example (a vision tower sees merge² patches each)


def micro_batch_examples(cfg: RunConfig, procs: int, batch: int | None = None) -> int:
    """A process's examples per micro-batch (`split_global_batch`'s rule)."""
    t = cfg.train
    batch = batch or t.batch_size
    return batch if t.grad_accum % procs == 0 else max(batch // procs, 1)


def micro_batch_tokens(
    cfg: RunConfig, procs: int, batch: int | None = None, longest: int = 0
) -> int:
    """A process's micro-batch in tokens: its examples, each padded to the longest example
    (capped at train.max_length; max_length itself when the longest is unknown)."""
    length = min(longest, cfg.train.max_length) if longest else cfg.train.max_length
    return micro_batch_examples(cfg, procs, batch) * length


def branch_memory(
    cfg: RunConfig,
    header: ModelHeader,
    device: str,
    *,
    lora: int,
    gc: bool,
    procs: int,
    dist: str,
    shape: ExampleShape = ExampleShape(),
    batch: int | None = None,
) -> Memory:
    """`training_memory` of one process of a branch of this run: its micro-batch padded to the
    longest example, its precision, and its vision patches (merge² per image token)."""
    tokens = micro_batch_tokens(cfg, procs, batch, shape.longest)
    examples = micro_batch_examples(cfg, procs, batch)
    merge = int((header.config.get("vision_config") or {}).get("spatial_merge_size", 1))
    return training_memory(
        header,
        tokens=tokens,
        mixed=is_mixed(cfg, device),
        lora_r=lora,
        lora_targets=cfg.train.lora_target_modules,
        checkpointing=gc,
        procs=procs,
        distributed=dist,
        patches=merge**2 * shape.image_tokens * examples,
    )


def memory_options(
    cfg: RunConfig, header: ModelHeader, device: str, gpus: int, shape: ExampleShape
) -> list[tuple[str, Memory]]:
    """Peak memory per training process: as configured first, then full fine-tuning on one
    GPU, with gradient checkpointing, DDP and FSDP over ``gpus``, and LoRA."""
    t = cfg.train
    r = t.lora_r or DEFAULT_LORA_R

    def mem(lora: int, gc: bool, procs: int, dist: str) -> Memory:
        return branch_memory(
            cfg,
            header,
            device,
            lora=lora,
            gc=gc,
            procs=procs,
            dist=dist,
            shape=shape,
        )

    kind = f"LoRA r={t.lora_r}" if t.lora_r else "full"
    gc = ", gradient checkpointing" if t.gradient_checkpointing else ""
    procs = f", {t.distributed.upper()} x{t.procs_per_branch}" if t.procs_per_branch > 1 else ""
    options = [
        (
            f"as configured ({kind}{procs}{gc})",
            mem(t.lora_r, t.gradient_checkpointing, t.procs_per_branch, t.distributed),
        ),
        ("full, 1 GPU", mem(0, False, 1, "ddp")),
        ("full, 1 GPU, gradient checkpointing", mem(0, True, 1, "ddp")),
    ]
    if gpus > 1:
        options += [
            (f"full, DDP x{gpus}", mem(0, False, gpus, "ddp")),
            (f"full, FSDP x{gpus}", mem(0, False, gpus, "fsdp")),
            (f"full, FSDP x{gpus}, gradient checkpointing", mem(0, True, gpus, "fsdp")),
        ]
    options += [
        (f"LoRA r={r}, 1 GPU", mem(r, False, 1, "ddp")),
        (f"LoRA r={r}, 1 GPU, gradient checkpointing", mem(r, True, 1, "ddp")),
    ]
    return options


def is_mixed(cfg: RunConfig, device: str) -> bool:
    """bf16/fp16 autocast over fp32 master weights ("auto": bf16 on a GPU)."""
    return cfg.dtype in ("bfloat16", "float16") or (cfg.dtype == "auto" and device == "gpu")


def _fsdp_fit(
    cfg: RunConfig, header: ModelHeader, budget: float, device: str, gc: bool, shape: ExampleShape
) -> tuple[int, float]:
    """The fewest processes (2, 4, ... 64) over which FSDP fits ``budget``: (N, bytes); (0, 0)
    when none does (a count must divide grad_accum or batch_size: `global_batch_problem`)."""
    t = cfg.train
    for n in (2, 4, 8, 16, 32, 64):
        if global_batch_problem(t.batch_size, t.grad_accum, n):
            continue
        m = branch_memory(cfg, header, device, lora=0, gc=gc, procs=n, dist="fsdp", shape=shape)
        if m.total <= budget:
            return n, m.total
    return 0, 0.0


def recommend(
    options: Sequence[tuple[str, Memory]],
    budget: float,
    cfg: RunConfig,
    header: ModelHeader,
    device: str,
    shape: ExampleShape,
) -> list[str]:
    """What to change when the configured branch does not fit ``budget`` bytes per GPU, each
    with its numbers: gradient checkpointing (same GPU, ~1.3x the time), a smaller micro-batch
    with the same global batch, FSDP over the fewest GPUs that fit (without, then with
    checkpointing), LoRA."""
    t, gb = cfg.train, budget / 1e9
    label, configured = options[0]
    if configured.total <= budget:
        return [f"fits: {configured.total / 1e9:.1f} GB per process of {gb:.0f} GB ({label})"]
    out = [f"does not fit: {configured.total / 1e9:.1f} GB per process > {gb:.0f} GB ({label})"]
    gc = dict(options)["full, 1 GPU, gradient checkpointing"]
    if gc.total <= budget and not t.gradient_checkpointing:
        out.append(
            "- gradient checkpointing (train.gradient_checkpointing: true): "
            f"{gc.total / 1e9:.1f} GB on 1 GPU, about {GC_SLOWDOWN}x the time"
        )
    smaller = [b for b in range(1, t.batch_size) if t.batch_size % b == 0 and gc.total > budget]
    for b in sorted(smaller, reverse=True):
        m = branch_memory(
            cfg,
            header,
            device,
            lora=t.lora_r,
            gc=True,
            procs=t.procs_per_branch,
            dist=t.distributed,
            shape=shape,
            batch=b,
        )
        if m.total <= budget:
            accum = t.batch_size * t.grad_accum // b
            out.append(
                f"- a smaller micro-batch, the same global batch (train.batch_size: {b}, "
                f"grad_accum: {accum}, gradient_checkpointing: true): {m.total / 1e9:.1f} GB"
            )
            break
    for with_gc in (False, True):
        n, need = _fsdp_fit(cfg, header, budget, device, with_gc, shape)
        if n:
            extra = " with gradient checkpointing" if with_gc else ""
            out.append(
                f"- FSDP over {n} GPUs{extra} (train.procs_per_branch: {n}, distributed: fsdp): "
                f"{need / 1e9:.1f} GB per GPU"
            )
            break
    fits = [(lb, m) for lb, m in options if lb.startswith("LoRA") and m.total <= budget]
    if fits:
        out.append(f"- {fits[0][0]} (train.lora_r): {fits[0][1].total / 1e9:.1f} GB")
    if len(out) == 1:
        out.append("- nothing listed fits: shorten train.max_length or train.batch_size")
    return out


def disk_items(
    cfg: RunConfig,
    header: ModelHeader,
    runs: Sequence[Any],
    merged: Sequence[tuple[str, int]],
    n_sources: int,
    gpus: int = 1,
    controls: int = 0,
) -> list[tuple[str, float, str]]:
    """(what, bytes, how it is counted) for everything the run writes that grows with the
    model, then the total at the end and the peak while branches train."""
    t, w = cfg.train, weight_bytes(header)
    lora = lora_parameters(header, t.lora_r, t.lora_target_modules) if t.lora_r else 0
    trainable = lora or header.n_parameters
    models = sum(r.branches for r in runs)
    joints = sum(r.kind == "joint" for r in runs)
    final = w + 4 * lora  # a LoRA final/ holds the dense model and its fp32 adapter
    ckpt = CHECKPOINT_BYTES * trainable
    at_once = {"sequential": 1, "local": max(gpus // t.procs_per_branch, 1)}.get(t.launcher, models)
    dim = cfg.sketch.dim if cfg.sketch.kind in ("countsketch", "gaussian") else 0
    folds = getattr(cfg.calibration, "folds", 1)  # calibration.folds > 1: m fold rows a source
    folds = folds if folds > 1 else 0
    rows = [
        (
            f"final weights: {models} branch and joint models",
            models * final,
            f"{w:,} B each ({header.dtype})" + (" + adapter" if lora else ""),
        ),
        (
            f"merged rows: {len(merged)}, control rows: {controls}",
            (len(merged) + controls) * w,
            "one model each, θ0's dtype (an unreachable early-stop row writes none)",
        ),
        (
            f"snapshots: {joints} joint runs x {len(t.snapshot_steps)} steps",
            joints * len(t.snapshot_steps) * w,
            "weights only, θ0's dtype",
        ),
        (
            f"gradient bank: {n_sources} sources x d={dim}",
            2 * n_sources * (1 + folds) * 4 * dim,
            f"T x (1 + {folds} folds) x 4 x d, twice (bank and folds files, per-source parts)",
        ),
    ]
    end = sum(b for _, b, _ in rows)
    rows.append(("total kept at the end", end, ""))
    rows.append(
        (
            f"checkpoints while training: {at_once} branch(es) at once x 2",
            at_once * 2 * ckpt,
            f"{ckpt:,} B each: {CHECKPOINT_BYTES} B per trainable parameter (fp32 weights, "
            f"AdamW); every {t.save_steps} steps the newest is kept; deleted after final/",
        )
    )
    rows.append(("peak while training (upper bound)", end + at_once * 2 * ckpt, ""))
    return rows
