"""The short-answer collapse demo: its mixture is what package code generates, its ground truth
is in sources.json, and its θ0 answers both styles before any fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from merit_lab.config.schema import load_config
from merit_lab.demo.collapse import (
    BASE_FAMILIES,
    LONG,
    SHORT,
    collapse_sources,
    generate_collapse_mixture,
)
from merit_lab.evaluation.evaluate import greedy_answers, style_scores
from merit_lab.models.loading import load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "demo-collapse"


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_committed_mixture_is_what_the_generator_writes(tmp_path):
    out = generate_collapse_mixture(tmp_path / "mix")
    for split in ("train", "calibration", "eval"):
        for f in sorted((DATA / split).glob("*.jsonl")):
            assert (out / split / f.name).read_bytes() == f.read_bytes(), f
    assert json.loads((out / "sources.json").read_text()) == json.loads(
        (DATA / "sources.json").read_text()
    )


def test_ground_truth_and_imbalance():
    meta = json.loads((DATA / "sources.json").read_text())
    styles = {name: s["style"] for name, s in meta["sources"].items()}
    assert styles == collapse_sources()
    assert sum(s == "long" for s in styles.values()) == 3 and len(styles) == 11
    n = {name: len(_records(DATA / "train" / f"{name}.jsonl")) for name in styles}
    short = [n[s] for s in SHORT]
    long = [n[s] for s in LONG]
    assert set(short) == {256} and set(long) == {48}  # 16x fewer conversational examples
    # every source has the same calibration and eval sizes: the space weighs styles alike
    for split, size in (("calibration", 200), ("eval", 32)):
        assert {len(_records(DATA / split / f"{s}.jsonl")) for s in styles} == {size}
    # the splits never share a prompt
    for name in styles:
        prompts = [
            r["messages"][0]["content"]
            for split in ("train", "calibration", "eval")
            for r in _records(DATA / split / f"{name}.jsonl")
        ]
        assert len(prompts) == len(set(prompts))


def test_long_answers_contain_a_short_tasks_result():
    for r in _records(DATA / "train" / "explain.jsonl")[:20]:
        word = r["messages"][0]["content"].split("reverse ")[1].rstrip("?")
        assert f"gives {word[::-1]}," in r["messages"][1]["content"]
    for r in _records(DATA / "train" / "describe.jsonl")[:20]:
        word = r["messages"][0]["content"].split("the word ")[1].split(",")[0]
        assert f"read {''.join(sorted(word))}." in r["messages"][1]["content"]
    lengths = {
        s: sum(len(r["messages"][1]["content"]) for r in _records(DATA / "eval" / f"{s}.jsonl"))
        / 32
        for s in collapse_sources()
    }
    assert max(lengths[s] for s in SHORT) < 10 < 80 < min(lengths[s] for s in LONG)


def test_base_record_says_what_theta0_was_tuned_on():
    info = json.loads((DATA / "base" / "pretrain.json").read_text())
    assert info["families"] == list(BASE_FAMILIES)
    assert info["steps"] == 1500


@pytest.mark.slow
def test_theta0_answers_both_styles():
    """θ0 keeps the conversational style (the minority the demo watches) on held-out prompts."""
    torch.set_num_threads(2)
    tok = load_tokenizer(DATA / "base")
    model = load_model(DATA / "base", device="cpu")
    scores = {}
    for name in ("explain", "describe", "chat", "reverse", "shift", "rotate"):
        examples = _records(DATA / "eval" / f"{name}.jsonl")[:8]
        refs = [e["messages"][1]["content"] for e in examples]
        answers = greedy_answers(model, tok, examples, max_new_tokens=160)
        scores[name] = style_scores(answers, refs)["in_style"]
    assert all(scores[s] >= 0.875 for s in scores), scores


def test_config_runs_every_row_under_three_seeds():
    cfg = load_config(ROOT / "configs" / "demo-collapse.yaml")
    assert (cfg.train.seed, cfg.train.seeds) == (0, (1, 2))
    assert [e.name for e in cfg.experiments] == [
        "joint-1ep",
        "joint-2ep",
        "random-k4",
        "merit-1d",
        "merit-2d",
        "merit-3d",
    ]
    assert cfg.eval.max_new_tokens >= 130  # the longest conversational answer fits
