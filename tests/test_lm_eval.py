"""lm-eval through the evaluate stage: local tasks (JSONL + task YAML) on the demo base, offline;
the multiple-choice accuracy checked against log-likelihoods computed here."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from merit_lab.config.schema import EvalConfig, load_config
from merit_lab.data.mixture import load_mixture
from merit_lab.evaluation.lm_eval import (
    LM_EVAL_SPLIT,
    lm_eval_problems,
    run_lm_eval,
    summarize_lm_eval,
    write_local_tasks,
)
from merit_lab.models.loading import load_model, load_tokenizer, resolve_model_path
from merit_lab.pipeline import run_pipeline
from merit_lab.pipeline.experiments import evaluate_rows
from merit_lab.pipeline.report_lm_eval import lm_eval_lines
from tests.conftest import write_demo_slice

pytest.importorskip("lm_eval")
SOURCES = ["reverse-a-terse-lower", "reverse-a-verbose-upper"]


@pytest.fixture(scope="module")
def offline():
    """No hub, and no network at all: a connection to an internet address raises."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config

    mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    real = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"test_lm_eval: network access to {address} attempted")
        return real(self, address)

    mp.setattr(socket.socket, "connect", connect)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, offline):
    """A run of two demo sources whose evaluate stage scores θ0 (the demo base) on a
    generate_until and a multiple_choice task built from their 6 held-out examples each."""
    root = tmp_path_factory.mktemp("lm_eval")
    data = write_demo_slice(root / "slice", SOURCES, {"train": 8, "calibration": 8, "eval": 6})
    mix = load_mixture(data, calibration_n=8)
    tasks = write_local_tasks({s: mix[s].eval for s in SOURCES}, root / "tasks")
    cfg = {
        "name": "t",
        "mixture": str(data),
        "output_dir": str(root / "runs"),
        "model": "demo",
        "calibration": {"n": 8},
        "partition": {"r": 1},
        "experiments": [],
        "eval": {
            "max_examples": 2,
            "max_new_tokens": 8,
            "lm_eval": {"tasks": tasks, "include_path": str(root / "tasks")},
        },
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    config = load_config(root / "cfg.yaml")
    run = run_pipeline(config, ["mixture"])
    table = evaluate_rows(config, progress=False)
    return root, run, table


def test_lm_eval_rows_land_in_eval_parquet(lm_run):
    _, run, _ = lm_run
    saved = pd.read_parquet(run.eval)
    lm = saved[saved["split"] == LM_EVAL_SPLIT]
    assert set(lm["source"]) == {"local_gen", "local_mc"}
    assert (lm["model"] == "theta0").all() and (lm["kind"] == "theta0").all()
    assert (lm["n"] == 12).all()  # 6 held-out examples of 2 sources, every one scored
    assert set(lm.loc[lm.source == "local_mc", "metric"]) == {
        "acc",
        "acc_stderr",
        "acc_norm",
        "acc_norm_stderr",
    }
    assert set(lm.loc[lm.source == "local_gen", "metric"]) == {"exact_match", "exact_match_stderr"}
    assert lm["value"].between(0, 1).all()
    assert (saved["split"] == "eval").any()  # the mixture's own rows are still there
    print(lm[["source", "metric", "value", "n"]].to_string())  # the numbers, for the record


def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) as lm-eval's HF backend forms it: the pair encoded whole
    without special tokens, the context's tokens cut off the front."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return float(sum(logp[i - 1, whole[i]] for i in range(n_ctx, len(whole))))


def test_multiple_choice_accuracy_matches_loglikelihoods_computed_here(lm_run):
    root, _, table = lm_run
    docs = [json.loads(ln) for ln in (root / "tasks" / "local_mc.jsonl").read_text().splitlines()]
    path = resolve_model_path("demo")
    model, tok = load_model(path, device="cpu", dtype="float32"), load_tokenizer(path)
    model.eval()
    hits, hits_norm = [], []
    for d in docs:
        ll = np.array([_loglikelihood(model, tok, d["prompt"], c) for c in d["choices"]])
        hits.append(int(ll.argmax()) == d["gold"])
        norm = ll / np.array([len(c.encode()) for c in d["choices"]])  # acc_norm: per byte
        hits_norm.append(int(norm.argmax()) == d["gold"])
    got = table[(table.split == LM_EVAL_SPLIT) & (table.source == "local_mc")]
    got = got.set_index("metric")["value"]
    assert got["acc"] == pytest.approx(np.mean(hits), abs=1e-12)
    assert got["acc_norm"] == pytest.approx(np.mean(hits_norm), abs=1e-12)
    assert got["acc_stderr"] == pytest.approx(np.std(hits, ddof=1) / np.sqrt(len(hits)))


