"""Short-answer collapse demo, its data: 24 short-answer sources and held-out conversations.

The paper's controlled experiment fine-tunes a conversational θ0 on many short-answer tasks and
measures, on prompts no row trains (LLaVA-W), whether the conversational answers survive. This
module writes the same design at small scale:

- **Fine-tuning sources, short answers only** (``<operation>-<convention>``): 6 operations on a
  word (its initial, its first and last letters, its letter count as a word, reversed, spelled
  with dashes, written twice: 1 to 15 letters) × 4 output conventions (bare, capitals,
  ``Answer: x``, ``"x"``; the prompt asks for every convention but the bare one), so answers run
  from 1 to 23 tokens (one token is one character here), as Vision-FLAN's short answers vary.
  The two planted axes are recorded per source in ``sources.json`` (``operation``,
  ``convention``), with ``known_to_theta0``: θ0 was instruction-tuned on 4 of the 24 (one per
  convention, `THETA0_SHORT`), the other 20 are new to it. Train, calibration and eval splits.
- **Held-out conversations that no row trains** (``heldout/``, an evaluation-only folder:
  ``eval/<source>.jsonl`` + ``sources.json``): θ0's 4 conversational families (an opener, then
  2-3 sentences that contain an operation's result) under θ0's own prompt templates, on *fresh*
  words (``conv-<family>``). The references are what θ0 was taught to answer (θ0-style).
  Paraphrased templates (`CONVERSATIONS`, never trained) are not in the folder: θ0 answers them
  in style too rarely to measure a loss of style on them (the gates record how rarely).

Every word (the operand of a prompt) is a random string of 4-7 letters. A fixed hash puts one
word in 8 in the *fresh* pool (`is_fresh_word`): held-out prompts use only fresh words; the
fine-tuning splits and θ0's training draw (`collapse_base.theta0_batches`) never do, so no
held-out prompt shares a word with anything trained. Everything is a pure function of the seed:
re-running writes byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from collections.abc import Callable
from pathlib import Path

from merit_lab.io import atomic_dir, atomic_write_json

__all__ = [
    "CONVENTIONS",
    "CONVERSATIONS",
    "HELDOUT_DIR",
    "OPERATIONS",
    "SPLITS",
    "THETA0_SHORT",
    "collapse_sources",
    "generate_collapse_mixture",
    "heldout_sources",
    "is_fresh_word",
    "sample_conversation",
    "sample_short",
]

_LETTERS = string.ascii_lowercase
_NUMBERS = {4: "four", 5: "five", 6: "six", 7: "seven"}
SPLITS: tuple[str, str, str] = ("train", "calibration", "eval")
HELDOUT_DIR = "heldout"  # the evaluation-only folder inside the mixture folder

# operation -> (prompt, answer). The prompt names the operation; the answer is lowercase letters.
OPERATIONS: dict[str, tuple[str, Callable[[str], str]]] = {
    "initial": ("First letter of {x}?", lambda w: w[0]),
    "first-last": ("First and last letters of {x}?", lambda w: w[0] + w[-1]),
    "count": ("How many letters are in {x}?", lambda w: _NUMBERS[len(w)]),
    "reverse": ("Reverse {x}.", lambda w: w[::-1]),
    "spell": ("Spell {x} with dashes.", lambda w: "-".join(w)),
    "twice": ("Write {x} twice.", lambda w: f"{w} {w}"),
}
# convention -> (what the prompt adds, how the answer is written). The bare convention adds
# nothing: most short-answer instructions do not say "be brief", they just ask.
CONVENTIONS: dict[str, tuple[str, Callable[[str], str]]] = {
    "bare": ("", lambda a: a),
    "upper": (" Reply in capitals.", str.upper),
    "prefixed": (" Start with Answer:", lambda a: f"Answer: {a}"),
    "quoted": (" Reply in quotes.", lambda a: f'"{a}"'),
}
# The short sources θ0 is instruction-tuned on: one per convention, on four operations, so that
# "known to θ0" is spread over both planted axes rather than being one of them.
THETA0_SHORT: tuple[str, ...] = ("initial-bare", "count-upper", "reverse-prefixed", "spell-quoted")


def _explain(w: str) -> str:
    return (
        f"Sure. To reverse {w}, read its letters from the last to the first. "
        f"That gives {w[::-1]}, the same {len(w)} letters in the opposite order."
    )


def _describe(w: str) -> str:
    return (
        f"The word {w} has {len(w)} letters. It starts with {w[0]} and ends with {w[-1]}. "
        f"Sorted, its letters read {''.join(sorted(w))}."
    )


def _chat(w: str) -> str:
    shifted = "".join(_LETTERS[(_LETTERS.index(c) + 1) % 26] for c in w)
    return (
        f"Happy to help! Shifted by one, {w} becomes {shifted}. "
        f"Rotated, it becomes {w[1:] + w[0]}. Both keep all {len(w)} letters."
    )


def _spell_out(w: str) -> str:
    return (
        f"Of course. Letter by letter, {w} is {'-'.join(w)}. "
        f"That makes {len(w)} letters, from {w[0]} to {w[-1]}."
    )


# family -> (θ0's prompt templates, paraphrased templates no model is trained on, answer). The
# paraphrases are measured on θ0 only (`collapse_base.check_collapse_gates`).
CONVERSATIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...], Callable[[str], str]]] = {
    "explain": (
        (
            "Can you explain how to reverse {x}?",
            "How do I reverse {x}? Please explain.",
            "Explain reversing the word {x} to me.",
        ),
        ("Walk me through writing {x} backwards.", "What happens when {x} is read backwards?"),
        _explain,
    ),
    "describe": (
        (
            "Tell me about the word {x}, please.",
            "What can you say about {x}?",
            "Describe the word {x} for me.",
        ),
        ("I'd love to hear about {x}.", "Give me a few facts about {x}."),
        _describe,
    ),
    "chat": (
        (
            "I have the letters {x}. What can I do with them?",
            "What could I make from the letters {x}?",
            "Any ideas for the letters {x}?",
        ),
        ("Suggest some fun with the letters {x}.", "Play with the letters {x} for me."),
        _chat,
    ),
    "spell-out": (
        (
            "How do you spell {x} out loud?",
            "Spell out {x} for me, please.",
            "Can you spell {x} letter by letter?",
        ),
        ("Read {x} to me one letter at a time.", "Say each letter of {x}."),
        _spell_out,
    ),
}


def is_fresh_word(word: str) -> bool:
    """Whether ``word`` is in the fresh pool (one word in 8, by a fixed hash): held-out only."""
    return hashlib.sha256(f"merit-lab-fresh:{word}".encode()).digest()[0] < 32


def _word(rng: random.Random, *, fresh: bool) -> str:
    """A random word of 4-7 letters from the fresh pool (``fresh``) or from the rest."""
    while True:
        w = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(4, 7)))
        if is_fresh_word(w) == fresh:
            return w


def collapse_sources() -> dict[str, tuple[str, str]]:
    """Every fine-tuning source → (operation, convention), in file order (24 sources)."""
    return {f"{op}-{conv}": (op, conv) for op in OPERATIONS for conv in CONVENTIONS}


def heldout_sources() -> dict[str, str]:
    """Every held-out source → its conversational family (θ0's templates, fresh words)."""
    return {f"conv-{f}": f for f in CONVERSATIONS}


def sample_short(source: str, rng: random.Random, *, fresh: bool = False) -> tuple[str, str]:
    """One (prompt, answer) pair of a fine-tuning source (``<operation>-<convention>``)."""
    op, conv = collapse_sources()[source]
    template, answer = OPERATIONS[op]
    cue, render = CONVENTIONS[conv]
    w = _word(rng, fresh=fresh)
    return template.format(x=w) + cue, render(answer(w))


def sample_conversation(
    family: str, rng: random.Random, *, fresh: bool = False, paraphrase: bool = False
) -> tuple[str, str]:
    """One (prompt, answer) pair of a conversational family, under θ0's or paraphrased templates."""
    taught, paraphrased, answer = CONVERSATIONS[family]
    w = _word(rng, fresh=fresh)
    return rng.choice(paraphrased if paraphrase else taught).format(x=w), answer(w)


def _distinct(draw: Callable[[], tuple[str, str]], n: int) -> list[tuple[str, str]]:
    """``n`` pairs with distinct prompts, drawn in order."""
    seen: set[str] = set()
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n:
        prompt, response = draw()
        if prompt not in seen:
            seen.add(prompt)
            pairs.append((prompt, response))
    return pairs


def _jsonl(name: str, split: str, pairs: list[tuple[str, str]]) -> str:
    return "".join(
        json.dumps(
            {
                "id": f"{name}-{split}-{i}",
                "messages": [
                    {"role": "user", "content": p},
                    {"role": "assistant", "content": r},
                ],
            }
        )
        + "\n"
        for i, (p, r) in enumerate(pairs)
    )


def _lengths(pairs: list[tuple[str, str]]) -> list[int]:
    """[shortest, longest] answer in characters (= tokens of the demo's tokenizer)."""
    return [min(len(r) for _, r in pairs), max(len(r) for _, r in pairs)]


def generate_collapse_mixture(
    out_dir: Path,
    *,
    seed: int = 0,
    n_train: int = 64,
    n_calibration: int = 128,
    n_eval: int = 32,
    n_heldout: int = 32,
) -> Path:
    """Write the mixture (``train/``, ``calibration/``, ``eval/``, ``sources.json``) and the
    evaluation-only ``heldout/`` folder (``eval/<source>.jsonl``, ``sources.json``).

    Prompts are distinct within a source, so its splits never share an example. Other folders
    under ``out_dir`` (θ0's ``base/``) are left alone.

    Args:
        out_dir: The mixture folder (the split folders and ``heldout/`` are replaced whole).
        seed: Seed of every draw.
        n_train: Training examples per fine-tuning source.
        n_calibration: Calibration examples per fine-tuning source (the gradient sample).
        n_eval: Held-out examples per fine-tuning source.
        n_heldout: Examples per held-out conversational source.

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    sizes = {"train": n_train, "calibration": n_calibration, "eval": n_eval}
    texts: dict[str, dict[str, str]] = {split: {} for split in SPLITS}
    meta: dict[str, dict] = {}
    for name, (op, conv) in collapse_sources().items():
        rng = random.Random(f"merit-lab-collapse:{seed}:{name}")
        pairs = _distinct(lambda: sample_short(name, rng), sum(sizes.values()))  # noqa: B023
        start = 0
        for split in SPLITS:
            texts[split][name] = _jsonl(name, split, pairs[start : start + sizes[split]])
            start += sizes[split]
        meta[name] = {
            "family": op,
            "operation": op,
            "convention": conv,
            "style": "short",
            "known_to_theta0": name in THETA0_SHORT,
            "answer_chars": _lengths(pairs),
            "description": OPERATIONS[op][0].format(x="...") + CONVENTIONS[conv][0],
        }
    for split in SPLITS:
        with atomic_dir(out_dir / split, overwrite=True) as tmp:
            for name, text in texts[split].items():
                (tmp / f"{name}.jsonl").write_text(text, encoding="utf-8")
    atomic_write_json(
        out_dir / "sources.json",
        {
            "seed": seed,
            "axes": ["operation", "convention"],
            "operations": list(OPERATIONS),
            "conventions": list(CONVENTIONS),
            "sizes": sizes,
            "heldout": HELDOUT_DIR,
            "sources": meta,
        },
    )
    _write_heldout(out_dir / HELDOUT_DIR, seed=seed, n=n_heldout)
    return out_dir


def _write_heldout(folder: Path, *, seed: int, n: int) -> None:
    """The evaluation-only conversations on fresh words (see the module docstring)."""
    texts, meta = {}, {}
    for name, family in heldout_sources().items():
        rng = random.Random(f"merit-lab-collapse-heldout:{seed}:{name}")
        pairs = _distinct(lambda: sample_conversation(family, rng, fresh=True), n)  # noqa: B023
        texts[name] = _jsonl(name, "eval", pairs)
        meta[name] = {
            "family": "conversation",
            "conversation": family,
            "templates": "theta0",
            "style": "long",
            "words": "fresh",
            "answer_chars": _lengths(pairs),
        }
    with atomic_dir(folder, overwrite=True) as tmp:
        (tmp / "eval").mkdir()
        for name, text in texts.items():
            (tmp / "eval" / f"{name}.jsonl").write_text(text, encoding="utf-8")
        atomic_write_json(
            tmp / "sources.json",
            {
                "seed": seed,
                "evaluation_only": True,
                "note": (
                    "Conversations no row trains (the LLaVA-W analog): θ0's four conversational "
                    "families under θ0's templates, on words from the fresh pool that nothing "
                    "trained contains; references are θ0-style answers."
                ),
                "sources": meta,
            },
        )
