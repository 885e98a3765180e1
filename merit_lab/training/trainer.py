"""The training loop: fine-tune one branch (or the joint baseline) from θ0 on its sources.

Input: a `BranchSpec` (``spec.json``, `merit_lab.training.spec`). Output: ``<output_dir>/`` with
``checkpoints/`` (resumable), ``final/`` (HF folder and ``merit_branch.json``), ``log.jsonl``
(one line per optimizer step), ``spec.json`` and, with ``train.snapshot_steps``, ``snapshots/``.
``python -m merit_lab.training.trainer SPEC`` trains the branch of a ``spec.json`` (what the
launchers and torchrun run).

The loop is transformers' `Trainer`: its checkpoints restore weights, optimizer, scheduler, RNG and
data position (``resume_from_checkpoint``), it does gradient accumulation with the right per-token
normalisation, mixed precision and device placement, and people already know its folders. We
keep the data order: a seeded example schedule read sequentially, so resuming skips exactly
the batches trained and each source's token budget is the same whichever branch it lands in.
Trainer loads ``optimizer.pt``/``scheduler.pt``/``rng_state.pth`` with ``torch.load(weights_only=
True)`` and weights from safetensors; it still writes a pickled ``training_args.bin`` per
checkpoint, which it never reads back. With ``procs_per_branch`` N > 1 this runs in N processes
on the same global batch (`merit_lab.training.distributed`: torchrun, DDP/FSDP); rank 0 writes the
files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from merit_lab.io import atomic_write_text, read_json, sweep_temp
from merit_lab.training.branch_log import MANIFEST, read_log
from merit_lab.training.distributed import (
    NULL_EXAMPLE,
    barrier,
    check_sharding,
    collate_with_nulls,
    finish_process_group,
    is_main_process,
    make_branch_callback,
    null_padding,
    process_training_args,
    save_final_model,
    split_global_batch,
    world_size,
)
from merit_lab.training.snapshots import make_snapshot_callback
from merit_lab.training.spec import SCHEDULERS, BranchSpec, write_spec

__all__ = ["train_branch", "train_branch_from_file"]

log = logging.getLogger(__name__)


def _schedule(spec: BranchSpec, lengths: Mapping[str, Sequence[int]]) -> list[tuple[str, int]]:
    """The training order: (source, example index) pairs, ``epochs`` passes over the union.

    Each whole epoch is a fresh seeded permutation of the union; a fractional remainder takes
    the first ``round(frac * n)`` examples of a per-source permutation seeded by the source name,
    so a source contributes the same examples whichever branch it is in.
    """
    import numpy as np

    whole, frac = int(spec.epochs), spec.epochs - int(spec.epochs)
    union = [(s, i) for s in spec.sources for i in range(len(lengths[s]))]
    order: list[tuple[str, int]] = []
    for e in range(whole):
        perm = np.random.default_rng([spec.train.seed, e]).permutation(len(union))
        order += [union[j] for j in perm]
    if frac > 1e-9:
        part = []
        for s in spec.sources:
            salt = int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little")
            perm = np.random.default_rng([spec.train.seed, salt]).permutation(len(lengths[s]))
            part += [(s, int(i)) for i in perm[: round(frac * len(lengths[s]))]]
        perm = np.random.default_rng([spec.train.seed, whole]).permutation(len(part))
        order += [part[j] for j in perm]
    return order


class _ScheduleDataset:
    """The schedule as a map-style dataset, read in order (Trainer's ``sequential`` sampler),
    then ``padding`` null examples (`merit_lab.training.distributed.null_padding`)."""

    def __init__(
        self, examples: Mapping[str, Sequence], order: Sequence[tuple[str, int]], padding: int = 0
    ):
        self.examples, self.order, self.padding = examples, list(order), padding

    def __len__(self) -> int:
        return len(self.order) + self.padding

    def __getitem__(self, i: int):
        if i >= len(self.order):
            return NULL_EXAMPLE
        s, j = self.order[i]
        return self.examples[s][j]


def _checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def _last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest ``checkpoint-N`` whose ``trainer_state.json`` (written last) parses.

    A kill during a save leaves a newer, partial folder; Trainer's own ``get_last_checkpoint``
    would pick it and fail, so partial folders are removed here.
    """
    if not folder.is_dir():
        return None
    found = sorted(folder.glob("checkpoint-*"), key=_checkpoint_step, reverse=True)
    for ckpt in found:
        try:
            json.loads((ckpt / "trainer_state.json").read_text())
            return ckpt
        except (OSError, ValueError):
            log.warning("removing incomplete checkpoint %s", ckpt)
            shutil.rmtree(ckpt, ignore_errors=True)
    return None


def _truncate_log(path: Path, step: int) -> None:
    """Keep the lines up to ``step``: steps after the checkpoint are trained and logged again."""
    if path.exists():
        keep = [r for r in read_log(path) if r["step"] <= step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def _train_examples(spec: BranchSpec, source, tokenizer) -> list:
    """A source's tokenised train examples, only the down-weighted subset where it has one.

    The subset is drawn from the examples the ``long_examples`` policy keeps, as ``mixture.json``
    counts them (``train_example_tokens``), so `curation.subset_counts` matches what trains.
    """
    from merit_lab.data.formatting import tokenize_examples
    from merit_lab.partition.session import fraction_subset

    kept = [ex for ex in source.train if ex.get("id") not in spec.excluded.get(source.name, ())]
    train = tokenize_examples(tokenizer, kept, spec.train.max_length, spec.long_examples)
    f = spec.fractions.get(source.name, 1.0)
    if f < 1:
        keep = fraction_subset(source.name, len(train), f, spec.mixture.get("seed", 0))
        train = [train[i] for i in keep]
    return train


def _base_dtype(path: str):
    import torch

    cfg = read_json(Path(path) / "config.json")
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return getattr(torch, str(name), torch.float32)


def _resolve_base(model: str) -> str:
    """θ0's local folder ("demo", a fetched model, a folder or a hub id's snapshot): the merge
    compares branches by a fingerprint of its weight files."""
    from merit_lab.models.loading import resolve_model_path

    path = resolve_model_path(model)
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"base model {model!r}: no HF model folder at {path}")
    return path


@dataclass(frozen=True)
class _Plan:
    """What a branch trains: tokenised examples per source, the order they are read in, and
    the token budget that order spends per source."""

    examples: Mapping[str, Sequence[Any]]  # source → `TokenizedExample`s
    order: Sequence[tuple[str, int]]  # (source, example index), read sequentially
    source_tokens: Mapping[str, int]
    total_steps: int


def _plan(spec: BranchSpec, tokenizer) -> _Plan:
    from merit_lab.data.mixture import load_mixture

    mix_args = dict(spec.mixture)
    mixture = load_mixture(mix_args.pop("path"), **mix_args).select(spec.sources)
    examples = {s.name: _train_examples(spec, s, tokenizer) for s in mixture}
    order = _schedule(spec, examples)
    source_tokens = {s: 0 for s in spec.sources}
    for s, j in order:
        source_tokens[s] += examples[s][j].n_tokens
    n_batches = math.ceil(len(order) / spec.train.batch_size)
    return _Plan(examples, order, source_tokens, math.ceil(n_batches / spec.train.grad_accum))


def _training_args(spec: BranchSpec, out: Path, total_steps: int):
    """transformers ``TrainingArguments`` for the spec; the schedule already holds the epochs."""
    import torch
    from transformers import TrainingArguments

    from merit_lab.models.loading import resolve_device, resolve_dtype

    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)  # "auto": bfloat16 on a GPU that has it
    t = spec.train
    batch, accum = split_global_batch(t.batch_size, t.grad_accum, world_size())
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        lr_scheduler_type=SCHEDULERS[t.lr_scheduler],
        warmup_steps=math.ceil(t.warmup_ratio * total_steps),
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=1,  # the schedule already holds `epochs` passes
        train_sampling_strategy="sequential",  # the schedule is already shuffled, by our seed
        seed=t.seed,
        logging_steps=1,
        save_steps=t.save_steps,
        save_total_limit=1,  # rotation runs after the new checkpoint is complete
        report_to="none",  # never wandb/mlflow/... even when installed
        include_num_input_tokens_seen="non_padding",  # restored with trainer_state on resume
        remove_unused_columns=False,
        use_cpu=device.type == "cpu",
        bf16=dtype == torch.bfloat16,  # autocast over fp32 master weights, not pure half training
        fp16=dtype == torch.float16,
        disable_tqdm=True,
        log_level="warning",
        **process_training_args(device.type, t.distributed, t.gradient_checkpointing),
    )
    if args.n_gpu > 1:  # one GPU per branch; DataParallel would change the batch semantics
        args._n_gpu = 1
    return args


