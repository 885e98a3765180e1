"""One branch trained by N processes: torchrun + transformers `Trainer`/accelerate (DDP or FSDP).

Input: a branch's global batch (``batch_size`` x ``grad_accum`` examples per optimizer step),
its process count and mode. Output: each rank's share of the batch, the padding that keeps every
rank in step, the rank's Trainer arguments, the torchrun command, and which rank writes files.

How the engines split the work (transformers 5.x, accelerate 1.x): ``accelerator.prepare`` wraps
the sequential sampler's batches in ``BatchSamplerShard`` (no ``split_batches``): micro-batch i
goes to rank i mod N, so one optimizer step of N ranks x g micro-batches of b examples reads the
same consecutive examples as one process reading G micro-batches of B when b x g x N = B x G.
Trainer sums the step's label tokens over the ranks (``average_tokens_across_devices``), divides
each rank's summed loss by that count and multiplies it by N, which DDP's gradient mean undoes:
the step's gradient is one process's. A short last round would make ``BatchSamplerShard`` wrap
around to the first examples (``even_batches``); null examples (no tokens, no labels) fill it
instead, so nothing is trained twice and the token budget holds.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merit_lab.config.fields import global_batch_problem
from merit_lab.io import atomic_dir, atomic_write_json

__all__ = [
    "NULL_EXAMPLE",
    "barrier",
    "check_sharding",
    "collate_with_nulls",
    "export_submitit_env",
    "finish_process_group",
    "full_state_dict",
    "is_main_process",
    "make_branch_callback",
    "null_padding",
    "process_training_args",
    "save_final_model",
    "split_global_batch",
    "torchrun_command",
    "world_size",
]


def split_global_batch(
    batch_size: int, grad_accum: int, procs: int, branch: str = ""
) -> tuple[int, int]:
    """Each process's (micro-batch, accumulation steps) so that N of them step on the same
    ``batch_size x grad_accum`` examples as one process.

    The accumulation is divided when it can be (larger micro-batches run faster), else the
    micro-batch.

    Args:
        branch: the branch's name, for the error message.

    Raises:
        ValueError: when ``procs`` divides neither.
    """
    if procs < 1:
        raise ValueError(f"procs_per_branch must be >= 1, got {procs}")
    problem = global_batch_problem(batch_size, grad_accum, procs)  # `TrainConfig` checks it too
    if problem:
        raise ValueError(f"branch {branch!r}: procs_per_branch={procs} {problem}")
    if grad_accum % procs == 0:
        return batch_size, grad_accum // procs
    return batch_size // procs, grad_accum


def null_padding(n_examples: int, micro_batch: int, procs: int) -> int:
    """Null examples to append so that the last round of N micro-batches is full (no wrap)."""
    if procs == 1:
        return 0
    return -n_examples % (micro_batch * procs)


@dataclass(frozen=True)
class _NullExample:
    """A stand-in example: one masked position, no label, counted as no token."""

    input_ids: tuple[int, ...] = (0,)
    labels: tuple[int, ...] = (-100,)
    overflow: str = ""

    @property
    def n_tokens(self) -> int:
        return 1

    @property
    def n_response_tokens(self) -> int:
        return 0


NULL_EXAMPLE = _NullExample()


def collate_with_nulls(batch: Sequence[Any], pad_token_id: int) -> dict[str, Any]:
    """`formatting.collate`, with the attention of null examples masked out entirely: they add
    no loss, no gradient and no ``num_input_tokens_seen`` (Trainer counts the attention mask)."""
    from merit_lab.data.formatting import collate

    out = collate(batch, pad_token_id)
    for i, ex in enumerate(batch):
        if ex is NULL_EXAMPLE:
            out["attention_mask"][i] = 0
    return out


def world_size() -> int:
    """Processes of this branch (torchrun and `export_submitit_env` set ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0: the one process that writes the branch's files."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def finish_process_group() -> None:
    """Tear the process group down at the end of a rank's life (torch warns otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def process_training_args(
    device_type: str, distributed: str, gradient_checkpointing: bool
) -> dict[str, Any]:
    """The ``TrainingArguments`` of this rank that differ from a single process's: the backend
    (gloo on the CPU, nccl on GPUs), FSDP2 sharding, activation recomputation.

    Raises:
        ValueError: FSDP on the CPU. torch's FSDP2 runs over gloo, but accelerate turns FSDP on
            only for GPU-like devices and would quietly train plain DDP copies on the CPU
            (``AcceleratorState``: the FSDP plugin is read only for MULTI_GPU and kin).
    """
    kw: dict[str, Any] = {}
    if gradient_checkpointing:
        from transformers import TrainingArguments

        # transformers 5.2x renamed it (the old name warns); earlier 5.x know only the old one
        name = "activation_checkpointing"
        if name not in TrainingArguments.__dataclass_fields__:
            name = "gradient_checkpointing"
        kw.update({name: True, f"{name}_kwargs": {"use_reentrant": False}})
    if world_size() == 1:
        return kw
    kw["ddp_backend"] = "gloo" if device_type == "cpu" else "nccl"
    if distributed == "fsdp":
        if device_type == "cpu":
            raise ValueError(
                "distributed='fsdp' needs GPUs: accelerate does not shard on the CPU (it would "
                "train full copies); use distributed='ddp' for CPU processes"
            )
        # FSDP2 over each decoder layer; full state dicts in checkpoints, so that a resume and
        # final/ read plain weights
        kw["fsdp"] = True
        kw["fsdp_config"] = {
            "version": 2,
            "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT",
        }
    return kw


def check_sharding(trainer, distributed: str) -> None:
    """Refuse to train when FSDP was asked for and accelerate did not turn it on."""
    if distributed == "fsdp" and world_size() > 1 and not trainer.is_fsdp_enabled:
        raise RuntimeError("distributed='fsdp' was asked for, but accelerate did not enable FSDP")


def full_state_dict(trainer) -> dict[str, Any] | None:
    """The full weights of an FSDP model, gathered from every rank (all ranks must call it);
    None when the model is not sharded (rank 0 saves ``trainer.model`` as it is)."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    return trainer.accelerator.get_state_dict(trainer.model)


def make_branch_callback(log_path: Path, name: str, epochs: float, total_steps: int):
    """The branch's ``TrainerCallback``: one ``log.jsonl`` line per logged step and one tqdm bar
    (steps, ETA, tokens/s of this session, last loss), both on rank 0 only; its
    ``tokens_per_s`` after training is the session's throughput over all ranks."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class _BranchCallback(TrainerCallback):
        """Trainer's token counts are already summed over the ranks."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(
                total=total_steps,
                initial=state.global_step,
                desc=f"branch {name}",
                disable=not state.is_world_process_zero,
            )
            self.t0, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen
            self.tokens_per_s, self.loss = None, ""

        def on_step_end(self, args, state, control, **kwargs):
            seconds = max(time.perf_counter() - self.t0, 1e-9)
            rate = (state.num_input_tokens_seen - self.tokens0) / seconds  # tqdm adds the ETA
            self.bar.set_postfix_str(f"{rate:,.0f} tok/s{self.loss}", refresh=False)
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs or not state.is_world_process_zero:
                return
            rec = {
                "step": state.global_step,
                "total_steps": total_steps,
                "loss": float(logs["loss"]),
                "lr": float(logs.get("learning_rate", 0.0)),
                "grad_norm": float(logs["grad_norm"]) if "grad_norm" in logs else None,
                "tokens": int(state.num_input_tokens_seen),
                "epoch": float(state.epoch or 0.0) * epochs,  # Trainer's single pass = `epochs`
                "time": time.time(),
            }
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
            self.loss = f", loss {rec['loss']:.4f}"

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()
            seconds, tokens = time.perf_counter() - self.t0, state.num_input_tokens_seen
            if tokens > self.tokens0:  # this session's throughput (a resumed run counts its part)
                self.tokens_per_s = (tokens - self.tokens0) / seconds

    return _BranchCallback()


