"""A branch's spec: held from TrainConfig, saved under its envelope, and the spec.json files of
runs made before (no header, the flat layout of commit 991a88b) still load and still resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from merit_lab.config.schema import TrainConfig
from merit_lab.envelope import EnvelopeError
from merit_lab.io import read_json
from merit_lab.training.spec import (
    RUN_LEVEL_FIELDS,
    SPEC_FORMAT,
    SPEC_VERSION,
    BranchSpec,
    write_spec,
)

# A branch's spec.json as the code at commit 991a88b wrote it (`merit_lab.train.BranchSpec(...)
# .save()`, run from `git archive 991a88b`): no header; lora_r, fractions, excluded and the
# target modules away from their defaults, so they are written; the fields at their defaults
# (long_examples, procs_per_branch, distributed, ...) left out.
OLD_SPEC = """{
  "name": "merit-1d/0",
  "base_model": "/data/theta0",
  "output_dir": ".",
  "sources": ["add", "max"],
  "mixture": {"path": "/data/mix", "source_column": "source", "calibration_n": 4,
              "eval_fraction": 0.1, "seed": 0, "split": "train"},
  "epochs": 1.5,
  "lr": 0.01,
  "batch_size": 4,
  "grad_accum": 2,
  "warmup_ratio": 0.1,
  "lr_scheduler": "cosine",
  "weight_decay": 0.0,
  "max_grad_norm": 1.0,
  "max_length": 64,
  "seed": 3,
  "device": "cpu",
  "dtype": "float32",
  "save_steps": 4,
  "keep_checkpoints": false,
  "fractions": {"max": 0.5},
  "excluded": {"add": ["add-3"]},
  "lora_r": 4,
  "lora_alpha": 8.0,
  "lora_target_modules": ["q_proj", "v_proj"]
}
"""

# `BranchSpec(name="joint", base_model="demo", output_dir=..., sources=("a",)).to_dict()` at
# commit 991a88b: every field at its default, so only the fields that were always written.
OLD_DEFAULT_PAYLOAD = {
    "name": "joint",
    "base_model": "demo",
    "sources": ["a"],
    "mixture": {"path": "demo"},
    "epochs": 1.0,
    "lr": 0.0003,
    "batch_size": 32,
    "grad_accum": 1,
    "warmup_ratio": 0.05,
    "lr_scheduler": "cosine",
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "max_length": 256,
    "seed": 0,
    "device": "auto",
    "dtype": "float32",
    "save_steps": 100,
    "keep_checkpoints": False,
}


def _old_branch(tmp_path: Path) -> Path:
    folder = tmp_path / "run" / "branches" / "merit-1d" / "0"
    folder.mkdir(parents=True)
    (folder / "spec.json").write_text(OLD_SPEC)
    return folder / "spec.json"


def test_a_spec_json_from_before_the_envelope_loads_with_every_setting(tmp_path):
    path = _old_branch(tmp_path)
    spec = BranchSpec.load(path)
    assert spec.output_dir == str(path.parent.resolve())  # "." is the file's folder
    assert spec.sources == ("add", "max") and spec.epochs == 1.5
    assert spec.train == TrainConfig(
        lr=0.01,
        batch_size=4,
        grad_accum=2,
        warmup_ratio=0.1,
        max_length=64,
        seed=3,
        save_steps=4,
        lora_r=4,
        lora_alpha=8.0,
        lora_target_modules=("q_proj", "v_proj"),
    )
    assert (spec.device, spec.dtype, spec.long_examples) == ("cpu", "float32", "truncate_prompt")
    assert spec.fractions == {"max": 0.5} and spec.excluded == {"add": ["add-3"]}
    # the payload it writes back is the old file's, key for key: its key stays the same
    assert spec.to_dict(relative_to=path.parent) == json.loads(OLD_SPEC)


def test_an_old_branch_resumes_and_its_file_gains_the_header(tmp_path):
    path = _old_branch(tmp_path)
    spec = BranchSpec.load(path)
    assert write_spec(spec) == path  # the same branch: not refused as "a different branch"
    data = read_json(path)
    assert (data.pop("format"), data.pop("version")) == (SPEC_FORMAT, SPEC_VERSION)
    assert data == json.loads(OLD_SPEC)
    assert BranchSpec.load(path) == spec
    other = dataclasses.replace(spec, train=dataclasses.replace(spec.train, lr=0.02))
    with pytest.raises(ValueError, match=r"holds a different branch \(fields \['lr'\] differ\)"):
        write_spec(other)
    # what may change between a kill and its resumption: the process count, checkpointing
    more = dataclasses.replace(spec.train, procs_per_branch=2, gradient_checkpointing=True)
    assert write_spec(dataclasses.replace(spec, train=more)) == path


def test_a_spec_at_the_defaults_writes_the_old_layout(tmp_path):
    """A new `TrainConfig` field would enter every spec.json and make every existing branch "a
    different branch": it must be left out at its default (or be a run-level field)."""
    spec = BranchSpec(name="joint", base_model="demo", output_dir=str(tmp_path), sources=("a",))
    data = spec.to_dict()
    assert data.pop("output_dir") == str(tmp_path)
    assert data == OLD_DEFAULT_PAYLOAD
    assert BranchSpec.from_dict(spec.to_dict()) == spec


