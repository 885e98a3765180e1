"""What the gradient bank says: the conflict space, its convergence in n, example-level and
layer-wise views, and the drift of the space along training.

Names load lazily (PEP 562): importing the package does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "arrays_digest": "array_file",
    "load_beside": "array_file",
    "map_arrays": "array_file",
    "save_arrays": "array_file",
    "save_beside": "array_file",
    "ConflictSpace": "conflict",
    "compute_conflict_space": "conflict",
    "space_from_cosine": "conflict",
    "bootstrap_convergence": "convergence",
    "gradient_convergence": "convergence",
    "sketch_example_gradients": "convergence",
    "Drift": "drift",
    "DriftPoint": "drift",
    "compute_drift": "drift",
    "pca_basis": "drift",
    "principal_angles": "drift",
    "DOMINANT_SHARE": "examples",
    "ExampleSketches": "examples",
    "OUTLIER_Z": "examples",
    "cosine_shares": "examples",
    "dots_to_rows": "examples",
    "example_coordinates": "examples",
    "flag_outliers": "examples",
    "pair_contributions": "examples",
    "resketch": "examples",
    "weighted_mean": "examples",
    "KINDS": "layerwise",
    "LAYER_GROUPINGS": "layerwise",
    "LayerBank": "layerwise",
    "LayerCollector": "layerwise",
    "LayerConflict": "layerwise",
    "ParamGroup": "layerwise",
    "axis_shares": "layerwise",
    "binary_contrast": "layerwise",
    "compute_layer_conflict": "layerwise",
    "decompose_cosines": "layerwise",
    "group_cosines": "layerwise",
    "group_parameters": "layerwise",
    "group_spec": "layerwise",
    "key_view": "layerwise",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(__all__)
