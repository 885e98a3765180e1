"""Vision-FLAN (``Vision-Flan/vision-flan_191-task_1k`` on the Hugging Face hub) as a mixture.

Input: the hub's ``annotation_191-task_1k.json`` (a list of ``{"id", "image", "conversations",
"task_name"}`` records; ``id`` repeats) and ``image_191-task_1k.zip`` (36 GB; never extracted),
or a folder holding both. Output: a mixture folder with ``train/<task>.jsonl`` (one source per
``task_name``, chat messages whose image part names a zip member, read on demand by
`merit_lab.data.multimodal`), the zip linked in, ``tasks.txt`` and ``sources.json``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import re
import zipfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from merit_lab.cache import hub_file
from merit_lab.data.multimodal import ZIP_SEPARATOR
from merit_lab.io import atomic_dir, atomic_write_json, atomic_write_text, read_json

__all__ = [
    "PAPER_TASK_COUNT",
    "VISION_FLAN_REPO",
    "escape_member",
    "paper_tasks",
    "read_task_file",
    "select_tasks",
    "unescape_member",
    "vision_flan_messages",
    "write_vision_flan_mixture",
]

log = logging.getLogger(__name__)

VISION_FLAN_REPO = "Vision-Flan/vision-flan_191-task_1k"
ANNOTATION_FILE = "annotation_191-task_1k.json"
IMAGES_FILE = "image_191-task_1k.zip"
ZIP_FOLDER = "images_191task_1k/"  # the zip's top folder; a record's `image` is relative to it
PAPER_TASK_COUNT = 136  # the paper's Vision-FLAN tasks (its list is not published)
# Tasks built on an evaluation benchmark's own data or pictures (TextCaps shares TextVQA's
# images): left out of the paper selection so no benchmark is trained on.
BENCHMARK_TASKS = re.compile(
    r"ai2d|text_?vqa|textcaps|mathvista|mmmu|mmbench|seed_?bench|llava|mm-?vet", re.IGNORECASE
)
LICENCE_NOTE = (
    "The dataset card has no licence field; each task keeps the licence of the dataset it was "
    "built from (https://vision-flan.github.io/tasks.html). Check the tasks in tasks.txt before "
    "use."
)
_ESCAPE = re.compile(r"#U([0-9a-fA-F]{4})|#L([0-9a-fA-F]{6})")


def escape_member(name: str) -> str:
    """A file name as the zip stores it: each non-ASCII character as ``#Uxxxx`` (``#Lxxxxxx``
    beyond the Basic Multilingual Plane), Info-ZIP's escape for names without a UTF-8 flag."""
    return "".join(
        c if ord(c) < 128 else (f"#U{ord(c):04x}" if ord(c) <= 0xFFFF else f"#L{ord(c):06x}")
        for c in name
    )


def unescape_member(name: str) -> str:
    """The file name a zip member's ``#Uxxxx`` / ``#Lxxxxxx`` escapes stand for."""
    return _ESCAPE.sub(lambda m: chr(int(m[1] or m[2], 16)), name)


def _member_index(names: Iterable[str]) -> dict[str, str]:
    """A record's ``image`` (the real name, relative to the zip's top folder) → its member."""
    index = {}
    for name in names:
        if name.endswith("/"):
            continue
        real = unescape_member(name)
        index[real.removeprefix(ZIP_FOLDER)] = name
    return index


def paper_tasks(names: Iterable[str], n: int = PAPER_TASK_COUNT) -> list[str]:
    """The paper selection: every task not built on an evaluation benchmark (`BENCHMARK_TASKS`),
    then the ``n`` whose sha256(name) is smallest (a fixed draw that needs no list and does not
    change when tasks are added elsewhere in the order). Fewer when fewer remain."""
    eligible = sorted({t for t in names if not BENCHMARK_TASKS.search(t)})
    return sorted(eligible, key=lambda t: hashlib.sha256(t.encode()).hexdigest())[:n]


