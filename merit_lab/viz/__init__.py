"""The view layer: the only place plotly, ipywidgets, anywidget and kaleido are imported.

`style` (palette, fonts, the paper style), `export` (HTML and static images), `plots` and
`plots_diagnostics` (figure builders over objects, never paths), and the explorer and editor
widgets. Names load lazily (PEP 562): importing one module does not import plotly's widgets.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Figure": "style",
    "MUTED": "style",
    "PALETTE": "style",
    "PAPER": "style",
    "PaperStyle": "style",
    "color_map": "style",
    "layout": "style",
    "paper_layout": "style",
    "style_map": "style",
    "save_figure": "export",
    "static_renderer_problem": "export",
    "write_figure_files": "export",
    "make_contact_sheet": "export",
    "METRICS": "plots",
    "plot_comparison": "plots",
    "plot_conflict_clustermap": "plots",
    "plot_conflict_heatmap": "plots",
    "plot_conflict_scatter": "plots",
    "plot_explained_variance": "plots",
    "plot_gradient_convergence": "plots",
    "plot_training_curves": "plots",
    "MAX_CELLS": "plots_heatmap",
    "HeatmapCells": "plots_heatmap",
    "find_sources": "plots_heatmap",
    "heatmap_cells": "plots_heatmap",
    "mark_sources": "plots_heatmap",
    "plot_conflict_cells": "plots_heatmap",
    "plot_diagnostics_files": "plots_diagnostics",
    "plot_displacement": "plots_diagnostics",
    "plot_interpolation": "plots_diagnostics",
    "plot_perturbation": "plots_diagnostics",
    "plot_spectral_filtering": "plots_diagnostics",
    "plot_layer_axis_shares": "plots_layers",
    "plot_layer_cosines": "plots_layers",
    "plot_drift_angles": "plots_drift",
    "plot_drift_map": "plots_drift",
    "plot_example_cloud": "plots_examples",
    "plot_pair_contributions": "plots_examples",
    "plot_ari_distribution": "plots_stability",
    "plot_coassignment": "plots_stability",
    "plot_cosine_spread": "plots_stability",
    "plot_fold_agreement": "plots_stability",
    "plot_fold_cosine": "plots_stability",
    "plot_fold_flips": "plots_stability",
    "add_fold_errors": "plots_stability",
    "mark_unstable_sources": "plots_stability",
    "plot_frontier": "plots_frontier",
    "ConflictExplorer": "explorer",
    "PartitionEditor": "editor",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"merit_lab.viz.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'merit_lab.viz' has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(__all__)
