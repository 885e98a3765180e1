"""Tests of the bundled demo: the mixture generator, the committed data, the tokenizer and θ0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from merit_lab.demo import DEMO_DIR, build_demo_tokenizer, generate_demo_mixture
from merit_lab.demo.base import _encode_batch
from merit_lab.demo.tasks import SPLITS

SMALL = {"n_train": 6, "n_calibration": 4, "n_eval": 3}


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes), ``base/`` excluded."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "base" not in p.relative_to(root).parts
    }


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def small_mixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo_mixture(tmp_path_factory.mktemp("demo") / "mix", seed=3, **SMALL)


def test_generator_is_deterministic(small_mixture: Path, tmp_path: Path) -> None:
    again = generate_demo_mixture(tmp_path / "again", seed=3, **SMALL)
    other = generate_demo_mixture(tmp_path / "other", seed=4, **SMALL)
    assert _files(again) == _files(small_mixture)
    assert _files(other) != _files(small_mixture)


def test_generator_schema_and_metadata(small_mixture: Path) -> None:
    meta = json.loads((small_mixture / "sources.json").read_text())
    assert meta["seed"] == 3
    assert meta["axes"][0] == "style" and len(meta["axes"]) == 2
    sources = meta["sources"]
    assert len(sources) >= 32
    assert len(meta["families"]) >= 4
    assert {s["family"] for s in sources.values()} == set(meta["families"])
    # Both planted axes are binary and fully crossed with family: the nuisances are balanced.
    for axis in meta["axes"]:
        values = sorted({s[axis] for s in sources.values()})
        assert len(values) == 2
        for family in meta["families"]:
            counts = [
                sum(s["family"] == family and s[axis] == v for s in sources.values())
                for v in values
            ]
            assert counts[0] == counts[1] > 0
    for split in SPLITS:
        assert sorted(p.stem for p in (small_mixture / split).glob("*.jsonl")) == sorted(sources)
    prompts: dict[str, set[str]] = {}
    for name, info in sources.items():
        for split in SPLITS:
            records = _records(small_mixture / split / f"{name}.jsonl")
            assert len(records) == SMALL[f"n_{split}"]
            for i, rec in enumerate(records):
                assert set(rec) == {"id", "messages"}
                assert rec["id"] == f"{name}-{split}-{i}"
                user, assistant = rec["messages"]
                assert user["role"] == "user" and assistant["role"] == "assistant"
                assert user["content"] and assistant["content"]
                answer = assistant["content"]
                assert answer.startswith("Result: ") == (info["style"] == "verbose")
                letters = answer.removeprefix("Result: ").rstrip(".")
                assert letters.isalpha()
                assert letters == (letters.upper() if info["case"] == "upper" else letters.lower())
                prompts.setdefault(name, set()).add(user["content"])
        # Splits never share a prompt within a source.
        assert len(prompts[name]) == sum(SMALL.values())


def test_committed_mixture_matches_generator(tmp_path: Path) -> None:
    assert (DEMO_DIR / "sources.json").is_file(), "run `merit-lab demo-data` to create data/demo"
    fresh = generate_demo_mixture(tmp_path / "demo", seed=0)
    committed = _files(DEMO_DIR)
    regenerated = _files(fresh)
    assert sorted(committed) == sorted(regenerated)
    changed = [k for k in regenerated if committed[k] != regenerated[k]]
    assert not changed, f"data/demo differs from generate_demo_mixture(seed=0): {changed[:5]}"


def _demo_conversations(n_per_source: int = 1) -> list[list[dict]]:
    convs = []
    for path in sorted((DEMO_DIR / "eval").glob("*.jsonl")):
        convs += [r["messages"] for r in _records(path)[:n_per_source]]
    return convs


def test_chat_template_prefix_property(tmp_path: Path) -> None:
    built = build_demo_tokenizer()
    built.save_pretrained(tmp_path / "tok")
    for tok in (built, AutoTokenizer.from_pretrained(tmp_path / "tok")):
        assert tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id
        convs = _demo_conversations()
        convs.append(convs[0] + convs[1])  # multi-turn
        for messages in convs:
            for i, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                head = tok.apply_chat_template(
                    messages[:i], add_generation_prompt=True, tokenize=False
                )
                full = tok.apply_chat_template(messages[: i + 1], tokenize=False)
                assert full.startswith(head)
                head_ids = tok(head, add_special_tokens=False)["input_ids"]
                full_ids = tok(full, add_special_tokens=False)["input_ids"]
                assert full_ids[: len(head_ids)] == head_ids
                # The response ends with the end-of-turn token, which is the eos token.
                assert full_ids[-1] == tok.eos_token_id
                response = tok.decode(full_ids[len(head_ids) : -1])
                assert response == message["content"]


@pytest.fixture(scope="module")
def demo_batch() -> dict[str, torch.Tensor]:
    pairs = [(m[0]["content"], m[1]["content"]) for m in _demo_conversations(2)]
    return _encode_batch(AutoTokenizer.from_pretrained(DEMO_DIR / "base"), pairs)


def test_committed_base_beats_fresh_init(demo_batch: dict[str, torch.Tensor]) -> None:
    base_dir = DEMO_DIR / "base"
    assert (base_dir / "model.safetensors").is_file()
    assert not list(base_dir.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir)).eval()
    with torch.no_grad():
        loss = model(**demo_batch).loss.item()
        fresh_loss = fresh(**demo_batch).loss.item()
    # A fresh model is near uniform over ~100 characters (ln 100 ≈ 4.6; 4.68 measured). The
    # committed θ0 (3000 pretraining steps) does the tasks and hedges only at the planted
    # decisions: 0.276 nats per response character on these 64 held-out answers.
    assert fresh_loss > 4.0
    assert loss == pytest.approx(0.2757, abs=0.002)


@pytest.mark.slow  # the slow tier: 768 greedy answers of the whole demo's held-out split
def test_committed_base_quality_is_the_readme_figure() -> None:
    """The README's θ0: held-out loss 0.37 nats/char and exact match 20% ("0.366" and "20.2" in
    the demo table), computed as the demo's evaluate stage does: 24 held-out examples per source,
    averaged per family and then over families."""
    from merit_lab.data.mixture import load_mixture
    from merit_lab.evaluation.evaluate import evaluate_model, summarize_eval
    from merit_lab.models.loading import load_model, load_tokenizer

    table = evaluate_model(
        load_model("demo", device="cpu"),
        load_tokenizer("demo"),
        load_mixture("demo"),
        label="theta0",
        max_examples=24,
        progress=False,
    )
    loss = summarize_eval(table, metric="loss").loc["theta0", "avg"]
    exact = summarize_eval(table, metric="exact_match").loc["theta0", "avg"]
    assert loss == pytest.approx(0.3664, abs=0.001)  # 0.36644 measured
    assert exact == pytest.approx(20.18, abs=0.3)  # 155 of 768 answers, ±2 answers
