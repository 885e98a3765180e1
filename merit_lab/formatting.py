"""Formatting stage: turn a chat example into ``input_ids`` and ``labels`` with the prompt masked.

Input: a normalised example (``{"messages": [...]}``) and a tokenizer. Output: token ids where
every label outside the assistant responses is -100, and `response_token_loss`, the one loss
over those labels that gradients, evaluation and diagnostics all compute.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from merit_lab.config import TrainConfig

__all__ = [
    "IGNORE_INDEX",
    "TokenizedExample",
    "collate",
    "count_response_tokens",
    "render_spans",
    "response_logits",
    "response_token_loss",
    "tokenize_example",
    "tokenize_examples",
]

IGNORE_INDEX = -100
FALLBACK_USER = "### User:\n"
FALLBACK_ASSISTANT = "### Assistant:\n"


@dataclass(frozen=True)
class TokenizedExample:
    """One example as model input: ``input_ids`` and ``labels`` (L,), -100 outside responses."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

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


def render_spans(tokenizer, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation to text and the character spans of its assistant responses.

    With a chat template, response ``i`` spans from the end of ``messages[:i]`` rendered with the
    generation prompt to the end of ``messages[:i+1]``; the template must render those as
    prefixes of the whole conversation (true of the usual templates). Without one, a plain
    ``### User:`` / ``### Assistant:`` layout is used and each response ends with the EOS token.

    Returns:
        (text, spans): the full text and half-open ``[start, end)`` character spans.
    """
    if getattr(tokenizer, "chat_template", None):
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
            spans.append((start, len(upto)))
        return full, spans
    eos = tokenizer.eos_token or ""
    parts: list[str] = []
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
    return "".join(parts), spans


def tokenize_example(
    tokenizer, example: dict, max_length: int = TrainConfig.max_length
) -> TokenizedExample:
    """Tokenise one example; a token is a label iff it starts inside an assistant span.

    Truncates on the right to ``max_length`` tokens.

    Raises:
        ValueError: when truncation leaves no response token (the example would carry no loss).
    """
    text, spans = render_spans(tokenizer, example["messages"])
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for j, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and any(s <= a < e for s, e in spans):
            labels[j] = ids[j]
    ids, labels = ids[:max_length], labels[:max_length]
    if all(t == IGNORE_INDEX for t in labels):
        raise ValueError(
            f"example {example.get('id', '?')!r}: no response tokens within max_length={max_length}"
        )
    return TokenizedExample(tuple(ids), tuple(labels))


def tokenize_examples(
    tokenizer, examples: Sequence[dict], max_length: int = TrainConfig.max_length
) -> list[TokenizedExample]:
    """Tokenise a list of examples (see `tokenize_example`)."""
    return [tokenize_example(tokenizer, ex, max_length) for ex in examples]


def collate(batch: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch into ``input_ids``, ``attention_mask`` and ``labels``: (B, L) int64."""
    width = max(ex.n_tokens for ex in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = ex.n_tokens
        ids[i, :n] = torch.tensor(ex.input_ids)
        labels[i, :n] = torch.tensor(ex.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


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
    logits = model(input_ids=ids, attention_mask=mask).logits
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
