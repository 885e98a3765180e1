"""Over-long examples (mixture.long_examples) and sources too small for a run (small_sources)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from merit_lab.config.schema import load_config
from merit_lab.data.formatting import (
    IGNORE_INDEX,
    count_overflow,
    tokenize_example,
    tokenize_examples,
)
from merit_lab.data.mixture import MixtureError
from merit_lab.demo import DEMO_DIR
from merit_lab.io import read_json
from merit_lab.pipeline import run_pipeline
from merit_lab.pipeline.report import long_and_small_section, long_and_small_table
from merit_lab.training.spec import BranchSpec
from tests.conftest import chat

PROMPT, RESPONSE = "a" * 20, "xyz"
LONG = chat(PROMPT, RESPONSE, id="long")  # 24 prompt + 4 response tokens with the demo template


def _hand_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_truncate_prompt_keeps_the_response_and_the_last_prompt_tokens(demo_tokenizer):
    tok = demo_tokenizer
    prompt = _hand_ids(tok, f"<bos><|user|>{PROMPT}<|end|><|assistant|>")
    response = _hand_ids(tok, f"{RESPONSE}<|end|>")
    assert (len(prompt), len(response)) == (24, 4)
    t = tokenize_example(tok, LONG, max_length=16)  # the default policy
    assert t.overflow == "truncated_prompt" and t.n_tokens == 16
    assert list(t.input_ids) == prompt[-12:] + response  # the start of the prompt went
    assert list(t.labels) == [IGNORE_INDEX] * 12 + response
    # the response alone over max_length: the prompt goes, the response is cut on the right
    r = tokenize_example(tok, LONG, max_length=3)
    assert r.overflow == "response_truncated" and list(r.input_ids) == response[:3]
    assert list(r.labels) == response[:3]
    # an example that fits is untouched
    fits = tokenize_example(tok, LONG, max_length=28)
    assert fits.overflow == "" and list(fits.input_ids) == prompt + response


def test_truncate_right_and_skip(demo_tokenizer):
    tok = demo_tokenizer
    full = _hand_ids(tok, f"<bos><|user|>{PROMPT}<|end|><|assistant|>{RESPONSE}<|end|>")
    right = tokenize_example(tok, LONG, max_length=26, long_examples="truncate_right")
    assert right.overflow == "truncated_right" and list(right.input_ids) == full[:26]
    assert right.n_response_tokens == 2
    with pytest.raises(ValueError, match="'long': no response tokens within max_length=16"):
        tokenize_example(tok, LONG, max_length=16, long_examples="truncate_right")
    short = chat("b", "c", id="short")
    skipped = tokenize_example(tok, LONG, max_length=16, long_examples="skip")
    assert skipped.overflow == "skipped" and skipped.n_tokens == 0
    kept = tokenize_examples(tok, [LONG, short, LONG], max_length=16, long_examples="skip")
    assert [t.input_ids for t in kept] == [tokenize_example(tok, short, 16).input_ids]
    toks = [tokenize_example(tok, ex, 16, "skip") for ex in (LONG, short, LONG)]
    assert count_overflow(toks) == {"n": 2, "skipped": 2}
    with pytest.raises(ValueError, match="policy must be one of"):
        tokenize_example(tok, LONG, 16, "drop")


SOURCES = ["reverse-a-terse-lower", "shift-a-terse-upper"]
COUNTS = {"train": 10, "calibration": 6, "eval": 3}


def _long(i: int) -> dict:
    return chat("q" * 90 + str(i), "answer", id=f"long-{i}")  # ~105 tokens > 64


def _mixture(tmp_path: Path, counts=COUNTS, long_in=("train", "eval")) -> Path:
    """Two demo sources; the first gets one over-long example in each split of ``long_in``."""
    out = tmp_path / "mix"
    for split, n in counts.items():
        (out / split).mkdir(parents=True)
        for s in SOURCES:
            lines = (DEMO_DIR / split / f"{s}.jsonl").read_text().splitlines()[:n]
            if s == SOURCES[0] and split in long_in:
                lines[1] = json.dumps(_long(len(lines)))
            (out / split / f"{s}.jsonl").write_text("\n".join(lines) + "\n")
    return out


def _config(tmp_path: Path, mix: Path, **mixture):
    cfg = {
        "name": "t",
        "mixture": {"path": str(mix), **mixture},
        "output_dir": str(tmp_path / "runs"),
        "device": "cpu",
        "calibration": {"n": 6, "micro_batch_size": 6, "max_length": 64},
        "sketch": {"kind": "countsketch", "dim": 1024},
        "partition": {"method": "balanced", "r": 1},
        "train": {"max_length": 64, "batch_size": 8},
        "experiments": [{"name": "joint", "kind": "joint", "epochs": 1}],
        "eval": {"max_examples": 3, "max_new_tokens": 4},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path)


@pytest.mark.parametrize(
    ("policy", "action", "n_train"),
    [("truncate_prompt", "truncated_prompt", 10), ("skip", "skipped", 9)],
)
def test_mixture_json_counts_the_long_examples(tmp_path: Path, policy, action, n_train):
    cfg = _config(tmp_path, _mixture(tmp_path), long_examples=policy)
    run = run_pipeline(cfg, until="mixture")
    data = read_json(run.mixture)
    assert data["policies"]["long_examples"] == policy
    a, b = data["sources"]
    assert a["long_examples"] == {
        "train": {"n": 1, action: 1},
        "calibration": {"n": 0},
        "eval": {"n": 1, action: 1},
    }
    assert b["long_examples"] == {sp: {"n": 0} for sp in COUNTS}
    assert (a["n_train"], a["n_eval"], b["n_train"]) == (n_train, 3 - (policy == "skip"), 10)
    assert len(a["train_example_tokens"]) == n_train and max(a["train_example_tokens"]) <= 64
    assert a["train_tokens"] == sum(a["train_example_tokens"])
    table = long_and_small_table(data)
    assert list(table.index) == [SOURCES[0]] and table.loc[SOURCES[0], "train"] == f"1 ({action} 1)"
    # the stage key holds the policy: another policy redoes the stage
    other = "skip" if policy != "skip" else "truncate_prompt"
    run2 = run_pipeline(_config(tmp_path, tmp_path / "mix", long_examples=other), until="mixture")
    assert read_json(run2.mixture)["key"] != data["key"]


def test_a_long_example_no_longer_aborts_a_run(tmp_path: Path, one_thread):
    """Its response used to be cut away on the right: the mixture stage raised. Now it trains."""
    mix = _mixture(tmp_path, long_in=("train", "calibration", "eval"))
    cfg = _config(tmp_path, mix)
    with pytest.raises(ValueError, match="no response tokens"):
        run_pipeline(_config(tmp_path, mix, long_examples="truncate_right"), until="mixture")
    torch.manual_seed(0)
    run = run_pipeline(cfg, until="evaluate")
    data = read_json(run.mixture)
    assert data["sources"][0]["long_examples"]["calibration"] == {"n": 1, "truncated_prompt": 1}
    ctx = SimpleNamespace(run=SimpleNamespace(read_mixture=lambda: data))
    text = "\n".join(long_and_small_section(ctx))
    assert "truncate_prompt" in text and "no source is short of examples" in text
    assert "let through" not in text
    assert (run.root / "eval.parquet").exists()
    spec = BranchSpec.load(next(run.root.glob("joint/*/spec.json")))  # the default: omitted
    assert spec.long_examples == "truncate_prompt"


def test_a_tiny_source_is_refused_with_its_name_and_counts(tmp_path: Path):
    mix = _mixture(tmp_path, long_in=())
    for split in ("calibration", "eval"):  # the second source: 2 calibration, 0 eval
        path = mix / split / f"{SOURCES[1]}.jsonl"
        lines = path.read_text().splitlines()
        path.write_text("\n".join(lines[:2]) + "\n" if split == "calibration" else "")
    cfg = _config(tmp_path, mix)
    with pytest.raises(MixtureError) as err:
        run_pipeline(cfg, until="mixture")
    msg = str(err.value)
    assert f"{SOURCES[1]}: train 10, calibration 2, eval" in msg
    assert "2 calibration examples < calibration.n 6" in msg
    assert SOURCES[0] not in msg
    assert not (tmp_path / "runs" / "t" / "mixture.json").exists()

    run = run_pipeline(_config(tmp_path, mix, small_sources="warn"), until="mixture")
    short = {s["name"]: s["shortfall"] for s in read_json(run.mixture)["sources"]}
    assert (
        short[SOURCES[0]] == "" and "2 calibration examples < calibration.n 6" in short[SOURCES[1]]
    )
    table = long_and_small_table(read_json(run.mixture))
    assert list(table.index) == [SOURCES[1]]


def test_skip_that_leaves_a_source_short_is_refused(tmp_path: Path):
    mix = _mixture(tmp_path, long_in=("calibration",))  # calibration 6 with one over-long: 5 < 6
    with pytest.raises(MixtureError, match=r"calibration 5, eval 3 \(5 calibration examples"):
        run_pipeline(_config(tmp_path, mix, long_examples="skip"), until="mixture")
    assert not (tmp_path / "runs" / "t" / "mixture.json").exists()


def test_branch_spec_omits_the_default_policy_so_older_specs_still_resume():
    """A spec.json written before the policy existed has no `long_examples` key: a spec at the
    default must serialise the same, or re-running an old run would refuse its branches."""
    spec = BranchSpec(name="b", base_model="demo", output_dir="out", sources=("a",))
    assert "long_examples" not in spec.to_dict()
    assert BranchSpec.from_dict(spec.to_dict()).long_examples == "truncate_prompt"
    skip = BranchSpec(
        name="b", base_model="demo", output_dir="out", sources=("a",), long_examples="skip"
    )
    assert skip.to_dict()["long_examples"] == "skip"
