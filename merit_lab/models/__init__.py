"""Models and checkpoints: loading by name, folder or hub id, fetching the bundled real model,
and reading, hashing and writing checkpoints.

Names load lazily (PEP 562): importing the package does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Checkpoint": "checkpoints",
    "DTYPES": "checkpoints",
    "INDEX_NAME": "checkpoints",
    "SIDE_FILES": "checkpoints",
    "copy_side_files": "checkpoints",
    "file_hashes": "checkpoints",
    "fingerprint_checkpoint": "checkpoints",
    "fingerprint_hashes": "checkpoints",
    "hash_thread": "checkpoints",
    "is_finite": "checkpoints",
    "plan_shards": "checkpoints",
    "sha256_stoppable": "checkpoints",
    "shard_header": "checkpoints",
    "weight_files": "checkpoints",
    "write_shards": "checkpoints",
    "keep_freed_memory": "cpu_memory",
    "FETCHABLE_MODELS": "fetch",
    "FetchableModel": "fetch",
    "fetch_model": "fetch",
    "fetched_model_path": "fetch",
    "HEADER_DIR": "headers",
    "HEADER_SUFFIX": "headers",
    "ModelHeader": "headers",
    "fetch_hub_header": "headers",
    "find_model_header": "headers",
    "parse_safetensors_header": "headers",
    "read_header_dir": "headers",
    "PARAMETER_PRESETS": "loading",
    "build_pico_llama": "loading",
    "load_model": "loading",
    "load_tokenizer": "loading",
    "model_source": "loading",
    "remote_code_problem": "loading",
    "resolve_device": "loading",
    "resolve_dtype": "loading",
    "resolve_model_path": "loading",
    "select_parameters": "loading",
    "ADAPTER_CONFIG": "lora",
    "ADAPTER_DIR": "lora",
    "ADAPTER_WEIGHTS": "lora",
    "adapter_folder": "lora",
    "make_lora_config": "lora",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(__all__)