def _make_trainer(
    spec: BranchSpec, base: str, tokenizer, plan: _Plan, args, callbacks: Sequence[Any]
):
    import torch
    from transformers import PrinterCallback, ProgressCallback, Trainer

    # every rank runs the same number of micro-batches: a short last round is filled with nulls
    padding = null_padding(len(plan.order), args.per_device_train_batch_size, world_size())

    from merit_lab.models.loading import load_model

    model = load_model(  # fp32 master weights
        base, device="cpu", dtype="float32", trust_remote_code=spec.trust_remote_code
    )
    t = spec.train
    if t.lora_r:  # A drawn from the seed (the same in every branch), B = 0
        from peft import get_peft_model

        from merit_lab.models.lora import make_lora_config

        torch.manual_seed(t.seed)
        lora = make_lora_config(
            t.lora_r,
            t.lora_alpha,
            t.lora_dropout,
            t.lora_target_modules,
            t.lora_rslora,
        )
        model = get_peft_model(model, lora)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_ScheduleDataset(plan.examples, plan.order, padding),
        data_collator=partial(collate_with_nulls, pad_token_id=tokenizer.pad_token_id),
        callbacks=list(callbacks),
    )
    trainer.remove_callback(ProgressCallback)  # our callback draws the bar and writes the log
    trainer.remove_callback(PrinterCallback)
    return trainer


