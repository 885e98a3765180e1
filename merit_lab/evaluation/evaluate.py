"""Evaluation stage: held-out loss and exact match of greedy answers, per source and checkpoint.

Input: a model (or HF folder), its tokenizer and a `Mixture`. Output: a long table with one row
per (model, source, metric), written to ``eval.parquet``; `summarize_eval` turns it into the
paper-style table (rows = models, columns = per-family scores and their average).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from merit_lab.config.schema import EvalConfig, MixtureConfig, TrainConfig
from merit_lab.data.formatting import (
    collate,
    count_response_tokens,
    kept_examples,
    last_turn,
    response_token_loss,
    tokenize_examples,
    tokenize_prompt,
)
from merit_lab.data.mixture import Mixture
from merit_lab.data.multimodal import collate_images

__all__ = [
    "EVAL_METRICS",
    "PERCENT_METRICS",
    "STYLE_FACTOR",
    "STYLE_FLOOR_TOKENS",
    "TOKEN_STYLE_METRICS",
    "GreedyAnswer",
    "evaluate_model",
    "generate_answers",
    "greedy_answers",
    "heldout_loss",
    "relative_to",
    "seed_spread",
    "style_band",
    "style_budget",
    "style_scores",
    "summarize_eval",
]

log = logging.getLogger(__name__)

# The style metrics counted in tokens (`style_scores`); NaN where the generation budget cannot
# reach a reference's band (`style_budget`).
TOKEN_STYLE_METRICS = ("in_style_tokens", "length_ratio_median", "no_eos")
# Every metric `evaluate_model` writes; a cached evaluation without one of them is redone.
EVAL_METRICS = (
    "loss",
    "exact_match",
    "similarity",
    "in_style",
    "length_ratio",
    *TOKEN_STYLE_METRICS,
)
PERCENT_METRICS = ("exact_match", "similarity", "in_style", "in_style_tokens", "no_eos")
# An answer is in its reference's style when its length is within this factor of the
# reference's: a one-word reference answered with three sentences is not, nor the reverse.
STYLE_FACTOR = 2.0
# The band's upper edge is never below this many tokens: a reference of one or two tokens keeps
# its style in any terse answer (a few words), not only in one of at most 2x its length.
STYLE_FLOOR_TOKENS = 16


def style_band(reference_tokens: int) -> tuple[float, float]:
    """The answer lengths (tokens, inclusive) that keep a reference's style: from
    ``reference / STYLE_FACTOR`` to ``max(STYLE_FACTOR * reference, STYLE_FLOOR_TOKENS)``."""
    r = max(int(reference_tokens), 1)
    return r / STYLE_FACTOR, max(STYLE_FACTOR * r, float(STYLE_FLOOR_TOKENS))


def style_budget(reference_tokens: Sequence[int]) -> int:
    """The least ``max_new_tokens`` whose answers can show every band's upper edge.

    An answer of ``hi`` tokens needs ``hi + 1`` new tokens with its end-of-turn token; with less,
    an answer in style is cut off (and counted out of style) and one above the band cannot end.
    """
    return (
        max(math.floor(style_band(r)[1]) for r in reference_tokens) + 1 if reference_tokens else 1
    )


def style_scores(
    answers: Sequence[str],
    references: Sequence[str],
    *,
    answer_tokens: Sequence[int] | None = None,
    reference_tokens: Sequence[int] | None = None,
    stopped: Sequence[bool] | None = None,
    max_new_tokens: int | None = None,
) -> dict[str, float]:
    """Style preservation of greedy answers against their references (the same order).

    Counted in characters (every run has them): ``in_style``, the share of answers whose length
    is within `STYLE_FACTOR` of the reference's; ``length_ratio``, the mean of answer over
    reference length (under 1 = shorter, the collapse direction).

    Counted in tokens, when ``answer_tokens``, ``reference_tokens`` and ``stopped`` are given
    (`TOKEN_STYLE_METRICS`): ``in_style_tokens``, the share of answers that ended with the
    end-of-turn token and whose length lies in the reference's `style_band` (a floor for very
    short references; an answer cut off by the generation limit is never in style, however long);
    ``length_ratio_median``, the median of answer over reference tokens (the mean follows the
    runaway answers); ``no_eos``, the share of answers that hit the limit without ending.

    Args:
        answer_tokens: tokens each answer generated before its end-of-turn token (all of them
            when it has none).
        reference_tokens: tokens of each reference (no special tokens).
        stopped: whether each answer ended with the end-of-turn token.
        max_new_tokens: the generation limit; must be at least `style_budget` of the
            references, or a cut-off answer could pass for one in style.

    Raises:
        ValueError: lengths differ, only some token arguments are given, or the limit is short.
    """
    ratios = np.array(
        [len(a) / max(len(r), 1) for a, r in zip(answers, references, strict=True)], dtype=float
    )
    nan = float("nan")
    if ratios.size == 0:
        out = {"in_style": nan, "length_ratio": nan}
    else:
        ok = (ratios >= 1 / STYLE_FACTOR) & (ratios <= STYLE_FACTOR)
        out = {"in_style": float(ok.mean()), "length_ratio": float(ratios.mean())}
    given = [x is not None for x in (answer_tokens, reference_tokens, stopped)]
    if not any(given):
        return out
    if not all(given):
        raise ValueError("give answer_tokens, reference_tokens and stopped together")
    if not len(answers) == len(answer_tokens) == len(reference_tokens) == len(stopped):
        raise ValueError(
            f"answers, answer_tokens, reference_tokens and stopped differ in length: "
            f"{len(answers)}, {len(answer_tokens)}, {len(reference_tokens)}, {len(stopped)}"
        )
    if max_new_tokens is not None and max_new_tokens < style_budget(reference_tokens):
        raise ValueError(
            f"max_new_tokens {max_new_tokens} cannot reach the style band of the longest "
            f"reference ({max(reference_tokens)} tokens): give at least "
            f"{style_budget(reference_tokens)}"
        )
    if not answers:
        return out | dict.fromkeys(TOKEN_STYLE_METRICS, nan)
    a = np.asarray(answer_tokens, dtype=float)
    bands = np.array([style_band(r) for r in reference_tokens])
    ended = np.asarray(stopped, dtype=bool)
    inside = ended & (a >= bands[:, 0]) & (a <= bands[:, 1])
    token_ratios = a / np.maximum(np.asarray(reference_tokens, dtype=float), 1.0)
    return out | {
        "in_style_tokens": float(inside.mean()),
        "length_ratio_median": float(np.median(token_ratios)),
        "no_eos": float((~ended).mean()),
    }


@torch.no_grad()
def heldout_loss(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[dict],
    *,
    max_length: int = TrainConfig.max_length,
    batch_size: int = EvalConfig.batch_size,
    long_examples: str = MixtureConfig.long_examples,
) -> float:
    """Mean response-token cross-entropy over ``examples`` (all their response tokens pooled).

    0.0 when there is no response token to score. Over-long examples are fitted (or left out)
    by ``long_examples`` (`formatting.tokenize_example`).
    """
    toks = tokenize_examples(tokenizer, examples, max_length, long_examples)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = [collate(toks[i : i + batch_size], pad) for i in range(0, len(toks), batch_size)]
    count = max(sum(count_response_tokens(b["labels"]) for b in batches), 1)
    return float(sum(float(response_token_loss(model, b, num_items=count)) for b in batches))


def _left_padded(rows: Sequence[Sequence[int]], pad: int) -> dict[str, torch.Tensor]:
    """Prompts as one batch padded on the left: generation continues every row's right end."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


