"""What a model costs to train, from its header alone: FLOPs, memory per process and disk.

Input: a `ModelHeader` (parameter counts and the language model's sizes) and the work (tokens,
micro-batch, precision, LoRA rank, processes). Output: numbers, each from one formula written
in its docstring; `merit_lab.training.plan` puts them together per stage of a run.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

from merit_lab.models.headers import ModelHeader

__all__ = [
    "ADAM_BYTES",
    "CHECKPOINT_BYTES",
    "LOGIT_BYTES",
    "Memory",
    "activation_bytes",
    "forward_flops",
    "gradient_stage_memory",
    "lora_parameters",
    "training_flops",
    "training_memory",
    "vision_activation_bytes",
]

ADAM_BYTES = 8  # AdamW's two fp32 moments per trainable parameter
CHECKPOINT_BYTES = 12  # a Trainer checkpoint per trainable parameter: fp32 weights + 2 moments
LOGIT_BYTES = 12  # per token and vocabulary entry: 16/32-bit logits, fp32 log-probs, fp32 grad
# Tensors LoRA never adapts ("all-linear" leaves the output head and embeddings out)
_NOT_LINEAR = ("embed", "lm_head", "norm", "ln_", "patch_embed", "wte", "wpe")


def training_flops(n_params: int, tokens: float) -> float:
    """Forward + backward: ``6 · N · tokens`` (2 for the forward, 4 for the backward; the
    attention scores' ``O(seq²)`` term and the embedding lookup are left out)."""
    return 6.0 * n_params * tokens


def forward_flops(n_params: int, tokens: float) -> float:
    """A forward pass (loss, or one generated token with the KV cache): ``2 · N · tokens``."""
    return 2.0 * n_params * tokens


@dataclass(frozen=True)
class Memory:
    """Peak bytes of one process, by what holds them."""

    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0  # AdamW moments (fp32)
    activations: float = 0.0  # saved for the backward, logits included
    extra: float = 0.0  # autocast's 16-bit weight copies, DDP buckets, FSDP's gathered layers

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))


def activation_bytes(
    header: ModelHeader, tokens: int, act_bytes: int, residual_bytes: int, checkpointing: bool
) -> float:
    """Activations a backward needs, for ``tokens`` tokens in one micro-batch.

    Per token and decoder layer (h hidden, kv the K/V width, I the MLP width): the 16/32-bit
    tensors matmuls and SDPA keep, ``act_bytes · (6h + 3kv + 4I)`` (normed inputs, q k v, rotated
    q k, attention output, gate, up, silu, product), plus the two RMSNorms' fp32 inputs and
    outputs, ``4 · 4h``. With gradient checkpointing only each layer's input is kept,
    ``residual_bytes · h``, plus one layer recomputed in full. Logits add ``LOGIT_BYTES · V``
    per token either way.
    """
    g = header.geometry()
    h, kv, inter, layers = g["hidden"], g["kv"], g["intermediate"], g["layers"]
    per_layer = act_bytes * (6 * h + 3 * kv + 4 * inter) + 4 * 4 * h
    kept = (residual_bytes * h * layers + per_layer) if checkpointing else per_layer * layers
    return float(tokens) * (kept + LOGIT_BYTES * g["vocab"])


def vision_activation_bytes(
    header: ModelHeader, patches: float, act_bytes: int, residual_bytes: int, checkpointing: bool
) -> float:
    """A vision tower's activations for ``patches`` patches in a micro-batch: the per-layer
    formula of `activation_bytes` with the tower's width and MLP (its attention has no grouped
    K/V: kv = h), over its ``depth`` blocks; 0 for a model without ``vision_config``."""
    v = header.config.get("vision_config")
    if not v or not patches:
        return 0.0
    h, inter = int(v["hidden_size"]), int(v.get("intermediate_size", 4 * v["hidden_size"]))
    depth = int(v.get("depth") or v.get("num_hidden_layers"))
    per_layer = act_bytes * (6 * h + 3 * h + 4 * inter) + 4 * 4 * h
    kept = (residual_bytes * h * depth + per_layer) if checkpointing else per_layer * depth
    return float(patches) * kept


