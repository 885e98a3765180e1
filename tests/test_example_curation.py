"""Example-level curation holds in every later stage: examples dropped through `EditSession`
are absent from what every row trains, counted out of the merge weights, logged and undoable
(a real small run: partition → edit → plan → train)."""

from __future__ import annotations

import json

import pytest

from merit_lab.config.schema import load_config
from merit_lab.data.formatting import tokenize_examples
from merit_lab.data.mixture import load_mixture
from merit_lab.io import read_json
from merit_lab.models.loading import load_tokenizer, resolve_model_path
from merit_lab.partition.plan import Partition
from merit_lab.pipeline import RunDir, run_pipeline
from merit_lab.pipeline.examples import load_example_session
from merit_lab.pipeline.rows import plan_specs
from merit_lab.training.branch_log import MANIFEST
from tests.conftest import write_demo_slice

SOURCES = [
    "reverse-a-terse-lower",
    "shift-a-terse-upper",
    "rotate-a-verbose-upper",
    "reverse-a-verbose-upper",
]
N_TRAIN = 8


@pytest.fixture(scope="module")
def edited_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("example-curation")
    data = out / "data"
    write_demo_slice(data, SOURCES, {"train": N_TRAIN, "calibration": 6, "eval": 2})
    cfg_path = out / "run.yaml"
    cfg_path.write_text(
        json.dumps(
            {
                "name": "excurated",
                "mixture": str(data),
                "output_dir": str(out / "runs"),
                "calibration": {"n": 6, "micro_batch_size": 6},
                "partition": {"method": "balanced", "r": 1},
                "train": {"batch_size": 8, "lr": 3e-4, "save_steps": 50},
                "experiments": [
                    {"name": "joint-1ep", "kind": "joint", "epochs": 1},
                    {"name": "hand", "merges": ["linear"]},
                ],
            }
        )
    )
    cfg = load_config(cfg_path)
    run = run_pipeline(cfg, until="partition")
    session = load_example_session(run.root)
    source = session.partition.groups[0][0]
    ids = session.train_ids[source]
    drop = [ids[1], ids[4]]
    before = (session.partition.examples[source], session.partition.tokens[source])
    session.drop_examples(source, drop)
    after = (session.partition.examples[source], session.partition.tokens[source])
    session.undo()
    undone = (session.partition.examples[source], session.partition.tokens[source])
    session.drop_examples(source, drop)
    session.downweight(source, 0.5)  # the fraction is drawn from the examples left
    session.save()
    return cfg, run, session, source, drop, {"before": before, "after": after, "undone": undone}


def test_drop_counts_undo_and_log(edited_run):
    _cfg, run, session, source, drop, counts = edited_run
    tokens = dict(zip(session.train_ids[source], run.example_tokens()[source], strict=True))
    assert counts["before"] == (N_TRAIN, sum(tokens.values()))
    assert counts["after"] == (
        N_TRAIN - 2,
        sum(tokens.values()) - tokens[drop[0]] - tokens[drop[1]],
    )
    assert counts["undone"] == counts["before"]
    saved = Partition.load(run.partition)
    assert saved.excluded == {source: tuple(drop)}
    ops = [e["op"] for e in saved.edit_log]
    assert ops == ["drop_examples", "downweight"]  # the undone drop left no trace
    assert saved.edit_log[0]["ids"] == drop and saved.edit_log[0]["source"] == source
    assert saved.examples[source] == 3  # round(0.5 · 6) of the 6 examples left
    with pytest.raises(ValueError, match="not train examples"):
        session.drop_examples(source, ["no-such-id"])
    with pytest.raises(ValueError, match="already dropped"):
        session.partition.drop_examples(source, drop[:1], examples=1, tokens=1)


def test_every_row_leaves_the_dropped_examples_out(edited_run):
    cfg, run, _session, source, drop, _ = edited_run
    specs = [s for ss in plan_specs(cfg).values() for s in ss if source in s.sources]
    assert len(specs) == 2  # the joint run and the branch holding the source
    assert all(s.excluded == {source: drop} for s in specs)
    run_pipeline(cfg, ["train"])
    saved = Partition.load(run.partition)
    mixture = load_mixture(str(cfg.mixture.path), calibration_n=6, eval_fraction=0.1, seed=0)
    train = [ex for ex in mixture[source].train if ex["id"] not in drop]
    tok = load_tokenizer(resolve_model_path(cfg.model))
    assert len(tokenize_examples(tok, train, cfg.train.max_length)) == N_TRAIN - 2
    for spec in specs:
        manifest = read_json(RunDir(run.root).root / spec.output_dir / "final" / MANIFEST)
        # what trained is the partition's count: the 6 left, halved, tokens as weighted
        assert manifest["source_response_tokens"][source] == saved.tokens[source]
        assert manifest["spec"]["excluded"] == {source: drop}


def test_examples_and_stability_of_a_run(edited_run):
    from merit_lab.analysis.examples import ExampleSketches, pair_contributions
    from merit_lab.pipeline.examples import (
        compute_example_sketches,
        compute_split_stability,
        load_example_table,
        load_stability,
    )

    _cfg, run, _session, _source, _drop, _ = edited_run
    sk = compute_example_sketches(run.root, dim=512, progress=False)
    assert sk.n_examples == 4 * 6 and sk.rows.shape == (24, 512)
    # the bank row is the token-weighted mean of the example rows: its cosine is recovered
    space = run.load_space()
    a, b = space.names[0], space.names[1]
    assert pair_contributions(sk, a, b)["share"].sum() == pytest.approx(
        space.cosine[0, 1], abs=1e-5
    )
    assert list(sk.ids[:6]) == read_json(run.mixture)["sources"][0]["calibration_ids"]
    table = load_example_table(run.root)
    assert {"z0", "z1", "outlier", "text"} <= set(table.columns) and len(table) == 24
    again = compute_example_sketches(run.root, dim=512, progress=False)  # current: reused
    assert again.info["seconds"] == sk.info["seconds"]
    assert ExampleSketches.load(run.example_sketches).info["dim"] == 512

    stab = compute_split_stability(run.root, rs=(1,), n_boot=20)
    assert load_stability(run.root).ari[1].shape == (20,)
    # r = 1: the reference is the balanced split of the bank's space on the partition's counts;
    # here the hand edits changed those counts (response tokens), so it is recomputed by hand
    from merit_lab.partition.methods import split_balanced

    part = Partition.load(run.partition)
    space = run.load_space().select([s for s in run.load_space().names if s in part.sources])
    ref = split_balanced(space, dict(part.examples), dict(part.tokens), r=1)
    assert stab.info["partition_is_reference"] == (ref.groups == part.groups)
    assert stab.info["resketch_max_abs_error"] < 0.15  # 512 columns: ~1/√512 per cosine
    assert stab.info["recommended_n"]["threshold"] == 0.95


def test_cli_and_report_section(edited_run, capsys):
    from merit_lab.cli import main
    from merit_lab.pipeline.examples import compute_example_sketches, stability_section

    _cfg, run, *_ = edited_run
    compute_example_sketches(run.root, dim=512, progress=False)  # current after the test above
    main(["examples", str(run.root), "--dim", "512", "--boot", "10", "--rs", "1"])
    out = capsys.readouterr().out
    assert "24 examples" in out and "r = 1 (K = 2): ARI to the reported split" in out
    lines = stability_section(run.root)
    assert lines[0] == "## Split stability" and any(
        "Recommended calibration size" in x for x in lines
    )
