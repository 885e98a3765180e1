"""Mixture checks: what a source lacks for a run, and what the mixture holds twice.

Input: a source's example counts per split; the examples of a loaded mixture and, optionally, a
hash list of evaluation examples (`write_hash_list`). Output: the shortfall text
`pipeline.analysis` reports before any work (re-exported by `merit_lab.data.mixture`), and the
overlaps the mixture stage writes into ``mixture.json``: examples duplicated across sources
(whitespace-normalised text plus each image's bytes), eval examples that are also training
examples, and listed evaluation examples whose prompt text or image a training example holds.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from merit_lab.data.multimodal import image_bytes
from merit_lab.io import atomic_write_text

__all__ = [
    "HASH_KINDS",
    "example_hashes",
    "mixture_overlaps",
    "overlap_lines",
    "read_hash_list",
    "small_source_message",
    "source_shortfall",
    "write_hash_list",
]

HASH_KINDS = ("text", "image")  # a hash list line: "<kind> <sha256>"
_SAMPLE = 10  # ids kept per finding in mixture.json


@functools.lru_cache(maxsize=65536)
def _image_hash(path: str) -> str:
    """sha256 of an image's bytes (a file or a zip member), once per process."""
    return hashlib.sha256(image_bytes(path)).hexdigest()


def _text(text: str) -> str:
    return " ".join(text.split())


