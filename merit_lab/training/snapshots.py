"""Light snapshots of a run: its weights at chosen optimizer steps, for the early-stop control.

Input: a training run's `TrainConfig.snapshot_steps` (set in joint runs only) and its Trainer.
Output: ``<output_dir>/snapshots/step-<N>/``: an HF folder in θ0's dtype and layout (config,
tokenizer, ``model.safetensors``; a LoRA run: the dense model θ0 + s·B·A and ``adapter/``) and
``snapshot.json`` (step, tokens, epoch), written last and atomically by rank 0. No optimizer
state: a snapshot is evaluated and measured, never resumed from; a resumed run keeps them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from merit_lab.io import atomic_dir, atomic_write_json, read_json
from merit_lab.training.distributed import full_state_dict, is_main_process

__all__ = [
    "SNAPSHOTS",
    "SNAPSHOT_INFO",
    "list_snapshots",
    "make_snapshot_callback",
    "snapshot_dir",
    "write_snapshot",
]

SNAPSHOTS = "snapshots"  # the folder of a run's snapshots
SNAPSHOT_INFO = "snapshot.json"  # written last: its presence marks a snapshot complete
_STEP = re.compile(r"step-([0-9]+)")


def snapshot_dir(run_dir: str | Path, step: int) -> Path:
    """``<run_dir>/snapshots/step-<step>``."""
    return Path(run_dir) / SNAPSHOTS / f"step-{int(step)}"


def list_snapshots(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The complete snapshots of a run (``snapshot.json`` present), as (step, folder) by step."""
    folder = Path(run_dir) / SNAPSHOTS
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _STEP.fullmatch(p.name)
        if m and (p / SNAPSHOT_INFO).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _in_dtype(state: dict[str, Any], dtype) -> dict[str, Any]:
    """CPU copies in ``dtype``; tensors that share storage (tied weights) share their copy, so
    ``save_pretrained`` drops the tied key as it does for the model itself."""
    out, seen = {}, {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.device)
        if ident not in seen:
            seen[ident] = t.detach().to("cpu", dtype, copy=True)
        out[key] = seen[ident]
    return out


def write_snapshot(
    folder: Path, trainer, tokenizer, dtype, info: dict[str, Any], *, base: str, lora: bool
) -> None:
    """Write one snapshot of the model being trained, leaving the model as it is.

    Every rank calls it (FSDP gathers the full weights from all of them); rank 0 writes.

    Args:
        folder: ``snapshots/step-<N>``, replaced whole.
        dtype: θ0's dtype (the weights are written in it, like ``final/``).
        info: ``snapshot.json``'s content.
        base: θ0's folder (a LoRA snapshot's dense model is θ0 + s·B·A).
        lora: whether ``trainer.model`` is a peft model.
    """
    state = None if lora else full_state_dict(trainer)
    if not is_main_process():
        return
    if lora:
        from merit_lab.merging.lora import save_lora_branch

        save_lora_branch(folder, trainer.model, base, SNAPSHOT_INFO, info)
        return
    weights = _in_dtype(state if state is not None else trainer.model.state_dict(), dtype)
    with atomic_dir(folder, overwrite=True) as tmp:
        trainer.model.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)
        config = read_json(tmp / "config.json")
        name = str(dtype).removeprefix("torch.")
        for key in ("dtype", "torch_dtype"):  # the fp32 master weights' dtype, not the file's
            if key in config:
                config[key] = name
        atomic_write_json(tmp / "config.json", config)
        atomic_write_json(tmp / SNAPSHOT_INFO, info)  # last: its presence marks it complete


def make_snapshot_callback(
    out: Path, steps: Sequence[int], epochs: float, tokenizer, dtype, *, base: str, lora: bool
):
    """A ``TrainerCallback`` that writes `write_snapshot` after each optimizer step of
    ``steps`` (a step whose snapshot is complete is kept, not written again: a resumed run
    retrains the same steps). Set its ``trainer`` attribute before training."""
    from transformers import TrainerCallback

    wanted = frozenset(int(s) for s in steps)

    class _SnapshotCallback(TrainerCallback):
        trainer = None

        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            if step not in wanted:
                return
            folder = snapshot_dir(out, step)
            if (folder / SNAPSHOT_INFO).is_file():
                return
            info = {
                "step": step,
                "tokens": int(state.num_input_tokens_seen),
                "epoch": float(state.epoch or 0.0) * epochs,  # Trainer's one pass = `epochs`
            }
            write_snapshot(folder, self.trainer, tokenizer, dtype, info, base=base, lora=lora)

    return _SnapshotCallback()