@dataclass(frozen=True)
class GreedyAnswer:
    """One greedy completion: its text and how it ended."""

    text: str  # decoded without special tokens, stripped
    n_tokens: int  # tokens generated before the end-of-turn token (all of them without one)
    stopped: bool  # it ended with the end-of-turn token (False: cut off by max_new_tokens)


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[dict],
    *,
    max_new_tokens: int = EvalConfig.max_new_tokens,
    max_length: int = TrainConfig.max_length,
    batch_size: int = EvalConfig.batch_size,
    progress: bool = False,
    desc: str = "greedy answers",
) -> list[GreedyAnswer]:
    """Greedy completions of each example's last assistant turn (prompt = everything before it,
    laid out as in training: `formatting.render_prompt`; images as pixel inputs).

    A prompt over ``max_length`` tokens keeps its last ``max_length`` (as the default
    ``truncate_prompt`` policy fits a training example; `formatting.tokenize_prompt`). Prompts
    are batched in length order (less padding, earlier stops), answers returned in input order.
    """
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    prompts = [
        tokenize_prompt(tokenizer, last_turn(ex["messages"])[0], max_length) for ex in examples
    ]
    order = sorted(range(len(prompts)), key=lambda i: prompts[i].n_tokens)
    out: list[GreedyAnswer] = []
    starts = range(0, len(prompts), batch_size)
    for i in tqdm(starts, desc=desc, unit="batch", disable=not progress):
        rows = [prompts[j] for j in order[i : i + batch_size]]
        enc = _left_padded([r.input_ids for r in rows], tokenizer.pad_token_id)
        enc |= collate_images(rows, enc["input_ids"].shape[1], left=True)
        enc = {k: v.to(device) for k, v in enc.items()}
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = gen[:, enc["input_ids"].shape[1] :].tolist()
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        for ids, text in zip(new, texts, strict=True):
            # after the end-of-turn token generate pads the row; without one the row is full
            stopped = eos in ids
            n = ids.index(eos) if stopped else len(ids)
            out.append(GreedyAnswer(text.strip(), n, stopped))
    by_input = dict(zip(order, out, strict=True))
    return [by_input[j] for j in range(len(prompts))]