def _train_resuming(trainer, out: Path) -> None:
    """Train from the last complete checkpoint (if any), re-logging the steps after it."""
    if is_main_process():  # removes cut checkpoints, before any other rank looks
        ckpt = _last_complete_checkpoint(out / "checkpoints")
        _truncate_log(out / "log.jsonl", _checkpoint_step(ckpt) if ckpt else 0)
    barrier()
    ckpt = _last_complete_checkpoint(out / "checkpoints")
    trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)


def _manifest(
    spec: BranchSpec,
    base_fingerprint: str,
    plan: _Plan,
    trainer,
    tokens_per_s: float | None,
    out: Path,
) -> dict[str, Any]:
    """``merit_branch.json``: what was trained, its token budget (the merge weight) and loss."""
    import numpy as np
    import torch

    tokens = int(trainer.state.num_input_tokens_seen)
    planned = sum(plan.source_tokens.values())
    if tokens != planned:  # the schedule, not the loop, defines the budget
        raise RuntimeError(f"trained {tokens} tokens, planned {planned}")
    history = read_log(out / "log.jsonl")
    return {
        "name": spec.name,
        "base_model": spec.base_model,
        "base_fingerprint": base_fingerprint,
        "sources": list(spec.sources),
        "epochs": spec.epochs,
        "tokens": tokens,  # non-padding input tokens trained
        "source_tokens": dict(plan.source_tokens),
        "fractions": dict(spec.fractions),
        # response tokens trained (the run's size unit): the branch's merge weight N_k
        "response_tokens": sum(plan.examples[s][j].n_response_tokens for s, j in plan.order),
        "source_response_tokens": {
            s: sum(plan.examples[s][j].n_response_tokens for s2, j in plan.order if s2 == s)
            for s in spec.sources
        },
        "examples": len(plan.order),
        "steps": int(trainer.state.global_step),
        "train_loss": float(np.mean([r["loss"] for r in history])) if history else None,
        "final_loss": history[-1]["loss"] if history else None,
        "tokens_per_s": tokens_per_s,  # of the last session, all its processes together
        "device": str(trainer.args.device),  # rank 0's
        "procs": world_size(),  # processes of the last session
        "torch_threads": torch.get_num_threads(),
        "spec": spec.to_dict(relative_to=out / "final"),  # output_dir: ".." (moves with it)
    }


