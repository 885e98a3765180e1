"""Short-answer collapse demo: many terse task sources, a few conversational ones, and θ0.

The paper's largest gains are on free-form answers: trained jointly with many short-answer tasks,
a model starts answering conversational prompts tersely too (short-answer collapse), although the
prompts differ. This mixture is built to show that mechanism, or its absence, at small scale:
``SHORT`` families answer with one word under their own instruction, ``LONG`` families answer in
two or three sentences under theirs, and the two kinds are imbalanced (many more short examples,
as Vision-FLAN is to the conversation data). Every long answer contains a short task's result, so
collapsing to the bare result is the easy failure. ``sources.json`` records each source's
``style`` (``short`` / ``long``): the ground truth the conflict space and the metrics check.

θ0 (`instruct_collapse_base`) is the demo base instruction-tuned briefly on a separately seeded,
balanced draw of every source, so it already answers both styles: fine-tuning starts from a
model that does the job, as MERIT's merge-ready base does.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from pathlib import Path

import torch

from merit_lab.io import atomic_dir, atomic_write_json

__all__ = [
    "BASE_FAMILIES",
    "COLLAPSE_FAMILIES",
    "LONG",
    "SHORT",
    "collapse_sources",
    "generate_collapse_mixture",
    "instruct_collapse_base",
    "sample_collapse_example",
]

_LETTERS = string.ascii_lowercase
_VOWELS = set("aeiou")


def _word(rng: random.Random, lo: int = 4, hi: int = 7) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(lo, hi)))


def _shift(w: str) -> str:
    return "".join(_LETTERS[(_LETTERS.index(c) + 1) % 26] for c in w)


def _consonants(w: str) -> str:
    kept = "".join(c for c in w if c not in _VOWELS)
    return kept or w[0]


# family -> (prompt template, answer builder). Short families answer with the bare result; their
# instructions say so. Each uses its own wording, so a prompt names its family.
SHORT: dict[str, tuple[str, Callable[[str], str]]] = {
    "reverse": ("Reverse: {x}", lambda w: w[::-1]),
    "shift": ("Shift: {x}", _shift),
    "rotate": ("Rotate: {x}", lambda w: w[1:] + w[0]),
    "sort": ("Sort the letters of {x}. One word.", lambda w: "".join(sorted(w))),
    "swap": ("Swap the ends of {x}. One word.", lambda w: w[-1] + w[1:-1] + w[0]),
    "consonants": ("Consonants of {x}? One word.", _consonants),
    "capitals": ("Capitals: {x}", str.upper),
    "first-last": ("First and last letter of {x}?", lambda w: w[0] + w[-1]),
}


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
    return (
        f"Happy to help! Shifted by one, {w} becomes {_shift(w)}. "
        f"Rotated, it becomes {w[1:] + w[0]}. Both keep all {len(w)} letters."
    )


LONG: dict[str, tuple[str, Callable[[str], str]]] = {
    "explain": ("Can you explain how to reverse {x}?", _explain),
    "describe": ("Tell me about the word {x}, please.", _describe),
    "chat": ("I have the letters {x}. What can I do with them?", _chat),
}
COLLAPSE_FAMILIES: tuple[str, ...] = (*SHORT, *LONG)
# What θ0 is instruction-tuned on: every conversational family and the three short ones the demo
# base already knows. The other short families are new to θ0, so fine-tuning has something to
# learn, and learning it is what pushes towards one-word answers (as Vision-FLAN's tasks do).
BASE_FAMILIES: tuple[str, ...] = (*LONG, "reverse", "shift", "rotate")
SPLITS: tuple[str, str, str] = ("train", "calibration", "eval")


def collapse_sources() -> dict[str, str]:
    """Every source of the collapse mixture → its style (``short`` or ``long``), in file order."""
    return {**{f: "short" for f in SHORT}, **{f: "long" for f in LONG}}


def sample_collapse_example(family: str, rng: random.Random) -> tuple[str, str]:
    """One (prompt, response) pair of ``family`` drawn from ``rng``."""
    template, answer = {**SHORT, **LONG}[family]
    w = _word(rng)
    return template.format(x=w), answer(w)


def generate_collapse_mixture(
    out_dir: Path,
    *,
    seed: int = 0,
    n_train_short: int = 256,
    n_train_long: int = 48,
    n_calibration: int = 200,
    n_eval: int = 32,
) -> Path:
    """Write the collapse mixture: train/calibration/eval JSONL per source + ``sources.json``.

    A pure function of the arguments (re-running writes byte-identical files); prompts are
    distinct within a source, so the splits never share an example. The imbalance lives in the
    train split only: every source has the same calibration and eval sizes, so the conflict space
    and the metrics weigh the two styles alike.

    Args:
        out_dir: Folder to write into (the three split folders are replaced whole).
        seed: Seed of every draw.
        n_train_short: Training examples of each short-answer source.
        n_train_long: Training examples of each conversational source.
        n_calibration: Calibration examples per source.
        n_eval: Held-out examples per source.
    """
    out_dir = Path(out_dir)
    texts: dict[str, dict[str, str]] = {split: {} for split in SPLITS}
    for family, style in collapse_sources().items():
        sizes = {
            "train": n_train_short if style == "short" else n_train_long,
            "calibration": n_calibration,
            "eval": n_eval,
        }
        rng = random.Random(f"merit-lab-collapse:{seed}:{family}")
        seen: set[str] = set()
        pairs: list[tuple[str, str]] = []
        while len(pairs) < sum(sizes.values()):
            prompt, response = sample_collapse_example(family, rng)
            if prompt not in seen:
                seen.add(prompt)
                pairs.append((prompt, response))
        start = 0
        for split in SPLITS:
            chunk = pairs[start : start + sizes[split]]
            start += sizes[split]
            texts[split][family] = "".join(
                json.dumps(
                    {
                        "id": f"{family}-{split}-{i}",
                        "messages": [
                            {"role": "user", "content": p},
                            {"role": "assistant", "content": r},
                        ],
                    }
                )
                + "\n"
                for i, (p, r) in enumerate(chunk)
            )
    for split in SPLITS:
        with atomic_dir(out_dir / split, overwrite=True) as tmp:
            for name, text in texts[split].items():
                (tmp / f"{name}.jsonl").write_text(text, encoding="utf-8")
    meta = {
        "seed": seed,
        "axes": ["style"],
        "sizes": {
            "train": {"short": n_train_short, "long": n_train_long},
            "calibration": n_calibration,
            "eval": n_eval,
        },
        "sources": {
            family: {
                "family": style,
                "style": style,
                "task": family,
                "description": {**SHORT, **LONG}[family][0].format(x="..."),
            }
            for family, style in collapse_sources().items()
        },
    }
    atomic_write_json(out_dir / "sources.json", meta)
    return out_dir


def instruct_collapse_base(
    base_dir: Path,
    out_dir: Path,
    *,
    seed: int = 0,
    steps: int = 400,
    batch_size: int = 32,
    lr: float = 1e-3,
    warmup: int = 20,
    families: tuple[str, ...] = BASE_FAMILIES,
    overwrite: bool = True,
) -> Path:
    """θ0 of the collapse demo: ``base_dir`` (the demo base) instruction-tuned on both styles.

    The draw is seeded apart from the mixture files and picks the short and the long style
    equally often (then one of ``families`` within the style), so θ0 answers both before any
    fine-tuning; by default (`BASE_FAMILIES`) five short tasks of the mixture stay new to it.
    Only response tokens are trained. Saved with its tokenizer as an HF folder (atomic).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merit_lab.data.formatting import collate, tokenize_example
    from merit_lab.demo.base import train_from_batches

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.train()
    rng = random.Random(f"merit-lab-collapse-instruct:{seed}")
    by_style = {
        "short": [f for f in families if f in SHORT],
        "long": [f for f in families if f in LONG],
    }

    def next_batch() -> dict[str, torch.Tensor]:
        batch = []
        for _ in range(batch_size):
            family = rng.choice(by_style[rng.choice(("short", "long"))])
            p, r = sample_collapse_example(family, rng)
            ex = {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}
            batch.append(tokenize_example(tokenizer, ex))
        return collate(batch, tokenizer.pad_token_id)

    ema, seconds = train_from_batches(
        model,
        next_batch,
        steps=steps,
        lr=lr,
        warmup=warmup,
        desc="instruction-tune the collapse base",
    )
    model.eval()
    info = {
        "from": str(Path(base_dir).name),
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "families": list(families),
        "final_loss_ema": ema,
        "wall_seconds": round(seconds, 1),
    }
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "pretrain.json", info)
    return Path(out_dir)
