"""Merging once: the merge methods (a registry of small functions over tensors) with the
streaming checkpoint writer, and the exact merge of LoRA branches.

Names load lazily (PEP 562): importing the package does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LoraAdapter": "lora",
    "check_adapters": "lora",
    "lora_delta": "lora",
    "merge_lora": "lora",
    "save_lora_branch": "lora",
    "stack_adapters": "lora",
    "write_lora_model": "lora",
    "MERGE_METHODS": "methods",
    "MergeMethod": "methods",
    "MergeReport": "methods",
    "check_same_base": "methods",
    "fingerprint_checkpoint": "methods",
    "merge_checkpoints": "methods",
    "merge_linear": "methods",
    "merge_method": "methods",
    "merge_task_arithmetic": "methods",
    "merge_ties": "methods",
    "merge_uniform": "methods",
    "merge_version": "methods",
    "mergekit_problem": "methods",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(__all__)
