"""The loss mask on a real tokenizer (SmolLM2's, with its own ChatML template and with Llama-3 and
Gemma templates given as jinja strings): exactly each assistant turn's content plus its
end-of-turn token, every assistant turn of a multi-turn conversation, system prompts included
or folded, compared with a hand tokenization of each piece; and the plain layout of a model
without a template, the same in training, gradients and greedy evaluation."""

from __future__ import annotations

import copy

import pytest

from merit_lab.data.formatting import (
    IGNORE_INDEX,
    last_turn,
    render_prompt,
    render_spans,
    tokenize_example,
)
from merit_lab.models.loading import load_tokenizer

LLAMA3 = (
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] "
    "+ '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = "
    "messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}{% else %}"
    "{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if message['role'] == 'assistant' %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + "
    "message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
# template name -> (jinja or None for the tokenizer's own, its special tokens, BOS, end of turn)
TEMPLATES = {
    "chatml": (None, [], None, "<|im_end|>"),
    "llama3": (
        LLAMA3,
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
    ),
    "gemma": (GEMMA, ["<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<end_of_turn>"),
}

SINGLE = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
]
MULTI = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "Seven is a prime number."},
    {"role": "user", "content": "And an even one?"},
    {"role": "assistant", "content": "Two is the only even prime."},
]


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    return load_tokenizer(smollm2_dir)


def _tokenizer(base, name: str):
    template, specials, bos, _ = TEMPLATES[name]
    tok = copy.deepcopy(base)
    if template is not None:
        tok.add_special_tokens({"additional_special_tokens": specials})
        tok.chat_template = template
        tok.bos_token = bos
    return tok


def _expected_labels(tok, messages: list[dict], end_of_turn: str) -> list[int]:
    """By hand: each assistant turn's content tokenised alone (templates trim it), then the
    end-of-turn token; nothing else is a label."""
    eot = tok.convert_tokens_to_ids(end_of_turn)
    out = []
    for m in messages:
        if m["role"] == "assistant":
            out += tok(m["content"].strip(), add_special_tokens=False)["input_ids"] + [eot]
    return out


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single-turn", "system+3-turns"])
def test_labels_are_each_assistant_content_and_its_end_of_turn(smollm2_tokenizer, name, messages):
    tok = _tokenizer(smollm2_tokenizer, name)
    ex = tokenize_example(tok, {"messages": messages})
    labelled = [t for t in ex.labels if t != IGNORE_INDEX]
    assert labelled == _expected_labels(tok, messages, TEMPLATES[name][3])
    # the whole sequence is the template's rendering, tokenised as one text
    full = tok.apply_chat_template(messages, tokenize=False)
    assert list(ex.input_ids) == tok(full, add_special_tokens=False)["input_ids"]
    # one contiguous labelled run per assistant turn, each ending on the end-of-turn token
    runs, inside = [], False
    for j, t in enumerate(ex.labels):
        if t != IGNORE_INDEX and not inside:
            runs.append([j])
        if t == IGNORE_INDEX and inside:
            runs[-1].append(j)
        inside = t != IGNORE_INDEX
    if inside:
        runs[-1].append(len(ex.labels))
    assert len(runs) == sum(m["role"] == "assistant" for m in messages)
    eot = tok.convert_tokens_to_ids(TEMPLATES[name][3])
    assert all(ex.input_ids[r[1] - 1] == eot for r in runs)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_system_prompt_and_template_whitespace_are_not_labels(smollm2_tokenizer, name):
    tok = _tokenizer(smollm2_tokenizer, name)
    ex = tokenize_example(tok, {"messages": MULTI})
    text = tok.decode([t for t in ex.labels if t != IGNORE_INDEX])
    assert "one short sentence" not in text and "Hello there" not in text
    assert "assistant" not in text and "model\n" not in text  # no role header
    assert not text.endswith("\n")  # ChatML/Gemma's newline after the end of turn is not a label


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_greedy_prompt_is_the_training_text_up_to_the_last_response(smollm2_tokenizer, name):
    tok = _tokenizer(smollm2_tokenizer, name)
    before, reference = last_turn(MULTI)
    full, spans = render_spans(tok, MULTI)
    prompt = render_prompt(tok, before)
    assert full.startswith(prompt) and spans[-1][0] == len(prompt)
    assert full[spans[-1][0] :].startswith(reference)


def test_chatml_injects_smollm2s_default_system_prompt_unlabelled(smollm2_tokenizer):
    ex = tokenize_example(smollm2_tokenizer, {"messages": SINGLE})
    text = smollm2_tokenizer.decode(list(ex.input_ids))
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    labelled = smollm2_tokenizer.decode([t for t in ex.labels if t != IGNORE_INDEX])
    assert labelled == "Paris is the capital of France.<|im_end|>"


def test_plain_layout_without_a_template(smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = None
    ex = tokenize_example(tok, {"messages": MULTI})
    eos = tok.eos_token_id
    expected = []
    for m in MULTI:
        if m["role"] == "assistant":
            expected += tok(m["content"], add_special_tokens=False)["input_ids"] + [eos]
    assert [t for t in ex.labels if t != IGNORE_INDEX] == expected
    text = tok.decode(list(ex.input_ids))
    assert text.startswith("You answer in one short sentence.\n\n### User:\nHello there\n")
    assert "### Assistant:\nHi! How can I help?<|im_end|>\n### User:\n" in text
    full, spans = render_spans(tok, MULTI)
    prompt = render_prompt(tok, last_turn(MULTI)[0])
    assert full.startswith(prompt) and prompt.endswith("### Assistant:\n")
    assert spans[-1][0] == len(prompt)
