"""A finished run moved elsewhere still reads and resumes: paths inside a run are relative to it,
so nothing is retrained, re-merged or re-evaluated, and no file keeps the old location, before
any stage runs again. Covered: a full fine-tuning run and a LoRA run (exact merge, stacked
adapter, mergekit export), records from before relative paths, and θ0 moving as well."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from merit_lab.config.schema import load_config
from merit_lab.io import read_json, sha256_file
from merit_lab.merging.digests import verify_digest
from merit_lab.merging.stream import read_recorded_path, record_path
from merit_lab.models.lora import ADAPTER_CONFIG, ADAPTER_DIR
from merit_lab.pipeline import RunDir, run_pipeline, run_summary
from merit_lab.pipeline.experiments import evaluate_rows, merge_rows
from merit_lab.pipeline.report import write_report
from merit_lab.training.branch_log import MANIFEST
from merit_lab.training.spec import BranchSpec
from tests.conftest import write_demo_slice, write_tiny_run_config

SOURCES = [
    "reverse-a-terse-lower",
    "reverse-a-verbose-upper",
    "shift-a-terse-upper",
    "shift-a-verbose-lower",
]
STAGES = ["train", "merge", "evaluate", "report"]


def _make_and_move(base: Path, **extra) -> tuple[Path, Path, dict]:
    data = base / "data"  # outside the run: it stays where it is
    write_demo_slice(data, SOURCES, {"train": 12, "calibration": 8, "eval": 2})
    cfg = load_config(write_tiny_run_config(base / "run.yaml", data, base / "old", **extra))
    run_pipeline(cfg, until="partition")
    old = run_pipeline(cfg, STAGES).root
    before = {"timings": read_json(old / "timings.json")}
    new = base / "elsewhere" / "tiny-moved"
    new.parent.mkdir()
    shutil.move(str(old), str(new))
    assert not old.exists()
    return old, new, before


@pytest.fixture(scope="module")
def moved_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A tiny finished run (4 sources x 12 examples, a joint and a split row, and the split
    row's shrink and early controls from the joint run's snapshots) moved away."""
    torch.set_num_threads(1)
    experiments = [
        {"name": "joint-1ep", "kind": "joint", "epochs": 1},
        {"name": "merit-1d", "merges": ["linear"]},
        {"name": "shrink", "kind": "shrink"},
        {"name": "early", "kind": "early"},
    ]
    train = {"batch_size": 8, "lr": 1e-3, "save_steps": 50, "snapshot_steps": [2, 4]}
    return _make_and_move(tmp_path_factory.mktemp("moved"), experiments=experiments, train=train)


@pytest.fixture(scope="module")
def moved_lora_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The same with LoRA branches (rank 4) and θ0 a folder of its own: moved away."""
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("moved-lora")
    from merit_lab.demo import DEMO_DIR

    theta0 = base / "theta0"
    shutil.copytree(DEMO_DIR / "base", theta0)
    old, new, _ = _make_and_move(
        base, model=str(theta0), train={"batch_size": 8, "lr": 3e-3, "lora_r": 4, "lora_alpha": 8}
    )
    return old, new, theta0


def _files(root: Path) -> list[Path]:
    """Every record of a run that may name a path: JSON, YAML (config, mergekit), JSONL logs."""
    kinds = ("*.json", "*.yaml", "*.jsonl")
    return sorted(p for k in kinds for p in root.rglob(k) if p.is_file())


def _stale(old: Path, new: Path) -> dict[str, list[str]]:
    """Lines of the moved run's records that still name its old folder."""
    found = {
        str(p.relative_to(new)): [ln.strip() for ln in p.read_text().splitlines() if str(old) in ln]
        for p in _files(new)
    }
    return {k: v for k, v in found.items() if v}


def _check_records(merged: Path, finals: list[Path], theta0: Path | None) -> dict:
    """A merged folder's records name these finals (relative, read from the folder) and θ0
    (absolute: outside the run), and the manifest's hashes are those of the files there."""
    manifest = read_json(merged / "merge_manifest.json")
    paths = [i["path"] for i in manifest["inputs"]]
    assert all(not Path(p).is_absolute() for p in paths), paths
    assert [read_recorded_path(p, merged).resolve() for p in paths] == finals
    if theta0 is not None:
        assert manifest["base"]["path"] == str(theta0.resolve())
    for name, digest in manifest["output"]["files"].items():  # xxh3_128, or sha256 hex
        assert verify_digest(merged / name, digest), name
    return manifest


