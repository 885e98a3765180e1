"""A model's LoRA adapter: the peft configuration of a LoRA branch and where its adapter lives.

Input: rank, alpha and target modules (``train.lora``). Output: a peft ``LoraConfig``; the folder
layout (a branch's ``final/adapter/``) that training writes and the exact LoRA merge reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["ADAPTER_CONFIG", "ADAPTER_DIR", "ADAPTER_WEIGHTS", "adapter_folder", "make_lora_config"]

ADAPTER_DIR = "adapter"  # a LoRA branch's final/adapter/: the peft adapter beside the dense model
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def make_lora_config(
    r: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: Sequence[str] = (),
    rslora: bool = False,
):
    """The peft ``LoraConfig`` of a branch: plain LoRA on the named modules (empty: every linear
    layer but the output head, peft's ``all-linear``), no bias, no DoRA."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        use_rslora=rslora,
        bias="none",
        target_modules=list(target_modules) if target_modules else "all-linear",
        task_type="CAUSAL_LM",
    )


def adapter_folder(path: str | Path) -> Path:
    """The adapter folder of ``path``: itself, or a LoRA branch's ``final/adapter/``."""
    path = Path(path)
    return path / ADAPTER_DIR if (path / ADAPTER_DIR / ADAPTER_CONFIG).is_file() else path
