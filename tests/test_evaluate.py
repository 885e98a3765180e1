from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from merit_lab.data.formatting import IGNORE_INDEX, tokenize_example
from merit_lab.data.mixture import load_mixture
from merit_lab.evaluation.evaluate import (
    EVAL_METRICS,
    evaluate_model,
    greedy_answers,
    heldout_loss,
    summarize_eval,
)


@pytest.fixture(scope="module")
def two_sources():
    m = load_mixture("demo")
    return m.select([m.names[0], m.names[-1]])


def test_heldout_loss_pools_response_tokens(pico_model, demo_tokenizer, two_sources):
    examples = list(two_sources.sources[0].eval[:5])
    nll = []
    for ex in examples:  # one example at a time, no padding: the reference
        t = tokenize_example(demo_tokenizer, ex)
        ids = torch.tensor([t.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(pico_model(input_ids=ids).logits[0, :-1].float(), -1)
        for j, lab in enumerate(t.labels[1:]):
            if lab != IGNORE_INDEX:
                nll.append(-float(logp[j, lab]))
    got = heldout_loss(pico_model, demo_tokenizer, examples, batch_size=2)
    assert got == pytest.approx(np.mean(nll), rel=1e-5)


def _argmax_answer(model, tok, ids: list[int], n: int) -> str:
    """One token at a time, no cache, no batch: the reference greedy answer to prompt ``ids``."""
    ids, new = torch.tensor([ids]), []
    for _ in range(n):
        with torch.no_grad():
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        new.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tok.decode(new, skip_special_tokens=True).strip()


def _prompt_ids(tok, example: dict) -> list[int]:
    prompt = tok.apply_chat_template(
        example["messages"][:-1], tokenize=False, add_generation_prompt=True
    )
    return tok(prompt, add_special_tokens=False)["input_ids"]


def test_batched_greedy_equals_one_by_one_argmax(pico_model, demo_tokenizer, two_sources):
    examples = list(two_sources.sources[0].eval[:3]) + list(two_sources.sources[1].eval[:2])
    batched = greedy_answers(pico_model, demo_tokenizer, examples, max_new_tokens=6, batch_size=5)
    for ex, got in zip(examples, batched, strict=True):
        assert got == _argmax_answer(pico_model, demo_tokenizer, _prompt_ids(demo_tokenizer, ex), 6)


def test_an_over_long_prompt_keeps_its_last_max_length_tokens(pico_model, demo_tokenizer):
    long = {
        "messages": [
            {"role": "user", "content": "abcdefghij" * 6},
            {"role": "assistant", "content": "x"},
        ]
    }
    short = {"messages": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "y"}]}
    ids = _prompt_ids(demo_tokenizer, long)
    assert len(ids) > 24
    got = greedy_answers(pico_model, demo_tokenizer, [short, long], max_new_tokens=3, max_length=24)
    assert got[1] == _argmax_answer(pico_model, demo_tokenizer, ids[-24:], 3)
    assert got[0] == _argmax_answer(
        pico_model, demo_tokenizer, _prompt_ids(demo_tokenizer, short), 3
    )


def test_evaluate_and_summarize(pico_model, demo_tokenizer, two_sources):
    table = evaluate_model(
        pico_model,
        demo_tokenizer,
        two_sources,
        label="pico",
        max_examples=4,
        max_new_tokens=4,
        progress=False,
    )
    assert set(table["metric"]) == set(EVAL_METRICS)
    assert (table["n"] == 4).all() and len(table) == 2 * len(EVAL_METRICS)
    em = table[table.metric == "exact_match"].set_index("source")["value"]
    sim = table[table.metric == "similarity"].set_index("source")["value"]
    assert ((sim >= em) & (sim <= 1)).all()  # an exact answer has similarity 1
    # the style metrics from the same greedy answers, recomputed independently
    answers = {}
    for name in two_sources.names:
        examples = two_sources[name].split("eval")[:4]
        got = greedy_answers(pico_model, demo_tokenizer, examples, max_new_tokens=4)
        refs = [ex["messages"][-1]["content"].strip() for ex in examples]
        ratios = [len(a) / len(r) for a, r in zip(got, refs, strict=True)]
        answers[name] = (np.mean([0.5 <= x <= 2 for x in ratios]), np.mean(ratios))
    style = table[table.metric == "in_style"].set_index("source")["value"]
    length = table[table.metric == "length_ratio"].set_index("source")["value"]
    for name, (in_style, ratio) in answers.items():
        assert style[name] == pytest.approx(in_style) and length[name] == pytest.approx(ratio)
    fake = pd.DataFrame(
        [
            {
                "model": m,
                "source": s,
                "family": f,
                "split": "eval",
                "metric": "exact_match",
                "value": v,
                "n": 1,
            }
            for m, s, f, v in [
                ("a", "s1", "x", 1.0),
                ("a", "s2", "x", 0.0),
                ("a", "s3", "y", 0.5),
                ("b", "s1", "x", 1.0),
                ("b", "s2", "x", 1.0),
                ("b", "s3", "y", 0.0),
            ]
        ]
    )
    wide = summarize_eval(fake, order=["b", "a"])
    assert list(wide.index) == ["b", "a"]
    assert wide.loc["a", "x"] == pytest.approx(50.0) and wide.loc["a", "avg"] == pytest.approx(50.0)
    assert wide.loc["b", "avg"] == pytest.approx(50.0)
