"""lmms-eval through the evaluate stage: two local tasks in lmms-eval's format (a YAML and a
utils.py each, over the image-text demo's held-out pictures) on the image-text demo base, offline;
the scores checked against greedy answers computed here with transformers alone. The config
checks (judged tasks refused without a judge, task names, judge key) run without lmms-eval."""

from __future__ import annotations

import json
import math
import os
import re
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from merit_lab.config.fields import judged_task, lmms_eval_problems
from merit_lab.config.schema import EvalConfig, load_config
from merit_lab.evaluation import lmms_eval as lmms
from merit_lab.evaluation.lmms_eval import (
    LMMS_EVAL_SPLIT,
    answer_requests,
    judge_environment,
    lmms_eval_task_problems,
    run_lmms_eval,
    summarize_lmms_eval,
)
from merit_lab.pipeline.report_lmms_eval import lmms_eval_lines, lmms_eval_record

DEMO_VL = Path(__file__).resolve().parents[1] / "data" / "demo-vl"
BASE = DEMO_VL / "base"
JUDGE = {"model": "fake-judge", "api_key_env": "MERIT_LMMS_TEST_KEY"}
SKIP = "lmms_eval is not installed: pip install 'merit-lab[paper]' (docs/guide/paper.md)"
# (task, demo sources and how many of their held-out examples): answers in several conventions,
# so that θ0 (which answers "Answer: green." style) gets some right and some wrong
TASKS = {
    "demo_vl_colour": [
        ("colour-verbose-lower", 2),
        ("colour-terse-lower", 2),
        ("colour-verbose-upper", 1),
    ],
    "demo_vl_count": [("count-verbose-upper", 3), ("count-terse-lower", 2)],
}
PAPER = [
    "seedbench",
    "mmbench_en_dev",
    "llava_in_the_wild",
    "mmvet",
    "textvqa_val",
    "ai2d",
    "mathvista_testmini_format",
    "mmmu_val",
]
GENERATION = {
    "demo_vl_colour": {"max_new_tokens": 24, "until": ["\n"]},
    "demo_vl_count": {"max_new_tokens": 20, "until": ["."]},  # cuts "Answer: four." at the dot
}
COMMON_UTILS = """import os

from PIL import Image

MODEL_VERSION = os.getenv("MODEL_VERSION", "")  # read at load, as lmms-eval's judged tasks do


def doc_to_visual(doc):
    with Image.open(doc["image"]) as im:
        return [im.convert("RGB")]


def doc_to_text(doc):
    return doc["question"]
"""
METRICS = {
    "demo_vl_colour": (
        """
def process_results(doc, results):
    return {
        "exact_match": float(results[0] == doc["answer"]),
        "judge_seen": float(MODEL_VERSION == "fake-judge"),
    }
""",
        [
            {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True},
            {"metric": "judge_seen", "aggregation": "mean", "higher_is_better": True},
        ],
    ),
    "demo_vl_count": (
        """
def process_results(doc, results):
    return {
        "word_match": float(doc["word"] in results[0].lower()),
        "exact_match": float(results[0] == doc["answer"]),
    }


def percent(items):
    return 100.0 * sum(items) / len(items)
""",
        [
            {"metric": "word_match", "aggregation": "!function utils.percent"},
            {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True},
        ],
    ),
}


