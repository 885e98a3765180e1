"""The style metrics counted in tokens: the band, the budget, hand-worked scores (the truncation
case included), and the counts `generate_answers` and `evaluate_model` give on a real model."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from merit_lab.data.mixture import load_mixture
from merit_lab.evaluation.evaluate import (
    EVAL_METRICS,
    TOKEN_STYLE_METRICS,
    evaluate_model,
    generate_answers,
    style_band,
    style_budget,
    style_scores,
)
from merit_lab.models.loading import load_model, load_tokenizer


@pytest.fixture(scope="module")
def demo_base():
    """The demo's θ0: it ends its answers, so both endings (stopped / cut off) occur."""
    return load_tokenizer("demo"), load_model("demo", device="cpu")


@pytest.fixture(scope="module")
def two_sources():
    m = load_mixture("demo")
    return m.select(["reverse-a-terse-lower", "reverse-a-verbose-upper"])


def test_band_and_budget_by_hand():
    assert style_band(1) == (0.5, 16.0)  # the floor: any answer of 1..16 tokens is terse
    assert style_band(8) == (4.0, 16.0)
    assert style_band(10) == (5.0, 20.0)
    assert style_band(132) == (66.0, 264.0)
    assert style_band(0) == (0.5, 16.0)  # an empty reference counts as one token
    # an answer of `hi` tokens needs `hi + 1` new tokens to end with the end-of-turn token
    assert style_budget([3]) == 17
    assert style_budget([1, 10, 132]) == 265
    assert style_budget([]) == 1


def test_token_scores_hand_worked():
    # (answer tokens, reference tokens, ended with end-of-turn)
    cases = [
        (120, 100, True),  # ratio 1.2: in style
        (40, 100, True),  # 0.4: below the band (collapse)
        (240, 100, False),  # cut off at the limit: never in style
        (15, 1, True),  # the floor: 15 tokens for a 1-token reference is still terse
        (17, 1, True),  # above the floor
        (0, 8, True),  # an empty answer
    ]
    answers = ["x" * a for a, _, _ in cases]  # one character is one token of the demo
    refs = ["y" * r for _, r, _ in cases]
    got = style_scores(
        answers,
        refs,
        answer_tokens=[a for a, _, _ in cases],
        reference_tokens=[r for _, r, _ in cases],
        stopped=[s for _, _, s in cases],
        max_new_tokens=240,
    )
    assert got["in_style_tokens"] == pytest.approx(2 / 6)
    # ratios 1.2, 0.4, 2.4, 15, 17, 0 -> sorted 0, 0.4, 1.2, 2.4, 15, 17 -> median 1.8
    assert got["length_ratio_median"] == pytest.approx(1.8)
    assert got["no_eos"] == pytest.approx(1 / 6)
    # the character keys of old runs, unchanged: within 2x are 1.2 only
    assert got["in_style"] == pytest.approx(1 / 6)
    assert got["length_ratio"] == pytest.approx((1.2 + 0.4 + 2.4 + 15 + 17 + 0) / 6)
    assert set(style_scores(answers, refs)) == {"in_style", "length_ratio"}


def test_a_cut_off_answer_within_the_band_is_out_of_style():
    """The old failure: a limit of 160 caps a rambling answer to a 100-token reference at 1.6x,
    inside the band; without its end-of-turn token it does not count."""
    kw = {"answer_tokens": [160], "reference_tokens": [100], "stopped": [False]}
    got = style_scores(["x" * 160], ["y" * 100], **kw)
    assert got["in_style_tokens"] == 0.0 and got["no_eos"] == 1.0
    assert got["in_style"] == 1.0  # what the character metric said of the same answer
    with pytest.raises(ValueError, match="at least 201"):
        style_scores(["x" * 160], ["y" * 100], **kw, max_new_tokens=160)


def test_bad_token_arguments_are_refused():
    with pytest.raises(ValueError, match="together"):
        style_scores(["a"], ["b"], answer_tokens=[1])
    with pytest.raises(ValueError, match="differ in length"):
        style_scores(["a"], ["b"], answer_tokens=[1, 2], reference_tokens=[1], stopped=[True])
    empty = style_scores([], [], answer_tokens=[], reference_tokens=[], stopped=[])
    assert all(np.isnan(empty[k]) for k in TOKEN_STYLE_METRICS)


def _one_by_one(model, tok, example: dict, limit: int) -> tuple[int, bool]:
    """Greedy decoding one token at a time, no cache: (tokens before end-of-turn, ended)."""
    prompt = tok.apply_chat_template(
        example["messages"][:-1], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    for n in range(limit):
        with torch.no_grad():
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            return n, True
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return limit, False


def test_generate_answers_counts_tokens_and_the_end(demo_base, two_sources):
    tok, model = demo_base
    examples = list(two_sources.sources[0].eval[:3]) + list(two_sources.sources[1].eval[:3])
    # θ0 answers `Result: <3-6 letters>.` (12-15 tokens): with 14 new tokens some end, some not
    got = generate_answers(model, tok, examples, max_new_tokens=14, batch_size=4)
    expected = [_one_by_one(model, tok, ex, 14) for ex in examples]
    assert [(a.n_tokens, a.stopped) for a in got] == expected
    assert {s for _, s in expected} == {True, False}
    for a in got:  # one character per token, special tokens dropped from the text
        assert len(a.text) == a.n_tokens


def test_evaluate_model_token_metrics_by_hand(demo_base, two_sources):
    tok, model = demo_base
    examples = {n: list(two_sources[n].split("eval")[:6]) for n in two_sources.names}
    refs = {n: [ex["messages"][-1]["content"] for ex in v] for n, v in examples.items()}
    budget = style_budget([len(r) for v in refs.values() for r in v])
    table = evaluate_model(
        model,
        tok,
        two_sources,
        label="theta0",
        max_examples=6,
        max_new_tokens=budget,
        progress=False,
    )
    assert set(table["metric"]) == set(EVAL_METRICS)
    value = table.set_index(["source", "metric"])["value"]
    for name, exs in examples.items():
        ends = [_one_by_one(model, tok, ex, budget) for ex in exs]
        ok, ratios = [], []
        for (n, stopped), ref in zip(ends, refs[name], strict=True):
            r = len(ref)
            hi = max(2 * r, 16)
            ok.append(stopped and r / 2 <= n <= hi)
            ratios.append(n / r)
        assert value[name, "in_style_tokens"] == pytest.approx(np.mean(ok))
        assert value[name, "length_ratio_median"] == pytest.approx(np.median(ratios))
        assert value[name, "no_eos"] == pytest.approx(np.mean([not s for _, s in ends]))


def test_a_short_budget_leaves_the_token_metrics_nan(demo_base, two_sources, caplog):
    tok, model = demo_base
    with caplog.at_level(logging.WARNING, logger="merit_lab.evaluation.evaluate"):
        table = evaluate_model(
            model, tok, two_sources, label="t", max_examples=2, max_new_tokens=4, progress=False
        )
    value = table.set_index(["source", "metric"])["value"]
    for name in two_sources.names:
        assert all(np.isnan(value[name, m]) for m in TOKEN_STYLE_METRICS)
        assert not np.isnan(value[name, "in_style"])
    assert "cannot reach the style band" in caplog.text
