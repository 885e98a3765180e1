"""Formatting stage: turn a chat example into ``input_ids`` and ``labels`` with the prompt masked.

Input: a normalised example (``{"messages": [...]}``) and a tokenizer. Output: token ids where
every label outside the assistant responses is -100, and `response_token_loss`, the one loss
over those labels that gradients, evaluation and diagnostics all compute. An example over
``max_length`` is fitted here, and only here, by the ``mixture.long_examples`` policy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
from torch import Tensor

from merit_lab.config.schema import LONG_EXAMPLE_POLICIES, MixtureConfig, TrainConfig
from merit_lab.data.multimodal import (
    collate_images,
    encode_images,
    example_images,
    expand_image_tokens,
    require_image_processor,
)

__all__ = [
    "IGNORE_INDEX",
    "OVERFLOW_ACTIONS",
    "TokenizedExample",
    "collate",
    "count_overflow",
    "count_response_tokens",
    "kept_examples",
    "last_turn",
    "render_prompt",
    "render_spans",
    "response_logits",
    "response_token_loss",
    "tokenize_example",
    "tokenize_examples",
    "tokenize_prompt",
]

IGNORE_INDEX = -100
# The image inputs of an image-text batch, passed to the model beside the ids and mask.
IMAGE_KEYS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")
FALLBACK_USER = "### User:\n"
FALLBACK_ASSISTANT = "### Assistant:\n"
# What was done to an example over max_length: its prompt lost its first tokens (response
# intact); the response alone was too long, so the prompt went and the response was cut on the
# right; cut on the right (``truncate_right``); left out (``skip``).
OVERFLOW_ACTIONS = ("truncated_prompt", "response_truncated", "truncated_right", "skipped")


@dataclass(frozen=True)
class TokenizedExample:
    """One example as model input: ``input_ids`` and ``labels`` (L,), -100 outside responses.

    ``overflow`` is "" when the example fits in ``max_length``, else one of `OVERFLOW_ACTIONS`
    (a ``skipped`` example holds no tokens). An image-text example also holds its images'
    ``pixel_values`` (P, D) float32 and ``image_grid_thw`` (n, 3) int64, and
    ``mm_token_type_ids`` (L,), 1 at image tokens (`multimodal.expand_image_tokens`).
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    overflow: str = ""
    pixel_values: Any = field(default=None, compare=False, repr=False)
    image_grid_thw: Any = field(default=None, compare=False, repr=False)
    mm_token_type_ids: tuple[int, ...] | None = field(default=None, compare=False, repr=False)

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def n_response_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def _render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _leading_special(tokenizer) -> str:
    """The special tokens a tokenizer puts before any text (BOS for Llama-style ones, nothing
    for GPT-2-style ones), as text: the plain layout starts with them."""
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    if len(with_special) <= len(bare) or with_special[-len(bare) :] != bare:
        return ""
    return tokenizer.decode(with_special[: len(with_special) - len(bare)])


def _plain(tokenizer, messages: Sequence[dict]) -> tuple[list[str], list[tuple[int, int]]]:
    """The plain layout of a model without a chat template: text parts and response spans."""
    eos = tokenizer.eos_token or ""
    parts: list[str] = [_leading_special(tokenizer)]
    spans = []
    for m in messages:
        if m["role"] == "assistant":
            parts.append(FALLBACK_ASSISTANT)
            start = sum(map(len, parts))
            parts.append(m["content"] + eos)
            spans.append((start, sum(map(len, parts))))
            parts.append("\n")
        elif m["role"] == "system":
            parts.append(m["content"] + "\n\n")
        else:
            parts.append(FALLBACK_USER + m["content"] + "\n")
    return parts, spans


