"""Hand curation holds in every stage: a drop, a down-weight and a move made through `EditSession`
run through the real pipeline (train → merge → evaluate → report → figures) at small sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from merit_lab.config.schema import load_config
from merit_lab.data.mixture import load_mixture
from merit_lab.io import read_json
from merit_lab.partition.plan import Partition
from merit_lab.partition.session import fraction_subset, subset_counts
from merit_lab.pipeline import (
    RunDir,
    load_edit_session,
    load_source_table,
    run_pipeline,
    run_summary,
)
from merit_lab.pipeline.experiments import evaluate_rows, merge_rows
from merit_lab.pipeline.figures import write_figures
from merit_lab.pipeline.rows import plan_specs
from merit_lab.pipeline.status import token_budget
from merit_lab.training.branch_log import MANIFEST
from tests.conftest import write_demo_slice

SOURCES = [
    "reverse-a-terse-lower",
    "reverse-a-verbose-upper",
    "shift-a-terse-upper",
    "shift-a-verbose-lower",
    "rotate-a-terse-lower",
    "rotate-a-verbose-upper",
]
N_TRAIN = 16


@pytest.fixture(scope="module")
def curated_run(tmp_path_factory) -> tuple[RunDir, dict]:
    """A six-source demo slice split in two, then edited: one source dropped, one down-weighted
    to 0.5, one moved; then trained, merged, evaluated and reported."""
    out = tmp_path_factory.mktemp("curated")
    data = out / "data"
    write_demo_slice(data, SOURCES, {"train": N_TRAIN, "calibration": 12, "eval": 3})
    cfg_path = out / "run.yaml"
    cfg_path.write_text(
        json.dumps(
            {
                "name": "curated",
                "mixture": str(data),
                "output_dir": str(out / "runs"),
                "calibration": {"n": 12, "micro_batch_size": 12},
                "partition": {"method": "balanced", "r": 1},
                "train": {"batch_size": 8, "lr": 3e-4, "save_steps": 50},
                "experiments": [
                    {"name": "joint-1ep", "kind": "joint", "epochs": 1},
                    {"name": "random-k2", "method": "random", "k": 2, "seed": 1},
                    {"name": "hand", "merges": ["linear", "uniform"]},
                ],
                "eval": {"max_examples": 3, "max_new_tokens": 8},
            }
        )
    )
    cfg = load_config(cfg_path)
    run = run_pipeline(cfg, until="partition")
    session = load_edit_session(run.root)
    part = session.partition
    big = max(range(part.k), key=lambda g: len(part.groups[g]))
    other = 1 - big
    dropped, moved = part.groups[big][0], part.groups[big][1]
    weighted = part.groups[other][0]
    session.drop(dropped)
    session.downweight(weighted, 0.5)
    session.move(moved, other)
    session.save()
    run_pipeline(cfg, ["train", "merge", "evaluate", "report"])
    facts = {
        "cfg": cfg,
        "dropped": dropped,
        "weighted": weighted,
        "moved": moved,
        "moved_to": other,
    }
    return run, facts


def _manifests(run: RunDir) -> dict[str, dict]:
    found = sorted(run.root.glob(f"joint/*/final/{MANIFEST}")) + sorted(
        run.root.glob(f"branches/*/*/final/{MANIFEST}")
    )
    return {str(p.parent.parent.relative_to(run.root)): read_json(p) for p in found}


def test_dropped_source_is_in_no_rows_training_data(curated_run):
    run, f = curated_run
    manifests = _manifests(run)
    assert len(manifests) == 1 + 2 + 2  # joint, random-k2 × 2, hand × 2
    for name, m in manifests.items():
        assert f["dropped"] not in m["sources"], name
        assert f["dropped"] not in m["source_tokens"], name
    for specs in plan_specs(f["cfg"]).values():
        assert all(f["dropped"] not in s.sources for s in specs)
    evaluated = set(pd.read_parquet(run.eval)["source"])
    assert f["dropped"] not in evaluated
    assert len(evaluated) == len(SOURCES) - 1


def test_downweighted_source_trains_its_seeded_half_in_every_row(curated_run):
    run, f = curated_run
    cfg = f["cfg"]
    mix = load_mixture(cfg.mixture.path, calibration_n=12, seed=cfg.seed)
    keep = fraction_subset(f["weighted"], N_TRAIN, 0.5, cfg.seed)
    assert keep.size == N_TRAIN // 2
    tokens = [t["n_tokens"] for t in _token_counts(run, f["weighted"])]
    expected = int(sum(tokens[i] for i in keep))
    assert subset_counts(f["weighted"], tokens, 0.5, cfg.seed) == (N_TRAIN // 2, expected)
    assert len(mix[f["weighted"]].train) == N_TRAIN
    trained = [
        m["source_tokens"][f["weighted"]]
        for m in _manifests(run).values()
        if f["weighted"] in m["source_tokens"]
    ]
    assert trained == [expected] * 3  # joint, one random branch, one hand branch


def _token_counts(run: RunDir, source: str) -> list[dict]:
    (s,) = [s for s in run.read_mixture()["sources"] if s["name"] == source]
    return [{"n_tokens": n} for n in s["train_example_tokens"]]


def test_token_budgets_are_equal_across_rows(curated_run):
    run, f = curated_run
    budget = token_budget(f["cfg"]).set_index("model")["tokens"]
    assert budget.nunique() == 1, budget.to_dict()
    part = run.load_partition()
    assert budget.iloc[0] == sum(part.tokens.values())


def test_merge_weights_are_the_trained_token_shares(curated_run):
    run, f = curated_run
    part = run.load_partition("hand")
    assert f["moved"] in part.groups[f["moved_to"]]
    tokens = [
        read_json(run.branch_dir("hand", k) / "final" / MANIFEST)["response_tokens"]
        for k in range(part.k)
    ]
    assert tokens == list(part.group_tokens)  # what the gain predicted is what trained
    manifest = read_json(run.merged_dir("hand") / "merge_manifest.json")
    assert manifest["weights"] == pytest.approx([n / sum(tokens) for n in tokens], abs=1e-12)
    assert manifest["weights"] == pytest.approx(list(part.weights), abs=1e-12)
    for label in ("random-k2",):
        p = run.load_partition(label)
        assert f["dropped"] not in p.sources and p.fractions == {f["weighted"]: 0.5}


def test_report_and_figures_build_on_the_curated_run(curated_run, tmp_path):
    run, f = curated_run
    text = run.report.read_text()
    assert "Curated mixture" in text
    assert f["dropped"] in text and f["weighted"] in text
    table = load_source_table(run.root)
    assert table.loc[f["dropped"], "group"] == "dropped"
    assert table.loc[f["weighted"], "fraction"] == 0.5
    written = write_figures(run.root, tmp_path / "figs", formats=["html"])
    stems = {Path(p).stem for p in written}
    assert {"conflict_scatter", "compare_loss", "training"} <= stems


def test_summary_states_the_curation(curated_run):
    run, f = curated_run
    text = run_summary(run.root)
    assert "curation: 3 hand edits" in text
    assert f"dropped: {f['dropped']}" in text and f"down-weighted: {f['weighted']} 0.5" in text


def test_an_unplaced_source_stops_training_before_any_work(curated_run, tmp_path):
    """A source added to the mixture after a hand edit must be placed or dropped first."""
    run, f = curated_run
    part = run.load_partition()
    unplaced = part.drop(f["moved"])  # as if f["moved"] were a new source nobody placed
    doc = unplaced.to_dict()
    doc["dropped"] = [s for s in doc["dropped"] if s != f["moved"]]
    saved = run.partition.read_text()
    try:
        Partition.from_dict(doc).save(run.partition)
        with pytest.raises(ValueError, match=f"{f['moved']}.*in no group and not dropped"):
            plan_specs(f["cfg"])
    finally:
        run.partition.write_text(saved)


def test_rundir_keys_say_every_artifact_is_current(curated_run):
    """A re-run of merge and evaluate does no work: RunDir reads each artifact's stored key."""
    run, f = curated_run
    manifest = read_json(run.merged_dir("hand") / "merge_manifest.json")
    assert run.stored_key("merged", "hand") == manifest["merit_key"]
    assert not run.is_current("merged", "another key", "hand")
    cached = pd.read_parquet(run.eval_cache("hand"))
    assert run.stored_key("eval", "hand") == cached["key"].iloc[0]
    assert run.stored_key("conflict") == run.stored_key("gradients") is not None
    assert all(m["seconds"] == 0.0 for m in merge_rows(f["cfg"]))
    assert evaluate_rows(f["cfg"], progress=False).attrs["evaluated"] == []