def read_task_file(path: str | Path) -> list[str]:
    """Task names of a file, one a line (blank lines and ``#`` comments skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--tasks {path}: no such file (one task name a line)")
    lines = path.read_text(encoding="utf-8").splitlines()
    tasks = [s for line in lines if (s := line.split("#", 1)[0].strip())]
    if not tasks:
        raise ValueError(f"--tasks {path}: no task names in it (one a line)")
    return tasks


def select_tasks(available: Iterable[str], tasks: str | Sequence[str]) -> list[str]:
    """The tasks to fetch: ``"paper"`` (`paper_tasks`), ``"all"``, or a list of names.

    Raises:
        ValueError: a name that is not a task of the data (close names suggested).
    """
    have = sorted(set(available))
    if tasks == "paper":
        return paper_tasks(have)
    if tasks == "all":
        return have
    unknown = [t for t in tasks if t not in set(have)]
    if unknown:
        hints = [
            f"{t!r} (did you mean {', '.join(map(repr, close))}?)"
            if (close := difflib.get_close_matches(t, have, n=2))
            else repr(t)
            for t in unknown
        ]
        raise ValueError(
            f"{len(unknown)} task(s) not in the data: {'; '.join(hints)}; it has {len(have)} "
            "tasks (fetch with --tasks all to list them in tasks.txt)"
        )
    return list(dict.fromkeys(tasks))


def vision_flan_messages(record: Mapping[str, Any], image: str) -> list[dict] | None:
    """A record's conversation as chat messages; the first user turn holds the image part
    (where its ``<image>`` tag stands, else first). None when an answer is empty."""
    turns = record["conversations"]
    messages = []
    for i, turn in enumerate(turns[: len(turns) // 2 * 2]):
        text = str(turn.get("value") or "").strip()
        if i % 2:
            if not text:
                return None
            messages.append({"role": "assistant", "content": text})
            continue
        if i:
            messages.append({"role": "user", "content": text.replace("<image>", "").strip()})
            continue
        before, tag, after = text.partition("<image>")
        texts = (before.strip(), after.replace("<image>", "").strip()) if tag else ("", text)
        parts = [{"type": "text", "text": texts[0]}] if texts[0] else []
        parts.append({"type": "image", "image": image})
        parts += [{"type": "text", "text": texts[1]}] if texts[1] else []
        messages.append({"role": "user", "content": parts})
    return messages or None


def _read_annotation(path: Path) -> dict[str, list[dict]]:
    """The records of the annotation file grouped by task; one error for a malformed file."""
    try:
        records = read_json(path)
    except ValueError as e:
        raise ValueError(f"{e}; delete it and fetch again") from e
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a list of records, got {type(records).__name__}")
    by_task: dict[str, list[dict]] = {}
    for i, r in enumerate(records):
        keys = ("image", "conversations", "task_name")
        if not isinstance(r, dict) or any(k not in r for k in keys):
            raise ValueError(f"{path}: record {i} lacks one of {keys}: {str(r)[:120]}")
        by_task.setdefault(str(r["task_name"]), []).append(r)
    return by_task


def _open_zip(path: Path) -> list[str]:
    """The member names of the image zip (its central directory only: nothing is extracted)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(
            f"{path}: not a readable zip ({type(e).__name__}: {e}); delete it and fetch again"
        ) from e


def _sample(records: list[dict], per_task: int, seed: int, task: str) -> list[dict]:
    """At most ``per_task`` records (a seeded sample in file order; 0: all)."""
    if not per_task or len(records) <= per_task:
        return records
    digest = hashlib.sha256(f"{seed}:{task}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return [records[i] for i in np.sort(rng.permutation(len(records))[:per_task])]


def _source_name(task: str) -> str:
    return re.sub(r"[^\w+.-]+", "-", task).strip("-") or "task"


def _task_examples(
    task: str, records: list[dict], index: Mapping[str, str]
) -> tuple[list[dict], Counter]:
    """A task's examples keyed by task + image (``id`` repeats upstream); what was skipped."""
    rows, skipped, seen = [], Counter(), Counter()
    for r in records:
        name = str(r["image"]).removeprefix("./").removeprefix(ZIP_FOLDER)
        member = index.get(name) or index.get(unescape_member(name))
        if member is None:
            skipped["image not in the zip"] += 1
            continue
        messages = vision_flan_messages(r, f"{IMAGES_FILE}{ZIP_SEPARATOR}{member}")
        if messages is None:
            skipped["empty answer"] += 1
            continue
        key = f"{task}:{name}"
        seen[key] += 1
        key += f"#{seen[key]}" if seen[key] > 1 else ""
        rows.append({"id": key, "messages": messages, "upstream_id": str(r.get("id", ""))})
    return rows, skipped


def _fetched(source_dir: str | Path | None) -> tuple[Path, Path | None]:
    """The annotation file now, and the zip if it is local (else None: downloaded after the
    task selection is checked, so a typo costs no 36 GB)."""
    if source_dir is None:
        return hub_file(VISION_FLAN_REPO, ANNOTATION_FILE), None
    folder = Path(source_dir)
    for name in (ANNOTATION_FILE, IMAGES_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder / name}: missing; --from needs a folder holding {ANNOTATION_FILE} and "
                f"{IMAGES_FILE} (the hub repository {VISION_FLAN_REPO})"
            )
    return folder / ANNOTATION_FILE, folder / IMAGES_FILE


