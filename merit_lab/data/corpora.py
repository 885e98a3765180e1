"""Real sources nobody here wrote: the ``chatterbot-corpus`` dialogues as a mixture folder, and
the registry of every corpus ``merit-lab fetch-data`` writes (Vision-FLAN and FLAN have their own
modules: `merit_lab.data.vision_flan`, `merit_lab.data.flan`).

Input: the ``chatterbot-corpus`` wheel from the package index (BSD-3-Clause; read as a zip, never
installed) and a choice of sources: ``<language>/<category>`` for one YAML file, or
``<language>`` for every file of a language. Output: one ``<source>.jsonl`` per source in the
``messages`` format (a dialogue's lines alternate user / assistant; multi-turn dialogues stay
multi-turn) and ``sources.json`` with each source's language, category and licence, the folder
layout `merit_lab.data.mixture.load_mixture` reads.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from merit_lab.cache import pypi_wheel
from merit_lab.data.flan import write_flan_mixture
from merit_lab.data.vision_flan import write_vision_flan_mixture
from merit_lab.io import atomic_dir, atomic_write_json

__all__ = [
    "CHATTERBOT_SOURCES",
    "CORPORA",
    "chatterbot_dialogues",
    "dialogue_messages",
    "write_chatterbot_mixture",
]

CHATTERBOT = ("chatterbot-corpus", "1.3.3")
_DATA = "chatterbot_corpus/data/"
# The configs/smollm2.yaml mixture: four English topics and four languages, each with >= 60
# unique dialogues (smaller categories would leave too few calibration and held-out examples;
# english/tech_support's 1050 lines hold only 10 distinct dialogues).
CHATTERBOT_SOURCES = (
    "english/ai",
    "english/coding",
    "english/trivia",
    "english/psychology",
    "german",
    "italian",
    "portuguese",
    "spanish",
)


def dialogue_messages(lines: Sequence[Any]) -> list[dict[str, str]] | None:
    """A chatterbot dialogue as chat messages: lines alternate user, assistant, user, ...

    A trailing user line (no answer) is left out; ``None`` when no answered turn remains or a
    line is empty (the mixture refuses empty answers).
    """
    texts = [str(x).strip() if x is not None else "" for x in lines]
    texts = texts[: len(texts) // 2 * 2]
    if not texts or not all(texts):
        return None
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": t} for i, t in enumerate(texts)]


def chatterbot_dialogues(wheel: str | Path | None = None) -> dict[tuple[str, str], list[list]]:
    """Every dialogue of the corpus by (language, category file stem), in file order."""
    out: dict[tuple[str, str], list[list]] = {}
    with zipfile.ZipFile(wheel or pypi_wheel(*CHATTERBOT)) as zf:
        for name in sorted(n for n in zf.namelist() if n.startswith(_DATA)):
            parts = name[len(_DATA) :].split("/")
            if len(parts) != 2 or not parts[1].endswith((".yml", ".yaml")):
                continue
            data = yaml.safe_load(zf.read(name).decode("utf-8")) or {}
            convs = [c for c in data.get("conversations") or [] if isinstance(c, list)]
            out[(parts[0], parts[1].rsplit(".", 1)[0])] = convs
    return out


def _select(dialogues: dict[tuple[str, str], list[list]], source: str) -> list[tuple[str, list]]:
    """(category, dialogue) pairs of one ``<language>[/<category>]`` source."""
    lang, _, cat = source.partition("/")
    chosen = [(c, d) for (lg, c), ds in dialogues.items() if lg == lang for d in ds]
    if cat:
        chosen = [(c, d) for c, d in chosen if c == cat]
    if not chosen:
        have = sorted({f"{lg}/{c}" for lg, c in dialogues})
        raise KeyError(f"chatterbot source {source!r} not in the corpus; it has: {have}")
    return chosen


def _examples(name: str, chosen: Iterable[tuple[str, list]], cap: int, seed: int) -> list[dict]:
    """Unique, usable dialogues of a source as examples; at most ``cap`` (a seeded sample)."""
    seen, rows = set(), []
    for category, lines in chosen:
        messages = dialogue_messages(lines)
        key = json.dumps(messages)
        if messages is None or key in seen:
            continue
        seen.add(key)
        rows.append({"messages": messages, "category": category})
    if cap and len(rows) > cap:
        keep = np.sort(np.random.default_rng([seed, len(name)]).permutation(len(rows))[:cap])
        rows = [rows[i] for i in keep]
    return [{"id": f"{name}-{i}", **r} for i, r in enumerate(rows)]


def write_chatterbot_mixture(
    out: str | Path,
    sources: Sequence[str] = CHATTERBOT_SOURCES,
    *,
    max_per_source: int = 120,
    seed: int = 0,
    wheel: str | Path | None = None,
) -> Path:
    """Write the chosen chatterbot sources as a mixture folder (replacing ``out`` atomically).

    Args:
        sources: ``<language>/<category>`` (one file, e.g. ``english/ai``) or ``<language>``.
        max_per_source: keep at most this many dialogues per source (a seeded sample; 0 = all).
        wheel: a local ``chatterbot_corpus`` wheel (default: downloaded once into the cache).

    Returns:
        ``out``, holding ``<language>-<category>.jsonl`` (or ``<language>.jsonl``) per source
        and ``sources.json``.
    """
    dialogues = chatterbot_dialogues(wheel)
    meta: dict[str, dict[str, Any]] = {}
    with atomic_dir(out, overwrite=True) as tmp:
        for source in sources:
            name = source.replace("/", "-").replace("_", "-")
            rows = _examples(name, _select(dialogues, source), max_per_source, seed)
            lines = (json.dumps(r, ensure_ascii=False) for r in rows)
            (tmp / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
            lang, _, cat = source.partition("/")
            meta[name] = {"language": lang, "category": cat or "all", "dialogues": len(rows)}
        atomic_write_json(
            tmp / "sources.json",
            {
                "sources": meta,
                "corpus": f"{CHATTERBOT[0]}=={CHATTERBOT[1]} (PyPI), BSD-3-Clause",
                "seed": seed,
                "max_per_source": max_per_source,
            },
        )
    return Path(out)


CORPORA = {
    "chatterbot": write_chatterbot_mixture,
    "vision-flan": write_vision_flan_mixture,
    "flan": write_flan_mixture,
}