def test_a_moved_run_resumes_without_redoing_anything(moved_run):
    _, new, before = moved_run
    run = run_pipeline(RunDir(new), STAGES)  # the folder itself: its config, located there
    assert run.root == new and not run.lock.exists()
    timings = read_json(run.timings)
    assert {k: v for k, v in timings.items() if k != "report"} == {
        k: v for k, v in before["timings"].items() if k != "report"
    }  # only the report (always rewritten) did work
    cfg = RunDir(new).load_config()
    assert cfg.run_dir == new
    assert all(m["seconds"] == 0 for m in merge_rows(cfg))
    assert evaluate_rows(cfg, progress=False).attrs["evaluated"] == []
    summary = run_summary(new)
    assert str(new) in summary and "train: 3/3 branch runs done" in summary
    assert "controls: 2 built, 0 not reachable" in summary
    assert write_report(new).is_file()


def test_no_file_of_the_moved_run_keeps_its_old_location(moved_run):
    old, new, _ = moved_run
    # before any stage runs again: config.yaml's output_dir names the old parent (the config as
    # given; a run read from its folder is located there), never the old run folder itself
    assert _stale(old, new) == {}
    assert load_config(new / "config.yaml").output_dir == str(old.parent)
    merged = new / "merged" / "merit-1d"
    finals = [(new / "branches" / "merit-1d" / str(k) / "final").resolve() for k in (0, 1)]
    manifest = _check_records(merged, finals, None)
    # the shrink control is the merge of θ0 (outside: absolute) and the joint run (relative)
    shrink = new / "controls" / "merit-1d_shrink"
    joint = (new / "joint" / "ep1-s0" / "final").resolve()
    control = read_json(shrink / "merge_manifest.json")
    assert control["inputs"][1]["path"] == "../../joint/ep1-s0/final"
    assert read_recorded_path(control["inputs"][1]["path"], shrink).resolve() == joint
    assert Path(control["inputs"][0]["path"]).is_absolute()  # θ0, outside the run
    cache = read_json(new / "controls" / "controls.json")["cache"]["folders"]
    assert sorted(cache) == ["joint/ep1-s0/final", "merged/merit-1d"]
    mk = yaml.safe_load((merged / "mergekit.yaml").read_text())
    assert [m["model"] for m in mk["models"]] == [i["path"] for i in manifest["inputs"]]
    assert mk["models"][0]["model"] == "../../branches/merit-1d/0/final"
    assert verify_digest(merged / "mergekit.yaml", manifest["output"]["files"]["mergekit.yaml"])


def test_branch_specs_read_their_folder_from_where_they_are(moved_run):
    _, new, _ = moved_run
    run = RunDir(new)
    specs = sorted(new.glob("**/spec.json"))
    assert len(specs) == 3
    for path in specs:
        assert read_json(path)["output_dir"] == "."
        assert Path(BranchSpec.load(path).output_dir) == path.parent.resolve()
    for manifest in new.glob(f"**/final/{MANIFEST}"):
        assert read_json(manifest)["spec"]["output_dir"] == ".."
    assert run.load_partition().k == 2


def test_records_from_before_relative_paths_are_put_right_without_re_merging(moved_run, caplog):
    """A run merged before records were relative names its branches by absolute paths under
    its old folder: it still loads, and the merge stage re-points them, re-merging nothing."""
    old, new, _ = moved_run
    merged = new / "merged" / "merit-1d"
    manifest = read_json(merged / "merge_manifest.json")
    finals = [str(old / "branches" / "merit-1d" / str(k) / "final") for k in (0, 1)]
    for entry, p in zip(manifest["inputs"], finals, strict=True):
        entry["path"] = p
    mk = yaml.safe_load((merged / "mergekit.yaml").read_text())
    for model, p in zip(mk["models"], finals, strict=True):
        model["model"] = p
    (merged / "mergekit.yaml").write_text(yaml.safe_dump(mk, sort_keys=False))
    manifest["output"]["files"]["mergekit.yaml"] = sha256_file(merged / "mergekit.yaml")
    (merged / "merge_manifest.json").write_text(json.dumps(manifest))
    weights = sha256_file(merged / "model.safetensors")
    stamp = (merged / "model.safetensors").stat().st_mtime_ns
    assert "merge: merit-1d" in run_summary(new)  # it loads as it is
    assert write_report(new).is_file()

    with caplog.at_level("INFO", logger="merit_lab.pipeline.experiments"):
        run_pipeline(RunDir(new), ["merge"])
    assert "merit-1d: merge records re-pointed" in caplog.text
    assert read_json(new / "merge.json")["merges"][0]["seconds"] == 0
    assert (merged / "model.safetensors").stat().st_mtime_ns == stamp
    assert sha256_file(merged / "model.safetensors") == weights
    moved = [(new / "branches" / "merit-1d" / str(k) / "final").resolve() for k in (0, 1)]
    _check_records(merged, moved, None)
    assert _stale(old, new) == {}