def render_spans(tokenizer, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation to text and the character spans of its assistant responses.

    With a chat template, response ``i`` spans from the end of ``messages[:i]`` rendered with the
    generation prompt to the end of ``messages[:i+1]``, less trailing whitespace: the span is the
    turn's content and its end-of-turn token(s) (``<|im_end|>``, ``<|eot_id|>``,
    ``<end_of_turn>``), not the newline a template puts between turns. The template must render
    those as prefixes of the whole conversation (true of the usual templates).

    Without a template, one plain layout (used alike by training, gradients and evaluation)::

        <the tokenizer's leading special tokens, e.g. BOS><system>\n\n
        ### User:\n<user>\n### Assistant:\n<response><EOS>\n ...

    where each response span is ``<response><EOS>``.

    Returns:
        (text, spans): the full text and half-open ``[start, end)`` character spans.
    """
    if not getattr(tokenizer, "chat_template", None):
        parts, spans = _plain(tokenizer, messages)
        return "".join(parts), spans
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not full.startswith(upto) or start > len(upto):
            raise ValueError(
                "the tokenizer's chat template does not render conversations prefix-"
                "consistently, so the response tokens cannot be located; pass a template "
                "whose rendering of messages[:i] is a prefix of messages[:i+1]"
            )
        spans.append((start, max(start, len(upto.rstrip()))))
    return full, spans


def last_turn(messages: Sequence[dict]) -> tuple[list[dict], str]:
    """(the messages before the last assistant turn, that turn's content): what a model is
    prompted with and scored against when answering greedily."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return list(messages[:last]), messages[last]["content"]


def render_prompt(tokenizer, messages: Sequence[dict]) -> str:
    """The text a model continues to answer after ``messages``: the chat template with its
    generation prompt, or the plain layout of `render_spans` up to ``### Assistant:\n``, so a
    generated answer starts where a trained response starts."""
    if getattr(tokenizer, "chat_template", None):
        return _render(tokenizer, messages, add_generation_prompt=True)
    return "".join(_plain(tokenizer, messages)[0]) + FALLBACK_ASSISTANT


def tokenize_prompt(tokenizer, messages: Sequence[dict], max_length: int) -> TokenizedExample:
    """The prompt a model answers after ``messages`` (`render_prompt`) as model input, no label.

    A text prompt keeps its last ``max_length`` tokens (as ``truncate_prompt`` fits a training
    example); an image prompt carries its pixel inputs and is never cut (ValueError if too long).
    """
    ids = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
    if not (images := example_images({"messages": messages})):
        ids = list(ids[-max_length:])
        return TokenizedExample(tuple(ids), (IGNORE_INDEX,) * len(ids))
    pixels, grid = encode_images(tokenizer, images)
    ids, labels, types = expand_image_tokens(
        ids, [IGNORE_INDEX] * len(ids), tokenizer, grid, IGNORE_INDEX
    )
    if len(ids) > max_length:
        raise ValueError(
            f"an image prompt of {len(ids)} tokens > max_length={max_length}; an image prompt is "
            "not cut: raise max_length or use smaller images"
        )
    return TokenizedExample(tuple(ids), tuple(labels), "", pixels, grid, tuple(types))


def _fit(
    ids: list[int], labels: list[int], max_length: int, policy: str
) -> tuple[list[int], list[int], str]:
    """Fit an over-long sequence into ``max_length`` tokens by ``policy``: (ids, labels, action)."""
    if policy == "skip":
        return [], [], "skipped"
    if policy == "truncate_right":
        return ids[:max_length], labels[:max_length], "truncated_right"
    # truncate_prompt: the prompt is everything before the first response token (BOS and a
    # system turn included); it loses tokens from its start, the response keeps all of its own.
    first = next(j for j, t in enumerate(labels) if t != IGNORE_INDEX)
    if len(ids) - first <= max_length:
        return ids[-max_length:], labels[-max_length:], "truncated_prompt"
    end = first + max_length
    return ids[first:end], labels[first:end], "response_truncated"


def tokenize_example(
    tokenizer,
    example: dict,
    max_length: int = TrainConfig.max_length,
    long_examples: str = MixtureConfig.long_examples,
) -> TokenizedExample:
    """Tokenise one example; a token is a label iff it starts inside an assistant span.

    An example over ``max_length`` tokens is fitted by the ``long_examples`` policy (the one
    place it is applied: gradients, training, evaluation and the mixture's counts all call this):

    - ``truncate_prompt``: tokens are dropped from the start of the prompt (everything before the
      first response token, BOS included) until it fits, so every response token is kept; when
      the response alone is longer, the prompt is dropped and the response cut on the right
      (``overflow="response_truncated"``).
    - ``skip``: an empty example with ``overflow="skipped"``; `tokenize_examples` leaves it out.
    - ``truncate_right``: the first ``max_length`` tokens (may cut the response away).

    Raises:
        ValueError: an unknown policy, or no response token left (the example would carry no
            loss: an empty response, or ``truncate_right`` cutting the whole response away).
    """
    if long_examples not in LONG_EXAMPLE_POLICIES:
        raise ValueError(
            f"long_examples: unknown policy {long_examples!r}; "
            f"policy must be one of: {', '.join(LONG_EXAMPLE_POLICIES)}"
        )
    if images := example_images(example):
        require_image_processor(tokenizer)  # before a text template meets the image parts
    text, spans = render_spans(tokenizer, example["messages"])
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for j, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and any(s <= a < e for s, e in spans):
            labels[j] = ids[j]
    name = example.get("id", "?")
    if all(t == IGNORE_INDEX for t in labels):
        raise ValueError(f"example {name!r}: no response tokens (empty response?)")
    if images:
        return _with_images(tokenizer, name, images, ids, labels, max_length, long_examples)
    overflow = ""
    if len(ids) > max_length:
        ids, labels, overflow = _fit(ids, labels, max_length, long_examples)
        if overflow == "truncated_right" and all(t == IGNORE_INDEX for t in labels):
            raise ValueError(
                f"example {name!r}: no response tokens within max_length={max_length} "
                "(mixture.long_examples: truncate_right); use truncate_prompt or skip"
            )
    return TokenizedExample(tuple(ids), tuple(labels), overflow)


def _with_images(
    tokenizer,
    name: str,
    images: list[str],
    ids: list[int],
    labels: list[int],
    max_length: int,
    policy: str,
) -> TokenizedExample:
    """An image example: placeholders expanded to one token per merged patch (label -100).
    Cutting into an image would unpair tokens and patches, so an over-long one is skipped
    under ``skip`` and refused otherwise."""
    pixels, grid = encode_images(tokenizer, images)
    ids, labels, types = expand_image_tokens(ids, labels, tokenizer, grid, IGNORE_INDEX)
    if len(ids) > max_length:
        if policy == "skip":
            return TokenizedExample((), (), "skipped")
        raise ValueError(
            f"example {name!r}: {len(ids)} tokens ({sum(types)} of them image tokens) > "
            f"max_length={max_length}; an image example is not cut: raise max_length, use "
            "smaller images (the image processor's max_pixels) or mixture.long_examples: skip"
        )
    return TokenizedExample(tuple(ids), tuple(labels), "", pixels, grid, tuple(types))


def tokenize_examples(
    tokenizer,
    examples: Iterable[dict],
    max_length: int = TrainConfig.max_length,
    long_examples: str = MixtureConfig.long_examples,
    *,
    limit: int | None = None,
) -> list[TokenizedExample]:
    """Tokenise examples (see `tokenize_example`), leaving out the ``skipped`` ones.

    Args:
        limit: stop after this many kept examples (e.g. the first n calibration examples that a
            ``skip`` policy keeps).
    """
    toks = (tokenize_example(tokenizer, ex, max_length, long_examples) for ex in examples)
    return list(islice((t for t in toks if t.overflow != "skipped"), limit))


def kept_examples(
    tokenizer,
    examples: Iterable[dict],
    max_length: int = TrainConfig.max_length,
    long_examples: str = MixtureConfig.long_examples,
    *,
    limit: int | None = None,
) -> list[dict]:
    """The examples (as given, untokenised) that ``long_examples`` keeps: all but the over-long
    ones under ``skip``; at most ``limit``."""
    if long_examples != "skip":
        return list(islice(examples, limit))
    fits = (
        ex
        for ex in examples
        if tokenize_example(tokenizer, ex, max_length, long_examples).overflow != "skipped"
    )
    return list(islice(fits, limit))


def count_overflow(toks: Iterable[TokenizedExample]) -> dict[str, int]:
    """How many examples were over ``max_length`` (``n``) and what was done to them, per action
    of `OVERFLOW_ACTIONS` (actions that never happened are left out)."""
    actions = [t.overflow for t in toks if t.overflow]
    return {"n": len(actions), **{a: actions.count(a) for a in OVERFLOW_ACTIONS if a in actions}}


def collate(batch: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch into ``input_ids``, ``attention_mask`` and ``labels``: (B, L) int64.

    With image-text examples also ``pixel_values``, ``image_grid_thw`` and ``mm_token_type_ids``
    (`multimodal.collate_images`); a text-only batch has exactly the three keys."""
    width = max(ex.n_tokens for ex in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = ex.n_tokens
        ids[i, :n] = torch.tensor(ex.input_ids)
        labels[i, :n] = torch.tensor(ex.labels)
        mask[i, :n] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return out | collate_images(batch, width)


def count_response_tokens(labels: Tensor) -> int:
    """Positions a causal LM is scored on in a (B, L) ``labels`` batch: labels ≠ -100 after the
    shift (position 0's label is never a target: token j is predicted from tokens < j)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def response_logits(model: torch.nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The logits (n, V) at the n scored positions of a `collate` batch and their labels (n,).

    Position t predicts token t+1, so logits[:, :-1] meet labels[:, 1:]; only response labels
    are kept. The batch is moved to the model's device; the logits keep the model's dtype.
    """
    device = next(model.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    images = {k: batch[k].to(device) for k in IMAGE_KEYS if k in batch}
    # use_cache=False: no KV cache is built for a scoring pass (memory, and checkpointing)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **images).logits
    labels = batch["labels"][:, 1:].to(device)
    keep = labels != IGNORE_INDEX  # (B, L-1): indexing with it copies only the n kept rows
    return logits[:, :-1][keep], labels[keep]


def response_token_loss(
    model: torch.nn.Module, batch: Mapping[str, Tensor], num_items: int | None = None
) -> Tensor:
    """Cross-entropy summed over a batch's response tokens, divided by ``num_items``.

    With ``num_items=None`` it is the batch's mean response-token loss. Over micro-batches of
    one set, ``num_items`` = the set's `count_response_tokens` makes the per-batch values (and
    their gradients) add up to the set's mean exactly, as transformers' ``num_items_in_batch``
    does; a mean of per-batch means would weight short batches up.

    Args:
        model: a causal LM returning ``.logits`` (B, L, V).
        batch: ``input_ids``, ``attention_mask`` and ``labels`` (B, L) int64 (`collate`).
        num_items: the divisor (default: this batch's scored positions).

    Returns:
        A scalar tensor with a graph when gradients are on; the softmax runs in at least
        float32 (half precision would blur the loss and its curvature; float64 models stay
        float64).
    """
    logits, labels = response_logits(model, batch)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    total = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    return total / (labels.numel() if num_items is None else num_items)
