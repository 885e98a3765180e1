"""A finished run moved elsewhere still reads and resumes: paths inside a run are relative to it,
so nothing is retrained, re-merged or re-evaluated, and no file keeps the old location."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from merit_lab.config.schema import load_config
from merit_lab.io import read_json
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


@pytest.fixture(scope="module")
def moved_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A tiny finished run (4 sources x 12 examples, a joint and a split row) moved away."""
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("moved")
    data = base / "data"  # outside the run: it stays where it is
    write_demo_slice(data, SOURCES, {"train": 12, "calibration": 8, "eval": 2})
    cfg_path = write_tiny_run_config(base / "run.yaml", data, base / "old")
    cfg = load_config(cfg_path)
    run_pipeline(cfg, until="partition")
    old = run_pipeline(cfg, STAGES).root
    before = {"timings": read_json(old / "timings.json"), "old": str(old.resolve())}
    new = base / "elsewhere" / "tiny-moved"
    new.parent.mkdir()
    shutil.move(str(old), str(new))
    assert not old.exists()
    return old, new, before


def _json_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.json") if p.is_file())


def test_a_moved_run_resumes_without_redoing_anything(moved_run):
    _, new, before = moved_run
    cfg = load_config(new / "config.yaml", output_dir=str(new.parent), name=new.name)
    assert cfg.run_dir == new
    run = run_pipeline(cfg, STAGES)
    assert run.root == new and not run.lock.exists()
    timings = read_json(run.timings)
    assert {k: v for k, v in timings.items() if k != "report"} == {
        k: v for k, v in before["timings"].items() if k != "report"
    }  # only the report (always rewritten) did work
    assert all(m["seconds"] == 0 for m in merge_rows(cfg))
    assert evaluate_rows(cfg, progress=False).attrs["evaluated"] == []
    summary = run_summary(new)
    assert str(new) in summary and "train: 3/3 branch runs done" in summary
    assert write_report(new).is_file()


def test_no_file_of_the_moved_run_keeps_its_old_location(moved_run):
    old, new, _ = moved_run
    cfg = load_config(new / "config.yaml", output_dir=str(new.parent), name=new.name)
    run_pipeline(cfg, STAGES)
    stale = {
        str(p.relative_to(new)): [ln.strip() for ln in p.read_text().splitlines() if str(old) in ln]
        for p in [*_json_files(new), new / "config.yaml", *new.rglob("mergekit.yaml")]
    }
    assert {k: v for k, v in stale.items() if v} == {}
    manifest = read_json(new / "merged" / "merit-1d" / "merge_manifest.json")
    finals = [str((new / "branches" / "merit-1d" / str(k) / "final").resolve()) for k in (0, 1)]
    assert [i["path"] for i in manifest["inputs"]] == finals  # re-pointed, hashes unchanged
    mk = (new / "merged" / "merit-1d" / "mergekit.yaml").read_bytes()
    assert manifest["output"]["files"]["mergekit.yaml"] == hashlib.sha256(mk).hexdigest()


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
