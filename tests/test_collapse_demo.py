"""The short-answer collapse demo: its data is what package code writes, its sources carry the
planted axes, its held-out conversations share nothing with anything trained, θ0 passed its
gates, and the config runs every row under three seeds at the frozen budget."""

from __future__ import annotations

import json
import re
from itertools import islice
from pathlib import Path

import pytest
import torch

from merit_lab.config.schema import load_config
from merit_lab.data.mixture import load_mixture
from merit_lab.demo.collapse import (
    CONVENTIONS,
    CONVERSATIONS,
    OPERATIONS,
    THETA0_SHORT,
    collapse_sources,
    generate_collapse_mixture,
    heldout_sources,
    is_fresh_word,
)
from merit_lab.demo.collapse_base import COLLAPSE_BUDGET, STYLE_GATE, theta0_batches
from merit_lab.evaluation.evaluate import generate_answers, style_budget, style_scores
from merit_lab.evaluation.heldout import load_heldout
from merit_lab.models.loading import load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "demo-collapse"
CONFIG = ROOT / "configs" / "demo-collapse.yaml"
SPLITS = ("train", "calibration", "eval")

# Every prompt template, as a pattern whose one group is the word it asks about.
_TEMPLATES = [t + c for t, _ in OPERATIONS.values() for c, _ in CONVENTIONS.values()] + [
    t for taught, para, _ in CONVERSATIONS.values() for t in (*taught, *para)
]
_PATTERNS = [re.compile(re.escape(t).replace(r"\{x\}", "([a-z]{4,7})") + "$") for t in _TEMPLATES]


def _template(prompt: str) -> tuple[str, str]:
    """(the template a prompt was written from, its operand: the one part no template fixes)."""
    for t, p in zip(_TEMPLATES, _PATTERNS, strict=True):
        if m := p.match(prompt):
            return t, m.group(1)
    raise AssertionError(f"no template matches {prompt!r}")


def _word(prompt: str) -> str:
    return _template(prompt)[1]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _pairs(path: Path) -> list[tuple[str, str]]:
    return [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in _records(path)]


def test_committed_data_is_what_the_generator_writes(tmp_path):
    out = generate_collapse_mixture(tmp_path / "mix")
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    committed = sorted(
        p.relative_to(DATA) for p in DATA.rglob("*") if p.is_file() and "base" not in p.parts
    )
    assert files == committed and len(files) == 3 * 24 + 1 + 4 + 1
    for f in files:
        assert (out / f).read_bytes() == (DATA / f).read_bytes(), f
    other = generate_collapse_mixture(tmp_path / "other", seed=1)
    assert (other / "train" / "reverse-bare.jsonl").read_bytes() != (
        out / "train" / "reverse-bare.jsonl"
    ).read_bytes()


def test_sources_carry_the_planted_axes():
    meta = json.loads((DATA / "sources.json").read_text())
    assert meta["axes"] == ["operation", "convention"]
    assert len(meta["sources"]) == len(collapse_sources()) == 24
    for name, (op, conv) in collapse_sources().items():
        m = meta["sources"][name]
        assert (m["operation"], m["convention"], m["family"], m["style"]) == (op, conv, op, "short")
        assert m["known_to_theta0"] == (name in THETA0_SHORT)
        for split, size in zip(SPLITS, (64, 128, 32), strict=True):
            pairs = _pairs(DATA / split / f"{name}.jsonl")
            assert len(pairs) == size
            for prompt, answer in pairs:
                w = _word(prompt)
                result = {
                    "initial": w[0],
                    "first-last": w[0] + w[-1],
                    "count": ["four", "five", "six", "seven"][len(w) - 4],
                    "reverse": w[::-1],
                    "spell": "-".join(w),
                    "twice": f"{w} {w}",
                }[op]
                expected = {
                    "bare": result,
                    "upper": result.upper(),
                    "prefixed": f"Answer: {result}",
                    "quoted": f'"{result}"',
                }[conv]
                assert answer == expected, (name, prompt, answer)
                assert (conv == "bare") == (prompt == OPERATIONS[op][0].format(x=w))
    lengths = [len(a) for n in collapse_sources() for _, a in _pairs(DATA / "eval" / f"{n}.jsonl")]
    assert min(lengths) == 1 and max(lengths) <= 23  # short answers, 1 to 23 tokens
    # every source's splits are distinct prompts
    for name in collapse_sources():
        prompts = [p for s in SPLITS for p, _ in _pairs(DATA / s / f"{name}.jsonl")]
        assert len(prompts) == len(set(prompts))


def _theta0_draw() -> list[tuple[str, str]]:
    info = json.loads((DATA / "base" / "pretrain.json").read_text())
    batches = theta0_batches(info["seed"], info["batch_size"])
    return [pair for batch in islice(batches, info["steps"]) for pair in batch]


