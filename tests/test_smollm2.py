"""Smoke test on a real pretrained chat model, SmolLM2-135M-Instruct (``merit-lab fetch-model
smollm2``; skipped, saying why, where it is not fetched): two sources of a few dialogues through
gradients, conflict, partition, a three-step branch per group, the merge and evaluation. The
sketched cosine is checked against exact full gradients, the merge against the token-weighted
average of the branches."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from merit_lab.config.schema import load_config
from merit_lab.data.formatting import collate, response_token_loss, tokenize_examples
from merit_lab.io import read_json
from merit_lab.models.loading import load_model, load_tokenizer
from merit_lab.pipeline import run_pipeline
from merit_lab.pipeline.rundir import load_run_mixture
from tests.conftest import write_jsonl

FACTS = [
    ("What is the capital of France?", "Paris."),
    ("What is 2 + 2?", "4."),
    ("What colour is the sky?", "Blue."),
    ("How many legs has a cat?", "Four."),
    ("What is the boiling point of water?", "100 degrees Celsius."),
    ("Who wrote Hamlet?", "William Shakespeare."),
    ("What is ice made of?", "Water."),
    ("Which planet is red?", "Mars."),
    ("What do bees make?", "Honey."),
    ("How many days has a week?", "Seven."),
    ("What is the opposite of hot?", "Cold."),
    ("Which animal barks?", "The dog."),
]
STYLE = "Answer like a pirate, in one long sentence."


def _dialogue(q: str, a: str, pirate: bool) -> dict:
    answer = f"Arr, matey, the answer be {a.lower()} Yo ho ho!" if pirate else a
    system = [{"role": "system", "content": STYLE}] if pirate else []
    return {
        "messages": [
            *system,
            {"role": "user", "content": q},
            {"role": "assistant", "content": answer},
        ]
    }


@pytest.fixture(scope="module")
def smollm2_run(smollm2_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smollm2")
    for name, pirate in (("plain", False), ("pirate", True)):
        write_jsonl(tmp / "data" / f"{name}.jsonl", [_dialogue(q, a, pirate) for q, a in FACTS])
    path = tmp / "smollm2.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "smoke",
                "model": "smollm2",
                "mixture": {"path": str(tmp / "data"), "eval_fraction": 0.2},
                "output_dir": str(tmp / "runs"),
                "calibration": {"n": 4, "micro_batch_size": 4, "max_length": 96},
                "partition": {"method": "balanced", "r": 1},
                "train": {"batch_size": 4, "lr": 5e-5, "max_length": 96, "save_steps": 50},
                "experiments": [{"name": "merit-1d", "merges": ["linear"]}],
                "eval": {"max_examples": 2, "max_new_tokens": 6},
            }
        )
    )
    cfg = load_config(path)
    torch.manual_seed(0)
    run = run_pipeline(
        cfg, ["mixture", "gradients", "conflict", "partition", "train", "merge", "evaluate"]
    )
    return cfg, run


def _exact_gradient(model, tok, examples) -> torch.Tensor:
    model.zero_grad()
    batch = collate(tokenize_examples(tok, examples, 96), tok.pad_token_id)
    response_token_loss(model, batch).backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    return grad


@pytest.mark.slow  # the slow tier: a 135M model through every stage
def test_sketched_cosine_matches_exact_gradients(smollm2_run, smollm2_dir):
    cfg, run = smollm2_run
    bank = run.load_bank()
    assert bank.names == ("pirate", "plain") and bank.info["n_parameters"] == 134_515_008
    sketched = float(run.load_space().cosine[0, 1])
    tok, model = load_tokenizer(smollm2_dir), load_model(smollm2_dir, device="cpu")
    mixture = load_run_mixture(cfg)
    g = [_exact_gradient(model, tok, mixture[s].calibration[:4]) for s in bank.names]
    exact = float(torch.nn.functional.cosine_similarity(g[0], g[1], dim=0))
    assert abs(sketched - exact) < 0.02, (sketched, exact)


@pytest.mark.slow  # the slow tier: a 135M model through every stage
def test_branches_merge_to_their_token_weighted_average(smollm2_run):
    _, run = smollm2_run
    finals = [run.branch_dir("merit-1d", k) / "final" for k in (0, 1)]
    tokens = [read_json(f / "merit_branch.json")["response_tokens"] for f in finals]
    assert all(read_json(f / "merit_branch.json")["steps"] == 3 for f in finals)  # 10 ex / 4
    merged = load_file(run.merged_dir("merit-1d") / "model.safetensors")
    branch = [load_file(f / "model.safetensors") for f in finals]
    w = torch.tensor(tokens, dtype=torch.float64) / sum(tokens)
    for name in ("model.norm.weight", "model.layers.29.mlp.down_proj.weight"):
        expected = w[0] * branch[0][name].double() + w[1] * branch[1][name].double()
        torch.testing.assert_close(merged[name].double(), expected, atol=1e-6, rtol=0)
    assert not torch.equal(branch[0]["model.norm.weight"], branch[1]["model.norm.weight"])


@pytest.mark.slow  # the slow tier: a 135M model through every stage
def test_evaluation_scores_theta0_and_the_merge(smollm2_run):
    _, run = smollm2_run
    table = pd.read_parquet(run.eval)
    loss = table[table.metric == "loss"].set_index(["model", "source"])["value"]
    assert set(loss.index.get_level_values(0)) == {"theta0", "merit-1d"}
    assert loss.between(0.01, 20).all()
    assert Path(run.merged_dir("merit-1d") / "chat_template.jinja").is_file()


def test_the_fetched_folder_is_a_plain_checked_model(smollm2_dir):
    from merit_lab.models.fetch import FETCHABLE_MODELS, RECORD, fetch_model

    record = read_json(smollm2_dir / RECORD)
    assert record["gguf_sha256"] == FETCHABLE_MODELS["smollm2"].sha256
    assert record["check"]["answer"] == "The capital of France is Paris."
    config = read_json(smollm2_dir / "config.json")
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert "<|im_start|>assistant" in (smollm2_dir / "chat_template.jinja").read_text()
    before = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert fetch_model("smollm2") == smollm2_dir  # fetched: nothing is redone
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == before
