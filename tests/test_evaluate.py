from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from merit_lab.evaluate import evaluate_model, greedy_answers, heldout_loss, summarize_eval
from merit_lab.formatting import IGNORE_INDEX, tokenize_example
from merit_lab.mixture import load_mixture


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


def test_batched_greedy_equals_one_by_one_argmax(pico_model, demo_tokenizer, two_sources):
    examples = list(two_sources.sources[0].eval[:3]) + list(two_sources.sources[1].eval[:2])
    batched = greedy_answers(pico_model, demo_tokenizer, examples, max_new_tokens=6, batch_size=5)
    for ex, got in zip(examples, batched, strict=True):
        prompt = demo_tokenizer.apply_chat_template(
            ex["messages"][:-1], tokenize=False, add_generation_prompt=True
        )
        ids = demo_tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        new = []
        for _ in range(6):
            with torch.no_grad():
                nxt = int(pico_model(input_ids=ids).logits[0, -1].argmax())
            if nxt == demo_tokenizer.eos_token_id:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert got == demo_tokenizer.decode(new, skip_special_tokens=True).strip()


def test_evaluate_and_summarize(pico_model, demo_tokenizer, two_sources):
    table = evaluate_model(
        pico_model, demo_tokenizer, two_sources, label="pico", max_examples=4, max_new_tokens=4,
        progress=False,
    )  # fmt: skip
    assert set(table["metric"]) == {"loss", "exact_match", "similarity"}
    assert (table["n"] == 4).all() and len(table) == 6
    em = table[table.metric == "exact_match"].set_index("source")["value"]
    sim = table[table.metric == "similarity"].set_index("source")["value"]
    assert ((sim >= em) & (sim <= 1)).all()  # an exact answer has similarity 1
    fake = pd.DataFrame(
        [
            {"model": m, "source": s, "family": f, "split": "eval", "metric": "exact_match",
             "value": v, "n": 1}
            for m, s, f, v in [("a", "s1", "x", 1.0), ("a", "s2", "x", 0.0), ("a", "s3", "y", 0.5),
                               ("b", "s1", "x", 1.0), ("b", "s2", "x", 1.0), ("b", "s3", "y", 0.0)]
        ]
    )  # fmt: skip
    wide = summarize_eval(fake, order=["b", "a"])
    assert list(wide.index) == ["b", "a"]
    assert wide.loc["a", "x"] == pytest.approx(50.0) and wide.loc["a", "avg"] == pytest.approx(50.0)
    assert wide.loc["b", "avg"] == pytest.approx(50.0)
