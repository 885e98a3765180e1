"""A run is addressed by its folder: every command reads the folder it is given, from any working
directory, and never the run its stored ``output_dir`` + ``name`` names.

One tiny finished run is made from a project folder with a relative ``output_dir`` and a relative
mixture path (as ``configs/*.yaml`` are), copied, and the original then made different: its
partitions regrouped, its evaluation, merges and diagnostics deleted. Every command on the copy,
started from the project folder (where the stored ``runs/tiny`` is the original) or from an
unrelated folder, must read the copy and only the copy.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from merit_lab.cli import main
from merit_lab.config.schema import load_config
from merit_lab.io import read_json
from merit_lab.partition.plan import Partition
from merit_lab.pipeline import RunDir, run_pipeline
from merit_lab.pipeline.export_run import run_specs
from merit_lab.pipeline.report import load_report_context, write_report
from tests.conftest import write_demo_slice, write_tiny_run_config

SOURCES = [
    "reverse-a-terse-lower",
    "reverse-a-verbose-upper",
    "shift-a-terse-upper",
    "shift-a-verbose-lower",
]
DIAGNOSTICS = {  # the cheapest settings the diagnostics accept
    "experiments": ["merit-1d"],
    "max_examples": 2,
    "alphas": 3,
    "sigmas": [0.0, 0.01],
    "seeds": [0],
    "hessian_k": 2,
    "hessian_iter": 4,
    "curvature_examples": 1,
}


def _regroup(path: Path) -> Partition:
    """Rewrite a partition with its two groups' first sources swapped: valid, and different."""
    data = json.loads(path.read_text())
    a, b = data["groups"][0], data["groups"][1]
    a[0], b[0] = b[0], a[0]
    path.write_text(json.dumps(data))
    return Partition.load(path)


def _untimed(report: str) -> list[str]:
    return [ln for ln in report.splitlines() if not ln.startswith(("| report |", "| total |"))]


@pytest.fixture(scope="module")
def copied_run(tmp_path_factory):
    """(project, original, copy, elsewhere, the copy's partition, report.md as made)."""
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("bypath")
    project, elsewhere = base / "project", base / "unrelated"
    elsewhere.mkdir()
    write_demo_slice(project / "data", SOURCES, {"train": 12, "calibration": 8, "eval": 2})
    cfg_path = write_tiny_run_config(
        project / "run.yaml",
        Path("data"),  # relative, as the configs in configs/ are
        Path("runs"),
        diagnostics=DIAGNOSTICS,
        eval={"max_examples": 2, "max_new_tokens": 4, "splits": ["eval"]},
    )
    here = Path.cwd()
    os.chdir(project)
    try:
        run = run_pipeline(load_config(cfg_path), until="report")
    finally:
        os.chdir(here)
    original = project / "runs" / "tiny"
    assert run.root == Path("runs/tiny") and (original / "report.md").is_file()
    assert read_json(original / "launch.json")["cwd"] == str(project)
    copy = base / "copies" / "tiny-copy"
    shutil.copytree(original, copy)
    made = (copy / "report.md").read_text()
    part = RunDir(copy).load_partition()
    # the original, still where the stored config points, is now another run
    assert _regroup(original / "partition.json").groups != part.groups
    _regroup(original / "branches" / "merit-1d" / "partition.json")
    gone = ["eval.parquet", "eval", "merged", "diagnostics", "report.md", "results.json", "figures"]
    for name in gone:
        p = original / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return project, original, copy, elsewhere, part, made


@pytest.fixture(params=["project", "unrelated"])
def cwd(request, copied_run, monkeypatch) -> Path:
    """Started from the project folder (``runs/tiny`` there is the original) or elsewhere."""
    project, _, _, elsewhere, _, _ = copied_run
    folder = project if request.param == "project" else elsewhere
    monkeypatch.chdir(folder)
    return folder


def test_the_config_read_from_a_run_folder_is_located_there(copied_run, cwd):
    project, _, copy, _, _, _ = copied_run
    stored = load_config(copy / "config.yaml")  # as it was run: output_dir runs, name tiny
    assert (stored.output_dir, stored.name, stored.mixture.path) == ("runs", "tiny", "data")
    cfg = RunDir(copy).load_config()
    assert cfg.run_dir == copy and cfg.name == "tiny-copy"
    # the relative mixture is taken from where the run was started (launch.json), read as given
    # from there and as the absolute path elsewhere
    assert Path(os.path.abspath(cfg.mixture.path)) == project / "data"
    assert cfg.mixture.path == ("data" if cwd == project else str(project / "data"))
    relative = RunDir(os.path.relpath(copy, cwd)).load_config()
    assert relative.run_dir == copy  # a relative folder is made absolute once, at load