def greedy_answers(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[dict],
    *,
    max_new_tokens: int = EvalConfig.max_new_tokens,
    max_length: int = TrainConfig.max_length,
    batch_size: int = EvalConfig.batch_size,
    progress: bool = False,
    desc: str = "greedy answers",
) -> list[str]:
    """The texts of `generate_answers` (same arguments), in input order."""
    answers = generate_answers(
        model,
        tokenizer,
        examples,
        max_new_tokens=max_new_tokens,
        max_length=max_length,
        batch_size=batch_size,
        progress=progress,
        desc=desc,
    )
    return [a.text for a in answers]


def _reference_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def evaluate_model(
    model: torch.nn.Module,
    tokenizer,
    mixture: Mixture,
    *,
    label: str,
    split: str = "eval",
    sources: Sequence[str] | None = None,
    max_examples: int | None = None,
    max_length: int = TrainConfig.max_length,
    long_examples: str = MixtureConfig.long_examples,
    exact_match: bool = True,
    max_new_tokens: int = EvalConfig.max_new_tokens,
    batch_size: int = EvalConfig.batch_size,
    progress: bool = True,
) -> pd.DataFrame:
    """Held-out loss (and exact match of greedy answers) of one model on every source.

    With ``exact_match`` it also reports ``similarity``, the mean character-level
    `difflib.SequenceMatcher` ratio of answer and reference: partial credit that still moves when
    a small model gets few answers exactly right; and the style metrics of `style_scores`
    (``in_style``, ``length_ratio`` in characters; ``in_style_tokens``, ``length_ratio_median``
    and ``no_eos`` in tokens, NaN for a source whose longest reference's band is beyond
    ``max_new_tokens``): whether answers keep their source's length and style.

    Args:
        label: the model's name in the table (e.g. "joint-1ep", "merit-2d").
        split: which split to score (``eval`` = held out; ``train`` for the train-loss side of
            the merge-readiness diagnostics).
        max_examples: score only the first n examples per source (smoke settings).
        long_examples: the over-long policy; under ``skip`` such examples are not scored at all
            (neither loss nor exact match), so ``n`` counts the scored ones.
        batch_size: examples per forward pass and per ``generate`` call.

    Returns:
        Long table: columns model, source, family, split, metric, value, n.
    """
    model.eval()
    names = list(sources) if sources is not None else list(mixture.names)
    chosen = {}
    for name in names:
        chosen[name] = kept_examples(
            tokenizer, mixture[name].split(split), max_length, long_examples, limit=max_examples
        )
        if not chosen[name]:
            raise ValueError(f"source {name!r} has no {split} examples to evaluate")
    answers: dict[str, list[GreedyAnswer]] = {}
    if exact_match:  # pooled over sources: fewer, fuller generate calls
        pooled = [ex for name in names for ex in chosen[name]]
        flat = generate_answers(
            model,
            tokenizer,
            pooled,
            max_new_tokens=max_new_tokens,
            max_length=max_length,
            batch_size=batch_size,
            progress=progress,
            desc=f"answers of {label}",
        )
        for name in names:
            answers[name], flat = flat[: len(chosen[name])], flat[len(chosen[name]) :]
    rows = []
    for name in tqdm(names, desc=f"loss of {label}", unit="source", disable=not progress):
        src, examples = mixture[name], chosen[name]
        family = str(src.metadata.get("family", name))
        base = {"model": label, "source": name, "family": family, "split": split}
        loss = heldout_loss(
            model,
            tokenizer,
            examples,
            max_length=max_length,
            batch_size=batch_size,
            long_examples=long_examples,
        )
        rows.append({**base, "metric": "loss", "value": loss, "n": len(examples)})
        if exact_match:
            refs = [last_turn(ex["messages"])[1].strip() for ex in examples]
            texts = [a.text for a in answers[name]]
            pairs = list(zip(texts, refs, strict=True))
            scores = {
                "exact_match": np.mean([a == r for a, r in pairs]),
                "similarity": np.mean([SequenceMatcher(None, a, r).ratio() for a, r in pairs]),
                **_style(name, answers[name], refs, tokenizer, max_new_tokens),
            }
            rows += [
                {**base, "metric": m, "value": float(v), "n": len(examples)}
                for m, v in scores.items()
            ]
    return pd.DataFrame(rows)