def test_a_joint_run_s_snapshot_steps_are_written_and_read_back(tmp_path):
    """Only a spec with snapshots writes ``snapshot_steps`` (a list in JSON, a tuple again when
    read); one without keeps the old layout, so existing branches stay the same branch."""
    train = TrainConfig(snapshot_steps=(5, 10))
    spec = BranchSpec(
        name="joint", base_model="demo", output_dir=str(tmp_path), sources=("a",), train=train
    )
    path = spec.save(tmp_path / "spec.json")
    data = read_json(path)
    assert data["snapshot_steps"] == [5, 10]
    assert {k: v for k, v in data.items() if k != "snapshot_steps"} == {
        "format": SPEC_FORMAT,
        "version": SPEC_VERSION,
        **OLD_DEFAULT_PAYLOAD,
        "output_dir": ".",
    }
    loaded = BranchSpec.load(path)
    assert loaded == spec and loaded.train.snapshot_steps == (5, 10)
    # other snapshots do not change what trains: a killed joint run resumes with them
    other = dataclasses.replace(spec, train=TrainConfig(snapshot_steps=(5, 20)))
    assert write_spec(other) == path and read_json(path)["snapshot_steps"] == [5, 20]
    with pytest.raises(ValueError, match=r"fields \['lr'\] differ"):
        write_spec(dataclasses.replace(spec, train=TrainConfig(lr=1e-2, snapshot_steps=(5,))))


def test_the_spec_holds_the_train_config_without_its_run_level_fields(tmp_path):
    run = TrainConfig(
        lr=1e-3,
        seed=1,
        seeds=(4, 5),
        launcher="local",
        n_procs=2,
        gpus=(0,),
        slurm={"timeout_min": 5},
        lora_target_modules=["q_proj"],  # a list from YAML: held as a tuple
    )
    spec = BranchSpec(
        name="b", base_model="demo", output_dir=str(tmp_path), sources=("a",), train=run
    )
    default = TrainConfig()
    assert {k: getattr(spec.train, k) for k in RUN_LEVEL_FIELDS} == {
        k: getattr(default, k) for k in RUN_LEVEL_FIELDS
    }
    assert (spec.train.lr, spec.train.seed, spec.train.lora_target_modules) == (
        1e-3,
        1,
        ("q_proj",),
    )
    assert set(RUN_LEVEL_FIELDS).isdisjoint(spec.to_dict())
    assert BranchSpec.load(spec.save(tmp_path / "spec.json")) == spec
    with pytest.raises(ValueError, match=r"unknown BranchSpec field\(s\) \['launcher'\]"):
        BranchSpec.from_dict({**spec.to_dict(), "launcher": "local"})


def test_bad_settings_are_refused_with_the_config_wording(tmp_path):
    base = {"name": "b", "base_model": "demo", "output_dir": str(tmp_path), "sources": ["a"]}
    for bad, message in [
        ({"lr": -1.0}, "lr: must be > 0"),  # TrainConfig's own check
        ({"batch_size": 0}, "batch_size: must be >= 1"),
        ({"lr_scheduler": "step"}, "lr_scheduler: unknown lr_scheduler 'step'"),
        ({"long_examples": "cut"}, "long_examples: unknown policy 'cut'"),
        ({"epochs": 0}, "epochs: must be > 0"),
        ({"lora_r": 4, "distributed": "fsdp"}, "LoRA branches train with distributed: ddp"),
        ({"fractions": {"z": 0.5}}, "fractions for sources it does not train"),
    ]:
        with pytest.raises(ValueError, match=message):
            BranchSpec.from_dict({**base, **bad})


def test_a_newer_or_foreign_spec_file_is_refused(tmp_path):
    path = tmp_path / "spec.json"
    spec = BranchSpec(name="b", base_model="demo", output_dir=str(tmp_path), sources=("a",))
    data = read_json(spec.save(path))
    path.write_text(json.dumps({**data, "version": SPEC_VERSION + 1}))
    with pytest.raises(EnvelopeError, match="written by a newer merit-lab"):
        BranchSpec.load(path)
    path.write_text(json.dumps({**data, "format": "merit-lab/partition"}))
    with pytest.raises(EnvelopeError, match="not 'merit-lab/branch-spec'"):
        BranchSpec.load(path)
