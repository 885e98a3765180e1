"""Scoring a model: held-out loss, exact match, answer style, and lm-evaluation-harness tasks.

Names load lazily (PEP 562): importing the package does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EVAL_METRICS": "evaluate",
    "GreedyAnswer": "evaluate",
    "PERCENT_METRICS": "evaluate",
    "STYLE_FACTOR": "evaluate",
    "STYLE_FLOOR_TOKENS": "evaluate",
    "TOKEN_STYLE_METRICS": "evaluate",
    "evaluate_model": "evaluate",
    "generate_answers": "evaluate",
    "greedy_answers": "evaluate",
    "heldout_loss": "evaluate",
    "relative_to": "evaluate",
    "seed_spread": "evaluate",
    "style_band": "evaluate",
    "style_budget": "evaluate",
    "style_scores": "evaluate",
    "summarize_eval": "evaluate",
    "FRONTIER_POSITIONS": "frontier",
    "frontier_position": "frontier",
    "frontier_value": "frontier",
    "HELDOUT_SPLIT": "heldout",
    "base_reference_examples": "heldout",
    "load_heldout": "heldout",
    "write_base_references": "heldout",
    "LM_EVAL_SPLIT": "lm_eval",
    "run_lm_eval": "lm_eval",
    "summarize_lm_eval": "lm_eval",
    "write_local_tasks": "lm_eval",
    "Benchmark": "lmms_eval",
    "DEFAULT_MAX_NEW_TOKENS": "lmms_eval",
    "LMMS_EVAL_SPLIT": "lmms_eval",
    "PAPER_BENCHMARKS": "lmms_eval",
    "answer_requests": "lmms_eval",
    "judge_environment": "lmms_eval",
    "judge_record": "lmms_eval",
    "lmms_eval_task_problems": "lmms_eval",
    "run_lmms_eval": "lmms_eval",
    "summarize_lmms_eval": "lmms_eval",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(__all__)
