"""Evaluation-only sources: the folder reader, θ0's references on hand-worked and real answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from merit_lab.data.mixture import MixtureError
from merit_lab.evaluation.heldout import base_reference_examples, load_heldout


def _chat(prompt: str, answer: str, **extra) -> dict:
    return {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ],
        **extra,
    }


def test_references_keep_the_prompt_and_drop_cut_off_and_empty_answers():
    multi = {
        "id": "d1",
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "how are you?"},
            {"role": "assistant", "content": "fine"},
        ],
    }
    examples = [multi, _chat("a", "x", id="d2"), _chat("b", "y", id="d3"), _chat("c", "z")]
    answers = [" I am well, thanks. ", "cut off", "   ", "ok"]
    kept, dropped = base_reference_examples(examples, answers, [True, False, True, True])
    assert dropped == 2  # d2 was cut off by the budget (no end-of-turn token); d3 is empty
    assert [k["id"] for k in kept] == ["d1", "ex-1"]
    assert kept[0]["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you?"},
        {"role": "assistant", "content": "I am well, thanks."},
    ]
    assert kept[1]["messages"][-1] == {"role": "assistant", "content": "ok"}
    with pytest.raises(ValueError, match="differ in length"):
        base_reference_examples(examples, answers[:2], [True, True])


def _write(folder: Path, name: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("layout", ["flat", "eval"])
def test_load_heldout_scores_every_example_and_trains_none(tmp_path, layout):
    files = tmp_path if layout == "flat" else tmp_path / "eval"
    _write(files, "chat-a", [_chat(f"p{i}", f"r{i}") for i in range(3)])
    _write(files, "chat-b", [_chat("q", "s")])
    (tmp_path / "sources.json").write_text(json.dumps({"sources": {"chat-a": {"family": "chat"}}}))
    mix = load_heldout(tmp_path)
    assert mix.names == ("chat-a", "chat-b")
    a = mix["chat-a"]
    assert (len(a.train), len(a.calibration), len(a.eval)) == (0, 0, 3)
    assert a.metadata == {"family": "chat"} and mix["chat-b"].metadata == {}
    assert [ex["messages"][-1]["content"] for ex in a.eval] == ["r0", "r1", "r2"]


def test_load_heldout_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(MixtureError, match="not a folder"):
        load_heldout(tmp_path / "missing")
    with pytest.raises(MixtureError, match="no .jsonl or .parquet"):
        load_heldout(tmp_path)
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(MixtureError, match="bad.jsonl"):
        load_heldout(tmp_path)


def test_base_references_are_the_models_own_greedy_answers(tmp_path):
    """On the demo base: each reference is what `generate_answers` gives for its prompt, and an
    answer is dropped exactly when it did not end by itself."""
    from merit_lab.data.mixture import load_mixture
    from merit_lab.evaluation.evaluate import generate_answers
    from merit_lab.evaluation.heldout import write_base_references
    from merit_lab.models.loading import load_model, load_tokenizer, resolve_model_path

    out = write_base_references(
        "demo",
        "data/demo",
        tmp_path / "refs",
        sources=["initials-a-terse-lower", "initials-a-verbose-lower"],
        max_examples=3,
        max_new_tokens=24,
        progress=False,
    )
    refs = load_heldout(out)
    info = json.loads((out / "sources.json").read_text())
    assert info["max_new_tokens"] == 24 and len(info["model_fingerprint"]) > 8
    path = resolve_model_path("demo")
    model, tok = load_model(path, device="cpu"), load_tokenizer(path)
    prompts = load_mixture("data/demo", eval_fraction=0.2)
    for name in refs.names:
        examples = list(prompts[name].eval)[:3]
        expected = generate_answers(model, tok, examples, max_new_tokens=24)
        kept = [a.text for a in expected if a.stopped and a.text.strip()]
        meta = info["sources"][name]
        assert meta["answered"] == 3 and meta["dropped_at_budget"] == 3 - len(kept)
        assert [ex["messages"][-1]["content"] for ex in refs[name].eval] == kept
        assert [ex["messages"][0] for ex in refs[name].eval] == [
            ex["messages"][0] for ex in examples if ex["id"] in {r["id"] for r in refs[name].eval}
        ]
    with pytest.raises(KeyError, match="not in"):
        write_base_references("demo", "data/demo", tmp_path / "x", sources=["nope"])


def test_base_references_command_writes_a_heldout_folder(tmp_path, capsys):
    from merit_lab.cli import main

    out = tmp_path / "refs"
    main(
        [
            "base-references",
            "--model",
            "demo",
            "--prompts",
            "data/demo",
            "--out",
            str(out),
            "--max-examples",
            "2",
            "--max-new-tokens",
            "16",
            "--device",
            "cpu",
        ]
    )
    assert "eval.heldout" in capsys.readouterr().out
    mix = load_heldout(out)
    assert len(mix.names) == 32 and all(1 <= len(mix[n].eval) <= 2 for n in mix.names)
