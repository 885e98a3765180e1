"""write_report on a synthetic finished run: sections in order, and the curated mixture."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from merit_lab.analysis.conflict import compute_conflict_space
from merit_lab.config.schema import RunConfig
from merit_lab.io import atomic_write_json
from merit_lab.partition.methods import split_balanced
from merit_lab.partition.plan import Partition
from merit_lab.pipeline.markdown import figure_link, markdown_table
from merit_lab.pipeline.report import (
    REPORT_SECTIONS,
    curated_mixture_table,
    edit_log_table,
    write_report,
)
from merit_lab.pipeline.rundir import load_source_table

NAMES = [f"{fam}-{i}" for fam in ("add", "sub") for i in range(4)]
EXAMPLES = {n: 10 + i for i, n in enumerate(NAMES)}
TOKENS = {n: 100 * (i + 1) for i, n in enumerate(NAMES)}
NEW = ("new-0", 5, 50)  # in mixture.json only: added after the partition was made


def _make_run(root: Path) -> Path:
    """conflict, mixture (8 sources + one unplaced), partition, eval, a log: no experiments."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=30)
    rows = np.stack([(1 if n.startswith("add") else -1) * a + rng.normal(size=30) for n in NAMES])
    space = compute_conflict_space(rows, NAMES)
    space.save(root / "conflict.json")
    sources = [
        {
            "name": n,
            "n_train": EXAMPLES[n],
            "train_tokens": TOKENS[n],
            "train_response_tokens": TOKENS[n],
            "metadata": {"family": n.split("-")[0]},
        }
        for n in NAMES
    ] + [
        {
            "name": NEW[0],
            "n_train": NEW[1],
            "train_tokens": NEW[2],
            "train_response_tokens": NEW[2],
            "metadata": {"family": "new"},
        }
    ]
    atomic_write_json(root / "mixture.json", {"sources": sources, "info": {}})
    split_balanced(space, EXAMPLES, TOKENS, r=1).save(root / "partition.json")
    RunConfig(name=root.name, output_dir=str(root.parent), experiments=()).save(
        root / "config.yaml"
    )
    recs = [
        {
            "model": m,
            "source": n,
            "family": n.split("-")[0],
            "split": split,
            "metric": metric,
            "value": v,
            "n": 4,
        }
        for m, v in (("theta0", 0.2), ("merit-1d", 0.5))
        for n in NAMES
        for split in ("eval", "train")
        for metric, v in (("loss", 2.0 - v), ("exact_match", v))
    ]
    pd.DataFrame(recs).to_parquet(root / "eval.parquet")
    log = root / "joint" / "ep1-s0" / "log.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text(
        "".join(json.dumps({"loss": 3 - s / 10, "tokens": 50 * s}) + "\n" for s in range(1, 6))
    )
    atomic_write_json(root / "timings.json", {"mixture": 1.0, "report": 0.5})
    return root


@pytest.fixture
def run_dir(tmp_path) -> Path:
    root = tmp_path / "run"
    root.mkdir()
    return _make_run(root)


def _section(text: str, heading: str) -> str:
    return text.split(heading, 1)[1].split("\n## ", 1)[0]


def test_report_sections_in_order_and_unedited_mixture(run_dir):
    assert list(REPORT_SECTIONS) == [
        "header",
        "long and small sources",
        "mixture overlaps",
        "curated mixture",
        "comparison",
        "seeds",
        "answer style",
        "controls",
        "train vs held-out",
        "lm-eval",
        "lmms-eval",
        "token budget",
        "diagnostics",
        "conflict space",
        "fold stability",
        "split stability",
        "layer-wise conflict",
        "conflict drift",
        "training",
        "timings",
        "footer",
    ]
    mix = json.loads((run_dir / "mixture.json").read_text())
    mix["sources"] = mix["sources"][:-1]  # an unplaced source is a curation too: remove it
    atomic_write_json(run_dir / "mixture.json", mix)
    text = write_report(run_dir).read_text()
    assert "## Curated mixture" not in text
    assert "The mixture is trained as loaded" in text
    headings = [ln for ln in text.splitlines() if ln.startswith("## ")]
    assert headings == [
        "## Exact match of greedy answers (%, higher is better)",
        "## Held-out loss (nats per response token, lower is better)",
        "## Train vs held-out loss (family average)",
        "## Conflict space",
        "## Split stability (calibration folds)",  # "not measured": the bank has no folds
        "## Training",
        "## Wall time per stage (last run that did the work)",
    ]
    assert "8 sources, 108 train examples, 3600 train response tokens" in text
    # 8 sources x 4 held-out examples, scored on two metrics: 32 examples, not 64 rows' worth
    assert "the same held-out examples: 32 per metric (8 sources)" in text
    for fig in ("compare_loss", "conflict_scatter", "training"):
        assert (run_dir / "figures" / f"{fig}.html").is_file() and f"figures/{fig}" in text


