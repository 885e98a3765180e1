"""Training stage: fine-tune one branch (or the joint baseline) from θ0 on its sources.

Input: a `BranchSpec` (``spec.json``): base model, mixture, sources, epochs, shared hyperparameters.
Output: ``<output_dir>/`` with ``checkpoints/`` (resumable), ``final/`` (HF folder and
``merit_branch.json``), ``log.jsonl`` (one line per optimizer step) and ``spec.json``.

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

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from merit_lab.config.schema import LONG_EXAMPLE_POLICIES, MixtureConfig, RunConfig, TrainConfig
from merit_lab.io import atomic_write_json, atomic_write_text, read_json, sweep_temp
from merit_lab.training.branch_log import MANIFEST, branch_status, read_log
from merit_lab.training.distributed import (
    DISTRIBUTED_MODES,
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

__all__ = [
    "MANIFEST",
    "BranchSpec",
    "branch_status",
    "read_log",
    "train_branch",
    "train_branch_from_file",
    "write_spec",
]

log = logging.getLogger(__name__)

SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
# Fields that may differ between a killed run and its resumption without changing the result
# (a run folder may move, or go on on another machine, with another process count: the global
# batch and the data order do not depend on it).
_RESUMABLE_CHANGES = (
    "output_dir",
    "device",
    "save_steps",
    "keep_checkpoints",
    "procs_per_branch",
    "gradient_checkpointing",
)
# Fields left out of spec.json at these values, so specs written before they existed stay equal.
_OMITTED_AT_DEFAULT = {
    "long_examples": MixtureConfig.long_examples,
    "fractions": {},
    "trust_remote_code": False,
    "procs_per_branch": 1,
    "distributed": "ddp",
    "gradient_checkpointing": False,
    "lora_r": 0,
    "lora_alpha": TrainConfig.lora_alpha,
    "lora_dropout": 0.0,
    "lora_target_modules": [],
    "lora_rslora": False,
    "excluded": {},
}


@dataclass(frozen=True)
class BranchSpec:
    """All one branch needs, self-contained so that any machine can train it from spec.json."""

    name: str  # branch name, e.g. "0" or "joint"; used in logs and progress bars
    base_model: str  # θ0: HF folder with safetensors weights (or "demo"); every branch shares it
    output_dir: str  # branch folder: checkpoints/, final/, log.jsonl, spec.json
    sources: tuple[str, ...]  # source names this branch trains on (all of them: joint baseline)
    # load_mixture arguments (path, source_column, eval_fraction, seed, calibration_n); the same
    # in every branch so every branch sees the same train split of each source
    mixture: Mapping[str, Any] = field(default_factory=lambda: {"path": "demo"})
    epochs: float = 1.0  # passes over each source's train split (1.0 = its token budget)
    lr: float = TrainConfig.lr  # peak learning rate of AdamW, shared by all branches
    batch_size: int = TrainConfig.batch_size  # examples per micro-batch
    grad_accum: int = TrainConfig.grad_accum  # micro-batches per optimizer step
    warmup_ratio: float = TrainConfig.warmup_ratio  # share of optimizer steps with linear warm-up
    lr_scheduler: str = TrainConfig.lr_scheduler  # "cosine", "linear" or "constant" after warm-up
    weight_decay: float = TrainConfig.weight_decay  # AdamW decoupled weight decay
    max_grad_norm: float = TrainConfig.max_grad_norm  # gradient clipping (0 turns it off)
    max_length: int = TrainConfig.max_length  # tokens per example, after long_examples fits it
    long_examples: str = MixtureConfig.long_examples  # over max_length: formatting.tokenize_example
    seed: int = TrainConfig.seed  # data order and RNG; the same in every branch
    device: str = RunConfig.device  # auto | cpu | cuda (the launcher picks each process's GPU)
    dtype: str = RunConfig.dtype  # float32, or bfloat16/float16 autocast over fp32
    save_steps: int = TrainConfig.save_steps  # write a resumable checkpoint every N optimizer steps
    keep_checkpoints: bool = False  # keep checkpoints/ after final/ is written (~3x the weights)
    # source → share f < 1 of its train examples to train (a hand down-weight): the seeded subset
    # `merit_lab.partition.session.fraction_subset(source, n, f, mixture seed)`, the same in every
    # row
    fractions: Mapping[str, float] = field(default_factory=dict)
    excluded: Mapping[str, list] = field(default_factory=dict)  # source → example ids not trained
    trust_remote_code: bool = False  # let transformers run θ0's own code (the run's setting)
    # processes training this branch together (torchrun; one per GPU, or CPU processes over
    # gloo), each on a share of the same global batch, so the result does not depend on it
    procs_per_branch: int = TrainConfig.procs_per_branch
    distributed: str = TrainConfig.distributed  # ddp (a full copy per process) | fsdp (sharded)
    gradient_checkpointing: bool = TrainConfig.gradient_checkpointing  # less memory, same weights
    # LoRA (peft) instead of full fine-tuning when lora_r > 0: final/ holds the dense model
    # θ0 + s·B·A (θ0's dtype) and the adapter in final/adapter/ (`merit_lab.merging.lora`)
    lora_r: int = TrainConfig.lora_r  # rank r; 0: full fine-tuning
    lora_alpha: float = TrainConfig.lora_alpha  # scale s = alpha / r (alpha / sqrt(r): rslora)
    lora_dropout: float = TrainConfig.lora_dropout  # dropout on the LoRA input in training
    lora_target_modules: tuple[str, ...] = ()  # modules adapted (empty: every linear layer)
    lora_rslora: bool = TrainConfig.lora_rslora  # rank-stabilised scale alpha / sqrt(r)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(self.sources))
        object.__setattr__(self, "lora_target_modules", tuple(self.lora_target_modules))
        object.__setattr__(self, "mixture", dict(self.mixture))
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
        if self.long_examples not in LONG_EXAMPLE_POLICIES:
            raise ValueError(f"long_examples must be one of {list(LONG_EXAMPLE_POLICIES)}")
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {sorted(SCHEDULERS)}")
        if not self.epochs > 0 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("need epochs > 0 and 0 <= warmup_ratio < 1")
        if min(self.batch_size, self.grad_accum, self.save_steps, self.max_length) < 1:
            raise ValueError("batch_size, grad_accum, save_steps and max_length must be >= 1")
        if self.distributed not in DISTRIBUTED_MODES:
            raise ValueError(f"distributed must be one of {list(DISTRIBUTED_MODES)}")
        if self.lora_r < 0 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError("need lora_r >= 0, lora_alpha > 0 and 0 <= lora_dropout < 1")
        if self.lora_r and self.distributed != "ddp":
            raise ValueError(f"branch {self.name!r}: LoRA branches train with ddp, not fsdp")
        # before any work: a global batch that N processes cannot share is refused here
        split_global_batch(self.batch_size, self.grad_accum, self.procs_per_branch, self.name)

    def to_dict(self, *, relative_to: str | Path | None = None) -> dict[str, Any]:
        """The spec as JSON-ready data (tuples become lists).

        Args:
            relative_to: the folder of the file the data goes to; when that file lies in
                ``output_dir`` (``spec.json``, ``final/merit_branch.json``), ``output_dir`` is
                written relative to it ("." or ".."), so the branch folder can move.
        """
        d = dataclasses.asdict(self)
        d["sources"] = list(self.sources)
        d["lora_target_modules"] = list(self.lora_target_modules)
        for k, default in _OMITTED_AT_DEFAULT.items():
            if d[k] == default:
                d.pop(k)
        if relative_to is not None:
            out, folder = Path(self.output_dir).resolve(), Path(relative_to).resolve()
            if folder == out or out in folder.parents:
                d["output_dir"] = Path(os.path.relpath(out, folder)).as_posix()
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BranchSpec:
        """Build a spec from `to_dict` output; unknown keys are an error, not silently dropped."""
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown BranchSpec field(s) {sorted(unknown)}")
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        """Write the spec as JSON (atomically); an ``output_dir`` holding the file is stored
        relative to it."""
        return atomic_write_json(path, self.to_dict(relative_to=Path(path).parent))

    @classmethod
    def load(cls, path: str | Path) -> BranchSpec:
        """Read a spec written by `save`; a relative ``output_dir`` is taken from the file's
        folder (wherever the run has moved), an absolute one as it is."""
        data = read_json(path)
        out = data.get("output_dir")
        if isinstance(out, str) and not Path(out).is_absolute():
            data["output_dir"] = str((Path(path).parent / out).resolve())
        return cls.from_dict(data)


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
        perm = np.random.default_rng([spec.seed, e]).permutation(len(union))
        order += [union[j] for j in perm]
    if frac > 1e-9:
        part = []
        for s in spec.sources:
            salt = int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little")
            perm = np.random.default_rng([spec.seed, salt]).permutation(len(lengths[s]))
            part += [(s, int(i)) for i in perm[: round(frac * len(lengths[s]))]]
        perm = np.random.default_rng([spec.seed, whole]).permutation(len(part))
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
    train = tokenize_examples(tokenizer, kept, spec.max_length, spec.long_examples)
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


def write_spec(spec: BranchSpec) -> Path:
    """Write ``<output_dir>/spec.json``, refusing a folder that holds a different branch.

    Resuming someone else's checkpoints would silently mix two runs; only `_RESUMABLE_CHANGES`
    may differ, and the process count only under DDP (FSDP checkpoints are not re-sharded here).
    """
    path = Path(spec.output_dir) / "spec.json"
    if path.is_file():
        data = read_json(path)
        procs = data.get("procs_per_branch", 1)
        if spec.distributed == "fsdp" and procs != spec.procs_per_branch:
            raise ValueError(
                f"{path.parent}: an FSDP branch resumes with the {procs} processes "
                f"it started with, not {spec.procs_per_branch}"
            )
        old = {k: v for k, v in data.items() if k not in _RESUMABLE_CHANGES}
        new = {k: v for k, v in spec.to_dict().items() if k not in _RESUMABLE_CHANGES}
        if old != new:
            changed = sorted(k for k in new.keys() | old.keys() if old.get(k) != new.get(k))
            raise ValueError(f"{path.parent} holds a different branch (fields {changed} differ)")
    return spec.save(path)


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
    n_batches = math.ceil(len(order) / spec.batch_size)
    return _Plan(examples, order, source_tokens, math.ceil(n_batches / spec.grad_accum))


def _training_args(spec: BranchSpec, out: Path, total_steps: int):
    """transformers ``TrainingArguments`` for the spec; the schedule already holds the epochs."""
    import torch
    from transformers import TrainingArguments

    from merit_lab.models.loading import resolve_device, resolve_dtype

    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)  # "auto": bfloat16 on a GPU that has it
    batch, accum = split_global_batch(spec.batch_size, spec.grad_accum, world_size())
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        learning_rate=spec.lr,
        weight_decay=spec.weight_decay,
        lr_scheduler_type=SCHEDULERS[spec.lr_scheduler],
        warmup_steps=math.ceil(spec.warmup_ratio * total_steps),
        max_grad_norm=spec.max_grad_norm,
        num_train_epochs=1,  # the schedule already holds `epochs` passes
        train_sampling_strategy="sequential",  # the schedule is already shuffled, by our seed
        seed=spec.seed,
        logging_steps=1,
        save_steps=spec.save_steps,
        save_total_limit=1,  # rotation runs after the new checkpoint is complete
        report_to="none",  # never wandb/mlflow/... even when installed
        include_num_input_tokens_seen="non_padding",  # restored with trainer_state on resume
        remove_unused_columns=False,
        use_cpu=device.type == "cpu",
        bf16=dtype == torch.bfloat16,  # autocast over fp32 master weights, not pure half training
        fp16=dtype == torch.float16,
        disable_tqdm=True,
        log_level="warning",
        **process_training_args(device.type, spec.distributed, spec.gradient_checkpointing),
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
    if spec.lora_r:  # A drawn from the seed (the same in every branch), B = 0
        from peft import get_peft_model

        from merit_lab.models.lora import make_lora_config

        torch.manual_seed(spec.seed)
        lora = make_lora_config(
            spec.lora_r,
            spec.lora_alpha,
            spec.lora_dropout,
            spec.lora_target_modules,
            spec.lora_rslora,
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
        "tokens": tokens,  # non-padding input tokens trained: the branch's merge weight N_k
        "source_tokens": dict(plan.source_tokens),
        "fractions": dict(spec.fractions),
        "response_tokens": sum(plan.examples[s][j].n_response_tokens for s, j in plan.order),
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
    check_sharding(trainer, spec.distributed)
    _train_resuming(trainer, out)
    manifest = _manifest(spec, base_fingerprint, plan, trainer, branch_cb.tokens_per_s, out)
    if spec.lora_r:
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
