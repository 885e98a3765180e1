"""The run configuration: its dataclasses (the one place a default lives), field checks and
the bundled data's locations.

Names load lazily (PEP 562): importing the package does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "JUDGED_TASKS": "fields",
    "JUDGE_KEYS": "fields",
    "JUDGE_KEY_ENV": "fields",
    "LMMS_EVAL_KEYS": "fields",
    "LM_EVAL_KEYS": "fields",
    "below": "fields",
    "coerce": "fields",
    "global_batch_problem": "fields",
    "join_key": "fields",
    "judged_task": "fields",
    "lm_eval_problems": "fields",
    "lmms_eval_problems": "fields",
    "not_one_of": "fields",
    "refuse": "fields",
    "unless": "fields",
    "OUTSIDE_KEYS": "locate",
    "launch_record": "locate",
    "locate_outside_paths": "locate",
    "DATA_DIR": "paths",
    "DEMO_COLLAPSE_DIR": "paths",
    "DEMO_DIR": "paths",
    "DEMO_VL_DIR": "paths",
    "CalibrationConfig": "schema",
    "DEFAULT_SKETCH_DIM": "schema",
    "DEVICES": "schema",
    "DISTRIBUTED_MODES": "schema",
    "DiagnosticsConfig": "schema",
    "EXPERIMENT_KINDS": "schema",
    "EvalConfig": "schema",
    "ExperimentConfig": "schema",
    "FOLD_DEALS": "schema",
    "LAYER_GROUPINGS": "schema",
    "LONG_EXAMPLE_POLICIES": "schema",
    "MergeConfig": "schema",
    "MixtureConfig": "schema",
    "ParameterConfig": "schema",
    "PartitionConfig": "schema",
    "PlanConfig": "schema",
    "RunConfig": "schema",
    "SKETCH_KINDS": "schema",
    "SMALL_SOURCE_POLICIES": "schema",
    "SketchSpec": "schema",
    "TrainConfig": "schema",
    "config_hash": "schema",
    "default_experiments": "schema",
    "load_config": "schema",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(__all__)
