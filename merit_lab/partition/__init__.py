"""Splitting the mixture: the partition with its hand edits, the split methods, the curation
session, the predicted merging gain of a split, and the split's stability.

Names load lazily (PEP 562): importing the package does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FOLD_AGREEMENT_TARGET": "folds",
    "FoldStability": "folds",
    "compute_fold_stability": "folds",
    "fold_gram": "folds",
    "half_pairings": "folds",
    "as_matrix": "gain",
    "check_weights": "gain",
    "gain_terms": "gain",
    "group_means": "gain",
    "merging_gain": "gain",
    "predict_gain": "gain",
    "predicted_partition_gain": "gain",
    "quadratic_gain_prediction": "gain",
    "spectral_filtering": "gain",
    "PARTITION_METHODS": "methods",
    "ROW_METHODS": "methods",
    "make_partition": "methods",
    "partition_method": "methods",
    "split_balanced": "methods",
    "split_balanced_k": "methods",
    "split_gain": "methods",
    "split_kmeans": "methods",
    "split_random": "methods",
    "Partition": "plan",
    "check_gain_rows": "search",
    "imbalance": "search",
    "search_gain_split": "search",
    "search_summary": "search",
    "DROPPED": "session",
    "EditSession": "session",
    "UNPLACED": "session",
    "curated_counts": "session",
    "fraction_subset": "session",
    "group_label": "session",
    "group_statistics": "session",
    "place_by_projection": "session",
    "subset_counts": "session",
    "within_between": "session",
    "CONVERGENCE_THRESHOLD": "stability",
    "SplitStability": "stability",
    "UNSTABLE_ARI": "stability",
    "bootstrap_split_stability": "stability",
    "describe_stability": "stability",
    "recommend_n": "stability",
    "stability_warning": "stability",
    "wavering_sources": "stability",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(__all__)
