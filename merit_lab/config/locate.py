"""θ0, the mixture and the other paths a run's config names outside the run: recorded when the
config runs (``launch.json``) and resolved once when the run is read.

Input: a `RunConfig` (and the run's ``launch.json``). Output: ``launch.json``'s record, and the
config with those paths resolved (`RunDir.load_config` calls it: the one place they resolve).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from merit_lab.config.schema import RunConfig

__all__ = ["OUTSIDE_KEYS", "launch_record", "locate_outside_paths"]

OUTSIDE_KEYS = ("model", "mixture.path", "eval.heldout", "eval.lm_eval.include_path")


def _is_model_name(model: str) -> bool:
    """``demo``, a fetchable model (``smollm2``) or another bare name: `resolve_model_path` tries
    its names first, so a bare ``model`` is never taken for a folder here (write ``./x``)."""
    return not any(c in model for c in "/\\~") and not model.startswith(".")


def _outside_paths(cfg: RunConfig) -> dict[str, str]:
    """`OUTSIDE_KEYS` that the config sets to a path (not to a name)."""
    include = (cfg.eval.lm_eval or {}).get("include_path")
    found = {
        "model": None if _is_model_name(cfg.model) else cfg.model,
        "mixture.path": cfg.mixture.path if cfg.mixture.path != "demo" else None,
        "eval.heldout": cfg.eval.heldout,
        "eval.lm_eval.include_path": include if isinstance(include, str) else None,
    }
    return {k: v for k, v in found.items() if v}


def launch_record(cfg: RunConfig) -> dict[str, Any]:
    """``launch.json`` for a config about to run: the working directory, and each outside path
    that is a local file or folder, as given and absolute."""
    cwd = Path.cwd()
    paths = {}
    for key, given in _outside_paths(cfg).items():
        full = Path(os.path.abspath(cwd / Path(given).expanduser()))
        if full.exists():
            paths[key] = {"given": given, "path": str(full)}
    return {"cwd": str(cwd), "paths": paths}


def locate_outside_paths(
    cfg: RunConfig, launch: dict[str, Any], where: str | Path = "config.yaml"
) -> RunConfig:
    """``cfg`` (read from a run folder) with its outside paths resolved once: θ0 (``model``),
    ``mixture.path``, ``eval.heldout``, ``eval.lm_eval.include_path``.

    They are stored as given. One that was a local path when the run started (``launch``:
    `launch_record`, ``launch.json``) is that absolute path; another relative one is taken from
    the folder the run started from (the working directory for a run from before
    ``launch.json``); one found nowhere is a name (a hub id, a dataset) and is left as given.
    A path is replaced by its absolute form only where the working directory would find another
    place, so from the folder the run started in the config reads exactly as given.

    Raises:
        FileNotFoundError: a path that no longer exists, a line per key (``<where>: <key>: ...``).
    """
    start = Path(launch.get("cwd") or Path.cwd())
    known = launch.get("paths", {})
    problems, moved = [], {}
    for key, given in _outside_paths(cfg).items():
        p = Path(given).expanduser()
        was = known.get(key, {})
        full = Path(was["path"]) if was.get("given") == given else p if p.is_absolute() else None
        if full is None:
            full = Path(os.path.abspath(start / p))
            if not full.exists() and key in ("model", "mixture.path"):
                continue  # a hub id or a dataset name: resolved by its loader
        if not full.exists():
            rel = "" if p.is_absolute() else f", a relative path taken from {start}"
            problems.append(
                f"{where}: {key}: {given!r} ({full}{rel}) no longer exists; put it back, or "
                f"write its new place there"
            )
        elif Path(os.path.abspath(p)) != full:
            moved[key] = str(full)
    if problems:
        raise FileNotFoundError("\n".join(problems))
    mix, ev = cfg.mixture, cfg.eval
    if "mixture.path" in moved:
        mix = replace(mix, path=moved["mixture.path"])
    if "eval.heldout" in moved:
        ev = replace(ev, heldout=moved["eval.heldout"])
    if "eval.lm_eval.include_path" in moved:
        ev = replace(ev, lm_eval={**ev.lm_eval, "include_path": moved["eval.lm_eval.include_path"]})
    return replace(cfg, model=moved.get("model", cfg.model), mixture=mix, eval=ev)
