"""Exports: the JSONL manifest is the examples a real branch spec trains; trl / open-instruct files
read back as those examples."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import pytest
import yaml

from merit_lab.data.formatting import tokenize_example
from merit_lab.models.loading import build_pico_llama, load_tokenizer
from merit_lab.training.exports import (
    branch_manifest,
    example_hash,
    export_branches,
    load_spec_mixture,
    trained_indices,
)
from merit_lab.training.spec import BranchSpec
from merit_lab.training.trainer import train_branch
from tests.conftest import write_jsonl

# trl 1.16 `trl.scripts.utils.DatasetConfig` fields (read from the wheel's source); the exported
# `datasets:` entries use only these, and `DatasetMixtureConfig` adds streaming/test_split_size.
TRL_DATASET_FIELDS = {"path", "name", "data_dir", "data_files", "split", "columns", "fraction"}
MAX_LENGTH = 22  # the demo tokenizer is char-level: answers over ~10 chars are too long


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[Path, Path]:
    """The demo tokenizer and a pico Llama in ``base``, and 3 sources of 30 examples whose
    answers grow in length, so some are over `MAX_LENGTH` tokens and the ``skip`` policy leaves
    them out."""
    from merit_lab.demo.base import build_demo_tokenizer

    root = tmp_path_factory.mktemp("export_assets")
    tok = build_demo_tokenizer()
    tok.save_pretrained(root / "base")
    build_pico_llama(vocab_size=len(tok)).save_pretrained(root / "base")
    for name in ("add", "max", "rep"):
        rows = [
            {"prompt": f"{name} {a}", "response": "x" * (a % 17) + str(a), "id": f"{name}{a}"}
            for a in range(30)
        ]
        write_jsonl(root / "mix" / f"{name}.jsonl", rows)
    return root / "base", root / "mix"


def make_spec(assets, name: str, sources, **kw) -> BranchSpec:
    base, mix = assets
    return BranchSpec.from_dict(
        dict(
            name=name,
            base_model=str(base),
            output_dir=str(mix.parent / name),
            sources=tuple(sources),
            mixture={"path": str(mix), "eval_fraction": 0.1, "seed": 3, "calibration_n": 4},
            max_length=MAX_LENGTH,
            long_examples="skip",
            device="cpu",
            **kw,
        )
    )


def test_manifest_is_the_examples_a_branch_trains(assets, monkeypatch, one_thread):
    import merit_lab.training.trainer as trainer

    spec = make_spec(
        assets,
        "g/0",
        ("add", "max"),
        epochs=1.5,
        seed=5,
        fractions={"add": 0.5},
        excluded={"max": ["max3", "max4"]},
        batch_size=8,
        save_steps=1000,
    )
    # what the Trainer receives: every batch its data loader hands to the collator, recorded
    fed: list[tuple[int, ...]] = []
    real = trainer.collate_with_nulls

    def spy(batch, pad_token_id):
        fed.extend(tuple(ex.input_ids) for ex in batch if ex is not trainer.NULL_EXAMPLE)
        return real(batch, pad_token_id)

    monkeypatch.setattr(trainer, "collate_with_nulls", spy)
    train_branch(spec)
    tok = load_tokenizer(assets[0])
    mixture = load_spec_mixture(spec)
    rows = branch_manifest("g/0", spec, mixture, tok)
    trained = Counter(fed)  # example → times the Trainer saw it
    listed: Counter = Counter()
    for r in rows:
        ex = mixture[r.source].train[r.index]
        assert r.sha256 == example_hash(ex) and r.id == ex["id"]
        ids = tuple(tokenize_example(tok, ex, MAX_LENGTH, "skip").input_ids)
        assert trained[ids] == r.passes, r  # 1 or 2: epochs 1.5
        listed[ids] += r.passes
    assert listed == trained and sum(trained.values()) == len(fed)  # nothing else was fed
    assert {r.passes for r in rows} == {1, 2}
    kept_max = {r.index for r in rows if r.source == "max"}
    assert len(kept_max) < len(mixture["max"].train) - 2  # the skip policy left some out too
    assert not {"max3", "max4"} & {r.id for r in rows}
    fit = [
        tokenize_example(tok, ex, MAX_LENGTH, "skip").overflow != "skipped"
        for ex in mixture["add"].train
    ]
    assert {"max3", "max4"} <= {ex["id"] for ex in mixture["max"].train}  # excluded: not moot
    assert len({r.index for r in rows if r.source == "add"}) == round(0.5 * sum(fit)) < len(fit)


def test_export_writes_the_curated_mixture(assets, tmp_path):
    fr = {"add": 0.5}
    specs = {
        "merit/0": make_spec(assets, "merit/0", ("add",), fractions=fr),
        "merit/1": make_spec(assets, "merit/1", ("max", "rep")),
        "joint-1ep": make_spec(assets, "joint", ("add", "max", "rep"), fractions=fr),
    }  # "rep" could be dropped from all: then it is in no file
    written = export_branches(specs, tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in written}
    assert {
        "trl/merit_0.yaml",
        "trl/joint-1ep.yaml",
        "open-instruct/merit_1.yaml",
        "manifest.jsonl",
        "data/add.jsonl",
    } <= names
    tok = load_tokenizer(assets[0])
    mixture = load_spec_mixture(specs["joint-1ep"])
    idx = trained_indices(specs["joint-1ep"], mixture["add"], tok)

    trl = yaml.safe_load((tmp_path / "trl" / "joint-1ep.yaml").read_text())
    assert set(trl) == {"datasets", "streaming"}
    assert all(set(d) <= TRL_DATASET_FIELDS for d in trl["datasets"])
    first = trl["datasets"][0]
    # what trl's get_dataset does with an entry: datasets.load_dataset(path, data_files, split)
    ds = datasets.load_dataset(first["path"], data_files=first["data_files"], split=first["split"])
    assert ds["messages"] == [mixture["add"].train[i]["messages"] for i in idx]
    assert len(trl["datasets"]) == 3 and len(ds) == len(idx)

    oi = yaml.safe_load((tmp_path / "open-instruct" / "merit_1.yaml").read_text())
    assert oi["dataset_mixer_list"][1::2] == ["1.0", "1.0"]
    assert [Path(p).name for p in oi["dataset_mixer_list"][::2]] == ["max.jsonl", "rep.jsonl"]
    assert len(oi["dataset_mixer_list_splits"]) == len(oi["dataset_mixer_list"])
    assert list(oi["dataset_mixer"].values()) == [1.0, 1.0]

    manifest = [json.loads(ln) for ln in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    by_branch = Counter(r["branch"] for r in manifest)
    assert by_branch["merit/0"] == len(idx)
    assert by_branch["joint-1ep"] == by_branch["merit/0"] + by_branch["merit/1"]
    assert [r["index"] for r in manifest if r["branch"] == "merit/0"] == list(idx)


def test_export_refuses_bad_input(assets, tmp_path):
    spec = make_spec(assets, "a", ("add",))
    with pytest.raises(ValueError, match="unknown formats"):
        export_branches({"a": spec}, tmp_path, formats=("axolotl",))
    with pytest.raises(ValueError, match="no branch specs"):
        export_branches({}, tmp_path)
    other = make_spec(assets, "b", ("add",))
    other = BranchSpec.from_dict({**other.to_dict(), "mixture": {**other.mixture, "seed": 4}})
    with pytest.raises(ValueError, match="different mixtures"):
        export_branches({"a": spec, "b": other}, tmp_path)
    half = make_spec(assets, "c", ("add",), fractions={"add": 0.5})
    with pytest.raises(ValueError, match="another subset"):
        export_branches({"a": spec, "c": half}, tmp_path)
    assert not list(tmp_path.iterdir())  # refused before writing anything