def example_hashes(example: Mapping[str, Any]) -> dict[str, Any]:
    """The hashes of one example (sha256, hex).

    Returns:
        ``example``: the whole conversation (every turn's whitespace-normalised text, each image
        as its bytes' hash, roles and order kept); ``prompt``: the user turns' text only;
        ``images``: the hashes of its images, in order.
    """
    turns, prompt, images = [], [], []
    for m in example["messages"]:
        content = m["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        row = []
        for part in parts:
            if part["type"] == "image":
                images.append(_image_hash(part["image"]))
                row.append(["image", images[-1]])
            else:
                row.append(["text", _text(part["text"])])
                if m["role"] == "user":
                    prompt.append(row[-1][1])
        turns.append([m["role"], row])
    digest = hashlib.sha256(json.dumps(turns, ensure_ascii=False).encode()).hexdigest()
    prompt_text = " ".join(t for t in prompt if t)
    return {
        "example": digest,
        "prompt": hashlib.sha256(prompt_text.encode()).hexdigest() if prompt_text else None,
        "images": images,
    }


def write_hash_list(examples: Iterable[Mapping[str, Any]], out: str | Path) -> Path:
    """The hash list of evaluation examples (e.g. a benchmark converted to the mixture format),
    for ``mixture.overlap_hashes``: one ``text <sha256>`` line per prompt and ``image <sha256>``
    per image, deduplicated; no text of the examples is kept."""
    lines: dict[str, None] = {}
    for ex in examples:
        h = example_hashes(ex)
        if h["prompt"]:
            lines[f"text {h['prompt']}"] = None
        lines.update({f"image {i}": None for i in h["images"]})
    return atomic_write_text(out, "".join(f"{line}\n" for line in lines))


def read_hash_list(path: str | Path) -> dict[str, set[str]]:
    """``{"text": {...}, "image": {...}}`` of a hash list; the error names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mixture.overlap_hashes: {path}: no such file")
    out: dict[str, set[str]] = {k: set() for k in HASH_KINDS}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        kind, _, digest = line.strip().partition(" ")
        if not line.strip():
            continue
        if kind not in out or len(digest) != 64:
            raise ValueError(
                f"{path}:{i}: expected '<text|image> <sha256>', got {line[:80]!r}; build the list "
                "with merit_lab.data.checks.write_hash_list"
            )
        out[kind].add(digest)
    return out


def mixture_overlaps(
    sources: Sequence[Any], hash_list: Mapping[str, set[str]] | None = None
) -> dict[str, Any]:
    """What a mixture holds twice, and what of a hash list its training examples hold.

    Args:
        sources: the mixture's `Source`s (``name``, ``train``, ``calibration``, ``eval``).
        hash_list: `read_hash_list` of evaluation examples (None: that check is skipped).

    Returns:
        ``duplicates``: groups of equal examples (whole conversation, images by their bytes)
        found in more than one source's train or eval split: ``groups``, ``examples`` (in those
        groups), ``by_pair`` (``[a, b, groups]``, most first) and ``sample`` (id lists);
        ``eval_in_train``: eval examples equal to a training example (any source): ``n``,
        ``by_source``, ``sample``; ``hash_list`` (when given): its ``text`` / ``image`` entries
        and how many of each a training example's prompt or images match.
    """
    where: dict[str, list[tuple[str, str]]] = defaultdict(list)  # hash -> [(source, id)]
    train, prompts, images = set(), set(), set()
    evals: list[tuple[str, str, str]] = []
    for s in sources:
        for split in ("train", "eval"):
            for ex in s.split(split):
                h = example_hashes(ex)
                where[h["example"]].append((s.name, ex.get("id", "?")))
                if split == "eval":
                    evals.append((s.name, ex.get("id", "?"), h["example"]))
                    continue
                train.add(h["example"])
                prompts.add(h["prompt"])
                images.update(h["images"])
    groups = [g for g in where.values() if len({name for name, _ in g}) > 1]
    pairs: dict[tuple[str, str], int] = defaultdict(int)
    for g in groups:
        names = sorted({name for name, _ in g})
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                pairs[(a, b)] += 1
    leaked = [(name, i) for name, i, h in evals if h in train]
    by_source: dict[str, int] = defaultdict(int)
    for name, _ in leaked:
        by_source[name] += 1
    out: dict[str, Any] = {
        "duplicates": {
            "groups": len(groups),
            "examples": sum(len(g) for g in groups),
            "by_pair": [[a, b, n] for (a, b), n in sorted(pairs.items(), key=lambda x: -x[1])],
            "sample": [[f"{name}/{i}" for name, i in g] for g in groups[:_SAMPLE]],
        },
        "eval_in_train": {
            "n": len(leaked),
            "by_source": dict(by_source),
            "sample": [f"{name}/{i}" for name, i in leaked[:_SAMPLE]],
        },
    }
    if hash_list is not None:
        out["hash_list"] = {
            "text": len(hash_list["text"]),
            "image": len(hash_list["image"]),
            "text_in_train": len(hash_list["text"] & prompts),
            "image_in_train": len(hash_list["image"] & images),
        }
    return out


def overlap_lines(overlaps: Mapping[str, Any]) -> list[str]:
    """The report's words for `mixture_overlaps` (one bullet per check)."""
    d, e = overlaps["duplicates"], overlaps["eval_in_train"]
    pairs = ", ".join(f"{a} / {b} ({n})" for a, b, n in d["by_pair"][:3])
    lines = [
        f"- duplicated across sources: {d['groups']} group(s) of equal examples "
        f"({d['examples']} examples; text with whitespace normalised, images by their bytes)"
        + (f"; most between {pairs}" if pairs else ""),
        f"- eval examples that are also training examples: {e['n']}"
        + (f" ({', '.join(f'{k} {v}' for k, v in e['by_source'].items())})" if e["n"] else ""),
    ]
    if (h := overlaps.get("hash_list")) is not None:
        lines.append(
            f"- listed evaluation examples found in training: {h['text_in_train']} of {h['text']} "
            f"prompt texts, {h['image_in_train']} of {h['image']} images"
        )
    return lines


def source_shortfall(counts: Mapping[str, int], calibration_n: int) -> str:
    """What a source lacks for a run ("" when nothing), from its ``n_train``, ``n_calibration``
    and ``n_eval``: train examples, ``calibration_n`` calibration examples, eval examples."""
    short = []
    if counts["n_train"] < 1:
        short.append("no train examples")
    if counts["n_calibration"] < calibration_n:
        short.append(
            f"{counts['n_calibration']} calibration examples < calibration.n {calibration_n}"
        )
    if counts["n_eval"] < 1:
        short.append("no eval examples")
    return "; ".join(short)


def small_source_message(shortfalls: Mapping[str, Mapping[str, Any]]) -> str:
    """One message naming each small source, its counts and what it lacks.

    Args:
        shortfalls: source name → ``{"n_train", "n_calibration", "n_eval", "shortfall"}``.
    """
    lines = [
        f"  {name}: train {c['n_train']}, calibration {c['n_calibration']}, eval {c['n_eval']}"
        f" ({c['shortfall']})"
        for name, c in shortfalls.items()
    ]
    return (
        f"{len(lines)} source(s) too small for this run:\n" + "\n".join(lines) + "\nadd examples, "
        "lower calibration.n, raise mixture.eval_fraction, drop the sources, or set "
        "mixture.small_sources: warn to go on with them"
    )