def lora_parameters(header: ModelHeader, r: int, targets: Sequence[str] = ()) -> int:
    """Trainable parameters of rank-``r`` LoRA: ``r · (in + out)`` per adapted linear weight
    (every 2-D ``.weight`` but embeddings, norms and the output head, peft's "all-linear"; or
    those whose module name matches ``targets``). Vision-tower linears count too."""
    total = 0
    for key, (_, shape) in header.tensors.items():
        if len(shape) != 2 or not key.endswith(".weight"):
            continue
        module = key.removesuffix(".weight")
        if targets:
            hit = any(fnmatch.fnmatch(module.rsplit(".", 1)[-1], t) for t in targets)
        else:
            hit = not any(part in module for part in _NOT_LINEAR)
        if hit:
            total += r * (shape[0] + shape[1])
    return total


def _largest_layer(header: ModelHeader) -> int:
    """Parameters of the largest decoder (or vision) block: what FSDP gathers at once."""
    blocks: dict[str, int] = {}
    for key, (_, shape) in header.tensors.items():
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            if p.isdigit() and parts[i - 1] in ("layers", "blocks", "h"):
                prefix = ".".join(parts[: i + 1])
                blocks[prefix] = blocks.get(prefix, 0) + math.prod(shape)
                break
    return max(blocks.values(), default=0)


def training_memory(
    header: ModelHeader,
    *,
    tokens: int,
    mixed: bool,
    lora_r: int = 0,
    lora_targets: Sequence[str] = (),
    checkpointing: bool = False,
    procs: int = 1,
    distributed: str = "ddp",
    patches: float = 0.0,
) -> Memory:
    """Peak memory of one training process (transformers' Trainer as a branch runs it).

    Weights are fp32 master copies (4 B/param: θ0 is loaded in float32); ``mixed`` (bf16/fp16
    autocast) adds the 16-bit copies autocast caches for the forward (2 B/param) and keeps
    activations in 16 bits. Full fine-tuning: fp32 gradients (4 B) and AdamW (8 B) per
    parameter; LoRA: the same per adapter parameter only, base weights frozen. DDP over
    ``procs`` > 1 adds gradient buckets (4 B per trainable parameter); FSDP shards weights,
    gradients and moments ``1/procs`` and gathers two blocks at a time. ``tokens`` is the
    process's micro-batch (examples x padded length), ``patches`` its vision-tower patches.
    """
    n = header.n_parameters
    trainable = lora_parameters(header, lora_r, lora_targets) if lora_r else n
    shard = procs if distributed == "fsdp" else 1
    weights = 4.0 * (n + (trainable if lora_r else 0)) / shard
    extra = 2.0 * n if mixed else 0.0
    if distributed == "fsdp" and procs > 1:
        extra = extra / procs + 2 * 4.0 * _largest_layer(header)
    elif procs > 1:
        extra += 4.0 * trainable
    a = 2 if mixed else 4
    act = activation_bytes(header, tokens, a, 4, checkpointing)
    act += vision_activation_bytes(header, patches, a, 4, checkpointing)
    return Memory(
        weights=weights,
        gradients=4.0 * trainable / shard,
        optimizer=ADAM_BYTES * trainable / shard,
        activations=act,
        extra=extra,
    )


def gradient_stage_memory(
    header: ModelHeader,
    *,
    tokens: int,
    dtype_bytes: int,
    checkpointing: bool,
    patches: float = 0.0,
) -> Memory:
    """Peak memory of the gradient stage: the model in the run's dtype (no optimizer), one
    gradient per parameter in that dtype, the micro-batch's activations; the sketch step then
    adds an fp32 copy of the flattened gradient (4 B/param), counted as ``extra`` when it is
    the larger peak. ``patches``: the micro-batch's vision-tower patches."""
    n = header.n_parameters
    act = activation_bytes(header, tokens, dtype_bytes, dtype_bytes, checkpointing)
    act += vision_activation_bytes(header, patches, dtype_bytes, dtype_bytes, checkpointing)
    return Memory(
        weights=dtype_bytes * n,
        gradients=dtype_bytes * n,
        activations=act,
        extra=max(0.0, 4.0 * n - act),
    )