def save_final_model(
    final: Path, trainer, tokenizer, dtype, manifest_name: str, manifest: Mapping[str, Any]
) -> None:
    """Write ``final/`` (HF folder, then the manifest, atomically) from rank 0, in θ0's ``dtype``;
    with FSDP every rank first joins in gathering the full weights."""
    state = full_state_dict(trainer)
    if not is_main_process():
        return
    model, kw = trainer.model, {}
    if state is not None:
        kw["state_dict"] = {k: v.to("cpu", dtype) for k, v in state.items()}
    else:
        model = model.to("cpu", dtype)
    with atomic_dir(final, overwrite=True) as tmp:
        model.save_pretrained(tmp, **kw)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / manifest_name, manifest)  # last: its presence marks final/ done


def torchrun_command(spec_path: str | os.PathLike, procs: int) -> list[str]:
    """``torchrun --standalone --nproc_per_node N -m merit_lab.training.trainer SPEC`` with this
    Python."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(procs),
        "-m",
        "merit_lab.training.trainer",
        str(spec_path),
    ]


def export_submitit_env() -> None:
    """In a submitit task of a multi-task job: export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``PORT`` so that Trainer (accelerate) starts the process group.

    ``CUDA_VISIBLE_DEVICES`` is left alone: accelerate puts local rank i on ``cuda:i``.
    """
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
