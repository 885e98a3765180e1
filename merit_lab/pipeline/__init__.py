"""The pipeline layer: everything that knows ``runs/<name>/``.

`rundir` (paths, stage keys, readers) is at the bottom; the stages (`analysis`, `curation` and
`rows` that plan the comparison, `experiments` that trains, merges and evaluates it, `diagnose`,
`report`, `figures`) sit on it; `runner` (``STAGES`` and the loop) is at the top.
Names load lazily (PEP 562), so importing one module of the package does not import them all.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RunDir": "rundir",
    "load_run_mixture": "rundir",
    "load_source_table": "rundir",
    "mixture_args": "rundir",
    "source_counts": "rundir",
    "load_edit_session": "analysis",
    "make_partition": "analysis",
    "save_convergence": "analysis",
    "load_fold_stability": "folds",
    "STAGES": "runner",
    "run_pipeline": "runner",
    "run_summary": "runner",
    "stage_status": "runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"merit_lab.pipeline.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'merit_lab.pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(__all__)