def _greedy_answer(model, tok, prompt: str, max_new: int, stops: list[str]) -> str:
    """The generate task's answer as lm-eval forms it, one token at a time here: the prompt
    encoded as the tokenizer does by default, argmax tokens until the end token or ``max_new``,
    decoded without special tokens and cut at the first stop sequence."""
    ids = tok(prompt)["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        while len(new) < max_new:
            nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    text = tok.decode(new, skip_special_tokens=True)
    for stop in stops:
        text = text.split(stop)[0]
    return text


def test_generate_exact_match_matches_greedy_answers_computed_here(lm_run):
    root, _, table = lm_run
    docs = [json.loads(ln) for ln in (root / "tasks" / "local_gen.jsonl").read_text().splitlines()]
    task = yaml.safe_load((root / "tasks" / "local_gen.yaml").read_text())
    gen = task["generation_kwargs"]
    path = resolve_model_path("demo")
    model, tok = load_model(path, device="cpu", dtype="float32"), load_tokenizer(path)
    model.eval()
    stops = [*gen["until"], tok.eos_token]
    answers = [_greedy_answer(model, tok, d["prompt"], gen["max_gen_toks"], stops) for d in docs]
    hits = [a == d["answer"] for a, d in zip(answers, docs, strict=True)]
    got = table[(table.split == LM_EVAL_SPLIT) & (table.source == "local_gen")]
    got = got.set_index("metric")["value"]
    print(f"exact match {np.mean(hits):.4f} ({sum(hits)} of {len(hits)}); answers {answers[:3]}")
    assert got["exact_match"] == pytest.approx(np.mean(hits), abs=1e-12)
    assert got["exact_match_stderr"] == pytest.approx(np.std(hits, ddof=1) / np.sqrt(len(hits)))
    # θ0 answers none right (0 of 12), which a generator that never ran would score too. The same
    # task with the first 5 references replaced by the greedy answers found here: 5 of 12 exactly.
    folder = root / "tasks-known"
    folder.mkdir()
    known = [{**d, "answer": answers[i]} if i < 5 else d for i, d in enumerate(docs)]
    data = folder / "known_gen.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in known))
    task |= {"task": "known_gen", "dataset_kwargs": {"data_files": {"test": str(data)}}}
    (folder / "known_gen.yaml").write_text(yaml.safe_dump(task))
    rows = run_lm_eval(path, ["known_gen"], include_path=folder, model=model, tokenizer=tok)
    value = rows.set_index("metric")["value"]["exact_match"]
    assert sum(a == d["answer"] for a, d in zip(answers, known, strict=True)) == 5 + sum(hits[5:])
    assert value == pytest.approx((5 + sum(hits[5:])) / 12, abs=1e-12)


def test_report_section_and_summary(lm_run):
    _, _, table = lm_run
    values, stderr = summarize_lm_eval(table, order=["theta0"])
    assert list(values.columns) == ["local_gen exact_match", "local_mc acc", "local_mc acc_norm"]
    assert values.shape == stderr.shape == (1, 3)
    links = []
    lines = lm_eval_lines(table, ["theta0"], lambda fig, stem: links.append((fig, stem)) or stem)
    acc = values.loc["theta0", "local_mc acc"]
    assert any(f"{acc:.3f} ±" in ln for ln in lines)
    fig, stem = links[0]
    assert stem == "compare_lm_eval" and fig.data[0].error_y.array is not None
    assert lm_eval_lines(table[table.split != LM_EVAL_SPLIT], ["theta0"], None) == []


def test_bad_lm_eval_options_are_refused(tmp_path, offline):
    assert lm_eval_problems(None) == []
    problems = lm_eval_problems({"tasks": [], "limit": 0, "shots": 1})
    assert any("unknown keys ['shots']" in p for p in problems)
    assert any("tasks" in p for p in problems) and any("limit" in p for p in problems)
    with pytest.raises(ValueError, match="lm_eval.tasks"):
        EvalConfig(lm_eval={"tasks": "local_gen"})
    tasks = write_local_tasks(
        {
            "s": [
                {
                    "messages": [
                        {"role": "user", "content": f"q{i}"},
                        {"role": "assistant", "content": f"a{i}"},
                    ]
                }
                for i in range(4)
            ]
        },
        tmp_path,
    )
    assert tasks == ["local_gen", "local_mc"]
    with pytest.raises(ValueError, match=r"no tasks \['nope'\]"):
        run_lm_eval(Path("unused"), ["nope"], include_path=tmp_path)
    with pytest.raises(ValueError, match="not a folder"):
        run_lm_eval(Path("unused"), ["local_gen"], include_path=tmp_path / "missing")
