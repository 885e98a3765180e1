"""One gradient per source at θ0, kept as a seeded sketch: the sketch, the bank, the estimator,
its worker jobs and the LoRA variant of the bank.

Names load lazily (PEP 562): importing the package does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BankParts": "bank",
    "FOLDS_FILE": "bank",
    "GradientBank": "bank",
    "bank_key": "bank",
    "map_rows": "bank",
    "read_part": "bank",
    "request_info": "bank",
    "CPU_CALL_TOKENS": "batching",
    "check_deal": "batching",
    "deal_folds": "batching",
    "fold_batches": "batching",
    "fold_batching": "batching",
    "micro_batches": "batching",
    "NonFiniteLossError": "estimate",
    "checkpointed": "estimate",
    "estimate_gradients": "estimate",
    "grads_only_for": "estimate",
    "source_gradient": "estimate",
    "LoraWarmup": "lora_bank",
    "WARMUP_DIR": "lora_bank",
    "WARMUP_RECORD": "lora_bank",
    "load_lora_model": "lora_bank",
    "lora_parameters": "lora_bank",
    "read_warmup": "lora_bank",
    "warm_up_for_run": "lora_bank",
    "warm_up_lora": "lora_bank",
    "warmup_info": "lora_bank",
    "DEFAULT_SKETCH_DIM": "sketch",
    "GradientSketch": "sketch",
    "SKETCH_KINDS": "sketch",
    "SketchSpec": "sketch",
    "build_sketch": "sketch",
    "bytes_per_source": "sketch",
    "sketch_fidelity": "sketch",
    "GradientJob": "workers",
    "agreed_info": "workers",
    "assemble_bank": "workers",
    "current_sources": "workers",
    "job_paths": "workers",
    "launch_jobs": "workers",
    "read_done": "workers",
    "run_job": "workers",
    "shard_sources": "workers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(__all__)
