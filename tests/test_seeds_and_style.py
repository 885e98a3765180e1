"""Training seeds (every row repeated, mean and spread in the report) and the answer-style
metrics, on hand-worked cases and a small run of the real pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from merit_lab.config.schema import RunConfig, load_config
from merit_lab.evaluation.evaluate import relative_to, seed_spread, style_scores, summarize_eval
from merit_lab.io import read_json
from merit_lab.pipeline import run_pipeline
from merit_lab.pipeline.figures import collect_figures
from merit_lab.pipeline.report_seeds import noise_calls
from merit_lab.pipeline.rows import model_rows, plan_specs, seed_variants
from tests.conftest import write_demo_slice

SOURCES = [
    "reverse-a-terse-lower",
    "reverse-a-verbose-upper",
    "shift-a-terse-upper",
    "shift-a-verbose-lower",
]


# ------------------------------------------------------------------ hand-worked metrics
def test_style_scores_hand_worked():
    refs = ["abc", "Result: abc.", "abcdef", "xy"]
    answers = ["abc", "abc", "abcdefghijklm", "x"]
    # ratios 1, 3/12, 13/6, 1/2: in style (within 2x) are the first and the last
    got = style_scores(answers, refs)
    assert got["in_style"] == pytest.approx(0.5)
    assert got["length_ratio"] == pytest.approx(np.mean([1.0, 0.25, 13 / 6, 0.5]))
    assert np.isnan(style_scores([], [])["in_style"])


def test_relative_to_theta0():
    wide = pd.DataFrame(
        {"a": [50.0, 25.0, 0.0], "avg": [40.0, 60.0, 20.0]}, index=["theta0", "joint", "merit"]
    )
    rel = relative_to(wide)
    assert rel.loc["joint", "a"] == pytest.approx(50.0)
    assert rel.loc["merit", "avg"] == pytest.approx(50.0)
    assert rel.loc["theta0"].tolist() == [100.0, 100.0]
    with pytest.raises(ValueError, match="no 'base' row"):
        relative_to(wide, "base")


def test_seed_spread_and_noise_calls():
    wide = pd.DataFrame(
        {"avg": [1.0, 2.0, 4.0, 3.0, 3.2, 10.0]},
        index=["theta0", "joint", "joint@s1", "merit", "merit@s1", "far"],
    )
    bases = {"joint@s1": "joint", "merit@s1": "merit"}
    mean, std, n = seed_spread(wide, bases)
    assert list(mean.index) == ["theta0", "joint", "merit", "far"]
    assert mean.loc["joint", "avg"] == pytest.approx(3.0)
    assert std.loc["joint", "avg"] == pytest.approx(np.std([2.0, 4.0], ddof=1))
    assert n.to_dict() == {"theta0": 1, "joint": 2, "merit": 2, "far": 1}
    assert np.isnan(std.loc["theta0", "avg"])
    calls = {
        r: (d, v) for r, d, _s, v in noise_calls(mean["avg"], std["avg"], "joint", higher=True)
    }
    # merit: +0.1 against a pooled spread of hypot(1.414, 0.141) = 1.42: within it
    assert calls["merit"] == (pytest.approx(0.1), "within the spread")
    # far has one seed, so no spread of its own: the difference is still judged on joint's
    assert "theta0" not in calls and calls["far"][1] == "within the spread"
    std2 = std.fillna(0.0)
    calls2 = {r: v for r, _d, _s, v in noise_calls(mean["avg"], std2["avg"], "joint", higher=False)}
    assert calls2["far"] == "worse"  # +7 against 1.41, lower is better


def test_seeds_config_validation(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text(yaml.safe_dump({"train": {"seed": 1, "seeds": [1, 2]}}))
    with pytest.raises(ValueError, match=r"train\.seeds: must be distinct"):
        load_config(bad)
    bad.write_text(yaml.safe_dump({"train": {"seeds": [3, 3]}}))
    with pytest.raises(ValueError, match=r"train\.seeds"):
        load_config(bad)


def test_seed_variants_name_rows_and_leave_soups_alone():
    cfg = RunConfig.from_dict(
        {
            "train": {"seed": 0, "seeds": [4, 7]},
            "experiments": [
                {"name": "joint-1ep", "kind": "joint"},
                {"name": "merit-1d", "r": 1, "method": "balanced"},
                {"name": "soup", "kind": "soup", "seeds": [0, 4]},
            ],
        }
    )
    got = [(e.name, s, mark) for e, s, mark in seed_variants(cfg)]
    assert got == [
        ("joint-1ep", 0, ""),
        ("merit-1d", 0, ""),
        ("soup", 0, ""),
        ("joint-1ep@s4", 4, "@s4"),
        ("merit-1d@s4", 4, "@s4"),
        ("joint-1ep@s7", 7, "@s7"),
        ("merit-1d@s7", 7, "@s7"),
    ]


# ------------------------------------------------------------------ the real pipeline
@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory):
    torch.set_num_threads(1)
    slice_dir = write_demo_slice(
        tmp_path_factory.mktemp("slice"), SOURCES, {"train": 16, "calibration": 12, "eval": 4}
    )
    out = tmp_path_factory.mktemp("runs")
    cfg_dict = {
        "name": "seeded",
        "mixture": str(slice_dir),
        "output_dir": str(out),
        "calibration": {"n": 12, "micro_batch_size": 12},
        "partition": {"method": "balanced", "r": 1},
        "train": {"batch_size": 8, "lr": 1e-3, "save_steps": 2, "seeds": [1]},
        "experiments": [
            {"name": "joint-1ep", "kind": "joint", "epochs": 1},
            {"name": "merit-1d", "merges": ["linear", "ties"]},
            {"name": "soup", "kind": "soup", "epochs": 1, "seeds": [0, 1]},
        ],
        "eval": {"max_examples": 4, "max_new_tokens": 12},
    }
    path = out / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg_dict))
    cfg = load_config(path)
    stages = [
        "mixture",
        "gradients",
        "conflict",
        "partition",
        "train",
        "merge",
        "evaluate",
        "report",
    ]
    return cfg, run_pipeline(cfg, stages)


def test_seeds_train_their_own_branches(seeded_run):
    cfg, run = seeded_run
    specs = plan_specs(cfg)
    assert set(specs) == {"joint-1ep", "merit-1d", "soup", "joint-1ep@s1", "merit-1d@s1"}
    assert [s.train.seed for s in specs["merit-1d@s1"]] == [1, 1]
    assert [s.train.seed for s in specs["merit-1d"]] == [0, 0]
    # the seed-1 joint run is one folder, shared with the soup's second member
    assert specs["joint-1ep@s1"][0].output_dir == specs["soup"][1].output_dir
    labels = [r.label for r in model_rows(cfg)]
    assert labels == [
        "theta0",
        "joint-1ep",
        "merit-1d",
        "merit-1d+ties",
        "soup",
        "joint-1ep@s1",
        "merit-1d@s1",
        "merit-1d+ties@s1",
    ]
    a = run.root / "branches" / "merit-1d" / "0" / "final" / "model.safetensors"
    b = run.root / "branches" / "merit-1d@s1" / "0" / "final" / "model.safetensors"
    assert a.read_bytes() != b.read_bytes()  # another data order: other weights
    # both seeds of a split train the same partition
    pa = read_json(run.root / "branches" / "merit-1d" / "partition.json")["groups"]
    pb = read_json(run.root / "branches" / "merit-1d@s1" / "partition.json")["groups"]
    assert pa == pb


def test_report_gives_mean_and_spread(seeded_run):
    _cfg, run = seeded_run
    table = pd.read_parquet(run.root / "eval.parquet")
    assert {"in_style", "length_ratio"} <= set(table["metric"])
    results = json.loads((run.root / "results.json").read_text())
    # the comparison table keeps the config's own seed; the repeats feed the seeds record
    assert "merit-1d@s1" not in results["models"]
    loss = summarize_eval(table, metric="loss")["avg"]
    seeds = results["seeds"]["loss"]
    expect = np.mean([loss["merit-1d"], loss["merit-1d@s1"]])
    assert seeds["merit-1d"]["mean"] == pytest.approx(expect)
    assert seeds["merit-1d"]["std"] == pytest.approx(
        np.std([loss["merit-1d"], loss["merit-1d@s1"]], ddof=1)
    )
    assert seeds["merit-1d"]["seeds"] == 2 and seeds["soup"]["seeds"] == 1
    assert seeds["theta0"]["std"] is None
    report = (run.root / "report.md").read_text()
    assert "## Training seeds" in report and "## Answer style" in report
    assert "Against joint-1ep (average over families)" in report
    assert (run.root / "figures" / "seeds_loss.html").is_file()
    # `merit-lab figures`: the comparison bars of the config's seed, and the seed means
    figs = collect_figures(run.root)
    assert all("@s" not in t.name for t in figs["compare_loss"].data)
    bars = {t.name: t for t in figs["seeds_loss"].data}
    assert list(bars["merit-1d"].y)[-1] == pytest.approx(seeds["merit-1d"]["mean"])
    assert list(bars["merit-1d"].error_y.array)[-1] == pytest.approx(seeds["merit-1d"]["std"])


def test_theta0_style_is_measured_against_its_own_answers(seeded_run):
    _cfg, run = seeded_run
    table = pd.read_parquet(run.root / "eval.parquet")
    sub = table[(table["model"] == "theta0") & (table["metric"] == "in_style")]
    assert len(sub) == len(SOURCES) and sub["value"].between(0, 1).all()
    assert sub["n"].eq(4).all()


def test_rerun_skips_everything(seeded_run):
    cfg, run = seeded_run
    before = {p: p.stat().st_mtime_ns for p in Path(run.root).glob("eval/*.parquet")}
    run_pipeline(cfg, ["train", "merge", "evaluate"])
    after = {p: p.stat().st_mtime_ns for p in Path(run.root).glob("eval/*.parquet")}
    assert before == after
