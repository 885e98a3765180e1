"""Instruction mixtures: sources and their splits, chat formatting into tokens with the one
response-token loss, image parts, corpora that install from the package index.

Names load lazily (PEP 562): importing the package does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "HASH_KINDS": "checks",
    "example_hashes": "checks",
    "mixture_overlaps": "checks",
    "overlap_lines": "checks",
    "read_hash_list": "checks",
    "small_source_message": "checks",
    "source_shortfall": "checks",
    "write_hash_list": "checks",
    "CHATTERBOT_SOURCES": "corpora",
    "CORPORA": "corpora",
    "chatterbot_dialogues": "corpora",
    "dialogue_messages": "corpora",
    "write_chatterbot_mixture": "corpora",
    "FLAN_REPO": "flan",
    "FLAN_TASK_COUNT": "flan",
    "flan_task_name": "flan",
    "write_flan_mixture": "flan",
    "IGNORE_INDEX": "formatting",
    "OVERFLOW_ACTIONS": "formatting",
    "TokenizedExample": "formatting",
    "collate": "formatting",
    "count_overflow": "formatting",
    "count_response_tokens": "formatting",
    "kept_examples": "formatting",
    "last_turn": "formatting",
    "render_prompt": "formatting",
    "render_spans": "formatting",
    "response_logits": "formatting",
    "response_token_loss": "formatting",
    "tokenize_example": "formatting",
    "tokenize_examples": "formatting",
    "tokenize_prompt": "formatting",
    "Mixture": "mixture",
    "MixtureError": "mixture",
    "Source": "mixture",
    "count_sources": "mixture",
    "load_mixture": "mixture",
    "normalize_example": "mixture",
    "read_examples": "mixture",
    "IMAGE_PART_TYPES": "multimodal",
    "ImageTextTokenizer": "multimodal",
    "ZIP_SEPARATOR": "multimodal",
    "checkpoint_names": "multimodal",
    "collate_images": "multimodal",
    "content_problem": "multimodal",
    "encode_images": "multimodal",
    "example_images": "multimodal",
    "expand_image_tokens": "multimodal",
    "has_images": "multimodal",
    "image_bytes": "multimodal",
    "image_problem": "multimodal",
    "image_processor_of": "multimodal",
    "in_model_names": "multimodal",
    "load_image": "multimodal",
    "model_named": "multimodal",
    "require_image_processor": "multimodal",
    "resolve_image_parts": "multimodal",
    "split_zip_ref": "multimodal",
    "PAPER_TASK_COUNT": "vision_flan",
    "VISION_FLAN_REPO": "vision_flan",
    "escape_member": "vision_flan",
    "paper_tasks": "vision_flan",
    "read_task_file": "vision_flan",
    "select_tasks": "vision_flan",
    "unescape_member": "vision_flan",
    "vision_flan_messages": "vision_flan",
    "write_vision_flan_mixture": "vision_flan",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(__all__)