def train_branch(spec: BranchSpec, *, callbacks: Sequence[Any] = ()) -> Path:
    """Fine-tune θ0 on the union of the spec's sources; resume from its last checkpoint if any.

    Args:
        spec: the branch to train.
        callbacks: extra ``transformers.TrainerCallback`` objects (e.g. for notebooks or tests).

    Returns:
        ``<output_dir>/final``, an HF model folder with ``merit_branch.json``. A branch whose
        ``final/`` is already complete is returned without training.
    """
    # Imported here (and torch/transformers in the helpers): the launcher and `python -m
    # merit_lab.training.trainer` start fast, and a spec that fails its checks fails before torch
    # loads.
    from merit_lab.models.checkpoints import fingerprint_checkpoint
    from merit_lab.models.loading import load_tokenizer

    out = Path(spec.output_dir)
    final = out / "final"
    if (final / MANIFEST).is_file():
        log.info("branch %s is done (%s); skipping", spec.name, final)
        return final
    if is_main_process():
        sweep_temp(out)  # a killed write's leftovers (final/, log); only rank 0 writes here
        write_spec(spec)
    base = _resolve_base(spec.base_model)
    base_fingerprint = fingerprint_checkpoint(base)  # fails early on a base without safetensors
    tokenizer = load_tokenizer(base, trust_remote_code=spec.trust_remote_code)
    plan = _plan(spec, tokenizer)
    args = _training_args(spec, out, plan.total_steps)
    branch_cb = make_branch_callback(out / "log.jsonl", spec.name, spec.epochs, plan.total_steps)
    trainer = _make_trainer(spec, base, tokenizer, plan, args, [branch_cb, *callbacks])
    check_sharding(trainer, spec.train.distributed)
    if spec.train.snapshot_steps:  # a joint run's snapshots/step-<N>/ (`training.snapshots`)
        snap_cb = make_snapshot_callback(
            out,
            spec.train.snapshot_steps,
            spec.epochs,
            tokenizer,
            _base_dtype(base),
            base=base,
            lora=bool(spec.train.lora_r),
        )
        snap_cb.trainer = trainer
        trainer.add_callback(snap_cb)
    _train_resuming(trainer, out)
    manifest = _manifest(spec, base_fingerprint, plan, trainer, branch_cb.tokens_per_s, out)
    if spec.train.lora_r:
        from merit_lab.merging.lora import save_lora_branch

        if is_main_process():
            save_lora_branch(final, trainer.model, base, MANIFEST, manifest)
    else:
        save_final_model(final, trainer, tokenizer, _base_dtype(base), MANIFEST, manifest)
    if not spec.keep_checkpoints and is_main_process():
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    barrier()  # every rank returns once final/ is complete
    return final


def train_branch_from_file(path: str | Path) -> Path:
    """Train the branch described by a ``spec.json`` (the CLI and launchers call this)."""
    return train_branch(BranchSpec.load(path))


def _main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m merit_lab.training.trainer SPEC.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    final = train_branch_from_file(argv[0])
    finish_process_group()
    if is_main_process():
        print(final)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