def write_demo_tasks(root: Path) -> dict[str, list[dict]]:
    """The two tasks as lmms-eval task folders under ``root``: ``<task>/<task>.yaml``,
    ``utils.py`` (doc_to_visual, doc_to_text, process_results) and ``docs.jsonl``."""
    docs_of = {}
    for task, picks in TASKS.items():
        docs = []
        for source, k in picks:
            lines = (DEMO_VL / "eval" / f"{source}.jsonl").read_text().splitlines()[:k]
            for ex in map(json.loads, lines):
                user, answer = ex["messages"][0]["content"], ex["messages"][1]["content"]
                image = next(p["image"] for p in user if p["type"] == "image")
                question = next(p["text"] for p in user if p["type"] == "text")
                word = re.sub(r"^Answer: |\.$", "", answer).lower()
                docs.append(
                    {"image": str(DEMO_VL / image), "question": question, "answer": answer}
                    | {"word": word}
                )
        folder = root / task
        folder.mkdir(parents=True)
        (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        code, metric_list = METRICS[task]
        (folder / "utils.py").write_text(COMMON_UTILS + code)
        config = {
            "task": task,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(folder / "docs.jsonl")}},
            "test_split": "test",
            "output_type": "generate_until",
            "doc_to_visual": "!function utils.doc_to_visual",
            "doc_to_text": "!function utils.doc_to_text",
            "doc_to_target": "answer",
            "generation_kwargs": GENERATION[task],
            "process_results": "!function utils.process_results",
            "metric_list": metric_list,
        }
        text = yaml.safe_dump(config, sort_keys=False)
        (folder / f"{task}.yaml").write_text(re.sub(r"'(!function [\w.]+)'", r"\1", text))
        docs_of[task] = docs
    return docs_of


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
            raise OSError(f"test_lmms_eval: network access to {address} attempted")
        return real(self, address)

    mp.setattr(socket.socket, "connect", connect)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def vl_run(tmp_path_factory, offline):
    """A run over the image-text demo whose evaluate stage scores θ0 on the two local tasks,
    two prompts per generate call, with a (fake) judge configured."""
    pytest.importorskip("lmms_eval", reason=SKIP)
    from merit_lab.pipeline import run_pipeline
    from merit_lab.pipeline.experiments import evaluate_rows

    root = tmp_path_factory.mktemp("lmms_eval")
    docs = write_demo_tasks(root / "tasks")
    cfg = {
        "name": "vl",
        "mixture": str(DEMO_VL),
        "output_dir": str(root / "runs"),
        "model": str(BASE),
        "calibration": {"n": 8, "micro_batch_size": 8, "max_length": 128},
        "train": {"max_length": 128},
        "partition": {"r": 1},
        "experiments": [],
        "eval": {
            "max_examples": 1,
            "exact_match": False,
            "lmms_eval": {
                "tasks": list(TASKS),
                "include_path": str(root / "tasks"),
                "batch_size": 2,
                "judge": JUDGE,
            },
        },
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    mp = pytest.MonkeyPatch()
    mp.setenv(JUDGE["api_key_env"], "not-a-real-key")
    mp.delenv("MODEL_VERSION", raising=False)
    config = load_config(root / "cfg.yaml")
    run = run_pipeline(config, ["mixture"])
    table = evaluate_rows(config, progress=False)
    env_after = os.environ.get("MODEL_VERSION")
    mp.undo()
    return docs, run, table, env_after


def _reference_answer(model, tok, proc, doc: dict, gen: dict) -> str:
    """θ0's greedy answer to one document with transformers alone: the Qwen2-VL prompt written
    out, one pad token per merged patch, ``mm_token_type_ids`` as the Qwen2-VL processor makes
    them; cut at the task's ``until`` strings."""
    from PIL import Image

    with Image.open(doc["image"]) as im:
        pix = proc(images=[im.convert("RGB")], return_tensors="pt")
    pads = int(pix["image_grid_thw"][0].prod()) // proc.merge_size**2
    text = (
        f"<|im_start|>user\n<|vision_start|>{'<|image_pad|>' * pads}<|vision_end|>"
        f"{doc['question']}<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    types = (ids["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).long()
    with torch.no_grad():
        out = model.generate(
            **ids,
            mm_token_type_ids=types,
            pixel_values=pix["pixel_values"],
            image_grid_thw=pix["image_grid_thw"],
            max_new_tokens=gen["max_new_tokens"],
            do_sample=False,
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tok.pad_token_id,
        )
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    for stop in gen["until"]:
        answer = answer.split(stop)[0]
    return answer.strip()


@pytest.fixture(scope="module")
def reference(vl_run):
    """Each task's documents and θ0's greedy answers to them, computed here."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

    docs, *_ = vl_run
    tok, proc = AutoTokenizer.from_pretrained(BASE), AutoImageProcessor.from_pretrained(BASE)
    model = Qwen2VLForConditionalGeneration.from_pretrained(BASE, dtype=torch.float32).eval()
    return {
        task: [(d, _reference_answer(model, tok, proc, d, GENERATION[task])) for d in ds]
        for task, ds in docs.items()
    }


def _values(table: pd.DataFrame, task: str) -> pd.Series:
    rows = table[(table["split"] == LMMS_EVAL_SPLIT) & (table["source"] == task)]
    return rows.set_index("metric")["value"]


def test_scores_match_greedy_answers_computed_with_transformers(vl_run, reference):
    _, _, table, _ = vl_run
    colour = [float(a == d["answer"]) for d, a in reference["demo_vl_colour"]]
    words = [float(d["word"] in a.lower()) for d, a in reference["demo_vl_count"]]
    exact = [float(a == d["answer"]) for d, a in reference["demo_vl_count"]]
    print("colour", reference["demo_vl_colour"][0][1], colour, "count", words, exact)
    assert 0 < sum(colour) < len(colour)  # some right, some wrong: the scores say something
    got = _values(table, "demo_vl_colour")
    assert got["exact_match"] == pytest.approx(np.mean(colour), abs=1e-12)
    assert got["score"] == pytest.approx(100 * np.mean(colour), abs=1e-9)  # mean: × 100
    se = np.std(colour, ddof=1) / np.sqrt(len(colour))
    assert got["score_stderr"] == pytest.approx(100 * se, abs=1e-9)
    got = _values(table, "demo_vl_count")
    assert got["word_match"] == pytest.approx(100 * np.mean(words), abs=1e-9)  # utils.percent
    assert got["score"] == got["word_match"]  # a custom aggregation's value as it comes
    assert "score_stderr" not in got  # lmms-eval gives no stderr for a custom aggregation
    assert got["exact_match"] == 0.0  # cut at "." the answers never equal "Answer: FOUR."
    assert (table.loc[table["split"] == LMMS_EVAL_SPLIT, "n"] == 5).all()


def test_rows_land_in_eval_parquet_with_their_judge(vl_run):
    _, run, _, env_after = vl_run
    saved = pd.read_parquet(run.eval)
    rows = saved[saved["split"] == LMMS_EVAL_SPLIT]
    assert set(rows["source"]) == set(TASKS) and (rows["model"] == "theta0").all()
    assert (rows["kind"] == "theta0").all() and (saved["split"] == "eval").any()
    judges = {json.loads(j) == lmms.judge_record(JUDGE) for j in rows["judge"]}
    assert judges == {True}
    assert lmms.judge_record(JUDGE) == {
        "model": "fake-judge",
        "api_type": "openai",
        "api_base": "https://api.openai.com/v1",
    }
    assert saved.loc[saved["split"] != LMMS_EVAL_SPLIT, "judge"].isna().all()
    # the task module read MODEL_VERSION when lmms-eval loaded it; it is restored afterwards
    assert _values(saved, "demo_vl_colour")["judge_seen"] == 1.0
    assert env_after is None


def test_paper_table_report_section_and_results_record(vl_run):
    _, _, table, _ = vl_run
    values, stderr = summarize_lmms_eval(table, order=["theta0"])
    assert list(values.columns) == ["demo_vl_colour", "demo_vl_count", "average"]
    colour, count = (
        _values(table, "demo_vl_colour")["score"],
        _values(table, "demo_vl_count")["score"],
    )
    assert values.loc["theta0", "average"] == pytest.approx((colour + count) / 2)
    assert math.isnan(stderr.loc["theta0", "average"])
    links = []
    lines = lmms_eval_lines(table, ["theta0"], lambda fig, stem: links.append((fig, stem)) or stem)
    assert any(f"{colour:.1f} ±" in ln and f"{(colour + count) / 2:.1f}" in ln for ln in lines)
    assert any("`demo_vl_count`" in ln and "5 documents, no judge" in ln for ln in lines)
    assert links[0][1] == "compare_lmms_eval"
    record = lmms_eval_record(table, ["theta0"])["lmms_eval"]
    assert record["scores"]["theta0"]["average"] == pytest.approx((colour + count) / 2)
    assert record["benchmarks"]["demo_vl_colour"]["n"] == 5
    assert lmms_eval_lines(table[table["split"] != LMMS_EVAL_SPLIT], ["theta0"], None) == []


def test_paper_table_marks_a_missing_benchmark_and_names_the_judge():
    """MathVista's aggregation returns None at 0 correct: its score is NaN, the average too."""
    judge = json.dumps(lmms.judge_record({"model": "gpt-4o-2024-11-20"}), sort_keys=True)
    rows = [
        ("theta0", "ai2d", "score", 40.0, ""),
        ("theta0", "mathvista_testmini_format", "score", math.nan, judge),
        ("merit-2d", "ai2d", "score", 50.0, ""),
        ("merit-2d", "mathvista_testmini_format", "score", 30.0, judge),
    ]
    table = pd.DataFrame(
        [
            {"model": m, "source": s, "family": "lmms-eval", "split": LMMS_EVAL_SPLIT}
            | {"metric": k, "value": v, "n": 10, "judge": j}
            for m, s, k, v, j in rows
        ]
    )
    values, _ = summarize_lmms_eval(table, order=["merit-2d", "theta0"])
    assert list(values.columns) == ["AI2D", "MathVista", "average"]
    assert values.loc["merit-2d", "average"] == 40.0 and math.isnan(values.loc["theta0", "average"])
    lines = lmms_eval_lines(table, ["theta0", "merit-2d"], lambda fig, stem: stem)
    assert any("| – |" in ln or "| – " in ln for ln in lines)
    assert any(
        "judge `gpt-4o-2024-11-20` (openai, https://api.openai.com/v1)" in ln for ln in lines
    )


class _Request:
    def __init__(self, *args):
        self.args = args


def test_answer_requests_groups_by_generation_settings_and_cuts_at_until():
    """The harness model's answers without lmms-eval: requests in the shape lmms-eval builds."""
    from PIL import Image

    from merit_lab.evaluation.evaluate import generate_answers
    from merit_lab.models.loading import load_model, load_tokenizer

    model, tok = load_model(BASE, device="cpu"), load_tokenizer(BASE)
    pictures = sorted((DEMO_VL / "images" / "colour").glob("eval-00[0-3].png"))
    docs = {("t", "test", i): p for i, p in enumerate(pictures)}

    def visual(path):
        with Image.open(path) as im:
            return [im.convert("RGB")]

    long, short = {"max_new_tokens": 24, "until": ["\n"]}, {"max_new_tokens": 9}
    reqs = [
        ("<image>What colour is the shape?", dict(g), visual, i, "t", "test")
        for i, g in enumerate([long, short, long, {**short, "until": " "}])
    ]
    got = answer_requests(model, tok, reqs, lambda *k: docs[k], batch_size=3)
    examples = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": visual(p)[0]},
                        {"type": "text", "text": "What colour is the shape?"},
                    ],
                },
                {"role": "assistant", "content": ""},
            ]
        }
        for p in pictures
    ]
    full = [a.text for a in generate_answers(model, tok, examples, max_new_tokens=24)]
    nine = [a.text for a in generate_answers(model, tok, examples, max_new_tokens=9)]
    assert got == [full[0], nine[1], full[2], nine[3].split(" ")[0]]
    assert got[3] == "Answer:" and len(nine[1]) <= 9
    capped = answer_requests(model, tok, reqs[:1], lambda *k: docs[k], max_new_tokens=3)
    assert capped == [full[0][:3]]  # one character per token: the cap holds
    with pytest.raises(ValueError, match="only image inputs"):
        answer_requests(
            model, tok, [(*reqs[0][:2], lambda d: ["v.mp4"], 0, "t", "test")], lambda *k: None
        )


