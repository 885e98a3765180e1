"""One size unit per run: the split balances it, the merge weights count it, the curation sums it.

The unit is the train *response* tokens (`merit_lab.pipeline.rundir.SIZE_UNIT`): the tokens the
loss averages over. Checked end to end on a tiny run against counts made here independently.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from merit_lab.config.schema import load_config
from merit_lab.data.formatting import IGNORE_INDEX, tokenize_example
from merit_lab.data.mixture import load_mixture
from merit_lab.io import read_json
from merit_lab.models.loading import load_tokenizer, resolve_model_path
from merit_lab.partition.plan import Partition
from merit_lab.pipeline import load_source_table, run_pipeline
from merit_lab.pipeline.rundir import SIZE_UNIT, source_counts
from tests.conftest import write_demo_slice, write_tiny_run_config

SOURCES = [
    "initials-a-terse-lower",
    "initials-a-verbose-lower",
    "shift-b-terse-upper",
    "shift-b-verbose-upper",
]


def test_split_weights_and_merge_agree_in_response_tokens(tmp_path: Path):
    data = write_demo_slice(tmp_path / "mix", SOURCES, {"train": 12, "calibration": 8, "eval": 2})
    cfg = load_config(write_tiny_run_config(tmp_path / "cfg.yaml", data, tmp_path / "runs"))
    run = run_pipeline(cfg, until="merge")
    assert SIZE_UNIT == "response_tokens"

    # independent count: tokenise every train example and count its supervised labels
    tok = load_tokenizer(resolve_model_path("demo"))
    mix = load_mixture(data, calibration_n=cfg.calibration.n, seed=cfg.seed)
    counted = {
        s.name: sum(
            sum(
                1
                for t in tokenize_example(tok, ex, cfg.train.max_length).labels
                if t != IGNORE_INDEX
            )
            for ex in s.train
        )
        for s in mix
    }
    _, sizes = source_counts(run)
    assert sizes == counted
    assert load_source_table(run.root)["tokens"].to_dict() == counted

    part = Partition.load(run.partition)
    assert dict(part.tokens) == counted
    group = [sum(counted[s] for s in g) for g in part.groups]
    np.testing.assert_allclose(part.weights, np.array(group) / sum(group), rtol=0, atol=1e-15)

    # the merge reads each branch's trained response tokens: the same weights (one epoch)
    (merged,) = [p for p in (run.root / "merged").rglob("merge_manifest.json")]
    weights = read_json(merged)["weights"]
    np.testing.assert_allclose(weights, part.weights, rtol=0, atol=1e-12)
    branch = [
        read_json(p)["response_tokens"]
        for p in sorted(run.root.glob("branches/merit-1d/*/final/merit_branch.json"))
    ]
    assert sorted(branch) == sorted(group)