def test_report_shows_the_curated_mixture_beside_the_original(run_dir):
    part = Partition.load(run_dir / "partition.json").drop("add-1", who="ana")
    part = part.downweight("sub-2", 0.5, examples=8, tokens=350, who="ben")
    part.save(run_dir / "partition.json")
    text = write_report(run_dir).read_text()
    section = _section(text, "## Curated mixture")
    assert text.index("## Curated mixture") < text.index("## Exact match")
    table = {
        cells[0]: cells[1:]
        for ln in section.splitlines()
        if ln.startswith("| ") and (cells := [c.strip() for c in ln.strip("|").split("|")])
    }
    assert table["add-1"][0] == "dropped" and table["add-1"][1] == "dropped"
    assert table["add-1"][2:] == ["11", "200", "0", "0"]
    assert table["sub-2"][0] == "down-weighted to 0.5"
    assert table["sub-2"][2:] == ["16", "700", "8", "350"]
    assert table["new-0"][:2] == ["not placed: trains in no row", "unplaced"]
    assert table["new-0"][2:] == ["5", "50", "0", "0"]
    assert "add-0" not in table  # untouched sources are not listed
    # totals: 9 sources in mixture.json; 7 trained, add-1 gone and sub-2 at its subset
    assert (
        "- original mixture: 9 sources, 113 train examples, 3650 train response tokens" in section
    )
    ex = sum(EXAMPLES.values()) - EXAMPLES["add-1"] - EXAMPLES["sub-2"] + 8
    tok = sum(TOKENS.values()) - TOKENS["add-1"] - TOKENS["sub-2"] + 350
    assert (
        f"- curated (trained): 7 sources, {ex} train examples, {tok} train response tokens"
        in section
    )
    log = _section(text, "### Edit log")
    assert "| 1 | drop | add-1 | from G" in log and "| ana |" in log
    assert "| 2 | downweight | sub-2 | fraction 1 → 0.5 | ben |" in log


def test_curated_mixture_table_lists_moves_and_additions(run_dir):
    part = Partition.load(run_dir / "partition.json")
    moved = part.sources[0]
    src_group = part.group_of(moved)
    part = part.move(moved, 1 - src_group).add(NEW[0], 0, examples=NEW[1], tokens=NEW[2])
    table = curated_mixture_table(load_source_table(run_dir).drop(columns="group"), part)
    assert list(table.index) == [n for n in [*NAMES, NEW[0]] if n in (moved, NEW[0])]
    assert table.loc[moved, "change"] == f"moved G{src_group} → G{1 - src_group}"
    assert table.loc[NEW[0], "change"] == "added to G0"
    assert table.loc[NEW[0], "group"] == "G0"
    assert table.loc[NEW[0], ["trained examples", "trained tokens"]].tolist() == [5, 50]
    assert list(edit_log_table(part.edit_log)["op"]) == ["move", "add"]


def test_curated_mixture_table_accepts_a_resplit_in_the_log(run_dir):
    """A re-split (EditSession.split) logs an entry without a source: the table skips it."""
    part = Partition.load(run_dir / "partition.json")
    entry = {"op": "split", "method": "random", "params": {"k": 2}, "who": "x", "at": "t"}
    part = replace(part, edit_log=(*part.edit_log, entry)).drop(part.groups[0][0])
    table = curated_mixture_table(load_source_table(run_dir).drop(columns="group"), part)
    assert list(table.index) == [part.dropped[0]]
    log = edit_log_table(part.edit_log)
    assert list(log["op"]) == ["split", "drop"]
    assert log["detail"].iloc[0] == "re-split: random {'k': 2}"


def test_markdown_helpers(tmp_path):
    df = pd.DataFrame({"a": [1.0, 2.0], "b": ["x", "y"]}, index=pd.Index(["r1", "r2"], name="m"))
    assert markdown_table(df, fmt="{:.1f}", bold="max").splitlines() == [
        "| m | a | b |",
        "|---|---|---|",
        "| r1 | 1.0 | x |",
        "| r2 | **2.0** | y |",
    ]
    html = tmp_path / "figures" / "f.html"
    assert figure_link(html, tmp_path) == "[f (interactive HTML)](figures/f.html)"


def test_markdown_section_reads_one_section():
    from merit_lab.pipeline.markdown import markdown_section

    text = "# Run\n\nintro\n\n## Answer style\n\nrows\n### sub\nmore\n\n## Controls: x\n\nc\n"
    assert markdown_section(text, "Answer style") == "## Answer style\n\nrows\n### sub\nmore\n"
    assert markdown_section(text, "Controls") == "## Controls: x\n\nc\n"
    with pytest.raises(KeyError, match="sections: \\['Answer style', 'Controls: x'\\]"):
        markdown_section(text, "Timings")
