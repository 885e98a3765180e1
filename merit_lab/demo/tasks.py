"""Demo mixture generator: a synthetic instruction mixture with planted conflict structure.

Writes ``train/``, ``calibration/`` and ``eval/`` folders of JSONL files (one per source) plus
``sources.json``, the ground truth that the conflict space of the demo should recover.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from merit_lab.io import atomic_dir, atomic_write_json

__all__ = [
    "AXES",
    "FAMILIES",
    "SPLITS",
    "DemoSource",
    "demo_sources",
    "generate_demo_mixture",
    "sample_demo_example",
]

# The two planted axes. Each is one global contrast applied identically in every family, so it
# is a single direction in gradient space: `style` decides whether the response is wrapped as
# "Result: <answer>." and `case` whether the answer letters are upper or lower case. The prompt
# never reveals either, so two sources that differ on an axis disagree under the same prompt.
AXES: tuple[str, str] = ("style", "case")
STYLES: tuple[str, str] = ("terse", "verbose")
CASES: tuple[str, str] = ("lower", "upper")
# A nuisance factor balanced across both axes: two instruction wordings per family.
WORDINGS: tuple[str, str] = ("a", "b")
SPLITS: tuple[str, str, str] = ("train", "calibration", "eval")

_LETTERS = string.ascii_lowercase


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(lo, hi)))


def _reverse(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 3, 6)
    return w, w[::-1]


def _shift(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 3, 6)
    return w, "".join(_LETTERS[(_LETTERS.index(c) + 1) % 26] for c in w)


def _rotate(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 3, 6)
    return w, w[1:] + w[0]


def _initials(rng: random.Random) -> tuple[str, str]:
    words = [_word(rng, 2, 4) for _ in range(rng.randint(3, 6))]
    return " ".join(words), "".join(w[0] for w in words)


# family -> (input/answer sampler, {wording: prompt template}). Every family answers with 3-6
# lowercase letters so that answer length and alphabet are balanced across families.
_FAMILY_SPECS: dict[str, tuple[Callable[[random.Random], tuple[str, str]], dict[str, str]]] = {
    "reverse": (_reverse, {"a": "Reverse: {x}", "b": "Write {x} backwards"}),
    "shift": (_shift, {"a": "Shift: {x}", "b": "Next letters of {x}"}),
    "rotate": (_rotate, {"a": "Rotate: {x}", "b": "Move the first letter of {x} to the end"}),
    "initials": (_initials, {"a": "Initials: {x}", "b": "First letters of {x}"}),
}
FAMILIES: tuple[str, ...] = tuple(_FAMILY_SPECS)


@dataclass(frozen=True)
class DemoSource:
    """One demo source: a task family under one wording, answer style and answer case."""

    family: str  # which task (see FAMILIES)
    wording: str  # which instruction template of the family ("a" or "b"); a nuisance factor
    style: str  # planted axis 1: "terse" (`abc`) or "verbose" (`Result: abc.`)
    case: str  # planted axis 2: "lower" (`abc`) or "upper" (`ABC`)

    @property
    def name(self) -> str:
        """File stem and source name, e.g. ``reverse-a-terse-lower``."""
        return f"{self.family}-{self.wording}-{self.style}-{self.case}"

    @property
    def description(self) -> str:
        """One human-readable line for ``sources.json``."""
        template = _FAMILY_SPECS[self.family][1][self.wording].format(x="...")
        shape = "Result: <answer>." if self.style == "verbose" else "<answer>"
        return f'{self.family} ("{template}"), answers as {shape} in {self.case} case'


def demo_sources() -> list[DemoSource]:
    """All 32 demo sources: 4 families × 2 wordings × 2 styles × 2 cases, in a fixed order."""
    return [
        DemoSource(family, wording, style, case)
        for family in FAMILIES
        for wording in WORDINGS
        for style in STYLES
        for case in CASES
    ]


def sample_demo_example(
    source: DemoSource, rng: random.Random, *, case_noise: float = 0.0
) -> tuple[str, str]:
    """Draw one (prompt, response) pair of ``source`` from ``rng``.

    Args:
        source: The source to draw from.
        rng: Random generator (consumed).
        case_noise: Probability that each answer letter after the first takes the other case;
            0 for the mixture itself, > 0 only for θ0's pretraining draw (see ``base.py``).
    """
    sampler, templates = _FAMILY_SPECS[source.family]
    x, answer = sampler(rng)
    if source.case == "upper":
        answer = answer.upper()
    if case_noise > 0:
        answer = answer[0] + "".join(
            c.swapcase() if rng.random() < case_noise else c for c in answer[1:]
        )
    response = f"Result: {answer}." if source.style == "verbose" else answer
    return templates[source.wording].format(x=x), response


def _jsonl(source: DemoSource, split: str, pairs: list[tuple[str, str]]) -> str:
    lines = []
    for i, (prompt, response) in enumerate(pairs):
        record = {
            "id": f"{source.name}-{split}-{i}",
            "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": response},
            ],
        }
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    return "".join(lines)


def generate_demo_mixture(
    out_dir: Path,
    *,
    seed: int = 0,
    n_train: int = 256,
    n_calibration: int = 200,
    n_eval: int = 48,
) -> Path:
    """Write the demo mixture (train/calibration/eval JSONL per source + ``sources.json``).

    The output is a pure function of the arguments: re-running writes byte-identical files.
    Prompts are distinct within a source, so the three splits never share an example.

    Args:
        out_dir: Folder to write into (created; the three split folders are replaced whole).
        seed: Seed of every draw.
        n_train: Training examples per source.
        n_calibration: Calibration examples per source (the gradient sample).
        n_eval: Held-out evaluation examples per source.

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    sizes = {"train": n_train, "calibration": n_calibration, "eval": n_eval}
    texts: dict[str, dict[str, str]] = {split: {} for split in SPLITS}
    for source in demo_sources():
        # A string seed is hashed with sha512 by `random`, so it is stable across processes.
        rng = random.Random(f"merit-lab-demo:{seed}:{source.name}")
        seen: set[str] = set()
        pairs: list[tuple[str, str]] = []
        while len(pairs) < sum(sizes.values()):
            prompt, response = sample_demo_example(source, rng)
            if prompt not in seen:
                seen.add(prompt)
                pairs.append((prompt, response))
        start = 0
        for split in SPLITS:
            texts[split][source.name] = _jsonl(source, split, pairs[start : start + sizes[split]])
            start += sizes[split]

    for split in SPLITS:
        with atomic_dir(out_dir / split, overwrite=True) as tmp:
            for name, text in texts[split].items():
                (tmp / f"{name}.jsonl").write_text(text, encoding="utf-8")
    meta = {
        "seed": seed,
        "axes": list(AXES),
        "families": list(FAMILIES),
        "sizes": sizes,
        "sources": {
            s.name: {
                "family": s.family,
                "style": s.style,
                "case": s.case,
                "wording": s.wording,
                "description": s.description,
            }
            for s in demo_sources()
        },
    }
    atomic_write_json(out_dir / "sources.json", meta)
    return out_dir
