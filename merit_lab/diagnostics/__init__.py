"""Merge-readiness diagnostics and the merging-gain theory, as functions of tensors and models.

`measures`: loss along linear paths, displacement, the norm inequality, weight noise;
`curvature`: Hessian / Gauss-Newton eigenpairs; `gain`: measured gain, its quadratic prediction
and the one predicted gain of a partition before training (`gain_terms` and its sums).
"""

from __future__ import annotations

from merit_lab.diagnostics.curvature import (
    CurvatureSpectrum,
    build_curvature_matvec,
    exact_hessian,
    hessian_top_eigs,
    hvp,
    lanczos_top_eigs,
)
from merit_lab.diagnostics.measures import (
    LossFn,
    LossGraphFn,
    ResponseLoss,
    Weights,
    as_weights,
    displacement,
    displacement_ratio,
    float_tensors,
    interpolation_curve,
    load_weights,
    make_loss_fn,
    make_loss_graph_fn,
    norm_inequality,
    perturbation_curve,
    stack_deltas,
    summarize_perturbation,
)
from merit_lab.partition.gain import (
    gain_terms,
    group_means,
    merging_gain,
    predict_gain,
    predicted_partition_gain,
    quadratic_gain_prediction,
    spectral_filtering,
)

__all__ = [
    "CurvatureSpectrum",
    "LossFn",
    "LossGraphFn",
    "ResponseLoss",
    "Weights",
    "as_weights",
    "build_curvature_matvec",
    "displacement",
    "displacement_ratio",
    "exact_hessian",
    "float_tensors",
    "gain_terms",
    "group_means",
    "hessian_top_eigs",
    "hvp",
    "interpolation_curve",
    "lanczos_top_eigs",
    "load_weights",
    "make_loss_fn",
    "make_loss_graph_fn",
    "merging_gain",
    "norm_inequality",
    "perturbation_curve",
    "predict_gain",
    "predicted_partition_gain",
    "quadratic_gain_prediction",
    "spectral_filtering",
    "stack_deltas",
    "summarize_perturbation",
]
