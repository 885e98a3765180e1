"""Evaluation-only sources: abilities no row trains, measured to see what fine-tuning costs.

An evaluation-only folder (``eval.heldout``) holds one ``<source>.jsonl`` (or ``.parquet``) per
source, directly or under ``eval/``, plus an optional ``sources.json``; every example is scored,
none is ever trained, calibrated on or split. `load_heldout` reads it as a `Mixture` whose sources
have only an eval split. `write_base_references` makes such a folder from held-out prompts and
θ0's own greedy answers (the references a model's style is measured against: does it still answer
like θ0?).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from merit_lab.config.schema import EvalConfig, TrainConfig
from merit_lab.data.formatting import last_turn
from merit_lab.data.mixture import (
    SOURCE_SUFFIXES,
    Mixture,
    MixtureError,
    Source,
    load_mixture,
    read_examples,
)
from merit_lab.io import atomic_dir, atomic_write_json, read_json

__all__ = ["HELDOUT_SPLIT", "base_reference_examples", "load_heldout", "write_base_references"]

HELDOUT_SPLIT = "heldout"  # the ``split`` of the evaluation-only sources' rows in an eval table


def load_heldout(path: str | Path) -> Mixture:
    """The evaluation-only sources of ``path`` (see the module docstring), all examples in eval.

    Raises:
        MixtureError: no such folder, no source files, or a malformed file (named).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise MixtureError(f"eval.heldout: {folder} is not a folder of <source>.jsonl files")
    files_dir = folder / "eval" if (folder / "eval").is_dir() else folder
    files = sorted(p for p in files_dir.iterdir() if p.suffix in SOURCE_SUFFIXES)
    if not files:
        raise MixtureError(
            f"eval.heldout: {files_dir} holds no .jsonl or .parquet files (one per source)"
        )
    meta: dict[str, Any] = {}
    if (folder / "sources.json").is_file():
        raw = read_json(folder / "sources.json")
        meta = raw.get("sources", {}) if isinstance(raw, dict) else {}
    sources = []
    for f in files:
        examples = read_examples(f, folder)
        if not examples:
            raise MixtureError(f"eval.heldout: {f} has no examples")
        sources.append(Source(f.stem, (), (), tuple(examples), dict(meta.get(f.stem, {})), str(f)))
    return Mixture(tuple(sources), origin=str(folder))


def base_reference_examples(
    examples: Sequence[dict[str, Any]], answers: Sequence[str], stopped: Sequence[bool]
) -> tuple[list[dict[str, Any]], int]:
    """The examples with θ0's answers as their last assistant turn, and how many were dropped.

    An answer that did not end with the end-of-turn token was cut off by the generation budget,
    and an empty one says nothing of a style: neither becomes a reference. (An answer that ends
    exactly at the budget with its end-of-turn token is complete, and kept.)

    Args:
        examples: chat examples (``messages`` ending in an assistant turn; only the turns before
            it are kept as the prompt).
        answers, stopped: θ0's greedy answer to each and whether it ended by itself
            (`merit_lab.evaluation.evaluate.GreedyAnswer`).
    """
    if not (len(examples) == len(answers) == len(stopped)):
        raise ValueError(
            f"examples, answers and stopped differ in length: "
            f"{len(examples)}, {len(answers)}, {len(stopped)}"
        )
    kept, dropped = [], 0
    for ex, answer, ended in zip(examples, answers, stopped, strict=True):
        if not ended or not answer.strip():
            dropped += 1
            continue
        prompt, _ = last_turn(ex["messages"])
        kept.append(
            {
                "id": ex.get("id", f"ex-{len(kept)}"),
                "messages": [*prompt, {"role": "assistant", "content": answer.strip()}],
            }
        )
    return kept, dropped


def write_base_references(
    model: str | Path,
    mixture: str | Path,
    out: str | Path,
    *,
    split: str = "eval",
    sources: Sequence[str] | None = None,
    max_examples: int | None = None,
    max_new_tokens: int = 128,
    max_length: int = TrainConfig.max_length,
    batch_size: int = EvalConfig.batch_size,
    eval_fraction: float = 0.2,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Answer ``mixture``'s held-out prompts with θ0 and write them as a reference mixture.

    Args:
        model: θ0.
        mixture: the prompts' mixture (any layout `load_mixture` reads); its ``split`` split is
            answered, at most ``max_examples`` per source.
        out: the folder to write (replaced whole, atomically): ``eval/<source>.jsonl`` and
            ``sources.json``.
        max_new_tokens: θ0's generation budget; answers it cuts off (no end-of-turn token) are
            dropped.

    Returns:
        ``out``.
    """
    from merit_lab.evaluation.evaluate import generate_answers
    from merit_lab.models.checkpoints import fingerprint_checkpoint
    from merit_lab.models.loading import load_model, load_tokenizer, resolve_model_path

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    mix = load_mixture(mixture, eval_fraction=eval_fraction)
    names = list(sources) if sources is not None else list(mix.names)
    missing = sorted(set(names) - set(mix.names))
    if missing:
        raise KeyError(f"sources {missing} are not in {mixture}; it has {list(mix.names)}")
    path = resolve_model_path(model)
    tokenizer = load_tokenizer(path)
    net = load_model(path, device=device, dtype="float32")
    written: dict[str, list[dict[str, Any]]] = {}
    meta: dict[str, Any] = {}
    for name in names:
        examples = list(mix[name].split(split))[:max_examples]
        if not examples:
            raise ValueError(f"source {name!r} has no {split!r} examples to answer")
        answers = generate_answers(
            net,
            tokenizer,
            examples,
            max_new_tokens=max_new_tokens,
            max_length=max_length,
            batch_size=batch_size,
            progress=progress,
            desc=f"θ0 answers {name}",
        )
        kept, dropped = base_reference_examples(
            examples, [a.text for a in answers], [a.stopped for a in answers]
        )
        if not kept:
            raise ValueError(
                f"θ0 answered none of {name!r}'s prompts within {max_new_tokens} tokens: "
                "raise max_new_tokens"
            )
        written[name] = kept
        meta[name] = {
            "family": str(mix[name].metadata.get("family", name)),
            "references": "theta0",
            "answered": len(examples),
            "dropped_at_budget": dropped,
        }
    info = {
        "model": str(model),
        "model_fingerprint": fingerprint_checkpoint(path),
        "prompts": str(mixture),
        "split": split,
        "max_new_tokens": max_new_tokens,
        "sources": meta,
    }
    with atomic_dir(Path(out), overwrite=True) as tmp:
        for name, rows in written.items():
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            (tmp / f"{name}.jsonl").write_text(text, encoding="utf-8")
        atomic_write_json(tmp / "sources.json", info)
    return Path(out)
