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
    "Mixture": "data.mixture",
    "Source": "data.mixture",
    "MixtureError": "data.mixture",
    "load_mixture": "data.mixture",
    "tokenize_example": "data.formatting",
    "load_model": "models.loading",
    "load_tokenizer": "models.loading",
    "select_parameters": "models.loading",
    "SketchSpec": "gradients.sketch",
    "build_sketch": "gradients.sketch",
    "sketch_fidelity": "gradients.sketch",
    "GradientBank": "gradients.bank",
    "estimate_gradients": "gradients.estimate",
    "ConflictSpace": "analysis.conflict",
    "compute_conflict_space": "analysis.conflict",
    "Partition": "partition.plan",
    "make_partition": "partition.methods",
    "EditSession": "partition.session",
    "predict_gain": "partition.gain",
    "split_balanced": "partition.methods",
    "split_balanced_k": "partition.methods",
    "split_kmeans": "partition.methods",
    "split_random": "partition.methods",
    "merge_checkpoints": "merging.stream",
    "merge_lora": "merging.lora",
    "export_branches": "training.exports",
    "run_lm_eval": "evaluation.lm_eval",
    "run_lmms_eval": "evaluation.lmms_eval",
    "style_scores": "evaluation.evaluate",
    "fingerprint_checkpoint": "models.checkpoints",
    "BranchSpec": "training.spec",
    "branch_status": "training.branch_log",
    "train_branch": "training.trainer",
    "launch_branches": "training.launch",
    "evaluate_model": "evaluation.evaluate",
    "summarize_eval": "evaluation.evaluate",
    "RunConfig": "config.schema",
    "load_config": "config.schema",
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
