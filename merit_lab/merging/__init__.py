"""Merging once: the merge methods (a registry of small functions over tensors) with the
streaming checkpoint writer, and the exact merge of LoRA branches.

Names load lazily (PEP 562): importing the package does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SHRINK_CONTROL": "controls",
    "distance_to_base": "controls",
    "early_step": "controls",
    "shrink_alpha": "controls",
    "write_shrink": "controls",
    "DEFAULT_DIGEST": "digests",
    "DIGESTS": "digests",
    "digest_algorithm": "digests",
    "file_digest": "digests",
    "format_digest": "digests",
    "new_hasher": "digests",
    "verify_digest": "digests",
    "verify_merge_files": "digests",
    "CheckpointFiles": "engine",
    "PIECE": "engine",
    "ShardSink": "engine",
    "merge_into": "engine",
    "LoraAdapter": "lora",
    "check_adapters": "lora",
    "lora_delta": "lora",
    "merge_lora": "lora",
    "save_lora_branch": "lora",
    "stack_adapters": "lora",
    "write_lora_model": "lora",
    "MERGE_METHODS": "methods",
    "MergeMethod": "methods",
    "merge_linear": "methods",
    "merge_method": "methods",
    "merge_task_arithmetic": "methods",
    "merge_ties": "methods",
    "merge_uniform": "methods",
    "MERGE_MANIFEST": "stream",
    "MergeReport": "stream",
    "check_same_base": "stream",
    "fingerprint_checkpoint": "stream",
    "load_merge_manifest": "stream",
    "merge_checkpoints": "stream",
    "merge_version": "stream",
    "mergekit_problem": "stream",
    "read_recorded_path": "stream",
    "record_path": "stream",
    "save_merge_manifest": "stream",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(__all__)
