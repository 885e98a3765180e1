"""A model as a researcher brings it: a hub id (resolved once to its snapshot in the Hugging Face
cache, offline here), with its own modelling code (``trust_remote_code``), a tokenizer without a
pad token and without a chat template (the plain layout), through every stage: gradients,
branches, the linear / TIES / task-arithmetic merges (which need θ0), evaluation, greedy
answers, diagnostics and the report. And the chatterbot corpus loader on a wheel built here."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import huggingface_hub.constants
import pandas as pd
import pytest
import yaml

from merit_lab.cli import main
from merit_lab.config.schema import load_config
from merit_lab.data.corpora import dialogue_messages, write_chatterbot_mixture
from merit_lab.data.formatting import render_prompt
from merit_lab.data.mixture import load_mixture
from merit_lab.demo import DEMO_DIR
from merit_lab.io import read_json
from merit_lab.models.loading import _hub_snapshot, load_model, load_tokenizer, resolve_model_path
from merit_lab.pipeline import run_pipeline
from merit_lab.training.spec import BranchSpec
from tests.conftest import write_demo_slice

REPO, COMMIT = "merit-test/tiny-remote", "0123456789abcdef0123456789abcdef01234567"
SOURCES = ["reverse-a-terse-lower", "shift-a-verbose-upper"]
CONFIGURATION = """from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny-remote"
"""
MODELING = """from transformers import LlamaForCausalLM