def test_a_moved_lora_run_keeps_its_merge_adapter_and_mergekit_records(moved_lora_run, monkeypatch):
    old, new, theta0 = moved_lora_run
    assert _stale(old, new) == {}
    merged = new / "merged" / "merit-1d"
    finals = [(new / "branches" / "merit-1d" / str(k) / "final").resolve() for k in (0, 1)]
    manifest = _check_records(merged, finals, theta0)
    assert manifest["lora"]["adapter_rank"] == 8  # the exact LoRA merge and its stacked adapter
    adapter = read_json(merged / ADAPTER_DIR / ADAPTER_CONFIG)
    assert adapter["base_model_name_or_path"] == str(theta0.resolve())  # θ0: outside the run
    # mergekit.yaml names the branches' dense models relative to the merged folder: mergekit,
    # started there (`cd merged/merit-1d && mergekit-yaml mergekit.yaml out`), finds them
    mk = yaml.safe_load((merged / "mergekit.yaml").read_text())
    assert [m["model"] for m in mk["models"]] == [i["path"] for i in manifest["inputs"]]
    monkeypatch.chdir(merged)
    for m in mk["models"]:
        assert (Path(m["model"]) / "config.json").is_file()
        assert (Path(m["model"]) / "model.safetensors").is_file()
    # the joint run's adapter and the LoRA rows are read and evaluated from the new place
    cfg = RunDir(new).load_config()
    assert evaluate_rows(cfg, progress=False).attrs["evaluated"] == []
    assert all(m["seconds"] == 0 for m in merge_rows(cfg))
    assert read_json(merged / "merge_manifest.json") == manifest  # records already right


def test_when_theta0_moves_too_the_error_names_it_and_the_merge_stage_re_points(
    moved_lora_run, tmp_path
):
    _, new, theta0 = moved_lora_run
    elsewhere = tmp_path / "theta0-moved"
    text = (new / "config.yaml").read_text()
    shutil.move(str(theta0), str(elsewhere))
    try:
        with pytest.raises(FileNotFoundError, match=r"config.yaml: model: .*no longer exists"):
            RunDir(new).load_config()
        # what the message says to do: write θ0's new place in the run's config.yaml
        (new / "config.yaml").write_text(text.replace(str(theta0), str(elsewhere)))
        merged = new / "merged" / "merit-1d"
        stamp = (merged / "model.safetensors").stat().st_mtime_ns
        run_pipeline(RunDir(new), ["merge"])
        assert all(m["seconds"] == 0 for m in read_json(new / "merge.json")["merges"])
        assert (merged / "model.safetensors").stat().st_mtime_ns == stamp  # not re-merged
        finals = [(new / "branches" / "merit-1d" / str(k) / "final").resolve() for k in (0, 1)]
        _check_records(merged, finals, elsewhere)  # hashes of the rewritten records updated
        adapter = read_json(merged / ADAPTER_DIR / ADAPTER_CONFIG)
        assert adapter["base_model_name_or_path"] == str(elsewhere.resolve())
    finally:
        shutil.move(str(elsewhere), str(theta0))
        (new / "config.yaml").write_text(text)


def test_a_record_is_relative_inside_the_run_and_absolute_outside(tmp_path):
    run, theta0 = tmp_path / "runs" / "r", tmp_path / "theta0"
    merged, branch = run / "merged" / "m", run / "branches" / "e" / "0" / "final"
    assert record_path(branch, merged, run) == "../../branches/e/0/final"
    assert record_path(run / "merged" / "m2", merged, run) == "../m2"
    assert record_path(theta0, merged, run) == str(theta0.resolve())  # outside the run
    assert record_path(branch, merged, None) == str(branch.resolve())  # no run: absolute
    assert read_recorded_path("../../branches/e/0/final", merged).resolve() == branch.resolve()
    assert read_recorded_path(str(theta0), merged) == theta0