def test_show_reads_the_copy(copied_run, cwd, capsys):
    _, original, copy, _, part, _ = copied_run
    assert main(["show", os.path.relpath(copy, cwd)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("run tiny-copy at ")
    for g, members in enumerate(part.groups):
        w = part.weights[g]
        assert (
            f"group {g}: {len(members)} sources, {part.group_examples[g]} examples, w={w:.3f}"
            in out
        )
    assert "evaluate: 3 models" in out and str(original) not in out


def test_report_and_figures_read_the_copy(copied_run, cwd):
    _, original, copy, _, part, made = copied_run
    report = write_report(copy).read_text()
    # the same run under its new name and folder (and timings.json has the report's own time)
    made = made.replace("`tiny`", "`tiny-copy`").replace("runs/tiny", str(copy))
    assert _untimed(report) == _untimed(made)
    groups = load_report_context(copy).sources["group"].to_dict()
    assert groups == {s: f"G{g}" for g, members in enumerate(part.groups) for s in members}
    assert main(["figures", str(copy), "--out", "figs", "--formats", "json"]) == 0
    figs = cwd / "figs"
    assert {"conflict_scatter.json", "compare_loss.json", "training.json"} <= {
        p.name for p in figs.iterdir()
    }
    compare = json.loads((figs / "compare_loss.json").read_text())
    table = pd.read_parquet(copy / "eval.parquet")
    assert {t["name"] for t in compare["data"]} >= set(table["model"].unique())
    shutil.rmtree(figs)
    assert not (original / "report.md").exists() and not (original / "figures").exists()


def test_diagnose_reads_the_copy_and_redoes_nothing(copied_run, cwd, capsys):
    _, original, copy, _, _, _ = copied_run
    stamps = {p.name: p.stat().st_mtime_ns for p in (copy / "diagnostics").glob("*.json")}
    assert len(stamps) >= 5
    assert main(["diagnose", str(copy)]) == 0
    assert f"diagnostics: {copy / 'diagnostics'}" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (copy / "diagnostics").glob("*.json")} == stamps
    assert load_config(copy / "config.yaml").output_dir == "runs"  # the config as given, kept
    assert not (original / "diagnostics").exists() and not (original / "report.md").exists()


def test_examples_and_export_read_the_copy(copied_run, cwd, capsys):
    _, original, copy, _, _, _ = copied_run
    args = ["examples", str(copy), "--dim", "256", "--boot", "8", "--rs", "1"]
    assert main(args) == 0
    assert "32 examples" in capsys.readouterr().out  # 4 sources x n = 8
    table = pd.read_parquet(copy / "examples.parquet")
    assert sorted(table["source"].unique()) == sorted(SOURCES)
    assert read_json(copy / "stability.json")["info"]["partition_r"] == 1
    assert not (original / "examples.parquet").exists()

    branch = Partition.load(copy / "branches" / "merit-1d" / "partition.json")
    specs = run_specs(copy)
    assert [sorted(specs[f"merit-1d/{k}"].sources) for k in (0, 1)] == [
        sorted(g) for g in branch.groups
    ]
    for spec in specs.values():  # every branch folder is the copy's
        assert Path(spec.output_dir).is_relative_to(copy.resolve())
    assert main(["export", str(copy), "--out", "exported", "--format", "jsonl"]) == 0
    exported = cwd / "exported"
    rows = [json.loads(ln) for ln in (exported / "manifest.jsonl").read_text().splitlines()]
    for k, group in enumerate(branch.groups):
        assert sorted({r["source"] for r in rows if r["branch"] == f"merit-1d/{k}"}) == sorted(
            group
        )
    shutil.rmtree(exported)


def test_a_missing_outside_path_is_one_error_naming_its_key(copied_run, capsys):
    project, _, copy, _, _, _ = copied_run
    (project / "data").rename(project / "data-away")  # the mixture, outside the run, is gone
    try:
        where = rf"{copy / 'config.yaml'}: mixture.path: 'data' \({project / 'data'}, a relative"
        with pytest.raises(FileNotFoundError, match=where):
            RunDir(copy).load_config()
        assert main(["show", str(copy)]) == 2
    finally:
        (project / "data-away").rename(project / "data")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mixture.path: 'data'" in err[0] and "no longer exists" in err[0]
    assert RunDir(copy).load_config().mixture.path == str(project / "data")  # back: it reads