def _style(
    name: str, answers: Sequence[GreedyAnswer], refs: Sequence[str], tokenizer, budget: int
) -> dict[str, float]:
    """`style_scores` of one source; the token metrics NaN (and a warning) when ``budget``
    cannot reach the longest reference's band."""
    texts = [a.text for a in answers]
    ref_tokens = [_reference_tokens(tokenizer, r) for r in refs]
    need = style_budget(ref_tokens)
    if budget < need:
        log.warning(
            "source %s: eval.max_new_tokens %d cannot reach the style band of its longest "
            "reference; %s need at least %d (left NaN)",
            name,
            budget,
            ", ".join(TOKEN_STYLE_METRICS),
            need,
        )
        return style_scores(texts, refs) | dict.fromkeys(TOKEN_STYLE_METRICS, float("nan"))
    return style_scores(
        texts,
        refs,
        answer_tokens=[a.n_tokens for a in answers],
        reference_tokens=ref_tokens,
        stopped=[a.stopped for a in answers],
        max_new_tokens=budget,
    )


def summarize_eval(
    table: pd.DataFrame | str | Path,
    *,
    metric: str = "exact_match",
    split: str = "eval",
    order: Sequence[str] | None = None,
) -> pd.DataFrame:
    """The paper's Table-2 layout: rows = models, columns = per-family means and their average.

    Family scores are the mean over that family's sources; ``avg`` is the mean over families.
    Exact match and similarity are reported in percent.
    """
    if not isinstance(table, pd.DataFrame):
        table = pd.read_parquet(table)
    sub = table[(table["metric"] == metric) & (table["split"] == split)]
    if sub.empty:
        raise ValueError(f"no {metric!r} rows on split {split!r}")
    wide = sub.groupby(["model", "family"])["value"].mean().unstack("family")
    wide["avg"] = wide.mean(axis=1)
    if metric in PERCENT_METRICS:
        wide *= 100.0
    if order is not None:
        wide = wide.reindex([m for m in order if m in wide.index])
    wide.columns.name = None
    return wide


def relative_to(wide: pd.DataFrame, reference: str = "theta0") -> pd.DataFrame:
    """A `summarize_eval` table as a percentage of its ``reference`` row (θ0 by default), column
    by column: how much of the base's score each model keeps (the LLaVA-W-style view)."""
    if reference not in wide.index:
        raise ValueError(f"no {reference!r} row to compare with; rows: {list(wide.index)}")
    return wide.div(wide.loc[reference].replace(0.0, np.nan), axis=1) * 100.0


def seed_spread(
    wide: pd.DataFrame, bases: Mapping[str, str]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    """Average a `summarize_eval` table over training seeds.

    Args:
        wide: rows = model labels (each seed's copy of a row its own label).
        bases: label → the row it is a seed of (labels not listed are their own row).

    Returns:
        (mean, std, seeds): the per-row mean and sample standard deviation (ddof 1; NaN with one
        seed) of every column, rows in first-appearance order, and the number of seeds per row.
    """
    keys = pd.Index([bases.get(m, m) for m in wide.index], name="model")
    grouped = wide.groupby(keys, sort=False)
    return grouped.mean(), grouped.std(ddof=1), grouped.size()