from .configuration_tiny import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
"""


def _remote_snapshot(cache: Path) -> Path:
    """The demo base as hub repo REPO at COMMIT: its own model type and code, no pad token, no
    chat template."""
    repo = cache / f"models--{REPO.replace('/', '--')}"
    snap = repo / "snapshots" / COMMIT
    shutil.copytree(DEMO_DIR / "base", snap)
    (snap / "chat_template.jinja").unlink()
    (snap / "configuration_tiny.py").write_text(CONFIGURATION)
    (snap / "modeling_tiny.py").write_text(MODELING)
    config = json.loads((snap / "config.json").read_text())
    config.update(
        model_type="tiny-remote",
        architectures=["TinyRemoteForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_tiny.TinyRemoteConfig",
            "AutoModelForCausalLM": "modeling_tiny.TinyRemoteForCausalLM",
        },
    )
    config.pop("pad_token_id")
    (snap / "config.json").write_text(json.dumps(config))
    tok = json.loads((snap / "tokenizer_config.json").read_text())
    tok.pop("pad_token")
    (snap / "tokenizer_config.json").write_text(json.dumps(tok))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture(scope="module")
def offline_hub(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf-cache")
    snap = _remote_snapshot(cache)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        _hub_snapshot.cache_clear()
        yield snap
    _hub_snapshot.cache_clear()


def _config(tmp: Path, **over) -> Path:
    data = tmp / "data"
    if not data.exists():
        write_demo_slice(data, SOURCES, {"train": 8, "calibration": 4, "eval": 2})
    cfg = {
        "name": "byo",
        "model": REPO,
        "trust_remote_code": True,
        "mixture": str(data),
        "output_dir": str(tmp / "runs"),
        "calibration": {"n": 4, "micro_batch_size": 4},
        "partition": {"method": "balanced", "r": 1},
        "train": {"batch_size": 4, "lr": 1e-3, "save_steps": 50},
        "experiments": [
            {"name": "joint-1ep", "kind": "joint", "epochs": 1},
            {"name": "merit-1d", "merges": ["linear", "ties", "task_arithmetic"]},
        ],
        "eval": {"max_examples": 2, "max_new_tokens": 4},
        "diagnostics": {
            "experiments": ["merit-1d"],
            "max_examples": 1,
            "alphas": 3,
            "sigmas": [0.0, 0.01],
            "seeds": [0],
            "hessian_k": 1,
            "hessian_iter": 3,
            "curvature_examples": 1,
        },
        **over,
    }
    path = tmp / "byo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_hub_id_resolves_once_to_its_snapshot(offline_hub):
    assert resolve_model_path(REPO) == str(offline_hub)
    tok = load_tokenizer(REPO)
    assert tok.pad_token == tok.eos_token == "<|end|>"  # no pad token: EOS pads
    assert not tok.chat_template
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(REPO)
    assert type(load_model(REPO, trust_remote_code=True)).__name__ == "TinyRemoteForCausalLM"


def test_an_unresolvable_hub_id_is_one_line(offline_hub):
    with pytest.raises(
        FileNotFoundError, match="'nobody/nothing': not a local folder, and the hub"
    ):
        resolve_model_path("nobody/nothing")


def test_remote_code_without_trust_is_refused_before_any_work(offline_hub, tmp_path, capsys):
    path = _config(tmp_path, trust_remote_code=False)
    assert main(["run", str(path), "--until", "partition"]) == 2
    err = capsys.readouterr().err
    assert "ships its own code (auto_map" in err and "set trust_remote_code: true" in err
    assert not (tmp_path / "runs" / "byo" / "mixture.json").exists()


def test_every_stage_runs_on_a_hub_id_with_remote_code(offline_hub, tmp_path, one_thread):
    cfg = load_config(_config(tmp_path))
    run = run_pipeline(cfg)  # every stage, diagnostics and report included
    bank = read_json(run.bank_json)["info"]
    assert bank["model_source"] == {"given": REPO, "path": str(offline_hub), "revision": COMMIT}
    specs = sorted(run.root.glob("**/spec.json"))
    assert len(specs) == 3
    for spec in map(BranchSpec.load, specs):
        assert spec.base_model == str(offline_hub) and spec.trust_remote_code
    for method in ("", "+ties", "+task_arithmetic"):
        merged = run.merged_dir(f"merit-1d{method}")
        assert (merged / "modeling_tiny.py").is_file()  # the model's code goes with it
        assert type(load_model(merged, trust_remote_code=True)).__name__.startswith("TinyRemote")
    table = pd.read_parquet(run.eval)
    losses = table[table.metric == "loss"].groupby("model")["value"].mean()
    assert set(losses.index) == {
        "theta0",
        "joint-1ep",
        "merit-1d",
        "merit-1d+ties",
        "merit-1d+task_arithmetic",
    }
    assert losses.notna().all() and (losses > 0).all()
    assert (table.metric == "exact_match").any()
    assert sorted(p.stem for p in run.diagnostics.glob("*.json")) == [
        "curvature",
        "displacement",
        "gain",
        "paths",
        "perturbation",
    ]
    assert f"`{REPO}`" in run.report.read_text()
    # the plain layout: greedy prompts end where trained responses start
    tok = load_tokenizer(REPO, trust_remote_code=True)
    assert render_prompt(tok, [{"role": "user", "content": "ab"}]).endswith("### Assistant:\n")


def _write_wheel(path: Path) -> Path:
    files = {
        "english/ai.yml": {
            "categories": ["AI"],
            "conversations": [
                ["What is AI?", "Artificial intelligence."],
                ["What is AI?", "Artificial intelligence."],  # a duplicate: kept once
                ["Are you a robot?", "Yes.", "Do you sleep?", "No.", "Why?"],  # trailing question
                ["", "An empty question is left out."],
            ],
        },
        "english/food.yml": {
            "categories": ["food"],
            "conversations": [
                ["Do you eat?", "I run on electricity."],
                ["Favourite food?", "Bytes."],
            ],
        },
        "spanish/saludos.yml": {
            "categories": ["saludos"],
            "conversations": [
                ["Hola", "¡Hola! ¿Qué tal?"],
                ["Buenos días", "Buenos días."],
            ],
        },
    }
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(f"chatterbot_corpus/data/{name}", yaml.safe_dump(data, allow_unicode=True))
    return path


def test_dialogue_lines_alternate_user_and_assistant():
    assert dialogue_messages(["a", "b", "c"]) == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
    ]
    assert dialogue_messages(["a"]) is None and dialogue_messages(["a", ""]) is None
    assert dialogue_messages([1984, True])[1]["content"] == "True"  # YAML scalars become text


def test_chatterbot_sources_become_a_mixture_folder(tmp_path):
    wheel = _write_wheel(tmp_path / "chatterbot_corpus-1.3.3-py3-none-any.whl")
    out = write_chatterbot_mixture(
        tmp_path / "mix", ["english/ai", "spanish"], max_per_source=0, wheel=wheel
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "english-ai.jsonl",
        "sources.json",
        "spanish.jsonl",
    ]
    ai = [json.loads(line) for line in (out / "english-ai.jsonl").read_text().splitlines()]
    assert [len(r["messages"]) for r in ai] == [2, 4]
    assert ai[1]["messages"][-1] == {"role": "assistant", "content": "No."}
    meta = read_json(out / "sources.json")
    assert meta["sources"]["spanish"] == {"language": "spanish", "category": "all", "dialogues": 2}
    mix = load_mixture(out, calibration_n=1, eval_fraction=0.5)
    assert mix.names == ("english-ai", "spanish")
    assert mix["spanish"].metadata["language"] == "spanish"
    with pytest.raises(KeyError, match="'english/cooking' not in the corpus"):
        write_chatterbot_mixture(tmp_path / "bad", ["english/cooking"], wheel=wheel)
    assert not (tmp_path / "bad").exists()


def test_a_model_not_fetched_yet_names_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MERIT_LAB_CACHE", str(tmp_path / "empty-cache"))
    path = tmp_path / "c.yaml"
    path.write_text(f"model: smollm2\nmixture: demo\noutput_dir: {tmp_path}\n")
    assert main(["run", str(path), "--until", "partition"]) == 2
    err = capsys.readouterr().err
    assert "'smollm2' is not fetched yet: run `merit-lab fetch-model smollm2`" in err
    assert not any(tmp_path.glob("demo/*"))


def test_a_corpus_not_fetched_yet_names_the_command(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    missing = tmp_path / "data" / "chatterbot"
    path.write_text(f"mixture: {missing}\noutput_dir: {tmp_path}\n")
    assert main(["run", str(path), "--until", "partition"]) == 2
    err = capsys.readouterr().err
    assert f"run `merit-lab fetch-data chatterbot --out {missing}`" in err