def test_judged_tasks_are_refused_at_config_load_without_a_judge(tmp_path):
    cfg = {"name": "p", "mixture": str(DEMO_VL), "model": str(BASE), "output_dir": str(tmp_path)}
    paper = PAPER
    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump(cfg | {"eval": {"lmms_eval": {"tasks": paper}}})
    )
    with pytest.raises(ValueError) as err:
        load_config(tmp_path / "c.yaml")
    refused = re.findall(r"'(\w+)' is scored by an LLM judge", str(err.value))
    assert refused == ["mmbench_en_dev", "llava_in_the_wild", "mmvet", "mathvista_testmini_format"]
    assert "mmbench_en_dev_static parses without a judge" in str(err.value)
    static = [t if t != "mmbench_en_dev" else "mmbench_en_dev_static" for t in paper]
    assert [t for t in static if judged_task(t)] == refused[1:]
    judged = {"tasks": paper, "judge": {"model": "gpt-4o-2024-11-20"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg | {"eval": {"lmms_eval": judged}}))
    assert load_config(tmp_path / "c.yaml").eval.lmms_eval["judge"]["model"] == "gpt-4o-2024-11-20"


def test_bad_lmms_eval_options_and_judges_are_refused():
    assert lmms_eval_problems(None) == []
    problems = lmms_eval_problems({"tasks": ["ai2d", "ai2d"], "limit": 0, "shots": 1})
    assert any("unknown keys ['shots']" in p for p in problems)
    assert any("named twice" in p for p in problems) and any("limit" in p for p in problems)
    bad = {"model": "", "api_type": "bedrock", "api_key_env": "sk-123", "api_version": 3}
    problems = lmms_eval_problems({"tasks": ["mmvet"], "judge": bad})
    for key in ("judge.model", "judge.api_type", "judge.api_key_env", "judge.api_version"):
        assert any(key in p for p in problems), key
    assert lmms_eval_problems({"tasks": ["mmvet"], "judge": {"model": "m", "api_type": "azure"}})
    mixed = {"tasks": ["mmbench_en_dev", "mmvet"], "judge": {"model": "m", "api_base": "http://x"}}
    assert any("MMBench in a config of its own" in p for p in lmms_eval_problems(mixed))
    with pytest.raises(ValueError, match="lmms_eval.tasks"):
        EvalConfig(lmms_eval={"tasks": "ai2d"})


