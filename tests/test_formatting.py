from __future__ import annotations

import pytest
import torch

from merit_lab.data.formatting import IGNORE_INDEX, collate, tokenize_example


def _response_text(tok, ex) -> str:
    return tok.decode([t for t in ex.labels if t != IGNORE_INDEX])


def test_only_the_response_is_labelled(demo_tokenizer):
    example = {
        "messages": [
            {"role": "user", "content": "reverse abc"},
            {"role": "assistant", "content": "cba"},
        ]
    }
    ex = tokenize_example(demo_tokenizer, example)
    resp = _response_text(demo_tokenizer, ex)
    assert resp.startswith("cba")
    assert "reverse" not in resp
    # The labelled tokens are a contiguous suffix: the response and its end-of-turn marker.
    first = next(i for i, t in enumerate(ex.labels) if t != IGNORE_INDEX)
    assert all(t != IGNORE_INDEX for t in ex.labels[first:])
    assert ex.labels[first:] == ex.input_ids[first:]


def test_multi_turn_labels_every_assistant_turn(demo_tokenizer):
    example = {
        "messages": [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "11"},
            {"role": "user", "content": "two"},
            {"role": "assistant", "content": "22"},
        ]
    }
    ex = tokenize_example(demo_tokenizer, example)
    resp = _response_text(demo_tokenizer, ex)
    assert "11" in resp and "22" in resp and "one" not in resp and "two" not in resp


def test_fallback_layout_without_chat_template(demo_tokenizer):
    import copy

    tok = copy.deepcopy(demo_tokenizer)
    tok.chat_template = None
    example = {
        "messages": [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "xyz"}]
    }
    ex = tokenize_example(tok, example)
    assert _response_text(tok, ex) == "xyz" + tok.eos_token
    assert tok.decode(list(ex.input_ids)).startswith("### User:\nabc")


def test_right_truncation_that_removes_the_response_is_refused(demo_tokenizer):
    example = {
        "id": "e1",
        "messages": [{"role": "user", "content": "a" * 50}, {"role": "assistant", "content": "b"}],
    }
    with pytest.raises(ValueError, match="'e1': no response tokens within max_length=10"):
        tokenize_example(demo_tokenizer, example, max_length=10, long_examples="truncate_right")
    # the default policy keeps the response instead (tests/test_long_and_small.py)
    assert tokenize_example(demo_tokenizer, example, max_length=10).n_response_tokens == 2


def test_collate_pads_right_and_masks(demo_tokenizer):
    a = tokenize_example(
        demo_tokenizer,
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    )
    b = tokenize_example(
        demo_tokenizer,
        {"messages": [{"role": "user", "content": "aaaa"}, {"role": "assistant", "content": "bb"}]},
    )
    batch = collate([a, b], pad_token_id=0)
    assert batch["input_ids"].shape == (2, b.n_tokens)
    assert batch["attention_mask"][0].sum() == a.n_tokens
    assert torch.all(batch["labels"][0, a.n_tokens :] == IGNORE_INDEX)
