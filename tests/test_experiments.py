"""The full run on a small slice of the demo: train → merge → evaluate → report, resumable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from merit_lab.analysis.conflict import ConflictSpace
from merit_lab.config.schema import ExperimentConfig, load_config
from merit_lab.evaluation.evaluate import summarize_eval
from merit_lab.io import read_json
from merit_lab.partition.plan import Partition
from merit_lab.pipeline import RunDir, make_partition, run_pipeline
from merit_lab.pipeline.curation import experiment_partition
from merit_lab.pipeline.experiments import model_rows
from merit_lab.pipeline.status import token_budget
from tests.conftest import write_demo_slice

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    "reverse-a-terse-lower",
    "reverse-a-verbose-upper",
    "shift-a-terse-upper",
    "shift-a-verbose-lower",
]


@pytest.fixture(scope="module")
def slice_dir(tmp_path_factory) -> Path:
    """Four demo sources, 24 train / 20 calibration / 6 eval examples each, with metadata."""
    counts = {"train": 24, "calibration": 20, "eval": 6}
    return write_demo_slice(tmp_path_factory.mktemp("slice"), SOURCES, counts)


def _config(slice_dir: Path, out: Path, **over):
    base = {
        "name": "slice",
        "mixture": str(slice_dir),
        "output_dir": str(out),
        "calibration": {"n": 20, "micro_batch_size": 10},
        "partition": {"method": "balanced", "r": 1},
        "train": {"batch_size": 8, "lr": 1e-3, "save_steps": 2},
        "experiments": [
            {"name": "joint-1ep", "kind": "joint", "epochs": 1},
            {"name": "random-k2", "method": "random", "k": 2, "seed": 1},
            {"name": "merit-1d", "merges": ["linear", "ties"]},
            {"name": "soup", "kind": "soup", "epochs": 1, "seeds": [0, 1]},
        ],
        "eval": {"max_examples": 4, "max_new_tokens": 12, "splits": ["eval", "train"]},
    }
    for k, v in over.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) else v
    path = out / "cfg.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    import yaml

    path.write_text(yaml.safe_dump(base))
    return load_config(path)


@pytest.fixture(scope="module")
def full_run(slice_dir, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs")
    cfg = _config(slice_dir, out)
    run = run_pipeline(cfg)
    return cfg, run


def _report_table(text: str, title: str) -> pd.DataFrame:
    """Parse the markdown table that follows a '## <title>' heading."""
    block = text.split(f"## {title}", 1)[1].split("\n\n", 2)[1]
    rows = [[c.strip().strip("*") for c in ln.strip("|").split("|")] for ln in block.splitlines()]
    header, body = rows[0], rows[2:]
    df = pd.DataFrame(body, columns=header).set_index(header[0])
    return df.apply(pd.to_numeric, errors="coerce")


def test_report_numbers_come_from_eval_parquet(full_run):
    _, run = full_run
    table = pd.read_parquet(run.eval)
    text = run.report.read_text()
    for metric, title in [
        ("loss", "Held-out loss"),
        ("exact_match", "Exact match"),
        ("similarity", "Character similarity"),
    ]:
        got = _report_table(text, title)
        want = summarize_eval(table, metric=metric)
        want = want.loc[got.index, got.columns]
        digits = 4 if metric == "loss" else 1
        np.testing.assert_allclose(got.to_numpy(), want.to_numpy().round(digits), atol=1e-9)
    assert list(got.index) == [
        "theta0",
        "joint-1ep",
        "random-k2",
        "merit-1d",
        "merit-1d+ties",
        "soup",
    ]
    results = read_json(run.results)  # what the README cites: the same numbers, unrounded
    assert results["models"] == list(got.index)
    for metric in ("loss", "exact_match", "similarity"):
        avg = summarize_eval(table, metric=metric)["avg"]
        assert results["metrics"][metric]["avg"] == pytest.approx(avg.to_dict(), abs=1e-12)
    assert results["held_out_examples_per_metric"] == int(
        table[(table["split"] == "eval") & (table["metric"] == "loss")]
        .groupby("model")["n"]
        .sum()
        .iloc[0]
    )
    for fig in ["compare_loss", "conflict_heatmap", "conflict_scatter", "training"]:
        assert (run.root / "figures" / f"{fig}.html").is_file()
        assert f"figures/{fig}" in text


def test_every_model_is_scored_on_the_same_heldout_examples(full_run):
    _, run = full_run
    table = pd.read_parquet(run.eval)
    keys = {
        m: sorted(map(tuple, g[["source", "split", "metric", "n"]].to_numpy().tolist()))
        for m, g in table.groupby("model")
    }
    first = next(iter(keys.values()))
    assert len(keys) == 6 and all(k == first for k in keys.values())
    assert set(table["split"]) == {"eval", "train"}
    assert (table.loc[table.split == "eval", "n"] == 4).all()


def test_merge_uses_token_weights_and_equals_independent_average(full_run):
    cfg, run = full_run
    part = Partition.load(run.root / "branches" / "merit-1d" / "partition.json")
    assert part.groups == Partition.load(run.partition).groups  # method: null = partition.json
    manifest = read_json(run.root / "merged" / "merit-1d" / "merge_manifest.json")
    # one epoch: trained tokens per branch = the partition's token counts (same max_length)
    assert manifest["branch_tokens"] == list(part.group_tokens)
    np.testing.assert_allclose(manifest["weights"], part.weights, rtol=1e-12)
    finals = [run.root / "branches" / "merit-1d" / str(k) / "final" for k in range(part.k)]
    states = [load_file(f / "model.safetensors") for f in finals]
    merged = load_file(run.root / "merged" / "merit-1d" / "model.safetensors")
    for key, value in merged.items():
        want = sum(w * s[key].double() for w, s in zip(part.weights, states, strict=True))
        torch.testing.assert_close(value.double(), want, rtol=1e-6, atol=1e-7)
    budget = token_budget(cfg).set_index("model")
    joint = budget.loc["joint-1ep", "tokens"]
    assert budget.loc["merit-1d", "tokens"] == joint == budget.loc["random-k2", "tokens"]
    assert joint == sum(s["train_response_tokens"] for s in read_json(run.mixture)["sources"])
    soup = read_json(run.root / "merged" / "soup" / "merge_manifest.json")
    assert soup["method"] == "uniform" and len(soup["inputs"]) == 2
    # the soup's seed-0 member is the joint-1ep model itself, trained once
    soup_dir, first = run.root / "merged" / "soup", soup["inputs"][0]["path"]  # relative to it
    assert (soup_dir / first).resolve() == (run.root / "joint" / "ep1-s0" / "final").resolve()


def test_branches_train_from_theta0_with_shared_settings(full_run):
    _, run = full_run
    found = sorted(run.root.glob("branches/*/*/final/merit_branch.json"))
    manifests = [read_json(p) for p in found]
    assert len(manifests) == 4
    assert len({m["base_fingerprint"] for m in manifests}) == 1
    specs = [m["spec"] for m in manifests]
    shared = {k for k in specs[0] if k not in ("name", "output_dir", "sources")}
    assert all({k: s[k] for k in shared} == {k: specs[0][k] for k in shared} for s in specs)
    srcs = [s for m in manifests if m["spec"]["name"].startswith("merit-1d") for s in m["sources"]]
    assert sorted(srcs) == SOURCES


def test_rerun_skips_every_stage_and_eval_change_reevaluates(full_run, slice_dir, tmp_path):
    cfg, run = full_run
    timings = read_json(run.timings)
    caches = {p: p.stat().st_mtime_ns for p in (run.root / "eval").glob("*.parquet")}
    finals = {p: p.stat().st_mtime_ns for p in run.root.glob("**/final/model.safetensors")}
    run_pipeline(cfg, [s for s in timings if s not in ("report", "tokens_per_s")])
    assert read_json(run.timings) == timings  # nothing did work again
    assert {p: p.stat().st_mtime_ns for p in caches} == caches
    assert {p: p.stat().st_mtime_ns for p in finals} == finals
    # the changed setting re-evaluates a copy: the module's run stays as the other tests read it
    shutil.copytree(run.root, tmp_path / run.root.name)
    run2 = run_pipeline(_config(slice_dir, tmp_path, eval={"max_examples": 3}), ["evaluate"])
    table = pd.read_parquet(run2.eval)
    assert (table.loc[table.split == "eval", "n"] == 3).all()
    assert (pd.read_parquet(run.eval).loc[lambda t: t.split == "eval", "n"] == 4).all()


def test_a_changed_partition_is_refused_once_branches_exist(full_run):
    cfg, run = full_run
    path = run.root / "branches" / "random-k2" / "partition.json"
    trained = Partition.load(path)
    same = experiment_partition(cfg, ExperimentConfig("random-k2", method="random", k=2, seed=1))
    assert same.groups == trained.groups
    seed = next(
        s
        for s in range(2, 50)
        if make_partition(
            ConflictSpace.load(run.conflict),
            trained.examples,
            trained.tokens,
            method="random",
            k=2,
            seed=s,
        ).groups
        != trained.groups
    )
    before = path.read_bytes()
    with pytest.raises(ValueError, match="different partition"):
        experiment_partition(cfg, ExperimentConfig("random-k2", method="random", k=2, seed=seed))
    assert path.read_bytes() == before


def test_interrupted_training_resumes_in_the_pipeline(slice_dir, tmp_path, one_thread):
    """A joint run killed after its step-2 checkpoint is resumed, not restarted, by a re-run."""
    from transformers import TrainerCallback

    from merit_lab.pipeline.rows import plan_specs
    from merit_lab.training.trainer import train_branch

    cfg = _config(
        slice_dir, tmp_path, experiments=[{"name": "joint-1ep", "kind": "joint", "epochs": 1}]
    )
    run_pipeline(cfg, ["mixture", "gradients", "conflict", "partition", "train"])
    joint = RunDir(cfg.run_dir).root / "joint" / "ep1-s0"
    done = load_file(joint / "final" / "model.safetensors")
    # Retrain, dying right after the step-2 checkpoint is written.
    shutil.rmtree(joint)

    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train_branch(plan_specs(cfg)["joint-1ep"][0], callbacks=[Crash()])
    assert (joint / "checkpoints" / "checkpoint-2").is_dir() and not (joint / "final").exists()
    lines = (joint / "log.jsonl").read_text().splitlines()
    run_pipeline(cfg, ["train"])
    after = (joint / "log.jsonl").read_text().splitlines()
    assert after[:2] == lines[:2] and len(after) > 2  # steps 1-2 kept: resumed, not restarted
    resumed = load_file(joint / "final" / "model.safetensors")
    for k in done:
        torch.testing.assert_close(resumed[k], done[k], rtol=1e-5, atol=1e-6)
    log = [json.loads(ln) for ln in (joint / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, len(log) + 1))


@pytest.mark.parametrize(
    "experiments, match",
    [
        ([{"name": "a", "kind": "joint"}, {"name": "a", "kind": "joint"}], "unique"),
        ([{"name": "theta0", "kind": "joint"}], "theta0"),
        ([{"name": "a", "kind": "ensemble"}], "kind must be"),
        ([{"name": "a", "method": "random"}], "give r or k"),
        ([{"name": "a", "kind": "soup", "seeds": [0]}], "two seeds"),
        ([{"name": "a", "kind": "joint", "lr": 1}], "unknown keys"),
    ],
)
def test_bad_experiments_are_refused(tmp_path, experiments, match):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"experiments": experiments}))
    with pytest.raises(ValueError, match=match):
        load_config(path)


def test_demo_configs_parse_and_list_the_table_rows():
    for name in ["demo.yaml", "demo-full.yaml"]:
        cfg = load_config(ROOT / "configs" / name)
        labels = [e.name for e in cfg.experiments]
        assert {"joint-1ep", "joint-2ep", "random-k4", "merit-1d", "merit-2d", "merit-3d"} <= set(
            labels
        ), name
    full = load_config(ROOT / "configs" / "demo-full.yaml")
    assert any(e.kind == "soup" for e in full.experiments)


def test_model_rows_cover_every_merge_method(full_run):
    cfg, _ = full_run
    rows = {r.label: r for r in model_rows(cfg)}
    assert rows["merit-1d+ties"].merge_method == "ties"
    assert rows["merit-1d+ties"].inputs == rows["merit-1d"].inputs
    assert rows["theta0"].kind == "theta0" and not rows["theta0"].inputs


# `pipeline.experiments._spec(cfg, "merit-1d/0", ["a", "b"], out, 2.0, 4, {"a": 0.5, "c": 0.2},
# {"b": ("x",), "c": ("y",)}).to_dict()` at commit 991a88b, for the config below: the fields it
# copied one by one from the config, which `branch_spec` now takes from the sections whole.
OLD_PLANNED_SPEC = {
    "name": "merit-1d/0",
    "sources": ["a", "b"],
    "mixture": {
        "path": "demo",
        "source_column": "source",
        "calibration_n": 8,
        "eval_fraction": 0.2,
        "seed": 2,
        "split": "train",
    },
    "epochs": 2.0,
    "lr": 0.001,
    "batch_size": 4,
    "grad_accum": 2,
    "warmup_ratio": 0.1,
    "lr_scheduler": "linear",
    "weight_decay": 0.01,
    "max_grad_norm": 0.5,
    "max_length": 96,
    "long_examples": "skip",
    "seed": 4,
    "device": "cpu",
    "dtype": "bfloat16",
    "save_steps": 7,
    "keep_checkpoints": False,
    "fractions": {"a": 0.5},
    "excluded": {"b": ["x"]},
    "trust_remote_code": True,
    "procs_per_branch": 2,
    "gradient_checkpointing": True,
    "lora_r": 8,
    "lora_alpha": 4,
    "lora_dropout": 0.05,
    "lora_target_modules": ["q_proj"],
    "lora_rslora": True,
}


def test_a_branch_spec_is_the_config_s_sections_and_keeps_the_old_layout(tmp_path):
    """Every setting away from its default, the run-level ones too (seeds, launcher, gpus...):
    the planned spec is what the hand copy made, so existing branches are the same branch."""
    import yaml

    from merit_lab.models.loading import resolve_model_path
    from merit_lab.pipeline.rows import branch_spec

    path = tmp_path / "c.yaml"
    train = {
        "lr": 1e-3,
        "batch_size": 4,
        "grad_accum": 2,
        "warmup_ratio": 0.1,
        "lr_scheduler": "linear",
        "weight_decay": 0.01,
        "max_grad_norm": 0.5,
        "max_length": 96,
        "seed": 1,
        "seeds": [4, 5],
        "save_steps": 7,
        "launcher": "local",
        "n_procs": 2,
        "gpus": [0],
        "procs_per_branch": 2,
        "gradient_checkpointing": True,
        "lora_r": 8,
        "lora_alpha": 4,
        "lora_dropout": 0.05,
        "lora_target_modules": ["q_proj"],
        "lora_rslora": True,
    }
    path.write_text(
        yaml.safe_dump(
            {
                "name": "cmp",
                "mixture": {"path": "demo", "long_examples": "skip", "eval_fraction": 0.2},
                "output_dir": str(tmp_path / "runs"),
                "seed": 2,
                "device": "cpu",
                "dtype": "bfloat16",
                "trust_remote_code": True,
                "calibration": {"n": 8},
                "train": train,
            }
        )
    )
    cfg = load_config(path)
    out = tmp_path / "runs" / "cmp" / "branches" / "merit-1d" / "0"
    fractions, excluded = {"a": 0.5, "c": 0.2}, {"b": ("x",), "c": ("y",)}
    spec = branch_spec(cfg, "merit-1d/0", ["a", "b"], out, 2.0, 4, fractions, excluded)
    assert spec.to_dict() == {
        **OLD_PLANNED_SPEC,
        "base_model": str(Path(resolve_model_path("demo")).resolve()),
        "output_dir": str(out.resolve()),
    }
    assert spec.train.seeds == () and spec.train.launcher == "sequential"  # the run's, not its


def test_every_experiment_kind_plans_its_branches_and_rows():
    from merit_lab.config.schema import EXPERIMENT_KINDS
    from merit_lab.pipeline.rows import ROW_KINDS

    assert sorted(ROW_KINDS) == sorted(EXPERIMENT_KINDS)


def test_the_diagnostics_section_is_passed_whole_to_run_diagnostics():
    """The runner calls ``run_diagnostics(run, **asdict(cfg.diagnostics))``: every field is one
    of its keywords, with the same default (an empty tuple: every experiment, every parameter)."""
    import dataclasses
    import inspect

    from merit_lab.config.schema import DiagnosticsConfig
    from merit_lab.pipeline.diagnose import run_diagnostics

    params = inspect.signature(run_diagnostics).parameters
    for f in dataclasses.fields(DiagnosticsConfig):
        assert f.name in params, f.name
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert params[f.name].default == (None if default == () else default), f.name
