"""Training a branch from θ0: its spec, the trainer, multi-process and SLURM launching, the
branch log, and exporting each branch's mixture for other trainers.

Names load lazily (PEP 562): importing the package does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MANIFEST": "branch_log",
    "branch_status": "branch_log",
    "read_log": "branch_log",
    "ADAM_BYTES": "cost",
    "CHECKPOINT_BYTES": "cost",
    "LOGIT_BYTES": "cost",
    "Memory": "cost",
    "activation_bytes": "cost",
    "forward_flops": "cost",
    "gradient_stage_memory": "cost",
    "lora_parameters": "cost",
    "training_flops": "cost",
    "training_memory": "cost",
    "vision_activation_bytes": "cost",
    "NULL_EXAMPLE": "distributed",
    "barrier": "distributed",
    "check_sharding": "distributed",
    "collate_with_nulls": "distributed",
    "export_submitit_env": "distributed",
    "finish_process_group": "distributed",
    "full_state_dict": "distributed",
    "is_main_process": "distributed",
    "make_branch_callback": "distributed",
    "null_padding": "distributed",
    "process_training_args": "distributed",
    "save_final_model": "distributed",
    "split_global_batch": "distributed",
    "torchrun_command": "distributed",
    "world_size": "distributed",
    "EXPORT_FORMATS": "exports",
    "ManifestRow": "exports",
    "branch_manifest": "exports",
    "example_hash": "exports",
    "export_branches": "exports",
    "load_spec_mixture": "exports",
    "trained_indices": "exports",
    "DEFAULT_LORA_R": "footprint",
    "ExampleShape": "footprint",
    "branch_memory": "footprint",
    "disk_items": "footprint",
    "is_mixed": "footprint",
    "memory_options": "footprint",
    "micro_batch_examples": "footprint",
    "micro_batch_tokens": "footprint",
    "recommend": "footprint",
    "weight_bytes": "footprint",
    "BRANCH_JOB": "launch",
    "BranchFailedError": "launch",
    "branch_job_name": "launch",
    "launch_branches": "launch",
    "CPU_CALIBRATION": "plan",
    "GPU_CALIBRATION": "plan",
    "H100_BF16_PEAK": "plan",
    "MERGE_BYTES_PER_S": "plan",
    "RunPlan": "plan",
    "StageCost": "plan",
    "Throughput": "plan",
    "TrainingRun": "plan",
    "calibrated_throughput": "plan",
    "describe_hours": "plan",
    "plan_run": "plan",
    "training_runs": "plan",
    "format_plan": "plan_table",
    "slurm_jobs": "plan_table",
    "MixtureSizes": "sizes",
    "SourceSize": "sizes",
    "count_mixture_sizes": "sizes",
    "find_mixture_sizes": "sizes",
    "sizes_from_record": "sizes",
    "stated_sizes": "sizes",
    "SNAPSHOTS": "snapshots",
    "SNAPSHOT_INFO": "snapshots",
    "list_snapshots": "snapshots",
    "make_snapshot_callback": "snapshots",
    "snapshot_dir": "snapshots",
    "write_snapshot": "snapshots",
    "BranchSpec": "spec",
    "RUN_LEVEL_FIELDS": "spec",
    "SCHEDULERS": "spec",
    "SPEC_FORMAT": "spec",
    "SPEC_VERSION": "spec",
    "write_spec": "spec",
    "train_branch": "trainer",
    "train_branch_from_file": "trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(__all__)
