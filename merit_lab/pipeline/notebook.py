"""The setting every notebook starts from: the repository folder, the smoke switch, the runs folder.

A notebook's first cell holds ``from merit_lab.pipeline.notebook import ROOT, SMOKE, OUTPUT_DIR``;
the three names are read from the working directory and the environment when that import runs
(PEP 562), so the tests can point a notebook at a tiny setting and a temporary runs folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["NOTEBOOK_NAMES", "NotebookSetting", "notebook_setting"]

SMOKE_VAR = "MERIT_SMOKE"  # "1": tiny settings on the same code path (the tests set it)
OUTPUT_VAR = "MERIT_OUTPUT_DIR"  # where runs go instead of <ROOT>/runs
NOTEBOOK_NAMES = ("ROOT", "SMOKE", "OUTPUT_DIR")  # what a notebook imports from here


@dataclass(frozen=True)
class NotebookSetting:
    """What a notebook needs to know before it loads a config."""

    root: Path  # the repository folder: configs/ and data/ are resolved against it
    smoke: bool  # MERIT_SMOKE=1: shrink every heavy cell
    output_dir: str  # the runs folder handed to `load_config(..., output_dir=...)`


def notebook_setting(
    cwd: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> NotebookSetting:
    """The setting of a notebook run from ``cwd`` (default: the working directory).

    Jupyter runs a notebook in its own folder, ``notebooks/``: the repository is then its
    parent. Run from anywhere else (``jupyter nbconvert --execute`` at the top), the working
    directory is taken as the repository.

    Args:
        cwd: the folder the kernel runs in.
        environ: the environment (default ``os.environ``): ``MERIT_SMOKE`` (1 or 0) and
            ``MERIT_OUTPUT_DIR``.

    Raises:
        ValueError: ``MERIT_SMOKE`` is set to something other than 1 or 0.
    """
    here = Path.cwd() if cwd is None else Path(cwd)
    env = os.environ if environ is None else environ
    root = here.parent if here.name == "notebooks" else here
    smoke = env.get(SMOKE_VAR, "")
    if smoke not in ("", "0", "1"):  # "true" or "yes" would silently run the full setting
        raise ValueError(f"{SMOKE_VAR}={smoke!r}: set it to 1 (tiny settings) or 0 (the full run)")
    return NotebookSetting(root, smoke == "1", env.get(OUTPUT_VAR) or str(root / "runs"))


def __getattr__(name: str) -> Path | bool | str:
    if name in NOTEBOOK_NAMES:
        setting = notebook_setting()
        return {"ROOT": setting.root, "SMOKE": setting.smoke, "OUTPUT_DIR": setting.output_dir}[
            name
        ]
    raise AttributeError(f"module 'merit_lab.pipeline.notebook' has no attribute {name!r}")
