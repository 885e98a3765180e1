"""merit-lab: a workbench for MERIT, conflict-aware splitting and one-shot weight merging.

The public API is listed in ``__all__``; names load lazily (PEP 562) so that ``import merit_lab``
and the ``merit-lab`` command start without importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "atomic_dir": "io",
    "atomic_write_json": "io",
    "read_json": "io",
    "Mixture": "mixture",
    "Source": "mixture",
    "MixtureError": "mixture",
    "load_mixture": "mixture",
    "tokenize_example": "formatting",
    "load_model": "models",
    "load_tokenizer": "models",
    "select_parameters": "models",
    "SketchSpec": "sketch",
    "build_sketch": "sketch",
    "sketch_fidelity": "sketch",
    "GradientBank": "gradients",
    "estimate_gradients": "gradients",
    "ConflictSpace": "conflict",
    "compute_conflict_space": "conflict",
    "Partition": "partition",
    "make_partition": "partition",
    "EditSession": "curation",
    "predict_gain": "diagnostics.gain",
    "split_balanced": "partition",
    "split_balanced_k": "partition",
    "split_kmeans": "partition",
    "split_random": "partition",
    "merge_checkpoints": "merge",
    "merge_lora": "lora",
    "export_branches": "exports",
    "run_lm_eval": "lm_eval_adapter",
    "style_scores": "evaluate",
    "fingerprint_checkpoint": "checkpoints",
    "BranchSpec": "train",
    "branch_status": "train",
    "train_branch": "train",
    "launch_branches": "launch",
    "evaluate_model": "evaluate",
    "summarize_eval": "evaluate",
    "RunConfig": "config",
    "load_config": "config",
    "RunDir": "pipeline.rundir",
    "load_source_table": "pipeline.rundir",
    "load_edit_session": "pipeline.analysis",
    "run_pipeline": "pipeline.runner",
    "run_summary": "pipeline.runner",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"merit_lab.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'merit_lab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(__all__)