def test_task_names_and_judge_key_are_checked_before_any_work(tmp_path, monkeypatch):
    write_demo_tasks(tmp_path / "tasks")
    inc = str(tmp_path / "tasks")
    opts = {"tasks": ["demo_vl_colour", "demo_vl_cuont", "mmmu_val"], "include_path": inc}
    # without lmms-eval: the paper's benchmarks and the local task folders' names
    monkeypatch.setattr(lmms, "_installed", lambda: False)
    problems = lmms_eval_task_problems(opts, evaluate=False)
    assert len(problems) == 1 and "tasks[1]: 'demo_vl_cuont'" in problems[0]
    assert "did you mean: demo_vl_count" in problems[0]
    assert any("not installed" in p for p in lmms_eval_task_problems(opts, evaluate=True))
    missing = {"tasks": ["ai2d"], "include_path": str(tmp_path / "nope")}
    assert "not a folder" in lmms_eval_task_problems(missing, evaluate=False)[0]
    monkeypatch.delenv("MERIT_LMMS_TEST_KEY", raising=False)
    keyed = {"tasks": ["mmvet"], "judge": JUDGE}
    assert "$MERIT_LMMS_TEST_KEY is not set" in lmms_eval_task_problems(keyed, evaluate=True)[0]
    assert lmms_eval_task_problems(keyed, evaluate=False) == []
    with pytest.raises(ValueError, match="MERIT_LMMS_TEST_KEY"), judge_environment(JUDGE):
        pass