def write_vision_flan_mixture(
    out: str | Path,
    tasks: str | Sequence[str] = "paper",
    *,
    per_task: int = 0,
    seed: int = 0,
    source_dir: str | Path | None = None,
) -> Path:
    """Write the chosen Vision-FLAN tasks as a mixture folder (replacing ``out`` atomically).

    Args:
        tasks: ``"paper"`` (`paper_tasks`: 136 tasks by a stated rule), ``"all"``, or names.
        per_task: keep at most this many records per task (a seeded sample; 0 = all, ~1000).
        source_dir: a folder with the two upstream files (default: the hub, into the cache).

    Returns:
        ``out``: ``train/<task>.jsonl``, ``image_191-task_1k.zip`` (a link to the archive),
        ``tasks.txt`` (the tasks fetched: a ``--tasks`` file) and ``sources.json``.

    Raises:
        FileNotFoundError, ValueError: a missing or malformed annotation file, a corrupt zip, an
            unknown task; all before anything is written.
    """
    if per_task < 0:
        raise ValueError(f"--per-task: give a number of examples >= 0 (0: all), got {per_task}")
    annotation, images = _fetched(source_dir)
    by_task = _read_annotation(annotation)
    chosen = select_tasks(by_task, tasks)
    if tasks == "paper" and len(chosen) < PAPER_TASK_COUNT:
        log.warning(
            "vision-flan: %d tasks pass the paper rule, not %d", len(chosen), PAPER_TASK_COUNT
        )
    names = {t: _source_name(t) for t in chosen}
    if len(set(names.values())) < len(names):
        clash = [t for t in chosen if list(names.values()).count(names[t]) > 1]
        raise ValueError(f"tasks {clash} map to one file name; fetch them separately")
    images = images or hub_file(VISION_FLAN_REPO, IMAGES_FILE)
    index = _member_index(_open_zip(images))
    meta: dict[str, dict[str, Any]] = {}
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "train").mkdir()
        for task in chosen:
            rows, skipped = _task_examples(
                task, _sample(by_task[task], per_task, seed, task), index
            )
            if not rows:
                raise ValueError(f"task {task!r}: no usable record ({dict(skipped)})")
            lines = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
            (tmp / "train" / f"{names[task]}.jsonl").write_text(lines + "\n", encoding="utf-8")
            meta[names[task]] = {"task_name": task, "examples": len(rows), "skipped": dict(skipped)}
            if skipped:
                log.warning("vision-flan %s: skipped %s", task, dict(skipped))
        (tmp / IMAGES_FILE).symlink_to(Path(images).resolve())
        atomic_write_text(tmp / "tasks.txt", "".join(f"{t}\n" for t in chosen))
        atomic_write_json(
            tmp / "sources.json",
            {
                "sources": meta,
                "corpus": f"{VISION_FLAN_REPO} (Hugging Face hub)",
                "licence": LICENCE_NOTE,
                "tasks": tasks if isinstance(tasks, str) else "listed",
                "n_tasks_upstream": len(by_task),
                "per_task": per_task,
                "seed": seed,
            },
        )
    return Path(out)
