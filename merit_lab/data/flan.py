"""FLAN 2021 (``Muennighoff/flan`` on the Hugging Face hub) as a text mixture, one source a task.

Input: the repository's ``train/`` folder, one JSONL file per task (``<task>_10templates.jsonl``,
records ``{"inputs", "targets", ...}``: the task's examples under its ten instruction templates),
from the hub or a local copy. Output: a mixture folder with ``train/<task>.jsonl`` in the
``prompt``/``response`` format, ``tasks.txt`` and ``sources.json``.

The layout is the repository's as far as known here (no hub access when this was written): a
task's name is its file name without ``.jsonl``, ``_10templates``, ``_validation`` and ``_test``,
the rule of the repository's own loading script. `write_flan_mixture` reads any ``train/*.jsonl``
by that rule and says which file held each task.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from merit_lab.cache import hub_file, hub_listing
from merit_lab.data.vision_flan import select_tasks
from merit_lab.io import atomic_dir, atomic_write_json, atomic_write_text

__all__ = ["FLAN_REPO", "FLAN_TASK_COUNT", "flan_task_name", "write_flan_mixture"]

log = logging.getLogger(__name__)

FLAN_REPO = "Muennighoff/flan"
FLAN_TASK_COUNT = 66  # the paper's text experiment: 66 FLAN tasks (its Table 4)
LICENCE_NOTE = (
    "FLAN 2021 (Wei et al., 2022) as re-processed in Muennighoff/flan; each task keeps the "
    "licence of its source dataset. Check the tasks in tasks.txt before use."
)


def flan_task_name(filename: str) -> str:
    """The task a ``Muennighoff/flan`` file holds: its name without the folder, ``.jsonl``,
    ``_10templates``, ``_validation`` and ``_test`` (the repository's loading script's rule)."""
    stem = Path(filename).name.removesuffix(".jsonl").removesuffix(".json")
    for tag in ("_10templates", "_validation", "_test"):
        stem = stem.replace(tag, "")
    return stem


def _task_files(source_dir: str | Path | None) -> dict[str, list[str]]:
    """Task → its ``train/`` files (repository paths, or local paths under ``source_dir``)."""
    if source_dir is None:
        paths = [e["path"] for e in hub_listing(FLAN_REPO, "train")]
    else:
        folder = Path(source_dir) / "train"
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder}: missing; --from needs a copy of the hub repository {FLAN_REPO} "
                "(its train/ folder of <task>_10templates.jsonl files)"
            )
        paths = [str(p) for p in sorted(folder.iterdir())]
    files: dict[str, list[str]] = {}
    for path in sorted(p for p in paths if p.endswith(".jsonl")):
        files.setdefault(flan_task_name(path), []).append(path)
    if not files:
        raise ValueError(f"no train/*.jsonl files in {source_dir or FLAN_REPO}")
    return files


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) of each non-blank line; the error names the file and line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{lineno}: malformed JSON ({e.msg}); delete the file and fetch again"
                ) from e


def _pairs(
    task: str, paths: Sequence[Path], per_task: int, seed: int
) -> tuple[list[dict], Counter]:
    """A task's prompt/response pairs (at most ``per_task``: a seeded sample, file order)."""
    rows, skipped = [], Counter()
    for path in paths:
        for lineno, r in _records(path):
            if not isinstance(r, dict) or not isinstance(r.get("inputs"), str):
                raise ValueError(f"{path}:{lineno}: expected a record with 'inputs' and 'targets'")
            target = r.get("targets")
            if not isinstance(target, str) or not target.strip() or not r["inputs"].strip():
                skipped["empty inputs or targets"] += 1
                continue
            rows.append({"prompt": r["inputs"], "response": target})
    if per_task and len(rows) > per_task:
        digest = hashlib.sha256(f"{seed}:{task}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        rows = [rows[i] for i in np.sort(rng.permutation(len(rows))[:per_task])]
    return [{"id": f"{task}-{i}", **r} for i, r in enumerate(rows)], skipped


def write_flan_mixture(
    out: str | Path,
    tasks: str | Sequence[str] = "all",
    *,
    per_task: int = 0,
    seed: int = 0,
    source_dir: str | Path | None = None,
) -> Path:
    """Write the chosen FLAN tasks as a text mixture folder (replacing ``out`` atomically).

    Args:
        tasks: ``"all"`` (every task of ``train/``; the paper used 66), or a list of names.
        per_task: keep at most this many examples per task (a seeded sample; 0 = all).
        source_dir: a local copy of the repository (default: the hub, into the cache).

    Returns:
        ``out``: ``train/<task>.jsonl`` (``id``, ``prompt``, ``response``), ``tasks.txt`` and
        ``sources.json`` (each task's files and counts).

    Raises:
        FileNotFoundError, ValueError: no ``train/`` files, an unknown task, a malformed line;
            the task names are checked before any task file is downloaded.
    """
    if per_task < 0:
        raise ValueError(f"--per-task: give a number of examples >= 0 (0: all), got {per_task}")
    files = _task_files(source_dir)
    chosen = select_tasks(files, "all" if tasks == "paper" else tasks)
    if len(chosen) != FLAN_TASK_COUNT and tasks in ("all", "paper"):
        log.warning("flan: %d tasks in train/, the paper used %d", len(chosen), FLAN_TASK_COUNT)
    local = {
        t: [Path(p) if source_dir is not None else hub_file(FLAN_REPO, p) for p in files[t]]
        for t in chosen
    }
    meta: dict[str, dict[str, Any]] = {}
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "train").mkdir()
        for task in chosen:
            rows, skipped = _pairs(task, local[task], per_task, seed)
            if not rows:
                raise ValueError(f"flan task {task!r}: no usable example ({dict(skipped)})")
            lines = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
            (tmp / "train" / f"{task}.jsonl").write_text(lines + "\n", encoding="utf-8")
            upstream = [Path(p).name for p in files[task]]
            meta[task] = {"files": upstream, "examples": len(rows), "skipped": dict(skipped)}
        atomic_write_text(tmp / "tasks.txt", "".join(f"{t}\n" for t in chosen))
        atomic_write_json(
            tmp / "sources.json",
            {
                "sources": meta,
                "corpus": f"{FLAN_REPO} (Hugging Face hub)",
                "licence": LICENCE_NOTE,
                "per_task": per_task,
                "seed": seed,
            },
        )
    return Path(out)