def test_judge_environment_sets_and_restores_the_variables(monkeypatch):
    monkeypatch.setenv("MERIT_LMMS_TEST_KEY", "k1")
    monkeypatch.setenv("MODEL_VERSION", "before")
    monkeypatch.delenv("OPENAI_API_URL", raising=False)
    with judge_environment(JUDGE | {"api_base": "http://judge:8000/v1"}):
        assert os.environ["MODEL_VERSION"] == "fake-judge" and os.environ["API_TYPE"] == "openai"
        assert os.environ["OPENAI_API_KEY"] == "k1"
        assert os.environ["OPENAI_API_URL"] == "http://judge:8000/v1"
    assert os.environ["MODEL_VERSION"] == "before" and "OPENAI_API_URL" not in os.environ


def test_installed_registry_resolves_names(tmp_path, offline):
    """With lmms-eval installed, names resolve through its TaskManager (the local folder alone
    when it holds every task); an unknown one is refused before the model loads."""
    pytest.importorskip("lmms_eval", reason=SKIP)
    write_demo_tasks(tmp_path / "tasks")
    inc = str(tmp_path / "tasks")
    assert lmms_eval_task_problems({"tasks": list(TASKS), "include_path": inc}, False) == []
    with pytest.raises(ValueError, match=r"no tasks \['nope'\]"):
        run_lmms_eval(Path("unused"), [*TASKS, "nope"], include_path=inc)
    paper = {"tasks": [*PAPER, "textvqa_vall"], "judge": JUDGE}
    problems = lmms_eval_task_problems(paper, evaluate=False)
    assert len(problems) == 1 and "did you mean: textvqa_val" in problems[0]