def test_heldout_shares_no_prompt_and_no_word_with_anything_trained():
    held = {n: _pairs(DATA / "heldout" / "eval" / f"{n}.jsonl") for n in heldout_sources()}
    held_words = {_word(p) for pairs in held.values() for p, _ in pairs}
    held_prompts = {p for pairs in held.values() for p, _ in pairs}
    assert all(is_fresh_word(w) for w in held_words) and len(held_words) == 128
    trained = [
        pair
        for name in collapse_sources()
        for split in ("train", "calibration")
        for pair in _pairs(DATA / split / f"{name}.jsonl")
    ]
    draw = _theta0_draw()
    assert len(draw) >= 2000 * 32
    for prompts in ([p for p, _ in trained], [p for p, _ in draw]):
        words = {_word(p) for p in prompts}
        assert not words & held_words and not any(is_fresh_word(w) for w in words)
        assert not set(prompts) & held_prompts
    # θ0's draw: its four conversational families under their own templates, its short sources
    taught = {t for ts, _, _ in CONVERSATIONS.values() for t in ts}
    para = {t for _, ps, _ in CONVERSATIONS.values() for t in ps}
    used = {_template(p)[0] for p, _ in draw}
    assert taught <= used and not used & para


def test_heldout_folder_is_evaluation_only():
    held = load_heldout(DATA / "heldout")
    assert sorted(held.names) == sorted(heldout_sources())
    assert not set(held.names) & set(load_mixture(DATA).names)
    meta = json.loads((DATA / "heldout" / "sources.json").read_text())
    assert meta["evaluation_only"] is True
    for name, family in heldout_sources().items():
        src = held[name]
        assert not src.train and not src.calibration and len(src.eval) == 32
        assert meta["sources"][name]["family"] == "conversation"
        for ex in src.eval:  # θ0-style references: 2-3 sentences (after an opener) with results
            prompt, answer = ex["messages"][0]["content"], ex["messages"][1]["content"]
            assert answer == CONVERSATIONS[family][2](_word(prompt))
            sentences = re.split(r"(?<=[.!]) ", answer)
            opener = sentences[0] in ("Sure.", "Happy to help!", "Of course.")
            assert 2 <= len(sentences) - opener <= 3 and 80 <= len(answer) <= 132


def test_theta0_passed_its_gates_at_the_frozen_budget():
    gates = json.loads((DATA / "base" / "gates.json").read_text())
    a, b = gates["a_style"], gates["b_barrier"]
    assert a["threshold"] == STYLE_GATE and a["conversation"] >= STYLE_GATE and a["passed"]
    assert b["passed"] and b["relative_barrier"] <= b["tolerance"]
    assert b["train"] == COLLAPSE_BUDGET and b["seeds"][0] != b["seeds"][1]
    assert gates["passed"] is True
    info = json.loads((DATA / "base" / "pretrain.json").read_text())
    assert info["short_sources"] == list(THETA0_SHORT)
    assert info["plateau"]["conversation"] < 0.05  # its last quarter moved it by under 5%


def test_config_rows_seeds_budget_and_generation_limit():
    cfg = load_config(CONFIG)
    names = [e.name for e in cfg.experiments]
    assert names[:4] == ["joint-0.5ep", "joint-1ep", "joint-2ep", "soup"]
    assert [e.epochs for e in cfg.experiments[:3]] == [0.5, 1.0, 2.0]
    for k in (2, 4, 8):
        rows = [e for e in cfg.experiments if e.method == "random" and e.k == k]
        assert sorted(e.seed for e in rows) == [0, 1, 2]  # three random partitions
    assert [(e.name, e.r) for e in cfg.experiments if e.method == "balanced"] == [
        ("merit-1d", 1),
        ("merit-2d", 2),
        ("merit-3d", 3),
    ]
    assert len({cfg.train.seed, *cfg.train.seeds}) >= 3
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.warmup_ratio) == (
        COLLAPSE_BUDGET["lr"],
        COLLAPSE_BUDGET["batch_size"],
        COLLAPSE_BUDGET["warmup_ratio"],
    )
    assert next(e for e in cfg.experiments if e.name == "joint-1ep").epochs == 1.0
    # the generation limit reaches past the style band of every reference it is scored on
    refs = [
        len(a)
        for folder in (DATA / "eval", DATA / "heldout" / "eval")
        for f in folder.glob("*.jsonl")
        for _, a in _pairs(f)
    ]
    assert cfg.eval.max_new_tokens >= style_budget(refs) == 265


@pytest.mark.slow
def test_theta0_answers_the_heldout_conversations_in_style():
    """Gate (a) again on the first 8 prompts of each held-out source."""
    torch.set_num_threads(1)
    tok = load_tokenizer(DATA / "base")
    model = load_model(DATA / "base", device="cpu")
    for name in heldout_sources():
        examples = _records(DATA / "heldout" / "eval" / f"{name}.jsonl")[:8]
        refs = [e["messages"][1]["content"] for e in examples]
        answers = generate_answers(model, tok, examples, max_new_tokens=272)
        got = style_scores(
            [a.text for a in answers],
            refs,
            answer_tokens=[a.n_tokens for a in answers],
            reference_tokens=[len(r) for r in refs],
            stopped=[a.stopped for a in answers],
            max_new_tokens=272,
        )
        assert got["in_style_tokens"] >= 7 / 8, (name, got)
